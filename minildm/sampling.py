"""Samplers: plain functions that walk an explicit list of timesteps.

A sampler visits the kept timesteps from the largest to 0 as consecutive pairs (t, t_prev),
the last pair going to t_prev = -1 (x0). Any sorted subset works — all T steps, a respaced
list from `schedules.space_timesteps(T, "250")` or `"ddim50"`, or a hand-made one — and the
model always receives the original timesteps t.

- `ddpm_sample`: ancestral sampling, Ho et al. 2020 Algorithm 2 (respaced as in Nichol & Dhariwal 2021, Sec. 4).
- `ddim_sample`: Song et al. 2021 (DDIM), Eq. 12; eta = 0 is deterministic, eta = 1 matches DDPM's variance.

Each step is also available alone (`ddpm_step`, `ddim_step`). Both samplers inpaint (`x0=..., mask=...`, as LDM's).
Guidance (`minildm.guidance`, chapter 04):
- classifier guidance through `cond_fn(x_t, t, **model_kwargs)` -> s · ∇ log p(y | x_t), applied where
  guided-diffusion applies it: on the mean in `ddpm_step` (`condition_mean`), on eps in `ddim_step`
  (`condition_score`); cond_fn receives the original timestep, also on a respaced list;
- classifier-free guidance as a model wrapper (`guidance.classifier_free`): a callable with the
  model's signature.
Samplers run under `torch.no_grad()` (a cond_fn enables gradients inside itself); put the model in eval
mode first (dropout).

callback: either callback(info) with ONE parameter, called with a dict as k-diffusion passes it —
{"i", "t", "t_prev", "x" (x_t entering the step), "x_prev", "pred_x0", "denoised" (= pred_x0)} — or the
older callback(step_index, t, x_t, pred_x0) with four.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch

from minildm import schedules
from minildm.diffusion import GaussianDiffusion, _coef
from minildm.guidance import CondFn, condition_mean, condition_score
from minildm.progress import progress as progress_bar

Callback = Callable[..., None]  # callback(info: dict) or callback(step_index, t, x_t, pred_x0)


@torch.no_grad()
def ddpm_step(model: Callable, diffusion: GaussianDiffusion, x_t: torch.Tensor, t, t_prev, *,
              clip_denoised: bool = True, model_kwargs: dict | None = None, noise: torch.Tensor | None = None,
              generator: torch.Generator | None = None, t_next=None,
              cond_fn: CondFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step x_t -> x_{t_prev} ~ p_theta(x_{t_prev} | x_t); returns (x_prev, pred_x0), [N, ...].

    t, t_prev: ints or int64 [N]; t_prev = -1 is the final step (no noise). noise: the z to use
    (default: drawn with `generator`). t_next only sets the clipped log-variance of the final step.
    cond_fn: classifier guidance, mean + variance · cond_fn(x_t, t, **model_kwargs) (ADM Algorithm 1).
    """
    t = _batch_timesteps(t, x_t)
    t_prev = _batch_timesteps(t_prev, x_t)
    # 1. the network's prediction at (x_t, t)
    model_output = model(x_t, t, **(model_kwargs or {}))
    # 2. mean and variance of p(x_{t_prev} | x_t): posterior mean at pred_x0 (Ho et al. 2020, Eq. 11)
    out = diffusion.p_mean_variance(model_output, x_t, t, t_prev, clip_denoised,
                                    t_next=None if t_next is None else _batch_timesteps(t_next, x_t))
    if cond_fn is not None:  # classifier guidance shifts the mean by Sigma · s ∇ log p(y | x_t)
        out = condition_mean(out, cond_fn(x_t, t, **(model_kwargs or {})))
    # 3. x_{t_prev} = mean + sigma z, z ~ N(0, I), except on the step to x0 (Algorithm 2, line 4)
    nonzero = (t_prev != -1).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
    if bool(nonzero.any()):
        z = _noise(noise, x_t, generator)
        x_prev = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * z
    else:
        x_prev = out["mean"]
    return x_prev, out["pred_x0"]


