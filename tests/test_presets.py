"""The preset table: names, fresh copies, the diffusion settings of the papers."""

from dataclasses import replace

import pytest

from minildm import data, presets


def test_names_and_unknown_preset():
    names = presets.names()
    assert len(names) == len(set(names))
    for expected in ("toy-2d", "toy-shapes", "ddpm-shapes", "ddpm-cifar10", "ddpm-celebahq256", "iddpm-cifar10",
                     "iddpm-imagenet64", "iddpm-imagenet64-cond", "adm-imagenet64", "adm-imagenet128",
                     "adm-imagenet256", "adm-imagenet256-uncond", "adm-imagenet512", "adm-lsun-bedroom",
                     "adm-lsun-cat", "adm-lsun-horse", "adm-upsampler-64-256", "adm-upsampler-128-512",
                     "shapes-classifier", "adm-classifier64", "adm-classifier128", "adm-classifier256",
                     "adm-classifier512"):
        assert expected in names
    with pytest.raises(KeyError, match="unknown preset 'ddpm-cifar100'; available presets: toy-2d"):
        presets.get("ddpm-cifar100")


def test_get_returns_a_fresh_copy():
    first = presets.get("ddpm-cifar10")
    first.unet.channels = 1
    assert presets.get("ddpm-cifar10").unet.channels == 128


def test_ddpm_paper_diffusion_settings():
    config = presets.get("ddpm-cifar10")
    d = config.diffusion
    assert (d.num_timesteps, d.beta_schedule, d.beta_start, d.beta_end) == (1000, "linear", 1e-4, 0.02)
    assert (d.model_mean_type, d.loss_type) == ("eps", "simple")
    t = config.train
    assert (t.batch_size, t.lr, t.warmup_steps, t.grad_clip, t.ema_decay) == (128, 2e-4, 5000, 1.0, 0.9999)


def test_paper_presets_cite_source_params_and_result():
    for name in presets.names():
        preset = presets.info(name)
        assert preset.summary
        if name.startswith(("ddpm-c", "ddpm-l", "iddpm", "adm")):
            assert preset.source and preset.result and preset.params > 1_000_000, name


def test_adm_recipes():
    assert presets.get("adm-imagenet64").diffusion.beta_schedule == "cosine"
    assert presets.get("adm-imagenet256").diffusion.loss_type == "hybrid"
    assert presets.get("iddpm-cifar10").diffusion.num_timesteps == 4000
    assert presets.get("adm-imagenet128").unet.num_heads == 4


def test_iddpm_timestep_rescaling_follows_the_readme_flags():
    # improved-diffusion trains with rescale_timesteps=True (the net sees t * 1000 / T) except where the
    # README passes --rescale_timesteps False (ImageNet-64 conditional, which also drops the vb rescaling).
    assert presets.get("iddpm-cifar10").unet.time_scale == 0.25
    assert presets.get("iddpm-upsampler-64-256").unet.time_scale == 0.25
    cond = presets.get("iddpm-imagenet64-cond")
    assert cond.unet.time_scale == 1.0 and cond.diffusion.hybrid_lambda * cond.diffusion.num_timesteps == 1.0
    assert presets.get("adm-imagenet64").unet.time_scale == 1.0


def test_classifier_presets_build_the_classifier_section():
    for name in ("shapes-classifier", "adm-classifier64", "adm-classifier512"):
        config = presets.get(name)
        assert config.model == "classifier"
        assert config.classifier.image_size == config.data.image_size
    assert presets.get("adm-classifier64").classifier.num_res_blocks == 4  # README: --classifier_depth 4 at 64x64
    assert presets.get("shapes-classifier").classifier.out_channels == 5  # data.ShapesDataset's kinds


def test_kind_color_conditional_preset_matches_its_data():
    config, twin = presets.get("ddpm-shapes-cond-kind-color"), presets.get("ddpm-shapes-cond")
    dataset = data.build_dataset(config.data)
    assert config.unet.num_classes == dataset.num_classes == 35 and config.data.label == "kind_color"
    assert config.unet.null_class and config.train.cond_dropout == 0.1
    assert replace(config.train, out_dir=twin.train.out_dir) == twin.train  # trained as its twin
    assert replace(config.unet, num_classes=5) == twin.unet and config.diffusion == twin.diffusion
