"""GaussianDiffusion: identities of the process, losses, bits/dim, input checks, and parity with guided-diffusion."""

import math

import numpy as np
import pytest
import torch

import minildm
from minildm import config as config_module
from minildm import diffusion, presets, schedules
from minildm.diffusion import GaussianDiffusion

from helpers import make, oracle_eps_model

SCHEDULE_NAMES = ["linear", "cosine", "scaled_linear"]


# ---------------------------------------------------------------------- identities


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_q_sample_inverts_through_the_parameterisations(name):
    diff = make(name)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    x_t = diff.q_sample(x0, t, noise)
    torch.testing.assert_close(diff.x0_from_eps(x_t, t, noise), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(diff.eps_from_x0(x_t, t, x0), noise, rtol=0, atol=1e-9)
    v = diff.velocity(x0, t, noise)
    torch.testing.assert_close(diff.x0_from_v(x_t, t, v), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(diff.eps_from_v(x_t, t, v), noise, rtol=0, atol=1e-12)
    mean, variance, log_variance = diff.q_mean_variance(x0, t)
    torch.testing.assert_close(x_t, mean + variance.sqrt() * noise, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_variance, variance.log())


@pytest.mark.parametrize("t, t_prev", [(1, 0), (10, 9), (500, 499), (999, 998), (500, 250), (999, 0), (40, 0)])
def test_posterior_is_the_normalised_product_of_gaussians(t, t_prev):
    """q(x_{t_prev} | x_t, x0) ∝ q(x_t | x_{t_prev}) q(x_{t_prev} | x0), integrated on a grid (float64)."""
    diff = make("cosine")
    x0, x_t = 0.3, -0.7
    bar, bar_prev = diff.alpha_bar[t], diff.alpha_bar[t_prev]
    grid = np.linspace(-10, 10, 1_000_001)  # wide enough for the unit-variance posterior at t = 999
    log_density = (-(x_t - np.sqrt(bar / bar_prev) * grid) ** 2 / (2 * (1 - bar / bar_prev))
                   - (grid - np.sqrt(bar_prev) * x0) ** 2 / (2 * (1 - bar_prev)))
    weights = np.exp(log_density - log_density.max())
    weights /= weights.sum()
    numeric_mean = (weights * grid).sum()
    numeric_variance = (weights * (grid - numeric_mean) ** 2).sum()
    mean, variance, _ = diff.q_posterior(torch.tensor([[x0]], dtype=torch.float64),
                                         torch.tensor([[x_t]], dtype=torch.float64), [t], [t_prev])
    assert mean.item() == pytest.approx(numeric_mean, rel=1e-7, abs=1e-9)
    assert variance.item() == pytest.approx(numeric_variance, rel=1e-5)


def test_posterior_of_the_step_to_x0_is_x0():
    diff = make("linear")
    x0 = torch.tensor([[0.25], [-0.5]], dtype=torch.float64)
    mean, variance, log_variance = diff.q_posterior(x0, torch.zeros_like(x0), [0, 40], [-1, -1], t_next=[1, 80])
    torch.testing.assert_close(mean, x0)
    assert (variance == 0).all() and torch.isfinite(log_variance).all()


def test_default_step_is_the_ddpm_step():
    diff = make("linear")
    t = np.arange(1000)
    c = diff.step_coefficients(t)
    bar_prev = np.append(1.0, diff.alpha_bar[:-1])
    np.testing.assert_allclose(c["beta"], diff.betas, rtol=1e-11)
    np.testing.assert_allclose(c["alpha_bar_prev"], bar_prev, rtol=0)
    np.testing.assert_allclose(c["posterior_variance"], diff.betas * (1 - bar_prev) / (1 - diff.alpha_bar), rtol=1e-11)
    np.testing.assert_allclose(c["posterior_mean_coef2"],
                               (1 - bar_prev) * np.sqrt(1 - diff.betas) / (1 - diff.alpha_bar), rtol=1e-11)


@pytest.mark.parametrize("spec", ["10", "ddim5", "3,5,2"])
def test_a_respaced_step_is_the_step_of_the_respaced_process(spec):
    """Stepping kept[i] -> kept[i-1] on the T-step process = stepping i -> i-1 on the process of respaced betas."""
    base = make("cosine", 100)
    kept = np.array(schedules.space_timesteps(100, spec))
    spaced = GaussianDiffusion(schedules.respace_betas(base.betas, kept))
    prev = np.append(-1, kept[:-1])
    nxt = np.append(kept[1:], kept[-1] + 1)
    ours = base.step_coefficients(kept, prev, nxt)
    theirs = spaced.step_coefficients(np.arange(len(kept)))
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-9, atol=1e-15, err_msg=key)


def test_perfect_model_has_zero_kl_and_a_sharp_decoder():
    diff = make("linear", 100, model_var_type="fixed_small")
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 256, (3, 3, 4, 4), generator=gen).double() / 127.5 - 1
    model = oracle_eps_model(diff, x0)
    t = torch.tensor([5, 50, 99])
    x_t = diff.q_sample(x0, t, torch.randn(x0.shape, generator=gen, dtype=torch.float64))
    kl = diff.vb_terms_bpd(model(x_t, t), x0, x_t, t)
    torch.testing.assert_close(kl, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-9)
    t0 = torch.zeros(3, dtype=torch.long)
    x_1 = diff.q_sample(x0, t0, torch.randn(x0.shape, generator=gen, dtype=torch.float64))
    decoder = diff.vb_terms_bpd(model(x_1, t0), x0, x_1, t0)
    # mean = x0 exactly, so -log2 of the mass of x0's bin (width 2/255; the edge bins are half-infinite)
    sigma = np.exp(0.5 * diff.step_coefficients([0], [-1], [1])["posterior_log_variance_clipped"][0])
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    half = (1 / 255) / sigma
    inner, edge = cdf(half) - cdf(-half), cdf(half)
    mass = torch.where(x0.abs() > 0.999, torch.full_like(x0, edge), torch.full_like(x0, inner))
    expected = diffusion.mean_flat(-torch.log2(mass))
    torch.testing.assert_close(decoder, expected, rtol=2e-3, atol=0)  # the tanh CDF approximation


