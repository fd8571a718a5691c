"""Config: round trips, overrides with type coercion, clear errors for unknown keys."""

import json

import pytest

from minildm import config, presets


def test_to_dict_from_dict_round_trip_through_json():
    original = presets.get("adm-imagenet512")
    restored = config.from_dict(json.loads(json.dumps(config.to_dict(original))))
    assert restored == original
    assert restored.unet.channel_mult == (0.5, 1, 1, 2, 2, 4, 4)


def test_override_coerces_to_field_types():
    base = presets.get("ddpm-cifar10")
    cfg = config.override(base, ["unet.channels=64", "train.lr=1e-4", "unet.channel_mult=1,2",
                                 "unet.use_scale_shift_norm=true", "train.adam_betas=0.9,0.99", "model=mlp",
                                 "data.dataset=toy2d"])
    assert cfg.unet.channels == 64 and isinstance(cfg.unet.channels, int)
    assert cfg.train.lr == 1e-4 and cfg.unet.channel_mult == (1, 2)
    assert cfg.unet.use_scale_shift_norm is True and cfg.train.adam_betas == (0.9, 0.99)
    assert cfg.model == "mlp"
    assert base.unet.channels == 128, "override must not modify its input"


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(KeyError, match=r"unknown config key 'unet.chanels'.*'channels'"):
        config.override(presets.get("ddpm-cifar10"), ["unet.chanels=64"])
    with pytest.raises(KeyError, match=r"unknown config section 'optim'.*'train'"):
        config.override(presets.get("ddpm-cifar10"), ["optim.lr=1"])
    with pytest.raises(KeyError, match="valid keys"):
        config.from_dict({"unet": {"width": 3}})


def test_bad_values_and_syntax_are_explained():
    with pytest.raises(ValueError, match="unet.channels: cannot read '1.5' as int"):
        config.override(presets.get("ddpm-cifar10"), ["unet.channels=1.5"])
    with pytest.raises(ValueError, match="cannot read 'maybe' as bool"):
        config.override(presets.get("ddpm-cifar10"), ["unet.learn_sigma=maybe"])
    with pytest.raises(ValueError, match="section.field=value"):
        config.override(presets.get("ddpm-cifar10"), ["train.lr"])
