"""The autoencoder and its discriminator train through the one training loop (two optimisers), checkpoints
hold both networks by name, resume is exact, and the shipped shapes autoencoders are what their cards say."""

import json
from pathlib import Path

import pytest
import torch

import minildm
from minildm import autoencoder, checkpoints, presets, train
from minildm.config import AutoencoderConfig, AutoencoderLossConfig, Config, DataConfig, TrainConfig
from minildm.experiments import autoencoders as experiment


def tiny_config(kind="kl", **loss):
    return Config(
        model="autoencoder",
        autoencoder=AutoencoderConfig(kind=kind, image_size=16, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                      z_channels=2, embed_dim=2, n_embed=16 if kind == "vq" else 0, norm_groups=4),
        autoencoder_loss=AutoencoderLossConfig(**{**dict(perceptual="none", disc_start=2, disc_num_layers=2,
                                                         disc_channels=8), **loss}),
        data=DataConfig(dataset="shapes", image_size=16, num_samples=64, random_flip=False),
        train=TrainConfig(batch_size=4, lr=1e-3, adam_betas=(0.5, 0.9), warmup_steps=0, max_steps=4, ema_decay=0.0,
                          grad_clip=0.0, sample_every=0, save_every=2, log_every=1),
    )


def _discriminator(path):
    cfg = tiny_config()
    from minildm.autoencoder_loss import NLayerDiscriminator

    d = NLayerDiscriminator(3, cfg.autoencoder_loss.disc_channels, cfg.autoencoder_loss.disc_num_layers)
    return checkpoints.load_module(path, "discriminator", d)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_resume_is_exact_for_both_networks(kind, tmp_path):
    cfg = tiny_config(kind)
    straight = train.train(cfg, out_dir=tmp_path / "straight", verbose=False)
    train.train(cfg, out_dir=tmp_path / "resumed", max_steps=2, verbose=False)
    resumed = train.train(cfg, out_dir=tmp_path / "resumed", verbose=False)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    d_straight = _discriminator(tmp_path / "straight" / train.CHECKPOINT).state_dict()
    d_resumed = _discriminator(tmp_path / "resumed" / train.CHECKPOINT).state_dict()
    for key in d_straight:
        assert torch.equal(d_straight[key], d_resumed[key]), key
    metadata = checkpoints.read_metadata(tmp_path / "straight" / train.CHECKPOINT)
    assert metadata["modules"] == ["discriminator"] and "optimizer_discriminator" in metadata


def test_the_discriminator_trains_from_disc_start_only(tmp_path):
    cfg = tiny_config(disc_start=3)
    cfg.train.save_every = 1
    train.train(cfg, out_dir=tmp_path, max_steps=3, verbose=False)  # steps 0, 1, 2: before disc_start
    before = _discriminator(tmp_path / train.CHECKPOINT).state_dict()
    torch.manual_seed(cfg.train.seed)  # the loop's initial weights: the autoencoder, then the discriminator
    initial = train.AutoencoderObjective(cfg, minildm.build_model(cfg)).adversary.state_dict()
    assert all(torch.equal(before[k], initial[k]) for k in initial)  # untouched (not even BatchNorm statistics)
    train.train(cfg, out_dir=tmp_path, max_steps=4, verbose=False)  # step 3: the discriminator's first step
    after = _discriminator(tmp_path / train.CHECKPOINT).state_dict()
    assert not torch.equal(after["main.0.weight"], before["main.0.weight"])
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["disc_factor"] for r in records] == [0.0, 0.0, 0.0, 1.0]
    assert all(r["d_weight"] == 0.0 for r in records[:3]) and records[3]["d_weight"] > 0
    assert {"nll_loss", "kl_loss", "rec_loss", "g_loss"} <= set(records[0]) and "logits_real" in records[3]


def test_the_objective_is_ldm_s_loss(tmp_path):
    """One step's logged loss is LPIPSWithDiscriminator's total for the step's images and posterior sample."""
    cfg = tiny_config(disc_start=100)
    losses = []
    train.train(cfg, out_dir=tmp_path, max_steps=1, verbose=False, callback=lambda step, loss: losses.append(loss))
    torch.manual_seed(cfg.train.seed)
    model = minildm.build_model(cfg)  # the loop's initial weights (seeded the same way)
    dataset = minildm.data.build_dataset(cfg.data, train=True)
    sampler = train.StepBatches(len(dataset), cfg.train.batch_size, seed=cfg.train.seed)
    x0 = torch.stack([dataset[i][0] for i in next(iter(sampler))])
    torch.manual_seed(train.step_seed(cfg.train.seed, 0, 1))
    reconstruction, posterior = model(x0)
    n = len(x0)
    expected = (x0 - reconstruction).abs().sum() / n + 1e-6 * posterior.kl().sum() / n  # logvar 0, no GAN yet
    assert losses[0] == pytest.approx(expected.item(), rel=1e-5)


