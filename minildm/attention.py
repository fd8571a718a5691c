"""Attention blocks: the ADM self-attention block of the pixel-space UNets, and LDM's cross-attention
`SpatialTransformer` (at the end of this file) that a latent-diffusion UNet puts in its place.

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


# ---------------------------------------------------------------------------------------------
# LDM's cross-attention (ldm/modules/attention.py): the SpatialTransformer that stands where AttentionBlock
# stands in a latent-diffusion UNet with context_dim, under LDM's state_dict names


class CrossAttention(nn.Module):
    """Multi-head attention of x [N, T, query_dim] over context [N, L, context_dim] (over x itself if None).

    q = to_q(x), k = to_k(context), v = to_v(context) (no biases), heads of dim_head channels,
    softmax(q k^T / sqrt(dim_head)) v through `scaled_dot_product_attention`, then to_out (Linear + Dropout).
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner, context_dim = heads * dim_head, context_dim or query_dim
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        n = x.shape[0]
        q, k, v = (t.view(n, -1, self.heads, self.dim_head).transpose(1, 2)  # [N, heads, tokens, dim_head]
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)  # default scale dim_head^-1/2, softmax over the keys
        return self.to_out(out.transpose(1, 2).reshape(n, -1, self.heads * self.dim_head))

    def attention_weights(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The weights forward applies, softmax(q k^T / sqrt(dim_head)) over the keys: [N, heads, T, L].

        Row (h, i) says how much query position i (a pixel of the feature map) reads from each context token
        in head h: the cross-attention maps of chapter 06. forward does not materialise them (fused kernel).
        """
        context = x if context is None else context
        n = x.shape[0]
        q = self.to_q(x).view(n, -1, self.heads, self.dim_head).transpose(1, 2)
        k = self.to_k(context).view(n, -1, self.heads, self.dim_head).transpose(1, 2)
        return torch.softmax(q @ k.transpose(-1, -2) * self.dim_head**-0.5, dim=-1)


class GEGLU(nn.Module):
    """proj(x) split into a value half and a gate half (value first): value * GELU(gate) (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)  # exact (erf) GELU, as LDM


class FeedForward(nn.Module):
    """LDM's FeedForward(dim, mult=4, glu=True): GEGLU to 4 dim, Dropout, Linear back to dim (`net.0`, `net.2`)."""

    def __init__(self, dim: int, dropout: float = 0.0, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block on tokens [N, T, dim]: self-attention, cross-attention on the context, FF.

    x = x + attn1(LN(x));  x = x + attn2(LN(x), context);  x = x + ff(LN(x))   (LayerNorm eps 1e-5)
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=heads, dim_head=dim_head, dropout=dropout)  # self-attention
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """LDM's SpatialTransformer: x [N, C, H, W], context [N, L, context_dim] -> [N, C, H, W].

    GroupNorm (plain, eps 1e-6), 1x1 proj_in to heads * dim_head channels, the H*W pixels as tokens through
    `depth` BasicTransformerBlocks, 1x1 proj_out (zero-initialised: the block starts as the identity), + x.
    use_checkpoint: recompute the block in backward (`torch.utils.checkpoint`, as LDM's `checkpoint=True`).
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int = 1, context_dim: int | None = None,
                 dropout: float = 0.0, norm_groups: int = 32, use_checkpoint: bool = False):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        inner = heads * dim_head
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim=context_dim, dropout=dropout)
             for _ in range(depth)])
        self.proj_out = zero_module(nn.Conv2d(inner, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        n, _, height, width = x.shape
        h = self.proj_in(self.norm(x))
        inner = h.shape[1]
        h = h.flatten(2).transpose(1, 2)  # [N, H*W, inner]: every pixel a token
        for block in self.transformer_blocks:
            h = block(h, context)
        return self.proj_out(h.transpose(1, 2).reshape(n, inner, height, width)) + x
