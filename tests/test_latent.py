"""Latent diffusion (minildm.latent): encode -> scale -> diffuse -> divide -> decode, conditions through
cross-attention, condition dropout in the training loop, checkpoints, official LDM / Stable Diffusion layouts."""

import json

import pytest
import torch

import minildm
from minildm import autoencoder, checkpoints, latent, presets, sampling, train
from minildm.config import (AutoencoderConfig, Config, ConfigError, DataConfig, DiffusionConfig, LatentConfig,
                            TrainConfig, UNetConfig)
from minildm.layers import count_parameters


def tiny_config(conditioner="class", **latent_settings):
    """A 16x16 image model with an f=2 KL autoencoder (8x8x2 latents) and a small cross-attention UNet."""
    settings = dict(first_stage="ae-kl-f4-shapes", scale_factor=0.5, conditioner=conditioner, cond_vocab=4,
                    cond_length=1)
    settings.update(latent_settings)
    return Config(
        unet=UNetConfig(image_size=8, in_channels=2, out_channels=2, channels=16, channel_mult=(1, 2),
                        num_res_blocks=1, attention_resolutions=(4,), dropout=0.0, num_head_channels=8,
                        norm_groups=8, context_dim=0 if conditioner == "none" else 8),
        latent=LatentConfig(**settings),
        diffusion=DiffusionConfig(num_timesteps=50, beta_schedule="scaled_linear", beta_start=0.0015,
                                  beta_end=0.0195),
        data=DataConfig(image_size=16),
        train=TrainConfig(batch_size=4, lr=1e-3, warmup_steps=0, max_steps=2, ema_decay=0.9, sample_every=0,
                          save_every=0, log_every=0),
    )


def tiny_autoencoder():
    torch.manual_seed(0)
    return autoencoder.build(AutoencoderConfig(kind="kl", image_size=16, channels=8, channel_mult=(1, 2),
                                               num_res_blocks=1, z_channels=2, embed_dim=2, norm_groups=4))


def tiny_ldm(conditioner="class", **latent_settings):
    """A tiny LatentDiffusion whose zero-initialised output layers (UNet out, SpatialTransformer proj_out) are
    drawn at random, so that its output depends on the input and the condition."""
    torch.manual_seed(0)
    ldm = latent.build(tiny_config(conditioner, **latent_settings), first_stage=tiny_autoencoder())
    with torch.no_grad():
        for parameter in ldm.unet.parameters():
            if parameter.ndim > 1 and not parameter.any():
                parameter.normal_(std=0.2)
    return ldm


def test_encode_scales_the_posterior_mean_and_decode_divides_before_the_decoder():
    ldm = tiny_ldm()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    ae = ldm.first_stage_model
    with torch.no_grad():
        torch.testing.assert_close(ldm.encode(x), 0.5 * ae.encode(x).mode())
        z = torch.randn(3, 2, 8, 8)
        torch.testing.assert_close(ldm.decode(z), ae.decode(z / 0.5))
    assert not any(p.requires_grad for p in ae.parameters())
    ldm.train()
    assert not ae.training  # the first stage stays frozen in eval mode


def test_the_condition_reaches_the_unet_as_cross_attention_context():
    ldm = tiny_ldm()
    z, t, y = torch.randn(2, 2, 8, 8), torch.tensor([3, 40]), torch.tensor([0, 2])
    with torch.no_grad():
        context = ldm.cond_stage_model(y)
        assert context.shape == (2, 1, 8)
        torch.testing.assert_close(ldm(z, t, y=y), ldm.unet(z, t, context=context))
    assert ldm.null(3).tolist() == [3, 3, 3]  # the last of cond_vocab=4 classes is the null class


def test_state_dict_uses_latent_diffusions_names():
    keys = list(tiny_ldm().state_dict())
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model", "scale_factor"}
    assert all(k.startswith("model.diffusion_model.") for k in keys if k.startswith("model."))
    assert "cond_stage_model.embedding.weight" in keys and "null_condition" not in keys


