"""Latent diffusion (Rombach et al. 2022): diffusion in the latent space of an autoencoder, steered by cross-attention.

    z_0 = s · E(x)                          s = latent.scale_factor (1 / std of the latents: unit variance)
    train eps_theta(z_t, t, tau(c)) on z_0   the same process, loss and training loop as in pixel space
    x = D(z_0 / s)                          (VQ: the latent is quantised first, LDM's VQModelInterface)

E and D are a chapter-05 autoencoder (frozen), tau the conditioner (`minildm.conditioning`: class embedder, text
or layout transformer, CLIP), eps_theta a UNet with `unet.context_dim` (SpatialTransformer blocks).
`LatentDiffusion` holds the three under latent-diffusion's state_dict names — `model.diffusion_model.*` (the
UNet), `first_stage_model.*`, `cond_stage_model.*` and `scale_factor` — so one minildm checkpoint carries the
denoiser, its EMA, the conditioner and a copy of the first stage, and an official LDM / Stable Diffusion
`state_dict` loads into it part by part (`load_official_state_dict`).

    >>> ldm = latent.build(config, tokenizer=tokenizer)              # config.latent names the first stage
    >>> z0, tokens = latent.training_data(ldm, images, captions)      # encode once: [N, C, h, w], [N, L]
    >>> train.train(config, dataset=(z0, tokens), model=ldm)         # condition dropout: train.cond_dropout
    >>> images = latent.sample(ldm, diffusion, ["a large red circle on the left"], guidance_scale=3)

Shapes: images [N, 3, H, W] in [-1, 1]; latents [N, embed_dim, H / f, W / f]; conditions as the conditioner
takes them (class labels [N], token ids [N, L]); context [N, L, D].
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

import minildm
from minildm import autoencoder as autoencoder_lib
from minildm import checkpoints, conditioning, sampling
from minildm import config as config_lib

REPOSITORY = Path(__file__).resolve().parents[1]  # relative first-stage paths also resolve here


class DiffusionWrapper(nn.Module):
    """LDM's `DiffusionWrapper` (conditioning_key "crossattn"): holds the UNet as `diffusion_model`."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.diffusion_model = unet

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.diffusion_model(z_t, t, context=context)


