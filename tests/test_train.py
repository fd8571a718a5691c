"""The training loop: exact resume, warmup, EMA, deterministic data order, outputs on disk."""

import json
import math

import pytest
import torch

import minildm
from minildm import checkpoints, presets, train
from minildm.config import override


def tiny_unet_config(**extra):
    """toy-shapes shrunk to a 2-level UNet on 16x16, 24 images: one step takes a few milliseconds."""
    items = {
        "unet.channel_mult": "1,2", "unet.attention_resolutions": "8", "unet.dropout": "0.1",
        "unet.num_classes": "0", "diffusion.num_timesteps": "50",
        "data.num_samples": "24", "train.batch_size": "8", "train.warmup_steps": "4", "train.lr": "1e-3",
        "train.ema_decay": "0.9", "train.log_every": "2", "train.sample_every": "0", "train.save_every": "100",
    }
    items.update(extra)
    return override(presets.get("toy-shapes"), [f"{k}={v}" for k, v in items.items()])


def tensors_of(path):
    metadata = checkpoints.read_metadata(path)
    return {k: v for k, v in checkpoints._read_tensors(path, ("",), "cpu").items()}, metadata


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    # Dropout on, warmup crossing the interruption, 3 steps per epoch, interrupted mid-epoch (after step 4) and
    # continued for 5 more steps across another epoch: batch order, t, noise, dropout masks, learning rate,
    # AdamW moments and EMA must all continue exactly.
    config = tiny_unet_config()
    straight_losses, resumed_losses = [], []
    straight = train.train(config, max_steps=9, out_dir=tmp_path / "straight", verbose=False,
                           callback=lambda step, loss: straight_losses.append((step, loss)))
    interrupted = train.train(config, max_steps=4, out_dir=tmp_path / "resumed", verbose=False)
    assert checkpoints.read_metadata(tmp_path / "resumed" / train.CHECKPOINT)["step"] == 4
    at_interruption = [p.detach().clone() for p in interrupted.model.parameters()]
    resumed = train.train(config, max_steps=9, out_dir=tmp_path / "resumed", verbose=False,
                          callback=lambda step, loss: resumed_losses.append((step, loss)))

    # The second call started from the checkpoint (steps 5..9 only) and saw the same losses, bit for bit.
    assert [step for step, _ in resumed_losses] == [5, 6, 7, 8, 9]
    assert resumed_losses == straight_losses[4:]
    for a, b in ((straight.model, resumed.model), (straight.ema, resumed.ema)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name
    # The whole checkpoint (weights, EMA, optimizer moments and step counts) is identical too.
    first, meta_first = tensors_of(tmp_path / "straight" / train.CHECKPOINT)
    second, meta_second = tensors_of(tmp_path / "resumed" / train.CHECKPOINT)
    assert first.keys() == second.keys() and any(k.startswith("optimizer.state.") for k in first)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert meta_first["optimizer"] == meta_second["optimizer"] and meta_first["step"] == meta_second["step"] == 9
    # ... and the weights moved after the interruption (the resumed steps did something).
    assert any(not torch.equal(x, y) for x, y in zip(at_interruption, resumed.model.parameters()))


def test_restarting_without_resume_starts_over(tmp_path):
    config = tiny_unet_config()
    train.train(config, max_steps=3, out_dir=tmp_path / "run", verbose=False)
    fresh = train.train(config, max_steps=1, out_dir=tmp_path / "fresh", verbose=False)
    steps = []
    again = train.train(config, max_steps=1, out_dir=tmp_path / "run", resume=False, verbose=False,
                        callback=lambda step, loss: steps.append(step))
    # Resuming would load step 3 and run nothing; starting over runs step 1 from the seed and overwrites the file.
    assert steps == [1]
    assert all(torch.equal(x, y) for x, y in zip(again.model.parameters(), fresh.model.parameters()))
    assert checkpoints.read_metadata(tmp_path / "run" / train.CHECKPOINT)["step"] == 1


def test_learning_rate_warmup():
    cfg = presets.get("ddpm-cifar10").train
    assert train.learning_rate(cfg, 0) == pytest.approx(2e-4 / 5000)
    assert train.learning_rate(cfg, 2499) == pytest.approx(1e-4)
    assert train.learning_rate(cfg, 4999) == train.learning_rate(cfg, 10**6) == 2e-4
    cfg.warmup_steps = 0
    assert train.learning_rate(cfg, 0) == 2e-4


def test_cosine_learning_rate_falls_from_lr_to_lr_final_after_the_warm_up():
    cfg = presets.get("ddpm-cifar10").train
    cfg.lr_schedule, cfg.lr, cfg.lr_final, cfg.warmup_steps, cfg.max_steps = "cosine", 1e-3, 1e-5, 100, 1100
    assert train.learning_rate(cfg, 49) == pytest.approx(0.5e-3)  # warm-up unchanged
    assert train.learning_rate(cfg, 100) == pytest.approx(1e-3)
    assert train.learning_rate(cfg, 600) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)  # half way: the mean
    assert train.learning_rate(cfg, 350) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi / 4)) / 2)
    assert train.learning_rate(cfg, 1100) == train.learning_rate(cfg, 5000) == pytest.approx(1e-5)
    quarter = 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi / 4)) / 2  # a quarter of the way through the cosine
    assert train.learning_rate(cfg, 600, total_steps=2100) == pytest.approx(quarter)
    cfg.lr_schedule = "linear"
    with pytest.raises(ValueError, match="train.lr_schedule='linear'.*'cosine'"):
        train.learning_rate(cfg, 500)


