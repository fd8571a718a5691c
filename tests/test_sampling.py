"""Samplers: identities, reproducibility, callbacks, input checks; parity with guided- and latent-diffusion."""

import numpy as np
import pytest
import torch

from minildm import sampling, schedules

from helpers import fixed_output, ldm_model, make, oracle_eps_model


def smooth_model(x_t, t, **kwargs):
    return 0.5 * torch.tanh(x_t) + 0.001 * t.to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))


# ---------------------------------------------------------------------- identities


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("spec", [None, "10", "ddim5"])
def test_a_perfect_model_samples_its_data_point(sampler, spec):
    diff = make("cosine", 50)
    x0 = torch.tensor([[0.5, -0.25], [1.0, -1.0]], dtype=torch.float64)
    timesteps = None if spec is None else schedules.space_timesteps(50, spec)
    x_T = torch.randn(2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fn = sampling.ddpm_sample if sampler == "ddpm" else sampling.ddim_sample
    out = fn(oracle_eps_model(diff, x0), diff, x_T, timesteps, progress=False,
             generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)


def test_ddim_eta0_is_deterministic_and_ddpm_is_reproducible():
    diff = make("linear", 40)
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    runs = [sampling.ddim_sample(smooth_model, diff, x_T, generator=torch.Generator().manual_seed(seed),
                                 progress=False) for seed in (1, 2)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    ddpm = [sampling.ddpm_sample(smooth_model, diff, (3, 2, 4, 4), generator=torch.Generator().manual_seed(s),
                                 progress=False) for s in (5, 5, 6)]
    torch.testing.assert_close(ddpm[0], ddpm[1], rtol=0, atol=0)
    assert (ddpm[0] - ddpm[2]).abs().max() > 0.1


def test_explicit_noise_list_reproduces_a_generator_run():
    diff = make("linear", 30)
    timesteps = schedules.space_timesteps(30, "10")
    gen = torch.Generator().manual_seed(3)
    x_T = torch.randn(2, 1, 4, 4, generator=gen)
    noise = [torch.randn(2, 1, 4, 4, generator=gen) for _ in timesteps[1:]] + [None]  # the last step adds none
    with_generator = sampling.ddpm_sample(smooth_model, diff, x_T, timesteps,
                                          generator=torch.Generator().manual_seed(3).manual_seed(3), progress=False)
    gen = torch.Generator().manual_seed(3)
    torch.randn(2, 1, 4, 4, generator=gen)  # skip x_T
    replay = sampling.ddpm_sample(smooth_model, diff, x_T, timesteps, generator=gen, progress=False)
    with_list = sampling.ddpm_sample(smooth_model, diff, x_T, timesteps, noise=noise, progress=False)
    torch.testing.assert_close(with_list, replay, rtol=0, atol=0)
    assert (with_list - with_generator).abs().max() > 0  # a different noise stream gives a different sample


@pytest.mark.parametrize("t, t_prev", [(10, 9), (500, 499), (40, 0), (960, 920), (999, 500)])
def test_ddim_eta1_step_is_the_ddpm_posterior_step(t, t_prev):
    """Song et al. 2021, Eq. 16: eta = 1 gives sigma² = posterior variance, so the DDIM step is the
    ancestral step with fixed_small variance, for any pair (t, t_prev)."""
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    z = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    diff = make("cosine", model_var_type="fixed_small")
    ddim, pred_ddim = sampling.ddim_step(smooth_model, diff, x_t, t, t_prev, eta=1.0, noise=z)
    ddpm, pred_ddpm = sampling.ddpm_step(smooth_model, diff, x_t, t, t_prev, noise=z)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pred_ddim, pred_ddpm)


def test_callback_sees_every_step_and_the_model_gets_original_timesteps():
    diff = make("linear", 100, model_var_type="learned_range", loss_type="hybrid")
    timesteps = schedules.space_timesteps(100, "ddim10")
    seen, model_t, labels = [], [], []

    def model(x_t, t, y=None):
        model_t.append(int(t[0]))
        labels.append(y)
        return torch.cat([smooth_model(x_t, t), torch.zeros_like(x_t)], dim=1)

    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2])
    for fn in (sampling.ddpm_sample, sampling.ddim_sample):
        seen.clear(), model_t.clear(), labels.clear()
        out = fn(model, diff, x_T, timesteps, model_kwargs={"y": y}, progress=True,
                 generator=torch.Generator().manual_seed(0),
                 callback=lambda i, t, x_t, pred_x0: seen.append((i, t, x_t.clone(), pred_x0.clone())))
        assert [s[0] for s in seen] == list(range(10))
        assert [s[1] for s in seen] == timesteps[::-1] == model_t
        assert all(label is y for label in labels)
        torch.testing.assert_close(seen[0][2], x_T)
        assert out.shape == x_T.shape and (seen[-1][3].abs() <= 1).all()


