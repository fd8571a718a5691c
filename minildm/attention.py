"""Attention blocks. Here: the ADM self-attention block of the pixel-space UNets.

`AttentionBlock` is guided-diffusion's `AttentionBlock` (parameter names `norm`, `qkv`, `proj_out`, so
official weights load strictly). One 1x1 convolution produces all of q, k and v, 3C channels; how those
3C channels are split into heads is part of the *weight layout* and differs between checkpoints:

- legacy order (`QKVAttentionLegacy`; DDPM-style, iDDPM, every released ADM model except 64x64):
  heads first, each head's channels are [q_h | k_h | v_h];
- new order (`QKVAttention`, `use_new_attention_order=True`; the ADM 64x64 model):
  [all q | all k | all v], then each of q, k, v is split into heads.

The originals scale q and k each by ch^(-1/4) and take the softmax in float32 (to survive fp16);
mathematically that is softmax(q^T k / sqrt(ch)) v, which is exactly what PyTorch's
`scaled_dot_product_attention` computes with its default scale (and its fused kernels accumulate the
softmax in float32). tests/test_unet.py checks the parity against the original forward passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minildm.layers import normalization, zero_module


def num_heads_for(channels: int, num_heads: int = 1, num_head_channels: int = -1) -> int:
    """Heads of an attention layer: `channels // num_head_channels` if that is > 0, else `num_heads`."""
    if num_head_channels > 0:
        if channels % num_head_channels:
            raise ValueError(
                f"attention over {channels} channels cannot use num_head_channels={num_head_channels} "
                f"({channels} is not a multiple); pick a num_head_channels that divides every level's width"
            )
        return channels // num_head_channels
    if num_heads < 1 or channels % num_heads:
        raise ValueError(f"attention over {channels} channels cannot use num_heads={num_heads}; pick a divisor")
    return num_heads


def qkv_attention(qkv: torch.Tensor, num_heads: int, new_order: bool = False) -> torch.Tensor:
    """Multi-head self-attention from stacked q, k, v: [N, 3C, T] -> [N, C, T].

    `new_order=False` reads the channels as heads of [q_h | k_h | v_h] (QKVAttentionLegacy);
    `new_order=True` as [q | k | v] each split into heads (QKVAttention). softmax(q^T k / sqrt(ch)) v.
    """
    n, width, length = qkv.shape
    ch = width // (3 * num_heads)
    # SDPA's fused kernels (flash / memory-efficient, CPU and CUDA) need 4-D [N, heads, T, ch] inputs with
    # unit stride along ch; anything else falls back to the slow "math" path (bmm, softmax, masking).
    # So make the tokens contiguous once and take q, k, v as views of them.
    tokens = qkv.transpose(1, 2).contiguous()  # [N, T, 3C]
    if new_order:
        q, k, v = tokens.view(n, length, 3, num_heads, ch).permute(2, 0, 3, 1, 4)  # each [N, H, T, ch]
    else:
        q, k, v = tokens.view(n, length, num_heads, 3, ch).permute(3, 0, 2, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(ch); [N, H, T, ch]
    return out.permute(0, 1, 3, 2).reshape(n, num_heads * ch, length)


class AttentionBlock(nn.Module):
    """Residual self-attention over the pixels of a feature map: x + proj_out(attention(qkv(GN(x)))).

    x: [N, C, H, W] -> [N, C, H, W]. Heads from `num_head_channels` (if > 0) or `num_heads`.
    `proj_out` starts at zero, so the block starts as the identity.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_new_attention_order: bool = False, use_checkpoint: bool = False, norm_groups: int = 32):
        super().__init__()
        self.channels = channels
        self.num_heads = num_heads_for(channels, num_heads, num_head_channels)
        self.use_new_attention_order = use_new_attention_order
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels, norm_groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, *spatial = x.shape
        x = x.reshape(n, c, -1)  # [N, C, T], T = H*W tokens
        h = qkv_attention(self.qkv(self.norm(x)), self.num_heads, self.use_new_attention_order)
        return (x + self.proj_out(h)).reshape(n, c, *spatial)

    def extra_repr(self) -> str:
        order = "new [q|k|v]" if self.use_new_attention_order else "legacy [q_h|k_h|v_h]"
        return f"channels={self.channels}, heads={self.num_heads}, qkv order={order}"
