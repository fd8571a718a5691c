"""Checks for the chapters' exercises: `exercises.check_q_jump(q_jump)` in a notebook cell.

A check calls the learner's function on inputs it chooses (several schedules, timesteps and networks,
seeded, never shown), compares the result with the package and prints one line:

- "correct";
- "not yet: <what differs>. Hint: <where to look>";
- "not attempted yet: fill in the cell above", for a stub that raises NotImplementedError (or an answer
  left at None).

It returns True or False and does not raise, so a notebook with open exercises still runs top to bottom
(under nbval too), and it never prints the expected answer. Reference solutions and typical mistakes are
in tests/exercise_solutions.py and tests/test_exercises.py, which prove that every check accepts the
former and rejects the latter.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import traceback

import numpy as np
import torch

import minildm
from minildm import diffusion, presets, schedules
from minildm.attention import AttentionBlock
from minildm.config import UNetConfig
from minildm.layers import count_parameters
from minildm.unet import ResBlock


class NotYet(Exception):
    """Raised inside a check: what differs between an answer and the package, with a hint."""


def _exercise(title: str):
    """Turn a check body into a check: one printed verdict, True or False, never an exception."""
    def decorate(body):
        @functools.wraps(body)
        def check(*args, **kwargs) -> bool:
            try:
                remark = body(*args, **kwargs)
            except NotImplementedError:
                print(f"{title}: not attempted yet: fill in the cell above")
                return False
            except NotYet as why:
                print(f"{title}: not yet: {why}")
                return False
            except Exception as error:  # the learner's code failed: say where, keep the notebook running
                print(f"{title}: not yet: your code raised {_where(error)}")
                return False
            print(f"{title}: correct" + (f" ({remark})" if remark else ""))
            return True
        return check
    return decorate


def _where(error: Exception) -> str:
    """'TypeError: message (line 3 of q_jump: the line)': the innermost frame outside this module."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename != __file__]
    frame = next((f for f in frames if "site-packages" not in f.filename), frames[-1] if frames else None)
    where = f" (in {frame.name}: {frame.line})" if frame is not None and frame.line else ""
    return f"{type(error).__name__}: {error}{where}"