def test_the_first_stage_must_fit_the_unet():
    config = tiny_config()
    config.unet.in_channels = config.unet.out_channels = 3
    with pytest.raises(ConfigError, match=r"unet.in_channels=3 must equal the first stage's latent channels 2"):
        latent.build(config, first_stage=tiny_autoencoder())
    config = tiny_config()
    config.data.image_size = 32
    with pytest.raises(ConfigError, match=r"unet.image_size=8 must be data.image_size / f = 32 / 2 = 16"):
        latent.build(config, first_stage=tiny_autoencoder())
    config = tiny_config(first_stage="no-such-autoencoder")
    with pytest.raises(FileNotFoundError, match="neither an autoencoder preset nor a file"):
        latent.build(config)
    config = tiny_config(first_stage="ddpm-shapes")
    with pytest.raises(ConfigError, match="is a unet preset"):
        latent.build(config)


def test_config_checks_the_conditioner_against_the_unet():
    config = tiny_config()
    config.unet.context_dim = 0
    with pytest.raises(ConfigError, match=r"latent.conditioner='class' feeds cross-attention: set unet.context_dim"):
        minildm.config.validate(config)
    with pytest.raises(ConfigError, match="latent.conditioner='words' is not one of"):
        minildm.config.validate(tiny_config(conditioner="words"))
    with pytest.raises(ConfigError, match="latent.cond_layers=0 must be an integer >= 1"):
        minildm.config.validate(tiny_config(conditioner="text", cond_vocab=10, cond_layers=0))


def test_the_shipped_first_stage_loads_with_its_stored_scale_factor():
    config = presets.get("ldm-shapes-class")
    ldm = latent.build(config)
    stored = checkpoints.read_metadata(latent.REPOSITORY / config.latent.first_stage)["extra"]["scale_factor"]
    assert ldm.scale_factor.item() == pytest.approx(stored)
    shapes = minildm.data.ShapesDataset(8, 32, seed=1)
    z = ldm.encode(shapes.tensors()[0])
    assert z.shape == (8, 3, 8, 8)
    assert 0.4 < z.std().item() < 2  # roughly unit variance after scaling
    assert (ldm.decode(z) - shapes.tensors()[0]).abs().mean() < 0.1  # the autoencoder reconstructs


def test_condition_dropout_gives_the_null_condition_at_the_configured_rate():
    ldm = tiny_ldm()
    config = tiny_config()
    config.train.cond_dropout, config.train.batch_size, config.train.max_steps = 0.3, 50, 4
    seen = []

    def spy(network, x0, y, t, noise):
        seen.append(y.clone())
        return network(x0, t, y=y).pow(2).mean(dim=(1, 2, 3))

    z = torch.randn(100, 2, 8, 8)
    labels = torch.randint(0, 3, (100,))
    train.train(config, dataset=(z, labels), model=ldm, objective=spy, verbose=False)
    y = torch.cat(seen)
    share = (y == 3).float().mean().item()
    assert 0.2 < share < 0.4 and set(y.tolist()) <= {0, 1, 2, 3}


def test_training_saves_a_checkpoint_that_load_rebuilds_exactly(tmp_path):
    config = tiny_config()
    config.train.save_every = 2
    ldm = tiny_ldm()
    z, labels = torch.randn(8, 2, 8, 8), torch.randint(0, 3, (8,))
    trained = train.train(config, dataset=(z, labels), model=ldm, out_dir=tmp_path, verbose=False)
    loaded = latent.load(tmp_path / train.CHECKPOINT)
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([5, 30]), torch.tensor([1, 3])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y=y), trained.ema(x, t, y=y), rtol=0, atol=0)
        torch.testing.assert_close(loaded.decode(x), trained.ema.decode(x), rtol=0, atol=0)
    assert loaded.scale_factor.item() == 0.5 and loaded.null(1).tolist() == [3]
    with pytest.raises(checkpoints.CheckpointError, match="not a latent diffusion checkpoint"):
        checkpoints.save(tmp_path / "plain.safetensors", ldm.unet, config)
        latent.load(tmp_path / "plain.safetensors")