class Points(torch.nn.Module):
    """A module denoiser for 2-D points, model(x_t, t, y=None, context=None)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)

    def forward(self, x_t, t, y=None, context=None):
        return self.linear(x_t)


def test_shape_start_draws_x_T_with_the_generator_on_the_model_device():
    diff = make("linear", 30)
    net = Points()
    runs = [sampling.ddim_sample(net, diff, (5, 2), generator=torch.Generator().manual_seed(0), progress=False)
            for _ in range(2)]
    assert runs[0].shape == (5, 2) and runs[0].device == net.linear.weight.device
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_bad_inputs_say_what_to_change():
    diff = make("linear", 50)
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        sampling.ddim_sample(smooth_model, diff, x, eta=-0.5, progress=False)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 49\] \(0-based\)"):
        sampling.ddpm_sample(smooth_model, diff, x, [0, 10, 50], progress=False)
    with pytest.raises(ValueError, match="timesteps contain duplicates"):
        sampling.ddpm_sample(smooth_model, diff, x, [0, 10, 10], progress=False)
    with pytest.raises(ValueError, match="timesteps must be a non-empty list of ints"):
        sampling.ddim_sample(smooth_model, diff, x, [], progress=False)
    with pytest.raises(ValueError, match=r"noise must hold one tensor per step \(3 steps\), got 2"):
        sampling.ddpm_sample(smooth_model, diff, x, [0, 10, 20], noise=[x, x], progress=False)
    with pytest.raises(ValueError, match=r"noise has shape \(2, 1, 4, 4\) but x_t has \(2, 3, 4, 4\)"):
        sampling.ddpm_step(smooth_model, diff, x, 10, 9, noise=torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"one per example \(\[2\]\)"):
        sampling.ddim_step(smooth_model, diff, x, torch.tensor([10, 10, 10]), 9)


# ---------------------------------------------------------------------- parity with guided-diffusion

MEAN_TYPES = {"eps": "eps", "xstart": "x0"}


@pytest.fixture(scope="module")
def gd(reference_dir):
    data = np.load(reference_dir / "numerics" / "gaussian_diffusion.npz")
    return {key: torch.from_numpy(data[key]) for key in data.files}


def reference_model(x, t, **kwargs):
    return torch.cat([1.2 * torch.tanh(0.7 * x + 0.3), torch.tanh(0.5 * x - 0.2)], dim=1)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("var_type", ["learned_range", "fixed_small", "fixed_large"])
@pytest.mark.parametrize("mean_type", ["eps", "xstart"])
def test_p_sample_parity(gd, name, var_type, mean_type):
    """One ancestral step at t = [0, 10, 500, 999] fed the stored z: measured max abs error 3e-8."""
    diff = make(name, model_mean_type=MEAN_TYPES[mean_type], model_var_type=var_type, loss_type="hybrid")
    output = gd[f"{name}.model_output"] if var_type == "learned_range" else gd[f"{name}.model_output"][:, :3]
    t = gd["batch.t"]
    sample, pred_x0 = sampling.ddpm_step(fixed_output(output), diff, gd[f"{name}.q_sample"], t, t - 1,
                                         noise=gd["batch.step_noise"])
    torch.testing.assert_close(sample, gd[f"{name}.p_sample.{var_type}.{mean_type}.sample"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pred_x0, gd[f"{name}.p_sample.{var_type}.{mean_type}.pred_xstart"], rtol=1e-6, atol=1e-7)


# guided-diffusion computes sigma = eta·sqrt((1-a')/(1-a))·sqrt(1-a/a') in float32 from float32 alpha_bar:
# at t=10 that is 1.2e-4 relative off the float64 value (1 - a/a' ~ 2e-4 cancels), hence eta=1 samples differ by
# up to 1.5e-5 (on values ~1) from our float64 coefficients. eta=0: measured max abs error 3.1e-6 at t=10
# (float32 sqrt(1 - a') with 1 - a' ~ 1e-3 in the original, times the eps re-derived from x0).
DDIM_TOLERANCE = {0: dict(rtol=1e-6, atol=5e-6), 1: dict(rtol=1e-4, atol=1e-5)}


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("mean_type", ["eps", "xstart"])
@pytest.mark.parametrize("clip", [0, 1])
@pytest.mark.parametrize("eta", [0, 1])
def test_ddim_step_parity(gd, name, mean_type, clip, eta):
    diff = make(name, model_mean_type=MEAN_TYPES[mean_type], model_var_type="learned_range", loss_type="hybrid")
    t = gd["batch.t"]
    sample, pred_x0 = sampling.ddim_step(fixed_output(gd[f"{name}.model_output"]), diff, gd[f"{name}.q_sample"],
                                         t, t - 1, eta=float(eta), clip_denoised=bool(clip),
                                         noise=gd["batch.step_noise"])
    prefix = f"{name}.ddim_sample.{mean_type}.clip{clip}.eta{eta}"
    torch.testing.assert_close(sample, gd[f"{prefix}.sample"], **DDIM_TOLERANCE[eta])
    torch.testing.assert_close(pred_x0, gd[f"{prefix}.pred_xstart"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("eta", [0, 1])
def test_spaced_ddim25_step_parity(gd, name, eta):
    """SpacedDiffusion('ddim25') steps at respaced indices [0, 1, 12, 24] = our steps (t, t_prev) on the
    kept list, the model receiving the original t: measured max abs error 5.2e-6 (eta=1), 2.4e-7 (pred_x0)."""
    kept = schedules.space_timesteps(1000, "ddim25")
    index = gd["spaced_ddim25.t"]
    t = torch.tensor(kept)[index]
    t_prev = torch.tensor([-1] + kept)[index]
    assert t.tolist() == gd[f"{name}.spaced_ddim25.model_timesteps"].tolist()
    diff = make(name, model_var_type="learned_range", loss_type="hybrid")
    seen = []

    def model(x_t, t_model):
        seen.append(t_model.tolist())
        return reference_model(x_t, t_model)

    sample, pred_x0 = sampling.ddim_step(model, diff, gd[f"{name}.q_sample"], t, t_prev, eta=float(eta),
                                         noise=gd["batch.step_noise"])
    assert seen == [t.tolist()]
    prefix = f"{name}.spaced_ddim25.ddim_sample.eps.clip1.eta{eta}"
    torch.testing.assert_close(sample, gd[f"{prefix}.sample"], **DDIM_TOLERANCE[eta])
    torch.testing.assert_close(pred_x0, gd[f"{prefix}.pred_xstart"], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- parity with latent-diffusion's DDIM


@pytest.fixture(scope="module")
def ldm(reference_dir):
    data = np.load(reference_dir / "numerics" / "ldm_schedules.npz")
    return {key: data[key] for key in data.files}


def test_ldm_ddim_parameters_parity(ldm):
    """LDM's 50-step DDIM (timesteps 1, 21, …, 981; last step to alpha_bar[0]) as our pairs (t, t_prev):
    LDM's alphas come from float32 buffers: 5.3e-8 relative; its sigmas 1.7e-6 relative (1 - a/a' cancels)."""
    diff = make("scaled_linear")
    timesteps = np.array(schedules.ldm_ddim_timesteps(1000, 50))
    assert timesteps.tolist() == ldm["ddim_schedule.sd.S50.eta0.ddim_timesteps"].tolist()
    c = diff.step_coefficients(timesteps, np.append(0, timesteps[:-1]))
    for eta in (0, 1):
        prefix = f"ddim_schedule.sd.S50.eta{eta}"
        np.testing.assert_allclose(c["alpha_bar"], ldm[f"{prefix}.ddim_alphas"], rtol=1e-7)
        np.testing.assert_allclose(c["alpha_bar_prev"], ldm[f"{prefix}.ddim_alphas_prev"], rtol=1e-7)
        # computed by LDM in float32 (1 - alpha_bar cancels at t=1): 1.6e-6 relative
        np.testing.assert_allclose(np.sqrt(1 - c["alpha_bar"]), ldm[f"{prefix}.ddim_sqrt_one_minus_alphas"], rtol=3e-6)
        sigma = eta * np.sqrt((1 - c["alpha_bar_prev"]) / (1 - c["alpha_bar"]) * c["beta"])
        np.testing.assert_allclose(sigma, ldm[f"{prefix}.ddim_sigmas"], rtol=3e-6, atol=0)


@pytest.mark.parametrize("eta", [0, 1])
@pytest.mark.parametrize("index, t, t_prev", [(49, 981, 961), (25, 501, 481), (0, 1, 0)])
def test_ldm_p_sample_ddim_parity(ldm, eta, index, t, t_prev):
    """`DDIMSampler.p_sample_ddim` without guidance (scale 1): measured max abs error 7.2e-7 (x_prev), 3.8e-6 on
    pred_x0 values up to 36 (float32 buffers vs our float64 alpha_bar)."""
    diff = make("scaled_linear")
    x = torch.from_numpy(ldm["ddim_step.x"])
    x_prev, pred_x0 = sampling.ddim_step(ldm_model, diff, x, t, t_prev, eta=float(eta), clip_denoised=False,
                                         model_kwargs={"context": torch.from_numpy(ldm["ddim_step.c"])},
                                         noise=torch.from_numpy(ldm["ddim_step.noise"]))
    prefix = f"ddim_step.eta{eta}.index{index}.scale1"
    torch.testing.assert_close(x_prev, torch.from_numpy(ldm[f"{prefix}.x_prev"]), rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(pred_x0, torch.from_numpy(ldm[f"{prefix}.pred_x0"]), rtol=1e-6, atol=1e-6)


def test_ldm_q_sample_parity(ldm):
    diff = make("scaled_linear")
    x_t = diff.q_sample(torch.from_numpy(ldm["ldm_q_sample.x_start"]), torch.from_numpy(ldm["ldm_q_sample.t"]),
                        torch.from_numpy(ldm["ldm_q_sample.noise"]))
    torch.testing.assert_close(x_t, torch.from_numpy(ldm["ldm_q_sample.sd.x_t"]), rtol=1e-6, atol=1e-7)


def test_inpainting_reimposes_the_known_region_and_leaves_the_rest_alone():
    """LDM's x0 / mask: with an eps = 0 "model" DDIM (eta 0) moves each pixel on its own, so the unknown half
    must equal a run without a mask, and the known half must end at x0 (up to sqrt((1 - a_0) / a_0) |z| ~ 0.01 |z|)."""
    diff = make("linear", 1000)
    zero = lambda x_t, t, **kwargs: torch.zeros_like(x_t)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1  # the left half is known
    timesteps = schedules.space_timesteps(1000, "ddim20")
    free = sampling.ddim_sample(zero, diff, x_T, timesteps, clip_denoised=False, progress=False)
    inpainted = sampling.ddim_sample(zero, diff, x_T, timesteps, clip_denoised=False, progress=False, x0=x0, mask=mask,
                                     generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(inpainted[..., 4:], free[..., 4:])
    assert (inpainted[..., :4] - x0[..., :4]).abs().max() < 0.06
    assert (free[..., :4] - x0[..., :4]).abs().max() > 0.5
    for sampler in (sampling.ddpm_sample, sampling.ddim_sample):
        with pytest.raises(ValueError, match="both x0"):
            sampler(zero, diff, x_T, timesteps, progress=False, mask=mask)
        with pytest.raises(ValueError, match="does not broadcast"):
            sampler(zero, diff, x_T, timesteps, progress=False, x0=x0, mask=torch.ones(3, 1, 8, 8))
