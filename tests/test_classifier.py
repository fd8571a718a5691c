"""ADM's noise-aware classifier: exact parameter counts, strict loadability of the official classifiers,
parity with guided-diffusion's EncoderUNetModel, every pooling head, and clear errors."""

import json
import urllib.error
import urllib.request
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import minildm
from minildm import checkpoints, classifier, config, data, presets, unet
from minildm.attention import AttentionBlock
from minildm.config import ClassifierConfig
from minildm.layers import GroupNorm32, count_parameters

from helpers import decode_parity_weights

CLASSIFIER_PRESETS = [name for name in presets.names() if presets.info(name).config.model == "classifier"]
MANIFESTS = {f"adm_classifier{size}": f"adm-classifier{size}" for size in (64, 128, 256, 512)}


def hand_count(c: ClassifierConfig) -> int:
    """Parameters of EncoderUNetModel(c), added up layer by layer from guided-diffusion's constructor."""
    emb = 4 * c.channels

    def conv(cin, cout, k=3):
        return cin * cout * k * k + cout

    def resblock(cin, cout):
        film = 2 * cout if c.use_scale_shift_norm else cout
        skip = 0 if cin == cout else conv(cin, cout, 1)
        return 2 * cin + conv(cin, cout) + emb * film + film + 2 * cout + conv(cout, cout) + skip

    def attention(ch):
        return 2 * ch + conv(ch, 3 * ch, 1) + conv(ch, ch, 1)

    total = (c.channels * emb + emb) + (emb * emb + emb)  # time_embed
    ch, side = int(c.channel_mult[0] * c.channels), c.image_size
    total += conv(c.in_channels, ch)
    widths = [ch]
    for level, mult in enumerate(c.channel_mult):
        for _ in range(c.num_res_blocks):
            total += resblock(ch, int(mult * c.channels))
            ch = int(mult * c.channels)
            total += attention(ch) if side in c.attention_resolutions else 0
            widths.append(ch)
        if level < len(c.channel_mult) - 1:
            total += resblock(ch, ch) if c.resblock_updown else (conv(ch, ch) if c.conv_resample else 0)
            side //= 2
            widths.append(ch)
    total += 2 * resblock(ch, ch) + attention(ch)  # middle block
    widths.append(ch)
    if c.pool == "attention":  # GN, positional embedding [C, s*s+1], qkv_proj, c_proj
        return total + 2 * ch + ch * (side**2 + 1) + conv(ch, 3 * ch, 1) + conv(ch, c.out_channels, 1)
    if c.pool == "adaptive":
        return total + 2 * ch + conv(ch, c.out_channels, 1)
    head = sum(widths) * 2048 + 2048 + 2048 * c.out_channels + c.out_channels
    return total + head + (2 * 2048 if c.pool == "spatial_v2" else 0)


# ---------------------------------------------------------------------------------------------
# 1. Parameter counts (built on the meta device: no memory, no time)


@pytest.mark.parametrize("name", CLASSIFIER_PRESETS)
def test_preset_parameter_count(name):
    model = minildm.build_model(presets.get(name), device="meta")
    assert isinstance(model, classifier.Classifier)
    expected = presets.info(name).params
    assert count_parameters(model) == hand_count(presets.get(name).classifier)
    if expected is not None:  # the ADM classifiers: 65,438,568 / 42,568,040 / 54,096,360 / 54,448,360
        assert count_parameters(model) == expected


def test_adm_classifier_presets_follow_table_12():
    assert [presets.info(n).params for n in MANIFESTS.values()] == [65_438_568, 42_568_040, 54_096_360, 54_448_360]
    c64, c128 = presets.get("adm-classifier64"), presets.get("adm-classifier128")
    assert (c64.classifier.num_res_blocks, c64.diffusion.beta_schedule) == (4, "cosine")
    assert (c128.classifier.num_res_blocks, c128.diffusion.beta_schedule) == (2, "linear")
    assert (c64.train.lr, c64.train.batch_size, c64.train.weight_decay, c64.train.max_steps) == (6e-4, 1024, 0.2,
                                                                                                   300_000)
    assert (c128.train.lr, c128.train.batch_size, c128.train.weight_decay) == (3e-4, 256, 0.05)
    assert presets.get("adm-classifier512").classifier.channel_mult == (0.5, 1, 1, 2, 2, 4, 4)
    for name in MANIFESTS.values():
        cfg = presets.get(name).classifier
        assert (cfg.channels, cfg.attention_resolutions, cfg.num_head_channels, cfg.pool) == (128, (32, 16, 8), 64,
                                                                                               "attention")
        assert presets.info(name).checkpoint == f"{cfg.image_size}x{cfg.image_size}_classifier.pt"


