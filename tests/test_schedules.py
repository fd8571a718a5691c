"""Schedules and timestep spacing: identities, and parity with guided-diffusion and latent-diffusion."""

import numpy as np
import pytest

from minildm import schedules


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear"])
@pytest.mark.parametrize("num_timesteps", [50, 200, 1000, 4000])
def test_alpha_bar_decreases_inside_unit_interval(name, num_timesteps):
    betas = schedules.beta_schedule(name, num_timesteps)
    bar = schedules.alpha_bar(betas)
    assert betas.dtype == np.float64 and bar.shape == (num_timesteps,)
    assert ((bar > 0) & (bar < 1)).all()
    assert (np.diff(bar) < 0).all()
    np.testing.assert_allclose(bar, np.cumprod(1 - betas), rtol=0, atol=0)


def test_linear_schedule_is_ddpm_at_1000_steps_and_scales_with_t():
    betas = schedules.beta_schedule("linear", 1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    short = schedules.beta_schedule("linear", 250)
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)
    explicit = schedules.beta_schedule("linear", 200, beta_start=1e-4, beta_end=0.02)
    assert explicit[0] == pytest.approx(1e-4) and explicit[-1] == pytest.approx(0.02)


def test_cosine_schedule_clips_betas_and_matches_its_alpha_bar_function():
    betas = schedules.beta_schedule("cosine", 1000)
    assert betas.max() == pytest.approx(0.999)
    f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    t = np.arange(1, 900)  # away from the clipped end
    np.testing.assert_allclose(schedules.alpha_bar(betas)[t - 1], f(t) / f(0), rtol=1e-10)


def test_unknown_schedule_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'.*linear, cosine, scaled_linear"):
        schedules.beta_schedule("quadratic", 100)
    with pytest.raises(ValueError, match="cosine schedule has no beta_start"):
        schedules.beta_schedule("cosine", 100, beta_start=1e-4)
    with pytest.raises(ValueError, match="0 < beta_start <= beta_end < 1"):
        schedules.beta_schedule("linear", 100, beta_start=0.02, beta_end=1e-4)
    with pytest.raises(ValueError, match="needs T > 20 .got T=10.; pass beta_start/beta_end explicitly"):
        schedules.beta_schedule("linear", 10)
    with pytest.raises(ValueError, match="positive integer"):
        schedules.beta_schedule("linear", 0)
    with pytest.raises(ValueError, match=r"every beta must lie in \(0, 1\)"):
        schedules.alpha_bar([0.1, 0.0])


def test_space_timesteps_examples_and_errors():
    assert schedules.space_timesteps(1000, "ddim25")[:3] == [0, 40, 80]
    assert schedules.space_timesteps(1000, "250")[-3:] == [991, 995, 999]
    assert schedules.space_timesteps(100, "100") == list(range(100))
    assert schedules.space_timesteps(300, [10, 15, 20]) == schedules.space_timesteps(300, "10,15,20")
    with pytest.raises(ValueError, match="cannot make exactly 6 steps out of 20 with an integer stride"):
        schedules.space_timesteps(20, "ddim6")
    with pytest.raises(ValueError, match="cannot take 40 steps from a section of 34 timesteps"):
        schedules.space_timesteps(100, "40,10,10")
    with pytest.raises(ValueError, match="cannot read 'ddimx'"):
        schedules.space_timesteps(100, "ddimx")
    with pytest.raises(ValueError, match="cannot read 'fast'"):
        schedules.space_timesteps(100, "fast")


def test_respacing_all_steps_is_the_identity():
    betas = schedules.beta_schedule("cosine", 100)
    np.testing.assert_allclose(schedules.respace_betas(betas, range(100)), betas, rtol=1e-13)
    kept = schedules.space_timesteps(100, "10")
    # the product of the respaced (1 - beta') telescopes back to alpha_bar (3e-12 relative at alpha_bar ~ 2e-7)
    np.testing.assert_allclose(schedules.alpha_bar(schedules.respace_betas(betas, kept)),
                               schedules.alpha_bar(betas)[kept], rtol=1e-10)


# ---------------------------------------------------------------------- parity with the originals


@pytest.fixture(scope="module")
def gd(reference_dir):
    return np.load(reference_dir / "numerics" / "gaussian_diffusion.npz")


@pytest.fixture(scope="module")
def ldm(reference_dir):
    return np.load(reference_dir / "numerics" / "ldm_schedules.npz")


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedule_parity_guided_diffusion(gd, name):
    # achieved: bitwise equal
    betas = schedules.beta_schedule(name, 1000)
    np.testing.assert_allclose(betas, gd[f"sched.{name}.betas"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(schedules.alpha_bar(betas), gd[f"sched.{name}.alphas_cumprod"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("spec", ["ddim25", "ddim50", "250", "10,10,10", "50", "100"])
def test_space_timesteps_parity(gd, spec):
    assert schedules.space_timesteps(1000, spec) == gd[f"space_timesteps.{spec}"].tolist()


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("spec", ["ddim25", "250"])
def test_respaced_betas_parity(gd, name, spec):
    # achieved: bitwise equal (SpacedDiffusion's betas and its recomputed alphas_cumprod)
    kept = schedules.space_timesteps(1000, spec)
    assert kept == gd[f"respaced.{name}.{spec}.timestep_map"].tolist()
    betas = schedules.respace_betas(schedules.beta_schedule(name, 1000), kept)
    np.testing.assert_allclose(betas, gd[f"respaced.{name}.{spec}.betas"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(schedules.alpha_bar(betas), gd[f"respaced.{name}.{spec}.alphas_cumprod"],
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("key, start, end", [("sd", 0.00085, 0.012), ("ldm_faces_cin", 0.0015, 0.0195),
                                             ("ldm_churches", 0.0015, 0.0155)])
def test_scaled_linear_parity_latent_diffusion(ldm, key, start, end):
    betas = schedules.beta_schedule("scaled_linear", 1000, beta_start=start, beta_end=end)
    # achieved: 6.7e-16 relative (torch vs numpy linspace)
    np.testing.assert_allclose(betas, ldm[f"make_beta_schedule.{key}"], rtol=1e-12, atol=0)
    # the float32 buffers of LDM checkpoints: achieved bitwise equal after rounding to float32
    np.testing.assert_array_equal(betas.astype(np.float32), ldm[f"ddpm_buffers.{key}.betas"])
    np.testing.assert_array_equal(schedules.alpha_bar(betas).astype(np.float32),
                                  ldm[f"ddpm_buffers.{key}.alphas_cumprod"])


def test_default_scaled_linear_is_stable_diffusion(ldm):
    np.testing.assert_allclose(schedules.beta_schedule("scaled_linear", 1000), ldm["make_beta_schedule.sd"],
                               rtol=1e-12)


def test_cosine_parity_latent_diffusion(ldm):
    # LDM normalises by f(0) in torch float64: achieved 2.0e-12 relative
    np.testing.assert_allclose(schedules.beta_schedule("cosine", 1000), ldm["make_beta_schedule.cosine"],
                               rtol=1e-11, atol=0)


@pytest.mark.parametrize("key", ["uniform50", "uniform200", "uniform250", "quad50"])
def test_ldm_ddim_timesteps_parity(ldm, key):
    method = key.rstrip("0123456789")
    steps = int(key[len(method):])
    assert schedules.ldm_ddim_timesteps(1000, steps, method) == ldm[f"make_ddim_timesteps.{key}"].tolist()