def test_sample_is_the_same_for_every_batch_size_and_guidance_one_is_the_plain_model():
    ldm = tiny_ldm().eval()
    diffusion = minildm.build_diffusion(ldm.config)
    labels = torch.tensor([0, 1, 2, 0, 1])
    whole = latent.sample(ldm, diffusion, labels, steps=5, seed=3)
    chunked = latent.sample(ldm, diffusion, labels, steps=5, seed=3, batch_size=2)
    torch.testing.assert_close(whole, chunked)
    assert whole.shape == (5, 3, 16, 16) and whole.abs().max() <= 1
    plms = latent.sample(ldm, diffusion, labels, steps=5, seed=3, sampler="plms", guidance_scale=2.0)
    assert plms.shape == whole.shape and not torch.equal(plms, whole)
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        latent.sample(ldm, diffusion, labels, sampler="heun")


def test_a_per_sample_generator_gives_each_sample_its_own_stream_and_one_batch_per_call():
    ldm = tiny_ldm().eval()
    diffusion = minildm.build_diffusion(ldm.config)
    labels = torch.tensor([0, 1, 2, 0])

    def run(indices, sampler, **options):
        return latent.sample(ldm, diffusion, labels[indices], steps=3, sampler=sampler, **options,
                             generator=sampling.PerSampleGenerator(7, indices), return_latents=True)[1]

    for sampler, options in [("ddpm", {}), ("ddim", {"eta": 1.0}), ("plms", {"guidance_scale": 2.0})]:
        together = run([0, 1, 2, 3], sampler, **options)
        apart = torch.cat([run([0, 1], sampler, **options), run([2], sampler, **options),
                           run([3], sampler, **options)])
        torch.testing.assert_close(together, apart, rtol=0, atol=1e-4)  # the noise is the sample's, not the batch's
    x_T = sampling.PerSampleGenerator(7, [2]).randn((1, 2, 8, 8))  # sample 2's x_T comes first from its stream
    expected = sampling.ddim_sample(ldm, diffusion, x_T, minildm.schedules.space_timesteps(50, "3"),
                                    clip_denoised=False, model_kwargs={"y": labels[[2]]}, progress=False)
    torch.testing.assert_close(run([2], "ddim"), expected, rtol=0, atol=1e-5)
    seeded = latent.sample(ldm, diffusion, labels, steps=3, seed=7, return_latents=True)[1]
    assert (seeded - together).abs().max() > 0.1  # one generator seeded with 7 is another stream
    with pytest.raises(ValueError, match="holds 4 streams for 4 samples in batches of 2; .*leave batch_size out"):
        latent.sample(ldm, diffusion, labels, steps=2, batch_size=2, generator=sampling.PerSampleGenerator(0, range(4)))
    with pytest.raises(ValueError, match="holds 3 streams for 4 samples"):
        latent.sample(ldm, diffusion, labels, steps=2, generator=sampling.PerSampleGenerator(0, range(3)))


def test_guided_sampling_equals_the_guidance_formula_on_the_latents():
    ldm = tiny_ldm().eval()
    diffusion = minildm.build_diffusion(ldm.config)
    labels = torch.tensor([0, 2])
    _, z = latent.sample(ldm, diffusion, labels, steps=3, seed=1, guidance_scale=4.0, return_latents=True)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 8, 8, generator=generator)

    def guided(x_t, t, y):
        e_c, e_u = ldm(x_t, t, y=y), ldm(x_t, t, y=ldm.null(2))
        return e_u + 4.0 * (e_c - e_u)

    timesteps = minildm.schedules.space_timesteps(50, "3")
    expected = sampling.ddim_sample(guided, diffusion, x, timesteps, clip_denoised=False,
                                    model_kwargs={"y": labels}, progress=False)
    torch.testing.assert_close(z, expected, atol=1e-4, rtol=1e-4)  # batched vs two passes


