"""The UNet of DDPM, improved DDPM and ADM: one class, the ADM changes are config toggles.

`UNet(UNetConfig)` follows guided-diffusion's `UNetModel` (openai/guided-diffusion, unet.py) module by
module, with its state_dict names, so official ADM / iDDPM checkpoints load with `strict=True`:

    time_embed        sinusoidal t-embedding -> Linear(C, 4C) -> SiLU -> Linear(4C, 4C)   [N, 4C]
    label_emb         Embedding(num_classes, 4C), added to the time embedding (class-conditional)
    input_blocks      [conv_in] then per level: num_res_blocks x (ResBlock [+ AttentionBlock]) and a
                      downsampler (strided conv, or a BigGAN ResBlock(down=True)) except at the last level
    middle_block      ResBlock, AttentionBlock, ResBlock
    output_blocks     per level (deepest first): num_res_blocks+1 x (ResBlock on cat([h, skip])
                      [+ AttentionBlock]) and an upsampler except at level 0
    out               GroupNorm -> SiLU -> zero-initialised conv to out_channels (x2 if learn_sigma)

The toggles, with the paper that introduced them:
- `use_scale_shift_norm`: AdaGN, GN(h) * (1 + scale) + shift from the embedding (ADM Sec. 3, Tab. 3);
  off: the embedding is added to h (DDPM).
- `resblock_updown`: BigGAN-style residual up/downsampling (ADM Sec. 3); off: conv resampling (DDPM).
- `attention_resolutions` (feature-map sides, e.g. (32, 16, 8)), `num_heads` / `num_head_channels`,
  `num_heads_upsample`, `use_new_attention_order` (ADM Sec. 3, Tab. 2; see attention.py).
- `learn_sigma`: 2 x out_channels, the second half is the interpolation v of iDDPM Eq. (15).
- `num_classes`: class-conditional; `super_res`: ADM-U upsampler, forward(..., low_res=...) concatenates
  the bilinearly upsampled low-resolution image (guided-diffusion `SuperResModel`).
- `use_checkpoint`: gradient checkpointing of every ResBlock, AttentionBlock and SpatialTransformer: each keeps
  only its inputs and recomputes its inside in backward (`torch.utils.checkpoint`, use_reentrant=False; dropout
  masks replayed), so the gradients are the plain model's; same state_dict. Saved activations of ddpm-shapes at
  batch 8: 52 -> 17 MiB (`minildm.memory.estimate`); one more forward per step (~30% slower).
- `context_dim` > 0: latent diffusion's UNet (LDM's openaimodel.py, the same module names): a SpatialTransformer
  (`transformer_depth` blocks of self-, cross-attention on `context` [N, L, context_dim] and GEGLU) stands where
  the AttentionBlock stands, and forward(x_t, t, context=...) passes the context to each of them.

DDPM = ADM with the toggles off. The DDPM presets are built in guided-diffusion's layout, which has the
same parameter count as Ho et al.'s TensorFlow model (35,746,307 for CIFAR10, 113,673,219 at 256x256) but
is not numerically the same function: the TF code embeds t as [sin | cos] with frequencies divided by
half-1 (ours: [cos | sin], divided by half, `layers.timestep_embedding_adm`), uses GroupNorm eps 1e-6
(ours 1e-5), pads its stride-2 downsampling conv asymmetrically (TF 'SAME', ours symmetric padding 1) and
uses four separate 1x1 q/k/v/proj layers (ours one qkv conv + proj_out). So DDPM's TF checkpoints would
need a converter and would still differ slightly; trained from scratch the two behave the same.

Convention: `attention_resolutions` are feature-map sides everywhere in minildm (16 means 16x16).
guided-diffusion's constructor takes downsample factors instead; `config_from_original` is the one place
that converts (side = image_size // factor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minildm.attention import AttentionBlock, SpatialTransformer, num_heads_for
from minildm.config import UNetConfig
from minildm.layers import count_parameters, normalization, timestep_embedding_adm, zero_module

# ---------------------------------------------------------------------------------------------
# Building blocks (guided-diffusion names: `op`, `conv`, `in_layers`, `emb_layers`, `out_layers`, ...)


class Downsample(nn.Module):
    """Halve the side: 3x3 conv with stride 2, symmetric padding 1 (`use_conv`) or 2x2 average pooling.

    x: [N, C, H, W] -> [N, out_channels, H/2, W/2].
    """

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ValueError("average-pool downsampling cannot change the number of channels")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the side: nearest-neighbour x2, then a 3x3 conv if `use_conv`. [N, C, H, W] -> [N, C', 2H, 2W]."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        elif out_channels != channels:
            raise ValueError("nearest-neighbour upsampling without a conv cannot change the number of channels")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding: x + out_layers(in_layers(x) (+) emb).

    x: [N, channels, H, W], emb: [N, emb_channels] -> [N, out_channels, H', W'] (H' = 2H if up, H/2 if down).
    in_layers = GN, SiLU, conv3x3; emb_layers = SiLU, Linear; out_layers = GN, SiLU, Dropout, conv3x3 (zero init).
    With `use_scale_shift_norm` (AdaGN) the embedding gives (scale, shift) for out_layers' GN:
    h = GN(h) * (1 + scale) + shift; otherwise it is added to h (DDPM). With `up`/`down` (BigGAN-style) both
    branches are resampled after in_layers' GN+SiLU and before its conv.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, use_checkpoint: bool = False,
                 up: bool = False, down: bool = False, norm_groups: int = 32):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(normalization(channels, norm_groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels, norm_groups), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            # BigGAN up/down: GN, SiLU, resample both branches, then the conv.
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]  # [N, C or 2C, 1, 1]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)  # scale first, as in guided-diffusion
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers; the ResBlocks (and attention blocks) among them also receive the embedding, the
    SpatialTransformers the context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
        return x


# ---------------------------------------------------------------------------------------------
# The UNet


class UNet(nn.Module):
    """DDPM / iDDPM / ADM UNet: model(x_t, t, y=None, context=None, low_res=None) -> [N, C_out, H, W].

    x_t: [N, in_channels, H, W] with H = W divisible by 2^(levels-1); t: [N] (int64, or float for
    rescaled timesteps); y: [N] int64 class labels (class-conditional models only); low_res:
    [N, in_channels, h, w] (super_res models only). C_out = out_channels * (2 if learn_sigma else 1).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        _check_config(config)
        base = config.channels
        emb_dim = 4 * base
        num_heads_up = config.num_heads_upsample if config.num_heads_upsample != -1 else config.num_heads
        attention = dict(num_head_channels=config.num_head_channels,
                         use_new_attention_order=config.use_new_attention_order, use_checkpoint=config.use_checkpoint,
                         norm_groups=config.norm_groups)
        resblock = dict(emb_channels=emb_dim, dropout=config.dropout, use_checkpoint=config.use_checkpoint,
                        use_scale_shift_norm=config.use_scale_shift_norm, norm_groups=config.norm_groups)
        # For describe(): top-level block name -> (channels, feature-map side) of its output, and the
        # level (index into channel_mult) whose loop built it; a level's resampler belongs to that level.
        self.block_shapes: dict[str, tuple[int, int]] = {}
        self.block_levels: dict[str, int] = {}

        self.time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if config.num_classes > 0:  # + 1 row for the null class (index num_classes) of classifier-free guidance
            self.label_emb = nn.Embedding(config.num_classes + int(config.null_class), emb_dim)

        # Down path. `skip_channels` remembers the width of every input block's output (the skips).
        in_channels = config.in_channels * (2 if config.super_res else 1)
        ch = int(config.channel_mult[0] * base)
        side = config.image_size
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        self.block_shapes["input_blocks.0"], self.block_levels["input_blocks.0"] = (ch, side), 0
        skip_channels = [ch]
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers = [ResBlock(ch, out_channels=int(mult * base), **resblock)]
                ch = int(mult * base)
                if side in config.attention_resolutions:
                    layers.append(self._attention(ch, config.num_heads, attention))
                self._add(self.input_blocks, "input_blocks", layers, ch, side, level)
                skip_channels.append(ch)
            if level != len(config.channel_mult) - 1:
                side //= 2
                down = (ResBlock(ch, out_channels=ch, down=True, **resblock) if config.resblock_updown
                        else Downsample(ch, config.conv_resample, out_channels=ch))
                self._add(self.input_blocks, "input_blocks", [down], ch, side, level)
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, **resblock),
            self._attention(ch, config.num_heads, attention),
            ResBlock(ch, **resblock),
        )
        self.block_shapes["middle_block"] = (ch, side)

        # Up path: every block consumes one skip (last in, first out).
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(config.channel_mult))[::-1]:
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), out_channels=int(base * mult), **resblock)]
                ch = int(base * mult)
                if side in config.attention_resolutions:
                    layers.append(self._attention(ch, num_heads_up, attention))
                if level and i == config.num_res_blocks:
                    layers.append(ResBlock(ch, out_channels=ch, up=True, **resblock) if config.resblock_updown
                                  else Upsample(ch, config.conv_resample, out_channels=ch))
                    side *= 2
                self._add(self.output_blocks, "output_blocks", layers, ch, side, level)

        out_channels = config.out_channels * (2 if config.learn_sigma else 1)
        self.out = nn.Sequential(normalization(ch, config.norm_groups), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))
        self.block_shapes["out"] = (out_channels, side)

    def _attention(self, ch: int, num_heads: int, attention: dict) -> nn.Module:
        """AttentionBlock, or LDM's SpatialTransformer when unet.context_dim > 0 (it takes num_heads even on the
        way up, and dim_head = num_head_channels, or ch // num_heads)."""
        config = self.config
        if config.context_dim == 0:
            return AttentionBlock(ch, num_heads=num_heads, **attention)
        heads = num_heads_for(ch, config.num_heads, config.num_head_channels)
        return SpatialTransformer(ch, heads, ch // heads, depth=config.transformer_depth,
                                  context_dim=config.context_dim, dropout=config.dropout,
                                  norm_groups=config.norm_groups, use_checkpoint=config.use_checkpoint)

    def _add(self, blocks: nn.ModuleList, name: str, layers: list, ch: int, side: int, level: int) -> None:
        self.block_shapes[f"{name}.{len(blocks)}"] = (ch, side)
        self.block_levels[f"{name}.{len(blocks)}"] = level
        blocks.append(TimestepEmbedSequential(*layers))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None, low_res: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the model output (eps, and v if learn_sigma) for x_t at timesteps t; shapes in the class doc."""
        t = self._check_inputs(x_t, t, y, context, low_res)
        if self.config.super_res:
            # ADM-U: condition on the low-resolution image, bilinearly upsampled to x_t's size.
            upsampled = F.interpolate(low_res, x_t.shape[-2:], mode="bilinear")
            x_t = torch.cat([x_t, upsampled.to(x_t.dtype)], dim=1)

        if self.config.time_scale != 1.0:  # iDDPM trained on t * 1000 / T (its rescale_timesteps)
            t = t.float() * self.config.time_scale
        emb = timestep_embedding_adm(t, self.config.channels)  # [N, C], float32
        emb = self.time_embed(emb.to(self.time_embed[0].weight.dtype))  # [N, 4C]
        if self.config.num_classes > 0:
            emb = emb + self.label_emb(y)

        h, skips = x_t, []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

    def _check_inputs(self, x_t, t, y, context, low_res) -> torch.Tensor:
        """Raise a ValueError that says what to change; return t as a [N] tensor."""
        cfg = self.config
        t = check_image_input(x_t, t, self.input_blocks[0][0].weight, in_channels=cfg.in_channels,
                              levels=len(cfg.channel_mult), section="unet", name="model")
        if y is not None and (not isinstance(y, torch.Tensor) or y.is_floating_point() or y.dtype == torch.bool):
            raise ValueError(f"y must be a tensor of integer class labels (int64), got "
                             f"{y.dtype if isinstance(y, torch.Tensor) else type(y).__name__}")
        n = x_t.shape[0]
        if cfg.num_classes > 0 and y is None:
            raise ValueError(f"y is required: this UNet is class-conditional (unet.num_classes={cfg.num_classes}); "
                             "pass y=<[N] int64 labels> or use a config with num_classes=0")
        if cfg.num_classes == 0 and y is not None:
            raise ValueError("y is not used by this UNet: it is unconditional (unet.num_classes=0); "
                             "drop y or set unet.num_classes to the number of classes")
        if y is not None and y.shape != (n,):
            raise ValueError(f"y must be [{n}] class labels; got shape {tuple(y.shape)}")
        known = cfg.num_classes + int(cfg.null_class)
        # (checked on the CPU only: on an accelerator the check would wait for the device every step)
        if y is not None and y.device.type == "cpu" and y.numel() and not 0 <= int(y.min()) <= int(y.max()) < known:
            null = f" or {cfg.num_classes} (the null class)" if cfg.null_class else ""
            raise ValueError(f"y holds labels in [{int(y.min())}, {int(y.max())}]; this UNet knows classes 0.."
                             f"{cfg.num_classes - 1}{null} (unet.num_classes={cfg.num_classes})")
        if cfg.context_dim == 0 and context is not None:
            raise ValueError("context is not used by this UNet (it has no cross-attention); drop context=..., "
                             "or use a latent-diffusion UNet with cross-attention (unet.context_dim > 0)")
        if cfg.context_dim > 0 and (not isinstance(context, torch.Tensor) or context.ndim != 3
                                    or context.shape[0] != n or context.shape[2] != cfg.context_dim):
            got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(f"context is required: this UNet has cross-attention (unet.context_dim="
                             f"{cfg.context_dim}); pass context=<[{n}, L, {cfg.context_dim}] tokens>, got {got}")
        if cfg.super_res and low_res is None:
            raise ValueError("low_res is required: this is a super-resolution UNet (unet.super_res=True); "
                             f"pass low_res=<[N, {cfg.in_channels}, h, w] image in [-1, 1]>")
        if not cfg.super_res and low_res is not None:
            raise ValueError("low_res is not used by this UNet (unet.super_res=False); drop it or use an upsampler")
        if low_res is not None and (low_res.ndim != 4 or low_res.shape[:2] != x_t.shape[:2]):
            raise ValueError(f"low_res must be [{n}, {cfg.in_channels}, h, w]; got shape {tuple(low_res.shape)}")
        return t


def check_image_input(x_t, t, weight: torch.Tensor, *, in_channels: int, levels: int, section: str,
                      name: str) -> torch.Tensor:
    """The input checks of every network that reads x_t (the UNet, the classifier); returns t as int64 [N].

    x_t must be a float tensor [N, in_channels, H, W] with sides divisible by 2^(levels - 1), on the device and
    in the dtype of `weight` (the first conv's; another dtype only under autocast); t a scalar or [N].
    Messages name the config `section` and call the network `name`.
    """
    if not isinstance(x_t, torch.Tensor) or x_t.ndim != 4 or x_t.shape[1] != in_channels:
        shape = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
        raise ValueError(f"x_t must be [N, {in_channels}, H, W] ({section}.in_channels={in_channels}); got {shape}")
    factor = 2 ** (levels - 1)
    if x_t.shape[-1] % factor or x_t.shape[-2] % factor:
        raise ValueError(f"image side {tuple(x_t.shape[-2:])} is not divisible by {factor}, which this {name}'s "
                         f"{levels} levels need; resize to a multiple of {factor}")
    if not x_t.is_floating_point():
        raise ValueError(f"x_t must be a float tensor, got {x_t.dtype}; images go in as floats in [-1, 1] "
                         "(uint8: x.float() / 127.5 - 1)")
    if x_t.device != weight.device:
        raise ValueError(f"x_t is on {x_t.device} but the {name} is on {weight.device}; move one of them "
                         f"(x_t.to('{weight.device}') or {name}.to('{x_t.device}'))")
    if x_t.dtype != weight.dtype and not _autocast(x_t.device.type):
        raise ValueError(f"x_t is {x_t.dtype} but the {name}'s weights are {weight.dtype}; convert one of them "
                         f"(x_t.to({weight.dtype}) or {name}.to({x_t.dtype})), or run under torch.autocast")
    n = x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device)
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"t must be a scalar or have shape [{n}] (one timestep per sample); got {tuple(t.shape)}")
    return t


def _check_config(config: UNetConfig) -> None:
    """Reject configurations the UNet would otherwise build silently wrong."""
    check_levels(config, "unet", "UNet")


def check_levels(config, section: str, name: str) -> None:
    """The level checks of the UNet and the classifier (their configs share these fields): at least one level,
    an image side divisible by 2^(levels - 1), attention at sides the network has, whole channel counts."""
    if not config.channel_mult:
        raise ValueError(f"{section}.channel_mult must name at least one level, e.g. (1, 2, 2, 2)")
    factor = 2 ** (len(config.channel_mult) - 1)
    if config.image_size % factor:
        raise ValueError(f"{section}.image_size={config.image_size} must be divisible by 2^(levels-1) = {factor} "
                         f"for channel_mult={config.channel_mult}")
    sides = [config.image_size // 2**level for level in range(len(config.channel_mult))]
    unreached = [r for r in config.attention_resolutions if r not in sides]
    if unreached:
        raise ValueError(f"{section}.attention_resolutions {unreached} are not feature-map sides of this {name} "
                         f"(sides are {sides}); attention_resolutions are sides like 16 (=16x16), not factors")
    for mult in config.channel_mult:
        if int(mult * config.channels) != mult * config.channels:
            raise ValueError(f"channel_mult {mult} x channels {config.channels} is not a whole number of channels")


# ---------------------------------------------------------------------------------------------
# Official checkpoints and descriptions


def config_from_original(kwargs: dict, super_res: bool = False) -> UNetConfig:
    """UNetConfig equivalent to guided-diffusion / improved-diffusion / latent-diffusion `UNetModel(**kwargs)`.

    The one place where the originals' attention *downsample factors* become feature-map sides
    (side = image_size // factor). `super_res=True` for `SuperResModel`, whose in_channels are doubled.
    """
    in_channels = kwargs.get("in_channels", 3)
    if super_res:
        in_channels //= 2
    learn_sigma = kwargs["out_channels"] == 2 * in_channels
    return UNetConfig(
        **original_shared_fields(kwargs),
        in_channels=in_channels,
        out_channels=kwargs["out_channels"] // (2 if learn_sigma else 1),
        num_heads_upsample=kwargs.get("num_heads_upsample", -1),
        learn_sigma=learn_sigma,
        num_classes=kwargs.get("num_classes") or 0,
        super_res=super_res,
        context_dim=(kwargs.get("context_dim") or 0) if kwargs.get("use_spatial_transformer") else 0,
        transformer_depth=kwargs.get("transformer_depth", 1),
    )


def original_shared_fields(kwargs: dict) -> dict:
    """The config fields guided-diffusion's `UNetModel` and `EncoderUNetModel` share, from their kwargs (their
    defaults included); attention downsample factors become feature-map sides (side = image_size // factor)."""
    image_size = kwargs["image_size"]
    return dict(
        image_size=image_size,
        channels=kwargs["model_channels"],
        channel_mult=tuple(kwargs.get("channel_mult", (1, 2, 4, 8))),
        num_res_blocks=kwargs["num_res_blocks"],
        attention_resolutions=tuple(image_size // ds for ds in kwargs["attention_resolutions"]),
        dropout=kwargs.get("dropout", 0.0),
        num_heads=kwargs.get("num_heads", 1),
        num_head_channels=kwargs.get("num_head_channels", -1),
        use_scale_shift_norm=kwargs.get("use_scale_shift_norm", False),
        resblock_updown=kwargs.get("resblock_updown", False),
        use_new_attention_order=kwargs.get("use_new_attention_order", False),
        conv_resample=kwargs.get("conv_resample", True),
        use_checkpoint=kwargs.get("use_checkpoint", False),
    )


def convert_official_state_dict(state_dict: dict, prefix: str = "") -> dict:
    """Official guided-diffusion / improved-diffusion UNet state_dict -> minildm `UNet` state_dict.

    Our module names are guided-diffusion's, so this is the identity on names (the one place to add a
    renaming if ever needed). `prefix` (e.g. "module.") is stripped; keys without it raise a KeyError.
    Values are passed through untouched (tensors, or shapes when checking a key manifest).
    """
    converted = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            raise KeyError(f"checkpoint key {key!r} does not start with the expected prefix {prefix!r}")
        converted[key[len(prefix):]] = value
    return converted


def describe(model: UNet) -> str:
    """A table of the UNet block by block (output channels x side, parameters), then parameters per level."""
    rows = [f"{'block':<18} {'output':>14} {'params':>13}  layers"]
    for name, module in model.named_children():
        blocks = list(module.named_children()) if isinstance(module, nn.ModuleList) else [(None, module)]
        for index, block in blocks:
            key = name if index is None else f"{name}.{index}"
            ch, side = model.block_shapes.get(key, (None, None))
            shape = f"{ch} x {side}x{side}" if ch is not None else ""
            if isinstance(block, nn.Embedding):
                kinds = "Embedding"
            elif key == "time_embed":
                kinds = "Linear, SiLU, Linear"
            else:
                kinds = ", ".join(type(layer).__name__ for layer in block.children())
            rows.append(f"{key:<18} {shape:>14} {count_parameters(block):>13,}  {kinds}")
    rows += ["", f"{'level (side)':<18} {'down path':>14} {'up path':>13}"]
    for side, (down, up) in parameters_per_level(model).items():
        rows.append(f"{f'{side}x{side}':<18} {down:>14,} {up:>13,}")
    rows.append(f"{'middle':<18} {count_parameters(model.middle_block):>14,}")
    rows.append(f"{'total':<18} {count_parameters(model):>14,}")
    return "\n".join(rows)


def parameters_per_level(model: UNet) -> dict[int, tuple[int, int]]:
    """{feature-map side of each level: (down-path params, up-path params)}.

    A level is one entry of channel_mult; its downsampler (and, on the way up, its upsampler) counts
    with it. The middle block, time/label embeddings and `out` are not in any level.
    """
    levels: dict[int, list[int]] = {}
    for name in ("input_blocks", "output_blocks"):
        for index, block in enumerate(getattr(model, name)):
            level = model.block_levels[f"{name}.{index}"]
            counts = levels.setdefault(model.config.image_size // 2**level, [0, 0])
            counts[name == "output_blocks"] += count_parameters(block)
    return {side: (down, up) for side, (down, up) in sorted(levels.items(), reverse=True)}


def _autocast(device_type: str) -> bool:
    """Whether torch.autocast is active for `device_type` (the argument exists from torch 2.4 on)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()
