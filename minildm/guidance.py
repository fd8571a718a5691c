"""Guidance: steer a diffusion model towards a class with a classifier, or without one.

Both come from Bayes' rule on the score. For a class y,

    ∇ log p(x_t | y) = ∇ log p(x_t) + ∇ log p(y | x_t),        and   ∇ log p(x_t) = -eps(x_t, t) / sqrt(1 - a_t)

(a_t = alpha_bar_t). Scaling the second term by s sharpens p(y | x_t) into p(y | x_t)^s / Z: samples
become more typical of y (fidelity) and less varied (diversity).

Classifier guidance (Dhariwal & Nichol 2021, ADM Sec. 4): a classifier p_phi(y | x_t, t) trained on
noised images gives g = s · ∇_x log p_phi(y | x_t, t) (`classifier_gradient`), applied exactly where
guided-diffusion applies it:
- ancestral steps shift the mean by the step's variance: mu' = mu + Sigma · g (Algorithm 1; `condition_mean`);
- DDIM shifts eps: eps' = eps - sqrt(1 - a_t) · g, then recomputes x0 and the mean from eps'
  (Algorithm 2; `condition_score`).
The gradient is taken at x_t (guided-diffusion's `cond_fn(x, t)`), with the original timestep t also
for respaced samplers.

Classifier-free guidance (Ho & Salimans 2021; GLIDE; Stable Diffusion): one network trained with the
condition dropped 10% of the time predicts both eps(x_t, y) and eps(x_t, null), and

    eps_w = eps(x_t, null) + w · (eps(x_t, y) - eps(x_t, null))                    (`classifier_free`)

since eps(x_t, y) - eps(x_t, null) = -sqrt(1 - a_t) ∇ log p(y | x_t) for the model's implicit classifier.

The one name for the strength is `guidance_scale`, in two conventions that the originals use:
- classifier-free: w, where **1 means no guidance** (the conditional model alone) and 0 the
  unconditional one — Stable Diffusion's `unconditional_guidance_scale`, diffusers' `guidance_scale`;
- classifier: ADM's `classifier_scale` s, where **0 means no guidance**.
They relate through the identity above: eps_w = eps(x_t, y) - sqrt(1 - a_t) (w - 1) ∇ log p(y | x_t), so
classifier-free w on the conditional model is classifier guidance with s = w - 1 on that model, and
classifier guidance with scale s on an unconditional model is, with a perfect classifier, classifier-free
guidance with w = s (eps(x_t, null) plays the unconditional model).

Shapes: x_t, gradients, eps [N, C, H, W]; t int64 [N]; y int64 [N].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from minildm.diffusion import GaussianDiffusion, _coef

CondFn = Callable[..., torch.Tensor]  # cond_fn(x_t, t, **model_kwargs) -> s · ∇_x log p(y | x_t), like x_t


def classifier_gradient(classifier: Callable, scale: float) -> CondFn:
    """ADM's `cond_fn`: g(x_t, t, y) = scale · ∇_x log softmax(classifier(x_t, t))[y], shaped like x_t.

    classifier(x_t [N, C, H, W], t [N]) -> logits [N, K]; y: int64 [N] (the sampler's model_kwargs["y"]).
    Gradients are enabled inside this function only, so samplers can run under `torch.no_grad()`.
    """
    if not scale >= 0:
        raise ValueError(f"classifier scale must be >= 0 (0: no guidance; ADM uses 0.5 to 10), got {scale}")

    def cond_fn(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **_) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier guidance needs the requested classes: pass model_kwargs={'y': labels}")
        with torch.enable_grad():
            x_in = x_t.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)
            selected = log_probs[torch.arange(len(log_probs), device=log_probs.device), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


def condition_mean(out: dict, gradient: torch.Tensor) -> dict:
    """Guidance on the mean (ADM Algorithm 1): mean' = mean + variance · gradient; the rest of `out` unchanged.

    out: `GaussianDiffusion.p_mean_variance`'s dict for the step; gradient: s · ∇ log p(y | x_t), [N, ...].
    """
    return {**out, "mean": out["mean"].float() + out["variance"] * gradient.float()}


def condition_score(diffusion: GaussianDiffusion, out: dict, x_t: torch.Tensor, t, t_prev,
                    gradient: torch.Tensor, *, t_next=None) -> dict:
    """Guidance on eps (ADM Algorithm 2): eps' = eps - sqrt(1 - a_t) · gradient, a_t = alpha_bar_t.

    eps is the one consistent with out["pred_x0"]; from eps' the new pred_x0 = (x_t - sqrt(1 - a_t) eps') /
    sqrt(a_t) (not clipped again, as guided-diffusion) and the posterior mean at it follow; pred_eps is
    re-derived from the new pred_x0 (what DDIM's update uses). Variances are unchanged.
    """
    a = diffusion.step_coefficients(t, t_prev, t_next)["alpha_bar"]
    eps = diffusion.eps_from_x0(x_t, t, out["pred_x0"])
    eps = eps - _coef((1.0 - a) ** 0.5, x_t) * gradient
    pred_x0 = diffusion.x0_from_eps(x_t, t, eps)
    mean, _, _ = diffusion.q_posterior(pred_x0, x_t, t, t_prev, t_next=t_next)
    return {**out, "mean": mean, "pred_x0": pred_x0, "pred_eps": diffusion.eps_from_x0(x_t, t, pred_x0)}


def classifier_free(model: Callable, guidance_scale: float, uncond: dict) -> Callable:
    """A denoiser with the model's signature that returns the classifier-free guided output.

    guided(x_t, t, **cond) = eps_u + w · (eps_c - eps_u), from ONE forward pass on the doubled batch
    cat([x_t, x_t]) with the conditions cat([cond[k], uncond[k]]) for every key of `uncond` (e.g.
    {"y": null labels [N]} for a class-conditional UNet with `null_class`, {"context": empty-prompt tokens}
    for cross-attention). w = guidance_scale: 1 = no guidance (one plain forward), 0 = unconditional.
    With a learned variance (2C output channels for C input channels) only the first C (eps) channels
    are guided; the variance channels are the conditional pass's (for every w, so the output is continuous
    in w). Output [N, C or 2C, H, W].
    """
    if not guidance_scale >= 0:
        raise ValueError(f"guidance_scale must be >= 0 (1: no guidance, 0: unconditional), got {guidance_scale}")

    def guided(x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        missing = sorted(set(uncond) - set(cond))
        if missing:
            raise ValueError(f"classifier-free guidance needs the condition(s) {missing} as keyword arguments "
                             "(the sampler's model_kwargs)")
        if guidance_scale == 1:
            return model(x_t, t, **cond)
        n = x_t.shape[0]
        # the guided condition against its null; any other input (e.g. low_res) goes to both halves
        both = {key: torch.cat([value, _batched(uncond[key], n, key) if key in uncond else value])
                for key, value in cond.items()}
        output = model(torch.cat([x_t, x_t]), torch.cat([t, t]), **both)
        out_cond, out_uncond = output[:n], output[n:]
        channels = x_t.shape[1]
        eps = out_uncond[:, :channels] + guidance_scale * (out_cond[:, :channels] - out_uncond[:, :channels])
        return torch.cat([eps, out_cond[:, channels:]], dim=1)

    return guided


def null_labels(num: int, num_classes: int, device=None) -> torch.Tensor:
    """The null class of a UNet built with `null_class=True`: label `num_classes` for all `num`, int64 [num]."""
    return torch.full((num,), num_classes, dtype=torch.long, device=device)


def guided_model(model: Callable, config, *, guidance_scale: float = 1.0, classifier=None,
                 classifier_scale: float = 0.0, device=None) -> tuple[Callable, CondFn | None, int]:
    """(model to call, cond_fn or None, number of classes to label the samples with; 0 = unconditional).

    The one setup of guided sampling (`train.generate`, `evaluation.sample_images`): classifier-free guidance wraps
    a class-conditional model trained with a null class (w = guidance_scale, 1 = none, `classifier_free`);
    classifier guidance (s = classifier_scale, 0 = none) adds a `classifier_gradient` cond_fn, and an unconditional
    model then samples the classifier's classes (its labels go to the classifier only, `ignore_labels`).
    """
    classes = config.unet.num_classes if config.model == "unet" else 0
    if guidance_scale != 1:
        if not (classes > 0 and config.unet.null_class):
            raise ValueError(f"guidance_scale={guidance_scale}: classifier-free guidance needs a class-conditional "
                             "model trained with a null class (unet.null_class=true, train.cond_dropout > 0); use "
                             "guidance_scale=1, or a classifier with classifier_scale")
        model = classifier_free(model, guidance_scale, {"y": null_labels(1, classes, device)})
    cond_fn = None
    if classifier is not None and classifier_scale != 0:
        cond_fn = classifier_gradient(classifier, classifier_scale)
        if classes == 0:
            model, classes = ignore_labels(model), classifier.config.out_channels
    elif classifier_scale != 0:
        raise ValueError(f"classifier_scale={classifier_scale} needs a classifier (classifier=...)")
    return model, cond_fn, classes


def ignore_labels(model: Callable) -> Callable:
    """guided-diffusion's model_fn for an unconditional model: the labels are the classifier's, not the model's."""
    def unconditional(x_t, t, y=None, **kwargs):
        return model(x_t, t, **kwargs)
    return unconditional


def _batched(value: torch.Tensor, n: int, key: str) -> torch.Tensor:
    """The unconditional input for a batch of n: one row is repeated, n rows are used as they are."""
    if value.shape[0] == 1:
        return value.expand(n, *value.shape[1:])
    if value.shape[0] != n:
        raise ValueError(f"the unconditional {key!r} has {value.shape[0]} rows but the batch has {n} (give 1 or {n})")
    return value
