"""LDM's first stage: exact parameter counts of every preset, state_dicts equal to the official manifests,
parity with the seeded original KL autoencoder and VQ model, the posterior and quantiser equations, the
model-zoo loader and clear errors."""

import json
import urllib.error
import urllib.request
import zipfile
from dataclasses import replace

import pytest
import torch
from helpers import decode_parity_weights
from safetensors.torch import load_file

import minildm
from minildm import autoencoder, checkpoints, config, presets
from minildm.config import AutoencoderConfig, Config
from minildm.layers import count_parameters

AE_PRESETS = [name for name in presets.names() if presets.info(name).config.model == "autoencoder"]
PAPER_PRESETS = [name for name in AE_PRESETS if presets.info(name).params is not None]
MANIFESTS = {"ldm_kl_f4": "ae-kl-f4", "ldm_kl_f8": "ae-kl-f8", "ldm_vq_f4": "ae-vq-f4"}


def hand_count(c: AutoencoderConfig) -> int:
    """Parameters of LDM's AutoencoderKL / VQModel(c), added up layer by layer from model.py's constructors."""
    def conv(cin, cout, k=3):
        return cin * cout * k * k + cout

    def resblock(cin, cout):
        return 2 * cin + conv(cin, cout) + 2 * cout + conv(cout, cout) + (conv(cin, cout, 1) if cin != cout else 0)

    def attn(ch):
        return (2 * ch + 4 * conv(ch, ch, 1)) if c.attention else 0

    widths = [int(c.channels * m) for m in c.channel_mult]
    side, width, enc = c.image_size, c.channels, conv(c.in_channels, c.channels)
    for level, out in enumerate(widths):
        for _ in range(c.num_res_blocks):
            enc += resblock(width, out) + (attn(out) if side in c.attention_resolutions else 0)
            width = out
        if level != len(widths) - 1:
            enc += conv(width, width)
            side //= 2
    mid = 2 * resblock(width, width) + attn(width)
    z_out = 2 * c.z_channels if c.kind == "kl" else c.z_channels
    enc += mid + 2 * width + conv(width, z_out)
    dec = conv(c.z_channels, width) + mid
    for level in reversed(range(len(widths))):
        for _ in range(c.num_res_blocks + 1):
            dec += resblock(width, widths[level]) + (attn(widths[level]) if side in c.attention_resolutions else 0)
            width = widths[level]
        if level != 0:
            dec += conv(width, width)
            side *= 2
    dec += 2 * width + conv(width, c.out_channels)
    if c.kind == "kl":
        return enc + dec + conv(2 * c.z_channels, 2 * c.embed_dim, 1) + conv(c.embed_dim, c.z_channels, 1)
    return enc + dec + conv(c.z_channels, c.embed_dim, 1) + c.n_embed * c.embed_dim + conv(c.embed_dim, c.z_channels, 1)


@pytest.mark.parametrize("name", AE_PRESETS)
def test_every_autoencoder_preset_has_the_exact_parameter_count(name):
    info = presets.info(name)
    model = minildm.build_model(info.config, device="meta")
    assert isinstance(model, autoencoder.AutoencoderKL if info.config.autoencoder.kind == "kl" else autoencoder.VQModel)
    assert count_parameters(model) == hand_count(info.config.autoencoder)
    if info.params is not None:
        assert count_parameters(model) == info.params


def test_the_paper_presets_are_the_model_zoo():
    # PAPER_FACTS 0.2: the README's nine first stages, KL-f4 55,312,063; KL-f8 83,653,863; VQ-f4 55,322,782.
    assert {n: presets.info(n).params for n in PAPER_PRESETS} == {
        "ae-kl-f4": 55_312_063, "ae-kl-f8": 83_653_863, "ae-kl-f16": 69_610_963, "ae-kl-f32": 103_880_131,
        "ae-vq-f4": 55_322_782, "ae-vq-f4-noattn": 53_219_486, "ae-vq-f8": 67_717_295,
        "ae-vq-f8-n256": 67_652_783, "ae-vq-f16": 69_593_371}


@pytest.mark.parametrize("manifest_name", sorted(MANIFESTS))
def test_preset_state_dict_equals_the_official_manifest(reference_dir, manifest_name):
    manifest = json.loads((reference_dir / "manifests" / f"{manifest_name}.json").read_text())
    cfg = presets.get(MANIFESTS[manifest_name])
    ours = {k: list(v.shape) for k, v in minildm.build_model(cfg, device="meta").state_dict().items()}
    assert list(ours) == list(manifest["keys"]), "state_dict keys differ from the official checkpoint's (or order)"
    assert ours == manifest["keys"]
    assert count_parameters(minildm.build_model(cfg, device="meta")) == manifest["total_params"]
    # and the original constructor arguments translate to the preset's section
    assert autoencoder.config_from_original(manifest["constructor_kwargs"]) == cfg.autoencoder


