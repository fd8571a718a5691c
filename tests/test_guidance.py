"""Guidance: parity of the classifier-guided steps with guided-diffusion, of classifier-free guidance with
latent-diffusion's DDIM step, and the behaviour of the hooks (gradients, timesteps, conventions)."""

import numpy as np
import pytest
import torch
from torch import nn

from minildm import guidance, sampling, schedules

from helpers import fixed_output, ldm_model, make


@pytest.fixture(scope="module")
def gd(reference_dir):
    data = np.load(reference_dir / "numerics" / "gaussian_diffusion.npz")
    return {key: torch.from_numpy(data[key]) for key in data.files}


@pytest.fixture(scope="module")
def ldm(reference_dir):
    data = np.load(reference_dir / "numerics" / "ldm_schedules.npz")
    return {key: torch.from_numpy(data[key]) for key in data.files}


def diffusion_and_output(gd, name, var_type):
    """The fixture's process and its fixed "model" output (2C channels for learned_range, C for fixed)."""
    diff = make(name, model_var_type=var_type, loss_type="hybrid" if var_type == "learned_range" else "simple")
    output = gd[f"{name}.model_output"]
    return diff, output if var_type == "learned_range" else output[:, :3]


# ---------------------------------------------------------------------- parity with guided-diffusion