def test_official_state_dicts_are_routed_by_prefix_and_unused_keys_named():
    source = tiny_ldm()
    state = {f"model.diffusion_model.{k}": v + 1 for k, v in source.unet.state_dict().items()}
    state.update({f"model_ema.diffusion_model{k.replace('.', '')}": v + 2 for k, v in
                  source.unet.state_dict().items()})
    state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)})
    state.update({f"first_stage_model.{k}": v for k, v in source.first_stage_model.state_dict().items()})
    state["first_stage_model.loss.logvar"] = torch.zeros(())  # training-only keys of the first stage
    state.update({f"cond_stage_model.{k}": v for k, v in source.cond_stage_model.state_dict().items()})
    state.update({"betas": torch.zeros(50), "scale_factor": torch.tensor(0.25), "mystery.weight": torch.zeros(1)})
    target = tiny_ldm()
    report = latent.load_official_state_dict(target, state)
    assert report == {"unet": "ema", "unused": ["mystery.weight"]}
    first = next(iter(source.unet.state_dict()))
    torch.testing.assert_close(target.unet.state_dict()[first], source.unet.state_dict()[first] + 2)
    assert target.scale_factor.item() == 0.25
    report = latent.load_official_state_dict(target, state, use_ema=False)
    torch.testing.assert_close(target.unet.state_dict()[first], source.unet.state_dict()[first] + 1)
    del state[f"model.diffusion_model.{first}"]
    with pytest.raises(checkpoints.CheckpointError, match=first.replace(".", r"\.")):
        latent.load_official_state_dict(target, state, use_ema=False)


@pytest.mark.parametrize("name, manifest, params", [
    ("ldm-celebahq256", "ldm_celebahq256", 274_056_163), ("ldm-lsun-churches256", "ldm_lsun_churches256", 294_966_916),
    ("ldm-cin256-v2", "ldm_cin256_v2", 400_920_579), ("sd-v1", "sd_v1", 859_520_964)])
def test_the_latent_diffusion_presets_are_the_released_models(reference_dir, name, manifest, params):
    """The preset's UNet has the paper's count; the whole LatentDiffusion (UNet, first stage, conditioner) has the
    keys and shapes of the released full checkpoint, less the schedule buffers and LitEma copies minildm keeps
    elsewhere (and SD's CLIP, which the manifest leaves out)."""
    config = presets.get(name)
    assert presets.info(name).params == params
    assert count_parameters(minildm.build_model(config, device="meta")) == params
    full = json.loads((reference_dir / "manifests" / f"{manifest}_full_checkpoint.json").read_text())["keys"]
    expected = {k: v for k, v in full.items() if not k.startswith("model_ema.") and k not in
                checkpoints.LDM_SCHEDULE_BUFFERS and k != "scale_factor"}
    with torch.device("meta"):
        first_stage, _ = latent.build_first_stage(config)
        conditioner, _ = latent.build_conditioner(config) if config.latent.conditioner == "class" else (None, None)
        ldm = latent.LatentDiffusion(minildm.build_model(config), first_stage, conditioner)
    ours = {k: list(v.shape) for k, v in ldm.state_dict().items() if k != "scale_factor"}
    assert ours == expected
    assert config.diffusion.beta_schedule == "scaled_linear"


def test_stable_diffusion_preset_settings():
    config = presets.get("sd-v1")
    assert (config.latent.scale_factor, config.latent.first_stage, config.latent.conditioner) == (0.18215, "ae-kl-f8",
                                                                                                   "clip")
    assert (config.diffusion.beta_start, config.diffusion.beta_end, config.unet.context_dim) == (0.00085, 0.012, 768)
    assert presets.info("ae-kl-f8").params == 83_653_863


def tiny_text_ldm():
    from minildm import conditioning

    captions = ["a red circle", "a blue square on the left", "a green cross"]
    tokenizer = conditioning.WordTokenizer.from_captions(captions)
    torch.manual_seed(0)
    config = tiny_config("text", cond_vocab=tokenizer.vocab_size, cond_length=tokenizer.max_length, cond_layers=1)
    return latent.build(config, first_stage=tiny_autoencoder(), tokenizer=tokenizer), captions


