"""Samplers: identities, reproducibility, callbacks, input checks; parity with guided- and latent-diffusion."""

import itertools

import numpy as np
import pytest
import torch
from helpers import fixed_output, ldm_model, make, oracle_eps_model

from minildm import sampling, schedules
from minildm.diffusion import GaussianDiffusion


def smooth_model(x_t, t, **kwargs):
    return 0.5 * torch.tanh(x_t) + 0.001 * t.to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))


# ---------------------------------------------------------------------- identities


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "plms"])
@pytest.mark.parametrize("spec", [None, "10", "ddim5"])
def test_a_perfect_model_samples_its_data_point(sampler, spec):
    """For a point mass eps is constant along the DDIM path, so PLMS's combinations (weights summing to 1) too."""
    diff = make("cosine", 50)
    x0 = torch.tensor([[0.5, -0.25], [1.0, -1.0]], dtype=torch.float64)
    timesteps = None if spec is None else schedules.space_timesteps(50, spec)
    x_T = torch.randn(2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fn = {"ddpm": sampling.ddpm_sample, "ddim": sampling.ddim_sample, "plms": sampling.plms_sample}[sampler]
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
DDIM_TOLERANCE = {0: {"rtol": 1e-6, "atol": 5e-6}, 1: {"rtol": 1e-4, "atol": 1e-5}}


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


# ---------------------------------------------------------------------- PLMS (latent-diffusion's PLMSSampler)


def ldm_plms_sampling(apply_model, alphas_cumprod, ddim_timesteps, x_T, c, x0=None, mask=None, generator=None):
    """latent-diffusion's `PLMSSampler.make_schedule` + `plms_sampling` + `p_sample_plms` (ldm/models/diffusion/
    plms.py), transcribed line by line for eta = 0, no guidance, no score corrector, in float64.
    Returns (img, the pred_x0 given to img_callback at each step)."""
    # make_ddim_sampling_parameters
    ddim_alphas = alphas_cumprod[ddim_timesteps]
    ddim_alphas_prev = np.asarray([alphas_cumprod[0]] + alphas_cumprod[ddim_timesteps[:-1]].tolist())
    ddim_sigmas = 0.0 * np.sqrt((1 - ddim_alphas_prev) / (1 - ddim_alphas) * (1 - ddim_alphas / ddim_alphas_prev))
    ddim_sqrt_one_minus_alphas = np.sqrt(1. - ddim_alphas)

    def q_sample(x_start, t):  # DDPM.q_sample; its noise = randn_like(x_start), here from `generator`
        noise = torch.randn(x_start.shape, generator=generator, dtype=x_start.dtype)
        a = torch.from_numpy(alphas_cumprod[t.numpy()]).view(-1, 1, 1, 1)
        return a.sqrt() * x_start + (1 - a).sqrt() * noise

    def p_sample_plms(x, c, t, index, old_eps, t_next):
        b = x.shape[0]

        def get_model_output(x, t):
            return apply_model(x, t, c)

        alphas, alphas_prev = ddim_alphas, ddim_alphas_prev
        sqrt_one_minus_alphas, sigmas = ddim_sqrt_one_minus_alphas, ddim_sigmas

        def get_x_prev_and_pred_x0(e_t, index):
            a_t = torch.full((b, 1, 1, 1), alphas[index], dtype=torch.float64)
            a_prev = torch.full((b, 1, 1, 1), alphas_prev[index], dtype=torch.float64)
            sigma_t = torch.full((b, 1, 1, 1), sigmas[index], dtype=torch.float64)
            sqrt_one_minus_at = torch.full((b, 1, 1, 1), sqrt_one_minus_alphas[index], dtype=torch.float64)
            pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
            dir_xt = (1. - a_prev - sigma_t**2).sqrt() * e_t
            noise = sigma_t * torch.zeros_like(x)  # sigma_t = 0 (eta = 0): noise_like(...) does not matter
            x_prev = a_prev.sqrt() * pred_x0 + dir_xt + noise
            return x_prev, pred_x0

        e_t = get_model_output(x, t)
        if len(old_eps) == 0:
            x_prev, pred_x0 = get_x_prev_and_pred_x0(e_t, index)
            e_t_next = get_model_output(x_prev, t_next)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        elif len(old_eps) >= 3:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_prev, pred_x0 = get_x_prev_and_pred_x0(e_t_prime, index)
        return x_prev, pred_x0, e_t

    b = x_T.shape[0]
    img = x_T
    time_range = np.flip(ddim_timesteps)
    total_steps = ddim_timesteps.shape[0]
    old_eps, pred_x0s = [], []
    for i, step in enumerate(time_range):
        index = total_steps - i - 1
        ts = torch.full((b,), step, dtype=torch.long)
        ts_next = torch.full((b,), time_range[min(i + 1, len(time_range) - 1)], dtype=torch.long)
        if mask is not None:
            img_orig = q_sample(x0, ts)
            img = img_orig * mask + (1. - mask) * img
        img, pred_x0, e_t = p_sample_plms(img, c, ts, index, old_eps, ts_next)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        pred_x0s.append(pred_x0)  # img_callback(pred_x0, i)
    return img, pred_x0s


@pytest.mark.parametrize("inpaint", [False, True])
@pytest.mark.parametrize("num_steps", [1, 4, 10, 50])
def test_plms_sample_parity_with_ldm(ldm, num_steps, inpaint):
    """Our plms_sample(final_t_prev=0) on LDM's timesteps = the transcription of LDM's loop above, on the SD
    schedule (alphas_cumprod in float64 as LDM's register_schedule computes it before its float32 cast) with the
    fixture's apply_model: the first step (pseudo improved Euler), then Adams-Bashforth of orders 2, 3, 4; the one-step
    chain evaluates its second call at t itself; inpainting re-imposes q_sample(x0, t) before each step.
    Measured max abs error 4.4e-14 on x, 7.8e-14 on pred_x0 (values up to 46)."""
    betas = ldm["make_beta_schedule.sd"]
    alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
    # make_ddim_timesteps('uniform', num_steps, 1000)
    ddim_timesteps = np.asarray(list(range(0, 1000, 1000 // num_steps))) + 1
    assert ddim_timesteps.tolist() == schedules.ldm_ddim_timesteps(1000, num_steps)
    if num_steps == 50:  # the same alphas as LDM's float32 buffers
        np.testing.assert_allclose(alphas_cumprod[ddim_timesteps], ldm["ddim_schedule.sd.S50.eta0.ddim_alphas"],
                                   rtol=1e-7)
        np.testing.assert_allclose(np.append(alphas_cumprod[0], alphas_cumprod[ddim_timesteps[:-1]]),
                                   ldm["ddim_schedule.sd.S50.eta0.ddim_alphas_prev"], rtol=1e-7)
    x_T = torch.from_numpy(ldm["ddim_step.x"]).double()
    context = torch.from_numpy(ldm["ddim_step.c"]).double()
    x0, mask = None, None
    if inpaint:
        x0 = torch.rand(x_T.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
        mask = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
        mask[..., :3] = 1
    expected, expected_pred_x0 = ldm_plms_sampling(ldm_model, alphas_cumprod, ddim_timesteps, x_T, context,
                                                   x0=x0, mask=mask, generator=torch.Generator().manual_seed(5))

    diff = GaussianDiffusion(betas)
    infos = []
    out = sampling.plms_sample(ldm_model, diff, x_T, ddim_timesteps.tolist(), final_t_prev=0,
                               model_kwargs={"context": context}, callback=infos.append, progress=False,
                               x0=x0, mask=mask, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert len(infos) == num_steps
    torch.testing.assert_close(torch.stack([info["pred_x0"] for info in infos]), torch.stack(expected_pred_x0),
                               rtol=0, atol=1e-12)
    # the default final step (to x0, alpha_bar = 1) is not LDM's (to alpha_bar_0): 0.027 apart
    to_x0 = sampling.plms_sample(ldm_model, diff, x_T, ddim_timesteps.tolist(), progress=False,
                                 model_kwargs={"context": context}, x0=x0, mask=mask,
                                 generator=torch.Generator().manual_seed(5))
    assert (to_x0 - expected).abs().max() > 0.01


GAUSSIAN_TIMESTEPS = schedules.space_timesteps(1000, "10")  # 0, 111, …, 999: starts at T - 1 like x_T


def gaussian_data_model(diff, mu, s, mean_type="eps", learned_variance=False):
    """The exact network for data x0 ~ N(mu, s²) in 1-D, [N, 1]: E[eps | x_t] = sqrt(1 - a)(x_t - sqrt(a) mu) /
    (a s² + 1 - a), a = alpha_bar_t, written as eps, x0 or v; optional junk learned-variance channels."""
    def model(x_t, t, **kwargs):
        a = torch.from_numpy(diff.alpha_bar[t.numpy()]).to(x_t).view(-1, 1)
        eps = (1 - a).sqrt() * (x_t - a.sqrt() * mu) / (a * s**2 + 1 - a)
        pred_x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        out = {"eps": eps, "x0": pred_x0, "v": a.sqrt() * eps - (1 - a).sqrt() * pred_x0}[mean_type]
        return torch.cat([out, torch.full_like(out, 0.37)], dim=1) if learned_variance else out
    return model


@pytest.mark.parametrize("mu, s", [(0.3, 0.5), (0.5, 0.1)])
def test_plms_is_closer_to_the_probability_flow_than_ddim(mu, s):
    """Gaussian data: the probability-flow ODE maps x_T to mu + s (x_T - sqrt(a_T) mu) / sqrt(a_T s² + 1 - a_T)
    (the monotone map between the two Gaussians). On LDM's schedule (scaled_linear), max abs error over 64 x_T:
    (0.3, 0.5): PLMS-10 0.057, DDIM-10 0.352, DDIM-1000 0.0070; (0.5, 0.1): 0.042, 0.160, 0.018."""
    diff = make("scaled_linear")
    model = gaussian_data_model(diff, mu, s)
    x_T = torch.randn(64, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a_T = diff.alpha_bar[GAUSSIAN_TIMESTEPS[-1]]
    exact = mu + s * (x_T - a_T**0.5 * mu) / (a_T * s**2 + 1 - a_T) ** 0.5
    error = {name: float((run() - exact).abs().max()) for name, run in [
        ("ddim1000", lambda: sampling.ddim_sample(model, diff, x_T, clip_denoised=False, progress=False)),
        ("ddim10", lambda: sampling.ddim_sample(model, diff, x_T, GAUSSIAN_TIMESTEPS, clip_denoised=False,
                                                progress=False)),
        ("plms10", lambda: sampling.plms_sample(model, diff, x_T, GAUSSIAN_TIMESTEPS, progress=False))]}
    assert error["ddim1000"] < 0.025  # the closed form is the ODE's solution: fine DDIM steps reach it
    assert error["plms10"] < 0.4 * error["ddim10"]


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_plms_takes_every_mean_type_and_ignores_variance_channels(mean_type):
    """The same network written as eps, x0 or v, with or without learned-variance channels: the same samples."""
    x_T = torch.randn(8, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference_diff = make("scaled_linear")
    reference = sampling.plms_sample(gaussian_data_model(reference_diff, 0.3, 0.5), reference_diff, x_T,
                                     GAUSSIAN_TIMESTEPS, progress=False)
    diff = make("scaled_linear", model_mean_type=mean_type, model_var_type="learned_range", loss_type="hybrid")
    out = sampling.plms_sample(gaussian_data_model(diff, 0.3, 0.5, mean_type, learned_variance=True), diff, x_T,
                               GAUSSIAN_TIMESTEPS, progress=False)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-10)


def test_plms_callback_model_timesteps_and_determinism():
    """One callback per step with the dict; the model sees original timesteps, the first one twice-called step
    (t_0, then t_1 for the provisional x); the run is deterministic given x_T whatever the generator."""
    diff = make("linear", 100)
    timesteps = schedules.space_timesteps(100, "ddim10")
    calls, infos, legacy = [], [], []

    def model(x_t, t, y=None):
        calls.append(int(t[0]))
        return smooth_model(x_t, t)

    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    runs = [sampling.plms_sample(model, diff, x_T, timesteps, model_kwargs={"y": torch.tensor([1, 2])},
                                 generator=torch.Generator().manual_seed(seed), progress=True,
                                 callback=infos.append if seed == 1 else
                                 lambda i, t, x_t, pred_x0: legacy.append((i, t)))
            for seed in (1, 2)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    descending = timesteps[::-1]
    assert calls == 2 * [descending[0], descending[1], *descending[1:]]  # S + 1 calls per run
    assert [info["i"] for info in infos] == list(range(10)) and [i for i, _ in legacy] == list(range(10))
    assert [info["t"] for info in infos] == descending == [t for _, t in legacy]
    assert [info["t_prev"] for info in infos] == descending[1:] + [-1]
    torch.testing.assert_close(infos[0]["x"], x_T)
    for before, after in itertools.pairwise(infos):
        assert after["x"] is before["x_prev"]
    assert infos[-1]["x_prev"] is runs[0] and infos[-1]["pred_x0"] is infos[-1]["denoised"]
    torch.testing.assert_close(infos[-1]["x_prev"], infos[-1]["pred_x0"])  # the last step ends at pred_x0


def test_plms_step_history_and_cond_fn():
    """plms_step uses the last 3 eps of any longer history; cond_fn acts on every eps as a model wrapper would."""
    diff = make("linear", 100)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    history = [torch.full_like(x, value) for value in (9.0, 0.1, -0.2, 0.3)]
    long, _, eps = sampling.plms_step(smooth_model, diff, x, 50, 40, history)
    short, _, _ = sampling.plms_step(smooth_model, diff, x, 50, 40, history[-3:])
    torch.testing.assert_close(long, short, rtol=0, atol=0)
    torch.testing.assert_close(eps, smooth_model(x, torch.full((2,), 50)))
    clipped, pred_x0, _ = sampling.plms_step(smooth_model, diff, 3 * x, 50, 40, history, clip_denoised=True)
    unclipped, free_x0, _ = sampling.plms_step(smooth_model, diff, 3 * x, 50, 40, history)
    assert pred_x0.abs().max() <= 1 < free_x0.abs().max() and (clipped - unclipped).abs().max() > 0.1

    gradient = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).view_as(x)

    def shifted(x_t, t, **kwargs):
        a = torch.from_numpy(diff.alpha_bar[t.numpy()]).view(-1, 1, 1, 1)
        return smooth_model(x_t, t) - (1 - a).sqrt() * gradient

    guided = sampling.plms_sample(smooth_model, diff, x, [10, 50, 90], progress=False, cond_fn=lambda x_t, t: gradient)
    wrapped = sampling.plms_sample(shifted, diff, x, [10, 50, 90], progress=False)
    torch.testing.assert_close(guided, wrapped, rtol=0, atol=1e-12)


def test_plms_inpainting_and_bad_arguments():
    """An eps = 0 "model" moves each pixel on its own: the free half equals a run without a mask, the known half
    ends at x0 (see the DDIM inpainting test above)."""
    diff = make("linear", 1000)
    zero = lambda x_t, t, **kwargs: torch.zeros_like(x_t)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    timesteps = schedules.space_timesteps(1000, "ddim20")
    free = sampling.plms_sample(zero, diff, x_T, timesteps, progress=False)
    inpainted = sampling.plms_sample(zero, diff, x_T, timesteps, progress=False, x0=x0, mask=mask,
                                     generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(inpainted[..., 4:], free[..., 4:])
    assert (inpainted[..., :4] - x0[..., :4]).abs().max() < 0.06
    assert (free[..., :4] - x0[..., :4]).abs().max() > 0.5

    with pytest.raises(ValueError, match="eta must be 0 for PLMS"):
        sampling.plms_sample(zero, diff, x_T, timesteps, eta=0.5, progress=False)
    with pytest.raises(ValueError, match=r"final_t_prev must be -1 \(end at x0\) or a timestep below the smallest "
                                         r"kept one \(0\); got 0"):
        sampling.plms_sample(zero, diff, x_T, timesteps, final_t_prev=0, progress=False)
    with pytest.raises(ValueError, match="both x0"):
        sampling.plms_sample(zero, diff, x_T, timesteps, progress=False, mask=mask)
    with pytest.raises(ValueError, match="timesteps contain duplicates"):
        sampling.plms_sample(zero, diff, x_T, [0, 10, 10], progress=False)
    with pytest.raises(ValueError, match=r"model_output has shape \(2, 6, 8, 8\)"):
        sampling.plms_sample(lambda x_t, t: torch.cat([x_t, x_t], dim=1), diff, x_T, timesteps, progress=False)


def test_ddim_sample_can_end_at_alpha_bar_zero_as_ldms_ddim_sampler():
    """final_t_prev=0: the last step goes to alpha_bar_0 (LDM's ddim_alphas_prev[0]), not to x0."""
    diffusion = make("scaled_linear", 1000)
    timesteps = schedules.ldm_ddim_timesteps(1000, 10)
    model = lambda x, t, **kwargs: torch.tanh(x) * 0.5  # noqa: E731
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x = x_T
    for t, t_prev in zip(timesteps[::-1], [*timesteps[::-1][1:], 0]):
        x = sampling.ddim_step(model, diffusion, x, int(t), int(t_prev), clip_denoised=False)[0]
    ldm_like = sampling.ddim_sample(model, diffusion, x_T, timesteps, clip_denoised=False, final_t_prev=0, progress=False)
    torch.testing.assert_close(ldm_like, x)
    to_x0 = sampling.ddim_sample(model, diffusion, x_T, timesteps, clip_denoised=False, progress=False)
    assert not torch.allclose(to_x0, ldm_like)
