"""The command line: presets, train (overrides, --resume), sample, bpd, info, errors that say what to do."""

import subprocess
import sys

import pytest
from PIL import Image

from minildm import checkpoints, memory, presets
from minildm.__main__ import main


TINY = ["unet.channel_mult=1,2", "unet.attention_resolutions=8", "diffusion.num_timesteps=40", "data.num_samples=16",
        "train.batch_size=8", "train.sample_every=0", "train.save_every=2", "train.log_every=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step toy-shapes run through the command line; its checkpoint path."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "toy-shapes", *TINY, "--max-steps", "2", "--out", str(out), "--quiet"]) == 0
    return out / "checkpoint.safetensors"


def test_presets_lists_every_preset_with_its_parameters(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(presets.names()) + 1
    cifar = next(line for line in lines if line.startswith("ddpm-cifar10 "))
    assert "35,746,307" in cifar and "DDPM CIFAR10" in cifar
    assert "120,450" in next(line for line in lines if line.startswith("toy-2d "))  # toys: counted


def test_presets_memory_columns_for_chosen_presets(capsys):
    assert main(["presets", "--memory", "ddpm-cifar10", "ae-kl-f4-shapes"]) == 0
    header, cifar, autoencoder = capsys.readouterr().out.splitlines()
    assert header.split()[2:] == ["state", "GiB", "act", "MiB/img", "batch/80GiB", "GFLOP/img", "summary"]
    # ddpm-cifar10: 20 bytes x 35,746,307 parameters = 0.67 GiB of state; 36.3 GFLOPs per image per step
    assert cifar.startswith("ddpm-cifar10 ") and " 0.67 " in cifar and " 36.3 " in cifar
    assert cifar.split()[2:6] == list(memory.preset_columns("ddpm-cifar10").values())
    assert autoencoder.split()[2:6] == ["-"] * 4  # the estimate does not cover the autoencoder's step
    assert main(["presets", "ddpm-cifar100"]) == 2
    assert "unknown preset 'ddpm-cifar100'" in capsys.readouterr().err


def test_unknown_preset_and_key_say_what_exists(capsys, tmp_path):
    assert main(["train", "ddpm-cifar100", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "unknown preset 'ddpm-cifar100'" in error and "toy-2d" in error and "ddpm-cifar10" in error
    assert main(["train", "toy-2d", "train.learning_rate=1", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "unknown config key 'train.learning_rate'" in error and "'lr'" in error
    assert not any(tmp_path.iterdir())


def test_train_refuses_to_overwrite_and_resumes_with_flag(trained, capsys):
    assert checkpoints.read_metadata(trained)["step"] == 2
    out = str(trained.parent)
    assert main(["train", "toy-shapes", *TINY, "--max-steps", "3", "--out", out, "--quiet"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(["train", "toy-shapes", *TINY, "--max-steps", "3", "--out", out, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert checkpoints.read_metadata(trained)["step"] == 3


def test_sample_writes_a_png_grid(trained, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", str(trained), "--num", "4", "--steps", "3", "--out", str(out), "--device", "cpu"]) == 0
    assert Image.open(out).size == (2 + 2 * 18, 2 + 2 * 18)
    assert "wrote 4 samples" in capsys.readouterr().out
    assert main(["sample", str(trained), "--num", "3", "--sampler", "ddpm", "--steps", "2", "--no-ema",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert main(["sample", str(tmp_path / "missing.safetensors"), "--out", str(out)]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_bits_per_dim_on_held_out_data(trained, capsys):
    assert main(["bpd", str(trained), "--num", "3", "--batch-size", "2", "--steps", "5", "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("bits/dim: ") and "n=3" in line and "5-step respaced chain" in line
    assert float(line.split()[1]) > 0


def test_info_prints_the_metadata(trained, capsys):
    assert main(["info", str(trained)]) == 0
    out = capsys.readouterr().out
    assert '"minildm_version"' in out and "EMA tensors" in out


def test_module_entry_point_help():
    run = subprocess.run([sys.executable, "-m", "minildm", "train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0
    assert "key=value" in run.stdout and "--resume" in run.stdout and "torchrun" in run.stdout


def test_sample_with_classifier_and_classifier_free_guidance(trained, tmp_path, capsys):
    classifier_run = tmp_path / "classifier"
    assert main(["train", "shapes-classifier", "classifier.image_size=16", "data.image_size=16",
                 "classifier.channel_mult=1,2", "diffusion.num_timesteps=1000", "data.num_samples=16",
                 "train.batch_size=8", "train.save_every=1", "--max-steps", "1", "--out", str(classifier_run),
                 "--quiet"]) == 0
    classifier = str(classifier_run / "checkpoint.safetensors")
    out = str(tmp_path / "grid.png")
    # toy-shapes is unconditional: the classifier guides it towards --class
    assert main(["sample", str(trained), "--num", "2", "--steps", "2", "--classifier", classifier,
                 "--classifier-scale", "3", "--class", "4", "--out", out, "--device", "cpu"]) == 0
    assert "wrote 2 samples" in capsys.readouterr().out
    assert main(["sample", str(trained), "--num", "2", "--steps", "2", "--guidance-scale", "3", "--out", out]) == 2
    assert "needs a class-conditional model trained with a null class" in capsys.readouterr().err
    assert main(["sample", str(trained), "--num", "2", "--classifier", str(trained), "--out", out]) == 2
    assert "not a noise-aware classifier" in capsys.readouterr().err