def test_captions_are_tokenized_and_the_empty_caption_is_the_null_condition():
    ldm, captions = tiny_text_ldm()
    z0, tokens = latent.training_data(ldm, torch.rand(3, 3, 16, 16) * 2 - 1, captions)
    assert z0.shape == (3, 2, 8, 8) and tokens.shape == (3, ldm.tokenizer.max_length)
    torch.testing.assert_close(tokens, ldm.tokenizer.encode(captions))
    torch.testing.assert_close(ldm.null(2), ldm.tokenizer.encode(["", ""]))
    assert ldm.cond_stage_model(tokens).shape == (3, ldm.tokenizer.max_length, 8)
    config = tiny_config("text", cond_vocab=99, cond_length=ldm.tokenizer.max_length, cond_layers=1)
    with pytest.raises(ConfigError, match=f"latent.cond_vocab=99 but the tokenizer has {ldm.tokenizer.vocab_size}"):
        latent.build(config, first_stage=tiny_autoencoder(), tokenizer=ldm.tokenizer)


def test_the_command_line_samples_latent_checkpoints(tmp_path):
    from minildm.__main__ import main

    ldm, captions = tiny_text_ldm()
    z0, tokens = latent.training_data(ldm, torch.rand(3, 3, 16, 16) * 2 - 1, captions)
    config = ldm.config
    config.train.save_every, config.train.cond_dropout, config.train.batch_size = 1, 0.5, 3
    train.train(config, dataset=(z0, tokens), model=ldm, out_dir=tmp_path, verbose=False, max_steps=1)
    checkpoint = str(tmp_path / train.CHECKPOINT)
    assert latent.load(checkpoint).tokenizer.to_dict() == ldm.tokenizer.to_dict()
    out = tmp_path / "grid.png"
    assert main(["sample", checkpoint, "--prompt", "a red square", "--num", "2", "--steps", "3", "--sampler", "plms",
                 "--guidance-scale", "2", "--out", str(out)]) == 0
    assert out.is_file()
    assert main(["sample", checkpoint, "--num", "2", "--steps", "2", "--out", str(out)]) == 2  # no prompt


def test_a_clip_conditioned_model_samples_with_guidance_on_token_ids():
    """Stable Diffusion's arrangement in miniature: a frozen CLIP text model (random, tiny) as the conditioner."""
    pytest.importorskip("transformers")
    from minildm import conditioning

    config = tiny_config("clip", cond_vocab=0, cond_length=7)
    clip = conditioning.FrozenCLIPEmbedder(pretrained=False, max_length=7, config=dict(
        vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=7))
    torch.manual_seed(0)
    ldm = latent.LatentDiffusion(minildm.build_model(config), tiny_autoencoder(), clip, scale_factor=0.5)
    ldm.config = config
    ldm.null_condition = torch.tensor([[48, 49, 49, 49, 49, 49, 49]])  # what CLIP's tokenizer makes of ""
    ids = torch.randint(0, 48, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(ldm(torch.zeros(3, 2, 8, 8), torch.tensor([1, 2, 3]), y=ids),
                                   ldm.unet(torch.zeros(3, 2, 8, 8), torch.tensor([1, 2, 3]), context=clip(ids)))
    images = latent.sample(ldm, minildm.build_diffusion(config), ids, steps=2, guidance_scale=7.5, sampler="plms")
    assert images.shape == (3, 3, 16, 16) and not any(p.requires_grad for p in clip.parameters())


def test_a_latent_preset_is_not_trained_as_a_pixel_unet_and_training_grids_are_decoded(tmp_path):
    with pytest.raises(ConfigError, match="a latent diffusion model trains on latents, as a whole model"):
        train.train(presets.get("ldm-shapes-class"), max_steps=1)
    ldm = tiny_ldm()
    config = ldm.config
    config.train.sample_every, config.sample.num_samples = 1, 4
    train.train(config, dataset=(torch.randn(8, 2, 8, 8), torch.randint(0, 3, (8,))), model=ldm, out_dir=tmp_path,
                max_steps=1, verbose=False)
    from PIL import Image

    assert Image.open(tmp_path / "samples" / "step_0000001.png").size == (38, 38)  # 2x2 images of 16x16, padding 2
