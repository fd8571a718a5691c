"""Typed configuration: one dataclass per component, composed into `Config`.

A config is plain data. `to_dict` / `from_dict` round-trip it through JSON (checkpoints
store it), and `override(config, ["unet.channels=64", "train.lr=1e-4"])` is the one
`section.field=value` syntax shared by the command line and the notebooks.
"""

from __future__ import annotations

import dataclasses
import json
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
    """Which dataset and how it is presented; datasets live in `root`/<name>/."""

    dataset: str = "shapes"  # shapes | toy2d | cifar10 | mnist | imagefolder
    root: str = "data"
    image_size: int = 32
    random_flip: bool = True
    num_workers: int = 0
    toy: str = "moons"  # 2-D toy distribution, used when dataset == "toy2d"
    num_samples: int = 10_000  # size of the procedural datasets (shapes, toy2d)
    path: str = ""  # folder of images for dataset == "imagefolder"


@dataclass
class TrainConfig:
    """The training loop: AdamW, linear warmup, clipping, EMA, mixed precision, checkpoints."""

    batch_size: int = 128  # global batch, split across DDP processes
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 5000
    max_steps: int = 800_000
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    cond_dropout: float = 0.0  # probability that a label is replaced by the null class (needs unet.null_class)
    ema_warmup: bool = True  # decay min(ema_decay, (1+k)/(10+k)) at step k (LDM's LitEma): no random init kept
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
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

    sampler: str = "ddpm"  # ddpm (ancestral) | ddim
    timestep_respacing: str = ""  # "" = all steps; "250", "10,10,10", "ddim50"
    eta: float = 0.0
    clip_denoised: bool = True
    num_samples: int = 64
    batch_size: int = 64


@dataclass
class Config:
    """The whole run: which network (`model`), its settings, the process, data, training, sampling."""

    model: str = "unet"  # unet | mlp
    unet: UNetConfig = field(default_factory=UNetConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
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
    return config


def _coerce(value, hint, key):
    """Convert `value` (a string from the command line, or JSON data) to the type `hint`."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        item_type = args[0]
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
            if number != int(number):
                raise ValueError
            return int(number)
        if hint is float:
            return float(value)
        return hint(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: cannot read {value!r} as {getattr(hint, '__name__', hint)}") from None
