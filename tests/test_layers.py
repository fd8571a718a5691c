"""Timestep embeddings, GroupNorm32 and zero init against the original implementations."""

import numpy as np
import pytest
import torch

from minildm import layers


@pytest.fixture(scope="module")
def temb(reference_dir):
    arrays = np.load(reference_dir / "numerics" / "gaussian_diffusion.npz")
    return {k: torch.from_numpy(arrays[k]) for k in arrays.files if k.startswith("temb.")}


def assert_embedding_close(got, expected, t):
    """Row-wise tolerance of one float32 ulp of the angle t * f (f <= 1): a 1-ulp difference in the float32
    `exp` of another CPU's kernel moves sin/cos at t=999 by up to 6e-5, while both stay equally far
    (2.8e-5) from the float64 truth. Small t must agree to 1e-6."""
    atol = 6e-8 * t.double().abs()[:, None] + 1e-6
    error = (got.double() - expected.double()).abs()
    assert got.shape == expected.shape
    assert torch.all(error <= atol), f"max error {error.max():.3g}; per-row tolerance {atol.flatten().tolist()}"


@pytest.mark.parametrize("key", ["temb.guided.dim64", "temb.ldm_unet.dim64"])
def test_adm_embedding_matches_guided_diffusion_and_ldm_unet(temb, key):
    got = layers.timestep_embedding_adm(temb["temb.t"], 64)
    assert_embedding_close(got, temb[key], temb["temb.t"])


def test_ddpm_embedding_matches_ldm_autoencoder(temb):
    got = layers.timestep_embedding_ddpm(temb["temb.t"], 64)
    assert_embedding_close(got, temb["temb.ldm_ae_ddpm.dim64"], temb["temb.t"])


def test_the_conventions_differ(temb):
    # [cos | sin] / half versus [sin | cos] / (half - 1): not interchangeable.
    assert not torch.allclose(temb["temb.guided.dim64"], temb["temb.ldm_ae_ddpm.dim64"], atol=1e-2)


def test_adm_embedding_fractional_timesteps_and_odd_dim(temb):
    # improved-diffusion feeds t * 1000 / T (fractional); an odd dim gets a zero last column.
    assert_embedding_close(layers.timestep_embedding_adm(temb["temb.t_frac"], 64),
                           temb["temb.guided.dim64.frac"], temb["temb.t_frac"])
    odd = layers.timestep_embedding_adm(temb["temb.t"], 7)
    assert_embedding_close(odd, temb["temb.guided.dim7"], temb["temb.t"])
    assert torch.all(odd[:, -1] == 0)


def test_the_two_conventions_at_t1_dim8():
    # PAPER_FACTS §5 values, computed with the original code.
    t = torch.tensor([1])
    adm = [0.5403023, 0.9950042, 0.99995, 0.9999995, 0.8414710, 0.0998334, 0.0099998, 0.0009999998]
    ddpm = [0.84147098, 0.04639922, 0.00215443, 0.0001, 0.54030231, 0.99892298, 0.99999768, 0.999999995]
    torch.testing.assert_close(layers.timestep_embedding_adm(t, 8)[0], torch.tensor(adm), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layers.timestep_embedding_ddpm(t, 8)[0], torch.tensor(ddpm), rtol=1e-6, atol=1e-7)


def test_ddpm_embedding_odd_dim_pads_and_rejects_tiny_dim():
    emb = layers.timestep_embedding_ddpm(torch.tensor([0, 5]), 9)
    assert emb.shape == (2, 9) and torch.all(emb[:, -1] == 0)
    with pytest.raises(ValueError, match="dim >= 4"):
        layers.timestep_embedding_ddpm(torch.tensor([1]), 3)


def test_groupnorm32_runs_in_float32_and_casts_back():
    norm = layers.normalization(64)
    assert (norm.num_groups, norm.eps) == (32, 1e-5)
    x = (torch.randn(2, 64, 4, 4) * 100 + 3).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    reference = torch.nn.functional.group_norm(x.float(), 32, norm.weight, norm.bias, 1e-5).to(torch.bfloat16)
    assert torch.equal(out, reference)
    assert norm.to(torch.bfloat16)(x).dtype == torch.bfloat16  # a fully cast model still normalises in fp32


def test_normalization_rejects_channels_not_divisible_by_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        layers.normalization(48)


def test_zero_module_and_count_parameters():
    conv = layers.zero_module(torch.nn.Conv2d(3, 5, 3))
    assert all(torch.all(p == 0) for p in conv.parameters())
    assert layers.count_parameters(conv) == 5 * 3 * 9 + 5