def test_learned_range_spans_posterior_variance_to_beta():
    diff = make("cosine", 50, model_var_type="learned_range", loss_type="hybrid")
    x_t = torch.zeros(2, 1, dtype=torch.float64)
    t = [10, 30]
    c = diff.step_coefficients(np.array(t))
    for v, expected in ((-1.0, c["posterior_log_variance_clipped"]), (1.0, np.log(c["beta"]))):
        model_output = torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, v)], dim=1)
        out = diff.p_mean_variance(model_output, x_t, t)
        np.testing.assert_allclose(out["log_variance"][:, 0].numpy(), expected, rtol=1e-12)


# ---------------------------------------------------------------------- losses


class Affine(torch.nn.Module):
    """A per-channel affine 'network' with parameters, to check which loss terms reach which outputs."""

    def __init__(self, channels_in, channels_out):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, channels_out).view(1, -1, 1, 1))
        self.channels_in = channels_in

    def forward(self, x_t, t, y=None, context=None):
        repeats = self.weight.shape[1] // self.channels_in
        return torch.tanh(self.weight * x_t.repeat(1, repeats, 1, 1))


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_loss_types_combine_mse_and_vb_as_documented(mean_type):
    torch.manual_seed(0)
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 3, 20, 49])
    losses = {}
    for loss_type in ("vlb", "hybrid"):
        diff = make("cosine", 50, model_mean_type=mean_type, model_var_type="learned_range", loss_type=loss_type)
        losses[loss_type] = diff.training_losses(Affine(3, 6), x0, t, noise)
    simple = make("cosine", 50, model_mean_type=mean_type).training_losses(Affine(3, 3), x0, t, noise)
    torch.testing.assert_close(simple["loss"], simple["mse"])
    torch.testing.assert_close(losses["vlb"]["loss"], 50 * losses["vlb"]["vb"])
    hybrid = losses["hybrid"]
    torch.testing.assert_close(hybrid["loss"], hybrid["mse"] + 0.001 * 50 * hybrid["vb"])
    assert all(v.shape == (4,) for v in hybrid.values())


