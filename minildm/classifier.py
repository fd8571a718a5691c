"""ADM's noise-aware classifier p(y | x_t, t): the UNet's down half and middle, then a pooling head.

`Classifier(ClassifierConfig)` follows guided-diffusion's `EncoderUNetModel` (openai/guided-diffusion, unet.py),
with its state_dict names, so the released classifiers (64x64_classifier.pt ... 512x512_classifier.pt) load
with `strict=True`. It is built from the UNet's own blocks (minildm.unet, minildm.attention):

    time_embed        sinusoidal t-embedding -> Linear(C, 4C) -> SiLU -> Linear(4C, 4C)          [N, 4C]
    input_blocks      exactly the UNet's: [conv_in] then per level num_res_blocks x (ResBlock
                      [+ AttentionBlock]) and a downsampler except at the last level
    middle_block      ResBlock, AttentionBlock, ResBlock                                      [N, C', s, s]
    out               the head, chosen by `pool`:
      "attention"     GN, SiLU, AttentionPool2d: CLIP-style attention of one query (the spatial mean,
                      plus a learned positional embedding) over the s*s pixels            (ADM's classifiers)
      "adaptive"      GN, SiLU, global average pool, zero-initialised 1x1 conv, Flatten
      "spatial"       the spatial mean of every input block's and the middle block's output, concatenated
                      [N, F], then Linear(F, 2048), ReLU, Linear(2048, classes)
      "spatial_v2"    as "spatial" with Linear(F, 2048), GroupNorm, SiLU, Linear(2048, classes)

forward(x_t [N, C, H, W], t int64 [N]) -> logits [N, out_channels]. Classifier guidance (ADM Sec. 4,
Alg. 1-2) differentiates log softmax(logits)[y] with respect to x_t.

Convention: `attention_resolutions` are feature-map sides (16 means 16x16), as in the UNet;
guided-diffusion's constructor takes downsample factors, and `config_from_original` converts.
"""

from __future__ import annotations

import torch
from torch import nn

from minildm.attention import AttentionBlock, num_heads_for, qkv_attention
from minildm.config import ClassifierConfig
from minildm.layers import normalization, timestep_embedding_adm, zero_module
from minildm.unet import (Downsample, ResBlock, TimestepEmbedSequential, check_image_input, check_levels,
                          convert_official_state_dict, original_shared_fields)

POOLS = ("attention", "adaptive", "spatial", "spatial_v2")
SPATIAL_WIDTH = 2048  # hidden width of the "spatial" heads, fixed in guided-diffusion

