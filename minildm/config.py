"""Typed configuration: one dataclass per component, composed into `Config`.

A config is plain data. `to_dict` / `from_dict` round-trip it through JSON (checkpoints
store it), and `override(config, ["unet.channels=64", "train.lr=1e-4"])` is the one
`section.field=value` syntax shared by the command line and the notebooks. `validate` checks
every field's range or choice and the fields that must agree; `override`, `presets.register` and
`train.train` call it, so no run starts with settings it cannot honour.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field


@dataclass
class UNetConfig:
    """The UNet of DDPM and ADM (guided-diffusion's `UNetModel`); DDPM = ADM toggles off.

    `attention_resolutions` are feature-map sides (16 means attention at 16×16).
    The network outputs `out_channels * (2 if learn_sigma else 1)` channels.
    """

    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    channels: int = 128
    channel_mult: tuple[float, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_heads: int = 1
    num_head_channels: int = -1  # > 0 overrides num_heads: heads = channels // num_head_channels
    num_heads_upsample: int = -1  # -1: same as num_heads
    use_scale_shift_norm: bool = False  # ADM's adaptive group norm (AdaGN)
    resblock_updown: bool = False  # BigGAN-style residual up/down sampling
    use_new_attention_order: bool = False  # split q,k,v before heads (ADM 64×64 model)
    conv_resample: bool = True
    learn_sigma: bool = False  # iDDPM learned range: doubles the output channels
    num_classes: int = 0  # 0: unconditional; > 0 adds a class embedding to the time embedding
    null_class: bool = False  # one more embedding row, label num_classes = "no class" (classifier-free guidance)
    super_res: bool = False  # ADM-U upsampler: concatenates the upsampled low-res image (in_channels × 2)
    use_checkpoint: bool = False  # gradient checkpointing of residual and attention blocks
    norm_groups: int = 32  # GroupNorm groups (32 in every paper model; narrow toys need fewer, see presets)
    time_scale: float = 1.0  # the network embeds t * time_scale (improved-diffusion's rescale_timesteps: 1000 / T)
    context_dim: int = 0  # > 0: LDM's SpatialTransformer (cross-attention on context [N, L, context_dim])
    transformer_depth: int = 1  # transformer blocks per SpatialTransformer


@dataclass
class ClassifierConfig:
    """ADM's noise-aware classifier p(y | x_t, t) (guided-diffusion's `EncoderUNetModel`, minildm.classifier).

    The UNet's down half and middle block, then a head chosen by `pool`: "attention" (ADM), "adaptive",
    "spatial" or "spatial_v2". `out_channels` is the number of classes, `num_res_blocks` ADM's classifier
    "depth", `attention_resolutions` feature-map sides (16 means 16×16). Defaults: guided-diffusion's
    `classifier_defaults` at 64×64 (width 128, depth 2, attention 32,16,8, 64 channels per head).
    """

    image_size: int = 64
    in_channels: int = 3
    out_channels: int = 1000  # number of classes
    channels: int = 128
    channel_mult: tuple[float, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    dropout: float = 0.0
    num_heads: int = 1
    num_head_channels: int = 64  # > 0 overrides num_heads; the attention pool needs it > 0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False  # of the attention blocks; the attention pool always uses the new order
    conv_resample: bool = True  # strided-conv downsampling when resblock_updown is off (else 2x2 average pool)
    pool: str = "attention"  # attention | adaptive | spatial | spatial_v2
    use_checkpoint: bool = False
    norm_groups: int = 32
    time_scale: float = 1.0  # the network embeds t * time_scale, as the UNet


@dataclass
class AutoencoderConfig:
    """LDM's first stage (latent-diffusion `AutoencoderKL` / `VQModel`, minildm.autoencoder).

    The field names are minildm's for LDM's `ddconfig`: channels = ch, channel_mult = ch_mult,
    attention_resolutions = attn_resolutions (feature-map sides, as LDM's own autoencoder config),
    image_size = resolution. The encoder halves the side len(channel_mult) - 1 times: f = 2^(levels - 1),
    the latent is [N, embed_dim, image_size / f, image_size / f]. Defaults: KL-f8, Stable Diffusion's VAE.
    """

    kind: str = "kl"  # kl (diagonal Gaussian posterior, AutoencoderKL) | vq (vector quantiser, VQModel)
    image_size: int = 256
    in_channels: int = 3
    out_channels: int = 3
    channels: int = 128
    channel_mult: tuple[float, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = ()
    attention: bool = True  # False: LDM's attn_type "none" (no attention, not even in the middle)
    dropout: float = 0.0
    z_channels: int = 4  # the encoder's output channels (x2 for the KL posterior's mean and log-variance)
    embed_dim: int = 4  # latent channels after quant_conv
    n_embed: int = 0  # codebook size (kind "vq")
    beta: float = 0.25  # the VQ loss's beta: on the codebook term with legacy_beta, on the commitment without
    legacy_beta: bool = True  # taming's legacy placement: beta weights the codebook term, not the commitment
    norm_groups: int = 32  # GroupNorm groups (32 in LDM; narrow toys need fewer)


@dataclass
class AutoencoderLossConfig:
    """LDM's first-stage loss (`LPIPSWithDiscriminator` for KL, taming's `VQLPIPSWithDiscriminator` for VQ).

    rec = |x - x_rec| + perceptual_weight * perceptual(x, x_rec); KL: nll = rec / exp(logvar) + logvar;
    loss = nll + kl_weight * KL (or codebook_weight * codebook loss) + d_weight * disc_factor * g_loss, with
    the adaptive d_weight = disc_weight * |grad nll| / |grad g_loss| at the decoder's last layer; the PatchGAN
    discriminator joins at step disc_start. perceptual: "lpips" (real LPIPS-VGG weights, needs a download),
    "classifier_features" (an offline substitute: distances of the shipped shapes classifier's features,
    not LPIPS) or "none". Defaults: LDM's KL-f8 config.
    """

    perceptual: str = "lpips"  # lpips | classifier_features | none
    perceptual_weight: float = 1.0
    kl_weight: float = 1e-6
    codebook_weight: float = 1.0
    logvar_init: float = 0.0
    disc_start: int = 50001
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_num_layers: int = 3
    disc_channels: int = 64
    disc_loss: str = "hinge"  # hinge | vanilla


@dataclass
class LatentConfig:
    """Latent diffusion (Rombach et al. 2022, minildm.latent): the UNet denoises scaled first-stage latents.

    With `first_stage` set, config.unet describes the denoiser of latents (unet.image_size = data.image_size / f,
    unet.in_channels = the autoencoder's embed_dim) and config.data the images. The conditioner turns a
    condition into the context tokens [N, L, unet.context_dim] of cross-attention:
    "class" (LDM's ClassEmbedder, cond_vocab classes, the last one the null class), "text" (a word tokenizer and
    LDM's TransformerEmbedder trained from scratch, cond_vocab words, cond_length tokens, cond_layers layers),
    "layout" (LDM's box tokens into the same transformer), "clip" (Stable Diffusion v1's frozen CLIP ViT-L/14).
    """

    first_stage: str = ""  # "": pixel-space diffusion; an autoencoder preset ("ae-kl-f8") or checkpoint path
    scale_factor: float = 1.0  # latents are multiplied by it before diffusion (SD v1: 0.18215); 0: the first
    # stage checkpoint's stored one (LDM's scale_by_std)
    conditioner: str = "none"  # none | class | text | layout | clip
    cond_vocab: int = 0  # class: classes incl. the null class; text / layout: the tokenizer's vocabulary size
    cond_length: int = 77  # text / layout: tokens per condition (the transformer's max_seq_len)
    cond_layers: int = 0  # text / layout: transformer layers of LDM's TransformerEmbedder


@dataclass
class MLPConfig:
    """A small residual MLP denoiser for 2-D toy data."""

    data_dim: int = 2
    hidden: int = 128
    num_layers: int = 3
    time_dim: int = 32


@dataclass
class DiffusionConfig:
    """The Gaussian diffusion process and its training objective.

    beta_schedule: "linear" (DDPM), "cosine" (iDDPM), "scaled_linear" (LDM / Stable Diffusion).
    beta_start / beta_end: 0.0 means the schedule's own defaults.
    model_mean_type: what the network predicts, "eps", "x0" or "v".
    model_var_type: "fixed_small" (posterior variance), "fixed_large" (beta_t) or "learned_range".
    loss_type: "simple" (L_simple), "vlb" (L_vlb) or "hybrid" (L_simple + lambda * L_vlb).
    """

    num_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0
    beta_end: float = 0.0
    model_mean_type: str = "eps"
    model_var_type: str = "fixed_large"
    loss_type: str = "simple"
    hybrid_lambda: float = 0.001
    snr_gamma: float = 0.0  # > 0: Min-SNR-gamma loss weighting (Hang et al. 2023; 5 in the paper)


@dataclass
class DataConfig:
    """Which dataset and how it is presented; datasets live in `root`/<name>/ (the papers' sets: `minildm.prepare`)."""

    dataset: str = "shapes"  # shapes | toy2d | cifar10 | mnist | imagefolder | lsun | imagenet | celebahq
    root: str = "data"
    image_size: int = 32
    random_flip: bool = True
    num_workers: int = 0
    toy: str = "moons"  # 2-D toy distribution, used when dataset == "toy2d"
    num_samples: int = 10_000  # size of the procedural datasets (shapes, toy2d)
    max_objects: int = 1  # shapes: 1..max_objects objects per image (more than one: small ones, in distinct cells)
    label: str = "kind"  # shapes: the class label, "kind" (5 classes), "color" (7) or "kind_color" (35)
    path: str = ""  # folder of images for imagefolder; for lsun / imagenet / celebahq it replaces the default folder
    category: str = ""  # LSUN category (church_outdoor, bedroom, cat, horse, ...), used when dataset == "lsun"


@dataclass
class TrainConfig:
    """The training loop: AdamW, linear warmup, clipping, EMA, mixed precision, checkpoints."""

    batch_size: int = 128  # global batch, split across DDP processes
    grad_accum: int = 1  # micro-batches per optimizer step: each holds batch_size / (grad_accum * processes)
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 5000
    lr_schedule: str = "constant"  # constant | cosine (from lr down to lr_final at max_steps)
    lr_decay_steps: int = 0  # cosine over the last N steps only, constant before (0: all steps after warm-up)
    lr_final: float = 0.0  # the cosine schedule's last learning rate
    max_steps: int = 800_000
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    cond_dropout: float = 0.0  # probability that a label is replaced by the null class (needs unet.null_class)
    ema_warmup: bool = True  # decay min(ema_decay, (1+k)/(10+k)) at step k (LDM's LitEma): no random init kept
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (CPU too) | fp16 (CUDA; fp32 on CPU)
    channels_last: bool = True  # only used on CUDA
    compile: bool = False
    seed: int = 0
    log_every: int = 100
    sample_every: int = 5000
    save_every: int = 5000
    out_dir: str = "runs/default"


@dataclass
class SampleConfig:
    """Default sampling settings: sampler, timestep spacing, batch."""

    sampler: str = "ddpm"  # ddpm (ancestral) | ddim | plms (LDM's pseudo linear multistep)
    timestep_respacing: str = ""  # "" = all steps; "250", "10,10,10", "ddim50"
    eta: float = 0.0
    clip_denoised: bool = True
    num_samples: int = 64
    batch_size: int = 64


@dataclass
class Config:
    """The whole run: which network (`model`), its settings, the process, data, training, sampling."""

    model: str = "unet"  # unet | mlp | classifier | autoencoder
    unet: UNetConfig = field(default_factory=UNetConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    autoencoder_loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def to_dict(config) -> dict:
    """Nested plain dict (tuples become lists), JSON-serialisable."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(data: dict, cls=Config):
    """Rebuild a config from `to_dict` output; unknown keys raise a `KeyError` naming the valid ones."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise KeyError(f"unknown config key(s) {sorted(unknown)} for {cls.__name__}; valid keys: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(value, hint)
        else:
            kwargs[name] = _coerce(value, hint, name)
    return cls(**kwargs)


MODELS = ("unet", "mlp", "classifier", "autoencoder")
CONDITIONERS = ("none", "class", "text", "layout", "clip")  # latent.conditioner (minildm.conditioning)  # what `Config.model` may name (`minildm.build_model` builds it)


class ConfigError(ValueError):
    """A setting out of its range, not one of its choices, or at odds with another; names the field."""


def validate(config: Config, *, own_data: bool = False) -> Config:
    """Check every field of `config` and the fields that must agree; returns it, or raises `ConfigError`.

    The message names the field, the value and what is allowed, e.g.
    "train.ema_decay=2.0 must be a finite number in [0, 1)". Only the section of `config.model` is
    checked. own_data=True: the run trains on data passed in (`train.train(dataset=...)`), so the
    data section need not match the network.
    """
    problems = []

    def need(ok, key, value, allowed):
        if not ok:
            problems.append(f"{key}={value!r} {allowed}")

    def choice(key, value, choices):
        need(value in choices, key, value, f"is not one of {', '.join(map(repr, choices))}")

    def count(key, value, low=1):
        need(isinstance(value, int) and value >= low, key, value, f"must be an integer >= {low}")

    def number(key, value, low=None, high=None, *, open_low=False, open_high=False):
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        ok = ok and (low is None or (value > low if open_low else value >= low))
        ok = ok and (high is None or (value < high if open_high else value <= high))
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        need(ok, key, value, f"must be a finite number in {interval}" if high is not None
             else f"must be a finite number {'>' if open_low else '>='} {low}")

    def fits_its_data(section, net, extra_widths=()):  # the UNet's and the classifier's shared checks
        if net.channels > 0 and net.norm_groups > 0:
            widths = sorted({net.channels} | {int(net.channels * m) for m in net.channel_mult if m > 0})
            widths += list(extra_widths)
            bad = [w for w in widths if w % net.norm_groups]
            need(not bad, f"{section}.norm_groups", net.norm_groups,
                 f"must divide every level's width {widths} (it does not divide {bad})")
        if config.data.dataset != "toy2d" and not own_data and not (section == "unet" and config.latent.first_stage):
            need(net.image_size == config.data.image_size, f"{section}.image_size", net.image_size,
                 f"must equal data.image_size={config.data.image_size} (the network sees the images it trains "
                 "on); set both")

    # the lists of valid names live beside their code
    from minildm import autoencoder, autoencoder_loss, classifier, data, diffusion, schedules

    choice("model", config.model, MODELS)
    if config.model == "unet":
        u = config.unet
        for name in ("image_size", "in_channels", "out_channels", "channels", "num_heads", "norm_groups"):
            count(f"unet.{name}", getattr(u, name))
        count("unet.num_res_blocks", u.num_res_blocks)
        count("unet.num_classes", u.num_classes, 0)
        need(len(u.channel_mult) > 0 and all(m > 0 for m in u.channel_mult), "unet.channel_mult", u.channel_mult,
             "must be one or more positive multipliers, e.g. 1,2,2,2")
        need(all(isinstance(r, int) and r > 0 for r in u.attention_resolutions), "unet.attention_resolutions",
             u.attention_resolutions, "must be feature-map sides (positive integers), e.g. 16,8")
        number("unet.dropout", u.dropout, 0, 1, open_high=True)
        need(u.num_head_channels == -1 or u.num_head_channels > 0, "unet.num_head_channels", u.num_head_channels,
             "must be -1 (use num_heads) or a positive channel count")
        need(u.num_heads_upsample == -1 or u.num_heads_upsample > 0, "unet.num_heads_upsample",
             u.num_heads_upsample, "must be -1 (same as num_heads) or positive")
        need(not u.null_class or u.num_classes > 0, "unet.null_class", u.null_class,
             "needs a class-conditional network: set unet.num_classes > 0")
        number("unet.time_scale", u.time_scale, 0, open_low=True)
        count("unet.context_dim", u.context_dim, 0)
        count("unet.transformer_depth", u.transformer_depth)
        fits_its_data("unet", u)
        learned = config.diffusion.model_var_type == "learned_range"
        need(u.learn_sigma == learned, "unet.learn_sigma", u.learn_sigma,
             f"must be {learned} with diffusion.model_var_type={config.diffusion.model_var_type!r} (the network "
             "outputs the variance channels exactly when the variance is learned)")
        need(config.data.dataset != "toy2d" or own_data, "data.dataset", config.data.dataset,
             "holds 2-D points: use model=mlp for it (the UNet needs images)")
    elif config.model == "classifier":
        c = config.classifier
        for name in ("image_size", "in_channels", "out_channels", "channels", "num_res_blocks", "num_heads",
                     "norm_groups"):
            count(f"classifier.{name}", getattr(c, name))
        need(len(c.channel_mult) > 0 and all(m > 0 for m in c.channel_mult), "classifier.channel_mult",
             c.channel_mult, "must be one or more positive multipliers, e.g. 1,2,3,4")
        need(all(isinstance(r, int) and r > 0 for r in c.attention_resolutions), "classifier.attention_resolutions",
             c.attention_resolutions, "must be feature-map sides (positive integers), e.g. 32,16,8")
        number("classifier.dropout", c.dropout, 0, 1, open_high=True)
        choice("classifier.pool", c.pool, classifier.POOLS)
        need(c.num_head_channels == -1 or c.num_head_channels > 0, "classifier.num_head_channels",
             c.num_head_channels, "must be -1 (use num_heads) or a positive channel count")
        need(c.pool != "attention" or c.num_head_channels > 0, "classifier.num_head_channels", c.num_head_channels,
             "must be > 0 with classifier.pool='attention' (its heads are channels // num_head_channels)")
        number("classifier.time_scale", c.time_scale, 0, open_low=True)
        # the spatial_v2 head normalises its 2048 hidden features too
        fits_its_data("classifier", c, [classifier.SPATIAL_WIDTH] if c.pool == "spatial_v2" else [])
        need(config.data.dataset != "toy2d" or own_data, "data.dataset", config.data.dataset,
             "holds 2-D points: the classifier needs images")
    elif config.model == "autoencoder":
        e, loss = config.autoencoder, config.autoencoder_loss
        choice("autoencoder.kind", e.kind, autoencoder.KINDS)
        for name in ("image_size", "in_channels", "out_channels", "channels", "num_res_blocks", "z_channels",
                     "embed_dim", "norm_groups"):
            count(f"autoencoder.{name}", getattr(e, name))
        need(len(e.channel_mult) > 0 and all(m > 0 for m in e.channel_mult), "autoencoder.channel_mult",
             e.channel_mult, "must be one or more positive multipliers, e.g. 1,2,4 (f = 2^(levels - 1))")
        need(all(isinstance(r, int) and r > 0 for r in e.attention_resolutions), "autoencoder.attention_resolutions",
             e.attention_resolutions, "must be feature-map sides (positive integers), e.g. 16")
        number("autoencoder.dropout", e.dropout, 0, 1, open_high=True)
        need(e.kind != "vq" or e.n_embed > 0, "autoencoder.n_embed", e.n_embed,
             "must be the codebook size (> 0) with autoencoder.kind='vq'")
        number("autoencoder.beta", e.beta, 0)
        factor = 2 ** (len(e.channel_mult) - 1)
        need(e.image_size % factor == 0, "autoencoder.image_size", e.image_size,
             f"must be divisible by f={factor} (2^(levels - 1) of channel_mult={e.channel_mult})")
        fits_its_data("autoencoder", e)
        choice("autoencoder_loss.perceptual", loss.perceptual, autoencoder_loss.PERCEPTUAL)
        choice("autoencoder_loss.disc_loss", loss.disc_loss, autoencoder_loss.DISC_LOSSES)
        for name in ("perceptual_weight", "kl_weight", "codebook_weight", "disc_weight", "disc_factor"):
            number(f"autoencoder_loss.{name}", getattr(loss, name), 0)
        number("autoencoder_loss.logvar_init", loss.logvar_init, -30, 20)
        count("autoencoder_loss.disc_start", loss.disc_start, 0)
        count("autoencoder_loss.disc_num_layers", loss.disc_num_layers)
        count("autoencoder_loss.disc_channels", loss.disc_channels)
        need(config.data.dataset != "toy2d" or own_data, "data.dataset", config.data.dataset,
             "holds 2-D points: the autoencoder needs images")
    else:
        m = config.mlp
        for name in ("data_dim", "hidden", "num_layers", "time_dim"):
            count(f"mlp.{name}", getattr(m, name))
        need(config.data.dataset == "toy2d" or own_data, "data.dataset", config.data.dataset,
             "must be 'toy2d' with model=mlp")

    d = config.diffusion
    count("diffusion.num_timesteps", d.num_timesteps)
    choice("diffusion.beta_schedule", d.beta_schedule, schedules.SCHEDULES)
    number("diffusion.beta_start", d.beta_start, 0, 1, open_high=True)
    number("diffusion.beta_end", d.beta_end, 0, 1, open_high=True)
    need(d.beta_end == 0 or d.beta_start <= d.beta_end, "diffusion.beta_start", d.beta_start,
         f"must not exceed diffusion.beta_end={d.beta_end}")
    choice("diffusion.model_mean_type", d.model_mean_type, diffusion.MEAN_TYPES)
    choice("diffusion.model_var_type", d.model_var_type, diffusion.VAR_TYPES)
    choice("diffusion.loss_type", d.loss_type, diffusion.LOSS_TYPES)
    need(not (d.model_var_type == "learned_range" and d.loss_type == "simple"), "diffusion.loss_type", d.loss_type,
         "gives learned variances no training signal: use 'hybrid' or 'vlb' with model_var_type='learned_range'")
    number("diffusion.hybrid_lambda", d.hybrid_lambda, 0)
    number("diffusion.snr_gamma", d.snr_gamma, 0)

    a = config.data
    choice("data.dataset", a.dataset, data.DATASETS)
    count("data.image_size", a.image_size)
    count("data.num_workers", a.num_workers, 0)
    count("data.num_samples", a.num_samples)
    need(isinstance(a.max_objects, int) and 1 <= a.max_objects <= 9, "data.max_objects", a.max_objects,
         "must be an integer in [1, 9] (objects take distinct cells of a 3x3 grid)")
    choice("data.toy", a.toy, data.TOY_2D)
    choice("data.label", a.label, data.SHAPES_LABELS)

    l = config.latent
    choice("latent.conditioner", l.conditioner, CONDITIONERS)
    number("latent.scale_factor", l.scale_factor, 0)
    count("latent.cond_length", l.cond_length)
    count("latent.cond_layers", l.cond_layers, 0)
    count("latent.cond_vocab", l.cond_vocab, 0)
    if l.conditioner != "none":
        need(config.model == "unet" and config.unet.context_dim > 0, "latent.conditioner", l.conditioner,
             "feeds cross-attention: set unet.context_dim (> 0) to the conditioner's width")
    if l.conditioner in ("class", "text", "layout"):
        count("latent.cond_vocab", l.cond_vocab, 2)
    if l.conditioner in ("text", "layout"):
        count("latent.cond_layers", l.cond_layers, 1)
    need(l.scale_factor > 0 or l.first_stage, "latent.scale_factor", l.scale_factor,
         "0 (the first stage's stored factor) needs latent.first_stage")

    t = config.train
    count("train.batch_size", t.batch_size)
    count("train.grad_accum", t.grad_accum)
    need(not (isinstance(t.grad_accum, int) and isinstance(t.batch_size, int) and t.grad_accum >= 1)
         or t.batch_size % t.grad_accum == 0,
         "train.grad_accum", t.grad_accum, f"must divide train.batch_size={t.batch_size} (each micro-batch holds "
         "batch_size / grad_accum examples, per process batch_size / (grad_accum * processes)); change either")
    number("train.lr", t.lr, 0, open_low=True)
    choice("train.lr_schedule", t.lr_schedule, ("constant", "cosine"))
    number("train.lr_final", t.lr_final, 0, t.lr if math.isfinite(t.lr) else None)
    number("train.weight_decay", t.weight_decay, 0)
    need(len(t.adam_betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.adam_betas),
         "train.adam_betas", t.adam_betas, "must be two numbers in [0, 1), e.g. 0.9,0.999")
    count("train.warmup_steps", t.warmup_steps, 0)
    count("train.lr_decay_steps", t.lr_decay_steps, 0)
    count("train.max_steps", t.max_steps)
    number("train.grad_clip", t.grad_clip, 0)
    number("train.ema_decay", t.ema_decay, 0, 1, open_high=True)
    number("train.cond_dropout", t.cond_dropout, 0, 1)
    need(t.cond_dropout == 0 or (config.model == "unet" and (config.unet.null_class or l.conditioner != "none")),
         "train.cond_dropout", t.cond_dropout, "replaces conditions by the null one: set unet.null_class=true (and "
         "unet.num_classes > 0), or a latent.conditioner")
    choice("train.precision", t.precision, ("auto", "fp32", "bf16", "fp16"))
    count("train.seed", t.seed, 0)
    for name in ("log_every", "sample_every", "save_every"):
        count(f"train.{name}", getattr(t, name), 0)
    need(bool(t.out_dir), "train.out_dir", t.out_dir, "must name a folder")

    s = config.sample
    choice("sample.sampler", s.sampler, ("ddpm", "ddim", "plms"))
    number("sample.eta", s.eta, 0)
    count("sample.num_samples", s.num_samples)
    count("sample.batch_size", s.batch_size)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    return config


def override(config, overrides) -> Config:
    """Return a copy of `config` with `"section.field=value"` strings applied.

    Values are coerced to the field's type ("1e-4" -> float, "1,2,2,2" -> tuple, "true" -> bool).
    An unknown section or field raises a `KeyError` that lists the valid names.
    """
    config = from_dict(to_dict(config), type(config))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like 'section.field=value', e.g. 'train.lr=1e-4'")
        key, value = item.split("=", 1)
        *path, name = key.strip().split(".")
        target = config
        for part in path:
            valid = [f.name for f in dataclasses.fields(target) if dataclasses.is_dataclass(getattr(target, f.name))]
            if part not in valid:
                raise KeyError(f"unknown config section {part!r} in {key!r}; valid sections: {valid}")
            target = getattr(target, part)
        fields = {f.name for f in dataclasses.fields(target) if not dataclasses.is_dataclass(getattr(target, f.name))}
        if name not in fields:
            raise KeyError(f"unknown config key {key!r}; valid keys of {type(target).__name__}: {sorted(fields)}")
        setattr(target, name, _coerce(value.strip(), typing.get_type_hints(type(target))[name], key))
    return validate(config) if isinstance(config, Config) else config


def _coerce(value, hint, key):
    """Convert `value` (a string from the command line, or JSON data) to the type `hint`."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        item_type = args[0]
        if len(args) != 2 or args[1] is not Ellipsis:  # a fixed-length tuple such as adam_betas
            if len(value) != len(args):
                raise ValueError(f"{key}: needs {len(args)} comma-separated values, got {len(value)} ({value!r})")
        return tuple(_coerce(v, item_type, key) for v in value)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if hint is int:
            number = float(value)
            if not math.isfinite(number) or number != int(number):
                raise ValueError
            return int(number)
        if hint is float:
            return float(value)
        return hint(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{key}: cannot read {value!r} as {getattr(hint, '__name__', hint)}") from None
