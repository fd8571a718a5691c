"""The training loop: plain PyTorch, no framework. One function, `train`, used by the CLI and notebooks.

    >>> from minildm import presets, train
    >>> config = presets.get("toy-2d")
    >>> losses = []
    >>> model, ema = train.train(config, max_steps=500, callback=lambda step, loss: losses.append(loss))

One step (DDPM Algorithm 1, with the usual engineering):
    x0, y   <- batch `step` of a shuffle fixed by (seed, step)       deterministic data order
    t, noise <- drawn from a generator seeded by (seed, step)        t ~ U{0..T-1}, noise ~ N(0, I)
    loss    <- objective(model, x0, y, t, noise).mean()              what the model learns:
               `diffusion_objective`: diffusion.training_losses      L_simple / L_hybrid / L_vlb
               `noisy_classifier_objective`: CE(classifier(x_t, t), y)  ADM's noise-aware classifier
               `metrics.evaluator_objective`: CE(net(x0), y) + outliers  the shapes evaluator (`train(model=...)`)
               `AutoencoderObjective`: L1 + perceptual + KL/codebook + GAN  LDM's first stage
    AdamW step with linear warmup (then constant or cosine), gradient-norm clipping, mixed precision
               (train.precision: bf16 autocast on CUDA or CPU, fp16 + GradScaler on CUDA)
    adversary step (only for an objective with an `adversary`, e.g. the autoencoder's discriminator):
               its own AdamW on objective.adversary_loss(), same learning rate; saved as a named module
    ema     <- d * ema + (1 - d) * model, d = min(decay, (1+k)/(10+k))  the weights that are sampled

Exact resume: every random draw of a step (its batch, t, noise, dropout masks, random flips)
is a function of (seed, step, rank) (flips only with data.num_workers=0, the default: worker processes
draw their own), so a checkpoint needs only weights, EMA, optimizer, scaler
and step to continue bit for bit. Multi-GPU: run the same command under
`torchrun --nproc_per_node N`; each process takes every N-th sample of the global batch
`train.batch_size` and DistributedDataParallel averages the gradients.

Scale features (each tested on the CPU, tests/test_scale.py): `train.grad_accum = k` splits each process's share
into k micro-batches whose gradients add up to the whole batch's (DDP syncs on the last one only: `no_sync`);
`unet.use_checkpoint` recomputes each ResBlock / attention block in backward (same gradients, fewer saved
activations: `minildm.memory.estimate`); `train.compile` runs the network through `torch.compile`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import minildm
from minildm import checkpoints
from minildm import config as config_lib
from minildm.progress import progress

CHECKPOINT = "checkpoint.safetensors"


# ---------------------------------------------------------------------------------------------
# Objectives: what one step minimises. objective(model, x0, y, t, noise) -> per-example losses [N];
# model(x, *args, **kwargs) is the network (autocast applied; a denoiser is called as model(x_t, t, ...)),
# x0 [N, ...], y int64 [N] or None, t int64 [N], noise like x0. An objective may ignore t and noise (the shapes
# evaluator's, `metrics.evaluator_objective`); its own random draws use the global RNG, seeded every step.


def diffusion_objective(diffusion):
    """The denoiser's loss, `diffusion.training_losses(...)["loss"]` (L_simple / L_hybrid / L_vlb), [N].

    y (if given) reaches the model as model_kwargs {"y": y}. The bound term is skipped when the loss
    does not use it (with_vb=False: a third of a small UNet's step on a CPU).
    """
    def objective(model, x0, y, t, noise):
        model_kwargs = None if y is None else {"y": y}
        return diffusion.training_losses(model, x0, t, noise=noise, model_kwargs=model_kwargs, with_vb=False)["loss"]

    return objective


def noisy_classifier_objective(diffusion):
    """ADM's classifier loss (scripts/classifier_train.py, `noised=True`): -log p_phi(y | x_t, t), [N].

    x_t = q_sample(x0, t, noise) at the step's uniformly drawn t, so the classifier learns every noise
    level that guidance will ask it about.
    """
    def objective(model, x0, y, t, noise):
        if y is None:
            raise ValueError("the noise-aware classifier trains on labelled data: give (image, label) examples")
        return torch.nn.functional.cross_entropy(model(diffusion.q_sample(x0, t, noise), t), y, reduction="none")

    return objective


class AutoencoderObjective:
    """LDM's first-stage training (`AutoencoderKL` / `VQModel.training_step`): an adversarial objective.

    Calling it gives the autoencoder's loss (reconstruction + perceptual + KL or codebook + adaptive GAN term,
    `minildm.autoencoder_loss.AutoencoderLoss.generator_loss`), [N]; `adversary_loss()` then gives its
    PatchGAN discriminator's hinge loss on the same images and reconstructions (detached), which the loop
    minimises with a second optimiser. The loop calls `begin_step(step)` first (the discriminator joins at
    autoencoder_loss.disc_start) and saves `adversary` in checkpoints as "discriminator".
    """

    adversary_name = "discriminator"

    def __init__(self, config, autoencoder):
        from minildm.autoencoder_loss import AutoencoderLoss

        self.kind = config.autoencoder.kind
        self.loss = AutoencoderLoss(config.autoencoder_loss, self.kind, config.autoencoder.out_channels).train()
        self.adversary = self.loss.discriminator
        self.autoencoder = checkpoints._unwrap(autoencoder)  # its decoder's last layer sets the GAN weight
        self.step, self.log, self._last = 0, {}, None
        # VQ: how many codes one epoch of training chose (dead codes get no gradient); logged once per epoch of
        # data.num_samples images, counted afresh after a resume
        self.epoch_images, self.seen, self.usage = config.data.num_samples, 0, {}
        self.counts = torch.zeros(config.autoencoder.n_embed, dtype=torch.int64)

    def begin_step(self, step: int) -> None:
        self.step = step

    def to(self, device) -> AutoencoderObjective:
        """Move the loss's networks (discriminator, perceptual net, logvar) to the autoencoder's device."""
        self.loss.to(device)
        return self

    def __call__(self, model, x0, y, t, noise):
        if self.kind == "kl":
            reconstruction, regulariser = model(x0)  # decodes a sample of q(z | x0)
        else:
            reconstruction, regulariser, indices = model(x0)  # the codebook loss, the chosen codes
            self._count_codes(indices, len(x0))
        self._last = (x0, reconstruction.detach())
        losses, log = self.loss.generator_loss(x0, reconstruction, regulariser, self.step,
                                               last_layer=self.autoencoder.last_layer)
        self.log = {**log, **self.usage}
        return losses

    def _count_codes(self, indices, images: int) -> None:
        self.counts += torch.bincount(indices.detach().cpu(), minlength=len(self.counts))
        self.seen += images
        if self.seen >= self.epoch_images:
            used = int((self.counts > 0).sum())
            self.usage = {"codes_used_epoch": used, "dead_codes_epoch": len(self.counts) - used}
            self.counts.zero_()
            self.seen = 0

    def final_extra(self, autoencoder, dataset) -> dict:
        """Stored with the last checkpoint: the latent scale factor, 1 / std of the latents of (up to) the first
        2,000 training images (`autoencoder.stored_scale_factor`; LDM's scale_by_std uses one batch)."""
        from minildm import autoencoder as autoencoder_lib

        images = torch.stack([dataset[i][0] for i in range(min(2000, len(dataset)))])
        return {"scale_factor": autoencoder_lib.stored_scale_factor(autoencoder.eval(), images)}

    def adversary_loss(self) -> torch.Tensor | None:
        """The discriminator's loss on this step's images, or None before disc_start (no step to take)."""
        if self.loss.disc_factor_at(self.step) == 0:
            return None
        x0, reconstruction = self._last
        loss, log = self.loss.discriminator_loss(x0, reconstruction, self.step)
        self.log.update(log)
        return loss


def default_objective(config, diffusion, model=None):
    """The objective of `config.model`: the noisy-classifier loss for "classifier", LDM's first-stage loss for
    "autoencoder" (needs the `model`), else the diffusion loss."""
    if config.model == "classifier":
        return noisy_classifier_objective(diffusion)
    if config.model == "autoencoder":
        return AutoencoderObjective(config, model)
    return diffusion_objective(diffusion)


def micro_batch_size(batch_size: int, grad_accum: int = 1, world_size: int = 1) -> int:
    """Examples in one forward/backward of one process: batch_size / (grad_accum * world_size), which must divide.

    The optimizer steps once per global batch of `batch_size` examples, whatever the split, so the recipe (lr,
    warm-up, EMA) does not change with the number of GPUs or accumulation steps.
    """
    if batch_size % (grad_accum * world_size):
        raise config_lib.ConfigError(
            f"train.batch_size={batch_size} is not divisible by train.grad_accum={grad_accum} x {world_size} "
            f"process(es) = {grad_accum * world_size}: each micro-batch must hold the same number of examples; pick "
            "a batch size that is a multiple of it, or another train.grad_accum")
    return batch_size // (grad_accum * world_size)


class Trained(NamedTuple):
    """What `train` returns: the trained network and its EMA copy (eval mode), unwrapped from DDP."""

    model: torch.nn.Module
    ema: torch.nn.Module


# ---------------------------------------------------------------------------------------------
# Small pieces of the loop, each usable (and tested) on its own


def learning_rate(train_config, step: int, total_steps: int | None = None) -> float:
    """The learning rate of step `step` (0-based) of a run of `total_steps` (default train.max_steps).

    Linear warm-up to `lr` over `warmup_steps` (DDPM's `get_warmed_up_lr`, 1-based), then
        constant:  lr                                                   (DDPM, ADM)
        cosine:    lr until step s, then lr_final + (lr - lr_final) (1 + cos(pi p)) / 2,
                   p = (step - s) / (total - s),  s = total - lr_decay_steps (or warmup_steps if 0)
    The cosine reaches `lr_final` at the last step (SGDR without restarts, Loshchilov & Hutter 2017);
    with `lr_decay_steps` it decays only at the end ("warm-up, stable, decay", Hu et al. 2024), so a
    constant-rate run can be resumed into its decay and still equal a run trained that way from the start.
    """
    cfg = train_config
    warm = 1.0 if cfg.warmup_steps <= 0 else min(1.0, (step + 1) / cfg.warmup_steps)
    if cfg.lr_schedule == "constant":
        return cfg.lr * warm
    if cfg.lr_schedule != "cosine":
        raise ValueError(f"train.lr_schedule={cfg.lr_schedule!r} is not a schedule; use 'constant' or 'cosine'")
    total = cfg.max_steps if total_steps is None else total_steps
    start = cfg.warmup_steps if cfg.lr_decay_steps <= 0 else max(cfg.warmup_steps, total - cfg.lr_decay_steps)
    if step < start:
        return cfg.lr * warm
    progress = min(1.0, (step - start) / max(1, total - start))
    return cfg.lr_final + (cfg.lr - cfg.lr_final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_decay(train_config, step: int) -> float:
    """The EMA decay used after step `step` (0-based): min(ema_decay, (1 + step) / (10 + step)) with warm-up.

    Without warm-up the average keeps decay^k of the random initial weights after k steps
    (0.999^2000 = 13.5%: speckled samples); the warm-up (TensorFlow's `num_updates`, LDM's LitEma)
    makes that share prod_k (1 + k) / (10 + k) < 1e-7 after 100 steps, and changes nothing once
    (1 + k) / (10 + k) > ema_decay (k > 9,000 for 0.999).
    """
    if not train_config.ema_warmup:
        return train_config.ema_decay
    return min(train_config.ema_decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema, model, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter; buffers are copied."""
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed for (seed, step, stream): stream 0 draws t and noise, 1 + rank drives dropout/flips."""
    value = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) % 2**64
    value ^= value >> 31
    return value % 2**63


class StepBatches(torch.utils.data.Sampler):
    """Indices of this process's share of the global batch of each step, from `start_step` on, forever.

    Epoch e visits `randperm(N)` drawn from `seed + e`; global batch k of an epoch is positions
    [k B, (k + 1) B) of it (incomplete batches dropped); process `rank` of `world_size` takes every
    `world_size`-th of those, so 1 process with batch B sees exactly what N processes see together.
    """

    def __init__(self, num_samples, global_batch, *, seed=0, start_step=0, rank=0, world_size=1, shuffle=True):
        if global_batch % world_size:
            raise ValueError(f"train.batch_size={global_batch} must be divisible by the number of processes "
                             f"({world_size})")
        if num_samples < global_batch:
            raise ValueError(f"the dataset has {num_samples} items, fewer than one batch of {global_batch}; "
                             "lower train.batch_size or raise data.num_samples")
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.start_step, self.rank, self.world_size, self.shuffle = start_step, rank, world_size, shuffle
        self.steps_per_epoch = num_samples // global_batch
        self._order = (None, None)

    def indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=generator) if self.shuffle else \
                torch.arange(self.num_samples)
            self._order = (epoch, order)
        batch = self._order[1][k * self.global_batch:(k + 1) * self.global_batch]
        return batch[self.rank::self.world_size].tolist()

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.indices(step)
            step += 1


@dataclass
class Distributed:
    """Where this process sits: rank among world_size, its device, and whether DDP is active."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    started_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device=None) -> Distributed:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; start the process group (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    return Distributed(rank, world_size, local_rank, device, started)


def _precision(config_precision: str, device: torch.device):
    """(autocast dtype or None, use GradScaler) for a `train.precision` setting.

    auto: bf16 on CUDA (fp16 on GPUs without bf16), fp32 elsewhere. bf16: autocast to bfloat16 on CUDA and on
    the CPU, no scaler (bf16 has fp32's exponent range). fp16: autocast to float16 with a GradScaler (loss
    scaling keeps small gradients from flushing to zero) on CUDA only; elsewhere a warning and fp32 (PyTorch's
    CPU fp16 kernels are partial and slow; use bf16 there). The weights, gradients and AdamW stay fp32.
    """
    if config_precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"train.precision={config_precision!r}; use auto, fp32, bf16 or fp16")
    if device.type != "cuda":
        if config_precision == "bf16" and device.type == "cpu":
            return torch.bfloat16, False
        if config_precision in ("bf16", "fp16"):
            hint = "; bf16 autocast runs on the CPU (train.precision=bf16)" if device.type == "cpu" else ""
            warnings.warn(f"train.precision={config_precision} needs CUDA; training in fp32 on {device}{hint}")
        return None, False
    if config_precision == "auto":
        config_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config_precision], config_precision == "fp16"


# ---------------------------------------------------------------------------------------------
# The loop


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint written before it is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped the run at a step boundary, after saving a checkpoint there."""


class RunLockedError(RuntimeError):
    """Another process is training into the same output folder."""


class RunLock:
    """One writer per run folder: an exclusive `flock` on `<out_dir>/.lock`, held for the whole run.

    The lock file names the process holding it; the operating system releases the lock when that
    process ends, however it ends (kill -9 included), so a stale lock never blocks a resume.
    """

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / ".lock"
        self.file = None

    def __enter__(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise RunLockedError(f"{self.path.parent} is in use by {holder}: two runs must not write one folder. "
                                 "Wait for that run to end (or stop it), or pass another --out / out_dir") from None
        file.seek(0)
        file.truncate()
        file.write(f"process {os.getpid()} on {os.uname().nodename}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        file.flush()
        self.file = file
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # closing releases the flock
            self.file = None


class StopOnSigint:
    """Turn the first Ctrl-C into a request to stop at the next step boundary (a second one stops at once).

    Only the main thread can install a signal handler; elsewhere Ctrl-C behaves as usual.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        if self.requested:  # the second Ctrl-C: no more waiting
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def train(config, *, dataset=None, model=None, resume=True, max_steps=None, callback=None, out_dir=None,
          device=None, verbose=True, objective=None) -> Trained:
    """Train `config`'s model (or `model`) on its data (or on `dataset`); returns `Trained(model, ema)`.

    objective: what a step minimises, objective(model, x0, y, t, noise) -> losses [N] (see the objectives
    above); default `default_objective(config, diffusion, model)`: a denoiser's diffusion loss, the noisy
    cross-entropy of a classifier (`config.model == "classifier"`, ADM's recipe) or LDM's first-stage loss
    (`config.model == "autoencoder"`). Optional parts of an objective: `begin_step(step)` (called before each
    step), `log` (a dict of its terms, written to log.jsonl), `final_extra(ema, dataset)` (a dict stored in the
    last checkpoint's metadata, e.g. the autoencoder's latent scale factor), and `adversary` (an nn.Module) with
    `adversary_loss()` (None: no adversary step this time): a second network trained after each step with its
    own optimiser (`adversary_name` names it in checkpoints).

    dataset: your own data instead of config.data's: a tensor of images [N, C, H, W] in [-1, 1], an
    (images, labels) pair, or any map-style dataset whose items are an image, (image, label) or
    {"image", "label"} (`data.as_dataset`); images must match config.unet's in_channels and image_size.

    model: an `nn.Module` to train (in place) instead of `minildm.build_model(config)`, e.g. a classifier of
    clean images with its own `objective`; config then gives the recipe (train.*, data.* unless `dataset`) and
    its network section is not consulted: examples are not checked against it (images only against [-1, 1]),
    and the dataset's labels, if it has any, reach the objective as y unchanged. Sampling during training
    (train.sample_every > 0) treats it as config's denoiser: keep 0 for any other network.

    resume: continue from `<out_dir>/checkpoint.safetensors` if it exists (False: start over).
    max_steps: total number of steps (overrides config.train.max_steps; a resumed run stops there too).
    callback: called on the main process after every step as callback(step, loss) (step counts from 1).
    out_dir: where checkpoints, sample grids, log.jsonl and config.json go (default config.train.out_dir);
    nothing is written when train.save_every and train.sample_every are both 0.

    Nothing lost: the run holds `<out_dir>/.lock` (a second run on the folder raises `RunLockedError`);
    a NaN or infinite loss raises `TrainingDiverged` naming the step, before the weights are saved;
    Ctrl-C saves a checkpoint at the end of the current step and raises `TrainingInterrupted`.
    """
    from minildm import data

    own_model = model is not None
    config_lib.validate(config, own_data=dataset is not None or own_model)
    if config.latent.first_stage and not own_model:
        raise config_lib.ConfigError(
            f"latent.first_stage={config.latent.first_stage!r}: a latent diffusion model trains on latents, as a "
            "whole model: build it with minildm.latent.build(config), encode the data with latent.training_data "
            "and pass both (train(config, dataset=..., model=...)); the course's shapes LDMs: python -m "
            "minildm.experiments.latent ship <preset>")
    cfg = config.train
    total_steps = cfg.max_steps if max_steps is None else max_steps
    if not isinstance(total_steps, int) or total_steps < 0:
        raise config_lib.ConfigError(f"max_steps={total_steps!r} must be an integer >= 0 (the total number of "
                                     "steps, counted from the run's start; 0 returns the initial weights)")
    out_dir = Path(out_dir if out_dir is not None else cfg.out_dir)
    env = setup_distributed(device)
    device = env.device
    writes = cfg.save_every > 0 or cfg.sample_every > 0
    guards = contextlib.ExitStack()
    try:
        if env.main and writes:
            guards.enter_context(RunLock(out_dir))
        stop = guards.enter_context(StopOnSigint())
        autocast_dtype, use_scaler = _precision(cfg.precision, device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

        # Model, EMA copy, process, optimizer: identical on every process (same seed; DDP also broadcasts).
        torch.manual_seed(cfg.seed)
        model = (model if own_model else minildm.build_model(config)).to(device)
        if device.type == "cuda" and cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        diffusion = minildm.build_diffusion(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                      weight_decay=cfg.weight_decay)
        scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        objective = default_objective(config, diffusion, model) if objective is None else objective
        # An adversarial objective (a GAN's discriminator) brings a second network with its own optimiser.
        if hasattr(objective, "to"):  # an objective with networks of its own (the autoencoder's loss)
            objective.to(device)
        adversary = getattr(objective, "adversary", None)
        extra_modules, extra_optimizers = {}, {}
        if adversary is not None:
            if env.world_size > 1:
                raise NotImplementedError("objectives with an adversary (the autoencoder's discriminator) train in "
                                          "one process; run without torchrun")
            if cfg.grad_accum > 1:
                raise config_lib.ConfigError(f"train.grad_accum={cfg.grad_accum}: an objective with an adversary "
                                             "(the autoencoder's discriminator) takes one batch per step; set "
                                             "train.grad_accum=1 and lower train.batch_size to fit memory")
            adversary.to(device).train()
            adversary_optimizer = torch.optim.AdamW(adversary.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                                    weight_decay=cfg.weight_decay)
            name = getattr(objective, "adversary_name", "adversary")
            extra_modules, extra_optimizers = {name: adversary}, {name: adversary_optimizer}

        step = 0
        checkpoint_path = out_dir / CHECKPOINT
        if resume and checkpoint_path.is_file():
            state = checkpoints.load_training_state(checkpoint_path, model, ema=ema, optimizer=optimizer,
                                                    scaler=scaler, modules=extra_modules,
                                                    optimizers=extra_optimizers)
            step = state["step"]
            if verbose and env.main:
                _note_config_changes(state["config"], config)
                print(f"resumed from {checkpoint_path} at step {step}")
        if env.main and writes:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.json").write_text(json.dumps(config_lib.to_dict(config), indent=2) + "\n")

        dataset = data.build_dataset(config.data, train=True) if dataset is None else data.as_dataset(dataset)
        classes, classes_key = _label_count(config)
        conditional = classes > 0
        if own_model:  # labels pass through as y when the data has them (an unlabelled item reads -1)
            label = dataset[0][1]
            conditional = (torch.is_tensor(label) and label.ndim > 0) or int(label) >= 0  # token ids [L] too
        check_examples(config, *dataset[0], conditional=conditional, own_model=own_model,
                       pixels=not getattr(model, "trains_on_latents", False))
        dataset_classes = getattr(dataset, "num_classes", None)
        if conditional and not own_model and dataset_classes is not None and dataset_classes > classes:
            raise ValueError(f"the dataset has {dataset_classes} classes but {classes_key}={classes}; "
                             f"set {classes_key}={dataset_classes}")
        sampler = StepBatches(len(dataset), cfg.batch_size, seed=cfg.seed, start_step=step, rank=env.rank,
                              world_size=env.world_size)
        micro = micro_batch_size(cfg.batch_size, cfg.grad_accum, env.world_size)
        # A private generator: creating the loader draws nothing from the global RNG.
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=config.data.num_workers,
                            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed),
                            persistent_workers=config.data.num_workers > 0)
        batches = iter(loader)

        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
            if env.world_size > 1 else model
        forward = torch.compile(ddp_model) if cfg.compile else ddp_model

        def network(x, *args, **kwargs):
            # Mixed precision covers the network only; the loss is computed in float32 (tensors of a tuple too).
            with torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
                output = forward(x, *args, **kwargs)
            if isinstance(output, tuple):
                return tuple(o.float() if torch.is_tensor(o) and o.is_floating_point() else o for o in output)
            return output.float()

        t_generator, noise_generator = torch.Generator(), torch.Generator(device)
        log_loss, log_count, log_time = torch.zeros((), device=device), 0, time.perf_counter()
        quiet = {} if env.main and verbose else {"disable": True}
        bar = progress(range(step, total_steps), initial=step, total=total_steps, desc="train", **quiet)
        ddp_model.train()
        for step in bar:
            # Every random draw of this step is a function of (seed, step, rank): exact resume, no RNG state.
            torch.manual_seed(step_seed(cfg.seed, step, 1 + env.rank))
            x0, y = next(batches)
            x0 = x0.to(device, non_blocking=True)
            if x0.ndim == 4 and device.type == "cuda" and cfg.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            # t and noise for the whole global batch, then this process's rows: 1 or N processes, same numbers.
            # (t is drawn on the CPU: the process indexes its float64 schedule with it, no device sync.)
            t_generator.manual_seed(step_seed(cfg.seed, step))
            noise_generator.manual_seed(step_seed(cfg.seed, step))
            t = torch.randint(0, diffusion.num_timesteps, (cfg.batch_size,), generator=t_generator)
            t = t[env.rank::env.world_size].to(device)
            noise = torch.randn((cfg.batch_size, *x0.shape[1:]), generator=noise_generator, device=device)
            noise = noise[env.rank::env.world_size]
            if conditional:
                if cfg.cond_dropout > 0:  # classifier-free guidance: some conditions become the null one
                    drop = torch.rand(cfg.batch_size, generator=t_generator)[env.rank::env.world_size]
                    null = model.null(len(y)) if hasattr(model, "null") else torch.tensor(config.unet.num_classes)
                    y = torch.where((drop < cfg.cond_dropout).view(-1, *[1] * (y.ndim - 1)), null.to(y), y)
                y = y.to(device)
            else:
                y = None

            lr = learning_rate(cfg, step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if hasattr(objective, "begin_step"):
                objective.begin_step(step)
            optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=device)
            # Gradient accumulation: grad_accum micro-batches of this process's rows, each loss divided by
            # grad_accum, so the summed gradient is the whole batch's mean; DDP all-reduces on the last one only.
            for k in range(cfg.grad_accum):
                rows = slice(k * micro, (k + 1) * micro)
                last = k == cfg.grad_accum - 1
                with contextlib.nullcontext() if last or env.world_size == 1 else ddp_model.no_sync():
                    part = objective(network, x0[rows], None if y is None else y[rows], t[rows], noise[rows]).mean()
                    if not torch.isfinite(part):
                        raise TrainingDiverged(
                            f"the loss is {part.item()} at step {step + 1}: the run diverged and stops here, before "
                            f"the weights are updated or saved (the checkpoint in {out_dir}, if any, is the last good "
                            "one). Resume from it with a lower train.lr, a train.grad_clip or more train.warmup_steps")
                    scaler.scale(part / cfg.grad_accum).backward()
                loss += part.detach() / cfg.grad_accum
            scaler.unscale_(optimizer)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            adversary_loss = objective.adversary_loss() if adversary is not None else None
            if adversary_loss is not None:  # the discriminator's step, on this step's images and reconstructions
                adversary_loss = adversary_loss.mean()
                if not torch.isfinite(adversary_loss):
                    raise TrainingDiverged(f"the {name}'s loss is {adversary_loss.item()} at step {step + 1}; "
                                           "resume from the last checkpoint with a lower train.lr")
                for group in adversary_optimizer.param_groups:
                    group["lr"] = lr
                adversary_optimizer.zero_grad(set_to_none=True)
                adversary_loss.backward()
                adversary_optimizer.step()
            update_ema(ema, model, ema_decay(cfg, step))
            done = step + 1

            log_loss += loss.detach()
            log_count += 1
            if callback is not None and env.main:
                callback(done, loss.item())
            if cfg.log_every > 0 and (done % cfg.log_every == 0 or done == total_steps):
                if env.world_size > 1:
                    dist.all_reduce(log_loss)
                    log_loss /= env.world_size
                record = {"step": done, "loss": log_loss.item() / log_count, "lr": optimizer.param_groups[0]["lr"],
                          "steps_per_s": log_count / (time.perf_counter() - log_time),
                          **getattr(objective, "log", {})}  # an objective's own terms, of the last step
                if env.main:
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                    if writes:
                        with open(out_dir / "log.jsonl", "a") as file:
                            file.write(json.dumps(record) + "\n")
                log_loss.zero_()
                log_count, log_time = 0, time.perf_counter()
            if env.main and cfg.sample_every > 0 and done % cfg.sample_every == 0:
                save_samples(ema, diffusion, config, out_dir / "samples" / f"step_{done:07d}.png", seed=cfg.seed)
            if cfg.save_every > 0 and (done % cfg.save_every == 0 or done == total_steps or stop.requested):
                if env.main:
                    extra = {"world_size": env.world_size}
                    if hasattr(model, "checkpoint_metadata"):  # what rebuilds it (latent diffusion's first stage)
                        extra.update(model.checkpoint_metadata())
                    if done == total_steps and hasattr(objective, "final_extra"):  # e.g. the latent scale factor
                        extra.update(objective.final_extra(ema, dataset))
                    try:  # save refuses non-finite weights: the last good checkpoint stays
                        checkpoints.save(checkpoint_path, model, config, ema=ema, optimizer=optimizer,
                                         scaler=scaler, step=done, extra=extra,
                                         modules=extra_modules, optimizers=extra_optimizers)
                    except checkpoints.NonFiniteWeightsError as error:
                        raise TrainingDiverged(f"after step {done}: {error}") from None
                if env.world_size > 1:
                    dist.barrier()
            if stop.requested:
                saved = f"saved step {done} to {checkpoint_path}; continue with --resume" if cfg.save_every > 0 \
                    else f"stopped after step {done}; nothing saved (train.save_every=0)"
                raise TrainingInterrupted(f"interrupted: {saved}")
        model.eval()
        return Trained(model, ema)
    finally:
        guards.close()
        if env.started_here:
            dist.destroy_process_group()


def _label_count(config) -> tuple[int, str]:
    """(number of classes the model takes as labels, the config key that sets it); 0 for unlabelled models."""
    if config.model == "unet":
        return config.unet.num_classes, "unet.num_classes"
    if config.model == "classifier":
        return config.classifier.out_channels, "classifier.out_channels"
    return 0, ""


def check_examples(config, example: torch.Tensor, label=None, *, conditional: bool = False,
                   own_model: bool = False, pixels: bool = True) -> None:
    """Reject data the model cannot train on, with what to change: shape, range [-1, 1], labels.

    own_model: the network is not config's (`train(model=...)`): only images ([C, H, W]) are checked, for the
    range [-1, 1] (not when pixels=False: a latent diffusion model trains on latents of unit variance); shape
    and labels are the network's and its objective's business.
    """
    if own_model:
        if example.ndim == 3 and pixels:
            _check_range(example)
        return
    if config.model in ("unet", "classifier", "autoencoder"):
        net = getattr(config, config.model)
        expected = (net.in_channels, net.image_size, net.image_size)
        what = f"{config.model}.in_channels={net.in_channels}, {config.model}.image_size={net.image_size}"
    else:
        expected, what = (config.mlp.data_dim,), f"mlp.data_dim={config.mlp.data_dim}"
    if tuple(example.shape) != expected:
        raise ValueError(f"examples have shape {list(example.shape)} but the model expects {list(expected)} "
                         f"({what}); resize the data or set those config values")
    if config.model != "mlp":
        _check_range(example)
    if conditional:
        classes, key = _label_count(config)
        label = int(label) if label is not None else -1
        if not 0 <= label < classes:
            undo = "or set unet.num_classes=0" if config.model == "unet" else "(a classifier needs labelled data)"
            raise ValueError(f"the model takes labels ({key}={classes}) but the first example's label is {label}; "
                             f"give labels in [0, {classes}) {undo}")


def _check_range(image: torch.Tensor) -> None:
    low, high = image.min().item(), image.max().item()
    if low < -1.001 or high > 1.001:
        hint = " (looks like [0, 255]: use x / 127.5 - 1)" if high > 2 else " (for [0, 1] data use 2 x - 1)"
        raise ValueError(f"images must be in [-1, 1]; the first example spans [{low:.3g}, {high:.3g}]{hint}")


def _note_config_changes(saved: dict, config) -> None:
    """Print the settings that differ from the checkpoint's (allowed: e.g. a longer max_steps)."""
    current = config_lib.to_dict(config)
    changes = [f"{section}.{key}: {saved.get(section, {}).get(key, '(not set)')!r} -> {value!r}"
               for section, fields in current.items() if isinstance(fields, dict)
               for key, value in fields.items() if saved.get(section, {}).get(key) != value]
    if changes:
        print("config changed since the checkpoint: " + "; ".join(changes))


# ---------------------------------------------------------------------------------------------
# Sample grids


@torch.no_grad()
def generate(model, diffusion, config, num: int, *, sampler="ddim", steps=25, eta=0.0, seed=0, y=None,
             device=None, progress_bar=False, batch_size=None, guidance_scale=1.0, classifier=None,
             classifier_scale=0.0) -> torch.Tensor:
    """`num` samples of `model` with a respaced DDIM (or DDPM) schedule of `steps` steps; [num, C, H, W] or [num, 2].

    y: class labels [num] for class-conditional models, or the classes `classifier` guides towards
    (default: 0, 1, 2, ... cycling over the classes).
    batch_size: sample in chunks of this many (one generator runs through all chunks); None = all at once.
    guidance_scale: classifier-free guidance w of a class-conditional model trained with a null class
    (1 = none, `guidance.classifier_free`).
    classifier, classifier_scale: classifier guidance with scale s (0 = none, `guidance.classifier_gradient`):
    on the mean for sampler="ddpm", on eps for "ddim"; works with unconditional and conditional models.
    """
    from minildm import guidance, sampling, schedules

    device = torch.device(device) if device is not None else next(model.parameters()).device
    if config.model == "unet":
        shape = (num, config.unet.in_channels, config.unet.image_size, config.unet.image_size)
    else:
        shape = (num, config.mlp.data_dim)
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"unknown sampler {sampler!r}; use ddim or ddpm")
    model, cond_fn, classes = guidance.guided_model(model, config, guidance_scale=guidance_scale, classifier=classifier,
                                                    classifier_scale=classifier_scale, device=device)
    labels = None
    if classes > 0:
        labels = torch.as_tensor(torch.arange(num) % classes if y is None else y, device=device)
        if labels.shape != (num,):
            raise ValueError(f"y must hold one label per sample ([{num}]), got shape {tuple(labels.shape)}")
    timesteps = schedules.space_timesteps(diffusion.num_timesteps, str(min(steps, diffusion.num_timesteps)))
    generator = torch.Generator(device).manual_seed(seed)
    chunks = []
    for start in range(0, num, batch_size or num):
        size = min(batch_size or num, num - start)
        x_T = torch.randn((size, *shape[1:]), generator=generator, device=device)
        kwargs = dict(clip_denoised=config.sample.clip_denoised and config.model == "unet", generator=generator,
                      model_kwargs=None if labels is None else {"y": labels[start:start + size]},
                      progress=progress_bar, cond_fn=cond_fn)
        if sampler == "ddim":
            chunks.append(sampling.ddim_sample(model, diffusion, x_T, timesteps, eta=eta, **kwargs))
        else:
            chunks.append(sampling.ddpm_sample(model, diffusion, x_T, timesteps, **kwargs))
    return torch.cat(chunks)


def save_grid(samples: torch.Tensor, path) -> Path:
    """Save images [N, C, H, W] in [-1, 1] as one PNG grid (or 2-D points [N, 2] as a scatter plot)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = samples.detach().float().cpu()
    if samples.ndim == 2:
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(4, 4))
        axis.scatter(samples[:, 0], samples[:, 1], s=2)
        axis.set_aspect("equal")
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path
    from torchvision.utils import save_image

    save_image((samples.clamp(-1, 1) + 1) / 2, path, nrow=max(1, math.ceil(math.sqrt(len(samples)))))
    return path


def save_samples(ema, diffusion, config, path, *, seed=0, num=None, steps=25) -> Path:
    """A grid of `num` (default config.sample.num_samples, at most 64) EMA samples, 25 DDIM steps (a latent
    diffusion model: decoded, unconditional samples).

    Runs under `torch.random.fork_rng`, so sampling never changes the training run's random stream.
    """
    num = num or min(config.sample.num_samples, 64)
    device = next(ema.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if getattr(ema, "trains_on_latents", False):  # latent diffusion: decoded samples of the null condition
            from minildm import latent

            null = ema.null(num) if ema.cond_stage_model is not None else None
            samples = latent.sample(ema, diffusion, null, num=num, steps=steps, seed=seed)
        else:
            samples = generate(ema, diffusion, config, num, steps=steps, seed=seed)
    return save_grid(samples, path)