def test_shapes_classifier_matches_the_shapes_data_and_process():
    cfg = presets.get("shapes-classifier")
    assert cfg.diffusion == presets.get("ddpm-shapes").diffusion
    assert cfg.classifier.out_channels == data.ShapesDataset(num_samples=8).num_classes == 5
    model = minildm.build_model(cfg)
    assert {m.num_groups for m in model.modules() if isinstance(m, GroupNorm32)} == {8}
    assert count_parameters(model) == hand_count(cfg.classifier) == 562_757


# ---------------------------------------------------------------------------------------------
# 2. Official classifier manifests: key names and shapes equal, so a strict load succeeds


def _load_manifest(reference_dir, name):
    return json.loads((reference_dir / "manifests" / f"{name}.json").read_text())


def _assert_matches_manifest(model, manifest):
    keys = classifier.convert_official_state_dict(manifest["keys"], prefix=manifest["checkpoint_key_prefix"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(keys), "state_dict keys differ from the official checkpoint's (or their order)"
    assert {k: v for k, v in ours.items() if v != keys[k]} == {}, "shape mismatches (ours shown)"
    assert count_parameters(model) == manifest["total_params"]


@pytest.mark.parametrize("manifest_name", list(MANIFESTS))
def test_preset_state_dict_matches_official_checkpoint(reference_dir, manifest_name):
    model = minildm.build_model(presets.get(MANIFESTS[manifest_name]), device="meta")
    _assert_matches_manifest(model, _load_manifest(reference_dir, manifest_name))


@pytest.mark.parametrize("manifest_name", list(MANIFESTS))
def test_config_from_original_constructor_kwargs(reference_dir, manifest_name):
    manifest = _load_manifest(reference_dir, manifest_name)
    cfg = classifier.config_from_original(manifest["encoder_constructor_kwargs"])
    with torch.device("meta"):
        _assert_matches_manifest(classifier.Classifier(cfg), manifest)
    # The original's downsample factors land on the README's sides 32,16,8 at every image size.
    assert cfg == presets.get(MANIFESTS[manifest_name]).classifier


def test_official_classifier_loads_strictly_and_offline_fetch_explains(reference_dir, tmp_path, monkeypatch):
    # A synthetic official file made from the manifest: one constant per tensor (stored as a stride-0
    # expansion, so the file is small), under the released key names, as torch.save writes it.
    manifest = _load_manifest(reference_dir, "adm_classifier128")
    state = {k: torch.full((), float(i % 7)).expand(shape) for i, (k, shape) in enumerate(manifest["keys"].items())}
    path = tmp_path / manifest["checkpoint_file"]
    torch.save(state, path)
    model, cfg = checkpoints.load_official("adm-classifier128", path=path)
    assert isinstance(model, classifier.Classifier) and not model.training and cfg.model == "classifier"
    loaded = model.state_dict()
    assert all(torch.all(loaded[k] == float(i % 7)) for i, k in enumerate(manifest["keys"]))
    del state["out.2.positional_embedding"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(checkpoints.CheckpointError, match=r"missing keys \(1\): out.2.positional_embedding"):
        checkpoints.load_official_file(tmp_path / "partial.pt", cfg)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError, match=r"jul-2021/256x256_classifier.pt .*by hand"):
        checkpoints.load_official("adm-classifier256", directory=tmp_path / "official")


def test_minildm_checkpoint_round_trip_rebuilds_a_classifier(tmp_path):
    cfg = presets.get("shapes-classifier")
    torch.manual_seed(0)
    model = minildm.build_model(cfg)
    path = checkpoints.save(tmp_path / "classifier.safetensors", model, cfg, step=3)
    loaded = checkpoints.load(path)
    assert isinstance(loaded.model, classifier.Classifier) and loaded.config == cfg
    for (name, x), y in zip(model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(x, y), name


# ---------------------------------------------------------------------------------------------
# 3. Parity with the original guided-diffusion EncoderUNetModel (tiny seeded model, attention pool)


def load_parity_fixture(reference_dir, name="adm_classifier_tiny"):
    """(Classifier with the decoded original weights loaded strictly, fixture JSON, io tensors)."""
    folder = reference_dir / "parity"
    meta = json.loads((folder / f"{name}.json").read_text())
    state_dict = decode_parity_weights(folder, meta)
    model = classifier.Classifier(classifier.config_from_original(meta["config"])).eval()
    model.load_state_dict(classifier.convert_official_state_dict(state_dict), strict=True)
    return model, meta, load_file(folder / meta["io_file"])


def test_parity_with_guided_diffusion(reference_dir):
    model, meta, io = load_parity_fixture(reference_dir)
    assert count_parameters(model) == meta["total_params"] == hand_count(model.config)
    order = ["time_embed"] + [f"input_blocks.{i}" for i in range(len(model.input_blocks))] + ["middle_block", "out.1"]
    probes, hooks = {}, []
    for name in order:
        def hook(_module, _args, output, name=name):
            probes[name] = output.flatten(2).mean(-1) if output.ndim > 2 else output
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        logits = model(io["inputs.x"], io["inputs.timesteps"])
    for h in hooks:
        h.remove()
    # Locate the first diverging block before comparing the logits (clearer failures).
    for block in order:
        torch.testing.assert_close(probes[block], io[f"probe.{block}"], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, block=block: f"first divergence at {block}: {m}")
    # Measured max |error| of the logits: 1.2e-7 (CPU, float32, one thread); the logits are ~0.2 in size.
    assert logits.shape == (2, meta["config"]["out_channels"])
    torch.testing.assert_close(logits, io["outputs.logits"], rtol=1e-4, atol=1e-5)


def test_parity_model_norms_and_attention_pool_layout(reference_dir):
    model, _, _ = load_parity_fixture(reference_dir)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(isinstance(m, GroupNorm32) and m.eps == 1e-5 and m.num_groups == 32 for m in norms)
    pool = model.out[2]
    assert (pool.side, pool.num_heads, tuple(pool.positional_embedding.shape)) == (4, 64 // 16, (64, 17))


def test_attention_pool_equals_the_clip_formula():
    # The original: prepend the mean, add the positional embedding, QKVAttention (q | k | v split first, q and k
    # scaled by ch^-1/4 each, softmax in float32), c_proj, token 0.
    torch.manual_seed(0)
    pool = classifier.AttentionPool2d(side=4, channels=32, num_head_channels=8, out_channels=5)
    x = torch.randn(2, 32, 4, 4)
    tokens = torch.cat([x.flatten(2).mean(-1, keepdim=True), x.flatten(2)], dim=-1) + pool.positional_embedding
    q, k, v = (a.reshape(2 * 4, 8, 17) for a in pool.qkv_proj(tokens).chunk(3, dim=1))
    scale = 8 ** -0.25
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).float().softmax(-1)
    expected = pool.c_proj(torch.einsum("bts,bcs->bct", weight, v).reshape(2, 32, 17))[:, :, 0]
    torch.testing.assert_close(pool(x), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 4. Behaviour: every pooling head, shapes, gradients, errors

TINY = ClassifierConfig(image_size=16, out_channels=7, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attention_resolutions=(8, 4), num_head_channels=16)


def tiny(**changes):
    torch.manual_seed(0)
    return classifier.Classifier(replace(TINY, **changes))


@pytest.mark.parametrize("changes", [
    {"pool": "attention"},
    {"pool": "adaptive"},
    {"pool": "spatial"},
    {"pool": "spatial_v2"},
    {"pool": "adaptive", "resblock_updown": False, "use_scale_shift_norm": False, "use_new_attention_order": True},
    {"pool": "spatial", "resblock_updown": False, "conv_resample": False, "channel_mult": (0.5, 1, 2),
     "channels": 64, "dropout": 0.1},
])
def test_every_pool_runs_forward_and_backward(changes):
    model = tiny(**changes)
    assert count_parameters(model) == hand_count(model.config)
    for p in model.parameters():  # the zero-initialised layers would otherwise block most gradients
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(3, 3, 16, 16, requires_grad=True)
    logits = model(x, torch.tensor([0, 500, 999]))
    assert logits.shape == (3, 7)
    # What classifier guidance needs: the gradient of log p(y | x_t) with respect to x_t.
    grad, = torch.autograd.grad(logits.log_softmax(-1)[torch.arange(3), torch.tensor([1, 2, 3])].sum(), x)
    assert grad.shape == x.shape and grad.abs().sum() > 0
    model.zero_grad()
    model(x.detach(), torch.tensor(5)).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_time_embedding_conditions_the_logits_and_time_scale_rescales_t():
    model = tiny(pool="adaptive").eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    scaled = tiny(pool="adaptive", time_scale=0.25).eval()
    scaled.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(model(x, torch.tensor([10, 10])), model(x, torch.tensor([900, 900])))
        torch.testing.assert_close(scaled(x, torch.tensor([400, 800])), model(x, torch.tensor([100, 200])))


def test_non_attention_pools_run_at_other_sides():
    assert tiny(pool="adaptive")(torch.randn(1, 3, 24, 24), torch.tensor([5])).shape == (1, 7)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for use_checkpoint in (False, True):
        model = tiny(use_checkpoint=use_checkpoint)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
        torch.manual_seed(1)
        model(torch.randn(2, 3, 16, 16), torch.tensor([3, 400])).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_attention_blocks_sit_at_the_configured_sides():
    model = tiny()
    with_attention = [i for i, block in enumerate(model.input_blocks) if any(isinstance(m, AttentionBlock)
                                                                            for m in block)]
    assert with_attention == [3, 5]  # sides 8 and 4; the 16x16 level has none
    assert model.feature_side == 4 and model.middle_block[1].num_heads == 64 // 16


@pytest.mark.parametrize("x, t, message", [
    (torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), r"\[N, 3, H, W\] \(classifier.in_channels=3\)"),
    (torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), r"16x16 \(classifier.image_size\).*pool='adaptive'"),
    (torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]), "one timestep per sample"),
    (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), torch.tensor([1, 2]), "x_t must be a float tensor"),
    (torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([1, 2]), "torch.float64 but the classifier"),
])
def test_bad_inputs_raise_clear_errors(x, t, message):
    with pytest.raises(ValueError, match=message):
        tiny()(x, t)