def test_update_ema_is_the_exponential_moving_average():
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.9 * e + 0.1 * m for e, m in zip(ema.parameters(), model.parameters())]
    train.update_ema(ema, model, 0.9)
    for value, target in zip(ema.parameters(), expected):
        torch.testing.assert_close(value, target)


def test_ema_decay_warms_up_then_stays_at_the_configured_decay():
    cfg = presets.get("toy-2d").train
    cfg.ema_decay = 0.999
    assert train.ema_decay(cfg, 0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert train.ema_decay(cfg, 90) == pytest.approx(0.91)
    assert train.ema_decay(cfg, 20_000) == 0.999
    cfg.ema_warmup = False
    assert train.ema_decay(cfg, 0) == 0.999


def test_ema_of_a_short_run_holds_no_random_initial_weights(tmp_path):
    """The cause of speckled samples: without warm-up, 100 steps at decay 0.999 keep 90% of the random init."""
    config = override(presets.get("toy-2d"), ["train.batch_size=64", "train.sample_every=0", "train.save_every=0",
                                              "data.num_samples=2000", "train.ema_decay=0.999"])
    torch.manual_seed(config.train.seed)
    initial = minildm.build_model(config)
    result = train.train(config, max_steps=100, out_dir=tmp_path, verbose=False)

    def distance(a, b):
        return sum((p - q).pow(2).sum() for p, q in zip(a.parameters(), b.parameters())).sqrt().item()

    moved = distance(result.model, initial)
    assert distance(result.ema, result.model) < 0.2 * moved  # the average follows the trained weights
    config.train.ema_warmup = False
    old = train.train(config, max_steps=100, out_dir=tmp_path, verbose=False)
    assert distance(old.ema, initial) < 0.2 * distance(old.model, initial)  # what the loop did before


def test_train_on_your_own_tensor_dataset_and_labels(tmp_path):
    images = torch.rand(24, 3, 16, 16) * 2 - 1
    labels = torch.arange(24) % 5
    config = tiny_unet_config(**{"unet.num_classes": "5"})
    seen = []
    train.train(config, dataset=(images, labels), max_steps=3, out_dir=tmp_path, resume=False, verbose=False,
                callback=lambda step, loss: seen.append(step))
    assert seen == [1, 2, 3]
    # a map-style dataset of dicts, unconditional
    items = [{"image": image} for image in images]
    train.train(tiny_unet_config(), dataset=items, max_steps=1, out_dir=tmp_path, resume=False, verbose=False)


@pytest.mark.parametrize("examples, message", [
    (torch.rand(24, 3, 16, 16) * 255, r"\[-1, 1\].*x / 127.5 - 1"),
    (torch.rand(24, 3, 32, 32), "unet.image_size=16"),
    (torch.rand(24, 1, 16, 16), "unet.in_channels=3"),
    ("not a dataset", None),
])
def test_train_rejects_data_it_cannot_use_with_what_to_change(tmp_path, examples, message):
    if message is None:
        with pytest.raises(TypeError, match="map-style dataset"):
            train.train(tiny_unet_config(), dataset=3, max_steps=1, out_dir=tmp_path, verbose=False)
        return
    with pytest.raises(ValueError, match=message):
        train.train(tiny_unet_config(), dataset=examples, max_steps=1, out_dir=tmp_path, verbose=False)


def test_conditional_model_rejects_data_without_labels(tmp_path):
    with pytest.raises(ValueError, match="unet.num_classes=0"):
        train.train(tiny_unet_config(**{"unet.num_classes": "5"}), dataset=torch.rand(24, 3, 16, 16) * 2 - 1,
                    max_steps=1, out_dir=tmp_path, verbose=False)


def test_condition_dropout_feeds_the_null_class(tmp_path):
    """cond_dropout=1 replaces every label by the null class: the run cannot depend on the labels."""
    images = torch.rand(24, 3, 16, 16) * 2 - 1
    config = tiny_unet_config(**{"unet.num_classes": "5", "unet.null_class": "true", "train.cond_dropout": "1.0",
                                 "unet.dropout": "0.0"})
    runs = [train.train(config, dataset=(images, labels), max_steps=2, out_dir=tmp_path / str(i), verbose=False)
            for i, labels in enumerate((torch.zeros(24, dtype=torch.long), torch.arange(24) % 5))]
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.equal(a, b)
    assert runs[0].model.label_emb.num_embeddings == 6
    config.train.cond_dropout = 0.0  # real labels: the two runs differ
    other = train.train(config, dataset=(images, torch.arange(24) % 5), max_steps=2, out_dir=tmp_path / "2",
                        verbose=False)
    assert any(not torch.equal(a, b) for a, b in zip(other.model.parameters(), runs[1].model.parameters()))
    with pytest.raises(ValueError, match="unet.null_class=true"):
        train.train(tiny_unet_config(**{"unet.num_classes": "5", "train.cond_dropout": "0.1"}),
                    dataset=(images, torch.arange(24) % 5), max_steps=1, out_dir=tmp_path / "3", verbose=False)


def test_step_batches_are_a_function_of_seed_and_step_and_shard_the_global_batch():
    one = train.StepBatches(50, 8, seed=3)
    steps = [one.indices(s) for s in range(12)]
    assert all(len(b) == 8 for b in steps)
    assert sorted(sum(steps[:6], [])) == sorted(set(sum(steps[:6], [])))  # an epoch (6 steps) repeats nothing
    assert steps[6] != steps[0]  # epoch 2 reshuffles
    # Starting later gives the same batches; two processes together see exactly the single batch.
    later = iter(train.StepBatches(50, 8, seed=3, start_step=7))
    assert next(later) == steps[7]
    for step in range(12):
        rank0 = train.StepBatches(50, 8, seed=3, rank=0, world_size=2).indices(step)
        rank1 = train.StepBatches(50, 8, seed=3, rank=1, world_size=2).indices(step)
        assert rank0 == steps[step][0::2] and rank1 == steps[step][1::2]
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        train.StepBatches(50, 9, world_size=2)
    with pytest.raises(ValueError, match="raise data.num_samples"):
        train.StepBatches(5, 8)


def test_toy_2d_training_learns_and_reports_every_step(tmp_path):
    config = override(presets.get("toy-2d"), ["train.batch_size=128", "train.sample_every=0", "train.save_every=0",
                                              "data.num_samples=2000"])
    losses = []
    result = train.train(config, max_steps=150, callback=lambda step, loss: losses.append((step, loss)),
                         out_dir=tmp_path, verbose=False)
    assert [s for s, _ in losses] == list(range(1, 151))
    first, last = (sum(loss for _, loss in losses[i:i + 20]) / 20 for i in (0, 130))
    assert last < 0.5 * first, (first, last)  # L_simple of an untrained net is ~1 (eps variance)
    assert not result.model.training and not result.ema.training
    assert not any(tmp_path.iterdir())  # save_every=0 and sample_every=0: nothing written


def test_outputs_on_disk_samples_log_config_checkpoint(tmp_path):
    config = tiny_unet_config(**{"train.sample_every": "2", "train.save_every": "2", "sample.num_samples": "4",
                                 "unet.num_classes": "5"})
    result = train.train(config, max_steps=4, out_dir=tmp_path, verbose=False)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    from PIL import Image

    assert Image.open(tmp_path / "samples" / "step_0000004.png").size == (2 + 2 * 18, 2 + 2 * 18)  # 2x2 grid
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and all(r["loss"] > 0 for r in log)
    assert json.loads((tmp_path / "config.json").read_text())["unet"]["num_classes"] == 5
    loaded = checkpoints.load(tmp_path / train.CHECKPOINT)
    assert loaded.step == 4 and loaded.config.unet.num_classes == 5
    for x, y in zip(loaded.ema.state_dict().values(), result.ema.state_dict().values()):
        assert torch.equal(x, y)


def test_sampling_during_training_does_not_change_the_run(tmp_path):
    with_samples = train.train(tiny_unet_config(**{"train.sample_every": "1", "sample.num_samples": "2"}),
                               max_steps=3, out_dir=tmp_path / "a", verbose=False)
    without = train.train(tiny_unet_config(), max_steps=3, out_dir=tmp_path / "b", verbose=False)
    for a, b in ((with_samples.model, without.model), (with_samples.ema, without.ema)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_save_samples_leaves_the_global_random_stream_unchanged(tmp_path):
    # The training loop reseeds the global RNG every step, so the test above would pass even if sampling
    # consumed it. Here the network itself draws from the global RNG (dropout in train mode): only
    # save_samples' fork_rng keeps the caller's stream where it was.
    config = tiny_unet_config(**{"unet.dropout": "0.5"})
    model = minildm.build_model(config).train()
    diffusion = minildm.build_diffusion(config)
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    train.save_samples(model, diffusion, config, tmp_path / "grid.png", num=2, steps=2)
    assert (tmp_path / "grid.png").is_file()
    assert torch.equal(torch.rand(4), expected)


def test_mixed_precision_falls_back_to_fp32_on_cpu(tmp_path):
    config = tiny_unet_config(**{"train.precision": "fp16", "train.save_every": "0"})
    with pytest.warns(UserWarning, match="needs CUDA"):
        fp16 = train.train(config, max_steps=1, out_dir=tmp_path, verbose=False)
    fp32 = train.train(tiny_unet_config(**{"train.precision": "fp32", "train.save_every": "0"}), max_steps=1,
                       out_dir=tmp_path, verbose=False)
    assert all(torch.equal(x, y) for x, y in zip(fp16.model.parameters(), fp32.model.parameters()))
    with pytest.raises(ValueError, match="train.precision=.half. is not one of .auto., .fp32., .bf16., .fp16."):
        train.train(tiny_unet_config(**{"train.precision": "half"}), max_steps=1, out_dir=tmp_path, verbose=False)


def test_gradient_checkpointing_does_not_change_the_training_run(tmp_path):
    # unet.use_checkpoint recomputes activations in the backward pass (dropout masks included); the memory it
    # saves is not measured here.
    plain = train.train(tiny_unet_config(), max_steps=2, out_dir=tmp_path / "a", verbose=False)
    checkpointed = train.train(tiny_unet_config(**{"unet.use_checkpoint": "true"}), max_steps=2,
                               out_dir=tmp_path / "b", verbose=False)
    for x, y in zip(plain.model.parameters(), checkpointed.model.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_toy_2d_samples_match_the_data_mean_and_covariance(tmp_path):
    """The learning test: a short CPU training on the 2-D toy, then ancestral samples with the data's moments."""
    from minildm import data, sampling

    config = override(presets.get("toy-2d"), ["train.sample_every=0", "train.save_every=0"])
    result = train.train(config, max_steps=1000, out_dir=tmp_path, verbose=False)
    diffusion = minildm.build_diffusion(config)
    samples = sampling.ddpm_sample(result.ema, diffusion, (4000, 2), list(range(diffusion.num_timesteps)),
                                   clip_denoised=False, generator=torch.Generator().manual_seed(0), progress=False)
    points = data.toy_2d(config.data.toy, 4000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(samples.mean(0), points.mean(0), atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), torch.cov(points.T), atol=0.12, rtol=0)
    # and an untrained network does not: the test can fail
    untrained = minildm.build_model(config).eval()
    noise = sampling.ddpm_sample(untrained, diffusion, (4000, 2), list(range(diffusion.num_timesteps)),
                                 clip_denoised=False, generator=torch.Generator().manual_seed(0), progress=False)
    assert (torch.cov(noise.T) - torch.cov(points.T)).abs().max() > 0.12


def test_generate_in_chunks_draws_the_same_x_T_stream():
    config = tiny_unet_config()
    model = minildm.build_model(config).eval()
    for p in model.parameters():  # the output conv starts at zero: make the samples depend on the network
        torch.nn.init.normal_(p, std=0.02)
    diffusion = minildm.build_diffusion(config)
    whole = train.generate(model, diffusion, config, 5, steps=4)
    chunked = train.generate(model, diffusion, config, 5, steps=4, batch_size=2)  # DDIM eta 0 draws only x_T
    assert chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole)


# ---------------------------------------------------------------------- objectives: one loop, several models


def tiny_classifier_config(**extra):
    """shapes-classifier shrunk to 16x16, one level of attention: a noise-aware classifier of the 5 kinds."""
    items = {"classifier.image_size": "16", "classifier.channel_mult": "1,2", "classifier.attention_resolutions": "8",
             "data.image_size": "16", "data.num_samples": "64", "diffusion.num_timesteps": "50",
             "train.batch_size": "16", "train.warmup_steps": "2", "train.lr": "2e-3", "train.lr_schedule": "constant",
             "train.log_every": "5", "train.save_every": "0", "train.ema_decay": "0.5"}
    items.update(extra)
    return override(presets.get("shapes-classifier"), [f"{k}={v}" for k, v in items.items()])


def test_noisy_classifier_objective_is_cross_entropy_at_x_t():
    diffusion = minildm.build_diffusion(tiny_classifier_config())
    x0, y = torch.rand(4, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 3])
    t, noise = torch.tensor([0, 10, 30, 49]), torch.randn(4, 3, 16, 16)
    seen = {}

    def classifier(x_t, t_model):
        seen["x_t"], seen["t"] = x_t, t_model
        return torch.nn.functional.one_hot(y, 5).float() * 3.0

    losses = train.noisy_classifier_objective(diffusion)(classifier, x0, y, t, noise)
    torch.testing.assert_close(seen["x_t"], diffusion.q_sample(x0, t, noise))  # the classifier sees x_t, not x0
    assert torch.equal(seen["t"], t)
    expected = -torch.log_softmax(torch.tensor([3.0, 0, 0, 0, 0]), 0)[0]
    torch.testing.assert_close(losses, expected.expand(4))
    with pytest.raises(ValueError, match="labelled data"):
        train.noisy_classifier_objective(diffusion)(classifier, x0, None, t, noise)


def test_classifier_trains_through_the_one_loop(tmp_path):
    """config.model == "classifier" picks the noisy cross-entropy and the loop trains it. With a nearly
    noise-free process (betas 1e-5 .. 1e-4) the task is plain classification of 64 images: in 120 steps
    the loss falls from ln 5 = 1.61 to about 0.65 (measured); a loop that did not train would stay at 1.6."""
    config = tiny_classifier_config(**{"train.save_every": "120", "diffusion.beta_start": "1e-5",
                                       "diffusion.beta_end": "1e-4", "train.lr": "5e-4", "train.weight_decay": "0"})
    losses = []
    train.train(config, max_steps=120, out_dir=tmp_path, verbose=False, callback=lambda step, loss: losses.append(loss))
    assert sum(losses[:5]) / 5 > 1.45 and sum(losses[-20:]) / 20 < 1.0
    loaded = checkpoints.load(tmp_path / train.CHECKPOINT)
    assert loaded.config.model == "classifier" and type(loaded.model).__name__ == "Classifier"


def test_custom_objective_replaces_the_loss(tmp_path):
    """Any objective(model, x0, y, t, noise) -> [N] trains: here the x0 error of the denoiser's output."""
    calls = []

    def reconstruct(model, x0, y, t, noise):
        calls.append(t.shape)
        return ((model(x0, t) - x0) ** 2).mean(dim=(1, 2, 3))

    train.train(tiny_unet_config(), max_steps=3, out_dir=tmp_path, verbose=False, objective=reconstruct)
    assert calls == [torch.Size([8])] * 3


# ---------------------------------------------------------------------- generate with guidance


def test_generate_with_classifier_and_classifier_free_guidance():
    torch.manual_seed(0)
    uncond = tiny_unet_config()
    cond = tiny_unet_config(**{"unet.num_classes": "5", "unet.null_class": "true", "train.cond_dropout": "0.1"})
    classifier_config = tiny_classifier_config(**{"diffusion.num_timesteps": "50"})
    unet, cond_unet = minildm.build_model(uncond).eval(), minildm.build_model(cond).eval()
    classifier = minildm.build_model(classifier_config).eval()
    with torch.no_grad():  # an untrained UNet's zero-initialised layers would hide the labels' effect
        for parameter in [*unet.parameters(), *cond_unet.parameters()]:
            if not parameter.any():
                parameter.normal_(0, 0.05)
    diffusion = minildm.build_diffusion(uncond)
    plain = train.generate(unet, diffusion, uncond, 4, steps=3)
    guided = train.generate(unet, diffusion, uncond, 4, steps=3, classifier=classifier, classifier_scale=5.0)
    ancestral = train.generate(unet, diffusion, uncond, 4, steps=3, sampler="ddpm", classifier=classifier,
                               classifier_scale=5.0, y=[1, 1, 1, 1])
    assert plain.shape == guided.shape == ancestral.shape == (4, 3, 16, 16)
    assert not torch.allclose(plain, guided)
    torch.testing.assert_close(train.generate(unet, diffusion, uncond, 4, steps=3, classifier=classifier,
                                              classifier_scale=0.0), plain)  # s = 0: no guidance
    w1 = train.generate(cond_unet, diffusion, cond, 4, steps=3)
    torch.testing.assert_close(train.generate(cond_unet, diffusion, cond, 4, steps=3, guidance_scale=1.0), w1)
    assert not torch.allclose(train.generate(cond_unet, diffusion, cond, 4, steps=3, guidance_scale=3.0), w1)
    with pytest.raises(ValueError, match="needs a class-conditional model trained with a null class"):
        train.generate(unet, diffusion, uncond, 2, steps=2, guidance_scale=3.0)
    with pytest.raises(ValueError, match="needs a classifier"):
        train.generate(unet, diffusion, uncond, 2, steps=2, classifier_scale=3.0)
    with pytest.raises(ValueError, match=r"one label per sample \(\[2\]\)"):
        train.generate(cond_unet, diffusion, cond, 2, steps=2, y=[0, 1, 2])


# ---------------------------------------------------------------------- a network of your own (train(model=...))


class TinyClassifier(torch.nn.Module):
    """A linear classifier of 8x8 images: nothing like config's UNet, and called without t."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.linear(x.flatten(1))


def cross_entropy_objective(seen):
    def objective(model, x0, y, t, noise):
        seen.append(y)
        return torch.nn.functional.cross_entropy(model(x0), y, reduction="none")
    return objective


def test_train_a_network_of_your_own_not_configs(tmp_path):
    """model= trains that network in place with config's recipe; config.unet (16x16, unconditional) is not
    consulted: 8x8 images pass, and the labels reach the objective unchanged. The loss falls."""
    images = torch.rand(24, 3, 8, 8) * 2 - 1
    labels = torch.arange(24) % 4
    images[:, 0] += 0.5 * (labels[:, None, None] - 1.5)  # the class is in the first channel's mean
    images = images.clamp(-1, 1)
    seen, losses = [], []
    model = TinyClassifier()
    trained = train.train(tiny_unet_config(), model=model, dataset=(images, labels), max_steps=30, verbose=False,
                          out_dir=tmp_path, objective=cross_entropy_objective(seen),
                          callback=lambda step, loss: losses.append(loss))
    assert trained.model is model and not model.training
    assert len(seen) == 30 and all(y.shape == (8,) and set(y.tolist()) <= {0, 1, 2, 3} for y in seen)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    # unlabelled data reaches the objective as y=None; images must still be in [-1, 1]
    nones = []
    train.train(tiny_unet_config(), model=TinyClassifier(), dataset=images, max_steps=1, verbose=False,
                out_dir=tmp_path, resume=False, objective=lambda m, x0, y, t, noise: nones.append(y) or m(x0).sum(1))
    assert nones == [None]
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        train.train(tiny_unet_config(), model=TinyClassifier(), dataset=images * 200, max_steps=1, verbose=False,
                    out_dir=tmp_path, resume=False, objective=cross_entropy_objective([]))


def test_a_network_of_your_own_resumes_bit_for_bit(tmp_path):
    images, labels = torch.rand(24, 3, 8, 8) * 2 - 1, torch.arange(24) % 4

    def run(out, steps):
        torch.manual_seed(0)
        return train.train(tiny_unet_config(), model=TinyClassifier(), dataset=(images, labels), max_steps=steps,
                           verbose=False, out_dir=tmp_path / out, objective=cross_entropy_objective([]))

    straight = run("straight", 7)
    run("resumed", 4)
    torch.manual_seed(123)  # a different initialisation: the checkpoint's weights replace it
    resumed = train.train(tiny_unet_config(), model=TinyClassifier(), dataset=(images, labels), max_steps=7,
                          verbose=False, out_dir=tmp_path / "resumed", objective=cross_entropy_objective([]))
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