def test_training_targets_are_eps_x0_and_v():
    diff_eps, diff_x0, diff_v = (make("linear", 100, model_mean_type=m) for m in ("eps", "x0", "v"))
    x0 = torch.rand(3, 2, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 50, 99])
    assert diff_eps.training_losses(lambda x_t, t: noise, x0, t, noise)["mse"].abs().max() == 0
    assert diff_x0.training_losses(lambda x_t, t: x0, x0, t, noise)["mse"].abs().max() == 0
    v = diff_v.velocity(x0, t, noise)
    assert diff_v.training_losses(lambda x_t, t: v, x0, t, noise)["mse"].abs().max() == 0


def test_hybrid_vb_term_trains_only_the_variance_channels():
    """Nichol & Dhariwal 2021 Sec. 3.1: stop-gradient on the mean in L_vlb; the mean gets its gradient from L_simple."""
    torch.manual_seed(0)
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 3, 20, 49])
    diff = make("cosine", 50, model_var_type="learned_range", loss_type="hybrid", hybrid_lambda=0.5)
    outputs = []

    def model(x_t, t):
        out = torch.cat([x_t * 0.9, torch.zeros_like(x_t)], dim=1).requires_grad_(True)
        outputs.append(out)
        return out

    diff.training_losses(model, x0, t, noise)["loss"].sum().backward()
    grad_full = outputs[-1].grad
    diff.training_losses(model, x0, t, noise)["mse"].sum().backward()
    grad_mse = outputs[-1].grad
    torch.testing.assert_close(grad_full[:, :3], grad_mse[:, :3])  # mean: L_simple only
    assert grad_full[:, 3:].abs().sum() > 0 and grad_mse[:, 3:].abs().sum() == 0


def test_simple_loss_returns_vb_without_gradient():
    diff = make("linear", 100)
    net = Affine(3, 3)
    out = diff.training_losses(net, torch.rand(2, 3, 4, 4) * 2 - 1, torch.tensor([0, 7]))
    assert out["loss"].requires_grad and not out["vb"].requires_grad


def test_simple_loss_can_skip_the_bound_term_and_keeps_its_value():
    diff = make("linear", 100)
    x0, t = torch.rand(2, 3, 4, 4) * 2 - 1, torch.tensor([0, 7])
    noise = torch.randn_like(x0)
    full = diff.training_losses(Affine(3, 3), x0, t, noise)
    lean = diff.training_losses(Affine(3, 3), x0, t, noise, with_vb=False)
    assert "vb" not in lean
    torch.testing.assert_close(lean["loss"], full["loss"])
    hybrid = make("cosine", 50, model_var_type="learned_range", loss_type="hybrid")
    assert "vb" in hybrid.training_losses(Affine(3, 6), x0, t, noise, with_vb=False)  # the loss needs it


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_min_snr_weighting_is_min_snr_gamma_on_the_x0_error(mean_type):
    """Hang et al. 2023: every mean type's weighted loss equals min(SNR, gamma) * ||x0 - pred_x0||^2."""
    diff = make("linear", 100, model_mean_type=mean_type, snr_gamma=5.0)
    torch.manual_seed(0)
    x0 = torch.rand(3, 2, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 30, 99])
    prediction = torch.randn_like(x0)  # any network output
    loss = diff.training_losses(lambda x_t, t: prediction, x0, t, noise)["loss"]
    x_t = diff.q_sample(x0, t, noise)
    pred_x0 = {"eps": lambda: diff.x0_from_eps(x_t, t, prediction), "x0": lambda: prediction,
               "v": lambda: diff.x0_from_v(x_t, t, prediction)}[mean_type]()
    alpha_bar = torch.as_tensor(diff.alpha_bar[t.numpy()])
    snr = alpha_bar / (1 - alpha_bar)
    expected = snr.clamp(max=5.0) * ((x0 - pred_x0) ** 2).mean(dim=1)
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="snr_gamma"):
        make("linear", 100, snr_gamma=-1.0)