def test_shapes_presets_train_through_the_cli_recipe():
    for name in ("ae-kl-f4-shapes", "ae-vq-f4-shapes"):
        cfg = presets.get(name)
        assert cfg.model == "autoencoder" and cfg.autoencoder.image_size == cfg.data.image_size == 32
        model = minildm.build_model(cfg)
        assert model.factor == 4 and model.latent_shape(32) == (3, 8, 8)
        assert cfg.autoencoder_loss.perceptual == "classifier_features"  # runs offline


def test_evaluate_reports_what_the_cards_show():
    torch.manual_seed(0)
    cfg = tiny_config("vq")
    model = minildm.build_model(cfg).eval()
    images = minildm.data.ShapesDataset(32, 16, seed=1).tensors()[0]
    report = experiment.evaluate(model, images)
    assert report["f"] == 2 and report["latent_shape"] == [2, 8, 8] and report["compression"] == 6.0
    assert report["codes_used"] + report["dead_codes"] == 16
    assert report["scale_factor"] == pytest.approx(1 / report["latent_std"])
    assert 0 < report["ssim"] <= 1 and report["reconstruction_distance"] >= 0


SHIPPED = Path(__file__).resolve().parents[1] / "data" / "checkpoints"


@pytest.mark.parametrize("name", ["ae-kl-f4-shapes", "ae-vq-f4-shapes"])
def test_shipped_autoencoders_score_what_their_cards_say(name):
    path = SHIPPED / f"{name}.safetensors"
    card = json.loads(path.with_suffix(".json").read_text())
    model, scale = experiment.load_shipped(name)
    assert scale == pytest.approx(card["scale_factor_train"])
    images = experiment.heldout_images(200)
    report = experiment.evaluate(model, images)
    # 200 of the card's 1,000 held-out images: the same first 200, so PSNR agrees to sampling error
    assert report["psnr"] == pytest.approx(card["psnr"], abs=1.0)
    assert report["ssim"] == pytest.approx(card["ssim"], abs=0.02)
    floor = {"ae-kl-f4-shapes": (33.0, 0.96), "ae-vq-f4-shapes": (30.0, 0.94)}[name]  # below its card's figures
    assert report["psnr"] > floor[0] and report["ssim"] > floor[1]
    assert (path.parent / f"{name}.md").read_text().count(card["command"]) == 1


def test_the_last_checkpoint_stores_the_latent_scale_factor(tmp_path):
    cfg = tiny_config(disc_start=100)
    cfg.train.save_every = 1
    model = train.train(cfg, out_dir=tmp_path, max_steps=2, verbose=False).ema
    extra = checkpoints.read_metadata(tmp_path / train.CHECKPOINT)["extra"]
    images = minildm.data.build_dataset(cfg.data, train=True).tensors()[0]
    expected = autoencoder.latent_scale_factor(model, images, generator=torch.Generator().manual_seed(0))
    assert extra["scale_factor"] == pytest.approx(expected)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_model_card_states_the_scores_it_was_given(kind, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(kind)
    cfg.autoencoder.image_size, cfg.data.image_size = 32, 32
    model = minildm.build_model(cfg).eval()
    checkpoints.save(tmp_path / "ae-x.safetensors", model, cfg, extra={"scale_factor": 0.5})
    report = {**experiment.evaluate(model, experiment.heldout_images(16)), "train_seconds": 125.4, "steps": 4,
              "machine": "x86_64", "command": "python -m minildm.experiments.autoencoders ship ae-x"}
    (tmp_path / "ae-x.json").write_text(json.dumps(report))
    card = experiment.write_card("ae-x", tmp_path).read_text()
    assert f"| {report['psnr']:.2f} ± {report['psnr_std']:.2f} |" in card and "2 min 5 s" in card
    assert card.count(report["command"]) == 1 and "not LPIPS" in card and "0.5000" in card
    assert ("codes used" in card) == (kind == "vq")
    assert (tmp_path / "ae-x-reconstructions.png").is_file()


def test_codebook_usage_is_logged_once_per_epoch(tmp_path):
    cfg = tiny_config("vq", disc_start=100)
    cfg.data.num_samples = 8  # an epoch is two batches of 4
    train.train(cfg, out_dir=tmp_path, max_steps=4, verbose=False)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert "codes_used_epoch" not in records[0]
    assert all(r["codes_used_epoch"] + r["dead_codes_epoch"] == 16 for r in records[1:])
    assert all(1 <= r["codes_used_epoch"] <= 8 * 8 * 8 for r in records[1:])
