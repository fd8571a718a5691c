"""Figures for the course: image grids, the forward-process filmstrip and slider, 2-D densities and paths.

Every function takes tensors in the package's conventions (images [N, C, H, W] in [-1, 1],
points [N, 2]) and draws into a matplotlib `Axes` (a new figure when `ax` is None), returning it.
Interactive widgets always come with a static twin (`filmstrip` for `timestep_slider`), because
saved widget state does not redraw on GitHub.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from torchvision.utils import make_grid


def to_numpy_image(x: torch.Tensor) -> np.ndarray:
    """One image [C, H, W] in [-1, 1] -> numpy [H, W, C] (or [H, W] for one channel) in [0, 1]."""
    x = (x.detach().float().cpu().clamp(-1, 1) + 1) / 2
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def image_grid(x: torch.Tensor, nrow: int = 8, padding: int = 1) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] -> one grid image [C, H', W'] in [-1, 1] (white separators)."""
    return make_grid(x.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=padding, pad_value=1.0)


def _new_axes(ax, figsize):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def show_images(x: torch.Tensor, nrow: int = 8, title: str | None = None, ax=None, padding: int = 1):
    """Show images [N, C, H, W] in [-1, 1] as a grid of `nrow` per row; returns the Axes."""
    grid = image_grid(x, nrow, padding)
    cols, rows = min(nrow, len(x)), -(-len(x) // nrow)
    inch = min(0.9, 10 / cols)  # per image, so that a wide grid stays at most 10 inches
    ax = _new_axes(ax, figsize=(inch * cols, inch * rows + (0.3 if title else 0)))
    ax.imshow(to_numpy_image(grid), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


@torch.no_grad()
def noised(x0: torch.Tensor, diffusion, timesteps, noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_t = q_sample(x0, t, noise) for every t in `timesteps`: [len(timesteps), N, C, H, W], same noise for all t."""
    noise = torch.randn_like(x0) if noise is None else noise
    frames = []
    for t in timesteps:
        t_batch = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=x0.device)
        frames.append(diffusion.q_sample(x0, t_batch, noise))
    return torch.stack(frames)


def filmstrip(x0: torch.Tensor, diffusion, timesteps, noise: torch.Tensor | None = None, ax=None,
              title: str | None = None):
    """The forward process as a table: one row per image of x0 [N, C, H, W], one column per t, x_t = q_sample(x0, t)."""
    frames = noised(x0, diffusion, timesteps, noise)  # [T, N, C, H, W]
    num_t, n = frames.shape[:2]
    grid = image_grid(frames.transpose(0, 1).reshape(num_t * n, *x0.shape[1:]), nrow=num_t)
    ax = _new_axes(ax, figsize=(min(1.1 * num_t, 12), min(1.1 * n, 10) + 0.3))
    ax.imshow(to_numpy_image(grid), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    side = x0.shape[-1] + 2  # image plus its padding
    ax.set_xticks([1 + side * (i + 0.5) for i in range(num_t)], [f"t={int(t)}" for t in timesteps], fontsize=8)
    ax.set_yticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title)
    return ax


def timestep_slider(x0: torch.Tensor, diffusion, noise: torch.Tensor | None = None, t: int = 0, nrow: int = 8,
                    figsize=(4, 4)):
    """An ipywidgets slider over t showing q_sample(x0, t, noise) for images x0 [N, C, H, W].

    Returns a `VBox(slider, output)`; `widget.slider`, `widget.image` (the matplotlib image whose
    data the callback replaces) and `widget.show(t)` are exposed so the callback can be tested
    without a frontend. Pair it with a static `filmstrip` in notebooks.
    """
    import ipywidgets
    from IPython.display import clear_output, display
    from matplotlib.figure import Figure

    noise = torch.randn_like(x0) if noise is None else noise
    slider = ipywidgets.IntSlider(value=t, min=0, max=diffusion.num_timesteps - 1, step=1, description="t",
                                  continuous_update=False)
    output = ipywidgets.Output()
    figure = Figure(figsize=figsize)  # not managed by pyplot: shown only inside the Output widget
    ax = figure.add_subplot()
    ax.set_axis_off()
    image = ax.imshow(np.zeros((1, 1)), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    widget = ipywidgets.VBox([slider, output])

    def show(t: int):
        x_t = noised(x0, diffusion, [t], noise)[0]
        image.set_data(to_numpy_image(image_grid(x_t, nrow)))
        ax.set_title(f"x_t = q_sample(x0, t={t})")
        with output:
            clear_output(wait=True)
            display(figure)
        return figure

    slider.observe(lambda change: show(change["new"]), names="value")
    widget.slider, widget.image, widget.figure, widget.show = slider, image, figure, show
    show(t)
    return widget


def scatter_2d(points: torch.Tensor, ax=None, title: str | None = None, lim: float = 3.0, s: float = 1.0,
               alpha: float = 0.5, **kwargs):
    """Scatter plot of points [N, 2] on the square [-lim, lim]^2; returns the Axes."""
    ax = _new_axes(ax, figsize=(3, 3))
    points = points.detach().cpu().numpy()
    ax.scatter(points[:, 0], points[:, 1], s=s, alpha=alpha, linewidths=0, **kwargs)
    _square(ax, lim, title)
    return ax


def _square(ax, lim, title):
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def mixture_density(centers: torch.Tensor, std: float, lim: float = 3.0, resolution: int = 120) -> torch.Tensor:
    """Density of (1/N) sum_i N(x; centers_i, std^2 I) on a resolution^2 grid over [-lim, lim]^2 -> [res, res].

    With centers = sqrt(alpha_bar_t) * x0_i and std = sqrt(1 - alpha_bar_t) this is exactly
    q(x_t) for the empirical data distribution of the x0_i (DDPM Eq. 4 averaged over the data).
    """
    centers = centers.detach().float()  # computed where the centers live (a GPU makes FULL_SIZE runs fast)
    axis = torch.linspace(-lim, lim, resolution, device=centers.device)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1).reshape(-1, 2)  # row = y, column = x
    log_p = torch.empty(len(grid), device=centers.device)
    for i in range(0, len(grid), 4096):  # chunks keep the [grid, N] distance matrix small
        sq = torch.cdist(grid[i:i + 4096], centers).pow(2)
        log_p[i:i + 4096] = torch.logsumexp(-sq / (2 * std**2), dim=1)
    log_p += -np.log(len(centers)) - np.log(2 * np.pi * std**2)
    return log_p.exp().reshape(resolution, resolution).cpu()


def density_2d(centers: torch.Tensor, std: float, ax=None, title: str | None = None, lim: float = 3.0,
               resolution: int = 120, cmap: str = "magma"):
    """Draw `mixture_density(centers, std)` as an image over [-lim, lim]^2; returns the Axes."""
    ax = _new_axes(ax, figsize=(3, 3))
    density = mixture_density(centers, std, lim, resolution)
    ax.imshow(density.numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap=cmap, interpolation="bilinear")
    _square(ax, lim, title)
    return ax


def trajectories_2d(path: torch.Tensor, ax=None, num_paths: int = 50, title: str | None = None, lim: float = 3.0,
                    end: torch.Tensor | None = None):
    """Paths of 2-D samples over steps, path [S, N, 2] (step 0 first): a line per point, start dot grey, end dot red.

    `end` (optional [M, 2]) is drawn underneath in light grey, e.g. the data the paths should reach.
    """
    ax = _new_axes(ax, figsize=(3, 3))
    path = path.detach().cpu().numpy()[:, :num_paths]
    if end is not None:
        end = end.detach().cpu().numpy()
        ax.scatter(end[:, 0], end[:, 1], s=1, color="0.8", linewidths=0)
    ax.plot(path[:, :, 0], path[:, :, 1], color="tab:blue", alpha=0.4, linewidth=0.7)
    ax.scatter(path[0, :, 0], path[0, :, 1], s=6, color="0.4", zorder=3)
    ax.scatter(path[-1, :, 0], path[-1, :, 1], s=6, color="tab:red", zorder=3)
    _square(ax, lim, title)
    return ax