def _float64(value, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().to(torch.float64)
    try:
        return torch.as_tensor(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError):
        raise NotYet(f"{what} should be a number or a tensor/array of numbers, got {type(value).__name__}") from None


def _compare(mine, expected, what: str, hint: str, *, mistakes=(), rtol=1e-5, atol=1e-6, broadcast=False) -> None:
    """Raise NotYet unless `mine` is close to `expected`; `mistakes` are (value, hint) pairs of typical errors."""
    mine, expected = _float64(mine, what), _float64(expected, what)
    if broadcast and mine.shape != expected.shape:
        try:
            mine = mine.expand_as(expected)
        except RuntimeError:
            pass
    if mine.shape != expected.shape:
        raise NotYet(f"{what} has shape {tuple(mine.shape)}; it should have shape {tuple(expected.shape)}")
    if not torch.isfinite(mine).all():
        raise NotYet(f"{what} contains NaN or inf. Hint: {hint}")
    if torch.allclose(mine, expected, rtol=rtol, atol=atol):
        return
    for wrong, mistake_hint in mistakes:
        wrong = _float64(wrong, what)
        if wrong.shape == mine.shape and torch.allclose(mine, wrong, rtol=rtol, atol=atol):
            hint = mistake_hint
            break
    raise NotYet(f"{what} is off by up to {(mine - expected).abs().max().item():.3g}. Hint: {hint}")


def _tolerance(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Chapter 01: the forward process


def _schedules_01():
    """(name, betas, alpha_bar) of the schedules the chapter-01 checks use."""
    for name in ("linear", "cosine"):
        betas = schedules.beta_schedule(name, 1000)
        yield name, betas, schedules.alpha_bar(betas)


@_exercise("Exercise 1 (q_jump)")
def check_q_jump(q_jump) -> None:
    """q_jump(x_s, s, t, noise, alpha_bar): the sample of q(x_t | x_s) drawn with `noise`, code timesteps s < t.

    Compared with the package's one-step process for the jump s -> t (`schedules.respace_betas`), on the
    linear and cosine schedules, for early, late and long jumps (late starts are where ignoring s fails).
    """
    g = torch.Generator().manual_seed(101)
    x_s = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(x_s.shape, generator=g, dtype=torch.float64)
    s_random = int(torch.randint(100, 800, (), generator=g))
    pairs = [(500, 600), (899, 999), (99, 399), (10, 700), (0, 1), (s_random, s_random + 37)]
    for name, betas, alpha_bar in _schedules_01():
        for s, t in pairs:
            beta_jump = schedules.respace_betas(betas, [s, t])[1]  # the jump s -> t is one step of a process
            expected = diffusion.GaussianDiffusion([beta_jump]).q_sample(x_s, torch.zeros(8, dtype=torch.long), noise)
            mine = q_jump(x_s.clone(), s, t, noise.clone(), alpha_bar.copy())
            a_t = alpha_bar[t]
            _compare(mine, expected, f"q_jump(x_s, s={s}, t={t}, noise, alpha_bar) on the {name} schedule",
                     "repeat the argument of Section 2 from x_s instead of x_0: which alphas does the jump multiply?",
                     mistakes=[(math.sqrt(a_t) * x_s + math.sqrt(1 - a_t) * noise,
                                "your result does not depend on s; x_s has already been noised up to step s"),
                               (a_t / alpha_bar[s] * x_s + (1 - a_t / alpha_bar[s]) * noise,
                                "the coefficients of x_s and of the noise are standard deviations, not variances")])


@_exercise("Exercise 2 (shifted_alpha_bar)")
def check_shifted_alpha_bar(shifted_alpha_bar) -> None:
    """shifted_alpha_bar(alpha_bar, factor): a schedule whose SNR is the original SNR / factor**2, at every step.

    Checked on the linear and cosine schedules (the cosine one without its last step, where alpha_bar is 0)
    for factors 8, 2 and 0.5, through the SNR the returned alpha_bar implies.
    """
    for name, _, alpha_bar in _schedules_01():
        base = alpha_bar[:-1] if name == "cosine" else alpha_bar  # cosine's last alpha_bar is ~0: no SNR
        log_snr = np.log(base / (1 - base))
        for factor in (8.0, 2.0, 0.5):
            what = f"shifted_alpha_bar(alpha_bar, {factor:g}) on the {name} schedule"
            new = _float64(shifted_alpha_bar(base.copy(), factor), what)
            if new.shape != base.shape:
                raise NotYet(f"{what} has shape {tuple(new.shape)}; it should have alpha_bar's shape, {base.shape}")
            if not ((new > 0) & (new < 1)).all():
                raise NotYet(f"{what} has values outside (0, 1), so it is not an alpha_bar. Hint: after dividing "
                             "the SNR, solve alpha_bar' / (1 - alpha_bar') = SNR' for alpha_bar'")
            _compare(torch.log(new / (1 - new)), log_snr - 2 * math.log(factor), f"the log SNR implied by {what}",
                     "the new SNR must be the old SNR divided by factor**2 at every step",
                     mistakes=[(log_snr - math.log(factor), "the SNR must be divided by factor**2: pooling averages "
                                "factor x factor pixels, and the variance of the noise falls by that many")])


@_exercise("Exercise 3 (q_posterior_jump)")
def check_q_posterior_jump(q_posterior_jump) -> None:
    """q_posterior_jump(x0, x_t, t, s, alpha_bar) -> (mean, variance) of q(x_s | x_t, x0), code timesteps s < t.

    Compared with `GaussianDiffusion.q_posterior(x0, x_t, t, t_prev=s)` on the linear and cosine schedules,
    for one ordinary step (s = t - 1) and for jumps; the variance may be a number or a tensor.
    """
    g = torch.Generator().manual_seed(103)
    x0 = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    for name, betas, alpha_bar in _schedules_01():
        process = diffusion.GaussianDiffusion(betas)
        for t, s in [(300, 299), (500, 100), (999, 979), (40, 1)]:
            t_batch, s_batch = torch.full((4,), t), torch.full((4,), s)
            x_t = process.q_sample(x0, t_batch, noise)
            mean, variance, _ = process.q_posterior(x0, x_t, t_batch, t_prev=s_batch)
            result = q_posterior_jump(x0.clone(), x_t.clone(), t, s, alpha_bar.copy())
            if not (isinstance(result, (tuple, list)) and len(result) == 2):
                raise NotYet("q_posterior_jump should return two things: (mean, variance)")
            call = f"q_posterior_jump(x0, x_t, t={t}, s={s}, alpha_bar) on the {name} schedule"
            hint = ("redo Section 4 with the jump s -> t as one Gaussian step, alpha = alpha_bar_t / alpha_bar_s"
                    if s < t - 1 else "a jump of one step must give Eq. 6-7 of Section 4")
            _compare(result[0], mean, f"the mean of {call}", hint)
            _compare(result[1], variance, f"the variance of {call}", hint, broadcast=True)


# ---------------------------------------------------------------------------------------------
# Chapter 02: the reverse process


def _random_eps_model(num_timesteps: int, seed: int = 0):
    """A fixed random 'network' eps(x_t, t) on 2-D points; it depends on t, so a wrong timestep shows."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(2, 2, generator=g, dtype=torch.float64)
    offset = torch.randn(num_timesteps, 2, generator=g, dtype=torch.float64)

    def model(x_t, t, **kwargs):
        t = torch.as_tensor(t, device="cpu").long().reshape(-1).expand(len(x_t))
        return torch.tanh(x_t @ weight.to(x_t)) + 0.5 * offset[t].to(x_t)
    return model


def _setup_02(model, process, variance: str):
    """(model, process with `variance`, dtype, device): the chapter's toy process (T = 200) and a random model
    unless the notebook passes its own (e.g. the trained `toy.ema`, `toy_process`)."""
    if process is None:
        process = minildm.build_diffusion(presets.get("toy-2d"))
    process = diffusion.GaussianDiffusion(process.betas, model_var_type=variance)
    if model is None:
        model = _random_eps_model(process.num_timesteps)
    parameter = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    dtype, device = (torch.float64, "cpu") if parameter is None else (parameter.dtype, parameter.device)
    return model, process, dtype, device


def _pairs_02(num_timesteps: int) -> list[tuple[int, int]]:
    """A single step, two jumps and the final step to x0 (t_prev = -1), ordered from easy to hard."""
    T = num_timesteps
    return [(T - 1, T - 2), (3 * T // 4, T // 2), (T // 5, 0), (T // 10, -1)]


def _step_hint(t: int, t_prev: int) -> str:
    if t_prev == -1:
        return "the last step goes to x0: alpha_bar of t_prev = -1 is 1, and no noise is added"
    if t_prev < t - 1:
        return ("a jump t -> t_prev is one Gaussian step with alpha = alpha_bar_t / alpha_bar_t_prev "
                "(chapter 01, Exercise 3)")
    return "predict x0 from eps_theta, then take the posterior mean at it (chapter 01, Section 4)"


@_exercise("Exercise 1 (ancestral_step)")
def check_ancestral_step(ancestral_step, model=None, process=None) -> None:
    """ancestral_step(model, process, x_t, t, t_prev, z) -> x_{t_prev}: one step of Algorithm 2 with the variance
    beta~ of the jump (no noise when t_prev = -1).

    Compared with `sampling.ddpm_step(..., clip_denoised=False, noise=z)` for a single step, two jumps and the
    final step. By default on the 2-D toy process (T = 200) with a fixed random model; pass `model` and
    `process` to use others (the process's betas are used, with sigma^2 = beta~).
    """
    from minildm import sampling

    model, process, dtype, device = _setup_02(model, process, "fixed_small")
    g = torch.Generator().manual_seed(201)
    x_t, z = (torch.randn(64, 2, generator=g, dtype=dtype).to(device) for _ in range(2))
    for t, t_prev in _pairs_02(process.num_timesteps):
        expected, _ = sampling.ddpm_step(model, process, x_t, t, t_prev, clip_denoised=False, noise=z)
        with torch.no_grad():
            mine = ancestral_step(model, process, x_t.clone(), t, t_prev, z.clone())
        _compare(mine, expected, f"ancestral_step(model, process, x_t, t={t}, t_prev={t_prev}, z)",
                 _step_hint(t, t_prev), **_tolerance(dtype))


@_exercise("Exercise 2 (vlb_loss)")
def check_vlb_loss(vlb_loss, model=None, process=None) -> None:
    """vlb_loss(model, process, x0, t, noise) -> [N]: T * L_{t-1} in bits for code timesteps t >= 1 (int).

    Compared with `training_losses` of a process with loss_type="vlb", for both fixed variances and three
    timesteps, on the two-moons toy data. Defaults as in `check_ancestral_step`.
    """
    from minildm import data

    model, process, dtype, device = _setup_02(model, process, "fixed_small")
    x0 = data.toy_2d("moons", 64, torch.Generator().manual_seed(3)).to(device, dtype)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(202), dtype=dtype).to(device)
    T = process.num_timesteps
    for variance in ("fixed_small", "fixed_large"):
        vlb_process = diffusion.GaussianDiffusion(process.betas, model_var_type=variance, loss_type="vlb")
        for t in (1, T // 4, T - 1):
            with torch.no_grad():
                expected = vlb_process.training_losses(model, x0, torch.full((64,), t, device=device), noise)["loss"]
                mine = vlb_loss(model, vlb_process, x0.clone(), t, noise.clone())
            hint = ("the bound term is lambda_t ||eps - eps_theta||^2 plus the constant C_t, which is not zero "
                    "when sigma^2 = beta" if variance == "fixed_large" else
                    "lambda_t ||eps - eps_theta||^2 (mean over dimensions), in bits, times T")
            _compare(mine, expected, f"vlb_loss(model, process, x0, t={t}, noise) with model_var_type={variance!r}",
                     hint, mistakes=[(expected / T, "the loss estimates the whole sum over t: multiply by T"),
                                     (expected * math.log(2), "the bound is in bits: divide nats by log(2)")],
                     **_tolerance(dtype))


@_exercise("Exercise 3 (ddim_step)")
def check_ddim_step(ddim_step, model=None, process=None) -> str:
    """ddim_step(model, process, x_t, t, t_prev, eta, z) -> x_{t_prev} (Song et al. 2021, Eq. 12 and 16).

    Compared with `sampling.ddim_step(..., clip_denoised=False, noise=z)` for eta = 0, 0.5, 1 over a single
    step, two jumps and the final step; then eta = 1 is compared with the ancestral step (sigma^2 = beta~)
    for the same z. Defaults as in `check_ancestral_step`.
    """
    from minildm import sampling

    model, process, dtype, device = _setup_02(model, process, "fixed_small")
    g = torch.Generator().manual_seed(203)
    x_t, z = (torch.randn(64, 2, generator=g, dtype=dtype).to(device) for _ in range(2))
    for t, t_prev in _pairs_02(process.num_timesteps):
        for eta in (0.0, 0.5, 1.0):
            expected, _ = sampling.ddim_step(model, process, x_t, t, t_prev, eta=eta, clip_denoised=False, noise=z)
            with torch.no_grad():
                mine = ddim_step(model, process, x_t.clone(), t, t_prev, eta, z.clone())
            hint = ("with eta = 0 the step is deterministic: sigma = 0" if eta == 0 else
                    "sigma appears twice: in front of z and inside sqrt(1 - a' - sigma^2)")
            _compare(mine, expected, f"ddim_step(model, process, x_t, t={t}, t_prev={t_prev}, eta={eta:g}, z)",
                     hint if t_prev != -1 else "a' = 1 for t_prev = -1", **_tolerance(dtype))
        ancestral, _ = sampling.ddpm_step(model, process, x_t, t, t_prev, clip_denoised=False, noise=z)
        with torch.no_grad():
            _compare(ddim_step(model, process, x_t, t, t_prev, 1.0, z), ancestral,
                     f"ddim_step with eta = 1 against the ancestral step {t} -> {t_prev}",
                     "expand sqrt(1 - a' - sigma^2) with sigma^2 = beta~", **_tolerance(dtype))
    return "with eta = 1 your DDIM step is the ancestral step with sigma^2 = beta~, noise for noise"


# ---------------------------------------------------------------------------------------------
# Chapter 03: from DDPM's UNet to ADM


def _unet_configs_03(seed: int) -> list[tuple[str, UNetConfig]]:
    """(description, config) of the networks the chapter-03 checks use: the chapter's base, two random
    small UNets and DDPM's CIFAR-10 network. None of their answers is printed anywhere."""
    base = UNetConfig(image_size=16, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,),
                      dropout=0.0)
    configs = [("the chapter's base network", base)]
    rng = np.random.default_rng(seed)
    for i in range(2):
        levels = int(rng.integers(2, 5))
        mult = tuple(int(m) for m in np.sort(rng.choice([1, 2, 3, 4], levels)))
        sides = [32 // 2**level for level in range(levels)]
        heads = dict(num_head_channels=8) if i == 0 else dict(num_heads=int(rng.choice([2, 4])))
        configs.append((f"a random small UNet ({i + 1})", dataclasses.replace(
            base, image_size=32, channels=int(rng.choice([16, 24, 40])), channel_mult=mult, norm_groups=8,
            num_res_blocks=int(rng.integers(1, 4)), attention_resolutions=tuple(sorted(rng.choice(sides, 2, False))),
            **heads)))
    configs.append(("DDPM's CIFAR-10 network", presets.get("ddpm-cifar10").unet))
    return configs


def _build_meta(unet_config: UNetConfig):
    config = presets.get("toy-shapes")
    config.unet = unet_config
    return minildm.build_model(config, device="meta")


@_exercise("Exercise 1 (adagn_extra_parameters)")
def check_adagn_extra_parameters(adagn_extra_parameters) -> None:
    """adagn_extra_parameters(model) -> int: how many parameters use_scale_shift_norm=True adds to a DDPM-style
    UNet, computed from its residual blocks. Checked on the chapter's base network, two random small UNets
    and DDPM's CIFAR-10 network (built on the meta device), against the difference of their parameter counts.
    """
    for what, unet_config in _unet_configs_03(seed=301):
        model = _build_meta(unet_config)
        expected = count_parameters(_build_meta(dataclasses.replace(unet_config, use_scale_shift_norm=True)))
        expected -= count_parameters(model)
        mine = adagn_extra_parameters(model)
        if isinstance(mine, torch.Tensor):
            mine = mine.item()
        if not isinstance(mine, (int, np.integer)) and not (isinstance(mine, float) and mine.is_integer()):
            raise NotYet(f"adagn_extra_parameters should return a whole number, got {mine!r}")
        if mine == expected:
            continue
        blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
        projections = [block.emb_layers[1] for block in blocks]
        hint = ("each doubled projection adds out_channels rows: their weights and their biases"
                if mine > 0 else "count the parameters of the extra rows of every residual block's projection")
        if mine == sum(p.in_features * p.out_features for p in projections):
            hint = "the doubled projection has a bias too"
        elif mine == sum(p.in_features * b.channels + b.channels for p, b in zip(projections, blocks)):
            hint = "a block's projection has one row per *output* channel of the block"
        raise NotYet(f"for {what} your count is too {'high' if mine > expected else 'low'}. Hint: {hint}")


def _heads_by_side(model) -> dict[int, int]:
    """{feature-map side: heads} of the AttentionBlocks of a built UNet."""
    u, heads = model.config, {}
    for path, module in model.named_modules():
        if isinstance(module, AttentionBlock):
            level = model.block_levels.get(path.rsplit(".", 1)[0], len(u.channel_mult) - 1)  # middle: deepest
            heads.setdefault(u.image_size // 2**level, set()).add(module.num_heads)
    return {side: max(h) for side, h in heads.items()}


@functools.lru_cache(maxsize=None)
def _expected_heads(name: str) -> dict[int, int]:
    return _heads_by_side(minildm.build_model(presets.get(name), device="meta"))


@_exercise("Exercise 2 (heads_per_side)")
def check_heads_per_side(heads_per_side) -> None:
    """heads_per_side(config) -> {feature-map side: heads} of every attention layer (the middle block's included),
    from a `Config` alone. Compared with the attention layers of the built networks (meta device) of four
    iDDPM/ADM presets and two random small UNets."""
    cases = [(f"preset {name!r}", presets.get(name), lambda name=name: _expected_heads(name))
             for name in ("adm-imagenet256", "adm-imagenet128", "adm-imagenet64", "iddpm-cifar10")]
    for what, unet_config in _unet_configs_03(seed=302)[1:3]:
        config = presets.get("toy-shapes")
        config.unet = unet_config
        cases.append((what, config, lambda unet_config=unet_config: _heads_by_side(_build_meta(unet_config))))
    for what, config, expected_fn in cases:
        mine = heads_per_side(config)
        if not isinstance(mine, dict):
            raise NotYet(f"heads_per_side should return a dict {{side: heads}}, got {type(mine).__name__}")
        expected = expected_fn()
        if set(mine) != set(expected):
            raise NotYet(f"for {what} your sides are {sorted(mine)}, but it has attention at sides {sorted(expected)}. "
                         "Hint: attention_resolutions lists feature-map sides, and the middle block always has an "
                         "attention layer, at the deepest level")
        wrong = sorted(side for side in expected if mine[side] != expected[side])
        if wrong:
            raise NotYet(f"for {what} the number of heads differs at side(s) {', '.join(map(str, wrong))}. Hint: "
                         "num_head_channels > 0 overrides num_heads, and every level has its own width (channel_mult)")


@_exercise("Exercise 3 (respaced_betas)")
def check_respaced_betas(respaced_betas) -> None:
    """respaced_betas(alpha_bar, kept) -> [len(kept)]: the betas of the chain through the kept timesteps.

    Compared with `schedules.respace_betas` on the cosine and linear schedules for "ddim25", "10", "6,3,1"
    and a random subset that does not start at 0.
    """
    rng = np.random.default_rng(303)
    random_kept = sorted(int(k) for k in rng.choice(np.arange(1, 1000), 40, replace=False))
    for name, betas, alpha_bar in _schedules_01():
        for spacing, kept in [("ddim25", schedules.space_timesteps(1000, "ddim25")),
                              ("10", schedules.space_timesteps(1000, "10")),
                              ("6,3,1", schedules.space_timesteps(1000, "6,3,1")), ("a random subset", random_kept)]:
            mine = respaced_betas(alpha_bar.copy(), list(kept))
            _compare(mine, schedules.respace_betas(betas, kept), f"respaced_betas on the {name} schedule, {spacing}",
                     "one beta' per kept timestep, and alpha_bar = 1 before the first kept one",
                     mistakes=[(betas[kept], "divide by alpha_bar at the previous *kept* timestep, not at t - 1")])


@_exercise("Exercise 3, the question (largest beta')")
def check_largest_respaced_beta(largest_beta) -> None:
    """The largest beta' of the "ddim25" chain on the cosine schedule (T = 1000), to 3 decimals."""
    if largest_beta is None or largest_beta is Ellipsis:
        raise NotImplementedError
    value = _float64(largest_beta, "your answer")
    if value.numel() != 1:
        raise NotYet("give one number: the largest beta' of the 25-step chain")
    betas = schedules.beta_schedule("cosine", 1000)
    expected = schedules.respace_betas(betas, schedules.space_timesteps(1000, "ddim25")).max()
    if abs(value.item() - expected) > 5e-4:
        raise NotYet(f"{value.item():.4g} is not the largest beta' of the 'ddim25' chain on the cosine schedule. "
                     "Hint: compute all 25 with your respaced_betas and take the largest")


# ---------------------------------------------------------------------------------------------
# Chapter 04: guidance


def _guidance_steps_04(seed: int):
    """(what, process, x_t, t, t_prev, p_mean_variance dict, gradient) for the chapter-04 checks: float64, the
    cosine process (T = 1000), a fixed and a learned variance, early, middle and late steps, and a jump."""
    from minildm import guidance  # noqa: F401  (the checks below compare with it)

    g = torch.Generator().manual_seed(seed)
    betas = schedules.beta_schedule("cosine", 1000)
    for variance in ("fixed_large", "learned_range"):
        process = diffusion.GaussianDiffusion(betas, model_var_type=variance,
                                              loss_type="hybrid" if variance == "learned_range" else "simple")
        for t, t_prev in [(999, 998), (500, 499), (40, 39), (700, 660)]:
            x_t = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
            channels = 6 if variance == "learned_range" else 3
            model_output = torch.randn(4, channels, 8, 8, generator=g, dtype=torch.float64)
            if variance == "learned_range":
                model_output[:, 3:] = model_output[:, 3:].tanh()  # the variance channels live in [-1, 1]
            gradient = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
            t_batch, t_prev_batch = torch.full((4,), t), torch.full((4,), t_prev)
            out = process.p_mean_variance(model_output, x_t, t_batch, t_prev_batch, clip_denoised=False)
            yield (f"step {t} -> {t_prev} with model_var_type={variance!r}", process, x_t, t_batch, t_prev_batch,
                   out, gradient)


@_exercise("Exercise 1a (guided_mean)")
def check_guided_mean(guided_mean) -> None:
    """guided_mean(mean, variance, gradient) -> the mean of a classifier-guided ancestral step (ADM Algorithm 1).

    Compared with `guidance.condition_mean` for fixed and learned variances at several steps (float64).
    """
    from minildm import guidance

    for what, _, _, _, _, out, gradient in _guidance_steps_04(seed=401):
        expected = guidance.condition_mean(out, gradient)["mean"]
        mean, variance = out["mean"], out["variance"]
        mine = guided_mean(mean.clone(), variance.clone(), gradient.clone())
        _compare(mine, expected, f"guided_mean(mean, variance, gradient) at the {what}",
                 "Algorithm 1 moves the mean along the gradient, scaled by the step's covariance Sigma",
                 mistakes=[(mean + gradient, "the shift is Sigma times the gradient: you forgot the variance"),
                           (mean + variance.sqrt() * gradient,
                            "Sigma is the variance, not the standard deviation"),
                           (mean - variance * gradient, "guidance moves *up* the gradient of log p(y | x_t)")])


@_exercise("Exercise 1b (guided_eps)")
def check_guided_eps(guided_eps) -> None:
    """guided_eps(eps, gradient, alpha_bar_t) -> eps' of a classifier-guided DDIM step (ADM Algorithm 2).

    Compared with the eps that `guidance.condition_score` derives (its pred_eps) at several steps (float64);
    alpha_bar_t is a float.
    """
    from minildm import guidance

    for what, process, x_t, t, t_prev, out, gradient in _guidance_steps_04(seed=402):
        eps = out["pred_eps"]
        expected = guidance.condition_score(process, out, x_t, t, t_prev, gradient)["pred_eps"]
        a = float(process.alpha_bar[int(t[0])])
        mine = guided_eps(eps.clone(), gradient.clone(), a)
        _compare(mine, expected, f"guided_eps(eps, gradient, alpha_bar_t) at the {what}",
                 "eps is -sqrt(1 - alpha_bar_t) times the score: subtract sqrt(1 - alpha_bar_t) times the gradient",
                 mistakes=[(eps - math.sqrt(a) * gradient,
                            "the factor is sqrt(1 - alpha_bar_t), not sqrt(alpha_bar_t)"),
                           (eps - (1 - a) * gradient, "the factor is the standard deviation sqrt(1 - alpha_bar_t) "
                            "of q(x_t | x0), not its variance"),
                           (eps + math.sqrt(1 - a) * gradient, "eps points *against* the score (eps = "
                            "-sqrt(1 - alpha_bar) grad log p): the gradient is subtracted"),
                           (eps - gradient / math.sqrt(1 - a), "multiply by sqrt(1 - alpha_bar_t); dividing turns "
                            "a score into eps the wrong way round")], rtol=1e-6, atol=1e-8)


def _labelled_model_04(num_classes: int, out_channels: int, seed: int):
    """A fixed random class-conditional 'network' on [N, 3, H, W] whose output differs for each label,
    including the null label `num_classes`."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.randn(num_classes + 1, out_channels, generator=g, dtype=torch.float64)
    shift = torch.randn(num_classes + 1, out_channels, generator=g, dtype=torch.float64)

    def model(x_t, t, y):
        x = x_t.repeat(1, out_channels // x_t.shape[1], 1, 1)
        return torch.tanh(scale[y][:, :, None, None] * x + shift[y][:, :, None, None])
    return model


@_exercise("Exercise 2 (classifier_free_output)")
def check_classifier_free_output(classifier_free_output) -> None:
    """classifier_free_output(out_cond, out_uncond, guidance_scale, channels) -> the guided network output.

    Compared with `guidance.classifier_free` for an eps-only output (C channels) and a learned-sigma one
    (2C channels), guidance_scale w = 0, 1, 2.5 and 7.5 (1: none, 0: unconditional).
    """
    from minildm import guidance

    g = torch.Generator().manual_seed(403)
    x_t = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t, y = torch.full((6,), 300), torch.arange(6) % 5
    null = guidance.null_labels(1, 5)
    for out_channels in (3, 6):
        model = _labelled_model_04(5, out_channels, seed=404 + out_channels)
        out_cond, out_uncond = model(x_t, t, y), model(x_t, t, null.expand(6))
        for w in (2.5, 7.5, 1.0, 0.0):
            expected = guidance.classifier_free(model, w, {"y": null})(x_t, t, y=y)
            mine = classifier_free_output(out_cond.clone(), out_uncond.clone(), w, 3)
            what = "learned sigma: 6 output channels" if out_channels == 6 else "3 output channels (eps only)"
            everything = out_uncond + w * (out_cond - out_uncond)
            _compare(mine, expected, f"classifier_free_output(out_cond, out_uncond, {w:g}, channels=3) with {what}",
                     "eps_u + w (eps_c - eps_u): w = 1 gives the conditional output, w = 0 the unconditional one",
                     mistakes=[(everything, "only the first `channels` channels are eps; the variance channels "
                                "are not guided, they are the conditional pass's"),
                               (torch.cat([everything[:, :3], out_uncond[:, 3:]], dim=1),
                                "the variance channels come from the *conditional* pass"),
                               (out_cond + w * (out_cond - out_uncond),
                                "in this convention w = 1 means no guidance: start from eps_u, not eps_c")])


def _small_classifier_04(seed: int):
    """A fixed random two-layer classifier(x_t [N, 3, 4, 4], t [N]) -> logits [N, 5] that depends on t."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(48, 32, generator=g, dtype=torch.float64) / 48**0.5
    w2 = torch.randn(32, 5, generator=g, dtype=torch.float64) / 32**0.5
    time_shift = torch.randn(1000, 32, generator=g, dtype=torch.float64)

    def classifier(x_t, t):
        return torch.tanh(x_t.flatten(1) @ w1 + time_shift[t]) @ w2
    return classifier


@_exercise("Exercise 3 (log_prob_gradient)")
def check_log_prob_gradient(log_prob_gradient) -> None:
    """log_prob_gradient(classifier, x_t, t, y, scale) -> scale · ∇_x log p(y | x_t, t), shaped like x_t.

    Compared with `guidance.classifier_gradient(classifier, scale)(x_t, t, y=y)` for a random two-layer
    classifier, several timesteps and scales; called under torch.no_grad(), as the samplers call cond_fn.
    """
    from minildm import guidance

    classifier = _small_classifier_04(seed=405)
    g = torch.Generator().manual_seed(406)
    for t_value, scale in [(900, 1.0), (300, 4.0), (20, 0.5)]:
        x_t = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
        t, y = torch.full((6,), t_value), torch.randint(5, (6,), generator=g)
        expected = guidance.classifier_gradient(classifier, scale)(x_t, t, y=y)

        def gradient_of(select):  # the gradient of a wrong objective, for the hints
            with torch.enable_grad():
                x = x_t.detach().requires_grad_(True)
                return torch.autograd.grad(select(classifier(x, t)).sum(), x)[0]
        rows = torch.arange(6)
        with torch.no_grad():
            mine = log_prob_gradient(classifier, x_t.clone(), t, y, scale)
        _compare(mine, expected, f"log_prob_gradient(classifier, x_t, t={t_value}, y, scale={scale:g})",
                 "differentiate log_softmax(classifier(x_t, t))[y] with respect to x_t (enable gradients inside)",
                 mistakes=[(scale * gradient_of(lambda z: z[rows, y]),
                            "differentiate the *log-probability* log_softmax(logits)[y], not the logit"),
                           (scale * gradient_of(lambda z: z.softmax(-1)[rows, y]),
                            "differentiate the log of the probability, not the probability"),
                           (gradient_of(lambda z: z.log_softmax(-1)[rows, y]) if scale != 1 else torch.full_like(
                               x_t, float("nan")), "multiply by the scale s"),
                           (scale * gradient_of(lambda z: z.log_softmax(-1)),
                            "take the log-probability of the requested class y only")])


# ---------------------------------------------------------------------------------------------
# Chapter 05: the autoencoder


@_exercise("Exercise 1 (ldm_downsample)")
def check_ldm_downsample(ldm_downsample) -> None:
    """ldm_downsample(x, weight, bias) -> LDM's autoencoder downsampling of x [N, C, H, W] (H, W even).

    Compared with `autoencoder.Downsample` holding the same 3x3 weight [C, C, 3, 3] and bias [C] on several
    random inputs (float64), including odd-looking sides, so padding and stride must both be right.
    """
    from minildm import autoencoder

    for seed, (n, c, side) in enumerate([(2, 3, 8), (1, 4, 6), (3, 2, 10)]):
        generator = torch.Generator().manual_seed(500 + seed)
        x = torch.randn(n, c, side, side + 2, generator=generator, dtype=torch.float64)
        down = autoencoder.Downsample(c).double()
        with torch.no_grad():
            down.conv.weight.copy_(torch.randn(c, c, 3, 3, generator=generator, dtype=torch.float64))
            down.conv.bias.copy_(torch.randn(c, generator=generator, dtype=torch.float64))
            weight, bias = down.conv.weight.clone(), down.conv.bias.clone()
            expected = down(x)
            mine = ldm_downsample(x.clone(), weight, bias)
            symmetric = torch.nn.functional.conv2d(x, weight, bias, stride=2, padding=1)
        _compare(mine, expected, f"ldm_downsample(x) for x of shape {tuple(x.shape)}",
                 "pad one column on the right and one row at the bottom (F.pad(x, (0, 1, 0, 1))), then a 3x3 "
                 "convolution with stride 2 and no padding",
                 mistakes=[(symmetric, "that is ADM's downsampling (padding=1 on every side): LDM pads only the "
                                       "right and bottom, so every output looks one pixel further down-right")])


@_exercise("Exercise 2 (gaussian_kl)")
def check_gaussian_kl(gaussian_kl) -> None:
    """gaussian_kl(mean, logvar) -> KL(N(mean, exp(logvar)) || N(0, I)) per example [N], summed over C, H, W.

    Compared with `autoencoder.DiagonalGaussian(...).kl()` on random moments (float64).
    """
    from minildm import autoencoder

    generator = torch.Generator().manual_seed(510)
    mean = torch.randn(3, 4, 5, 5, generator=generator, dtype=torch.float64) * 2
    logvar = torch.randn(3, 4, 5, 5, generator=generator, dtype=torch.float64)
    expected = autoencoder.DiagonalGaussian(torch.cat([mean, logvar], dim=1)).kl()
    mine = gaussian_kl(mean.clone(), logvar.clone())
    var = logvar.exp()
    _compare(mine, expected, "gaussian_kl(mean, logvar)",
             "KL = 0.5 * sum over channels and pixels of (mean^2 + var - 1 - logvar), with var = exp(logvar)",
             mistakes=[(2 * expected, "you forgot the factor 0.5"),
                       ((mean**2 + var - 1 - logvar).mean(dim=(1, 2, 3)) / 2,
                        "sum over channels and pixels (LDM does), do not average"),
                       (0.5 * (mean**2 + (0.5 * logvar).exp() - 1 - logvar).sum(dim=(1, 2, 3)),
                        "var = exp(logvar); exp(logvar / 2) is the standard deviation")])


@_exercise("Exercise 3 (nearest_code)")
def check_nearest_code(nearest_code) -> None:
    """nearest_code(z, codebook) -> int64 indices [N*h*w] of the nearest code (squared L2) for z [N, D, h, w],
    codebook [K, D], in (n, h, w) order: what `autoencoder.VectorQuantizer` returns as its third output."""
    from minildm import autoencoder

    generator = torch.Generator().manual_seed(520)
    quantiser = autoencoder.VectorQuantizer(12, 3)
    with torch.no_grad():  # codes of very different norms: the nearest is not the one with the largest dot product
        quantiser.embedding.weight.copy_(torch.randn(12, 3, generator=generator) * torch.linspace(0.2, 3, 12)[:, None])
    z = torch.randn(2, 3, 4, 5, generator=generator)
    expected = quantiser(z)[2]
    codebook = quantiser.embedding.weight.detach().clone()
    mine = nearest_code(z.clone(), codebook.clone())
    mine = torch.as_tensor(mine)
    if mine.shape != expected.shape:
        raise NotYet(f"nearest_code returned shape {tuple(mine.shape)}; it should be [N*h*w] = {tuple(expected.shape)} "
                     "(one index per latent pixel). Hint: move the channels last, then flatten to [N*h*w, D]")
    if torch.equal(mine.long(), expected):
        return
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    if torch.equal(mine.long(), (flat @ codebook.T).argmax(dim=1)):
        raise NotYet("that is the code with the largest dot product, which differs from the nearest one when the "
                     "codes have different lengths. Hint: |z - e|^2 = |z|^2 - 2 z.e + |e|^2")
    if torch.equal(mine.long(), torch.cdist(z.reshape(-1, 3), codebook).argmin(dim=1)):
        raise NotYet("z.reshape(-1, D) mixes channels and pixels: z is [N, D, h, w], so each pixel's vector is "
                     "z[n, :, i, j]. Hint: z.permute(0, 2, 3, 1) first")
    wrong = (mine.long() != expected).float().mean().item()
    raise NotYet(f"{wrong:.0%} of the indices differ. Hint: argmin over the codebook of the squared distance, in "
                 "(n, h, w) order")


@_exercise("Exercise 4 (scale_factor)")
def check_scale_factor(scale_factor) -> None:
    """scale_factor(latents) -> the float LDM multiplies latents by so that they have unit variance.

    latents [N, C, h, w] with per-channel offsets and widths; compared with `1 / latents.flatten().std()`, LDM's
    `scale_by_std` (one number for all channels), as `autoencoder.latent_scale_factor` computes it.
    """
    generator = torch.Generator().manual_seed(530)
    latents = torch.randn(64, 4, 8, 8, generator=generator) * torch.tensor([0.5, 2.0, 4.0, 1.0]).view(1, 4, 1, 1) \
        + torch.tensor([0.0, 1.0, -2.0, 0.5]).view(1, 4, 1, 1)
    expected = 1.0 / latents.flatten().std()
    mine = scale_factor(latents.clone())
    _compare(mine, expected, "scale_factor(latents)",
             "one number for all latents: 1 / (standard deviation over every element)",
             mistakes=[(latents.flatten().std(), "multiplying by the std makes the spread larger: invert it"),
                       (1.0 / latents.flatten().var(), "1 / variance: the scaled latents would have variance 1/var"),
                       (1.0 / latents.std(dim=(0, 2, 3)), "LDM uses one factor for all channels, not one each")],
             rtol=1e-4, atol=1e-6, broadcast=False)


# ---------------------------------------------------------------------------------------------
# Chapter 06: latent diffusion


def _split_heads_06(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, tokens, heads * dim_head] -> [N, heads, tokens, dim_head]: head h holds channels h*dim_head onwards."""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def _merge_heads_06(out: torch.Tensor) -> torch.Tensor:
    """[N, heads, T, dim_head] -> [N, T, heads * dim_head], head 0's channels first."""
    return out.transpose(1, 2).flatten(2)


@_exercise("Exercise 1 (cross_attention)")
def check_cross_attention(cross_attention) -> None:
    """cross_attention(x, context, w_q, w_k, w_v, heads) -> [N, T, heads * dim_head]: multi-head attention of the
    queries x [N, T, D] over the context tokens [N, L, Dc], before the output projection.

    w_q [inner, D], w_k and w_v [inner, Dc] are nn.Linear weights without bias (q = x @ w_q.T), inner =
    heads * dim_head; head h uses channels h*dim_head to (h+1)*dim_head - 1 of q, k and v; each query's weights
    are softmax(q k^T / sqrt(dim_head)) over the L context tokens; the heads' outputs are concatenated in head
    order. Compared with `attention.CrossAttention` holding the same weights (its to_out left out), on random
    float64 inputs with 2 to 4 heads and T != L.
    """
    from minildm import attention

    # (N, T, L, D, Dc, heads, dim_head): T != L and D != Dc, so that mixed-up axes cannot agree by accident
    for seed, (n, T, L, D, Dc, heads, dim_head) in enumerate([(2, 6, 4, 8, 5, 2, 3), (1, 9, 7, 12, 10, 4, 5),
                                                              (3, 5, 11, 6, 16, 3, 4)]):
        generator = torch.Generator().manual_seed(600 + seed)
        x = torch.randn(n, T, D, generator=generator, dtype=torch.float64)
        context = torch.randn(n, L, Dc, generator=generator, dtype=torch.float64)
        module = attention.CrossAttention(D, Dc, heads=heads, dim_head=dim_head).double()
        inner = heads * dim_head
        with torch.no_grad():
            for layer, fan_in in ((module.to_q, D), (module.to_k, Dc), (module.to_v, Dc)):
                layer.weight.copy_(torch.randn(inner, fan_in, generator=generator, dtype=torch.float64))
            module.to_out = torch.nn.Identity()  # the heads concatenated, before the output projection
            w_q, w_k, w_v = (layer.weight.clone() for layer in (module.to_q, module.to_k, module.to_v))
            expected = module(x, context)
            mine = cross_attention(x.clone(), context.clone(), w_q.clone(), w_k.clone(), w_v.clone(), heads)

            # typical mistakes, for the hints
            q, k, v = x @ w_q.T, context @ w_k.T, context @ w_v.T
            qh, kh, vh = (_split_heads_06(t, heads) for t in (q, k, v))
            scores = qh @ kh.transpose(-1, -2)  # [N, heads, T, L]
            qi, ki, vi = (t.reshape(n, t.shape[1], dim_head, heads).permute(0, 3, 1, 2) for t in (q, k, v))
            mistakes = [
                (_merge_heads_06(torch.softmax(scores * dim_head**-0.5, dim=-2) @ vh),
                 "the softmax runs over the context tokens (the last axis of q k^T): each query's weights sum to 1"),
                (_merge_heads_06(torch.softmax(scores * inner**-0.5, dim=-1) @ vh),
                 "each head scales its scores by 1 / sqrt(dim_head), the width of *one* head, not of all heads"),
                (_merge_heads_06(torch.softmax(scores, dim=-1) @ vh),
                 "scale the scores by 1 / sqrt(dim_head) before the softmax"),
                ((torch.softmax(scores * dim_head**-0.5, dim=-1) @ vh).reshape(n, T, inner),
                 "put the tokens axis back in front of the heads before merging: [N, heads, T, d] -> [N, T, heads, d]"),
                (_merge_heads_06(torch.softmax(qi @ ki.transpose(-1, -2) * dim_head**-0.5, dim=-1) @ vi),
                 "head h is the contiguous block of channels h*dim_head ... (h+1)*dim_head - 1: reshape the last "
                 "axis to (heads, dim_head), in that order"),
                (_merge_heads_06(torch.softmax(q.reshape(n, heads, T, dim_head) @ k.reshape(n, heads, L, dim_head)
                                               .transpose(-1, -2) * dim_head**-0.5, dim=-1)
                                 @ v.reshape(n, heads, L, dim_head)),
                 "the heads split the channels (the last axis), not the tokens: reshape to [N, tokens, heads, "
                 "dim_head], then move the heads axis forward"),
                (torch.softmax(q @ k.transpose(-1, -2) * dim_head**-0.5, dim=-1) @ v,
                 "split q, k and v into `heads` heads and attend in each head separately"),
            ]
        _compare(mine, expected, f"cross_attention(x [{n}, {T}, {D}], context [{n}, {L}, {Dc}], w_q, w_k, w_v, "
                 f"heads={heads}) with dim_head={dim_head}",
                 "LDM Sec. 3.3: in each head softmax(q k^T / sqrt(dim_head)) v, q from x, k and v from the context; "
                 "then the heads side by side", mistakes=mistakes)


@_exercise("Exercise 2 (layout_tokens)")
def check_layout_tokens(layout_tokens) -> None:
    """layout_tokens(box, label, grid, num_classes) -> (class_token, top_left_token, bottom_right_token), three
    ints: the token triple `conditioning.LayoutTokenizer` writes for ONE box.

    box: float64 tensor [4], (x0, y0, x1, y1) in [0, 1], image coordinates (y down), x1 >= x0 and y1 >= y0;
    label: an int in [0, num_classes); grid: the side of the lattice of corner positions. Vocabulary: 0 is
    <pad>, then the grid * grid lattice points, then the num_classes classes. Compared with
    `LayoutTokenizer(num_classes, grid=grid, max_boxes=1).encode(...)` for random boxes on four grids.
    """
    from minildm import conditioning

    generator = torch.Generator().manual_seed(610)
    for grid, num_classes in [(16, 10), (5, 3), (8, 7), (90, 600)]:
        tokenizer = conditioning.LayoutTokenizer(num_classes, grid=grid, max_boxes=1)
        corners = torch.rand(6, 2, 2, generator=generator, dtype=torch.float64).sort(dim=1).values  # [k, 2, (x, y)]
        boxes = torch.cat([corners.reshape(6, 4), torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)])
        labels = torch.randint(num_classes, (len(boxes),), generator=generator)
        for box, label in zip(boxes, labels):
            expected = tokenizer.encode([box[None]], [label[None]])[0].tolist()
            what = f"layout_tokens(box, label, grid={grid}, num_classes={num_classes})"
            mine = _three_tokens(layout_tokens(box.clone(), int(label), grid, num_classes), what)
            if mine != expected:
                _layout_hint(what, mine, expected, box, int(label), grid)


def _three_tokens(result, what: str) -> list[int]:
    if isinstance(result, torch.Tensor):
        result = result.reshape(-1) if result.numel() == 3 else result
    if not isinstance(result, (tuple, list, torch.Tensor)) or len(result) != 3:
        raise NotYet(f"{what} should return three tokens: (class_token, top_left_token, bottom_right_token)")
    values = [_float64(value, what) for value in result]
    if any(value.numel() != 1 or not float(value).is_integer() for value in values):
        raise NotYet(f"{what} should return three whole numbers (token ids), got {result!r}")
    return [int(value) for value in values]


def _layout_hint(what: str, mine: list[int], expected: list[int], box: torch.Tensor, label: int, grid: int) -> None:
    """Raise NotYet naming the first token of `mine` that differs and, if it is a typical mistake, why."""
    wrong = next(i for i in range(3) if mine[i] != expected[i])
    if wrong == 0:
        hint = ("the class tokens come after <pad> and all grid * grid lattice tokens"
                if mine[0] in (label, label + 1, grid * grid + label) else
                "class c is the (c+1)-th token after <pad> and the lattice tokens")
        raise NotYet(f"{what} gives the wrong class token. Hint: {hint}")
    x, y = box[2 * wrong - 2].item(), box[2 * wrong - 1].item()  # the corner this token encodes
    ix, iy = round(x * (grid - 1)), round(y * (grid - 1))
    mistakes = [(1 + ix * grid + iy, "number the lattice points row by row, as the pixels of an image: a row is "
                 "one value of y"),
                (1 + math.floor(y * (grid - 1)) * grid + math.floor(x * (grid - 1)),
                 "corners snap to the *nearest* lattice point: round, do not floor"),
                (1 + round(y * grid) * grid + round(x * grid), "the lattice points are i / (grid - 1), so 0 and 1 "
                 "are both on it"),
                (iy * grid + ix, "token 0 is <pad>: the lattice tokens start at 1")]
    hint = next((h for token, h in mistakes if mine[wrong] == token),
                "snap the corner to the nearest lattice point (ix, iy), then number the points row by row after <pad>")
    raise NotYet(f"{what} gives the wrong {('top-left', 'bottom-right')[wrong - 1]} token. Hint: {hint}")


def _adams_bashforth_06(eps_now: torch.Tensor, steps_back: list) -> torch.Tensor:
    """Adams–Bashforth for equal steps, steps_back = [eps 1 step back, 2 steps back, ...] (1 to 3 of them)."""
    weights = {1: (3, -1), 2: (23, -16, 5), 3: (55, -59, 37, -9)}[len(steps_back)]
    return sum(w * e for w, e in zip(weights, [eps_now, *steps_back])) / sum(weights)


@_exercise("Exercise 3 (plms_combination)")
def check_plms_combination(plms_combination) -> None:
    """plms_combination(eps_now, eps_history) -> eps': the Adams–Bashforth combination of LDM's PLMS sampler.

    eps_now: the network's eps at the current step, [N, C, H, W]; eps_history: a list of 1, 2 or 3 eps of the
    previous steps, oldest first (the one a single step back is eps_history[-1]), as `sampling.plms_step`
    takes its old_eps. Returns eps' [N, C, H, W], of order len(eps_history) + 1. Compared with the eps'
    `sampling.plms_step` steps with (recovered from its pred_x0), for a network returning hidden random eps,
    with 1, 2 and 3 previous eps (float64).
    """
    from minildm import sampling

    process = diffusion.GaussianDiffusion(schedules.beta_schedule("linear", 1000))
    generator = torch.Generator().manual_seed(620)
    for history_length, (t, t_prev) in zip((1, 2, 3), [(700, 680), (420, 400), (60, 40)]):
        eps_now, x_t, *history = torch.randn(2 + history_length, 2, 3, 4, 4, generator=generator,
                                             dtype=torch.float64)
        _, pred_x0, _ = sampling.plms_step(lambda x, t, eps=eps_now, **kwargs: eps, process, x_t, t, t_prev, history)
        expected = process.eps_from_x0(x_t, torch.full((2,), t), pred_x0)  # the eps' the step used
        mine = plms_combination(eps_now.clone(), [e.clone() for e in history])
        mistakes = [(_adams_bashforth_06(eps_now, history), "eps_history is oldest first: the eps one step back is "
                     "eps_history[-1]"),
                    (_adams_bashforth_06(eps_now, history[-1:]), f"with {history_length} previous eps the "
                     f"combination is of order {history_length + 1}: use all of them")]
        if history_length == 3:
            for flipped in range(4):  # one weight of the fourth-order formula with the wrong sign
                weights = [55, -59, 37, -9]
                weights[flipped] *= -1
                mistakes.append((sum(w * e for w, e in zip(weights, [eps_now, *history[::-1]])) / 24,
                                 "check the signs of the fourth-order weights: they alternate"))
        _compare(mine, expected, f"plms_combination(eps_now, eps_history) with {history_length} previous eps",
                 "the Adams–Bashforth weights of order len(eps_history) + 1, for equal steps; they sum to 1",
                 mistakes=mistakes)


# ---------------------------------------------------------------------------------------------
# Chapter 07: scaling up


def _statistics_07(dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A mean [dim] and a full-rank, non-diagonal covariance [dim, dim] (float64), as features would give."""
    mean = torch.randn(dim, generator=generator, dtype=torch.float64)
    factor = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)
    return mean, factor @ factor.T + 0.1 * torch.eye(dim, dtype=torch.float64)


@_exercise("Exercise 1 (frechet_distance)")
def check_frechet_distance(frechet_distance) -> None:
    """frechet_distance(mu_a, sigma_a, mu_b, sigma_b) -> float: |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    mu [D], sigma [D, D] as numpy float64 arrays (what a statistics file holds); compared with
    `metrics.gaussian_frechet_distance` for D = 2, 8 and 32 and non-commuting covariances.
    """
    from minildm import metrics

    generator = torch.Generator().manual_seed(700)
    for dim in (2, 8, 32):
        (mu_a, sigma_a), (mu_b, sigma_b) = _statistics_07(dim, generator), _statistics_07(dim, generator)
        expected = metrics.gaussian_frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
        mine = frechet_distance(mu_a.numpy().copy(), sigma_a.numpy().copy(), mu_b.numpy().copy(),
                                sigma_b.numpy().copy())
        if isinstance(mine, complex) or np.iscomplexobj(mine):
            raise NotYet("the distance is complex: a matrix square root can carry tiny imaginary parts from "
                         "rounding; keep the real part (scipy.linalg.sqrtm(...).real), as every FID code does")
        mean_term = float((mu_a - mu_b).square().sum())
        traces = float(sigma_a.trace() + sigma_b.trace())
        elementwise = float((sigma_a * sigma_b).clamp(min=0).sqrt().sum())  # sqrt of the entries, not the matrix
        diagonal = float((sigma_a.diagonal() * sigma_b.diagonal()).sqrt().sum())
        _compare(mine, expected, f"frechet_distance for D = {dim}",
                 "the matrix square root of the product S_a S_b (scipy.linalg.sqrtm), then its trace",
                 mistakes=[(mean_term + traces - 2 * elementwise, "(S_a S_b)^(1/2) is a matrix square root, not the "
                            "square root of each entry of S_a * S_b (an element-wise product)"),
                           (mean_term + traces - 2 * diagonal, "the covariances are not diagonal: the trace of the "
                            "matrix square root needs the whole matrices"),
                           (mean_term + traces - _sqrt_trace_07(sigma_a, sigma_b), "the cross term is 2 Tr "
                            "(S_a S_b)^(1/2): the factor 2 is missing"),
                           (math.sqrt(mean_term) + traces - 2 * _sqrt_trace_07(sigma_a, sigma_b), "the mean term is "
                            "the *squared* distance of the means")],
                 rtol=1e-6, atol=1e-8)


def _sqrt_trace_07(sigma_a: torch.Tensor, sigma_b: torch.Tensor) -> float:
    """Tr (S_a S_b)^(1/2) from the eigenvalues of S_a S_b (real and >= 0 for PSD S_a, S_b)."""
    return float(torch.linalg.eigvals(sigma_a @ sigma_b).real.clamp(min=0).sqrt().sum())


@_exercise("Exercise 2 (rank_indices)")
def check_rank_indices(rank_indices) -> None:
    """rank_indices(num, batch_size, rank, world_size) -> the global sample indices process `rank` draws, in order.

    Compared with `evaluation.shard` flattened: round k of world_size x batch_size indices gives process r the
    batch [k W B + r B, k W B + (r + 1) B), cut at num. Several (num, B, W), every rank, uneven last rounds.
    """
    from minildm import evaluation

    for num, batch_size, world_size in [(16, 4, 2), (10, 3, 2), (50, 4, 4), (7, 8, 2), (9, 2, 1), (23, 5, 3)]:
        for rank in range(world_size):
            expected = [i for batch in evaluation.shard(num, batch_size, rank, world_size) for i in batch]
            try:
                mine = [int(i) for i in rank_indices(num, batch_size, rank, world_size)]
            except TypeError:
                raise NotYet("rank_indices should return a list (or any iterable) of integers") from None
            if mine == expected:
                continue
            case = f"num={num}, batch_size={batch_size}, rank={rank}, world_size={world_size}"
            if mine == list(range(rank, num, world_size)):
                hint = "each process takes whole batches of consecutive indices per round, not every W-th index"
            elif sorted(mine) == sorted(expected):
                hint = "the right indices in the wrong order: round by round, each batch in increasing order"
            elif set(mine) < set(expected):
                hint = "some indices are missing: the last round may be partial, cut it at num instead of dropping it"
            elif any(i >= num for i in mine):
                hint = "indices must stay below num: cut the last round at num"
            else:
                hint = "round k holds the W x B indices from k W B on; process r takes the r-th batch of B of them"
            raise NotYet(f"for {case} you return {len(mine)} indices {mine[:6]}...; the process draws "
                         f"{len(expected)} others. Hint: {hint}")
    union = sorted(i for r in range(3) for i in rank_indices(23, 5, r, 3))
    if union != list(range(23)):
        raise NotYet("together the processes must draw every index 0 .. num - 1 exactly once")


@_exercise("Exercise 3 (to_bfloat16)")
def check_to_bfloat16(to_bfloat16) -> None:
    """to_bfloat16(x) -> float32 tensor: x float32 rounded to the nearest bfloat16 (ties to even), by bit operations.

    Compared with `x.to(torch.bfloat16).float()` on random magnitudes, exact ties and values near powers of two.
    """
    generator = torch.Generator().manual_seed(707)
    x = torch.randn(4096, generator=generator) * torch.logspace(-20, 20, 4096, base=2.0)
    ties = (torch.arange(1, 257, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)  # halfway between two
    near_powers = torch.tensor([1.0, 2.0, 0.5, 1.0 - 2**-24, 2.0 - 2**-23, 3.0e38], dtype=torch.float32)
    x = torch.cat([x, ties, -ties, near_powers, -near_powers])
    expected = x.to(torch.bfloat16).float()
    mine = to_bfloat16(x.clone())
    if not isinstance(mine, torch.Tensor):
        raise NotYet(f"to_bfloat16 should return a tensor, got {type(mine).__name__}")
    if mine.dtype != torch.float32:
        raise NotYet(f"return the rounded values as float32 (the bfloat16 value widened), not {mine.dtype}")
    if torch.equal(mine, x.half().float()):  # float16 overflows to inf above 65504, so compare before _compare
        raise NotYet("that is float16 (5 exponent bits, 10 mantissa bits; inf above 65504); bfloat16 keeps "
                     "float32's 8 exponent bits and 7 mantissa bits")
    bits = x.view(torch.int32)
    truncated = (bits & ~0xFFFF).view(torch.float32)
    half_up = ((bits + 0x8000) & ~0xFFFF).view(torch.float32)
    _compare(mine, expected, "to_bfloat16(x)",
             "keep the top 16 bits (sign, 8 exponent bits, 7 mantissa bits) after adding 0x7FFF plus the lowest kept "
             "bit, so that exact halves round to the even neighbour",
             mistakes=[(truncated, "dropping the low 16 bits rounds towards zero; round to the nearest instead"),
                       (half_up, "exact halves must round to the even neighbour (add 0x7FFF + the lowest kept bit), "
                        "not always up")],
             rtol=0, atol=0)
