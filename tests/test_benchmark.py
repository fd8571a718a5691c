"""The speed benchmark against diffusers: the architecture translation (equal parameter counts) and one
round of every timed step on tiny UNets. Speed itself is not asserted (it depends on the machine).
diffusers is a [dev] dependency: without it these tests fail rather than skip."""

import sys

import pytest
import torch

import minildm
from minildm import benchmark, presets
from minildm.config import Config, UNetConfig
from minildm.layers import count_parameters


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one thread avoids OpenMP oversubscription (which costs ~20x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_DDPM = UNetConfig(image_size=8, channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                       dropout=0.1)
TINY_ADM = UNetConfig(image_size=8, channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8, 4),
                      num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True,
                      use_new_attention_order=True, learn_sigma=True, num_classes=5, dropout=0.1)


def _config(unet: UNetConfig, **diffusion) -> Config:
    config = Config(unet=unet)
    for key, value in diffusion.items():
        setattr(config.diffusion, key, value)
    return config


@pytest.mark.parametrize("name", ["ddpm-cifar10", "iddpm-cifar10", "adm-imagenet64", "adm-imagenet256",
                                  "adm-upsampler-64-256", "adm-imagenet512"])
def test_paper_presets_have_the_same_parameter_count_in_diffusers(name):
    config = presets.get(name)
    ours = count_parameters(minildm.build_model(config, device="meta"))
    with torch.device("meta"):
        theirs = count_parameters(benchmark.DiffusersDenoiser(config.unet))
    assert ours == presets.info(name).params
    # Exact, except adm-imagenet512 (channel_mult[0] = 0.5): its time_embed input width has no diffusers setting.
    assert ours - theirs == benchmark.known_difference(config.unet)
    assert (benchmark.known_difference(config.unet) != 0) == (name == "adm-imagenet512")
    if name == "ddpm-cifar10":
        assert theirs == 35_746_307


@pytest.mark.parametrize("unet, diffusion", [
    (TINY_DDPM, {}),
    (TINY_ADM, dict(model_var_type="learned_range", loss_type="hybrid", beta_schedule="cosine")),
    (UNetConfig(**{**TINY_ADM.__dict__, "super_res": True}), dict(model_var_type="learned_range", loss_type="hybrid")),
], ids=["ddpm", "adm", "adm-super-res"])
def test_compare_times_both_steps_of_both_models(unet, diffusion):
    lines = []
    results = benchmark.compare(_config(unet, **diffusion), batch=2, repeats=1, warmup=0, log=lines.append)
    assert results["counts"]["minildm"] == results["counts"]["diffusers"]
    assert "(equal)" in lines[0]
    for label in ("train step", "DDIM step"):
        times = results["times"][label]
        assert len(times["minildm"]) == len(times["diffusers"]) == 1
        assert min(times["minildm"] + times["diffusers"]) > 0
    table = benchmark.format_table(results["times"])
    assert "train step" in table and "DDIM step" in table and "ratio minildm/diffusers" in table


def test_bf16_autocast_and_channels_last_run():
    results = benchmark.compare(_config(TINY_ADM, model_var_type="learned_range", loss_type="hybrid"), batch=2,
                                repeats=1, warmup=0, dtype="bf16", channels_last=True, clock="process",
                                log=lambda line: None)
    assert set(results["times"]) == {"train step", "DDIM step"}


def test_train_step_changes_the_weights_and_ddim_step_leaves_them():
    config = _config(TINY_ADM, model_var_type="learned_range", loss_type="hybrid")
    model = benchmark.DiffusersDenoiser(config.unet)
    diffusion = minildm.build_diffusion(config)
    inputs = benchmark.make_inputs(config, 2, "cpu")
    before = [p.detach().clone() for p in model.parameters()]
    benchmark.ddim_step(model, diffusion, inputs)()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not model.training
    benchmark.train_step(model, diffusion, inputs)()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_time_interleaved_alternates_the_order():
    calls = []
    times = benchmark.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                       repeats=3, warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [len(v) for v in times.values()] == [3, 3]


def test_group_norms_have_the_configs_groups():
    config = presets.get("toy-shapes")  # a narrow toy with 8 groups
    model = benchmark.DiffusersDenoiser(config.unet)
    groups = {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {config.unet.norm_groups} == {8}


def test_conv_resample_off_is_rejected_with_a_hint():
    with pytest.raises(ValueError, match="conv_resample"):
        benchmark.diffusers_kwargs(UNetConfig(conv_resample=False))


def test_main_prints_counts_and_table(capsys):
    benchmark.main(["--preset", "toy-shapes", "--batch", "1", "--steps", "1", "--warmup", "0", "--threads", "1",
                    "--set", "unet.image_size=8", "data.image_size=8", "unet.channel_mult=1,2",
                    "unet.attention_resolutions=4"])
    out = capsys.readouterr().out
    assert "parameters: minildm" in out and "(equal)" in out
    assert "train step" in out and "DDIM step" in out


def test_main_without_diffusers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(SystemExit, match=r"pip install -e \.\[bench\]"):
        benchmark.main(["--preset", "toy-shapes"])


# ---------------------------------------------------------------------------------------------
# Training throughput and MFU (--mfu)


def test_mfu_arithmetic_and_known_peaks():
    # 1 TFLOP of model work in 0.5 s is 2 TFLOP/s: a quarter of an 8 TFLOPS device
    assert benchmark.mfu(1e12, 0.5, 8.0) == pytest.approx(0.25)
    assert benchmark.peak_tflops("NVIDIA H200") == 989.4
    assert benchmark.peak_tflops("NVIDIA H100 PCIe") == 756.0 and benchmark.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert benchmark.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert benchmark.peak_tflops("cpu") is None


def test_throughput_rows_follow_from_the_step_time_and_flops():
    config = _config(TINY_DDPM)
    rows = benchmark.throughput(config, batch=2, repeats=1, warmup=0, peak=0.01)
    flops = minildm.memory.step_flops(config, 2)
    assert flops > 0
    for row in rows.values():
        assert row["flops"] == flops
        assert row["images_per_s"] == pytest.approx(2 / (row["ms"] / 1000))
        assert row["mfu"] == pytest.approx(flops / (row["ms"] / 1000) / 0.01e12)
        assert row["tflops"] == pytest.approx(row["mfu"] * 0.01)


def test_main_mfu_prints_both_presets_and_both_models(capsys):
    benchmark.main(["--mfu", "--presets", "toy-shapes", "ddpm-shapes", "--batch", "1", "--steps", "1", "--warmup",
                    "0", "--threads", "1", "--device", "cpu", "--set", "unet.image_size=8", "data.image_size=8",
                    "unet.channel_mult=1,2", "unet.attention_resolutions=4"])
    out = capsys.readouterr().out
    assert "img/s" in out and "MFU" in out and "MFU n/a: no known peak for this device; pass --peak-tflops" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("toy-shapes", "ddpm-shapes"))]
    assert [row[:2] for row in rows] == [["toy-shapes", "minildm"], ["toy-shapes", "diffusers"],
                                         ["ddpm-shapes", "minildm"], ["ddpm-shapes", "diffusers"]]
    assert all(row[-1] == "n/a" and float(row[3]) > 0 for row in rows)