class LatentDiffusion(nn.Module):
    """A denoiser of latents with its first stage and conditioner: `model(z_t, t, y=condition)` -> eps [N, C, h, w].

    unet: eps_theta on latents [N, C, h, w] (context_dim > 0 when there is a conditioner).
    first_stage: a `minildm.autoencoder` model; frozen and always in eval mode (it is not trained here).
    conditioner: condition -> context [N, L, D], or None for an unconditional model.
    scale_factor: s in z = s · E(x) (a buffer, as LDM's scale_by_std stores it).
    tokenizer: turns raw conditions (captions, boxes) into the conditioner's input; kept for sampling and stored
    in checkpoints (`checkpoint_metadata`).
    null_condition: the conditioner's input that means "no condition" (the empty caption, the null class),
    one row [1, ...]; classifier-free guidance and condition dropout use it.
    """

    trains_on_latents = True  # the training loop does not check its examples for the pixel range [-1, 1]

    def __init__(self, unet: nn.Module, first_stage: autoencoder_lib.Autoencoder, conditioner: nn.Module | None = None,
                 *, scale_factor: float = 1.0, tokenizer=None, null_condition: torch.Tensor | None = None):
        super().__init__()
        self.model = DiffusionWrapper(unet)
        self.first_stage_model = first_stage.eval().requires_grad_(False)
        self.cond_stage_model = conditioner
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        self.tokenizer = tokenizer
        self.register_buffer("null_condition", null_condition, persistent=False)
        self.config: config_lib.Config | None = None  # the config it was built from (`build`, `load`)

    @property
    def unet(self) -> nn.Module:
        return self.model.diffusion_model

    def train(self, mode: bool = True) -> LatentDiffusion:
        super().train(mode)
        self.first_stage_model.eval()  # frozen: no dropout, whatever the rest does
        return self

    def condition(self, y) -> torch.Tensor | None:
        """The context tokens [N, L, D] of the conditioner's input y (None without a conditioner)."""
        if self.cond_stage_model is None:
            if y is not None:
                raise ValueError("this latent diffusion model is unconditional (latent.conditioner='none'); "
                                 "sample it without a condition")
            return None
        return self.cond_stage_model(y)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, y=None, context: torch.Tensor | None = None):
        if context is None and y is not None:
            context = self.condition(y)
        return self.model(z_t, t, context=context)

    def null(self, n: int) -> torch.Tensor:
        """The null condition for a batch of n, [n, ...] (classifier-free guidance's unconditional input)."""
        if self.null_condition is None and hasattr(self.cond_stage_model, "tokenize"):  # CLIP: the empty prompt
            self.null_condition = self.cond_stage_model.tokenize([""]).to(self.scale_factor.device)
        if self.null_condition is None:
            raise ValueError("this model has no null condition: build it with a class, text or layout conditioner "
                             "(classifier-free guidance and train.cond_dropout need one)")
        return self.null_condition.expand(n, *self.null_condition.shape[1:])

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None,
               batch_size: int = 256) -> torch.Tensor:
        """z_0 = s · E(x): images [N, 3, H, W] in [-1, 1] -> scaled latents [N, C, H / f, W / f].

        KL: the posterior mean (sample=True draws z ~ q(z | x) as LDM's training does); VQ: the latent before
        quantisation (LDM's VQModelInterface trains on it; decoding quantises).
        """
        self.first_stage_model.check_images(images)
        z = autoencoder_lib.encode_latents(self.first_stage_model, images, batch_size=batch_size, sample=sample,
                                           generator=generator)
        return z * self.scale_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """x = D(z_0 / s): scaled latents [N, C, h, w] -> images [N, 3, h f, w f] (roughly in [-1, 1])."""
        z = z / self.scale_factor
        ae = self.first_stage_model
        return ae.decode_latent(z) if isinstance(ae, autoencoder_lib.VQModel) else ae.decode(z)

    def checkpoint_metadata(self) -> dict:
        """What `load` needs besides the weights: the first stage's and conditioner's settings, the tokenizer."""
        return {"latent": {"first_stage": config_lib.to_dict(self.first_stage_model.config),
                           "tokenizer": None if self.tokenizer is None else self.tokenizer.to_dict()}}


# ---------------------------------------------------------------------------------------------
# Builders: the UNet is `minildm.build_model(config)`; the first stage and the conditioner have their own.


