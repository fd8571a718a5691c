"""Evaluation at scale: per-sample seeds (the same samples for any batch size and 1 or 2 gloo processes), ADM's
.npz layout, the FID protocol on stand-ins with a random-weight Inception, and the errors that say what to do.

Tolerance of the determinism checks: the noise of a sample is bit-identical whatever its batch, but the network's
float32 arithmetic is not (CPU conv / matmul kernels block differently for 1, 3 or 8 rows), so float samples
agree to 1e-3 (measured: <= 3e-4 after 4 steps) and their uint8 pixels differ by at most one level, on < 1% of
pixels; a sample drawn from another stream differs by O(1).
"""

import json
import os
import stat
import subprocess
import sys
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import minildm
from minildm import checkpoints, evaluation, latent, metrics, presets, sampling
from minildm.__main__ import main
from minildm.config import override

TINY = ["unet.channels=16", "unet.channel_mult=1,2", "unet.attention_resolutions=8", "unet.num_head_channels=16",
        "diffusion.num_timesteps=50"]
STEPS = 4
SHIPPED = Path(__file__).resolve().parents[1] / "data" / "checkpoints"  # chapter 06's latent models (32x32 shapes)


def tiny_model(overrides=()):
    """A toy-shapes UNet (16x16, ch 16) whose zero-initialised layers get small random weights (so its output
    depends on its input, unlike a fresh UNet's zero output), in eval mode; (model, config)."""
    config = override(presets.get("toy-shapes"), [*TINY, *overrides])
    torch.manual_seed(0)
    model = minildm.build_model(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.abs().max() == 0:
                parameter.normal_(0, 0.05, generator=generator)
    return model, config


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny):
    """The tiny unconditional model as a checkpoint file."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    return checkpoints.save(path, tiny[0], tiny[1])


# ---------------------------------------------------------------------------------------------
# Per-sample seeds


def test_sample_seeds_differ_per_index_seed_and_stream_and_reject_negative_seeds():
    seeds = {sampling.sample_seed(s, i, k) for s in range(3) for i in range(50) for k in range(2)}
    assert len(seeds) == 300 and all(0 <= s < 2**64 for s in seeds)
    assert sampling.sample_seed(0, 7) == sampling.sample_seed(0, 7, 0)
    with pytest.raises(ValueError, match="non-negative"):
        sampling.sample_seed(-1, 0)


def test_per_sample_generator_rows_do_not_depend_on_the_batch():
    whole = sampling.PerSampleGenerator(5, range(6)).randn((6, 3, 4, 4))
    parts = torch.cat([sampling.PerSampleGenerator(5, [i]).randn((1, 3, 4, 4)) for i in range(6)])
    torch.testing.assert_close(whole, parts, rtol=0, atol=0)
    assert (whole[0] - whole[1]).abs().max() > 0.5  # rows are different streams
    two = sampling.PerSampleGenerator(5, [2, 3])
    first, second = two.randn((2, 5)), two.randn((2, 5))  # each stream moves on: a second draw is new
    assert (first - second).abs().max() > 0.1
    with pytest.raises(ValueError, match="holds 2 streams"):
        two.randn((3, 5))


def test_class_labels_are_uniform_per_sample_and_independent_of_the_batch():
    labels = evaluation.class_labels(0, range(4000), 10)
    torch.testing.assert_close(labels[1000:1010], evaluation.class_labels(0, range(1000, 1010), 10))
    counts = torch.bincount(labels, minlength=10)
    assert labels.dtype == torch.int64 and counts.min() > 330 and counts.max() < 470  # 400 +- 3.5 sigma
    assert (labels != evaluation.class_labels(1, range(4000), 10)).float().mean() > 0.8


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 1.0), ("ddim", 0.0)])
def test_the_same_samples_for_any_batch_size(tiny, sampler, eta):
    model, config = tiny
    diffusion = minildm.build_diffusion(config)
    runs = {}
    for batch_size in (1, 3, 8):
        runs[batch_size] = torch.cat([
            evaluation.sample_indices(model, diffusion, config, indices, seed=3, sampler=sampler, steps=STEPS, eta=eta)
            for indices in evaluation.shard(8, batch_size)])
    for batch_size in (3, 8):
        torch.testing.assert_close(runs[batch_size], runs[1], rtol=0, atol=1e-3)
        pixels = (evaluation.to_uint8(runs[batch_size]).int() - evaluation.to_uint8(runs[1]).int()).abs()
        assert pixels.max() <= 1 and (pixels > 0).float().mean() < 0.01
    other = evaluation.sample_indices(model, diffusion, config, range(1, 9), seed=3, sampler=sampler, steps=STEPS,
                                      eta=eta)
    assert (other - runs[1]).abs().max() > 0.5  # indices 1..8 are not 0..7: the seeding is per index


def test_inpainting_noise_comes_from_the_per_sample_streams(tiny):
    model, config = tiny
    diffusion = minildm.build_diffusion(config)
    x0 = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8] = 1

    def run(indices, rows):
        return sampling.ddpm_sample(model, diffusion, (len(indices), 3, 16, 16), [0, 20, 40], x0=x0[rows],
                                    mask=mask, generator=sampling.PerSampleGenerator(0, indices), progress=False)

    together = run([0, 1, 2, 3], slice(0, 4))
    apart = torch.cat([run([0, 1], slice(0, 2)), run([2, 3], slice(2, 4))])
    torch.testing.assert_close(apart, together, rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Sharding, the .npz layout


def test_shard_deals_rounds_of_world_size_times_batch_size():
    assert evaluation.shard(10, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    rank0, rank1 = evaluation.shard(10, 3, 0, 2), evaluation.shard(10, 3, 1, 2)
    assert rank0 == [[0, 1, 2], [6, 7, 8]] and rank1 == [[3, 4, 5], [9]]
    assert evaluation.shard(4, 3, 1, 2) == [[3]] and evaluation.shard(3, 3, 1, 2) == [[]]  # same number of rounds
    with pytest.raises(ValueError, match="rank < world_size"):
        evaluation.shard(10, 3, 2, 2)


def test_sample_images_in_adm_layout_with_labels(tmp_path):
    model, config = tiny_model(["unet.num_classes=5"])
    images, labels = evaluation.sample_images(model, config, 7, batch_size=3, steps=2, seed=1, progress=False)
    assert images.dtype == np.uint8 and images.shape == (7, 16, 16, 3)
    assert labels.dtype == np.int64 and labels.shape == (7,) and 0 <= labels.min() and labels.max() < 5
    torch.testing.assert_close(torch.from_numpy(labels), evaluation.class_labels(1, range(7), 5))
    path = evaluation.write_npz(tmp_path / "s.npz", images, labels)
    with np.load(path) as saved:
        assert sorted(saved.files) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(saved["arr_0"], images)
        np.testing.assert_array_equal(saved["arr_1"], labels)
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temporary file left
    fixed, fixed_labels = evaluation.sample_images(model, config, 2, label=4, steps=2, progress=False)
    assert fixed.shape == (2, 16, 16, 3) and fixed_labels.tolist() == [4, 4]
    with pytest.raises(ValueError, match=r"classes 0 \.\. 4"):
        evaluation.sample_images(model, config, 2, label=5, steps=2, progress=False)


def test_write_npz_leaves_a_file_others_can_read_and_no_temporary(tmp_path):
    umask = os.umask(0o022)
    try:
        path = evaluation.write_npz(tmp_path / "s.npz", np.zeros((2, 8, 8, 3), np.uint8), np.arange(2))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not the 0600 of a mkstemp file: colleagues read samples
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]


def test_write_npz_rejects_what_adm_cannot_read(tmp_path):
    with pytest.raises(ValueError, match="to_uint8"):
        evaluation.write_npz(tmp_path / "x.npz", np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="one per image"):
        evaluation.write_npz(tmp_path / "x.npz", np.zeros((2, 8, 8, 3), np.uint8), np.zeros(3))
    assert not any(tmp_path.iterdir())


def sample_in_two_processes(common: list[str], out, num: int) -> None:
    """`torchrun --nproc_per_node 2 -m minildm sample *common --batch-size 2 --out out` (gloo, on the CPU)."""
    env = {**os.environ, "MINILDM_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "minildm", "sample", *common, "--batch-size", "2", "--out", str(out)]
    run = subprocess.run(command, env=env, cwd=out.parent, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count(f"wrote {num} samples") == 1  # rank 0 alone writes and reports


def test_two_gloo_processes_write_the_same_npz_as_one(checkpoint, tmp_path):
    # --num-samples: torchrun's own parser would take --num for its --numa-binding
    common = [str(checkpoint), "--num-samples", "7", "--steps", str(STEPS), "--sampler", "ddpm", "--seed", "2",
              "--device", "cpu"]
    sample_in_two_processes(common, tmp_path / "two.npz", 7)
    assert main(["sample", *common, "--batch-size", "5", "--out", str(tmp_path / "one.npz")]) == 0
    with np.load(tmp_path / "two.npz") as two, np.load(tmp_path / "one.npz") as one:
        assert two.files == ["arr_0"] and two["arr_0"].shape == (7, 16, 16, 3)  # unconditional: no labels
        difference = np.abs(two["arr_0"].astype(int) - one["arr_0"].astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npz", "two.npz"]


# ---------------------------------------------------------------------------------------------
# Latent diffusion models: the same sharded path, latents decoded by the first stage


@pytest.fixture(scope="module")
def shapes_ldm():
    """The shipped class-conditional LDM (5 shape kinds + the null class, 8x8x3 latents, 32x32 images)."""
    return latent.load(SHIPPED / "ldm-shapes-class.safetensors")


@pytest.mark.parametrize("sampler,guidance_scale", [("ddim", 2.0), ("ddpm", 1.0), ("plms", 3.0)])
def test_a_latent_model_samples_the_same_images_and_labels_for_any_batch_size(shapes_ldm, sampler, guidance_scale):
    def run(batch_size, seed=3, label=None):
        return evaluation.sample_images(shapes_ldm, shapes_ldm.config, 5, batch_size=batch_size, sampler=sampler,
                                        steps=STEPS, seed=seed, label=label, guidance_scale=guidance_scale,
                                        progress=False)

    runs = {batch_size: run(batch_size) for batch_size in (1, 2, 5)}
    images, labels = runs[1]
    assert images.dtype == np.uint8 and images.shape == (5, 32, 32, 3)
    torch.testing.assert_close(torch.from_numpy(labels), evaluation.class_labels(3, range(5), 5))  # kinds 0 .. 4
    for batch_size in (2, 5):
        np.testing.assert_array_equal(runs[batch_size][1], labels)
        pixels = np.abs(runs[batch_size][0].astype(int) - images.astype(int))
        assert pixels.max() <= 1 and (pixels > 0).mean() < 0.01  # measured: < 0.2% of the pixels, by one level
    # sample 3 is latent.sample of its own label and stream, decoded
    alone = latent.sample(shapes_ldm, minildm.build_diffusion(shapes_ldm.config), torch.from_numpy(labels[3:4]),
                          sampler=sampler, steps=STEPS, guidance_scale=guidance_scale,
                          generator=sampling.PerSampleGenerator(3, [3]))
    pixels = np.abs(evaluation.to_uint8(alone)[0].numpy().astype(int) - images[3].astype(int))
    assert pixels.max() <= 1
    other, _ = run(5, seed=4)
    assert np.abs(other.astype(int) - images.astype(int)).mean() > 5  # another seed: other samples
    fixed, fixed_labels = run(2, label=4)
    assert fixed_labels.tolist() == [4] * 5 and np.abs(fixed.astype(int) - images.astype(int)).max() > 50
    with pytest.raises(ValueError, match=r"--class 5: this model has classes 0 \.\. 4"):  # 5 is the null class
        run(2, label=5)


def test_two_gloo_processes_write_the_same_latent_npz_as_one(tmp_path):
    common = [str(SHIPPED / "ldm-shapes-class.safetensors"), "--num-samples", "5", "--steps", str(STEPS),
              "--sampler", "ddpm", "--guidance-scale", "2", "--seed", "2", "--device", "cpu"]
    sample_in_two_processes(common, tmp_path / "two.npz", 5)
    assert main(["sample", *common, "--batch-size", "5", "--out", str(tmp_path / "one.npz")]) == 0
    with np.load(tmp_path / "two.npz") as two, np.load(tmp_path / "one.npz") as one:
        assert two.files == ["arr_0", "arr_1"] and two["arr_0"].shape == (5, 32, 32, 3)
        np.testing.assert_array_equal(two["arr_1"], one["arr_1"])
        np.testing.assert_array_equal(two["arr_1"], evaluation.class_labels(2, range(5), 5).numpy())
        difference = np.abs(two["arr_0"].astype(int) - one["arr_0"].astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npz", "two.npz"]


def test_the_command_line_writes_latent_npz_batches_and_says_what_to_do(tmp_path, capsys):
    def sample(model, *argv):
        return main(["sample", str(SHIPPED / f"ldm-shapes-{model}.safetensors"), "--num", "3", "--steps", "2",
                     "--device", "cpu", "--out", str(tmp_path / f"{model}.npz"), *argv])

    assert sample("text", "--prompt", "a large red circle on the left", "--guidance-scale", "3") == 0
    assert sample("class", "--class", "2", "--sampler", "plms") == 0
    assert "wrote 3 samples" in capsys.readouterr().out
    with np.load(tmp_path / "text.npz") as text, np.load(tmp_path / "class.npz") as classes:
        assert text.files == ["arr_0"] and text["arr_0"].shape == (3, 32, 32, 3)  # one prompt: no labels
        assert classes["arr_1"].tolist() == [2, 2, 2] and classes["arr_0"].dtype == np.uint8
    (tmp_path / "text.npz").unlink()
    (tmp_path / "class.npz").unlink()

    def error_of(model, *argv):
        assert sample(model, *argv) == 2
        return capsys.readouterr().err

    assert "a layout-conditional model draws each sample from its own boxes" in error_of("layout")
    assert "minildm.latent.sample(ldm, diffusion, (boxes, labels))" in error_of("layout")
    assert "give --prompt" in error_of("text")
    assert "this model is text-conditional; leave --class out and give --prompt" in error_of(
        "text", "--prompt", "a red square", "--class", "1")
    assert "--prompt is for text-conditional models; this one has latent.conditioner='class'" in error_of(
        "class", "--prompt", "a red square")
    assert "--class 7: this model has classes 0 .. 4" in error_of("class", "--class", "7")
    assert "guided without a classifier; use --guidance-scale" in error_of(
        "class", "--classifier", str(SHIPPED / "shapes-classifier.safetensors"))
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# The FID protocol on stand-ins: a random-weight Inception (the real weights cannot be downloaded here)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random weights for torchmetrics' Inception, as a file for --weights / weights_path.

    Freshly initialised, its pool features are ~1e-8 (activations shrink layer after layer) and every FID ~1e-13;
    so the batch-norm statistics are fitted on stand-in images (one pass in training mode), which keeps the
    activations of order 1, as the real network's are.
    """
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: None)
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None)
        torch.manual_seed(0)
        network = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: one batch sets the statistics
    nn_train = torch.nn.Module.train  # its own train() keeps evaluation mode
    nn_train(network, True)
    with torch.no_grad():
        network(torch.randint(0, 256, (8, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8))
    path = tmp_path_factory.mktemp("inception") / metrics.INCEPTION_WEIGHTS_FILE
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception(weights):
    return metrics.load_inception(weights, antialias=False)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Batches (.npz, ADM's layout) of 4 16x16 shapes: the 'samples', and the same images 80 levels brighter
    (a shifted reference); "folder" for the files the tests write."""
    from minildm import data

    folder = tmp_path_factory.mktemp("batches")
    images = evaluation.to_uint8(data.ShapesDataset(4, 16, seed=1).tensors()[0]).numpy()
    brighter = np.clip(images.astype(int) + 80, 0, 255).astype(np.uint8)
    return {"samples": evaluation.write_npz(folder / "samples.npz", images),
            "reference": evaluation.write_npz(folder / "reference.npz", brighter), "folder": folder}


@pytest.fixture(scope="module")
def reports(stand_ins, inception):
    """fid_report of the samples against themselves (saving their statistics) and against the shifted reference."""
    same = evaluation.fid_report(stand_ins["samples"], stand_ins["samples"], inception=inception,
                                 save_stats=stand_ins["folder"] / "samples_stats.npz")
    return {"self": same, "shifted": evaluation.fid_report(stand_ins["samples"], stand_ins["reference"],
                                                           inception=inception)}


def test_fid_of_a_set_with_itself_is_zero_and_of_a_shifted_set_positive(reports):
    same, shifted = reports["self"], reports["shifted"]
    assert same["num_samples"] == same["num_reference"] == shifted["num_reference"] == 4
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and shifted["fid"] > 1.0
    assert same["precision"] == same["recall"] == 1.0
    assert shifted["inception_score"] >= 1 and all(np.isfinite([shifted["kid"], shifted["kid_std"]]))
    assert "biased upwards" in shifted["note"] and "computed from the 4 images" in shifted["reference_statistics"]


def test_reference_statistics_saved_and_read_give_the_same_fid(stand_ins, weights, reports, tmp_path, capsys):
    stats = tmp_path / "ref_stats.npz"
    assert main(["fid", str(stand_ins["reference"]), "--save-stats", str(stats), "--weights", str(weights),
                 "--device", "cpu"]) == 0
    assert '"num_reference": 4' in capsys.readouterr().out
    with np.load(stats) as saved:
        assert saved["mu"].shape == (2048,) and saved["sigma"].shape == (2048, 2048) and int(saved["num"]) == 4
        assert saved["mu"].dtype == np.float64 and str(saved["format"]) == evaluation.STATS_FORMAT
    assert main(["fid", str(stand_ins["samples"]), str(stats), "--weights", str(weights), "--device", "cpu"]) == 0
    from_stats = json.loads(capsys.readouterr().out)
    assert from_stats["fid"] == pytest.approx(reports["shifted"]["fid"], rel=1e-6)  # two formulas: see metrics
    assert from_stats["num_reference"] is None and "read from" in from_stats["reference_statistics"]
    assert "inception_score" in from_stats and "kid" not in from_stats  # KID needs the reference's images
    assert "not comparable" not in from_stats["note"]  # our own extractor


def test_statistics_of_another_feature_extractor_get_a_note(stand_ins, inception, reports, tmp_path):
    with np.load(reports["self"]["saved_statistics"]) as stats:
        arrays = dict(stats)
    np.savez(tmp_path / "clean_fid.npz", **{**arrays, "extractor": np.str_("clean-fid, PIL bicubic resize")})
    report = evaluation.fid_report(stand_ins["samples"], tmp_path / "clean_fid.npz", inception=inception)
    assert report["fid"] == pytest.approx(0.0, abs=1e-6)  # still computed, but flagged
    assert "'clean-fid, PIL bicubic resize'" in report["note"] and "not comparable" in report["note"]
    assert "--save-stats" in report["note"] and "biased upwards" in report["note"]


def test_adm_reference_batch_statistics_are_used_when_present(stand_ins, inception, reports, tmp_path):
    # ADM's reference batches hold images (arr_0) and the TF-Inception mu / sigma; FID uses the latter, KID the images.
    assert reports["self"]["saved_statistics"] == str(stand_ins["folder"] / "samples_stats.npz")
    with np.load(stand_ins["reference"]) as batch, np.load(reports["self"]["saved_statistics"]) as stats:
        np.savez(tmp_path / "VIRTUAL_stand_in.npz", arr_0=batch["arr_0"], mu=stats["mu"], sigma=stats["sigma"])
    report = evaluation.fid_report(stand_ins["samples"], tmp_path / "VIRTUAL_stand_in.npz", inception=inception)
    assert report["fid"] == pytest.approx(0.0, abs=1e-6)  # the samples' own statistics, not arr_0's
    assert "ADM" in report["reference_statistics"] and report["num_reference"] == 4
    assert "not comparable" not in report["note"]  # ADM's TF graph is the one our Inception ports
    assert report["kid"] == pytest.approx(reports["shifted"]["kid"], rel=1e-9)  # KID and P/R on arr_0's images


def test_a_folder_of_images_reads_as_its_npz(stand_ins, tmp_path):
    from PIL import Image

    with np.load(stand_ins["reference"]) as batch:
        images = batch["arr_0"]
    for i, image in enumerate(images):  # every suffix that training reads (data.IMAGE_EXTENSIONS), lossless ones
        Image.fromarray(image).save(tmp_path / f"{i:03d}{('.png', '.tiff', '.ppm', '.bmp')[i % 4]}")
    np.testing.assert_array_equal(np.concatenate(list(evaluation.read_batches(tmp_path, 2))), images)
    assert evaluation.read_source(tmp_path)["images"]
    Image.new("RGB", (20, 16)).save(tmp_path / "zz_odd.png")
    with pytest.raises(ValueError, match="resize and crop"):
        list(evaluation.read_batches(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        next(evaluation.read_batches(tmp_path / "empty"))


def test_read_batches_streams_arr_0_and_makes_grey_images_rgb(tmp_path):
    grey = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4, 1)
    batches = list(evaluation.read_batches(evaluation.write_npz(tmp_path / "g.npz", grey), batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 1] and batches[0].shape == (2, 4, 4, 3)
    np.testing.assert_array_equal(np.concatenate(batches)[..., 2], grey[..., 0])
    np.savez(tmp_path / "floats.npz", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="write_npz"):
        list(evaluation.read_batches(tmp_path / "floats.npz"))
    # .npy format 3.0 (utf-8 field names; numpy writes it only when asked): refused, not misread
    with zipfile.ZipFile(tmp_path / "v3.npz", "w") as archive, archive.open("arr_0.npy", "w") as member:
        np.lib.format.write_array(member, grey, version=(3, 0))
    with pytest.raises(ValueError, match="format version 3.0; this reader streams versions 1.0 and 2.0.*np.savez"):
        list(evaluation.read_batches(tmp_path / "v3.npz"))


def test_fid_offline_is_a_clear_error(stand_ins, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # never touch the network here
    with pytest.raises(metrics.InceptionWeightsUnavailable, match="TORCH_HOME"):
        evaluation.fid_report(stand_ins["samples"], stand_ins["reference"], device="cpu")
    assert main(["fid", str(stand_ins["samples"]), str(stand_ins["reference"]), "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    for needed in ("minildm fid: error:", metrics.INCEPTION_WEIGHTS_URL, metrics.INCEPTION_WEIGHTS_FILE,
                   "name resolution"):
        assert needed in error, needed
    assert "Traceback" not in error


# ---------------------------------------------------------------------------------------------
# Command-line misuse: errors that say what to change (exit status 2, nothing written)


def test_fid_misuse_says_what_to_do(stand_ins, weights, tmp_path, capsys):
    def error_of(*argv):
        assert main(["fid", *argv, "--weights", str(weights), "--device", "cpu"]) == 2
        return capsys.readouterr().err

    assert "add --save-stats" in error_of(str(stand_ins["reference"]))
    assert "got 3 paths" in error_of(str(stand_ins["samples"]), str(stand_ins["reference"]), "x.npz")
    (tmp_path / "notes.txt").write_text("not images")
    assert ".npz files" in error_of(str(stand_ins["samples"]), str(tmp_path / "notes.txt"))
    assert "does not exist" in error_of(str(stand_ins["samples"]), str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "other.npz", features=np.zeros(3))
    assert "neither arr_0" in error_of(str(stand_ins["samples"]), str(tmp_path / "other.npz"))
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))
    assert "holds statistics, not images" in error_of(str(stats), "--save-stats", str(tmp_path / "again.npz"))
    wrong_suffix = error_of(str(stand_ins["reference"]), "--save-stats", str(tmp_path / "stats.json"))
    assert f"--save-stats {tmp_path / 'stats.json'}: give a file ending in .npz\n" in wrong_suffix
    assert "--out" not in wrong_suffix and ".png" not in wrong_suffix


def test_sample_misuse_says_what_to_do(checkpoint, tmp_path, capsys):
    def error_of(*argv):
        assert main(["sample", str(checkpoint), "--num", "2", "--steps", "2", "--device", "cpu", *argv]) == 2
        return capsys.readouterr().err

    assert "give a file ending in .png or .npz" in error_of("--out", str(tmp_path / "samples.jpg"))
    (tmp_path / "a_file").write_text("")
    assert "cannot write in" in error_of("--out", str(tmp_path / "a_file" / "samples.npz"))
    (tmp_path / "folder.npz").mkdir()
    assert "is a folder" in error_of("--out", str(tmp_path / "folder.npz"))
    assert "unconditional (unet.num_classes=0); leave --class out" in error_of("--class", "1", "--out",
                                                                               str(tmp_path / "s.npz"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "folder.npz"]


def test_sample_png_grid_shows_the_first_samples_of_the_npz(checkpoint, tmp_path, capsys):
    from PIL import Image

    common = [str(checkpoint), "--num", "4", "--steps", "2", "--seed", "5", "--device", "cpu"]
    with pytest.MonkeyPatch.context() as patch:  # an .npz is written from the uint8 images: no float copy of them
        sample_images = evaluation.sample_images

        def then_no_float_copy(*args, **kwargs):
            images = sample_images(*args, **kwargs)
            patch.setattr(torch, "from_numpy", lambda array: pytest.fail("a float copy of the samples was made"))
            return images

        patch.setattr(evaluation, "sample_images", then_no_float_copy)
        assert main(["sample", *common, "--out", str(tmp_path / "s.npz"), "--batch-size", "3"]) == 0
    assert f"wrote 4 samples to {tmp_path / 's.npz'}" in capsys.readouterr().out
    assert main(["sample", *common, "--out", str(tmp_path / "s.png")]) == 0
    assert "wrote 4 samples" in capsys.readouterr().out
    with np.load(tmp_path / "s.npz") as batch:
        images = batch["arr_0"]
    grid = np.asarray(Image.open(tmp_path / "s.png").convert("RGB"))  # 2x2 grid, 2-pixel padding
    difference = np.abs(grid[2:18, 2:18].astype(int) - images[0].astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
