"""The Gaussian diffusion process: its algebra, its losses and its likelihood bound.

`GaussianDiffusion` is not an `nn.Module` and owns no network: functions that need the denoiser
take it as an argument (`training_losses`, `bits_per_dim`); the rest take its output
(`p_mean_variance(model_output, x_t, t)`).

Respacing without a respaced copy: a reverse step goes from a timestep t to any earlier kept
timestep t_prev (t_prev = -1 means "x0", alpha_bar = 1). Every coefficient of that step is a
function of alpha_bar_t and alpha_bar_{t_prev} alone (`step_coefficients`), which is exactly the
step of guided-diffusion's `SpacedDiffusion`, while the model always receives the original t.

Shapes: data x0, x_t, noise are [N, ...] ([N, C, H, W] images in [-1, 1], or [N, D] points);
t, t_prev are int64 [N], 0-based. Schedules stay float64 numpy; coefficients are gathered in
float64 and cast to the data's device and dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from minildm import schedules
from minildm.progress import progress as progress_bar

MEAN_TYPES = ("eps", "x0", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")
LOSS_TYPES = ("simple", "vlb", "hybrid")


class GaussianDiffusion:
    """Forward process q, reverse process p_theta, losses and bits/dim for a beta schedule.

    model_mean_type: what the network predicts, "eps" (Ho et al. 2020, Eq. 11), "x0", or "v"
        (v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0, Salimans & Ho 2022).
    model_var_type: "fixed_small" (posterior variance beta~_t), "fixed_large" (beta_t) — the two
        choices of Ho et al. 2020 Sec. 3.2 — or "learned_range" (Nichol & Dhariwal 2021, Eq. 15:
        the network outputs 2C channels, the last C interpolate log beta~_t … log beta_t).
    loss_type: "simple" (L_simple, Eq. 14), "vlb" (the bound, Eq. 5) or "hybrid"
        (L_simple + hybrid_lambda · L_vlb, Nichol & Dhariwal 2021 Eq. 16, lambda = 0.001).
    snr_gamma: > 0 weights the mean loss by Min-SNR-gamma (Hang et al. 2023): the x0-error weight
        min(SNR_t, gamma), i.e. min(SNR, gamma) / SNR on the eps error, / (SNR + 1) on the v error; 0 = off.
    """

    def __init__(self, betas, model_mean_type: str = "eps", model_var_type: str = "fixed_large",
                 loss_type: str = "simple", hybrid_lambda: float = 0.001, snr_gamma: float = 0.0):
        for value, valid, what in ((model_mean_type, MEAN_TYPES, "model_mean_type"),
                                   (model_var_type, VAR_TYPES, "model_var_type"),
                                   (loss_type, LOSS_TYPES, "loss_type")):
            if value not in valid:
                raise ValueError(f"unknown {what} {value!r}; valid values: {', '.join(valid)}")
        if model_var_type == "learned_range" and loss_type == "simple":
            raise ValueError("model_var_type='learned_range' needs loss_type='hybrid' or 'vlb': L_simple gives "
                             "the variance channels no training signal")
        self.betas = np.asarray(betas, dtype=np.float64)
        self.alpha_bar = schedules.alpha_bar(self.betas)  # validates the betas
        self.num_timesteps = len(self.betas)
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.hybrid_lambda = float(hybrid_lambda)
        if not snr_gamma >= 0:
            raise ValueError(f"snr_gamma={snr_gamma} must be >= 0 (0 turns Min-SNR weighting off; 5 is the paper's)")
        self.snr_gamma = float(snr_gamma)

    @classmethod
    def from_config(cls, config) -> GaussianDiffusion:
        """Build from a `config.DiffusionConfig` (beta_start/beta_end = 0.0 mean the schedule's defaults)."""
        betas = schedules.beta_schedule(config.beta_schedule, config.num_timesteps,
                                        beta_start=config.beta_start or None, beta_end=config.beta_end or None)
        return cls(betas, model_mean_type=config.model_mean_type, model_var_type=config.model_var_type,
                   loss_type=config.loss_type, hybrid_lambda=config.hybrid_lambda,
                   snr_gamma=config.snr_gamma)

    def __repr__(self) -> str:
        return (f"GaussianDiffusion(num_timesteps={self.num_timesteps}, model_mean_type={self.model_mean_type!r}, "
                f"model_var_type={self.model_var_type!r}, loss_type={self.loss_type!r})")

    # ------------------------------------------------------------------ coefficients

    def step_coefficients(self, t, t_prev=None, t_next=None) -> dict[str, np.ndarray]:
        """Float64 coefficients of the reverse step t -> t_prev, arrays [N].

        With a = alpha_bar_t, a' = alpha_bar_{t_prev} (1 if t_prev = -1), the step's beta is
        beta = 1 - a / a', the posterior q(x_{t_prev} | x_t, x0) has (Ho et al. 2020, Eq. 6-7)
        mean coef1 · x0 + coef2 · x_t, coef1 = beta sqrt(a') / (1 - a), coef2 = (1 - a') sqrt(1 - beta) / (1 - a),
        and variance beta~ = beta (1 - a') / (1 - a). beta~ = 0 when t_prev = -1, so its log is
        clipped there to the posterior variance of the step t_next -> t (guided-diffusion's
        `posterior_log_variance_clipped`; t_next defaults to t + 1, a respaced sampler passes the
        next kept timestep; with no later timestep, beta is used). t_prev defaults to t - 1.
        """
        t = _as_index(t)
        t_prev = t - 1 if t_prev is None else _as_index(t_prev, like=t, name="t_prev")
        t_next = t + 1 if t_next is None else _as_index(t_next, like=t, name="t_next")
        T = self.num_timesteps
        self._check_range(t)
        if (t_prev < -1).any() or (t_prev >= t).any():
            raise ValueError("t_prev must satisfy -1 <= t_prev < t (-1 means the step ends at x0); "
                             f"got t={t.tolist()}, t_prev={t_prev.tolist()}")
        last = t_prev == -1  # steps that end at x0
        if (last & (t_next <= t)).any():
            raise ValueError(f"t_next must be later than t; got t={t.tolist()}, t_next={t_next.tolist()}")
        a = self.alpha_bar[t]
        a_prev = np.where(last, 1.0, self.alpha_bar[np.maximum(t_prev, 0)])
        beta = 1.0 - a / a_prev
        posterior_variance = beta * (1.0 - a_prev) / (1.0 - a)
        # Posterior variance of the step t_next -> t: the clip value where beta~ = 0
        # (a one-step chain has no next step: fall back to the step's own beta).
        has_next = last & (t_next < T)
        a_next = self.alpha_bar[np.where(has_next, t_next, t)]
        next_variance = np.where(has_next, (1.0 - a_next / a) * (1.0 - a) / (1.0 - a_next), beta)
        log_clipped = np.log(np.where(last, next_variance, posterior_variance))
        return {
            "alpha_bar": a,
            "alpha_bar_prev": a_prev,
            "beta": beta,
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": log_clipped,
            "posterior_mean_coef1": beta * np.sqrt(a_prev) / (1.0 - a),
            "posterior_mean_coef2": (1.0 - a_prev) * np.sqrt(1.0 - beta) / (1.0 - a),
            # beta_t for fixed_large, except the step to x0 which uses beta~ of the next step (better decoder NLL)
            "fixed_large_variance": np.where(last, next_variance, beta),
        }

    def _alpha_bar(self, t, like: torch.Tensor) -> np.ndarray:
        """alpha_bar_t as a float64 numpy array [N] after checking t (shape [N] of `like`)."""
        t = _as_index(t, batch=like.shape[0])
        self._check_range(t)
        return self.alpha_bar[t]

    def _check_range(self, t: np.ndarray) -> None:
        if t.min() < 0 or t.max() >= self.num_timesteps:
            raise ValueError(f"t must lie in [0, {self.num_timesteps - 1}] (0-based: t = 0 is the first noising "
                             f"step); got min {t.min()}, max {t.max()}")

    # ------------------------------------------------------------------ forward process q

    def q_mean_variance(self, x0: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I) (Ho et al. 2020, Eq. 4).

        Returns (mean, variance, log_variance), each shaped like x0."""
        a = self._alpha_bar(t, x0)
        mean = _coef(np.sqrt(a), x0) * x0
        return mean, _coef(1.0 - a, x0).expand_as(x0), _coef(np.log(1.0 - a), x0).expand_as(x0)

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (Ho et al. 2020, Eq. 4); [N, ...]."""
        if noise is None:
            noise = torch.randn_like(x0)
        _check_same_shape(x0, noise, "x0", "noise")
        a = self._alpha_bar(t, x0)
        return _coef(np.sqrt(a), x0) * x0 + _coef(np.sqrt(1.0 - a), x0) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t, t_prev=None, *, t_next=None):
        """Posterior q(x_{t_prev} | x_t, x0), Ho et al. 2020 Eq. (6)-(7), for any earlier t_prev.

        Returns (mean, variance, log_variance_clipped), each shaped like x_t; see `step_coefficients`.
        """
        _check_same_shape(x0, x_t, "x0", "x_t")
        c = self.step_coefficients(_as_index(t, batch=x_t.shape[0]), t_prev, t_next)
        mean = _coef(c["posterior_mean_coef1"], x_t) * x0 + _coef(c["posterior_mean_coef2"], x_t) * x_t
        variance = _coef(c["posterior_variance"], x_t).expand_as(x_t)
        return mean, variance, _coef(c["posterior_log_variance_clipped"], x_t).expand_as(x_t)

    # ------------------------------------------------------------------ parameterisations

    def x0_from_eps(self, x_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) (Eq. 4 solved for x0)."""
        _check_same_shape(x_t, eps, "x_t", "eps")
        a = self._alpha_bar(t, x_t)
        return _coef(np.sqrt(1.0 / a), x_t) * x_t - _coef(np.sqrt(1.0 / a - 1.0), x_t) * eps

    def eps_from_x0(self, x_t: torch.Tensor, t, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t / sqrt(alpha_bar) - x0) / sqrt(1 / alpha_bar - 1) (inverse of `x0_from_eps`)."""
        _check_same_shape(x_t, x0, "x_t", "x0")
        a = self._alpha_bar(t, x_t)
        return (_coef(np.sqrt(1.0 / a), x_t) * x_t - x0) / _coef(np.sqrt(1.0 / a - 1.0), x_t)

    def velocity(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """v = sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022, Sec. 4)."""
        _check_same_shape(x0, noise, "x0", "noise")
        a = self._alpha_bar(t, x0)
        return _coef(np.sqrt(a), x0) * noise - _coef(np.sqrt(1.0 - a), x0) * x0

    def x0_from_v(self, x_t: torch.Tensor, t, v: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v."""
        _check_same_shape(x_t, v, "x_t", "v")
        a = self._alpha_bar(t, x_t)
        return _coef(np.sqrt(a), x_t) * x_t - _coef(np.sqrt(1.0 - a), x_t) * v

    def eps_from_v(self, x_t: torch.Tensor, t, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v."""
        _check_same_shape(x_t, v, "x_t", "v")
        a = self._alpha_bar(t, x_t)
        return _coef(np.sqrt(1.0 - a), x_t) * x_t + _coef(np.sqrt(a), x_t) * v

    # ------------------------------------------------------------------ reverse process p

    def split_model_output(self, model_output: torch.Tensor, x_t: torch.Tensor):
        """(mean part, variance part or None) of a network output; learned_range needs 2C channels."""
        if self.model_var_type == "learned_range":
            expected = (x_t.shape[0], 2 * x_t.shape[1], *x_t.shape[2:])
            if tuple(model_output.shape) != expected:
                raise ValueError(f"model_output has shape {tuple(model_output.shape)} but model_var_type="
                                 f"'learned_range' needs {expected} (twice the channels of x_t: mean and variance "
                                 "parts); build the network with learn_sigma=True or use a fixed variance type")
            mean_part, var_part = model_output.chunk(2, dim=1)
            return mean_part, var_part
        if model_output.shape != x_t.shape:
            hint = (" (twice the channels: was the network built with learn_sigma=True? then use "
                    "model_var_type='learned_range')") if model_output.shape[1:2] == (2 * x_t.shape[1],) else ""
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but x_t has {tuple(x_t.shape)}; "
                             f"model_var_type={self.model_var_type!r} needs them equal{hint}")
        return model_output, None

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t, t_prev=None,
                        clip_denoised: bool = True, *, t_next=None) -> dict[str, torch.Tensor]:
        """p_theta(x_{t_prev} | x_t) from the network output at (x_t, t).

        The mean is the posterior mean at the predicted x0 (Ho et al. 2020, Eq. 7 with x0 -> pred_x0,
        equivalently Eq. 11 for eps); the variance is fixed (Sec. 3.2) or learned
        (Nichol & Dhariwal 2021, Eq. 15: exp(v log beta + (1 - v) log beta~), v = (out + 1) / 2).
        clip_denoised clamps pred_x0 to [-1, 1] before it is used. Returns dict(mean, variance,
        log_variance, pred_x0, pred_eps), each shaped like x_t; pred_eps is the eps consistent with
        the (clipped) pred_x0, as DDIM needs it (the eps output itself when nothing was clipped).
        """
        mean_part, var_part = self.split_model_output(model_output, x_t)
        t_idx = _as_index(t, batch=x_t.shape[0])
        c = self.step_coefficients(t_idx, t_prev, t_next)
        if self.model_var_type == "fixed_small":
            variance = _coef(c["posterior_variance"], x_t).expand_as(x_t)
            log_variance = _coef(c["posterior_log_variance_clipped"], x_t).expand_as(x_t)
        elif self.model_var_type == "fixed_large":
            variance = _coef(c["fixed_large_variance"], x_t).expand_as(x_t)
            log_variance = _coef(np.log(c["fixed_large_variance"]), x_t).expand_as(x_t)
        else:
            min_log = _coef(c["posterior_log_variance_clipped"], x_t)
            max_log = _coef(np.log(c["beta"]), x_t)
            frac = (var_part + 1) / 2  # the network's [-1, 1] spans [beta~, beta]
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)

        if self.model_mean_type == "eps":
            pred_x0 = self.x0_from_eps(x_t, t_idx, mean_part)
        elif self.model_mean_type == "x0":
            pred_x0 = mean_part
        else:
            pred_x0 = self.x0_from_v(x_t, t_idx, mean_part)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean = _coef(c["posterior_mean_coef1"], x_t) * pred_x0 + _coef(c["posterior_mean_coef2"], x_t) * x_t
        if self.model_mean_type == "eps" and not clip_denoised:
            pred_eps = mean_part  # identical in exact arithmetic, and free of the 1/sqrt(1 - alpha_bar) rounding
        else:
            pred_eps = self.eps_from_x0(x_t, t_idx, pred_x0)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_x0": pred_x0,
                "pred_eps": pred_eps}

    # ------------------------------------------------------------------ the bound

    def vb_terms_bpd(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t, t_prev=None,
                     clip_denoised: bool = True, *, t_next=None) -> torch.Tensor:
        """One term of the variational bound (Ho et al. 2020, Eq. 5), in bits per dimension, [N].

        L_{t} = KL(q(x_{t_prev} | x_t, x0) || p_theta(x_{t_prev} | x_t)) for t_prev >= 0, and the
        decoder NLL L_0 = -log p_theta(x0 | x_t) of a discretised Gaussian (Eq. 13: 256 bins over
        [-1, 1]) for the step to x0 (t_prev = -1).
        """
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t, t_prev, t_next=t_next)
        out = self.p_mean_variance(model_output, x_t, t, t_prev, clip_denoised, t_next=t_next)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x0, means=out["mean"], log_scales=0.5 * out["log_variance"])) / math.log(2.0)
        t_idx = _as_index(t, batch=x_t.shape[0])
        last = (t_idx - 1 if t_prev is None else _as_index(t_prev, like=t_idx, name="t_prev")) == -1
        return torch.where(torch.as_tensor(last, device=kl.device), decoder_nll, kl)

    def prior_bpd(self, x0: torch.Tensor, t=None) -> torch.Tensor:
        """L_T = KL(q(x_T | x0) || N(0, I)) in bits per dimension, [N] (Ho et al. 2020, Eq. 5); t defaults to T-1."""
        if t is None:
            t = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(mean))) / math.log(2.0)

    # ------------------------------------------------------------------ training

    def training_losses(self, model: Callable, x0: torch.Tensor, t, noise: torch.Tensor | None = None,
                        model_kwargs: dict | None = None, *, timesteps: Sequence[int] | None = None,
                        with_vb: bool = True) -> dict:
        """Per-example losses at timesteps t, dict(loss, mse, vb), each [N].

        mse: mean squared error of the mean part against its target (eps, x0 or v) — L_simple, Eq. 14
        (times `snr_weight` when snr_gamma > 0).
        vb: the bound term L_t in bits (`vb_terms_bpd`, clip_denoised=False) with the mean part detached
        for "simple"/"hybrid" (Nichol & Dhariwal 2021, Sec. 3.1: L_vlb only trains the variance there).
        loss: "simple" -> mse; "vlb" -> S · vb; "hybrid" -> mse + hybrid_lambda · S · vb, where S is the
        number of steps of the chain (S · L_t estimates the whole sum L_vlb). For S = 1000 this is
        guided-diffusion's hybrid loss; for other S it is its RESCALED_MSE (vb · S / 1000).
        timesteps: the kept timesteps of a respaced chain (S = len(timesteps)); t must be among them and
        each step goes to the previous kept timestep. Default: all T steps.
        with_vb=False skips the bound term when the loss does not use it (loss_type "simple": the training
        loop's setting, a third of a small UNet's step on a CPU); the dict then has no "vb".
        """
        model_kwargs = model_kwargs or {}
        t_idx = _as_index(t, batch=x0.shape[0])
        t_prev, t_next, num_steps = self._neighbours(t_idx, timesteps)
        if noise is None:
            noise = torch.randn_like(x0)
        t_model = torch.as_tensor(t_idx, device=x0.device)
        x_t = self.q_sample(x0, t_model, noise)
        model_output = model(x_t, t_model, **model_kwargs)
        mean_part, var_part = self.split_model_output(model_output, x_t)
        target = {"eps": noise, "x0": x0, "v": None}[self.model_mean_type]
        if target is None:
            target = self.velocity(x0, t_model, noise)
        mse = mean_flat((target - mean_part) ** 2)
        if self.snr_gamma > 0:
            mse = mse * self.snr_weight(t_idx, like=mse)
        if not with_vb and self.loss_type == "simple":
            return {"loss": mse, "mse": mse}

        if self.loss_type == "vlb":
            vb_output = model_output
        else:  # the bound trains only the variance: freeze the mean part
            frozen = mean_part.detach()
            vb_output = frozen if var_part is None else torch.cat([frozen, var_part], dim=1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and (self.loss_type != "simple")):
            vb = self.vb_terms_bpd(vb_output, x0, x_t, t_idx, t_prev, clip_denoised=False, t_next=t_next)
        if self.loss_type == "simple":
            loss = mse
        elif self.loss_type == "vlb":
            loss = num_steps * vb
        else:
            loss = mse + self.hybrid_lambda * num_steps * vb
        return {"loss": loss, "mse": mse, "vb": vb}

    def snr_weight(self, t, like: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weights [N] of the mean loss at t for this mean type (Hang et al. 2023, Eq. 9)."""
        alpha_bar = self.alpha_bar[_as_index(t)]
        snr = alpha_bar / (1 - alpha_bar)
        clipped = np.minimum(snr, self.snr_gamma)
        weight = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[self.model_mean_type]
        return _coef(weight, like).reshape(-1)

    @torch.no_grad()
    def bits_per_dim(self, model: Callable, x0: torch.Tensor, *, clip_denoised: bool = True,
                     model_kwargs: dict | None = None, timesteps: Sequence[int] | None = None,
                     generator: torch.Generator | None = None, progress: bool = False) -> dict:
        """The full variational bound -log p(x0) <= L_T + sum_t L_t + L_0 in bits/dim (Ho et al. 2020, Eq. 5).

        Like guided-diffusion's `calc_bpd_loop`: one model call per timestep, each on a fresh
        x_t ~ q(x_t | x0). Returns dict(total_bpd [N], prior_bpd [N], vb [N, S], mse [N, S] (eps),
        xstart_mse [N, S]), columns in ascending timestep order. timesteps (default all T) evaluates
        the bound of the S-step chain through the kept timesteps instead — the exact bound of that
        shorter generative model (the network used with respaced steps), not an estimate of the T-step one.
        Data must be on the 256-level grid of [-1, 1] for the decoder term to be a likelihood.
        """
        model_kwargs = model_kwargs or {}
        kept = schedules._check_timesteps(range(self.num_timesteps) if timesteps is None else timesteps,
                                          self.num_timesteps)
        n = x0.shape[0]
        vb, mse, xstart_mse = [], [], []
        for i in progress_bar(range(len(kept) - 1, -1, -1), disable=not progress, desc="bits/dim"):
            # the step kept[i] -> kept[i-1] (-1: to x0); kept[i+1] only sets the clip of the last step's log-variance
            t = torch.full((n,), int(kept[i]), dtype=torch.long, device=x0.device)
            t_prev = np.full(n, kept[i - 1] if i > 0 else -1)
            t_next = np.full(n, kept[i + 1] if i + 1 < len(kept) else kept[i] + 1)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = self.q_sample(x0, t, noise)
            model_output = model(x_t, t, **model_kwargs)
            out = self.p_mean_variance(model_output, x_t, t, t_prev, clip_denoised, t_next=t_next)
            vb.append(self.vb_terms_bpd(model_output, x0, x_t, t, t_prev, clip_denoised, t_next=t_next))
            xstart_mse.append(mean_flat((out["pred_x0"] - x0) ** 2))
            mse.append(mean_flat((out["pred_eps"] - noise) ** 2))
        vb, mse, xstart_mse = (torch.stack(v[::-1], dim=1) for v in (vb, mse, xstart_mse))
        prior = self.prior_bpd(x0, torch.full((n,), int(kept[-1]), dtype=torch.long))
        return {"total_bpd": vb.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb, "mse": mse, "xstart_mse": xstart_mse}

    def _neighbours(self, t: np.ndarray, timesteps):
        """(t_prev, t_next, number of steps) of each t in a kept-timestep list, found by lookup."""
        if timesteps is None:
            self._check_range(t)
            return t - 1, t + 1, self.num_timesteps
        kept = schedules._check_timesteps(timesteps, self.num_timesteps)
        if len(kept) < 2:
            raise ValueError("a respaced chain needs at least 2 kept timesteps")
        pos = np.searchsorted(kept, t)
        if (pos >= len(kept)).any() or (kept[np.minimum(pos, len(kept) - 1)] != t).any():
            raise ValueError(f"every t must be one of the kept timesteps; got t={t.tolist()}, "
                             f"which are not all in timesteps (len {len(kept)})")
        t_prev = np.where(pos > 0, kept[np.maximum(pos - 1, 0)], -1)
        t_next = kept[np.minimum(pos + 1, len(kept) - 1)]
        return t_prev, t_next, len(kept)


# ---------------------------------------------------------------------- helpers


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: [N, ...] -> [N]."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast approximation of the standard normal CDF (tanh form, as in DDPM's and guided-diffusion's code)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor):
    """log p(x) of data on a 256-level grid of [-1, 1] under N(means, exp(log_scales)²) integrated over each
    bin (Ho et al. 2020, Eq. 13); the edge bins extend to -inf / +inf. Elementwise, in nats."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _coef(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """Float64 per-example coefficients [N] -> [N, 1, ...] on like's device, in like's dtype."""
    values = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
    return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


def _as_index(t, like: np.ndarray | None = None, batch: int | None = None, name: str = "t") -> np.ndarray:
    """Timesteps (int, list, numpy or int tensor) as an int64 numpy array [N], checked against a batch size."""
    if isinstance(t, torch.Tensor):
        if t.is_floating_point():
            raise ValueError(f"{name} must hold integer timesteps (int64), got {t.dtype}")
        t = t.detach().cpu().numpy()
    t = np.asarray(t)
    if t.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer timesteps (int64), got dtype {t.dtype}")
    size = len(like) if like is not None else batch
    if t.ndim == 0:  # one timestep for the whole batch
        return np.full(1 if size is None else size, t, dtype=np.int64)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N] (one timestep per example), got shape {t.shape}")
    if size is not None and len(t) != size:
        raise ValueError(f"{name} has {len(t)} entries but the batch has {size}; pass one timestep per example")
    return t.astype(np.int64)


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