@torch.no_grad()
def ddim_step(model: Callable, diffusion: GaussianDiffusion, x_t: torch.Tensor, t, t_prev, *, eta: float = 0.0,
              clip_denoised: bool = True, model_kwargs: dict | None = None, noise: torch.Tensor | None = None,
              generator: torch.Generator | None = None, cond_fn: CondFn | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, Eq. 12); returns (x_prev, pred_x0), [N, ...].

    sigma = eta · sqrt((1 - a') / (1 - a)) · sqrt(1 - a / a') with a = alpha_bar_t, a' = alpha_bar_{t_prev}
    (Eq. 16); t_prev = -1 (a' = 1) ends at pred_x0. eta = 0 is deterministic.
    cond_fn: classifier guidance on eps, eps - sqrt(1 - a) · cond_fn(x_t, t, **model_kwargs) (ADM Algorithm 2).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like noise), got {eta}")
    t = _batch_timesteps(t, x_t)
    t_prev = _batch_timesteps(t_prev, x_t)
    # 1. the network's prediction at (x_t, t), turned into pred_x0 (clipped) and the eps consistent with it
    model_output = model(x_t, t, **(model_kwargs or {}))
    out = diffusion.p_mean_variance(model_output, x_t, t, t_prev, clip_denoised)
    if cond_fn is not None:  # classifier guidance: eps - sqrt(1 - a) s ∇ log p(y | x_t), then x0 from it
        out = condition_score(diffusion, out, x_t, t, t_prev, cond_fn(x_t, t, **(model_kwargs or {})))
    coefs = diffusion.step_coefficients(t, t_prev)
    a, a_prev = coefs["alpha_bar"], coefs["alpha_bar_prev"]
    # 2. the noise level sigma of the step (Eq. 16; eta = 1 gives the DDPM posterior variance)
    sigma = eta * ((1 - a_prev) / (1 - a)) ** 0.5 * (1 - a / a_prev) ** 0.5
    # 3. x_{t_prev} = sqrt(a') pred_x0 + sqrt(1 - a' - sigma²) eps ("direction pointing to x_t") + sigma z (Eq. 12)
    x_prev = _coef(a_prev**0.5, x_t) * out["pred_x0"] + _coef((1 - a_prev - sigma**2) ** 0.5, x_t) * out["pred_eps"]
    needs_noise = (sigma > 0) & (t_prev.cpu().numpy() != -1)
    if needs_noise.any():
        x_prev = x_prev + _coef(sigma * needs_noise, x_t) * _noise(noise, x_t, generator)
    return x_prev, out["pred_x0"]


def ddpm_sample(model: Callable, diffusion: GaussianDiffusion, shape_or_x_T, timesteps: Sequence[int] | None = None,
                *, clip_denoised: bool = True, model_kwargs: dict | None = None,
                generator: torch.Generator | None = None, noise: Sequence[torch.Tensor | None] | None = None,
                callback: Callback | None = None, progress: bool = True, device=None,
                cond_fn: CondFn | None = None, x0: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) over `timesteps` (default all T); returns x0 [N, ...].

    shape_or_x_T: a shape (x_T drawn with `generator` on `device`, default the model's) or the starting x_T.
    noise: optional list with one z per step (step i uses noise[i]; the final step's entry is unused).
    callback: called on every step (see the module docstring). cond_fn: classifier guidance (`ddpm_step`).
    x0, mask: inpainting as LDM's samplers do it (their `x0` and `mask` arguments): before every step the region
    where mask = 1 is replaced by x0 noised to the step's t, q_sample(x0, t) with noise from `generator`, so the
    model fills in the rest around the known part. mask broadcasts against x0 ([N or 1, 1 or C, H, W], 0 or 1).
    """
    x = _initial(model, shape_or_x_T, generator, device)
    steps = _pairs(timesteps, diffusion.num_timesteps)
    _check_noise(noise, len(steps))
    _check_inpainting(x, x0, mask)
    for i, (t, t_prev, t_next) in enumerate(progress_bar(steps, disable=not progress, desc="DDPM")):
        if mask is not None:
            x = _impose(diffusion, x, t, x0, mask, generator)
        x_prev, pred_x0 = ddpm_step(model, diffusion, x, t, t_prev, clip_denoised=clip_denoised,
                                    model_kwargs=model_kwargs, noise=None if noise is None else noise[i],
                                    generator=generator, t_next=t_next, cond_fn=cond_fn)
        _report(callback, i, t, t_prev, x, x_prev, pred_x0)
        x = x_prev
    return x


def ddim_sample(model: Callable, diffusion: GaussianDiffusion, shape_or_x_T, timesteps: Sequence[int] | None = None,
                *, eta: float = 0.0, clip_denoised: bool = True, model_kwargs: dict | None = None,
                generator: torch.Generator | None = None, noise: Sequence[torch.Tensor | None] | None = None,
                callback: Callback | None = None, progress: bool = True, device=None,
                cond_fn: CondFn | None = None, x0: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, Eq. 12) over `timesteps`, e.g. `space_timesteps(T, "ddim50")`.

    Arguments as in `ddpm_sample`; eta = 0 is deterministic given x_T. cond_fn: guidance on eps (`ddim_step`).
    x0, mask: inpainting (`ddpm_sample`; LDM's DDIMSampler re-imposes the known region the same way).
    """
    x = _initial(model, shape_or_x_T, generator, device)
    steps = _pairs(timesteps, diffusion.num_timesteps)
    _check_noise(noise, len(steps))
    _check_inpainting(x, x0, mask)
    for i, (t, t_prev, _) in enumerate(progress_bar(steps, disable=not progress, desc=f"DDIM eta={eta:g}")):
        if mask is not None:
            x = _impose(diffusion, x, t, x0, mask, generator)
        x_prev, pred_x0 = ddim_step(model, diffusion, x, t, t_prev, eta=eta, clip_denoised=clip_denoised,
                                    model_kwargs=model_kwargs, noise=None if noise is None else noise[i],
                                    generator=generator, cond_fn=cond_fn)
        _report(callback, i, t, t_prev, x, x_prev, pred_x0)
        x = x_prev
    return x


def _report(callback, i, t, t_prev, x, x_prev, pred_x0) -> None:
    """Call the step callback: with one dict if it takes one parameter, else the older four arguments."""
    if callback is None:
        return
    if _takes_one_argument(callback):
        callback({"i": i, "t": t, "t_prev": t_prev, "x": x, "x_prev": x_prev, "pred_x0": pred_x0,
                  "denoised": pred_x0})
    else:
        callback(i, t, x, pred_x0)


def _takes_one_argument(function) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: the older form
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) == 1 and not any(p.kind == p.VAR_POSITIONAL for p in parameters)


def _pairs(timesteps: Sequence[int] | None, num_timesteps: int) -> list[tuple[int, int, int]]:
    """(t, t_prev, t_next) for each step, walking the kept timesteps from the largest down to t_prev = -1."""
    kept = schedules._check_timesteps(range(num_timesteps) if timesteps is None else timesteps, num_timesteps)
    descending = kept[::-1].tolist()
    previous = descending[1:] + [-1]
    following = [descending[0] + 1] + descending[:-1]
    return list(zip(descending, previous, following))


def _initial(model, shape_or_x_T, generator, device) -> torch.Tensor:
    if isinstance(shape_or_x_T, torch.Tensor):
        return shape_or_x_T
    if device is None:
        parameter = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        device = parameter.device if parameter is not None else (generator.device if generator is not None else "cpu")
    return torch.randn(tuple(shape_or_x_T), generator=generator, device=device)


def _check_inpainting(x, x0, mask) -> None:
    if (x0 is None) != (mask is None):
        raise ValueError("inpainting needs both x0 (the known image) and mask (1 where it is known); pass both or "
                         "neither")
    if mask is None:
        return
    if x0.shape != x.shape:
        raise ValueError(f"x0 must have the samples' shape {tuple(x.shape)}; got {tuple(x0.shape)}")
    try:
        torch.broadcast_shapes(mask.shape, x0.shape)
    except RuntimeError:
        raise ValueError(f"mask {tuple(mask.shape)} does not broadcast against x0 {tuple(x0.shape)}; use "
                         "[N or 1, 1 or C, H, W]") from None
    if mask.numel() and (mask.min() < 0 or mask.max() > 1):
        raise ValueError("mask must hold values in [0, 1]: 1 where x0 is known, 0 where the model fills in")


def _impose(diffusion, x, t, x0, mask, generator) -> torch.Tensor:
    """x_t with its known region (mask 1) replaced by q_sample(x0, t) (LDM: img_orig * mask + (1 - mask) * img)."""
    known = diffusion.q_sample(x0.to(x), _batch_timesteps(t, x), _noise(None, x, generator))
    return mask.to(x) * known + (1 - mask.to(x)) * x


def _check_noise(noise, num_steps: int) -> None:
    if noise is not None and len(noise) != num_steps:
        raise ValueError(f"noise must hold one tensor per step ({num_steps} steps), got {len(noise)}")


def _noise(noise: torch.Tensor | None, x_t: torch.Tensor, generator) -> torch.Tensor:
    if noise is None:
        return torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    if noise.shape != x_t.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but x_t has {tuple(x_t.shape)}")
    return noise.to(device=x_t.device, dtype=x_t.dtype)


def _batch_timesteps(t, x_t: torch.Tensor) -> torch.Tensor:
    """An int or int64 [N] as an int64 tensor [N] on x_t's device."""
    t = torch.as_tensor(t, device=x_t.device)
    if t.is_floating_point():
        raise ValueError(f"timesteps must be integers (int64), got {t.dtype}")
    if t.ndim == 0:
        t = t.expand(x_t.shape[0]).clone()
    if t.shape != (x_t.shape[0],):
        raise ValueError(f"timesteps must be an int or one per example ([{x_t.shape[0]}]), got shape {tuple(t.shape)}")
    return t.long()
