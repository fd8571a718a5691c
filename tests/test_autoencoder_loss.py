"""LDM's first-stage loss (minildm.autoencoder_loss): the PatchGAN against taming's layout and a hand parameter
count, the GAN losses and the adaptive weight against closed forms, the generator loss against LDM's and
taming's scalar formulas written out literally, the perceptual distances (the shipped-classifier substitute
against its formula; LPIPS offline error and, without the network, against torchmetrics' own LPIPS)."""

import itertools
import math
import urllib.error
from dataclasses import replace

import pytest
import torch
import torch.hub
from torch import nn
from torch.nn import functional as F

from minildm import autoencoder_loss as al
from minildm.config import AutoencoderLossConfig


def _images(n=4, side=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side, side, generator=g) * 2 - 1


class _Posterior:
    """A diagonal Gaussian with the autoencoder's `.kl()`: 0.5 * sum_{chw} (mean^2 + var - 1 - logvar), [N]."""

    def __init__(self, mean, logvar):
        self.mean, self.logvar = mean, logvar

    def kl(self):
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


def _decoder(seed=0, n=4, side=32):
    """A one-conv 'decoder' z -> x_rec whose weight plays ae.last_layer; returns (conv, z, posterior)."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(8, 3, 3, padding=1)
    z = torch.randn(n, 8, side, side)
    posterior = _Posterior(torch.randn(n, 2, 4, 4, requires_grad=True), 0.3 * torch.randn(n, 2, 4, 4))
    return conv, z, posterior


SMALL = AutoencoderLossConfig(perceptual="none", kl_weight=0.01, logvar_init=0.3, disc_start=10, disc_weight=0.5,
                              disc_factor=0.7, disc_num_layers=2, disc_channels=8)


# ---------------------------------------------------------------------------------------------
# Discriminator


def _discriminator_parameters(in_channels, ndf, num_layers):
    """PatchGAN parameter count by hand: conv k=4 has in*out*16 weights (+ out biases on the first and last)."""
    widths = [ndf * min(2**n, 8) for n in range(num_layers + 1)]  # ndf, 2 ndf, 4 ndf, 8 ndf, 8 ndf ...
    total = in_channels * ndf * 16 + ndf  # first conv, with bias, no norm
    for c_in, c_out in itertools.pairwise(widths):  # bias-free convs, each followed by BatchNorm (2 * c_out)
        total += c_in * c_out * 16 + 2 * c_out
    return total + widths[-1] * 16 + 1  # the 1-channel output conv, with bias


def test_discriminator_has_taming_names_and_the_hand_counted_parameters():
    d = al.NLayerDiscriminator(3, 64, 3)
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = (["main.0.weight", "main.0.bias", "main.2.weight"] + [f"main.3.{k}" for k in bn] + ["main.5.weight"]
                + [f"main.6.{k}" for k in bn] + ["main.8.weight"] + [f"main.9.{k}" for k in bn]
                + ["main.11.weight", "main.11.bias"])
    assert list(d.state_dict()) == expected
    count = sum(p.numel() for p in d.parameters())
    assert count == _discriminator_parameters(3, 64, 3) == 2_765_633  # LDM's / taming's default discriminator
    for args in [(1, 8, 1), (3, 16, 2), (4, 8, 5)]:  # min(2^n, 8) caps the width from the 4th layer on
        assert sum(p.numel() for p in al.NLayerDiscriminator(*args).parameters()) == _discriminator_parameters(*args)


@pytest.mark.parametrize("side, num_layers", [(32, 3), (64, 3), (256, 3), (32, 2), (16, 1)])
def test_discriminator_outputs_one_logit_per_patch(side, num_layers):
    d = al.NLayerDiscriminator(3, 8, num_layers)
    logits = d(torch.zeros(2, 3, side, side))
    expected = side // 2**num_layers - 2  # each stride-2 conv halves an even side, each stride-1 conv takes 1
    assert logits.shape == (2, 1, expected, expected) and al.patch_side(side, num_layers) == expected


def test_discriminator_rejects_images_too_small_and_names_the_layers_that_fit():
    with pytest.raises(ValueError, match=r"disc_num_layers=2") as info:
        al.NLayerDiscriminator(3, 8, 3)(torch.zeros(1, 3, 16, 16))
    assert "sides >= 24" in str(info.value)
    with pytest.raises(ValueError, match="larger images"):
        al.NLayerDiscriminator(3, 8, 2)(torch.zeros(1, 3, 4, 4))


def test_weights_init_draws_taming_statistics():
    torch.manual_seed(0)
    d = al.NLayerDiscriminator(3, 64, 3).apply(al.weights_init)
    big = d.main[8].weight  # 256 x 512 x 4 x 4 weights: tight sample statistics
    assert big.mean().abs() < 1e-3 and big.std().item() == pytest.approx(0.02, rel=0.01)
    norms = torch.cat([d.main[i].weight for i in (3, 6, 9)])
    assert norms.mean().item() == pytest.approx(1.0, abs=0.005) and norms.std().item() == pytest.approx(0.02, rel=0.1)
    assert all(d.main[i].bias.abs().sum() == 0 for i in (3, 6, 9))


# ---------------------------------------------------------------------------------------------
# GAN losses and weights


def test_hinge_and_vanilla_losses_match_hand_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.5])
    # hinge: relu(1 - real) = [0, 0.5], relu(1 + fake) = [0, 1.5] -> 0.5 * (0.25 + 0.75)
    assert al.hinge_d_loss(real, fake).item() == pytest.approx(0.5)
    softplus = lambda v: math.log1p(math.exp(v))
    vanilla = 0.5 * ((softplus(-2.0) + softplus(-0.5)) / 2 + (softplus(-3.0) + softplus(0.5)) / 2)
    assert al.vanilla_d_loss(real, fake).item() == pytest.approx(vanilla, rel=1e-6)


def test_adopt_weight_switches_at_the_threshold():
    assert al.adopt_weight(0.7, 9, threshold=10) == 0.0
    assert al.adopt_weight(0.7, 10, threshold=10) == 0.7
    assert al.adopt_weight(0.7, 3, threshold=10, value=0.1) == 0.1


def test_adaptive_weight_is_the_gradient_norm_ratio_clamped_and_detached():
    w = torch.zeros(3, requires_grad=True)
    a, b = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.0, 0.6, 0.8])
    weight = al.adaptive_weight((a * w).sum(), (b * w).sum(), w, disc_weight=0.5)  # grads a, b: norms 5 and 1
    assert weight.item() == pytest.approx(0.5 * 5 / (1 + 1e-4), rel=1e-6) and not weight.requires_grad
    no_gan = al.adaptive_weight((a * w).sum(), (0 * w).sum(), w, disc_weight=1.0)  # 5 / 1e-4 = 5e4 -> 1e4
    assert no_gan.item() == pytest.approx(1e4)


# ---------------------------------------------------------------------------------------------
# The generator loss against LDM's (KL) and taming's (VQ) formulas, written out literally


def test_kl_generator_loss_matches_ldm_formula_and_gradients():
    conv, z, posterior = _decoder()
    x = _images()
    loss = al.AutoencoderLoss(SMALL, kind="kl").train()
    step = 12  # past disc_start=10
    losses, log = loss.generator_loss(x, conv(z), posterior, step, last_layer=conv.weight)
    assert losses.shape == (4,)

    # LDM, LPIPSWithDiscriminator.forward(optimizer_idx=0), perceptual_weight 0:
    x_rec = conv(z)
    logvar = torch.tensor(0.3)
    rec_loss = torch.abs(x - x_rec)
    nll_loss = rec_loss / torch.exp(logvar) + logvar
    nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
    kl_loss = torch.sum(posterior.kl()) / x.shape[0]
    g_loss = -torch.mean(loss.discriminator(x_rec))
    nll_grads = torch.autograd.grad(nll_loss, conv.weight, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, conv.weight, retain_graph=True)[0]
    d_weight = torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4).detach() * 0.5
    total = nll_loss + 0.01 * kl_loss + d_weight * 0.7 * g_loss

    torch.testing.assert_close(losses.mean(), total, rtol=1e-5, atol=0)
    expected = {"total_loss": total, "logvar": 0.3, "kl_loss": kl_loss, "nll_loss": nll_loss,
                "rec_loss": rec_loss.mean(), "d_weight": d_weight, "disc_factor": 0.7, "g_loss": g_loss}
    assert set(log) == set(expected)
    for key, value in expected.items():
        assert log[key] == pytest.approx(float(torch.as_tensor(value).detach()), rel=1e-5), key
    # Same gradients into the decoder and the posterior as LDM's scalar.
    ours = torch.autograd.grad(losses.mean(), [conv.weight, posterior.mean], retain_graph=True)
    theirs = torch.autograd.grad(total, [conv.weight, posterior.mean])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_generator_loss_freezes_the_discriminator_and_restores_it():
    conv, z, posterior = _decoder()
    loss = al.AutoencoderLoss(SMALL, kind="kl").train()
    losses, _ = loss.generator_loss(_images(), conv(z), posterior, 100, last_layer=conv.weight)
    losses.mean().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None and p.requires_grad for p in loss.discriminator.parameters())
    assert not loss.logvar.requires_grad and loss.logvar.item() == pytest.approx(0.3)  # fixed, as in LDM


def test_before_disc_start_the_discriminator_does_not_run():
    conv, z, posterior = _decoder()
    x = _images()
    loss = al.AutoencoderLoss(SMALL, kind="kl").train()
    calls = []
    loss.discriminator.register_forward_hook(lambda *args: calls.append(1))
    losses, log = loss.generator_loss(x, conv(z), posterior, step=9)  # disc_start=10: no last_layer needed
    nll = (torch.abs(x - conv(z)) / math.exp(0.3) + 0.3).sum() / 4
    torch.testing.assert_close(losses.mean(), nll + 0.01 * posterior.kl().sum() / 4, rtol=1e-5, atol=0)
    assert calls == [] and log["d_weight"] == 0 and log["disc_factor"] == 0 and log["g_loss"] == 0


def test_eval_mode_uses_zero_gan_weight_and_runs_without_gradients():
    conv, z, posterior = _decoder()
    x = _images()
    loss = al.AutoencoderLoss(SMALL, kind="kl").eval()
    with torch.no_grad():
        losses, log = loss.generator_loss(x, conv(z), posterior, step=100)
    nll = (torch.abs(x - conv(z)) / math.exp(0.3) + 0.3).sum() / 4
    torch.testing.assert_close(losses.mean(), nll + 0.01 * posterior.kl().sum() / 4, rtol=1e-5, atol=0)
    assert log["d_weight"] == 0 and log["disc_factor"] == 0.7 and log["g_loss"] != 0


def test_training_after_disc_start_needs_last_layer():
    conv, z, posterior = _decoder()
    loss = al.AutoencoderLoss(SMALL, kind="kl").train()
    with pytest.raises(ValueError, match="last_layer=ae.last_layer"):
        loss.generator_loss(_images(), conv(z), posterior, step=100)
    with pytest.raises(TypeError, match="posterior"):
        loss.generator_loss(_images(), conv(z), torch.tensor(1.0), step=0)


def test_vq_generator_loss_matches_taming_formula_with_the_classifier_features():
    cfg = replace(SMALL, perceptual="classifier_features", perceptual_weight=0.5, codebook_weight=2.0)
    conv, z, _ = _decoder()
    x = _images()
    loss = al.AutoencoderLoss(cfg, kind="vq").train()
    codebook_loss = torch.tensor(0.25, requires_grad=True)
    losses, log = loss.generator_loss(x, conv(z), codebook_loss, 10, last_layer=conv.weight)

    # taming, VQLPIPSWithDiscriminator.forward(optimizer_idx=0):
    x_rec = conv(z)
    p_loss = loss.perceptual(x, x_rec).view(4, 1, 1, 1)
    rec_loss = torch.abs(x - x_rec) + 0.5 * p_loss
    nll_loss = torch.mean(rec_loss)
    g_loss = -torch.mean(loss.discriminator(x_rec))
    nll_grads = torch.autograd.grad(nll_loss, conv.weight, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, conv.weight, retain_graph=True)[0]
    d_weight = torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4).detach() * 0.5
    total = nll_loss + d_weight * 0.7 * g_loss + 2.0 * codebook_loss.mean()

    torch.testing.assert_close(losses.mean(), total, rtol=1e-5, atol=0)
    assert p_loss.min() > 0  # the perceptual term is really in there
    expected = {"total_loss": total, "quant_loss": 0.25, "nll_loss": nll_loss, "rec_loss": rec_loss.mean(),
                "p_loss": p_loss.mean(), "d_weight": d_weight, "g_loss": g_loss}
    for key, value in expected.items():
        assert log[key] == pytest.approx(float(torch.as_tensor(value).detach()), rel=1e-5), key
    # The frozen classifier is neither a parameter nor in the state_dict (checkpoints save the discriminator).
    assert set(loss.state_dict()) == {"logvar"} | {f"discriminator.{k}" for k in loss.discriminator.state_dict()}
    assert {id(p) for p in loss.parameters()} == {id(loss.logvar)} | {id(p) for p in loss.discriminator.parameters()}
    loss.train()
    assert not loss.perceptual.training and not loss.perceptual.classifier.training
    loss.to(torch.float64)  # the unregistered perceptual net moves with the loss
    assert next(loss.perceptual.parameters()).dtype == torch.float64


@pytest.mark.parametrize("disc_loss", ["hinge", "vanilla"])
def test_discriminator_loss_matches_the_formula_and_trains_only_the_discriminator(disc_loss):
    conv, z, _ = _decoder()
    x = _images()
    loss = al.AutoencoderLoss(replace(SMALL, disc_loss=disc_loss), kind="kl").train()
    x_rec = conv(z)
    d_loss, log = loss.discriminator_loss(x, x_rec, step=10)
    real, fake = loss.discriminator(x), loss.discriminator(x_rec.detach())
    if disc_loss == "hinge":
        expected = 0.7 * 0.5 * ((1 - real).clamp(min=0).mean() + (1 + fake).clamp(min=0).mean())
    else:
        expected = 0.7 * 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    torch.testing.assert_close(d_loss, expected)
    assert log["logits_real"] == pytest.approx(real.mean().item(), rel=1e-5)
    d_loss.backward()
    assert conv.weight.grad is None  # reconstructions are detached
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    assert loss.discriminator_loss(x, x_rec, step=9)[0].item() == 0  # before disc_start
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        loss.discriminator_loss(x, x_rec[:, :1], step=10)


def test_loss_rejects_unknown_settings_with_the_field_name():
    with pytest.raises(ValueError, match="autoencoder_loss.disc_loss='wgan'"):
        al.AutoencoderLoss(replace(SMALL, disc_loss="wgan"), kind="kl")
    with pytest.raises(ValueError, match="autoencoder.kind='vae'"):
        al.AutoencoderLoss(SMALL, kind="vae")
    with pytest.raises(ValueError, match="perceptual=none"):
        al.AutoencoderLoss(replace(SMALL, perceptual="classifier_features"), kind="kl", image_channels=1)


# ---------------------------------------------------------------------------------------------
# Perceptual distances


def test_perceptual_factory():
    assert al.perceptual_loss("none") is None
    assert isinstance(al.perceptual_loss("classifier_features"), al.ClassifierFeatureDistance)
    with pytest.raises(ValueError, match="'lpips', 'classifier_features', 'none'"):
        al.perceptual_loss("vgg")


def test_classifier_feature_distance_is_lpips_formula_on_the_classifier_forward_features():
    distance = al.ClassifierFeatureDistance()
    classifier = distance.classifier
    x = _images(3, seed=1)
    x_rec = (x + 0.2 * torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))).requires_grad_(True)

    # The maps as the classifier's own forward computes them (hooks on its blocks), at t = 0.
    maps = []
    hooks = [b.register_forward_hook(lambda m, i, o: maps.append(o))
             for b in [*classifier.input_blocks, classifier.middle_block]]
    with torch.no_grad():
        classifier(torch.cat([x, x_rec]), torch.zeros(6, dtype=torch.long))
    for h in hooks:
        h.remove()
    assert len(maps) == 7  # conv_in, 5 blocks, middle: 32, 32, 16, 16, 8, 8, 8 pixels on a side
    expected = torch.zeros(3)
    for f in maps:
        f = f / (f.square().sum(dim=1, keepdim=True) + 1e-8).sqrt()
        expected += ((f[:3] - f[3:]) ** 2).sum(dim=1).mean(dim=(1, 2))

    got = distance(x, x_rec)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)
    assert got.shape == (3,) and (got > 0).all()
    assert distance(x, x).abs().max() < 1e-6
    got.sum().backward()
    assert x_rec.grad.abs().sum() > 0 and all(p.grad is None and not p.requires_grad for p in classifier.parameters())
    distance.train()
    assert not classifier.training


def _offline(monkeypatch, tmp_path):
    """TORCH_HOME in an empty tmp folder, and any download attempt fails at once (no network in tests)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(f"offline test: no download of {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


def test_lpips_offline_error_names_the_file_its_url_and_the_substitute(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    target = tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert al.lpips_weights_path("vgg") == target
    for build in (lambda: al.LPIPS("vgg"), lambda: al.AutoencoderLoss(AutoencoderLossConfig(), kind="kl")):
        with pytest.raises(al.PerceptualWeightsUnavailable) as info:
            build()
        message = str(info.value)
        for part in (str(target), "https://download.pytorch.org/models/vgg16-397923af.pth",
                     "autoencoder_loss.perceptual=classifier_features", "offline test: no download"):
            assert part in message


def test_lpips_loads_the_cached_backbone_and_equals_torchmetrics_lpips(monkeypatch, tmp_path):
    """The loading path without the network: a randomly initialised torchvision VGG16 written to the cache file.

    torchvision checks the file's hash only while downloading it (torch.hub passes the hash to the download),
    a file already in $TORCH_HOME/hub/checkpoints is loaded as is; so this runs the real loading code. Only the
    convolutional `features` are random tensors; the unused classifier layers (120M weights) are stored as
    stride-0 zeros to keep the file at 59 MB. LPIPS's linear heads are torchmetrics' real ones.
    """
    from torchmetrics.functional.image.lpips import learned_perceptual_image_patch_similarity
    from torchvision.models import vgg16

    _offline(monkeypatch, tmp_path)
    torch.manual_seed(0)
    state = {k: v if k.startswith("features.") else torch.zeros(()).expand(v.shape)
             for k, v in vgg16(weights=None).state_dict().items()}
    al.lpips_weights_path("vgg").parent.mkdir(parents=True)
    torch.save(state, al.lpips_weights_path("vgg"))

    lpips = al.LPIPS("vgg").train()  # stays in eval mode
    torch.testing.assert_close(lpips.lpips.net.slice1[0].weight, state["features.0.weight"], rtol=0, atol=0)
    x = _images(3, seed=3)
    x_rec = (x + 0.3 * torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))).clamp(-1, 1)
    x_rec.requires_grad_(True)
    got = lpips(x, x_rec)
    reference = learned_perceptual_image_patch_similarity(x, x_rec.detach(), net_type="vgg", reduction="none")
    torch.testing.assert_close(got.detach(), reference, rtol=1e-5, atol=1e-7)
    assert got.shape == (3,) and (got > 0).all() and not lpips.training
    got.sum().backward()
    assert x_rec.grad.abs().sum() > 0 and not any(p.requires_grad for p in lpips.parameters())