def test_bits_per_dim_is_prior_plus_terms():
    diff = make("linear", 30, model_var_type="fixed_small")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (2, 3, 4, 4), generator=gen).double() / 127.5 - 1
    result = diff.bits_per_dim(oracle_eps_model(diff, x0), x0, generator=gen)
    assert result["vb"].shape == (2, 30) and result["mse"].shape == (2, 30)
    torch.testing.assert_close(result["total_bpd"], result["prior_bpd"] + result["vb"].sum(dim=1))
    torch.testing.assert_close(result["prior_bpd"], diff.prior_bpd(x0))
    torch.testing.assert_close(result["vb"][:, 1:], torch.zeros(2, 29, dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(result["mse"], torch.zeros(2, 30, dtype=torch.float64), rtol=0, atol=1e-12)
    blind = diff.bits_per_dim(lambda x_t, t: torch.zeros_like(x_t), x0, generator=gen)
    assert (blind["total_bpd"] > result["total_bpd"] + 1).all()


def test_bits_per_dim_of_a_respaced_chain_uses_the_kept_steps():
    diff = make("linear", 100, model_var_type="fixed_large")
    x0 = torch.zeros(2, 1, 2, 2)
    kept = schedules.space_timesteps(100, "ddim10")
    calls = []

    def model(x_t, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x_t)

    result = diff.bits_per_dim(model, x0, timesteps=kept, generator=torch.Generator().manual_seed(0))
    assert calls == kept[::-1] and result["vb"].shape == (2, 10)
    torch.testing.assert_close(result["prior_bpd"], diff.prior_bpd(x0, torch.full((2,), kept[-1])))
    torch.testing.assert_close(result["total_bpd"], result["prior_bpd"] + result["vb"].sum(dim=1))


# ---------------------------------------------------------------------- config and inputs


def test_from_config_uses_schedule_defaults_for_zero_betas():
    diff = GaussianDiffusion.from_config(config_module.DiffusionConfig(num_timesteps=250))
    np.testing.assert_array_equal(diff.betas, schedules.beta_schedule("linear", 250))
    explicit = GaussianDiffusion.from_config(config_module.DiffusionConfig(num_timesteps=200, beta_start=1e-4,
                                                                           beta_end=0.02))
    assert explicit.betas[0] == pytest.approx(1e-4) and explicit.betas[-1] == pytest.approx(0.02)


def test_every_preset_builds_its_process():
    for name in presets.names():
        config = presets.get(name)
        diff = minildm.build_diffusion(config)
        assert diff.num_timesteps == config.diffusion.num_timesteps
        assert diff.model_var_type == config.diffusion.model_var_type


def test_bad_inputs_say_what_to_change():
    diff = make("linear", 100)
    x0 = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 99\] \(0-based"):
        diff.q_sample(x0, torch.tensor([0, 100]), torch.zeros_like(x0))
    with pytest.raises(ValueError, match="t has 3 entries but the batch has 2; pass one timestep per example"):
        diff.q_sample(x0, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="t must hold integer timesteps"):
        diff.q_sample(x0, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"x0 and noise must have the same shape, got \(2, 3, 4, 4\) and \(2, 1, 4"):
        diff.q_sample(x0, torch.tensor([0, 1]), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="t_prev must satisfy -1 <= t_prev < t"):
        diff.q_posterior(x0, x0, [5, 5], [5, 4])
    with pytest.raises(ValueError, match="needs them equal.*learn_sigma=True.*learned_range"):
        diff.p_mean_variance(torch.zeros(2, 6, 4, 4), x0, [3, 4])
    learned = make("linear", 100, model_var_type="learned_range", loss_type="hybrid")
    with pytest.raises(ValueError, match=r"model_var_type='learned_range' needs \(2, 6, 4, 4\).*learn_sigma=True"):
        learned.p_mean_variance(torch.zeros(2, 3, 4, 4), x0, [3, 4])
    with pytest.raises(ValueError, match="needs loss_type='hybrid' or 'vlb'"):
        make("linear", 100, model_var_type="learned_range")
    with pytest.raises(ValueError, match="unknown model_mean_type 'xstart'; valid values: eps, x0, v"):
        make("linear", 100, model_mean_type="xstart")
    with pytest.raises(ValueError, match="every t must be one of the kept timesteps"):
        diff.training_losses(lambda x_t, t: x_t, x0, torch.tensor([0, 5]), timesteps=[0, 4, 8])


# ---------------------------------------------------------------------- parity with guided-diffusion

MEAN_TYPES = {"eps": "eps", "xstart": "x0"}
# Float32 outputs of the same float64 coefficients: measured max abs error 6e-8 (one float32 ulp in a few
# fixed_large variances), 1.5e-8 on vb terms; everything else bitwise equal.
F32 = dict(rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def gd(reference_dir):
    data = np.load(reference_dir / "numerics" / "gaussian_diffusion.npz")
    return {key: data[key] for key in data.files}


def ref(gd, key):
    return torch.from_numpy(gd[key])


def batch(gd):
    return ref(gd, "batch.x_start"), ref(gd, "batch.noise"), ref(gd, "batch.t")


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedule_arrays_parity(gd, name):
    """Every float64 schedule array of guided-diffusion, produced by our (t, t_prev) coefficients and
    tensor functions in float64: measured max relative error 2e-15."""
    diff = make(name)
    t = np.arange(1000)
    c = diff.step_coefficients(t)
    for ours, key in ((c["alpha_bar_prev"], "alphas_cumprod_prev"), (c["posterior_variance"], "posterior_variance"),
                      (c["posterior_log_variance_clipped"], "posterior_log_variance_clipped"),
                      (c["posterior_mean_coef1"], "posterior_mean_coef1"),
                      (c["posterior_mean_coef2"], "posterior_mean_coef2")):
        np.testing.assert_allclose(ours, gd[f"sched.{name}.{key}"], rtol=1e-12, atol=0, err_msg=key)
    ones = torch.ones(1000, 1, dtype=torch.float64)
    tt = torch.from_numpy(t)
    mean, variance, log_variance = diff.q_mean_variance(ones, tt)
    x0_of_ones = diff.x0_from_eps(ones, tt, torch.zeros_like(ones))
    x0_of_eps = diff.x0_from_eps(torch.zeros_like(ones), tt, -ones)
    for ours, key in ((mean, "sqrt_alphas_cumprod"), (variance.sqrt(), "sqrt_one_minus_alphas_cumprod"),
                      (log_variance, "log_one_minus_alphas_cumprod"), (x0_of_ones, "sqrt_recip_alphas_cumprod"),
                      (x0_of_eps, "sqrt_recipm1_alphas_cumprod")):
        np.testing.assert_allclose(ours[:, 0].numpy(), gd[f"sched.{name}.{key}"], rtol=1e-12, atol=0, err_msg=key)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("spec", ["ddim25", "250"])
def test_respaced_posterior_log_variance_parity(gd, name, spec):
    """SpacedDiffusion's clipped log-variance from (t, t_prev, t_next) triples on the T-step process: measured 1e-14."""
    kept = np.array(schedules.space_timesteps(1000, spec))
    c = make(name).step_coefficients(kept, np.append(-1, kept[:-1]), np.append(kept[1:], 1000))
    np.testing.assert_allclose(c["posterior_log_variance_clipped"],
                               gd[f"respaced.{name}.{spec}.posterior_log_variance_clipped"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_forward_process_parity(gd, name):
    diff = make(name)
    x0, noise, t = batch(gd)
    x_t = diff.q_sample(x0, t, noise)
    torch.testing.assert_close(x_t, ref(gd, f"{name}.q_sample"), **F32)
    for ours, key in zip(diff.q_mean_variance(x0, t), ("mean", "variance", "log_variance")):
        torch.testing.assert_close(ours, ref(gd, f"{name}.q_mean_variance.{key}"), **F32)
    for ours, key in zip(diff.q_posterior(x0, x_t, t), ("mean", "variance", "log_variance_clipped")):
        torch.testing.assert_close(ours, ref(gd, f"{name}.q_posterior_mean_variance.{key}"), **F32)
    torch.testing.assert_close(diff.prior_bpd(x0), ref(gd, f"{name}.prior_bpd"), **F32)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("var_type", ["learned_range", "fixed_small", "fixed_large"])
@pytest.mark.parametrize("mean_type", ["eps", "xstart"])
@pytest.mark.parametrize("clip", [0, 1])
def test_reverse_process_and_vb_terms_parity(gd, name, var_type, mean_type, clip):
    diff = make(name, model_mean_type=MEAN_TYPES[mean_type], model_var_type=var_type, loss_type="hybrid")
    x0, _, t = batch(gd)
    x_t = ref(gd, f"{name}.q_sample")
    model_output = ref(gd, f"{name}.model_output")
    if var_type != "learned_range":
        model_output = model_output[:, :3]
    out = diff.p_mean_variance(model_output, x_t, t, clip_denoised=bool(clip))
    prefix = f"{name}.p_mean_variance.{var_type}.{mean_type}.clip{clip}"
    for key, ref_key in (("mean", "mean"), ("variance", "variance"), ("log_variance", "log_variance"),
                         ("pred_x0", "pred_xstart")):
        # unclipped pred_x0 reaches 1e4 at t=999 (cosine): relative tolerance covers it
        torch.testing.assert_close(out[key], ref(gd, f"{prefix}.{ref_key}"), **F32)
    vb = diff.vb_terms_bpd(model_output, x0, x_t, t, clip_denoised=bool(clip))
    torch.testing.assert_close(vb, ref(gd, f"{name}.vb_terms_bpd.{var_type}.{mean_type}.clip{clip}.output"), **F32)


def reference_model(x, t, **kwargs):
    """The fixed elementwise 'model' of the fixtures."""
    return torch.cat([1.2 * torch.tanh(0.7 * x + 0.3), torch.tanh(0.5 * x - 0.2)], dim=1)


def test_reference_model_reproduces_stored_output(gd):
    x_t = ref(gd, "linear.q_sample")
    torch.testing.assert_close(reference_model(x_t, None), ref(gd, "linear.model_output"), rtol=1e-6, atol=2e-7)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("mean_type", ["eps", "xstart"])
@pytest.mark.parametrize("loss", ["MSE", "RESCALED_MSE"])
def test_training_losses_parity(gd, name, mean_type, loss):
    """L_hybrid = mse + 0.001 · T · L_t is guided-diffusion's MSE and RESCALED_MSE loss at T = 1000."""
    x0, noise, t = batch(gd)
    diff = make(name, model_mean_type=MEAN_TYPES[mean_type], model_var_type="learned_range", loss_type="hybrid")
    out = diff.training_losses(reference_model, x0, t, noise)
    for key in ("mse", "vb", "loss"):
        torch.testing.assert_close(out[key], ref(gd, f"{name}.training_losses.learned_range.{mean_type}.{loss}.{key}"),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_training_losses_fixed_large_parity(gd, name):
    x0, noise, t = batch(gd)
    out = make(name).training_losses(lambda x, t: reference_model(x, t)[:, :3], x0, t, noise)
    torch.testing.assert_close(out["loss"], ref(gd, f"{name}.training_losses.fixed_large.eps.MSE.loss"),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("loss, hybrid_lambda, vb_scale", [("MSE", 1 / 250, 1.0), ("RESCALED_MSE", 0.001, 0.25)])
def test_spaced250_training_losses_parity(gd, name, loss, hybrid_lambda, vb_scale):
    """Training on the 250-step respaced chain = the T-step process with timesteps=kept; the model sees original t.

    guided-diffusion's MSE adds the vb term unscaled (lambda · S = 1 -> lambda = 1/250), RESCALED_MSE
    scales it by S/1000 (the default lambda = 0.001). Measured max abs error 3.6e-7.
    """
    x0, noise, _ = batch(gd)
    kept = schedules.space_timesteps(1000, "250")
    t = torch.tensor(kept)[ref(gd, "spaced250.t")]
    assert t.tolist() == gd[f"{name}.spaced250.model_timesteps"].tolist()
    diff = make(name, model_var_type="learned_range", loss_type="hybrid", hybrid_lambda=hybrid_lambda)
    seen = []

    def model(x_t, t_model):
        seen.append(t_model.tolist())
        torch.testing.assert_close(x_t, ref(gd, f"{name}.spaced250.q_sample"), rtol=0, atol=0)
        return reference_model(x_t, t_model)

    out = diff.training_losses(model, x0, t, noise, timesteps=kept)
    assert seen == [t.tolist()]
    prefix = f"{name}.spaced250.training_losses.learned_range.eps.{loss}"
    torch.testing.assert_close(out["mse"], ref(gd, f"{prefix}.mse"), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["vb"] * vb_scale, ref(gd, f"{prefix}.vb"), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["loss"], ref(gd, f"{prefix}.loss"), rtol=1e-6, atol=1e-6)


def test_mean_flat_and_normal_kl_basics():
    x = torch.arange(24.0).view(2, 3, 4)
    torch.testing.assert_close(diffusion.mean_flat(x), torch.tensor([5.5, 17.5]))
    zero = torch.zeros(3)
    torch.testing.assert_close(diffusion.normal_kl(zero, zero, zero, zero), zero)
