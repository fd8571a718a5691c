"""LDM's cross-attention (SpatialTransformer) in the UNet: parity with the seeded original latent-diffusion UNet,
the blocks' equations, and clear errors about the context. (Part of the latent-diffusion issue: the conditioners,
presets and chapter 06 are not built yet.)"""

import json

import pytest
import torch
from helpers import decode_parity_weights
from safetensors.torch import load_file

from minildm import attention, unet
from minildm.layers import count_parameters

NAME = "ldm_unet_spatial_transformer_tiny"


@pytest.fixture
def original(reference_dir):
    meta = json.loads((reference_dir / "parity" / f"{NAME}.json").read_text())
    return meta, load_file(reference_dir / "parity" / meta["io_file"])


def test_cross_attention_unet_matches_latent_diffusion(original, reference_dir):
    meta, io = original
    config = unet.config_from_original(meta["config"])
    assert (config.context_dim, config.transformer_depth, config.attention_resolutions) == (32, 1, (8, 4))
    model = unet.UNet(config).eval()
    assert count_parameters(model) == meta["total_params"] == 1_055_044
    assert list(model.state_dict()) == list(meta["state_dict_keys"])  # LDM's names, in LDM's order
    model.load_state_dict(decode_parity_weights(reference_dir / "parity", meta), strict=True)
    seen = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda m, args, out, name=name: seen.__setitem__(name, out.flatten(2).mean(-1) if out.ndim > 2 else out))
        for name in (k[len("probe."):] for k in io if k.startswith("probe."))]
    with torch.no_grad():
        out = model(io["inputs.x"], io["inputs.timesteps"], context=io["inputs.context"])
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(out, io["outputs.out"], atol=2e-5, rtol=1e-5)
    assert len(seen) == 10
    for name, value in seen.items():
        torch.testing.assert_close(value, io[f"probe.{name}"], atol=2e-5, rtol=1e-5, msg=f"first divergence at {name}")


def test_cross_attention_is_softmax_of_queries_against_the_context():
    torch.manual_seed(0)
    layer = attention.CrossAttention(8, context_dim=6, heads=2, dim_head=4)
    x, context = torch.randn(3, 5, 8), torch.randn(3, 7, 6)
    q = layer.to_q(x).view(3, 5, 2, 4).transpose(1, 2)
    k = layer.to_k(context).view(3, 7, 2, 4).transpose(1, 2)
    v = layer.to_v(context).view(3, 7, 2, 4).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) * 4**-0.5, dim=-1)  # over the 7 context tokens
    expected = layer.to_out((weights @ v).transpose(1, 2).reshape(3, 5, 8))
    torch.testing.assert_close(layer(x, context), expected)
    torch.testing.assert_close(layer.attention_weights(x, context), weights)  # the maps chapter 06 draws
    self_attention = attention.CrossAttention(8, heads=2, dim_head=4)  # no context: attends over x itself
    torch.testing.assert_close(self_attention(x), self_attention(x, x))
    assert layer.to_q.bias is None and layer.to_k.bias is None and layer.to_v.bias is None


def test_geglu_takes_the_value_half_first_and_the_block_starts_as_the_identity():
    torch.manual_seed(0)
    geglu = attention.GEGLU(4, 3)
    x = torch.randn(2, 4)
    value, gate = geglu.proj(x)[:, :3], geglu.proj(x)[:, 3:]
    torch.testing.assert_close(geglu(x), value * torch.nn.functional.gelu(gate))
    block = attention.SpatialTransformer(32, heads=2, dim_head=16, context_dim=8)
    h = torch.randn(2, 32, 4, 4)
    assert torch.equal(block(h, torch.randn(2, 3, 8)), h)  # proj_out starts at zero
    assert block.norm.eps == 1e-6 and type(block.norm) is torch.nn.GroupNorm


def test_context_errors_say_what_to_pass():
    config = unet.UNetConfig(image_size=8, in_channels=4, out_channels=4, channels=32, channel_mult=(1, 2),
                             num_res_blocks=1, attention_resolutions=(4,), num_head_channels=16, context_dim=16)
    model = unet.UNet(config)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    assert model(x, t, context=torch.randn(2, 5, 16)).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"context is required: this UNet has cross-attention \(unet.context_dim=16\)"):
        model(x, t)
    with pytest.raises(ValueError, match=r"\[2, L, 16\] tokens>, got \(2, 5, 12\)"):
        model(x, t, context=torch.randn(2, 5, 12))
    plain = unet.UNet(unet.UNetConfig(image_size=8, in_channels=4, out_channels=4, channels=32, channel_mult=(1, 2),
                                      num_res_blocks=1, attention_resolutions=(4,)))
    with pytest.raises(ValueError, match="context is not used by this UNet"):
        plain(x, t, context=torch.randn(2, 5, 16))


@pytest.mark.parametrize("manifest_name, params", [
    ("ldm_celebahq256_unet", 274_056_163), ("ldm_lsun_churches256_unet", 294_966_916),
    ("ldm_cin256_v2_unet", 400_920_579), ("sd_v1_unet", 859_520_964)])
def test_the_released_latent_diffusion_unets_build_exactly(reference_dir, manifest_name, params):
    """LDM's CelebA-HQ, LSUN-churches and cin256-v2 UNets and Stable Diffusion v1's, from their configs' kwargs:
    the released files' parameter counts (PAPER_FACTS 0.3) and keys, in order (without the checkpoints' prefix)."""
    manifest = json.loads((reference_dir / "manifests" / f"{manifest_name}.json").read_text())
    with torch.device("meta"):
        model = unet.UNet(unet.config_from_original(manifest["constructor_kwargs"]))
    assert count_parameters(model) == manifest["total_params"] == params
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(manifest["keys"]) and ours == manifest["keys"]
    assert manifest["checkpoint_key_prefix"] == "model.diffusion_model."
