"""Noise schedules and timestep spacing, in float64 numpy.

A schedule is the sequence of variances beta_t, t = 0 … T-1 (t = 0 is the first noising step),
of the forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)
(Ho et al. 2020, Eq. 2). Everything else follows from alpha_bar_t = prod_{s<=t} (1 - beta_s)
(Eq. 4): q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I).

`space_timesteps` picks the subset of timesteps a faster sampler visits (iDDPM Sec. 4,
DDIM Sec. 4.2); the process itself (`diffusion.GaussianDiffusion`) turns any pair of kept
timesteps (t, t_prev) into a reverse step, so no respaced copy of the process is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

SCHEDULES = ("linear", "cosine", "scaled_linear")


def beta_schedule(name: str, num_timesteps: int, beta_start: float | None = None,
                  beta_end: float | None = None) -> np.ndarray:
    """The betas [num_timesteps] (float64) of a named schedule.

    - "linear": DDPM (Ho et al. 2020, Sec. 4), linspace(beta_start, beta_end). Without explicit
      values it is guided-diffusion's T-independent version: scale = 1000 / T,
      linspace(scale * 1e-4, scale * 0.02), which is DDPM's 1e-4 … 0.02 for T = 1000.
    - "cosine": Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = f(t) / f(0),
      f(t) = cos²((t/T + s) / (1 + s) · π/2), s = 0.008, betas clipped to at most 0.999.
    - "scaled_linear": LDM / Stable Diffusion (latent-diffusion's "linear"), linear in sqrt(beta):
      linspace(sqrt(beta_start), sqrt(beta_end))², default 0.00085 … 0.012.
    """
    if not isinstance(num_timesteps, (int, np.integer)) or isinstance(num_timesteps, bool) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    num_timesteps = int(num_timesteps)
    if name == "linear":
        scale = 1000 / num_timesteps
        start = scale * 1e-4 if beta_start is None else beta_start
        end = scale * 0.02 if beta_end is None else beta_end
        if beta_end is None and end >= 1:
            raise ValueError(f"the default linear schedule scales 1e-4 … 0.02 by 1000/T and needs T > 20 "
                             f"(got T={num_timesteps}); pass beta_start/beta_end explicitly or use more timesteps")
        _check_range(name, start, end)
        return np.linspace(start, end, num_timesteps, dtype=np.float64)
    if name == "scaled_linear":
        start = 0.00085 if beta_start is None else beta_start
        end = 0.012 if beta_end is None else beta_end
        _check_range(name, start, end)
        return np.linspace(start**0.5, end**0.5, num_timesteps, dtype=np.float64) ** 2
    if name == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("the cosine schedule has no beta_start/beta_end; leave them unset "
                             "(diffusion.beta_start=0 and diffusion.beta_end=0 in a config)")
        return betas_for_alpha_bar(num_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown beta schedule {name!r}; valid schedules: {', '.join(SCHEDULES)}")


def betas_for_alpha_bar(num_timesteps: int, alpha_bar_fn: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous alpha_bar(t), t in [0, 1], into betas:
    beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta) (Nichol & Dhariwal 2021, Sec. 3.2)."""
    betas = [min(1 - alpha_bar_fn((i + 1) / num_timesteps) / alpha_bar_fn(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return np.array(betas, dtype=np.float64)


def alpha_bar(betas) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), float64 [T] (Ho et al. 2020, Eq. 4)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not ((betas > 0) & (betas < 1)).all():
        raise ValueError(f"every beta must lie in (0, 1); got min {betas.min()}, max {betas.max()} (beta = 1 "
                         "erases the signal: alpha_bar = 0 and 1 / sqrt(alpha_bar) is infinite; iDDPM's cosine "
                         "schedule clips betas at 0.999)")
    return np.cumprod(1.0 - betas)


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """The timesteps a respaced sampler keeps, sorted ascending (guided-diffusion `respace.py`).

    section_counts:
    - "250": 250 steps strided evenly (rounded fractional stride) over [0, T);
    - "10,15,20": [0, T) cut into 3 equal sections, strided to 10, 15 and 20 steps;
    - "ddimN": the DDIM paper's integer stride, range(0, T, i) with exactly N elements.
    The first kept timestep is 0 (unless the first section asks for 0 steps); a sampler always ends at x0.
    """
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            try:
                desired = int(text[len("ddim"):])
            except ValueError:
                raise ValueError(f"cannot read {section_counts!r}: use 'ddimN' with an integer N, "
                                 "e.g. 'ddim50'") from None
            if desired < 1:
                raise ValueError(f"{section_counts!r}: the number of DDIM steps must be at least 1")
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot make exactly {desired} steps out of {num_timesteps} with an integer stride "
                             f"('{text}'); pick another N or use the plain count '{desired}' (rounded strides)")
        try:
            section_counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(f"cannot read {section_counts!r}: use a count ('250'), comma-separated counts "
                             "per section ('10,15,20') or 'ddimN'") from None
    counts = [int(c) for c in section_counts]
    if not counts or any(c < 0 for c in counts) or sum(counts) == 0:
        raise ValueError(f"section counts must be non-negative and not all zero, got {counts}")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps "
                             f"(T={num_timesteps} split into {len(counts)} sections); use fewer steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # A running float sum rounded half-to-even, exactly as guided-diffusion (ties must match).
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return sorted(set(steps))


def respace_betas(betas, timesteps: Sequence[int]) -> np.ndarray:
    """Betas of the process restricted to the kept timesteps: beta'_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}
    (alpha_bar before the first kept step is 1). Same as guided-diffusion's `SpacedDiffusion` betas."""
    bar = alpha_bar(betas)
    kept = _check_timesteps(timesteps, len(bar))
    previous = np.concatenate([[1.0], bar[kept[:-1]]])
    return 1.0 - bar[kept] / previous


def ldm_ddim_timesteps(num_timesteps: int, num_steps: int, method: str = "uniform") -> list[int]:
    """latent-diffusion's DDIM timesteps (`make_ddim_timesteps`), which are offset by +1:
    "uniform" -> range(0, T, T // num_steps) + 1 (1, 21, …, 981 for 50 steps), "quad" -> quadratic spacing.
    Its final step goes from timesteps[0] (= 1) to alpha_bar at index 0, i.e. the pair (1, 0)."""
    if method == "uniform":
        if not 1 <= num_steps <= num_timesteps:
            raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
        steps = np.arange(0, num_timesteps, num_timesteps // num_steps)
    elif method == "quad":
        steps = (np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2).astype(int)
    else:
        raise ValueError(f"unknown DDIM discretisation {method!r}; use 'uniform' or 'quad'")
    return [int(s) + 1 for s in steps]


def _check_timesteps(timesteps: Sequence[int], num_timesteps: int) -> np.ndarray:
    """Validated, sorted int64 array of unique timesteps in [0, num_timesteps)."""
    given = np.asarray(timesteps if hasattr(timesteps, "__array__") else list(timesteps))
    if given.size and given.dtype.kind not in "iu":  # 10.7 would silently become step 10
        raise ValueError(f"timesteps must be integers, got dtype {given.dtype} (e.g. {given.flat[0]!r}); "
                         "round them yourself or use schedules.space_timesteps")
    kept = given.astype(np.int64)
    if kept.ndim != 1 or kept.size == 0:
        raise ValueError("timesteps must be a non-empty list of ints, e.g. schedules.space_timesteps(T, '250')")
    if kept.min() < 0 or kept.max() >= num_timesteps:
        raise ValueError(f"timesteps must lie in [0, {num_timesteps - 1}] (0-based); "
                         f"got min {kept.min()}, max {kept.max()}")
    kept = np.sort(kept)
    if (np.diff(kept) == 0).any():
        raise ValueError("timesteps contain duplicates; each kept timestep must appear once")
    return kept


def _check_range(name: str, start: float, end: float) -> None:
    if not 0 < start <= end < 1:
        raise ValueError(f"{name} schedule needs 0 < beta_start <= beta_end < 1, got {start} and {end}")