def _parity_model(reference_dir, name):
    meta = json.loads((reference_dir / "parity" / f"{name}.json").read_text())
    model = autoencoder.build(autoencoder.config_from_original(meta["config"])).eval()
    assert count_parameters(model) == meta["total_params"]
    model.load_state_dict(decode_parity_weights(reference_dir / "parity", meta), strict=True)
    return model, load_file(reference_dir / "parity" / meta["io_file"])


def _probes(model, names):
    """Per-channel spatial means of the named submodules' outputs, as the fixtures store them."""
    seen, hooks = {}, []
    for name in names:
        module = model.get_submodule(name)
        hooks.append(module.register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(name, out.flatten(2).mean(-1) if out.ndim > 2 else out)))
    return seen, hooks


def test_kl_autoencoder_matches_the_original(reference_dir):
    model, io = _parity_model(reference_dir, "ldm_autoencoder_kl_tiny")
    probes, hooks = _probes(model, [k[len("probe."):] for k in io if k.startswith("probe.")])
    with torch.no_grad():
        posterior = model.encode(io["inputs.x"])
        decoded = model.decode(posterior.mean)
    for hook in hooks:
        hook.remove()
    tol = dict(atol=2e-5, rtol=1e-5)  # float32; the originals differ by 3e-6 between thread counts
    torch.testing.assert_close(torch.cat([posterior.mean, posterior.logvar], 1), io["outputs.moments"], **tol)
    torch.testing.assert_close(posterior.mean, io["outputs.posterior_mean"], **tol)
    torch.testing.assert_close(posterior.logvar, io["outputs.posterior_logvar"], **tol)
    torch.testing.assert_close(posterior.std, io["outputs.posterior_std"], **tol)
    torch.testing.assert_close(posterior.kl(), io["outputs.kl"], **tol)
    torch.testing.assert_close(decoded, io["outputs.decoded"], **tol)
    torch.testing.assert_close(model(io["inputs.x"], sample_posterior=False)[0], decoded)
    assert len(probes) == 8
    for name, value in probes.items():
        torch.testing.assert_close(value, io[f"probe.{name}"], **tol, msg=f"first divergence at {name}")


def test_vq_model_matches_the_original(reference_dir):
    model, io = _parity_model(reference_dir, "ldm_vqmodel_tiny")
    probes, hooks = _probes(model, [k[len("probe."):] for k in io if k.startswith("probe.")])
    with torch.no_grad():
        prequant = model.encode_to_prequant(io["inputs.x"])
        quant, loss, indices = model.encode(io["inputs.x"])
        decoded = model.decode(quant)
    for hook in hooks:
        hook.remove()
    tol = dict(atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(prequant, io["outputs.prequant"], **tol)
    assert torch.equal(indices, io["outputs.indices"])  # integer outputs match exactly
    assert indices.unique().numel() == 28
    torch.testing.assert_close(quant, io["outputs.quant"], **tol)
    torch.testing.assert_close(loss.reshape(1), io["outputs.emb_loss"], **tol)
    torch.testing.assert_close(decoded, io["outputs.decoded"], **tol)
    torch.testing.assert_close(model.decode_latent(prequant), decoded)  # VQModelInterface: quantise, then decode
    torch.testing.assert_close(model.decode_indices(indices, (2, 8, 8)), decoded, atol=1e-5, rtol=0)
    assert len(probes) == 4
    for name, value in probes.items():
        torch.testing.assert_close(value, io[f"probe.{name}"], **tol, msg=f"first divergence at {name}")


def _tiny(kind="kl", **changes):
    return AutoencoderConfig(**{**dict(kind=kind, image_size=16, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                       z_channels=2, embed_dim=2, n_embed=8 if kind == "vq" else 0, norm_groups=4),
                                **changes})


def test_diagonal_gaussian_equations():
    torch.manual_seed(0)
    moments = torch.randn(3, 4, 5, 5) * 3
    moments[0, 2, 0, 0] = -50.0  # below LDM's clamp
    posterior = autoencoder.DiagonalGaussian(moments)
    mean, logvar = moments[:, :2], moments[:, 2:].clamp(-30, 20)
    assert posterior.logvar[0, 0, 0, 0] == -30.0
    normal = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    standard = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected_kl = torch.distributions.kl_divergence(normal, standard).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl(), expected_kl, rtol=1e-4, atol=1e-3)
    z = posterior.sample(torch.Generator().manual_seed(1))
    torch.testing.assert_close(posterior.nll(z), -normal.log_prob(z).sum(dim=(1, 2, 3)), rtol=1e-4, atol=1e-2)
    assert torch.equal(posterior.mode(), mean)
    many = autoencoder.DiagonalGaussian(torch.cat([torch.full((1, 1, 100, 100), 2.0),
                                                   torch.full((1, 1, 100, 100), 2 * torch.log(torch.tensor(0.5)))], 1))
    draws = many.sample(torch.Generator().manual_seed(2))
    assert abs(draws.mean().item() - 2.0) < 0.02 and abs(draws.std().item() - 0.5) < 0.02


