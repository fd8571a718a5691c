"""Small building blocks shared by every network: timestep embeddings, GroupNorm32, zero init.

Two sinusoidal timestep embeddings exist in the original code bases and they are NOT the same
function, so each has its own name here:

| function                   | layout      | frequencies                  | used by                                  |
|----------------------------|-------------|------------------------------|------------------------------------------|
| `timestep_embedding_adm`   | [cos | sin] | exp(-ln(10000) * i / half)   | guided-diffusion (ADM), improved-diffusion, LDM / Stable Diffusion UNet |
| `timestep_embedding_ddpm`  | [sin | cos] | exp(-ln(10000) * i / (half-1)) | DDPM (TF `get_timestep_embedding`), LDM autoencoder `Model` |

Both follow the Transformer's positional encoding (Vaswani et al. 2017, Sec. 3.5); `half = dim // 2`,
`i = 0 .. half-1`, an odd `dim` gets one zero column at the end. Timesteps may be fractional
(improved-diffusion feeds t * 1000 / T to its 4000-step models).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding_adm(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t f) | sin(t f)], f_i = max_period^(-i/half): guided-diffusion / LDM-UNet.

    t: [N] int or float timesteps. Returns float32 [N, dim].
    """
    half = dim // 2
    # Same operation order as guided_diffusion/nn.py, so float32 results match bit for bit.
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def timestep_embedding_ddpm(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [sin(t f) | cos(t f)], f_i = max_period^(-i/(half-1)): DDPM (TF) / LDM autoencoder.

    t: [N] int or float timesteps. Returns float32 [N, dim]. Needs dim >= 4 (half - 1 > 0).
    """
    half = dim // 2
    if half < 2:
        raise ValueError(f"timestep_embedding_ddpm needs dim >= 4 (it divides by half-1); got dim={dim}")
    # Same operation order as ldm/modules/diffusionmodules/model.py::get_timestep_embedding.
    step = math.log(max_period) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -step)
    args = t.float()[:, None] * freqs[None, :]
    embedding = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        embedding = nn.functional.pad(embedding, (0, 1, 0, 0))
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (guided-diffusion's `GroupNorm32`); eps 1e-5.

    Keeps the statistics accurate when the rest of the network runs in fp16/bf16 (also when the whole
    model was cast with `.to(torch.bfloat16)`: the affine parameters are used in float32 too).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return nn.functional.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int, num_groups: int = 32, eps: float = 1e-5) -> GroupNorm32:
    """The UNet's norm layer: `GroupNorm32(num_groups, channels, eps=1e-5)`, affine (32 groups in every paper model)."""
    if channels % num_groups:
        raise ValueError(
            f"GroupNorm with {num_groups} groups needs channels divisible by {num_groups}; got {channels}. "
            f"Use unet.channels (times every channel_mult) that is a multiple of {num_groups}."
        )
    return GroupNorm32(num_groups, channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of `module` to zero and return it (output layers start as the identity residual)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (buffers excluded), like the papers and the reference manifests count them."""
    return sum(p.numel() for p in module.parameters())
