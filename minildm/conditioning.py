"""Conditioners of latent diffusion: what turns a condition into the context tokens [N, L, D] of cross-attention.

So far the class embedder of LDM's class-conditional ImageNet model (cin256-v2); the text and layout encoders of
the latent-diffusion issue come here too.

    >>> embedder = ClassEmbedder(1001, 512)          # cin256-v2: 1000 classes + the null class (index 1000)
    >>> context = embedder(y)                        # y [N] int64 -> [N, 1, 512]: one token per image
    >>> unet(z_t, t, context=context)
"""

from __future__ import annotations

import torch
from torch import nn


class ClassEmbedder(nn.Module):
    """LDM's `ClassEmbedder` (ldm/modules/encoders/modules.py): a label becomes one context token, [N] -> [N, 1, D].

    `embedding.weight` is [n_classes, embed_dim] under LDM's name. For classifier-free guidance LDM's cin256-v2
    counts the "no class" label among the classes (n_classes 1001, index 1000): `null_label` is that index when
    the embedder was built with one (`null_class=True` means the last row is the null class).
    """

    def __init__(self, n_classes: int, embed_dim: int, null_class: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(n_classes, embed_dim)
        self.null_label = n_classes - 1 if null_class else None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.ndim != 1:
            got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"class labels must be an int64 tensor [N]; got {got}")
        n_classes = self.embedding.num_embeddings
        if y.device.type == "cpu" and y.numel() and not 0 <= int(y.min()) <= int(y.max()) < n_classes:
            raise ValueError(f"class labels must be in [0, {n_classes}) (this embedder has {n_classes} rows); got "
                             f"[{int(y.min())}, {int(y.max())}]")
        return self.embedding(y)[:, None]  # [N, 1, D]
