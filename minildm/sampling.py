"""Samplers: plain functions that walk an explicit list of timesteps.

A sampler visits the kept timesteps from the largest to 0 as consecutive pairs (t, t_prev),
the last pair going to t_prev = -1 (x0). Any sorted subset works — all T steps, a respaced
list from `schedules.space_timesteps(T, "250")` or `"ddim50"`, or a hand-made one — and the
model always receives the original timesteps t.

- `ddpm_sample`: ancestral sampling, Ho et al. 2020 Algorithm 2 (respaced as in Nichol & Dhariwal 2021, Sec. 4).
- `ddim_sample`: Song et al. 2021 (DDIM), Eq. 12; eta = 0 is deterministic, eta = 1 matches DDPM's variance.
- `plms_sample`: latent-diffusion's PLMS (pseudo linear multi-step, Liu et al. 2022, PNDM): deterministic DDIM
  steps (eta = 0) taken with an Adams–Bashforth combination of the current and up to 3 previous eps.

Each step is also available alone (`ddpm_step`, `ddim_step`, `plms_step`). All samplers inpaint
(`x0=..., mask=...`, as LDM's).
Guidance (`minildm.guidance`, chapter 04):
- classifier guidance through `cond_fn(x_t, t, **model_kwargs)` -> s · ∇ log p(y | x_t), applied where
  guided-diffusion applies it: on the mean in `ddpm_step` (`condition_mean`), on eps in `ddim_step`
  (`condition_score`) and on every eps that `plms_step` combines; cond_fn receives the original timestep,
  also on a respaced list;
- classifier-free guidance as a model wrapper (`guidance.classifier_free`): a callable with the
  model's signature.
Samplers run under `torch.no_grad()` (a cond_fn enables gradients inside itself); put the model in eval
mode first (dropout).

Per-sample seeds (evaluation at scale): `generator=PerSampleGenerator(seed, indices)` gives sample i (a global index)
its own random stream, seeded from (seed, i), for its x_T and every noise the sampler draws, so a sample does not
depend on the batch it is drawn in nor on the number of processes (`minildm.evaluation`).

callback: either callback(info) with ONE parameter, called with a dict as k-diffusion passes it —
{"i", "t", "t_prev", "x" (x_t entering the step), "x_prev", "pred_x0", "denoised" (= pred_x0)} — or the
older callback(step_index, t, x_t, pred_x0) with four.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import numpy as np
import torch

from minildm import schedules
from minildm.diffusion import GaussianDiffusion, _coef
from minildm.guidance import CondFn, condition_mean, condition_score
from minildm.progress import progress as progress_bar

__all__ = ["PerSampleGenerator", "ddim_sample", "ddim_step", "ddpm_sample", "ddpm_step", "plms_sample", "plms_step",
           "randn", "sample_seed"]

Callback = Callable[..., None]  # callback(info: dict) or callback(step_index, t, x_t, pred_x0)


# ---------------------------------------------------------------------------------------------
# Random streams: one torch.Generator for a batch, or one per sample


def sample_seed(seed: int, index: int, stream: int = 0) -> int:
    """The 64-bit seed of sample `index`'s random stream `stream` under run seed `seed` (all >= 0).

    numpy's SeedSequence([seed, index, stream]) hashes the triple, so nearby seeds and indices give unrelated
    streams. stream 0 draws the sample's noise (`PerSampleGenerator`), stream 1 its class label (`evaluation`).
    """
    if min(seed, index, stream) < 0:
        raise ValueError(f"per-sample seeds need seed, index and stream >= 0; got seed={seed}, index={index}, "
                         f"stream={stream} (use --seed 0 or another non-negative integer)")
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1, np.uint64)[0])


class PerSampleGenerator:
    """B random streams, one per sample: `randn([B, ...])` takes row b from the generator of `indices[b]`.

    Pass it as a sampler's `generator=`: x_T, the noise of every ancestral / DDIM (eta > 0) step and the
    q_sample noise of inpainting then come from sample-owned streams seeded with `sample_seed(seed, i)`, and
    sample i is the same whichever batch or process draws it. The streams live on `device` (default the CPU,
    so a seed also gives the same noise on a GPU); draws are moved to the device the sampler asks for.
    """

    def __init__(self, seed: int, indices: Sequence[int], device="cpu"):
        self.indices = [int(i) for i in indices]
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(sample_seed(seed, i)) for i in self.indices]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape, *, device=None, dtype=None) -> torch.Tensor:
        """Standard normal [B, ...] (B = len(self)): row b from sample indices[b]'s stream."""
        shape = tuple(shape)
        if not shape or shape[0] != len(self):
            raise ValueError(f"this PerSampleGenerator holds {len(self)} streams (samples {self.indices[:4]}...), "
                             f"but a tensor of shape {shape} was asked for; draw batches of exactly its samples")
        rows = [torch.randn(shape[1:], generator=g, device=self.device, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(device if device is not None else self.device)


def randn(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """torch.randn(shape) from a torch.Generator (or the global stream, None) or from a `PerSampleGenerator`."""
    if isinstance(generator, PerSampleGenerator):
        return generator.randn(shape, device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


@torch.no_grad()
def ddpm_step(model: Callable, diffusion: GaussianDiffusion, x_t: torch.Tensor, t, t_prev, *,
              clip_denoised: bool = True, model_kwargs: dict | None = None, noise: torch.Tensor | None = None,
              generator: torch.Generator | PerSampleGenerator | None = None, t_next=None,
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
              generator: torch.Generator | PerSampleGenerator | None = None, cond_fn: CondFn | None = None
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


@torch.no_grad()
def plms_step(model: Callable, diffusion: GaussianDiffusion, x_t: torch.Tensor, t, t_prev,
              old_eps: Sequence[torch.Tensor] = (), *, t_provisional=None, clip_denoised: bool = False,
              model_kwargs: dict | None = None, cond_fn: CondFn | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One PLMS step x_t -> x_{t_prev} (LDM's `p_sample_plms`); returns (x_prev, pred_x0, eps), [N, ...].

    old_eps: the eps of the previous steps, oldest first (the last 3 are used); eps, the model's at (x_t, t),
    is the one to append. The step is DDIM's with eta = 0 (Song et al. 2021, Eq. 12) taken with eps' =
    - no history, pseudo improved Euler: (eps + eps(x', t_provisional)) / 2, where x' is the DDIM step with eps
      and t_provisional defaults to t_prev (t when t_prev = -1, where LDM's one-step chain evaluates it);
    - Adams–Bashforth on 1, 2, 3 previous eps: (3 e - e_1) / 2, (23 e - 16 e_1 + 5 e_2) / 12,
      (55 e - 59 e_1 + 37 e_2 - 9 e_3) / 24, e_k being the eps k steps back (weights for equal steps, applied
      per step whatever the spacing, as LDM).
    clip_denoised clamps the pred_x0 of each DDIM update to [-1, 1] (with the eps consistent with it). LDM never
    clips here: its quantize_denoised (off by default) VQ-quantizes pred_x0 instead, which is not provided.
    cond_fn: guidance on every eps before it is combined, eps - sqrt(1 - a) · cond_fn(x, t, **model_kwargs).
    """
    t = _batch_timesteps(t, x_t)
    t_prev = _batch_timesteps(t_prev, x_t)
    # 1. the network's eps at (x_t, t)
    eps = _model_eps(model, diffusion, x_t, t, model_kwargs, cond_fn)
    old_eps = list(old_eps)[-3:]
    # 2. eps' of the multistep formula of the order the history allows
    if not old_eps:  # a provisional DDIM step, eps again where it lands, the average (2nd order)
        if t_provisional is None:
            t_provisional = torch.where(t_prev >= 0, t_prev, t)
        x_provisional, _ = _ddim_update(diffusion, x_t, t, t_prev, eps, clip_denoised)
        eps_provisional = _model_eps(model, diffusion, x_provisional, _batch_timesteps(t_provisional, x_t),
                                     model_kwargs, cond_fn)
        eps_prime = (eps + eps_provisional) / 2
    elif len(old_eps) == 1:
        eps_prime = (3 * eps - old_eps[-1]) / 2
    elif len(old_eps) == 2:
        eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
    else:
        eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
    # 3. the deterministic DDIM step with eps'
    x_prev, pred_x0 = _ddim_update(diffusion, x_t, t, t_prev, eps_prime, clip_denoised)
    return x_prev, pred_x0, eps


def ddpm_sample(model: Callable, diffusion: GaussianDiffusion, shape_or_x_T, timesteps: Sequence[int] | None = None,
                *, clip_denoised: bool = True, model_kwargs: dict | None = None,
                generator: torch.Generator | PerSampleGenerator | None = None,
                noise: Sequence[torch.Tensor | None] | None = None,
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
                generator: torch.Generator | PerSampleGenerator | None = None,
                noise: Sequence[torch.Tensor | None] | None = None,
                callback: Callback | None = None, progress: bool = True, device=None,
                cond_fn: CondFn | None = None, x0: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, final_t_prev: int = -1) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, Eq. 12) over `timesteps`, e.g. `space_timesteps(T, "ddim50")`.

    Arguments as in `ddpm_sample`; eta = 0 is deterministic given x_T. cond_fn: guidance on eps (`ddim_step`).
    x0, mask: inpainting (`ddpm_sample`; LDM's DDIMSampler re-imposes the known region the same way).
    final_t_prev: where the last step goes: -1 (x0, alpha_bar = 1), or 0 (alpha_bar_0) as LDM's DDIMSampler
    does on its timesteps 1, 21, ..., 981 (`schedules.ldm_ddim_timesteps`), as in `plms_sample`.
    """
    x = _initial(model, shape_or_x_T, generator, device)
    steps = _pairs(timesteps, diffusion.num_timesteps, final_t_prev)
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


def plms_sample(model: Callable, diffusion: GaussianDiffusion, shape_or_x_T, timesteps: Sequence[int] | None = None,
                *, eta: float = 0.0, clip_denoised: bool = False, final_t_prev: int = -1,
                model_kwargs: dict | None = None, generator: torch.Generator | PerSampleGenerator | None = None,
                callback: Callback | None = None, progress: bool = True, device=None,
                cond_fn: CondFn | None = None, x0: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """PLMS sampling (latent-diffusion's `PLMSSampler`; Liu et al. 2022) over `timesteps`; returns x0 [N, ...].

    S steps cost S + 1 model calls (the first step evaluates twice, `plms_step`); deterministic given x_T.
    eta must be 0, as in LDM. clip_denoised defaults to False as in LDM (latents are not in [-1, 1]), unlike
    `ddim_sample`.
    final_t_prev: where the last step goes, -1 (x0, alpha_bar = 1) as the other samplers, or 0 (alpha_bar_0)
    as LDM's DDIM and PLMS samplers, whose timesteps 1, 1 + T / S, … (`schedules.ldm_ddim_timesteps`) end there.
    Other arguments as in `ddim_sample`; the model's output may hold learned-variance channels (ignored),
    and an "x0" or "v" output is turned into eps.
    """
    if eta != 0:
        raise ValueError(f"eta must be 0 for PLMS (a deterministic multistep method, as LDM's PLMSSampler), got "
                         f"{eta}; use ddim_sample for eta > 0")
    x = _initial(model, shape_or_x_T, generator, device)
    steps = _pairs(timesteps, diffusion.num_timesteps, final_t_prev)
    _check_inpainting(x, x0, mask)
    old_eps: list[torch.Tensor] = []
    for i, (t, t_prev, _) in enumerate(progress_bar(steps, disable=not progress, desc="PLMS")):
        if mask is not None:
            x = _impose(diffusion, x, t, x0, mask, generator)
        # the first step's second call sees the next kept timestep (t itself on a one-step chain, as LDM)
        t_provisional = steps[min(i + 1, len(steps) - 1)][0]
        x_prev, pred_x0, eps = plms_step(model, diffusion, x, t, t_prev, old_eps, t_provisional=t_provisional,
                                         clip_denoised=clip_denoised, model_kwargs=model_kwargs, cond_fn=cond_fn)
        old_eps = [*old_eps, eps][-3:]
        _report(callback, i, t, t_prev, x, x_prev, pred_x0)
        x = x_prev
    return x


def _model_eps(model, diffusion, x_t, t, model_kwargs, cond_fn) -> torch.Tensor:
    """The network's eps at (x_t, t): variance channels dropped, an x0 or v output converted, guidance applied."""
    mean_part, _ = diffusion.split_model_output(model(x_t, t, **(model_kwargs or {})), x_t)
    if diffusion.model_mean_type == "x0":
        eps = diffusion.eps_from_x0(x_t, t, mean_part)
    elif diffusion.model_mean_type == "v":
        eps = diffusion.eps_from_v(x_t, t, mean_part)
    else:
        eps = mean_part
    if cond_fn is not None:  # ADM Algorithm 2 (LDM's score_corrector acts at the same place)
        a = diffusion._alpha_bar(t, x_t)
        eps = eps - _coef((1 - a) ** 0.5, x_t) * cond_fn(x_t, t, **(model_kwargs or {}))
    return eps


def _ddim_update(diffusion, x_t, t, t_prev, eps, clip_denoised) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic DDIM step with a given eps: x_prev = sqrt(a') pred_x0 + sqrt(1 - a') eps (Eq. 12, eta = 0)."""
    pred_x0 = diffusion.x0_from_eps(x_t, t, eps)
    if clip_denoised:
        pred_x0 = pred_x0.clamp(-1, 1)
        eps = diffusion.eps_from_x0(x_t, t, pred_x0)
    a_prev = diffusion.step_coefficients(t, t_prev)["alpha_bar_prev"]
    return _coef(a_prev**0.5, x_t) * pred_x0 + _coef((1 - a_prev) ** 0.5, x_t) * eps, pred_x0


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


def _pairs(timesteps: Sequence[int] | None, num_timesteps: int, final_t_prev: int = -1
           ) -> list[tuple[int, int, int]]:
    """(t, t_prev, t_next) for each step, walking the kept timesteps from the largest down to t_prev = final_t_prev
    (-1: x0)."""
    kept = schedules._check_timesteps(range(num_timesteps) if timesteps is None else timesteps, num_timesteps)
    if not -1 <= final_t_prev < kept[0]:
        raise ValueError(f"final_t_prev must be -1 (end at x0) or a timestep below the smallest kept one "
                         f"({kept[0]}); got {final_t_prev}")
    descending = kept[::-1].tolist()
    previous = descending[1:] + [int(final_t_prev)]
    following = [descending[0] + 1] + descending[:-1]
    return list(zip(descending, previous, following))


def _initial(model, shape_or_x_T, generator, device) -> torch.Tensor:
    if isinstance(shape_or_x_T, torch.Tensor):
        return shape_or_x_T
    if device is None:
        parameter = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        device = parameter.device if parameter is not None else (generator.device if generator is not None else "cpu")
    return randn(shape_or_x_T, generator, device)


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
        return randn(x_t.shape, generator, x_t.device, x_t.dtype)
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
