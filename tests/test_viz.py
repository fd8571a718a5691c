import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from minildm import data, schedules, viz
from minildm.diffusion import GaussianDiffusion


@pytest.fixture
def diffusion():
    return GaussianDiffusion(schedules.beta_schedule("linear", 100))


@pytest.fixture
def images():
    return data.ShapesDataset(6, image_size=8, seed=0).tensors()[0]


def test_to_numpy_image_maps_minus_one_one_to_unit_range():
    x = torch.tensor([[[-1.0, 0.0], [1.0, 3.0]]]).repeat(3, 1, 1)
    out = viz.to_numpy_image(x)
    assert out.shape == (2, 2, 3)
    np.testing.assert_allclose(out[..., 0], [[0.0, 0.5], [1.0, 1.0]])  # clamped above 1
    assert viz.to_numpy_image(x[:1]).shape == (2, 2)


def test_show_images_draws_the_grid(images):
    ax = viz.show_images(images, nrow=3, title="shapes")
    shown = ax.get_images()[0].get_array()
    assert shown.shape == (2 * 9 + 1, 3 * 9 + 1, 3)  # 2 rows x 3 columns of 8 px + 1 px borders
    np.testing.assert_allclose(shown[1:9, 1:9], viz.to_numpy_image(images[0]), atol=1e-6)
    assert ax.get_title() == "shapes"
    plt.close("all")
    _, axes = plt.subplots(1, 2)
    assert viz.show_images(images[:1, :1], ax=axes[1]) is axes[1]  # one channel, given axes
    plt.close("all")


def test_filmstrip_rows_are_images_columns_are_timesteps(images, diffusion):
    noise = torch.randn_like(images[:2])
    timesteps = [0, 50, 99]
    ax = viz.filmstrip(images[:2], diffusion, timesteps, noise=noise)
    grid = ax.get_images()[0].get_array()
    assert grid.shape == (2 * 9 + 1, 3 * 9 + 1, 3)
    x_t = diffusion.q_sample(images[1:2], torch.tensor([50]), noise[1:2])
    np.testing.assert_allclose(grid[10:18, 10:18], viz.to_numpy_image(x_t[0]), atol=1e-6)
    assert [label.get_text() for label in ax.get_xticklabels()] == ["t=0", "t=50", "t=99"]
    plt.close("all")


def test_timestep_slider_callback_redraws_without_a_frontend(images, diffusion):
    noise = torch.randn_like(images)
    widget = viz.timestep_slider(images, diffusion, noise=noise, t=0, nrow=3)
    assert widget.slider.max == diffusion.num_timesteps - 1 and widget.children[0] is widget.slider
    widget.slider.value = 70  # what dragging the slider does: fires the observer
    expected = viz.image_grid(diffusion.q_sample(images, torch.full((6,), 70), noise), nrow=3)
    np.testing.assert_allclose(widget.image.get_array(), viz.to_numpy_image(expected), atol=1e-6)
    assert "t=70" in widget.figure.axes[0].get_title()
    widget.show(3)
    assert "t=3" in widget.figure.axes[0].get_title()


def test_mixture_density_is_a_normalised_gaussian_mixture():
    centers = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    density = viz.mixture_density(centers, std=0.5, lim=4.0, resolution=161)
    cell = (8.0 / 160) ** 2
    assert abs(density.sum().item() * cell - 1.0) < 1e-2
    # grid row = y, column = x: the peak of the second centre sits at x = 1, y = -1
    axis = torch.linspace(-4, 4, 161)
    row, col = int((axis - -1.0).abs().argmin()), int((axis - 1.0).abs().argmin())
    expected = 0.5 / (2 * np.pi * 0.25) * (1 + np.exp(-2 / 0.5))
    assert abs(density[row, col].item() - expected) < 1e-4


def test_2d_plots(diffusion):
    points = data.toy_2d("moons", 200, torch.Generator().manual_seed(0))
    ax = viz.scatter_2d(points, title="moons")
    assert ax.collections[0].get_offsets().shape == (200, 2)
    ax = viz.density_2d(points, std=0.2, resolution=40)
    assert ax.get_images()[0].get_array().shape == (40, 40)
    path = torch.cumsum(torch.randn(10, 30, 2) * 0.1, dim=0)
    ax = viz.trajectories_2d(path, num_paths=5, end=points)
    assert len(ax.get_lines()) == 5
    plt.close("all")