VAR_TYPES = ["learned_range", "fixed_large"]


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_condition_mean_parity(gd, name, var_type):
    """mean + variance · g: measured max abs error 0 (float32 on both sides)."""
    diff, output = diffusion_and_output(gd, name, var_type)
    x_t, t = gd[f"{name}.q_sample"], gd["batch.t"]
    out = diff.p_mean_variance(output, x_t, t, t - 1, clip_denoised=True)
    guided = guidance.condition_mean(out, gd["batch.cond_grad"])
    torch.testing.assert_close(guided["mean"], gd[f"{name}.condition_mean.{var_type}.eps.mean"],
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_condition_score_parity(gd, name, var_type):
    """eps - sqrt(1 - a) g, x0 and mean re-derived: measured max abs error 6.1e-5 on pred_x0 values up to 281
    (at most 1.6e-6 relative: 1/sqrt(alpha_bar) amplifies float32 rounding), 6e-8 on the mean."""
    diff, output = diffusion_and_output(gd, name, var_type)
    x_t, t = gd[f"{name}.q_sample"], gd["batch.t"]
    out = diff.p_mean_variance(output, x_t, t, t - 1, clip_denoised=True)
    guided = guidance.condition_score(diff, out, x_t, t, t - 1, gd["batch.cond_grad"])
    prefix = f"{name}.condition_score.{var_type}.eps"
    torch.testing.assert_close(guided["pred_x0"], gd[f"{prefix}.pred_xstart"], rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(guided["mean"], gd[f"{prefix}.mean"], rtol=1e-6, atol=1e-7)
    assert torch.equal(guided["variance"], out["variance"])


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_guided_ancestral_step_parity(gd, name, var_type):
    """p_sample(cond_fn=...) = our ddpm_step(cond_fn=...) fed the stored z: measured max abs error 0."""
    diff, output = diffusion_and_output(gd, name, var_type)
    t = gd["batch.t"]
    received = []

    def cond_fn(x_t, t_model, **kwargs):
        received.append(t_model)
        return gd["batch.cond_grad"]

    sample, _ = sampling.ddpm_step(fixed_output(output), diff, gd[f"{name}.q_sample"], t, t - 1,
                                   noise=gd["batch.step_noise"], cond_fn=cond_fn)
    torch.testing.assert_close(sample, gd[f"{name}.p_sample_guided.{var_type}.eps.sample"], rtol=1e-6, atol=2e-7)
    assert len(received) == 1 and torch.equal(received[0], t)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_guided_ddim_step_parity(gd, name, var_type):
    """ddim_sample(cond_fn=..., eta=0) = our ddim_step(cond_fn=...): measured max abs error 2.4e-7 on the sample,
    6.1e-5 on pred_x0 values up to 281 (at most 1.6e-6 relative)."""
    diff, output = diffusion_and_output(gd, name, var_type)
    t = gd["batch.t"]
    sample, pred_x0 = sampling.ddim_step(fixed_output(output), diff, gd[f"{name}.q_sample"], t, t - 1,
                                         noise=gd["batch.step_noise"], cond_fn=lambda x, t, **kw: gd["batch.cond_grad"])
    prefix = f"{name}.ddim_sample_guided.{var_type}.eps.eta0"
    torch.testing.assert_close(sample, gd[f"{prefix}.sample"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pred_x0, gd[f"{prefix}.pred_xstart"], rtol=2e-6, atol=1e-7)


def test_guidance_changes_the_step(gd):
    """The parity above would pass with a hook that is never applied if the fixture's gradient were zero."""
    diff, output = diffusion_and_output(gd, "linear", "fixed_large")
    x_t, t = gd["linear.q_sample"], gd["batch.t"]
    plain, _ = sampling.ddim_step(fixed_output(output), diff, x_t, t, t - 1)
    guided, _ = sampling.ddim_step(fixed_output(output), diff, x_t, t, t - 1,
                                   cond_fn=lambda x, t, **kw: gd["batch.cond_grad"])
    assert (guided - plain).abs().max() > 1e-3


# ---------------------------------------------------------------------- parity with latent-diffusion's CFG step


@pytest.mark.parametrize("eta", [0, 1])
@pytest.mark.parametrize("index, t, t_prev", [(49, 981, 961), (25, 501, 481), (0, 1, 0)])
def test_classifier_free_ddim_step_parity(ldm, eta, index, t, t_prev):
    """`DDIMSampler.p_sample_ddim(..., unconditional_guidance_scale=7.5, unconditional_conditioning=uc)`:
    measured max abs error 7.2e-7 on x_prev, 3.8e-6 on pred_x0 values up to 36 (LDM's float32 buffers vs our
    float64 alpha_bar), as without guidance."""
    diff = make("scaled_linear")
    guided = guidance.classifier_free(ldm_model, 7.5, {"context": ldm["ddim_step.uc"]})
    x_prev, pred_x0 = sampling.ddim_step(guided, diff, ldm["ddim_step.x"], t, t_prev, eta=float(eta),
                                         clip_denoised=False, model_kwargs={"context": ldm["ddim_step.c"]},
                                         noise=ldm["ddim_step.noise"])
    prefix = f"ddim_step.eta{eta}.index{index}.scale7.5"
    torch.testing.assert_close(x_prev, ldm[f"{prefix}.x_prev"], rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(pred_x0, ldm[f"{prefix}.pred_x0"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("index, t", [(49, 981), (0, 1)])
def test_classifier_free_eps_parity(ldm, index, t):
    """The guided eps itself from the stored conditional and unconditional outputs: exact formula."""
    guided = guidance.classifier_free(ldm_model, 7.5, {"context": ldm["ddim_step.uc"]})
    eps = guided(ldm["ddim_step.x"], torch.full((2,), t), context=ldm["ddim_step.c"])
    cond, uncond = ldm[f"ddim_step.index{index}.e_t_cond"], ldm[f"ddim_step.index{index}.e_t_uncond"]
    torch.testing.assert_close(eps, uncond + 7.5 * (cond - uncond), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- classifier-free guidance: conventions


class CountingModel(nn.Module):
    """eps = x + y (a "class-conditional" toy), 2C channels when learn_sigma; counts its forward passes."""

    def __init__(self, learn_sigma=False):
        super().__init__()
        self.learn_sigma, self.calls, self.batch_sizes = learn_sigma, 0, []

    def forward(self, x, t, y=None):
        self.calls += 1
        self.batch_sizes.append(len(x))
        eps = x + y.float().view(-1, 1, 1, 1)
        return torch.cat([eps, -y.float().view(-1, 1, 1, 1).expand_as(x)], 1) if self.learn_sigma else eps


def test_classifier_free_scale_conventions():
    """w = 1: the conditional output in one plain pass; w = 0: the unconditional one; otherwise one doubled pass."""
    model, x, t = CountingModel(), torch.randn(3, 2, 4, 4), torch.tensor([5, 5, 5])
    y, null = torch.tensor([1, 2, 3]), guidance.null_labels(3, num_classes=4)
    cond, uncond = model(x, t, y=y), model(x, t, y=null)
    model.calls, model.batch_sizes = 0, []
    torch.testing.assert_close(guidance.classifier_free(model, 1.0, {"y": null})(x, t, y=y), cond)
    assert model.batch_sizes == [3]
    torch.testing.assert_close(guidance.classifier_free(model, 0.0, {"y": null})(x, t, y=y), uncond)
    guided = guidance.classifier_free(model, 3.0, {"y": null})(x, t, y=y)
    torch.testing.assert_close(guided, uncond + 3 * (cond - uncond))
    assert model.batch_sizes[1:] == [6, 6]  # one batched forward pass on the doubled batch per guided call


def test_classifier_free_guides_only_eps_channels():
    """With a learned variance only the first C channels are guided; the variance channels are the conditional's."""
    model, x, t = CountingModel(learn_sigma=True), torch.randn(2, 3, 4, 4), torch.tensor([1, 1])
    y, null = torch.tensor([2, 3]), torch.tensor([5])  # one null row is repeated for the batch
    out = guidance.classifier_free(model, 4.0, {"y": null})(x, t, y=y)
    cond, uncond = model(x, t, y=y), model(x, t, y=null.expand(2))
    assert out.shape == (2, 6, 4, 4)
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 4 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(out[:, 3:], cond[:, 3:])


def test_classifier_free_doubles_the_other_inputs():
    """Inputs that are not the condition (an upsampler's low_res) reach both halves of the doubled batch."""
    seen = {}

    def model(x, t, y=None, low_res=None):
        seen["low_res"] = low_res
        return x * low_res + y.float().view(-1, 1, 1, 1)

    x, low_res = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    out = guidance.classifier_free(model, 2.0, {"y": torch.tensor([9])})(x, torch.tensor([1, 1]),
                                                                        y=torch.tensor([0, 1]), low_res=low_res)
    torch.testing.assert_close(seen["low_res"], torch.cat([low_res, low_res]))
    cond, uncond = x * low_res + torch.tensor([0.0, 1.0]).view(-1, 1, 1, 1), x * low_res + 9
    torch.testing.assert_close(out, uncond + 2 * (cond - uncond))


def test_classifier_free_errors():
    model = CountingModel()
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        guidance.classifier_free(model, -1.0, {"y": torch.tensor([0])})
    guided = guidance.classifier_free(model, 2.0, {"y": torch.tensor([0, 0, 0])})
    with pytest.raises(ValueError, match=r"needs the condition\(s\) \['y'\]"):
        guided(torch.randn(2, 1, 2, 2), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="has 3 rows but the batch has 2"):
        guided(torch.randn(2, 1, 2, 2), torch.tensor([1, 1]), y=torch.tensor([0, 1]))


# ---------------------------------------------------------------------- classifier guidance: the hook


class LinearClassifier(nn.Module):
    """logits = W · flatten(x) (+ t-dependent bias): log p(y | x) has the closed-form gradient W_y - E_p[W]."""

    def __init__(self, dim, classes):
        super().__init__()
        self.linear = nn.Linear(dim, classes)
        self.seen_t, self.grad_enabled = [], []

    def forward(self, x, t):
        self.seen_t.append(t.clone())
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.linear(x.flatten(1)) + 0.001 * t.float()[:, None]


def test_classifier_gradient_is_scaled_log_softmax_gradient():
    torch.manual_seed(0)
    classifier = LinearClassifier(12, 4)
    x, t, y = torch.randn(5, 3, 2, 2), torch.tensor([3, 3, 3, 3, 3]), torch.tensor([0, 1, 2, 3, 1])
    with torch.no_grad():  # the samplers' context: the hook must enable gradients itself
        g = guidance.classifier_gradient(classifier, 2.5)(x, t, y=y)
    probs = torch.softmax(classifier.linear(x.flatten(1)) + 0.003, -1).detach()
    weight = classifier.linear.weight.detach()
    expected = 2.5 * (weight[y] - probs @ weight).view_as(x)
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)
    assert classifier.grad_enabled == [True]
    assert all(p.grad is None for p in classifier.parameters())  # autograd.grad: nothing accumulates in the classifier


def test_classifier_gradient_errors():
    with pytest.raises(ValueError, match="classifier scale must be >= 0"):
        guidance.classifier_gradient(LinearClassifier(4, 2), -1)
    with pytest.raises(ValueError, match="needs the requested classes"):
        guidance.classifier_gradient(LinearClassifier(4, 2), 1)(torch.randn(1, 1, 2, 2), torch.tensor([0]))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_respaced_guided_sampler_hands_the_classifier_the_original_timesteps(sampler):
    torch.manual_seed(0)
    diff, classifier = make("linear", model_var_type="fixed_small"), LinearClassifier(12, 3)
    kept = schedules.space_timesteps(1000, "ddim5")
    seen_by_model = []

    def model(x_t, t, y=None):
        seen_by_model.append(t.tolist())
        return 0.1 * x_t

    sample = getattr(sampling, f"{sampler}_sample")
    with torch.no_grad():
        sample(model, diff, (2, 3, 2, 2), kept, model_kwargs={"y": torch.tensor([0, 2])}, progress=False,
               cond_fn=guidance.classifier_gradient(classifier, 1.0))
    assert [t.tolist() for t in classifier.seen_t] == seen_by_model == [[t, t] for t in reversed(kept)]
    assert all(classifier.grad_enabled)


def test_guidance_raises_the_requested_class_probability():
    """Guided DDIM on an uninformative 'model' moves samples towards the classifier's requested class."""
    torch.manual_seed(0)
    diff, classifier = make("linear"), LinearClassifier(12, 3)
    y = torch.tensor([0, 1, 2] * 20)
    x_T = torch.randn(60, 3, 2, 2)
    kept = schedules.space_timesteps(1000, "ddim10")

    def accuracy(scale):
        cond_fn = guidance.classifier_gradient(classifier, scale) if scale else None
        x0 = sampling.ddim_sample(lambda x, t, y=None: 0 * x, diff, x_T.clone(), kept, clip_denoised=False,
                                  model_kwargs={"y": y}, cond_fn=cond_fn, progress=False)
        return (classifier(x0, torch.zeros(60, dtype=torch.long)).argmax(1) == y).float().mean().item()

    assert accuracy(0) < 0.5 < 0.9 < accuracy(10.0)


# ---------------------------------------------------------------------- the callback grows without breaking callers


def test_callback_dict_and_positional_forms():
    diff = make("linear", num_timesteps=40)
    model = lambda x, t, **kw: 0.1 * x  # noqa: E731
    infos, legacy = [], []
    sampling.ddim_sample(model, diff, torch.zeros(2, 1, 2, 2), [0, 10, 19], callback=infos.append, progress=False)
    sampling.ddim_sample(model, diff, torch.zeros(2, 1, 2, 2), [0, 10, 19], progress=False,
                         callback=lambda i, t, x_t, pred_x0: legacy.append((i, t)))
    assert [(info["i"], info["t"], info["t_prev"]) for info in infos] == [(0, 19, 10), (1, 10, 0), (2, 0, -1)]
    assert legacy == [(0, 19), (1, 10), (2, 0)]
    assert set(infos[0]) == {"i", "t", "t_prev", "x", "x_prev", "pred_x0", "denoised"}
    torch.testing.assert_close(infos[1]["x"], infos[0]["x_prev"])


def test_guided_model_sets_up_each_kind_of_guidance():
    import minildm
    from minildm import presets
    from minildm.config import override

    unconditional = override(presets.get("toy-shapes"), ["unet.channels=16"])
    conditional = override(unconditional, ["unet.num_classes=5", "unet.null_class=true"])
    net = minildm.build_model(unconditional)
    classifier = minildm.build_model(override(presets.get("shapes-classifier"), ["classifier.image_size=16",
                                                                             "data.image_size=16"]))
    same, cond_fn, classes = guidance.guided_model(net, unconditional)
    assert same is net and cond_fn is None and classes == 0
    # an unconditional model guided by a classifier: labels go to the classifier only
    wrapped, cond_fn, classes = guidance.guided_model(net, unconditional, classifier=classifier, classifier_scale=2)
    assert cond_fn is not None and classes == classifier.config.out_channels
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 9])
    torch.testing.assert_close(wrapped(x, t, y=torch.tensor([0, 1])), net(x, t))
    # a conditional model keeps its labels (ADM-G); classifier-free guidance wraps it
    cond_net = minildm.build_model(conditional)
    same, cond_fn, classes = guidance.guided_model(cond_net, conditional, classifier=classifier, classifier_scale=1)
    assert same is cond_net and cond_fn is not None and classes == 5
    free, cond_fn, classes = guidance.guided_model(cond_net, conditional, guidance_scale=3)
    assert free is not cond_net and cond_fn is None and classes == 5
    with pytest.raises(ValueError, match="needs a class-conditional model trained with a null class"):
        guidance.guided_model(net, unconditional, guidance_scale=3)
    with pytest.raises(ValueError, match="needs a classifier"):
        guidance.guided_model(net, unconditional, classifier_scale=2)
