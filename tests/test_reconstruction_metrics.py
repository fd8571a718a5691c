"""Reconstruction metrics of an autoencoder (minildm.metrics.psnr, ssim, reconstruction_distance): PSNR against
known MSEs, SSIM against the paper's formula written out here, the reconstruction Fréchet distance on
shapes-evaluator features at 0 for perfect reconstructions and growing with corruption."""

import math

import pytest
import torch
from torch.nn import functional as F

from minildm import data, metrics


def _images(n=4, side=32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, side, side, generator=g) * 2 - 1) * scale


def test_psnr_of_known_errors_and_of_identical_images():
    x = _images(2, scale=0.5)  # in [-0.5, 0.5]: shifted copies stay in [-1, 1]
    shift = torch.tensor([0.1, 0.2]).view(2, 1, 1, 1)  # MSE 0.01 and 0.04
    got = metrics.psnr(x, x + shift)
    expected = torch.tensor([10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.04)])  # 26.02 dB, 20.00 dB
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert got.shape == (2,)
    assert torch.isinf(metrics.psnr(x, x)).all() and (metrics.psnr(x, x) > 0).all()


def _ssim_by_hand(a, b):
    """Wang et al. 2004 on [0, 1] images: Gaussian window 11, sigma 1.5, K = (0.01, 0.03); windows at every pixel,
    the borders reflected (torchmetrics' convention)."""
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-coords**2 / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)
    a, b = (F.pad(v.double(), (5, 5, 5, 5), mode="reflect") for v in (a, b))
    blur = lambda v: F.conv2d(v, window, groups=3)
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean(dim=(1, 2, 3))


def test_ssim_is_the_papers_formula_one_for_identical_and_falls_with_noise():
    images, _ = data.ShapesDataset(4, 32, seed=3).tensors()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    scores = []
    for level in (0.05, 0.2, 0.5):
        noisy = (images + level * noise).clamp(-1, 1)
        got = metrics.ssim(images, noisy)
        torch.testing.assert_close(got.double(), _ssim_by_hand((noisy + 1) / 2, (images + 1) / 2),
                                   rtol=1e-4, atol=1e-5)
        scores.append(got)
    assert (scores[0] > scores[1]).all() and (scores[1] > scores[2]).all()
    torch.testing.assert_close(metrics.ssim(images, images), torch.ones(4), rtol=0, atol=1e-5)


@pytest.mark.parametrize("metric", [metrics.psnr, metrics.ssim, metrics.reconstruction_distance])
def test_metrics_reject_mismatched_shapes(metric):
    with pytest.raises(ValueError, match="same shape"):
        metric(_images(4), _images(3))
    with pytest.raises(ValueError, match="same shape"):
        metric(_images(4), _images(4, side=16))


def test_reconstruction_distance_is_zero_for_perfect_reconstructions_and_grows_with_corruption():
    images, _ = data.ShapesDataset(64, 32, seed=5).tensors()
    assert metrics.reconstruction_distance(images, images) == pytest.approx(0.0, abs=1e-6)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    distances = [metrics.reconstruction_distance(images, images + level * noise) for level in (0.05, 0.2, 0.6)]
    assert 0 < distances[0] < distances[1] < distances[2]
    # Decoder outputs overshooting [-1, 1] are clamped, as saved images would be, not rejected.
    overshoot = images * 1.2
    assert metrics.reconstruction_distance(images, overshoot) == pytest.approx(
        metrics.reconstruction_distance(images, overshoot.clamp(-1, 1)))
    # The same number by hand: Fréchet distance of the evaluator's features of the two sets.
    features = metrics.classify(images)["features"], metrics.classify((images + 0.2 * noise).clamp(-1, 1))["features"]
    assert distances[1] == pytest.approx(metrics.frechet_distance(features[1], features[0]), rel=1e-9)
