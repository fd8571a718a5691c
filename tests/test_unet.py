"""The UNet: exact parameter counts, strict loadability of official checkpoints, parity with the
original forward passes, and its behaviour (shapes, errors, gradient checkpointing)."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import minildm
from minildm import attention, presets, unet
from minildm.config import UNetConfig, override
from minildm.layers import GroupNorm32, count_parameters

from helpers import decode_parity_weights

UNET_PRESETS = [name for name in presets.names() if presets.info(name).config.model == "unet"]


# ---------------------------------------------------------------------------------------------
# 1. Parameter counts of every paper preset (built on the meta device: no memory, no time)


@pytest.mark.parametrize("name", UNET_PRESETS)
def test_preset_parameter_count(name):
    model = minildm.build_model(presets.get(name), device="meta")
    expected = presets.info(name).params
    if expected is None:  # course toys: no original to match, but they must build
        assert count_parameters(model) > 0
    else:
        assert count_parameters(model) == expected


# ---------------------------------------------------------------------------------------------
# 2. Official checkpoint manifests: key names and shapes equal, so a strict load succeeds

MANIFESTS = {
    "adm_imagenet64_cond": "adm-imagenet64",
    "adm_imagenet128_cond": "adm-imagenet128",
    "adm_imagenet256_cond": "adm-imagenet256",
    "adm_imagenet256_uncond": "adm-imagenet256-uncond",
    "adm_imagenet512_cond": "adm-imagenet512",
    "adm_lsun_bedroom256": "adm-lsun-bedroom",
    "adm_upsampler_64_256": "adm-upsampler-64-256",
    "adm_upsampler_128_512": "adm-upsampler-128-512",
    "iddpm_cifar10_uncond": "iddpm-cifar10",
    "iddpm_imagenet64_uncond": "iddpm-imagenet64",
    "iddpm_imagenet64_cond": "iddpm-imagenet64-cond",
    # improved-diffusion README checkpoints without a preset: their flags written out here.
    "iddpm_lsun_bedroom256": UNetConfig(
        image_size=256, channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attention_resolutions=(16,),
        dropout=0.0, num_heads=1, use_scale_shift_norm=False, learn_sigma=True),
    "iddpm_upsample256_cond": UNetConfig(
        image_size=256, channels=192, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
        attention_resolutions=(16, 8), dropout=0.0, num_heads=4, use_scale_shift_norm=True, learn_sigma=True,
        num_classes=1000, super_res=True),
}


def _load_manifest(reference_dir, name):
    return json.loads((reference_dir / "manifests" / f"{name}.json").read_text())


def _assert_matches_manifest(model, manifest):
    keys = unet.convert_official_state_dict(manifest["keys"], prefix=manifest["checkpoint_key_prefix"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(keys) - set(ours)) == [], "keys in the official checkpoint that minildm lacks"
    assert sorted(set(ours) - set(keys)) == [], "minildm keys the official checkpoint lacks"
    assert {k: v for k, v in ours.items() if v != keys[k]} == {}, "shape mismatches (ours shown)"
    assert count_parameters(model) == manifest["total_params"]


@pytest.mark.parametrize("manifest_name", list(MANIFESTS))
def test_preset_state_dict_matches_official_checkpoint(reference_dir, manifest_name):
    target = MANIFESTS[manifest_name]
    config = presets.get(target).unet if isinstance(target, str) else target
    with torch.device("meta"):
        model = unet.UNet(config)
    _assert_matches_manifest(model, _load_manifest(reference_dir, manifest_name))


@pytest.mark.parametrize("manifest_name", [n for n in MANIFESTS if n.startswith("adm_")])
def test_config_from_original_constructor_kwargs(reference_dir, manifest_name):
    manifest = _load_manifest(reference_dir, manifest_name)
    config = unet.config_from_original(manifest["unet_constructor_kwargs"], super_res="upsampler" in manifest_name)
    with torch.device("meta"):
        model = unet.UNet(config)
    _assert_matches_manifest(model, manifest)
    # The conversion from downsample factors to sides lands on the README's pixel resolutions.
    assert set(config.attention_resolutions) == set(presets.get(MANIFESTS[manifest_name]).unet.attention_resolutions)


def test_convert_official_state_dict_strips_prefix_and_rejects_foreign_keys():
    assert unet.convert_official_state_dict({"module.out.2.bias": 1}, prefix="module.") == {"out.2.bias": 1}
    with pytest.raises(KeyError, match="prefix"):
        unet.convert_official_state_dict({"out.2.bias": 1}, prefix="module.")


# ---------------------------------------------------------------------------------------------
# 3. Parity with the original guided-diffusion forward pass (tiny seeded models)

PARITY = ["adm_unet_tiny_cond", "adm_unet_tiny_cond_neworder", "adm_unet_tiny_ddpm"]


def load_parity_fixture(reference_dir, name):
    """(UNet with the decoded original weights loaded strictly, fixture JSON, io tensors)."""
    folder = reference_dir / "parity"
    meta = json.loads((folder / f"{name}.json").read_text())
    state_dict = decode_parity_weights(folder, meta)
    model = unet.UNet(unet.config_from_original(meta["config"])).eval()
    model.load_state_dict(unet.convert_official_state_dict(state_dict), strict=True)
    return model, meta, load_file(folder / meta["io_file"])


def _probes(model, inputs):
    """Per-channel spatial means of every top-level block's output, like the fixture's `probe.*`."""
    probes, hooks = {}, []
    for name in ["time_embed", "middle_block"] + [f"input_blocks.{i}" for i in range(len(model.input_blocks))] + [
            f"output_blocks.{i}" for i in range(len(model.output_blocks))]:
        def hook(_module, _args, output, name=name):
            probes[name] = output.flatten(2).mean(-1) if output.ndim > 2 else output
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        out = model(inputs["x"], inputs["t"], y=inputs.get("y"))
    for h in hooks:
        h.remove()
    return out, probes


@pytest.mark.parametrize("name", PARITY)
def test_parity_with_guided_diffusion(reference_dir, name):
    model, meta, io = load_parity_fixture(reference_dir, name)
    assert count_parameters(model) == meta["total_params"]
    inputs = {"x": io["inputs.x"], "t": io["inputs.timesteps"], "y": io.get("inputs.y")}
    out, probes = _probes(model, inputs)
    # Locate the first diverging block before comparing the output (clearer failures).
    order = ["time_embed"] + [f"input_blocks.{i}" for i in range(len(model.input_blocks))] + ["middle_block"] + [
        f"output_blocks.{i}" for i in range(len(model.output_blocks))]
    for block in order:
        torch.testing.assert_close(probes[block], io[f"probe.{block}"], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, block=block: f"first divergence at {block}: {m}")
    torch.testing.assert_close(out, io["outputs.out"], rtol=1e-4, atol=1e-5)


def test_parity_models_use_groupnorm32_eps_1e5(reference_dir):
    # A wrong eps (1e-6) changes the outputs by only ~1e-6: check it directly.
    model, _, _ = load_parity_fixture(reference_dir, "adm_unet_tiny_cond")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(isinstance(m, GroupNorm32) and m.eps == 1e-5 and m.num_groups == 32 and m.affine
                         for m in norms)


def test_legacy_and_new_attention_order_differ(reference_dir):
    legacy, _, io = load_parity_fixture(reference_dir, "adm_unet_tiny_cond")
    new, _, io_new = load_parity_fixture(reference_dir, "adm_unet_tiny_cond_neworder")
    assert not torch.allclose(io["outputs.out"], io_new["outputs.out"], atol=1e-3)  # same weights, other layout
    with torch.no_grad():
        assert not torch.allclose(legacy(io["inputs.x"], io["inputs.timesteps"], y=io["inputs.y"]),
                                  new(io["inputs.x"], io["inputs.timesteps"], y=io["inputs.y"]), atol=1e-3)


@pytest.mark.parametrize("new_order", [False, True])
def test_sdpa_attention_equals_the_original_formula(new_order):
    # The originals: q, k scaled by ch^-1/4 each, softmax in float32, einsum with v.
    torch.manual_seed(0)
    n, heads, ch, length = 2, 3, 8, 10
    qkv = torch.randn(n, 3 * heads * ch, length)
    if new_order:
        q, k, v = (a.reshape(n * heads, ch, length) for a in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(n * heads, 3 * ch, length).split(ch, dim=1)
    scale = ch ** -0.25
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).float().softmax(-1)
    expected = torch.einsum("bts,bcs->bct", weight, v).reshape(n, -1, length)
    torch.testing.assert_close(attention.qkv_attention(qkv, heads, new_order), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 4. Behaviour: shapes, conditioning, errors, checkpointing

TINY = UNetConfig(image_size=16, channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                  dropout=0.0, num_head_channels=16)


def tiny(**changes):
    torch.manual_seed(0)
    return unet.UNet(replace(TINY, **changes))


def randomize(model):
    """Random weights everywhere: the zero-initialised layers would otherwise hide the conditioning."""
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("changes, out_channels", [
    ({}, 3),
    ({"learn_sigma": True}, 6),
    ({"use_scale_shift_norm": True, "resblock_updown": True, "use_new_attention_order": True}, 3),
    ({"conv_resample": False}, 3),
    ({"channel_mult": (0.5, 1, 2), "channels": 64, "attention_resolutions": (8, 4)}, 3),  # fractional mult
])
def test_output_shapes(changes, out_channels):
    model = tiny(**changes)
    x = torch.randn(2, 3, 16, 16)
    assert model(x, torch.tensor([0, 999])).shape == (2, out_channels, 16, 16)


def test_class_conditional_uses_labels():
    model = randomize(tiny(num_classes=5))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 3])
    with torch.no_grad():
        a, b = model(x, t, y=torch.tensor([0, 1])), model(x, t, y=torch.tensor([2, 1]))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_super_res_takes_low_res_and_doubles_input_channels():
    model = tiny(super_res=True, learn_sigma=True)
    assert model.input_blocks[0][0].in_channels == 6
    x, t, low_res = torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.randn(2, 3, 4, 4)
    assert model(x, t, low_res=low_res).shape == (2, 6, 16, 16)
    randomize(model)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, low_res=low_res), model(x, t, low_res=-low_res))


def test_zero_init_output_and_scalar_t():
    # Output conv and every residual branch's last layer start at zero: the untrained UNet outputs 0.
    model = tiny()
    assert torch.count_nonzero(model(torch.randn(2, 3, 16, 16), torch.tensor(7))) == 0


def test_runs_at_other_sides_divisible_by_the_depth():
    assert tiny()(torch.randn(1, 3, 24, 24), torch.tensor([5])).shape == (1, 3, 24, 24)


@pytest.mark.parametrize("changes, call, message", [
    ({}, dict(y=torch.tensor([1, 2])), "unconditional"),
    ({"num_classes": 4}, {}, "y is required"),
    ({}, dict(context=torch.randn(2, 7, 32)), "context is not used by this UNet"),
    ({"super_res": True}, {}, "low_res is required"),
    ({}, dict(low_res=torch.randn(2, 3, 8, 8)), "low_res is not used"),
])
def test_bad_conditioning_inputs_raise_clear_errors(changes, call, message):
    with pytest.raises(ValueError, match=message):
        tiny(**changes)(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), **call)


@pytest.mark.parametrize("x, t, message", [
    (torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), "in_channels=3"),
    (torch.randn(2, 3, 15, 15), torch.tensor([1, 2]), "not divisible by 2"),
    (torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]), "one timestep per sample"),
])
def test_bad_tensors_raise_clear_errors(x, t, message):
    with pytest.raises(ValueError, match=message):
        tiny()(x, t)


@pytest.mark.parametrize("changes, message", [
    ({"attention_resolutions": (32,)}, "not feature-map sides"),
    ({"num_head_channels": 24}, "num_head_channels=24"),
    ({"image_size": 18, "channel_mult": (1, 2, 2)}, "divisible"),
    ({"channels": 48}, "multiple of 32"),
])
def test_bad_configs_raise_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny(**changes)


def test_num_heads_and_num_heads_upsample():
    model = tiny(num_head_channels=-1, num_heads=2, num_heads_upsample=4)
    assert model.input_blocks[3][1].num_heads == 2  # down path and middle: num_heads
    assert model.middle_block[1].num_heads == 2
    up = [layer for block in model.output_blocks for layer in block if isinstance(layer, attention.AttentionBlock)]
    assert up and all(layer.num_heads == 4 for layer in up)
    assert tiny().middle_block[1].num_heads == 64 // 16  # num_head_channels wins when > 0


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    calls = []

    def counting_checkpoint(function, *args, **kwargs):
        calls.append(function)
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(unet, "checkpoint", counting_checkpoint)
    monkeypatch.setattr(attention, "checkpoint", counting_checkpoint)
    changes = dict(dropout=0.2, use_scale_shift_norm=True, resblock_updown=True, num_classes=3)
    grads = []
    for use_checkpoint in (False, True):
        model = randomize(tiny(use_checkpoint=use_checkpoint, **changes))
        torch.manual_seed(1)
        x = torch.randn(2, 3, 16, 16)
        out = model(x, torch.tensor([3, 400]), y=torch.tensor([0, 2]))
        out.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    # 10 ResBlocks + 4 attention blocks in the tiny UNet, checkpointed only in the second run.
    assert len(calls) == 14
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_runs_in_bfloat16_with_groupnorm_in_float32(monkeypatch):
    model = unet.UNet(UNetConfig(image_size=8, channels=32, channel_mult=(1, 2), num_res_blocks=1,
                            attention_resolutions=(4,), num_head_channels=32, num_classes=3)).to(torch.bfloat16)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(isinstance(m, GroupNorm32) for m in norms)
    # On CPU a bfloat16 group_norm gives the same values (it accumulates in float32 internally), so the
    # dtypes that reach group_norm are what is checked: float32 input and affine parameters, every norm.
    group_norm, seen = torch.nn.functional.group_norm, []

    def spy(x, num_groups, weight=None, bias=None, eps=1e-5):
        seen.append((x.dtype, weight.dtype, bias.dtype))
        return group_norm(x, num_groups, weight, bias, eps)

    monkeypatch.setattr(torch.nn.functional, "group_norm", spy)
    out = model(torch.randn(2, 3, 8, 8, dtype=torch.bfloat16), torch.tensor([1, 500]), y=torch.tensor([0, 2]))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 8, 8)
    assert len(seen) >= len(norms) and set(seen) == {(torch.float32,) * 3}


def test_meta_build_and_describe():
    model = minildm.build_model(presets.get("ddpm-cifar10"), device="meta")
    assert all(p.is_meta for p in model.parameters())
    text = unet.describe(model)
    assert "35,746,307" in text and "middle_block" in text and "output_blocks.11" in text
    per_level = unet.parameters_per_level(model)
    assert list(per_level) == [32, 16, 8, 4]
    outside_levels = [model.time_embed, model.middle_block, model.out]
    assert sum(down + up for down, up in per_level.values()) + sum(map(count_parameters, outside_levels)) == \
        count_parameters(model)
    # DDPM CIFAR10's 32x32 level, down path: conv_in, 2 ResBlocks 128->128 (emb 512), the stride-2 conv.
    conv3x3 = 128 * 128 * 9 + 128
    resblock = 2 * (2 * 128) + 2 * conv3x3 + (512 * 128 + 128)
    assert per_level[32][0] == (3 * 128 * 9 + 128) + 2 * resblock + conv3x3


def test_time_scale_rescales_the_timestep_the_network_embeds():
    config = replace(presets.get("toy-shapes").unet, time_scale=0.25)
    torch.manual_seed(0)
    scaled = unet.UNet(config).eval()
    for p in scaled.parameters():  # the output conv is zero-initialised: make the output depend on t
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.05)
    plain = unet.UNet(replace(config, time_scale=1.0)).eval()
    plain.load_state_dict(scaled.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(scaled(x, torch.tensor([400, 800])), plain(x, torch.tensor([100, 200])))
        assert not torch.allclose(scaled(x, torch.tensor([400, 800])), plain(x, torch.tensor([400, 800])))


def test_norm_groups_reach_every_norm_and_paper_models_keep_32():
    narrow = unet.UNet(presets.get("toy-shapes").unet)
    groups = {m.num_groups for m in narrow.modules() if isinstance(m, GroupNorm32)}
    assert groups == {8}
    paper = minildm.build_model(presets.get("adm-imagenet64"), device="meta")
    assert {m.num_groups for m in paper.modules() if isinstance(m, GroupNorm32)} == {32}
    with pytest.raises(ValueError, match="divisible by 24"):
        unet.UNet(replace(presets.get("toy-shapes").unet, norm_groups=24))


def test_class_labels_out_of_range_are_rejected_and_the_null_class_is_opt_in():
    config = override(presets.get("toy-shapes"), ["unet.num_classes=5"])
    model = minildm.build_model(config)
    x, t = torch.zeros(2, 3, 16, 16), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"classes 0..4 \(unet.num_classes=5\)"):
        model(x, t, y=torch.tensor([0, 5]))
    config.unet.null_class = True
    with_null = minildm.build_model(config)
    assert with_null(x, t, y=torch.tensor([0, 5])).shape == x.shape  # 5 = the null class
    assert with_null.label_emb.num_embeddings == 6 and model.label_emb.num_embeddings == 5
