"""Nothing lost, nothing silent: validated settings, the divergence guard, one writer per run, checkpoints
that are checked, Ctrl-C and kill -9 during training, one-line errors from the command line."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from minildm import checkpoints, config, metrics, presets, schedules, train
from minildm.__main__ import main

# toy-2d, fast: a step takes about a millisecond, so kills and interrupts land mid-run.
TOY = ["train.log_every=0", "train.warmup_steps=10", "data.num_samples=512", "train.batch_size=64"]


# ---------------------------------------------------------------------------------------------
# Settings validated at the boundary


@pytest.mark.parametrize("preset, overrides, field", [
    ("toy-shapes", ["unet.image_size=32"], "unet.image_size=32 must equal data.image_size=16"),
    ("toy-2d", ["train.ema_decay=2"], "train.ema_decay=2.0 must be a finite number in [0, 1)"),
    ("toy-2d", ["train.lr=inf"], "train.lr=inf must be a finite number > 0"),
    ("toy-2d", ["train.lr=0"], "train.lr=0.0 must be a finite number > 0"),
    ("toy-2d", ["train.batch_size=0"], "train.batch_size=0 must be an integer >= 1"),
    ("toy-2d", ["train.batch_size=-4"], "train.batch_size=-4 must be an integer >= 1"),
    ("toy-2d", ["train.max_steps=0"], "train.max_steps=0 must be an integer >= 1"),
    ("toy-2d", ["train.grad_clip=-1"], "train.grad_clip=-1.0 must be a finite number >= 0"),
    ("toy-2d", ["diffusion.beta_schedule=quadratic"], "diffusion.beta_schedule='quadratic' is not one of"),
    ("toy-2d", ["diffusion.beta_end=1"], "diffusion.beta_end=1.0 must be a finite number in [0, 1)"),
    ("toy-2d", ["diffusion.num_timesteps=0"], "diffusion.num_timesteps=0 must be an integer >= 1"),
    ("toy-2d", ["sample.sampler=euler"], "sample.sampler='euler' is not one of 'ddpm', 'ddim'"),
    ("toy-2d", ["data.toy=spiral"], "data.toy='spiral' is not one of"),
    ("toy-2d", ["model=unet"], "data.dataset='toy2d' holds 2-D points: use model=mlp"),
    ("toy-shapes", ["train.cond_dropout=0.1"], "train.cond_dropout=0.1 replaces conditions by the null one"),
    ("toy-shapes", ["unet.null_class=true"], "unet.null_class=True needs a class-conditional network"),
    ("toy-shapes", ["unet.norm_groups=5"], "unet.norm_groups=5 must divide every level's width [32, 64]"),
    ("toy-shapes", ["diffusion.model_var_type=learned_range", "diffusion.loss_type=hybrid"],
     "unet.learn_sigma=False must be True with diffusion.model_var_type='learned_range'"),
    ("toy-shapes", ["train.lr_schedule=linear"], "train.lr_schedule='linear' is not one of 'constant', 'cosine'"),
    ("toy-shapes", ["train.precision=half"], "train.precision='half' is not one of"),
])
def test_settings_out_of_range_are_refused_naming_the_field(preset, overrides, field):
    with pytest.raises(config.ConfigError, match="^invalid config: ") as error:
        config.override(presets.get(preset), overrides)
    assert field in str(error.value)


@pytest.mark.parametrize("override, message", [
    ("train.adam_betas=0.9,0.99,0.999", "train.adam_betas: needs 2 comma-separated values, got 3"),
    ("train.max_steps=inf", "train.max_steps: cannot read 'inf' as int"),
    ("train.batch_size=2.5", "train.batch_size: cannot read '2.5' as int"),
])
def test_values_of_the_wrong_form_are_refused(override, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        config.override(presets.get("toy-2d"), [override])


def test_every_problem_of_a_config_is_named_at_once():
    cfg = presets.get("toy-2d")
    cfg.train.ema_decay, cfg.train.batch_size = 1.5, 0
    with pytest.raises(config.ConfigError, match="train.batch_size=0 .*; train.ema_decay=1.5"):
        config.validate(cfg)


def test_every_preset_is_valid():
    for name in presets.names():
        config.validate(presets.get(name))


def test_train_refuses_an_invalid_config_before_writing_anything(tmp_path):
    cfg = presets.get("toy-2d")
    cfg.train.adam_betas = (0.9, 0.99, 0.999)  # set directly, past override()
    with pytest.raises(config.ConfigError, match=r"train.adam_betas=\(0.9, 0.99, 0.999\) must be two numbers"):
        train.train(cfg, out_dir=tmp_path / "run", verbose=False)
    with pytest.raises(config.ConfigError, match="max_steps=-1 must be an integer >= 0"):
        train.train(presets.get("toy-2d"), max_steps=-1, out_dir=tmp_path / "run", verbose=False)
    assert not (tmp_path / "run").exists()


def test_beta_of_one_is_refused():
    with pytest.raises(ValueError, match=r"every beta must lie in \(0, 1\).*beta = 1 erases the signal"):
        schedules.alpha_bar(np.array([0.1, 1.0]))


# ---------------------------------------------------------------------------------------------
# The divergence guard


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    good = config.override(presets.get("toy-2d"), [*TOY, "train.save_every=5"])
    train.train(good, max_steps=5, out_dir=tmp_path, verbose=False)
    before = (tmp_path / train.CHECKPOINT).read_bytes()
    diverging = config.override(good, ["train.lr=1e30", "train.grad_clip=0", "train.warmup_steps=0"])
    with pytest.raises(train.TrainingDiverged, match=r"the loss is (nan|inf) at step ([6-9]|10): the run diverged"):
        train.train(diverging, max_steps=100, out_dir=tmp_path, verbose=False)
    assert (tmp_path / train.CHECKPOINT).read_bytes() == before
    assert checkpoints.load(tmp_path / train.CHECKPOINT).step == 5


def test_checkpoints_refuse_to_write_or_load_non_finite_weights(tmp_path):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(checkpoints.CheckpointError, match="not writing .*NaN or infinite.*weight"):
        checkpoints.save(tmp_path / "nan.safetensors", model, presets.get("toy-2d"))
    assert not list(tmp_path.iterdir())
    with pytest.raises(checkpoints.CheckpointError, match="hold NaN or infinite values.*weight"):
        checkpoints.load_weights(torch.nn.Linear(2, 2), model.state_dict())


# ---------------------------------------------------------------------------------------------
# Checkpoints you can trust


@pytest.fixture
def saved(tmp_path):
    cfg = config.override(presets.get("toy-2d"), [*TOY, "train.save_every=3"])
    train.train(cfg, max_steps=3, out_dir=tmp_path, verbose=False)
    return tmp_path / train.CHECKPOINT


def flip_a_byte(path, tensor):
    """Flip one bit in the middle of `tensor`'s bytes in a safetensors file (header untouched)."""
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + size])[tensor]["data_offsets"]
    data[8 + size + (start + end) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tensor", ["model.time_embed.0.weight", "ema.output.bias", "optimizer.state.0.exp_avg"])
def test_a_flipped_byte_in_any_tensor_is_caught_when_it_is_read(saved, tensor):
    flip_a_byte(saved, tensor)
    with pytest.raises(checkpoints.CheckpointError, match=f"is corrupted: 1 tensors do not match their stored "
                                                          f"checksum \\(first: {tensor}\\)"):
        if tensor.startswith("optimizer"):
            run = train.train(presets.get("toy-2d"), max_steps=1, out_dir=saved.parent / "other", verbose=False)
            optimizer = torch.optim.AdamW(run.model.parameters())
            checkpoints.load_training_state(saved, run.model, ema=run.ema, optimizer=optimizer)
        else:
            checkpoints.load(saved)


def test_checkpoint_metadata_without_the_config_is_a_clear_error(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file({"model.w": torch.zeros(1)}, str(path), metadata={"format": checkpoints.FORMAT, "step": "1"})
    with pytest.raises(checkpoints.CheckpointError, match="metadata has no config, has_ema"):
        checkpoints.load(path)


def test_saving_removes_temporaries_of_killed_saves_and_keeps_ordinary_permissions(saved):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = saved.with_name(f".{saved.name}.tmp{int(dead.stdout)}")
    stale.write_bytes(b"half a checkpoint")
    loaded = checkpoints.load(saved)
    checkpoints.save(saved, loaded.model, loaded.config, ema=loaded.ema, step=loaded.step)
    assert not stale.exists()
    assert saved.stat().st_mode & 0o777 == (saved.parent / "config.json").stat().st_mode & 0o777


# ---------------------------------------------------------------------------------------------
# One writer per run folder


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path):
    cfg = config.override(presets.get("toy-2d"), [*TOY, "train.save_every=1"])
    with train.RunLock(tmp_path):
        with pytest.raises(train.RunLockedError, match=f"is in use by process {os.getpid()} on .*pass another --out"):
            train.train(cfg, max_steps=2, out_dir=tmp_path, verbose=False)
    assert not (tmp_path / train.CHECKPOINT).exists()
    train.train(cfg, max_steps=2, out_dir=tmp_path, verbose=False)  # released: the folder is free again


def _cli(*args):
    return [sys.executable, "-m", "minildm", *args]


def test_two_command_line_runs_on_one_folder_cannot_both_write(tmp_path):
    first = subprocess.Popen(_cli("train", "toy-2d", *TOY, "train.save_every=50", "--max-steps", "1000000",
                                  "--out", str(tmp_path), "--quiet"), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (tmp_path / train.CHECKPOINT).exists() and time.time() < deadline:
            time.sleep(0.1)
        second = subprocess.run(_cli("train", "toy-2d", *TOY, "--max-steps", "10", "--out", str(tmp_path), "--resume",
                                     "--quiet"), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"is in use by process {first.pid}" in second.stderr and len(second.stderr.splitlines()) == 1
        assert first.poll() is None, "the first run must go on undisturbed"
    finally:
        first.kill()
        first.wait()


# ---------------------------------------------------------------------------------------------
# Kill -9 and Ctrl-C during training: the checkpoint loads and the run resumes exactly


STEPS = 300


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    cfg = config.override(presets.get("toy-2d"), [*TOY, "train.save_every=7"])
    return train.train(cfg, max_steps=STEPS, out_dir=out, verbose=False)


def _resume_and_compare(out, reference):
    cfg = config.override(presets.get("toy-2d"), [*TOY, "train.save_every=7"])
    resumed = train.train(cfg, max_steps=STEPS, out_dir=out, verbose=False)
    assert checkpoints.load(out / train.CHECKPOINT).step == STEPS
    for name in ("model", "ema"):
        for a, b in zip(getattr(resumed, name).parameters(), getattr(reference, name).parameters()):
            assert torch.equal(a, b), f"{name} differs after a kill and a resume"


def test_kill_9_at_random_moments_leaves_a_checkpoint_that_resumes_exactly(tmp_path, uninterrupted):
    rng = random.Random(0)
    for trial in range(3):
        out = tmp_path / f"trial{trial}"
        run = subprocess.Popen(_cli("train", "toy-2d", *TOY, "train.save_every=7", "--max-steps", str(STEPS),
                                    "--out", str(out), "--quiet"))
        deadline = time.time() + 60
        while not (out / train.CHECKPOINT).exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        run.send_signal(signal.SIGKILL)
        run.wait()
        step = checkpoints.load(out / train.CHECKPOINT).step  # loads: never half written
        assert 0 < step <= STEPS and (step % 7 == 0 or step == STEPS)
        _resume_and_compare(out, uninterrupted)
        assert not list(out.glob(".checkpoint.safetensors.tmp*")), "a killed save's temporary file was left behind"


def test_ctrl_c_saves_at_the_step_boundary_and_exits_with_one_line(tmp_path, uninterrupted):
    run = subprocess.Popen(_cli("train", "toy-2d", *TOY, "train.save_every=7", "--max-steps", str(STEPS),
                                "--out", str(tmp_path), "--quiet"), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / train.CHECKPOINT).exists() and time.time() < deadline:
        time.sleep(0.01)
    run.send_signal(signal.SIGINT)
    error = run.communicate(timeout=60)[1]
    assert run.returncode == 130
    assert error.count("\n") == 1 and error.startswith("minildm train: interrupted: saved step ")
    step = int(error.split("saved step ")[1].split()[0])
    assert checkpoints.load(tmp_path / train.CHECKPOINT).step == step
    _resume_and_compare(tmp_path, uninterrupted)


# ---------------------------------------------------------------------------------------------
# One-line errors from the command line


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """A 1-step class-conditional toy-shapes checkpoint (5 kinds)."""
    out = tmp_path_factory.mktemp("cond")
    assert main(["train", "toy-shapes", "unet.num_classes=5", "unet.channel_mult=1,2", "unet.attention_resolutions=8",
                 "diffusion.num_timesteps=40", "data.num_samples=16", "train.batch_size=8", "train.sample_every=0",
                 "train.save_every=1", "--max-steps", "1", "--out", str(out), "--quiet"]) == 0
    return out / train.CHECKPOINT


@pytest.mark.parametrize("args, message", [
    (["--class", "9"], "--class 9: this model has classes 0 .. 4"),
    (["--class", "-1"], "--class -1: this model has classes 0 .. 4"),
    (["--device", "cuda:7"] if torch.cuda.is_available() else ["--device", "cuda"], "--device cuda"),
    (["--device", "gpu"], "--device 'gpu' is not a device; use cpu, cuda or cuda:N"),
])
def test_sample_arguments_the_model_cannot_honour_are_one_line_errors(conditional, tmp_path, capsys, args, message):
    assert main(["sample", str(conditional), "--num", "2", "--steps", "2", "--out", str(tmp_path / "x.png"),
                 *args]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_class_on_an_unconditional_model_is_refused(saved, tmp_path, capsys):
    assert main(["sample", str(saved), "--class", "1", "--num", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "this model is unconditional (unet.num_classes=0); leave --class out" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--num", "-2"], ["--num", "0"], ["--steps", "0"], ["--num", "two"]])
def test_counts_must_be_positive_integers(saved, args, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["sample", str(saved), *args])
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert "must be at least 1" in error or "is not an integer" in error


def test_max_steps_zero_is_refused_by_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "toy-2d", "--max-steps", "0", "--out", str(tmp_path)])
    assert "--max-steps: 0 must be at least 1" in capsys.readouterr().err


def test_corrupt_checkpoint_output_file_and_resume_without_checkpoint_are_one_line_messages(saved, tmp_path, capsys):
    flip_a_byte(saved, "ema.output.weight")
    assert main(["sample", str(saved), "--num", "2", "--out", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err
    assert "is corrupted" in error and error.count("\n") == 1
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main(["train", "toy-2d", "--out", str(a_file)]) == 2
    assert "--out " + str(a_file) + " is a file" in capsys.readouterr().err
    assert main(["train", "toy-2d", *TOY, "--max-steps", "2", "--out", str(tmp_path / "new"), "--resume"]) == 0
    assert "no checkpoint in" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# The evaluator takes only what it was trained on


@pytest.mark.parametrize("images, message", [
    (torch.zeros(4, 3, 32, 32, dtype=torch.uint8), "dtype torch.uint8; give floats in \\[-1, 1\\]"),
    (torch.full((4, 3, 32, 32), 255.0), "span \\[255, 255\\] but must be in \\[-1, 1\\]; convert with x / 127.5 - 1"),
    (torch.full((4, 3, 32, 32), float("nan")), "NaN or infinite"),
    (torch.zeros(4, 1, 32, 32), "must be RGB"),
])
def test_the_evaluator_rejects_images_outside_its_range(images, message):
    with pytest.raises(ValueError, match=message):
        metrics.evaluate_shapes(images)


def test_config_json_of_a_run_is_valid(saved):
    config.validate(config.from_dict(json.loads((saved.parent / "config.json").read_text())))


# ---------------------------------------------------------------------------------------------
# The UNet names the argument whose dtype or device is wrong


@pytest.fixture(scope="module")
def small_unet():
    import minildm

    cfg = config.override(presets.get("toy-shapes"), ["unet.num_classes=3", "unet.channel_mult=1,2",
                                                      "unet.attention_resolutions=8"])
    return minildm.build_model(cfg)


@pytest.mark.parametrize("x, y, message", [
    (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), torch.tensor([0, 1]), "x_t must be a float tensor, got torch.uint8"),
    (torch.zeros(2, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1]),
     r"x_t is torch.float64 but the model's weights are torch.float32"),
    (torch.zeros(2, 3, 16, 16), torch.tensor([0.0, 1.0]), r"y must be a tensor of integer class labels \(int64\), got "
                                                           "torch.float32"),
    (torch.zeros(2, 3, 16, 16, device="meta"), torch.tensor([0, 1]), "x_t is on meta but the model is on cpu"),
])
def test_the_unet_names_a_wrong_dtype_or_device(small_unet, x, y, message):
    with pytest.raises(ValueError, match=message):
        small_unet(x, torch.tensor([1, 2]), y=y)


@pytest.mark.parametrize("timesteps", [[0.5, 10.7, 100.2], torch.tensor([0.0, 10.0, 100.0])])
def test_samplers_refuse_fractional_timesteps_instead_of_truncating_them(timesteps):
    import minildm
    from minildm import sampling

    cfg = presets.get("toy-2d")
    with pytest.raises(ValueError, match="timesteps must be integers, got dtype float"):
        sampling.ddim_sample(minildm.build_model(cfg), minildm.build_diffusion(cfg), (4, 2), timesteps)
