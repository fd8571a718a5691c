"""A small residual MLP denoiser for 2-D toy data (chapters 01-02): the UNet's job without the images.

    emb = time_embed(timestep_embedding_adm(t, time_dim))     [N, hidden]
    h   = input(x_t)                                          [N, hidden]
    h   = h + Linear(SiLU(Linear(SiLU(h)) + emb))             num_layers residual blocks
    out = output(SiLU(h))                                     [N, data_dim]  (eps, like the UNet)

Same call contract as every denoiser: model(x_t, t, y=None, context=None).
"""

from __future__ import annotations

import torch
from torch import nn

from minildm.config import MLPConfig
from minildm.layers import timestep_embedding_adm


class MLPBlock(nn.Module):
    """Residual block with the time embedding added in the middle: [N, hidden], [N, hidden] -> [N, hidden]."""

    def __init__(self, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(hidden, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        residual = self.in_layer(nn.functional.silu(h)) + emb
        return h + self.out_layer(nn.functional.silu(residual))


class MLPDenoiser(nn.Module):
    """model(x_t, t) -> model_output: x_t [N, data_dim], t [N] int64 (or a scalar) -> [N, data_dim]."""

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        if config.time_dim < 2 or config.num_layers < 1 or config.hidden < 1:
            raise ValueError(f"MLPConfig needs time_dim >= 2, num_layers >= 1, hidden >= 1; got {config}")
        self.time_embed = nn.Sequential(
            nn.Linear(config.time_dim, config.hidden), nn.SiLU(), nn.Linear(config.hidden, config.hidden))
        self.input = nn.Linear(config.data_dim, config.hidden)
        self.blocks = nn.ModuleList(MLPBlock(config.hidden) for _ in range(config.num_layers))
        self.output = nn.Linear(config.hidden, config.data_dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """Predict eps (or whatever the process trains it for) at x_t, timesteps t."""
        if x_t.ndim != 2 or x_t.shape[1] != self.config.data_dim:
            raise ValueError(f"x_t must be [N, {self.config.data_dim}] points (mlp.data_dim={self.config.data_dim}); "
                             f"got shape {tuple(x_t.shape)}")
        if y is not None or context is not None:
            raise ValueError("MLPDenoiser is unconditional: drop y= / context= (or use a class-conditional UNet)")
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must be a scalar or [{x_t.shape[0]}]; got shape {tuple(t.shape)}")
        emb = self.time_embed(timestep_embedding_adm(t, self.config.time_dim).to(x_t.dtype))
        h = self.input(x_t)
        for block in self.blocks:
            h = block(h, emb)
        return self.output(nn.functional.silu(h))
