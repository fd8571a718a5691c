"""LDM's first-stage losses: L1 + perceptual distance, KL or codebook term, and a PatchGAN with an adaptive weight.

Reproduces latent-diffusion's `LPIPSWithDiscriminator` (ldm/modules/losses/contperceptual.py, the KL autoencoder)
and taming-transformers' `VQLPIPSWithDiscriminator` (taming/modules/losses/vqperceptual.py, the VQ autoencoder),
with taming's discriminator (taming/modules/discriminator/model.py) under its state_dict names:

    rec      = |x - x_rec| + perceptual_weight * d(x, x_rec)                 [N, C, H, W] (d broadcast per image)
    KL:  nll = rec / exp(logvar) + logvar,   loss = sum(nll) / N + kl_weight * sum(KL) / N
    VQ:  nll = rec,                          loss = mean(nll) + codebook_weight * codebook_loss
    both:                                    loss += d_weight * disc_factor * g_loss,  g_loss = -mean(D(x_rec))
    d_weight = disc_weight * |grad_w nll_loss| / (|grad_w g_loss| + 1e-4), w = the decoder's last conv weight
    disc_factor = 0 before step disc_start, then cfg.disc_factor;  D's loss: disc_factor * hinge(D(x), D(x_rec))

    >>> loss = AutoencoderLoss(config.autoencoder_loss, kind="kl")
    >>> x_rec, posterior = ae(x)
    >>> losses, log = loss.generator_loss(x, x_rec, posterior, step, last_layer=ae.last_layer)  # [N]; step the AE
    >>> d_loss, d_log = loss.discriminator_loss(x, x_rec, step)                                  # scalar; step D

The perceptual distance d is `LPIPS` (the real thing: torchmetrics' LPIPS with torchvision's ImageNet VGG16,
a download) or, offline, `ClassifierFeatureDistance` (the LPIPS formula on the shipped shapes classifier's
features; not LPIPS, and named so everywhere).
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from minildm.autoencoder import KINDS
from minildm.config import AutoencoderLossConfig

CLASSIFIER_PATH = Path(__file__).resolve().parents[1] / "data" / "checkpoints" / "shapes-classifier.safetensors"
PERCEPTUAL = ("lpips", "classifier_features", "none")
DISC_LOSSES = ("hinge", "vanilla")

__all__ = ["LPIPS", "AutoencoderLoss", "ClassifierFeatureDistance", "NLayerDiscriminator",
           "PerceptualWeightsUnavailable", "adaptive_weight", "adopt_weight",
           "hinge_d_loss", "lpips_weights_path", "patch_side", "perceptual_loss", "vanilla_d_loss", "weights_init"]


# ---------------------------------------------------------------------------------------------
# The PatchGAN discriminator (taming's NLayerDiscriminator, pix2pix's PatchGAN)


class NLayerDiscriminator(nn.Module):
    """Pix2pix's PatchGAN, as taming builds it: images [N, C, H, W] -> one logit per patch [N, 1, h, w].

    `main` = Conv(C, ch, 4, s2, p1), LeakyReLU(0.2); for n = 1 .. num_layers-1: Conv(ch*m(n-1), ch*m(n), 4, s2,
    p1, no bias), BatchNorm, LeakyReLU(0.2); Conv(.., ch*m(num_layers), 4, s1, p1, no bias), BatchNorm,
    LeakyReLU(0.2); Conv(.., 1, 4, s1, p1), with m(n) = min(2^n, 8). Each stride-2 conv halves the side, the two
    stride-1 convs take 1 each (`patch_side`): 3 layers turn 32x32 into 2x2 logits, 256x256 into 30x30.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"disc_num_layers={num_layers}: the discriminator needs at least 1 layer (LDM uses 3)")
        self.num_layers = num_layers
        layers = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers):  # widen while halving the side
            mult_prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(channels * mult_prev, channels * mult, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
        mult_prev, mult = mult, min(2**num_layers, 8)
        layers += [nn.Conv2d(channels * mult_prev, channels * mult, 4, stride=1, padding=1, bias=False),
                   nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1)]  # one logit per patch
        self.main = nn.Sequential(*layers)  # taming's name: the state_dict reads main.0.weight ...

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch logits [N, 1, h, w] for images [N, C, H, W]; h, w = patch_side(H / W, num_layers)."""
        side = min(x.shape[-2:])
        if patch_side(side, self.num_layers) < 1:
            fits = max((n for n in range(1, self.num_layers) if patch_side(side, n) >= 1), default=None)
            change = (f"use autoencoder_loss.disc_num_layers={fits} (or fewer)" if fits is not None
                      else "no disc_num_layers fits; train on larger images")
            smallest = next(s for s in range(side, 2**(self.num_layers + 3)) if patch_side(s, self.num_layers) >= 1)
            raise ValueError(f"images of side {side} are too small for a {self.num_layers}-layer PatchGAN: its patch "
                             f"output would be empty (it needs sides >= {smallest}); {change}")
        return self.main(x)


def patch_side(side: int, num_layers: int) -> int:
    """Side of the discriminator's logit map for inputs of side `side`: num_layers halvings, then two -1 convs."""
    for _ in range(num_layers):
        side = (side - 2) // 2 + 1  # Conv(4, stride 2, padding 1)
    return side - 2  # two Conv(4, stride 1, padding 1)


