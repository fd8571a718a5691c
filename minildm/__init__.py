"""minildm: a small, tested PyTorch package for the DDPM -> ADM -> Latent Diffusion course.

The public surface is small on purpose:

    import minildm
    config = minildm.presets.get("ddpm-cifar10")
    model = minildm.build_model(config)          # an nn.Module: model(x_t, t, y=None, context=None)
    diffusion = minildm.build_diffusion(config)  # the process (not a module): q_sample, p_mean_variance, losses
"""

__version__ = "0.1.0"

from minildm import config, presets  # noqa: E402


def build_model(config, device=None):
    """Build the main network of a `Config` (UNet, toy MLP, noise-aware classifier or autoencoder, by `config.model`);
    `device="meta"` builds without memory."""
    import contextlib

    import torch

    with torch.device(device) if device is not None else contextlib.nullcontext():
        if config.model == "unet":
            from minildm.unet import UNet

            return UNet(config.unet)
        if config.model == "mlp":
            from minildm.mlp import MLPDenoiser

            return MLPDenoiser(config.mlp)
        if config.model == "classifier":
            from minildm.classifier import Classifier

            return Classifier(config.classifier)
        if config.model == "autoencoder":
            from minildm import autoencoder

            return autoencoder.build(config.autoencoder)
    raise ValueError(f"unknown model {config.model!r}; set model=unet, mlp, classifier or autoencoder")


def build_diffusion(config):
    """Build the `GaussianDiffusion` process of a `Config` (its `diffusion` section)."""
    from minildm.diffusion import GaussianDiffusion

    return GaussianDiffusion.from_config(config.diffusion)


__all__ = ["__version__", "build_diffusion", "build_model", "config", "presets"]