# Our names are guided-diffusion's, so the UNet's converter (the identity on names, strips a prefix) serves
# the classifier too; re-exported so `classifier.convert_official_state_dict` reads like `unet.`'s.
__all__ = ["POOLS", "AttentionPool2d", "Classifier", "config_from_original", "convert_official_state_dict"]


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling (guided-diffusion `AttentionPool2d`): [N, C, s, s] -> [N, out_channels].

    The tokens are the spatial mean followed by the s*s pixels, plus `positional_embedding` [C, s*s + 1];
    one multi-head attention (heads = C // num_head_channels, q/k/v channels in the new [q | k | v] order,
    whatever the rest of the network uses), `c_proj`, and the mean token's output is the result.
    """

    def __init__(self, side: int, channels: int, num_head_channels: int, out_channels: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(channels, side**2 + 1) / channels**0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_channels, 1)
        self.num_heads = num_heads_for(channels, num_head_channels=num_head_channels)
        self.side = side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, *_ = x.shape
        x = x.reshape(n, c, -1)  # [N, C, s*s]
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)  # [N, C, s*s + 1], token 0 = the mean
        x = x + self.positional_embedding[None].to(x.dtype)
        h = qkv_attention(self.qkv_proj(x), self.num_heads, new_order=True)  # [N, C, s*s + 1]
        return self.c_proj(h)[:, :, 0]

    def extra_repr(self) -> str:
        return f"side={self.side}, heads={self.num_heads}"


class Classifier(nn.Module):
    """ADM noise-aware classifier: classifier(x_t, t) -> logits [N, out_channels]; layout in the module doc.

    x_t: [N, in_channels, H, W] noisy images (H = W = image_size for pool="attention", whose positional
    embedding fixes the side; any side divisible by 2^(levels-1) otherwise); t: int64 [N] or a scalar.
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        _check_config(config)
        self.config = config
        base, emb_dim = config.channels, 4 * config.channels
        attention = dict(num_heads=config.num_heads, num_head_channels=config.num_head_channels,
                         use_new_attention_order=config.use_new_attention_order,
                         use_checkpoint=config.use_checkpoint, norm_groups=config.norm_groups)
        resblock = dict(emb_channels=emb_dim, dropout=config.dropout, use_checkpoint=config.use_checkpoint,
                        use_scale_shift_norm=config.use_scale_shift_norm, norm_groups=config.norm_groups)

        self.time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        # Down path, block for block the UNet's. `widths` collects each block's output width: the
        # "spatial" heads read the spatial mean of all of them.
        ch, side = int(config.channel_mult[0] * base), config.image_size
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(config.in_channels, ch, 3, padding=1))])
        widths = [ch]
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers = [ResBlock(ch, out_channels=int(mult * base), **resblock)]
                ch = int(mult * base)
                if side in config.attention_resolutions:
                    layers.append(AttentionBlock(ch, **attention))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                widths.append(ch)
            if level != len(config.channel_mult) - 1:
                side //= 2
                down = (ResBlock(ch, out_channels=ch, down=True, **resblock) if config.resblock_updown
                        else Downsample(ch, config.conv_resample, out_channels=ch))
                self.input_blocks.append(TimestepEmbedSequential(down))
                widths.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, **resblock), AttentionBlock(ch, **attention), ResBlock(ch, **resblock))
        widths.append(ch)

        classes, groups = config.out_channels, config.norm_groups
        if config.pool == "attention":
            self.out = nn.Sequential(normalization(ch, groups), nn.SiLU(),
                                     AttentionPool2d(side, ch, config.num_head_channels, classes))
        elif config.pool == "adaptive":
            self.out = nn.Sequential(normalization(ch, groups), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                                     zero_module(nn.Conv2d(ch, classes, 1)), nn.Flatten())
        elif config.pool == "spatial":
            self.out = nn.Sequential(nn.Linear(sum(widths), SPATIAL_WIDTH), nn.ReLU(),
                                     nn.Linear(SPATIAL_WIDTH, classes))
        else:  # spatial_v2 (checked in _check_config)
            self.out = nn.Sequential(nn.Linear(sum(widths), SPATIAL_WIDTH), normalization(SPATIAL_WIDTH, groups),
                                     nn.SiLU(), nn.Linear(SPATIAL_WIDTH, classes))
        self.feature_side = side  # side of the middle block's output (image_size // 2^(levels-1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits [N, out_channels] of p(y | x_t, t) for x_t [N, C, H, W] at timesteps t [N]."""
        maps = self._feature_maps(x_t, self._check_inputs(x_t, t))
        if self.config.pool.startswith("spatial"):  # the spatial mean of every map, [N, sum of widths]
            return self.out(torch.cat([h.mean(dim=(2, 3)) for h in maps], dim=-1))
        return self.out(maps[-1])

    def feature_maps(self, x_t: torch.Tensor, t) -> list[torch.Tensor]:
        """The output of every input block and of the middle block, [N, C_i, H_i, W_i] each: what the "spatial"
        pools average, and what a perceptual distance compares (`autoencoder_loss.ClassifierFeatureDistance`).
        The head is not run, so any side divisible by 2^(levels - 1) works, whatever the pool."""
        cfg = self.config
        t = check_image_input(x_t, t, self.input_blocks[0][0].weight, in_channels=cfg.in_channels,
                              levels=len(cfg.channel_mult), section="classifier", name="classifier")
        return self._feature_maps(x_t, t)

    def _feature_maps(self, x_t: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        if self.config.time_scale != 1.0:  # as the UNet: embed t * time_scale
            t = t.float() * self.config.time_scale
        emb = timestep_embedding_adm(t, self.config.channels)  # [N, C], float32
        emb = self.time_embed(emb.to(self.time_embed[0].weight.dtype))  # [N, 4C]
        maps, h = [], x_t
        for block in self.input_blocks:
            h = block(h, emb)
            maps.append(h)
        maps.append(self.middle_block(h, emb))
        return maps

    def _check_inputs(self, x_t, t) -> torch.Tensor:
        """Raise a ValueError that says what to change; return t as a [N] tensor."""
        cfg = self.config
        t = check_image_input(x_t, t, self.input_blocks[0][0].weight, in_channels=cfg.in_channels,
                              levels=len(cfg.channel_mult), section="classifier", name="classifier")
        if cfg.pool == "attention" and tuple(x_t.shape[-2:]) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"x_t must be {cfg.image_size}x{cfg.image_size} (classifier.image_size): the attention "
                             f"pool's positional embedding fixes the side; got {tuple(x_t.shape[-2:])}. Resize the "
                             "images, or use pool='adaptive' for other sizes")
        return t


def _check_config(config: ClassifierConfig) -> None:
    """Reject configurations the classifier would otherwise build silently wrong (messages name the field)."""
    if config.pool not in POOLS:
        raise ValueError(f"classifier.pool={config.pool!r} is not one of {', '.join(map(repr, POOLS))}")
    if config.pool == "attention" and config.num_head_channels <= 0:
        raise ValueError("classifier.pool='attention' needs classifier.num_head_channels > 0 (the attention pool's "
                         "heads are channels // num_head_channels; ADM uses 64)")
    check_levels(config, "classifier", "classifier")


def config_from_original(kwargs: dict) -> ClassifierConfig:
    """ClassifierConfig equivalent to guided-diffusion `EncoderUNetModel(**kwargs)` (its defaults included).

    The originals' attention *downsample factors* become feature-map sides (side = image_size // factor).
    """
    return ClassifierConfig(**original_shared_fields(kwargs), in_channels=kwargs["in_channels"],
                            out_channels=kwargs["out_channels"], pool=kwargs.get("pool", "adaptive"))