def weights_init(module: nn.Module) -> None:
    """taming's init, for `discriminator.apply`: conv weights ~ N(0, 0.02); BatchNorm weight ~ N(1, 0.02), bias 0."""
    name = type(module).__name__
    if "Conv" in name:
        nn.init.normal_(module.weight.data, 0.0, 0.02)  # conv biases keep PyTorch's default, as in taming
    elif "BatchNorm" in name:
        nn.init.normal_(module.weight.data, 1.0, 0.02)
        nn.init.constant_(module.bias.data, 0)


# ---------------------------------------------------------------------------------------------
# GAN losses and weights (taming's vqperceptual.py)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))), a scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss of the discriminator: 0.5 * (mean softplus(-D(x)) + mean softplus(D(x_rec)))."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adopt_weight(weight: float, step: int, threshold: int = 0, value: float = 0.0) -> float:
    """`value` before step `threshold`, `weight` from then on (how the GAN terms are switched on at disc_start)."""
    return value if step < threshold else weight


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float) -> torch.Tensor:
    """VQGAN's adaptive GAN weight (Esser et al. 2021, Eq. 7): disc_weight * |grad nll| / (|grad g_loss| + 1e-4).

    Gradients are taken at `last_layer` (the decoder's last conv weight), clamped to [0, 1e4] and detached, so
    the GAN gradient reaching the decoder has the size of the reconstruction gradient whatever the loss scales.
    """
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(d_weight, 0.0, 1e4).detach() * disc_weight


# ---------------------------------------------------------------------------------------------
# Perceptual distances: (x, x_rec) in [-1, 1], [N, 3, H, W] -> [N]


class PerceptualWeightsUnavailable(RuntimeError):
    """LPIPS's ImageNet backbone weights are neither in torch hub's cache nor downloadable (an offline machine)."""