def test_vector_quantiser_picks_the_nearest_code_and_passes_gradients_straight_through():
    torch.manual_seed(0)
    quantiser = autoencoder.VectorQuantizer(16, 3)
    quantiser.embedding.weight.data = torch.randn(16, 3)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    z_q, loss, indices = quantiser(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.equal(indices, torch.cdist(flat, quantiser.embedding.weight).argmin(1))
    torch.testing.assert_close(z_q.detach().permute(0, 2, 3, 1).reshape(-1, 3), quantiser.embedding.weight[indices])
    (z_q * torch.arange(96.0).view(2, 3, 4, 4)).sum().backward()  # d z_q / d z is the identity
    assert torch.equal(z.grad, torch.arange(96.0).view(2, 3, 4, 4))


@pytest.mark.parametrize("legacy", [True, False])
def test_beta_weights_the_term_its_placement_says(legacy):
    torch.manual_seed(0)
    quantiser = autoencoder.VectorQuantizer(8, 2, beta=0.25, legacy_beta=legacy)
    z = torch.randn(1, 2, 3, 3, requires_grad=True)
    _, loss, indices = quantiser(z)
    loss.backward()
    code = quantiser.embedding.weight.detach()[indices].T.reshape(1, 2, 3, 3)
    # d/dz of w * mean((sg(e) - z)^2) = w * 2 (z - e) / numel: the commitment weight is 1 (legacy) or beta
    commitment_weight = 1.0 if legacy else 0.25
    torch.testing.assert_close(z.grad, commitment_weight * 2 * (z.detach() - code) / z.numel())
    codebook_weight = 0.25 if legacy else 1.0
    grads = quantiser.embedding.weight.grad
    used = indices.unique()
    assert grads[used].abs().sum() > 0 and grads.abs().sum() == grads[used].abs().sum()
    z_flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 2)
    expected = torch.zeros(8, 2).index_add_(0, indices, codebook_weight * 2 * (quantiser.embedding.weight.detach()
                                                                             [indices] - z_flat) / z.numel())
    torch.testing.assert_close(grads, expected)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_shapes_of_the_latent_and_the_reconstruction(kind):
    model = autoencoder.build(_tiny(kind, channel_mult=(1, 2, 2), image_size=32))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model.factor == 4 and model.latent_shape(32) == (2, 8, 8)
    if kind == "kl":
        reconstruction, posterior = model(x)
        assert posterior.mean.shape == (2, 2, 8, 8) and posterior.kl().shape == (2,)
    else:
        reconstruction, loss, indices = model(x)
        assert loss.ndim == 0 and indices.shape == (2 * 8 * 8,) and indices.dtype == torch.int64
    assert reconstruction.shape == x.shape
    # non-square images of sides divisible by f work too (the model is fully convolutional)
    assert model.encoder(torch.zeros(1, 3, 16, 24)).shape[-2:] == (4, 6)


def test_downsampling_pads_right_and_bottom_only():
    down = autoencoder.Downsample(1)
    down.conv.weight.data.zero_()
    down.conv.bias.data.zero_()
    down.conv.weight.data[0, 0, 0, 0] = 1.0  # output (i, j) reads input (2i, 2j): the top-left tap, no left pad
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(down(x), x[:, :, ::2, ::2])


def test_attention_is_optional_and_follows_attention_resolutions():
    with_attention = autoencoder.build(_tiny(attention_resolutions=(16,)))
    assert len(with_attention.encoder.down[0].attn) == 1 and len(with_attention.decoder.up[0].attn) == 2
    assert len(with_attention.encoder.down[1].attn) == 0
    none = autoencoder.build(_tiny(attention=False))
    assert isinstance(none.encoder.mid.attn_1, torch.nn.Identity)  # LDM's attn_type "none"


def test_clear_errors_for_bad_inputs():
    model = autoencoder.build(_tiny())
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        model.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="not divisible by f=2"):
        model.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match="float"):
        model.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="embed_dim=2"):
        model.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="float64"):
        model.encode(torch.zeros(1, 3, 16, 16, dtype=torch.float64))


@pytest.mark.parametrize("change, message", [
    (dict(kind="gan"), "autoencoder.kind"),
    (dict(kind="vq", n_embed=0), "autoencoder.n_embed"),
    (dict(norm_groups=5), "autoencoder.norm_groups"),
    (dict(image_size=30, channel_mult=(1, 2, 2)), "divisible by f=4"),
    (dict(attention_resolutions=(0,)), "autoencoder.attention_resolutions"),
])
def test_config_validation_names_the_field(change, message):
    cfg = Config(model="autoencoder", autoencoder=_tiny(**change), data=config.DataConfig(image_size=change.get(
        "image_size", 16)))
    with pytest.raises(config.ConfigError, match=message):
        config.validate(cfg)


