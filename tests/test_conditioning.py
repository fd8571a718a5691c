"""Latent diffusion's conditioners and its checkpoint layout: the cin256-v2 class embedder (released keys and
count), and every key of the released LatentDiffusion files routed to its part by prefix, none dropped silently."""

import json

import pytest
import torch

from minildm import checkpoints, conditioning, unet
from minildm.layers import count_parameters


def test_class_embedder_is_ldm_s_and_gives_one_token(reference_dir):
    manifest = json.loads((reference_dir / "manifests" / "ldm_cin256_v2_class_embedder.json").read_text())
    kwargs = manifest["constructor_kwargs"]
    embedder = conditioning.ClassEmbedder(kwargs["n_classes"], kwargs["embed_dim"], null_class=True)
    assert count_parameters(embedder) == manifest["total_params"] == 512_512
    assert {k: list(v.shape) for k, v in embedder.state_dict().items()} == manifest["keys"]
    assert embedder.null_label == 1000  # cin256-v2's "unconditional" class
    y = torch.tensor([0, 999, 1000])
    context = embedder(y)
    assert context.shape == (3, 1, 512) and torch.equal(context[:, 0], embedder.embedding.weight[y])
    with pytest.raises(ValueError, match=r"in \[0, 1001\)"):
        embedder(torch.tensor([1001]))
    with pytest.raises(ValueError, match="int64 tensor"):
        embedder(torch.tensor([0.5]))


@pytest.mark.parametrize("name, unet_manifest, parts", [
    ("ldm_cin256_v2_full_checkpoint", "ldm_cin256_v2_unet", {"unet": 688, "first_stage": 205, "cond_stage": 1}),
    ("ldm_celebahq256_full_checkpoint", "ldm_celebahq256_unet", {"unet": 368, "unet_ema": 368, "first_stage": 205}),
    ("ldm_lsun_churches256_full_checkpoint", "ldm_lsun_churches256_unet",
     {"unet": 520, "unet_ema": 520, "first_stage": 248}),
    ("sd_v1_full_checkpoint", "sd_v1_unet", {"unet": 686, "first_stage": 248}),
])
def test_every_key_of_a_released_latent_diffusion_file_is_routed(reference_dir, name, unet_manifest, parts):
    manifest = json.loads((reference_dir / "manifests" / f"{name}.json").read_text())
    unet_keys = json.loads((reference_dir / "manifests" / f"{unet_manifest}.json").read_text())["keys"]
    split = checkpoints.split_ldm_state_dict(manifest["keys"], unet_keys=list(unet_keys))
    assert split["unused"] == []
    assert {part: len(split[part]) for part in parts} == parts
    assert len(split["schedule"]) == 12
    assert split["unet"] == unet_keys  # the UNet's own names and shapes, prefix removed
    if "unet_ema" in parts:  # LitEma's dot-less names map back onto the UNet's, one to one
        assert split["unet_ema"] == {k: v for k, v in unet_keys.items() if "running" not in k}
        assert set(split["ema_state"]) == {"decay", "num_updates"}
    if "first_stage" in parts:
        first = {"first_stage_model." + k for k in split["first_stage"]}
        assert first == {k for k in manifest["keys"] if k.startswith("first_stage_model.")}
    assert ("scale_factor" in split) == ("scale_factor" in manifest["keys"])
    # an unexpected key is named, not dropped
    extra = checkpoints.split_ldm_state_dict({**manifest["keys"], "logvar_extra": [1]}, unet_keys=list(unet_keys))
    assert extra["unused"] == ["logvar_extra"]


def test_the_unet_of_a_released_file_has_exactly_the_routed_keys(reference_dir):
    manifest = json.loads((reference_dir / "manifests" / "sd_v1_unet.json").read_text())
    full = json.loads((reference_dir / "manifests" / "sd_v1_full_checkpoint.json").read_text())["keys"]
    with torch.device("meta"):
        model = unet.UNet(unet.config_from_original(manifest["constructor_kwargs"]))
    split = checkpoints.split_ldm_state_dict(full, unet_keys=list(model.state_dict()))
    assert split["unet"] == {k: list(v.shape) for k, v in model.state_dict().items()}