def lpips_weights_path(net: str = "vgg") -> Path:
    """Where torchvision caches the backbone's ImageNet weights: $TORCH_HOME/hub/checkpoints/<file of the URL>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(_backbone_url(net)).name


def _backbone_url(net: str) -> str:
    import torchvision
    from torchmetrics.functional.image.lpips import _weight_map

    names = {"vgg": "vgg16", "alex": "alexnet", "squeeze": "squeezenet1_1"}
    if net not in names:
        raise ValueError(f"LPIPS net={net!r} is not one of {', '.join(map(repr, names))} (LDM uses 'vgg')")
    return getattr(torchvision.models, _weight_map[names[net]]).DEFAULT.url


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018), the distance LDM trains with: torchmetrics' port, v0.1 linear heads, [N].

    d(x, y) = sum_l mean_hw w_l . (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|)^2 over 5 VGG16 layers (relu1_2 ..
    relu5_3), f normalised over channels, w_l the learned heads (shipped inside torchmetrics). Inputs in [-1, 1]
    are not range-checked (decoder outputs overshoot while training), the net stays in eval mode with frozen
    weights and is differentiable w.r.t. both inputs. The backbone's ImageNet weights are torchvision's, read from
    `lpips_weights_path(net)` or downloaded there; if neither works: `PerceptualWeightsUnavailable`.
    """

    def __init__(self, net: str = "vgg"):
        super().__init__()
        from torchmetrics.functional.image.lpips import _NoTrainLpips

        path, url = lpips_weights_path(net), _backbone_url(net)
        try:
            self.lpips = _NoTrainLpips(net=net)  # loads the heads, then torchvision's weights (cache or download)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:  # URLError is an OSError
            reason = (f"the file there cannot be read ({error}); delete it and download it again" if path.is_file()
                      else f"it is not there and the download failed: {error}")
            raise PerceptualWeightsUnavailable(
                f"LPIPS needs torchvision's ImageNet {net} weights {path.name} at {path}: {reason}. On a machine "
                f"with internet download {url} and put it in {path.parent}/ (torch hub's checkpoints folder, "
                f"$TORCH_HOME/hub/checkpoints; set TORCH_HOME to use another folder). Offline, set "
                "autoencoder_loss.perceptual=classifier_features (distances of the shipped shapes classifier's "
                "features: a substitute, not LPIPS) or autoencoder_loss.perceptual=none") from error
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always eval: LPIPS's heads have dropout

    def forward(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per image [N] between x and x_rec, both [N, 3, H, W] in [-1, 1]."""
        _check_pair(x, x_rec, "LPIPS")
        return self.lpips(x, x_rec).reshape(len(x))


class ClassifierFeatureDistance(nn.Module):
    """The offline substitute for LPIPS: LPIPS's formula on the shipped shapes classifier's feature maps, [N].

    d(x, y) = sum_i mean_hw sum_c (f_i(x) / |f_i(x)| - f_i(y) / |f_i(y)|)^2, f_i = Classifier.feature_maps
    at t = 0 (clean images), normalised over channels; no learned heads (LPIPS's unweighted "baseline", its
    lpips=False). The classifier (data/checkpoints/shapes-classifier.safetensors, EMA weights) was trained on
    the noised shapes data; it stays frozen and in eval mode, and the distance is differentiable w.r.t. x_rec.
    Not the shapes evaluator: the reconstruction Fréchet distance (metrics.reconstruction_distance) is
    measured on the evaluator's features, and training against them would game that metric.
    """

    def __init__(self, classifier: nn.Module | None = None, path=CLASSIFIER_PATH):
        super().__init__()
        if classifier is None:
            from minildm import checkpoints

            loaded = checkpoints.load(path)
            classifier = loaded.ema if loaded.ema is not None else loaded.model
            if loaded.config.model != "classifier":
                raise ValueError(f"{path} holds a {loaded.config.model!r} model, not a noise-aware classifier; "
                                 "ClassifierFeatureDistance needs a minildm.classifier.Classifier checkpoint")
        self.classifier = classifier.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ClassifierFeatureDistance:
        return super().train(False)  # a fixed measuring instrument

    def forward(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        """Distance per image [N] between x and x_rec, both [N, 3, H, W] in [-1, 1]."""
        _check_pair(x, x_rec, "ClassifierFeatureDistance")
        # One pass over both halves: the classifier normalises per image (GroupNorm), so batching does not mix them.
        maps = self.classifier.feature_maps(torch.cat([x, x_rec]), 0)
        distance = 0.0
        for features in maps:
            unit = features / torch.sqrt(1e-8 + features.square().sum(dim=1, keepdim=True))  # LPIPS's normalize
            a, b = unit.chunk(2)
            distance = distance + (a - b).square().sum(dim=1).mean(dim=(1, 2))  # [N]
        return distance


def perceptual_loss(name: str) -> nn.Module | None:
    """The perceptual distance of `autoencoder_loss.perceptual`: "lpips", "classifier_features" or "none" (None)."""
    if name == "lpips":
        return LPIPS("vgg")
    if name == "classifier_features":
        return ClassifierFeatureDistance()
    if name == "none":
        return None
    raise ValueError(f"autoencoder_loss.perceptual={name!r} is not one of {', '.join(map(repr, PERCEPTUAL))}")


def _check_pair(x: torch.Tensor, x_rec: torch.Tensor, name: str) -> None:
    if x.shape != x_rec.shape or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} compares RGB images [N, 3, H, W] of equal shape; got {tuple(x.shape)} and "
                         f"{tuple(x_rec.shape)}")


# ---------------------------------------------------------------------------------------------
# The loss


class AutoencoderLoss(nn.Module):
    """LDM's first-stage loss for an autoencoder of `kind` "kl" (LPIPSWithDiscriminator) or "vq" (taming's VQ).

    Holds `discriminator` (NLayerDiscriminator after `weights_init`; the one module training checkpoints save)
    and `logvar` (a scalar Parameter = logvar_init). LDM declares logvar learnable but its configure_optimizers
    hands only the autoencoder's and the discriminator's parameters to optimisers, so in LDM it stays at
    logvar_init; here it has requires_grad=False to say so (to learn it, set it True and give it to the
    autoencoder's optimiser). The frozen perceptual net is `self.perceptual`, outside parameters() and
    state_dict(); `.to()` / `.half()` move it too (and generator_loss moves it to the inputs' device if a loop
    moved only the discriminator), `.train()` leaves it in eval mode.
    """

    def __init__(self, loss_config: AutoencoderLossConfig, kind: str, image_channels: int = 3):
        super().__init__()
        cfg = self.config = loss_config
        if kind not in KINDS:
            raise ValueError(f"autoencoder.kind={kind!r} is not one of {', '.join(map(repr, KINDS))}")
        if cfg.disc_loss not in DISC_LOSSES:
            raise ValueError(f"autoencoder_loss.disc_loss={cfg.disc_loss!r} is not one of "
                             f"{', '.join(map(repr, DISC_LOSSES))}")
        if cfg.perceptual not in PERCEPTUAL:
            raise ValueError(f"autoencoder_loss.perceptual={cfg.perceptual!r} is not one of "
                             f"{', '.join(map(repr, PERCEPTUAL))}")
        use_perceptual = cfg.perceptual != "none" and cfg.perceptual_weight > 0
        if use_perceptual and image_channels != 3:
            raise ValueError(f"autoencoder_loss.perceptual={cfg.perceptual!r} reads RGB images but the autoencoder "
                             f"has {image_channels} channels; set autoencoder_loss.perceptual=none")
        self.kind = kind
        self.discriminator = NLayerDiscriminator(image_channels, cfg.disc_channels, cfg.disc_num_layers)
        self.discriminator.apply(weights_init)
        self.logvar = nn.Parameter(torch.full((), float(cfg.logvar_init)), requires_grad=False)
        self.d_loss = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss
        # Stored past nn.Module's registration: no parameters(), no state_dict() entries, no .train() (see _apply).
        object.__setattr__(self, "perceptual", perceptual_loss(cfg.perceptual) if use_perceptual else None)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.perceptual is not None:  # .to(device) / .half() / .cuda() move the unregistered perceptual net too
            self.perceptual._apply(fn, recurse)
        return self

    def disc_factor_at(self, step: int) -> float:
        """The GAN terms' factor at `step`: 0 before autoencoder_loss.disc_start, then disc_factor."""
        return adopt_weight(self.config.disc_factor, step, threshold=self.config.disc_start)

    def generator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, regulariser, step: int,
                       last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The autoencoder's loss per example [N] and LDM's logged scalars; mean(losses) is LDM's scalar loss.

        inputs, reconstructions: [N, C, H, W] in [-1, 1]. regulariser: the posterior (`.kl()` -> [N]) for "kl",
        the codebook loss (a scalar tensor) for "vq". last_layer: the decoder's last conv weight (`ae.last_layer`),
        needed in training mode once the GAN is on. Per example i:
          KL: sum_{chw} nll_i + kl_weight * KL_i + d_weight * disc_factor * g_i
          VQ: mean_{chw} rec_i + codebook_weight * codebook_loss + d_weight * disc_factor * g_i
        with g_i = -mean_{hw} D(x_rec_i): their mean over i is LDM's (sum nll / N + ...) and taming's (mean rec +
        ...). Deviations, all without effect on the loss or its gradients: before disc_start (disc_factor = 0)
        the discriminator is not run (LDM runs it and multiplies by 0; only D's BatchNorm running statistics see
        fewer batches), and d_weight and g_loss are logged as 0; in eval mode d_weight = 0 (LDM's fallback when
        validation runs without a graph, as Lightning's does); while D runs, its parameters are frozen, as
        Lightning's toggle_optimizer freezes them in LDM's generator step, so no gradients land on them.
        """
        cfg = self.config
        _check_images(inputs, reconstructions, self.discriminator.main[0].in_channels)
        n = len(inputs)
        rec = torch.abs(inputs.contiguous() - reconstructions.contiguous())  # [N, C, H, W]
        p_loss = torch.zeros(n, device=inputs.device, dtype=rec.dtype)
        if self.perceptual is not None:
            if next(self.perceptual.parameters()).device != inputs.device:  # a loop that moved only the discriminator
                self.perceptual.to(inputs.device)
            p_loss = self.perceptual(inputs.contiguous(), reconstructions.contiguous())  # [N]
            rec = rec + cfg.perceptual_weight * p_loss.view(n, 1, 1, 1)  # one distance per image, at every pixel

        if self.kind == "kl":
            if not callable(getattr(regulariser, "kl", None)):
                raise TypeError("a 'kl' autoencoder's loss needs the posterior (ae.encode(x), with .kl()) as "
                                f"regulariser; got {type(regulariser).__name__}")
            nll = rec / torch.exp(self.logvar) + self.logvar
            nll_per_example = nll.flatten(1).sum(dim=1)  # LDM sums over pixels and averages over the batch
            kl = regulariser.kl()  # [N]
            regularisation = cfg.kl_weight * kl
            log = {"logvar": self.logvar.item(), "kl_loss": kl.detach().mean().item()}
        else:
            codebook_loss = torch.as_tensor(regulariser)
            nll_per_example = rec.flatten(1).mean(dim=1)  # taming takes the mean over every element
            regularisation = cfg.codebook_weight * codebook_loss.mean()
            log = {"quant_loss": codebook_loss.detach().mean().item(), "p_loss": p_loss.detach().mean().item()}
        nll_loss = nll_per_example.mean()

        # The GAN part: the discriminator joins at disc_start, weighted so its gradient matches the nll's.
        disc_factor = self.disc_factor_at(step)
        g_per_example = torch.zeros_like(nll_per_example)
        d_weight = torch.zeros((), device=inputs.device)
        if disc_factor > 0:
            with _frozen(self.discriminator):
                logits_fake = self.discriminator(reconstructions.contiguous())  # [N, 1, h, w]
            g_per_example = -logits_fake.flatten(1).mean(dim=1)
            if self.training:
                d_weight = self._adaptive_weight(nll_loss, g_per_example.mean(), last_layer)
        losses = nll_per_example + regularisation + d_weight * disc_factor * g_per_example

        log = {"total_loss": losses.detach().mean().item(), **log, "nll_loss": nll_loss.item(),
               "rec_loss": rec.detach().mean().item(), "d_weight": d_weight.item(), "disc_factor": float(disc_factor),
               "g_loss": g_per_example.detach().mean().item()}
        return losses, log

    def _adaptive_weight(self, nll_loss, g_loss, last_layer) -> torch.Tensor:
        if last_layer is None:
            raise ValueError("generator_loss needs last_layer=ae.last_layer (the decoder's last conv weight) in "
                             "training mode once the discriminator is on (step >= autoencoder_loss.disc_start): "
                             "the adaptive GAN weight compares gradients there. Call loss.eval() for validation")
        try:
            return adaptive_weight(nll_loss, g_loss, last_layer, self.config.disc_weight)
        except RuntimeError as error:
            raise RuntimeError(f"the adaptive GAN weight differentiates the losses w.r.t. last_layer and failed "
                               f"({error}); in training mode call generator_loss with gradients enabled and "
                               "last_layer=ae.last_layer, or call loss.eval() for validation") from error

    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                           step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The discriminator's loss, a scalar: disc_factor * hinge (or vanilla) loss of D(x) vs D(x_rec), + log.

        Both inputs are detached (only D learns from it). As in LDM, D runs even before disc_start, where the
        loss is 0; a loop may skip the step while `disc_factor_at(step) == 0` (only BatchNorm statistics differ).
        """
        _check_images(inputs, reconstructions, self.discriminator.main[0].in_channels)
        logits_real = self.discriminator(inputs.contiguous().detach())
        logits_fake = self.discriminator(reconstructions.contiguous().detach())
        d_loss = self.disc_factor_at(step) * self.d_loss(logits_real, logits_fake)
        log = {"disc_loss": d_loss.item(), "logits_real": logits_real.detach().mean().item(),
               "logits_fake": logits_fake.detach().mean().item()}
        return d_loss, log


@contextlib.contextmanager
def _frozen(module: nn.Module):
    """Parameters of `module` with requires_grad=False inside the block (restored after): gradients flow through."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def _check_images(inputs: torch.Tensor, reconstructions: torch.Tensor, channels: int) -> None:
    if inputs.shape != reconstructions.shape or inputs.ndim != 4 or inputs.shape[1] != channels:
        raise ValueError(f"inputs and reconstructions must both be [N, {channels}, H, W] (the discriminator's "
                         f"channels); got {tuple(inputs.shape)} and {tuple(reconstructions.shape)}")