def test_side_not_divisible_by_the_depth_is_explained():
    with pytest.raises(ValueError, match="not divisible by 4"):
        tiny(pool="spatial")(torch.randn(2, 3, 18, 18), torch.tensor([1, 2]))


@pytest.mark.parametrize("changes, message", [
    ({"pool": "max"}, "classifier.pool='max' is not one of 'attention'"),
    ({"num_head_channels": -1}, "pool='attention' needs classifier.num_head_channels > 0"),
    ({"attention_resolutions": (2,)}, "not feature-map sides"),
    ({"image_size": 18}, "divisible"),
    ({"num_head_channels": 24}, "num_head_channels=24"),
])
def test_bad_configs_raise_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny(**changes)


def test_config_section_validates_and_overrides():
    cfg = config.override(presets.get("shapes-classifier"), ["classifier.pool=spatial_v2", "classifier.channels=64"])
    assert isinstance(minildm.build_model(cfg).out[1], GroupNorm32)
    with pytest.raises(config.ConfigError, match=r"classifier.pool='max' is not one of 'attention', 'adaptive'"):
        config.override(presets.get("shapes-classifier"), ["classifier.pool=max"])
    with pytest.raises(config.ConfigError, match=r"classifier.image_size=64 must equal data.image_size=32"):
        config.override(presets.get("shapes-classifier"), ["classifier.image_size=64"])
    with pytest.raises(config.ConfigError, match=r"classifier.num_head_channels=-1 must be > 0"):
        config.override(presets.get("shapes-classifier"), ["classifier.num_head_channels=-1"])
    with pytest.raises(config.ConfigError, match=r"classifier.norm_groups=24 must divide"):
        config.override(presets.get("shapes-classifier"), ["classifier.norm_groups=24"])
    with pytest.raises(config.ConfigError, match=r"model='vae' is not one of 'unet', 'mlp', 'classifier'"):
        config.override(cfg, ["model=vae"])
    cfg.model = "vae"
    with pytest.raises(ValueError, match="model=unet, mlp, classifier or autoencoder"):
        minildm.build_model(cfg)


def test_converter_is_the_unets():
    assert classifier.convert_official_state_dict is unet.convert_official_state_dict


def test_kind_color_classifier_is_the_shapes_classifier_with_35_outputs():
    cfg, kind = presets.get("shapes-classifier-kind-color"), presets.get("shapes-classifier")
    assert cfg.data.label == "kind_color" and cfg.diffusion == kind.diffusion and cfg.train.max_steps == 6000
    assert replace(cfg.classifier, out_channels=5) == kind.classifier
    dataset = data.build_dataset(cfg.data)
    assert cfg.classifier.out_channels == dataset.num_classes == 35 and dataset.label == "kind_color"
    assert count_parameters(minildm.build_model(cfg, device="meta")) == hand_count(cfg.classifier) == 564_707
    with pytest.raises(ValueError, match="data.label"):
        config.validate(config.override(cfg, ["data.label=shape"]))
