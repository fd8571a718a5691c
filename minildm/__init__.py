"""minildm: a small, tested PyTorch package for the DDPM -> ADM -> Latent Diffusion course."""

__version__ = "0.1.0"

from minildm import config, presets  # noqa: E402,F401