def test_loss_settings_are_validated():
    cfg = Config(model="autoencoder", autoencoder=_tiny(), data=config.DataConfig(image_size=16))
    for key, value, message in [("perceptual", "vgg", "autoencoder_loss.perceptual"),
                                ("disc_loss", "wgan", "autoencoder_loss.disc_loss"),
                                ("kl_weight", -1.0, "autoencoder_loss.kl_weight")]:
        bad = replace(cfg, autoencoder_loss=replace(cfg.autoencoder_loss, **{key: value}))
        with pytest.raises(config.ConfigError, match=message):
            config.validate(bad)


def test_latent_scale_factor_makes_unit_variance_latents():
    torch.manual_seed(0)
    model = autoencoder.build(_tiny()).eval()
    images = torch.rand(64, 3, 16, 16) * 2 - 1
    scale = autoencoder.latent_scale_factor(model, images, generator=torch.Generator().manual_seed(0))
    latents = autoencoder.encode_latents(model, images, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (64, 2, 8, 8)
    torch.testing.assert_close((latents * scale).std(), torch.tensor(1.0))
    means = autoencoder.encode_latents(model, images, sample=False)
    assert torch.equal(means, model.encode(images).mean.detach())


def test_codebook_usage_counts_every_position_once():
    torch.manual_seed(0)
    model = autoencoder.build(_tiny("vq")).eval()
    images = torch.rand(10, 3, 16, 16) * 2 - 1
    usage = autoencoder.codebook_usage(model, images, batch_size=4)
    indices = model.encode(images)[2]
    assert usage["counts"].sum() == 10 * 8 * 8
    assert torch.equal(usage["counts"], torch.bincount(indices, minlength=8))
    assert usage["used"] == indices.unique().numel() and usage["used"] + usage["dead"] == 8
    assert 1.0 <= usage["perplexity"] <= usage["used"] + 1e-9
    with pytest.raises(TypeError, match="VQModel"):
        autoencoder.codebook_usage(autoencoder.build(_tiny()), images)


def test_model_zoo_zip_loads_strictly_and_drops_the_loss_weights(reference_dir, tmp_path):
    """A latent-diffusion zoo archive as the README's download script unpacks it: a zip holding a Lightning
    model.ckpt whose state_dict also has the training-only loss.* keys (LPIPS, discriminator, logvar)."""
    model, io = _parity_model(reference_dir, "ldm_autoencoder_kl_tiny")
    state = {**model.state_dict(), "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.ones(2)}
    torch.save({"state_dict": state, "global_step": 176991}, tmp_path / "model.ckpt")
    with zipfile.ZipFile(tmp_path / "kl-tiny.zip", "w") as archive:
        archive.write(tmp_path / "model.ckpt", "model.ckpt")
    cfg = Config(model="autoencoder", autoencoder=model.config)
    loaded = checkpoints.load_official_file(tmp_path / "kl-tiny.zip", cfg)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(loaded.encode(io["inputs.x"]).mean), io["outputs.decoded"],
                                   atol=2e-5, rtol=1e-5)
    # a file that lacks a weight is named, not silently half-loaded
    del state["decoder.conv_out.bias"]
    torch.save({"state_dict": state}, tmp_path / "partial.ckpt")
    with pytest.raises(checkpoints.CheckpointError, match="decoder.conv_out.bias"):
        checkpoints.load_official_file(tmp_path / "partial.ckpt", cfg)


def test_offline_download_of_a_first_stage_says_where_to_put_it(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert checkpoints.official_url("ae-kl-f8") == "https://ommer-lab.com/files/latent-diffusion/kl-f8.zip"
    with pytest.raises(ConnectionError, match="kl-f8.zip") as error:
        checkpoints.load_official("ae-kl-f8", directory=tmp_path)
    assert str(tmp_path) in str(error.value)


def test_norms_are_ldm_s_plain_group_norm_with_eps_1e_6():
    """A GroupNorm eps of 1e-5 instead of 1e-6 moves the parity outputs by only ~1e-6, so it is asserted here."""
    model = autoencoder.build(_tiny(attention_resolutions=(16,)))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    # encoder: 2 + 1 (level 0, attention at 16) + 2 (level 1) + 5 (middle) + norm_out = 11; decoder: 5 (middle)
    # + 4 (level 1) + 4 + 2 (level 0: two res blocks, two attentions) + norm_out = 16
    assert len(norms) == 11 + 16
    assert all(type(m) is torch.nn.GroupNorm and m.eps == 1e-6 and m.num_groups == 4 and m.affine for m in norms)