def build_first_stage(config, *, device=None) -> tuple[autoencoder_lib.Autoencoder, float | None]:
    """The autoencoder named by config.latent.first_stage, and the scale factor it stores (None if it stores none).

    An autoencoder preset name ("ae-kl-f8", "ae-kl-f4-shapes") builds its architecture with fresh weights (an
    official checkpoint fills them, `load_official_state_dict`); a path loads a minildm autoencoder checkpoint
    (its EMA weights when it has them) and the scale factor its training stored. A relative path is looked up
    in the working folder, then in the repository (the shipped "data/checkpoints/ae-kl-f4-shapes.safetensors"
    from a notebook in chapters/).
    """
    from minildm import presets

    name = config.latent.first_stage
    if not name:
        raise config_lib.ConfigError("latent.first_stage is empty: name an autoencoder preset (e.g. ae-kl-f8) or a "
                                     "minildm autoencoder checkpoint")
    if name in presets.names():
        ae_config = presets.get(name)
        if ae_config.model != "autoencoder":
            raise config_lib.ConfigError(f"latent.first_stage={name!r} is a {ae_config.model} preset; name an "
                                         "autoencoder preset (ae-kl-f8, ae-vq-f4, ae-kl-f4-shapes, ...)")
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return autoencoder_lib.build(ae_config.autoencoder), None
    path = next((p for p in (Path(name), REPOSITORY / name) if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"latent.first_stage={name!r} is neither an autoencoder preset nor a file; give a "
                                "preset name (python -m minildm presets) or the path of a trained autoencoder")
    loaded = checkpoints.load(path, device=device or "cpu")
    if loaded.config.model != "autoencoder":
        raise config_lib.ConfigError(f"latent.first_stage={name!r} holds a {loaded.config.model}, not an autoencoder")
    return (loaded.ema or loaded.model), loaded.metadata.get("extra", {}).get("scale_factor")


def build_conditioner(config, *, tokenizer=None,
                      pretrained: bool = True) -> tuple[nn.Module | None, torch.Tensor | None]:
    """(conditioner, null condition [1, ...]) of config.latent.conditioner; (None, None) for "none".

    class: `ClassEmbedder(cond_vocab, unet.context_dim)`, the last class the null class; text / layout:
    LDM's `TransformerEmbedder(unet.context_dim, cond_layers, cond_vocab, cond_length)` on the tokenizer's ids,
    the empty caption / no boxes the null condition; clip: Stable Diffusion's frozen CLIP text encoder (its
    input is the list of prompts, its null the empty prompt), with OpenAI's weights from Hugging Face unless
    pretrained=False (a checkpoint that holds them fills them; the tokenizer is still fetched on first use).
    """
    latent, width = config.latent, config.unet.context_dim
    if latent.conditioner == "none":
        return None, None
    if latent.conditioner == "class":
        embedder = conditioning.ClassEmbedder(latent.cond_vocab, width, null_class=True)
        return embedder, torch.tensor([embedder.null_label])
    if latent.conditioner in ("text", "layout"):
        if tokenizer is not None and tokenizer.vocab_size != latent.cond_vocab:
            raise config_lib.ConfigError(f"latent.cond_vocab={latent.cond_vocab} but the tokenizer has "
                                         f"{tokenizer.vocab_size} tokens; set latent.cond_vocab={tokenizer.vocab_size}")
        embedder = conditioning.TransformerEmbedder(width, latent.cond_layers, latent.cond_vocab, latent.cond_length)
        null = tokenizer.null(1) if tokenizer is not None else torch.zeros(1, latent.cond_length, dtype=torch.long)
        return embedder, null
    return conditioning.FrozenCLIPEmbedder(max_length=latent.cond_length, pretrained=pretrained), None


def build(config, *, first_stage: autoencoder_lib.Autoencoder | None = None, tokenizer=None, device=None,
          scale_factor: float | None = None, pretrained: bool = True) -> LatentDiffusion:
    """The whole latent diffusion model of `config` (UNet, first stage, conditioner); weights as built or loaded.

    first_stage: an autoencoder to use instead of config.latent.first_stage's (e.g. one already in memory).
    The scale factor is `scale_factor` if given, else config.latent.scale_factor, or (0) the one the first
    stage's checkpoint stored. pretrained=False builds a CLIP conditioner without downloading its weights.
    """
    config_lib.validate(config, own_data=True)
    stored = None
    if first_stage is None:
        first_stage, stored = build_first_stage(config, device=device)
    scale = scale_factor or config.latent.scale_factor or stored
    if not scale:
        raise config_lib.ConfigError("latent.scale_factor=0 asks for the first stage's stored scale factor, but "
                                     f"{config.latent.first_stage!r} stores none; set latent.scale_factor")
    _check_first_stage(config, first_stage)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        conditioner, null = build_conditioner(config, tokenizer=tokenizer, pretrained=pretrained)
        ldm = LatentDiffusion(minildm.build_model(config), first_stage, conditioner, scale_factor=scale,
                              tokenizer=tokenizer, null_condition=null)
    ldm.config = config
    return ldm


def _check_first_stage(config, first_stage) -> None:
    u, a = config.unet, first_stage.config
    f = 2 ** (len(a.channel_mult) - 1)
    side = config.data.image_size // f
    problems = []
    if u.in_channels != a.embed_dim:
        problems.append(f"unet.in_channels={u.in_channels} must equal the first stage's latent channels {a.embed_dim}")
    if u.image_size != side:
        problems.append(f"unet.image_size={u.image_size} must be data.image_size / f = {config.data.image_size} / {f}"
                        f" = {side}")
    if problems:
        raise config_lib.ConfigError("the UNet does not fit the first stage's latents: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Data, sampling, checkpoints.


@torch.no_grad()
def training_data(ldm: LatentDiffusion, images: torch.Tensor, conditions=None, *,
                  batch_size: int = 256) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Encode a dataset once for training: scaled latents [N, C, h, w] (and the conditions as tensors [N, ...]).

    conditions: captions (a list of str) or layouts ((boxes, labels)) go through ldm.tokenizer; tensors (class
    labels [N], token ids [N, L]) are used as they are. Encoding once (the posterior mean for KL) instead of in
    every step makes a CPU step as cheap as the latent UNet's forward and backward.
    """
    latents = ldm.encode(images, batch_size=batch_size).cpu()
    if conditions is None:
        return latents
    return latents, tokenize(ldm, conditions)


def tokenize(ldm: LatentDiffusion, conditions) -> torch.Tensor:
    """The conditioner's input for raw conditions: captions -> token ids [N, L] (ldm.tokenizer's, or CLIP's own);
    (boxes, labels) -> [N, 3 K]; tensors pass through."""
    if torch.is_tensor(conditions):
        return conditions
    if ldm.tokenizer is None and hasattr(ldm.cond_stage_model, "tokenize"):  # CLIP brings its own tokenizer
        return ldm.cond_stage_model.tokenize(list(conditions))
    if ldm.tokenizer is None:
        raise ValueError("raw conditions (captions, boxes) need the model's tokenizer: build it with tokenizer=...")
    if isinstance(conditions, tuple) and len(conditions) == 2:
        return ldm.tokenizer.encode(*conditions)
    return ldm.tokenizer.encode(list(conditions))


@torch.no_grad()
def sample(ldm: LatentDiffusion, diffusion, conditions=None, *, num: int | None = None, sampler: str = "ddim",
           steps: int = 25, guidance_scale: float = 1.0, seed: int = 0, batch_size: int | None = None,
           eta: float = 0.0, generator: torch.Generator | sampling.PerSampleGenerator | None = None,
           x0: torch.Tensor | None = None, mask: torch.Tensor | None = None,
           return_latents: bool = False, progress: bool = False, callback=None):
    """Images [N, 3, H, W] of the latent model for `conditions` (captions, layouts, labels, token ids, or None).

    sampler: "ddim" (with `eta`, default 0), "plms" (LDM's) or "ddpm", over `steps` evenly spaced timesteps;
    guidance_scale: w of classifier-free guidance, eps_u + w (eps_c - eps_u) (1: none, LDM's
    `unconditional_guidance_scale`). x0, mask: inpainting in latent space (scaled latents [N, C, h, w] of the known
    image; mask [N or 1, 1, h, w], 1 where known). return_latents: also return the final latents.
    Noise: by default one torch.Generator seeded with `seed`, drawn in order, so the same seed gives the same x_T
    per sample whatever the batch_size. generator: draw x_T and every step's noise from it instead (seed is then
    unused): a torch.Generator, or a `sampling.PerSampleGenerator` of the N samples' global indices, which gives
    sample i its own stream whatever batch or process draws it (`evaluation.sample_images` samples one batch of
    its shard so; the batch is then the whole call: leave batch_size out).
    """
    from minildm import guidance, schedules

    device = ldm.scale_factor.device
    y = None if conditions is None else tokenize(ldm, conditions).to(device)
    n = num if y is None else len(y)
    if n is None:
        raise ValueError("give conditions or, for an unconditional model, num")
    model = ldm
    if guidance_scale != 1:
        model = guidance.classifier_free(ldm, guidance_scale, {"y": ldm.null(1).to(device)})
    samplers = {"ddim": sampling.ddim_sample, "plms": sampling.plms_sample, "ddpm": sampling.ddpm_sample}
    if sampler not in samplers:
        raise ValueError(f"unknown sampler {sampler!r}; use one of {', '.join(samplers)}")
    timesteps = schedules.space_timesteps(diffusion.num_timesteps, str(min(steps, diffusion.num_timesteps)))
    u = ldm.unet.config
    step = batch_size or n
    if isinstance(generator, sampling.PerSampleGenerator) and (len(generator) != n or step < n):
        raise ValueError(f"a PerSampleGenerator draws one batch of exactly its samples: it holds {len(generator)} "
                         f"streams for {n} samples in batches of {step}; give one stream per sample and leave "
                         "batch_size out (evaluation.shard makes the batches)")
    if generator is None:
        generator = torch.Generator(device).manual_seed(seed)
    extra = {"eta": eta} if sampler == "ddim" else {}
    latents = []
    for start in range(0, n, step):
        size = min(step, n - start)
        x_T = sampling.randn((size, u.in_channels, u.image_size, u.image_size), generator, device)
        kwargs = dict(model_kwargs=None if y is None else {"y": y[start:start + size]}, clip_denoised=False,
                      generator=generator, progress=progress, callback=callback, **extra)
        if mask is not None:
            kwargs.update(x0=x0[start:start + size], mask=mask if mask.shape[0] == 1 else mask[start:start + size])
        latents.append(samplers[sampler](model, diffusion, x_T, timesteps, **kwargs))
    z = torch.cat(latents)
    images = ldm.decode(z).clamp(-1, 1)
    return (images, z) if return_latents else images


def load(path, *, device="cpu", ema: bool = True) -> LatentDiffusion:
    """A latent diffusion model from a minildm training checkpoint (its EMA weights unless ema=False), in eval mode.

    The checkpoint holds the UNet, the conditioner and the copy of the first stage (state_dict names of
    `LatentDiffusion`); its metadata the config, the first stage's settings and the tokenizer.
    """
    metadata = checkpoints.read_metadata(path)
    config = config_lib.from_dict(metadata["config"])
    saved = metadata.get("extra", {}).get("latent")
    if saved is None:
        raise checkpoints.CheckpointError(f"{path} is not a latent diffusion checkpoint (its metadata has no "
                                          "'latent' entry); load it with checkpoints.load")
    first_stage = autoencoder_lib.build(config_lib.from_dict(saved["first_stage"], config_lib.AutoencoderConfig))
    tokenizer = None
    if saved["tokenizer"] is not None:
        kind = conditioning.LayoutTokenizer if config.latent.conditioner == "layout" else conditioning.WordTokenizer
        tokenizer = kind.from_dict(saved["tokenizer"])
    # the scale factor is a buffer of the saved weights: 1.0 until they are loaded
    ldm = build(config, first_stage=first_stage, tokenizer=tokenizer, device=device, scale_factor=1.0)
    prefix = "ema." if ema and metadata["has_ema"] else "model."
    tensors = checkpoints._read_tensors(path, (prefix,), device, metadata.get("checksums"))
    checkpoints.load_weights(ldm, checkpoints._strip(tensors, prefix), source=f"{path} ({prefix[:-1]})")
    return ldm.eval().requires_grad_(False)


def load_official_state_dict(ldm: LatentDiffusion, state_dict: dict, *, use_ema: bool = True) -> dict:
    """Load an official LDM / Stable Diffusion `state_dict` (a Lightning .ckpt's) into `ldm`, part by part.

    Every key is routed by its prefix (`checkpoints.split_ldm_state_dict`): the UNet (its EMA copy when the file
    has one and use_ema), the first stage (strictly; its `loss.*` keys dropped), the conditioner (CLIP's keys in
    either transformers layout), `scale_factor`;
    the schedule buffers are checked against none here (minildm recomputes them from the config). Returns
    {"unet": "ema" | "model", "unused": [keys no part takes]} so a caller can name what it did not use.
    """
    unet_keys = list(ldm.unet.state_dict())
    parts = checkpoints.split_ldm_state_dict(state_dict, unet_keys=unet_keys)
    use = "ema" if use_ema and parts["unet_ema"] else "model"
    unet_state = parts["unet_ema"] if use == "ema" else parts["unet"]
    if use == "ema":  # LitEma holds parameters only; the UNet's buffers (none in LDM's) come from the model
        unet_state = {**parts["unet"], **unet_state}
    checkpoints.load_weights(ldm.unet, unet_state, source="the checkpoint's UNet (model.diffusion_model.*)")
    first_stage = autoencoder_lib.convert_official_state_dict(parts["first_stage"])
    checkpoints.load_weights(ldm.first_stage_model, first_stage, source="the checkpoint's first stage")
    if ldm.cond_stage_model is not None and parts["cond_stage"]:
        cond_stage = parts["cond_stage"]
        if hasattr(ldm.cond_stage_model, "convert_state_dict"):  # CLIP: SD's files use transformers 4's key layout
            cond_stage = ldm.cond_stage_model.convert_state_dict(dict(cond_stage))
        checkpoints.load_weights(ldm.cond_stage_model, cond_stage, source="the checkpoint's conditioner")
    elif parts["cond_stage"]:
        raise checkpoints.CheckpointError(f"the checkpoint has a conditioner ({len(parts['cond_stage'])} "
                                          "cond_stage_model.* keys) but this model has none; set latent.conditioner")
    if "scale_factor" in parts:
        ldm.scale_factor.fill_(parts["scale_factor"])
    return {"unet": use, "unused": parts["unused"]}


def is_latent_preset(name: str) -> bool:
    """True when `name` is a preset of a latent diffusion model (config.latent.first_stage set), e.g. sd-v1."""
    from minildm import presets

    return name in presets.names() and bool(presets.info(name).config.latent.first_stage)


def load_official(name: str, *, path=None, device="cpu", directory=None, use_ema: bool = True) -> LatentDiffusion:
    """The released model of latent preset `name` ("ldm-cin256-v2", "sd-v1"), in eval mode, ready for `sample`.

    The Lightning .ckpt is found or downloaded and checked (`checkpoints.fetch_verified`, under torchrun by rank 0
    alone; path: your own copy, loaded as it is), every part is loaded strictly (`load_official_state_dict`: UNet, its
    EMA copy when the file has one and use_ema, first stage, conditioner), and a CLIP conditioner fetches its
    tokenizer now, so that an offline machine fails here (`conditioning.PretrainedWeightsUnavailable`), not in
    the middle of sampling. Keys of the file that no part takes are named in a warning.
    """
    import warnings

    from minildm import presets

    if not is_latent_preset(name):
        raise ValueError(f"{name!r} is not a latent diffusion preset; load it with checkpoints.load_official")
    config = presets.get(name)
    if path is None:
        path = checkpoints.fetch_verified(name, directory=directory)
    state_dict = checkpoints.read_official_state_dict(path, device=device)
    ldm = build(config, device=device, pretrained=False)
    if ldm.cond_stage_model is not None and not any(key.startswith("cond_stage_model.") for key in state_dict):
        raise checkpoints.CheckpointError(f"{path} holds no conditioner weights (cond_stage_model.*), which the "
                                          f"released file of {name} has: delete it and download it again")
    try:
        report = load_official_state_dict(ldm, state_dict, use_ema=use_ema)
    except checkpoints.CheckpointError as error:
        raise checkpoints.CheckpointError(f"{error}\n{path} does not hold the released weights of preset {name!r} "
                                          "(is it another model's file?): delete it and download it again") from None
    if report["unused"]:
        warnings.warn(f"{path}: {len(report['unused'])} keys fit no part of {name} and were not loaded: "
                      + ", ".join(report["unused"]), stacklevel=2)
    if hasattr(ldm.cond_stage_model, "tokenize"):
        ldm.cond_stage_model.tokenizer  # noqa: B018 (fetched now: offline, the error comes before any work)
    return ldm.eval().requires_grad_(False)
