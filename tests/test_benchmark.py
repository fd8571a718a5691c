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
    assert benchmark.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert benchmark.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert benchmark.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert benchmark.peak_tflops("cpu") is None


def test_the_bf16_table_peak_is_only_used_for_bf16_runs():
    assert benchmark.choose_peak("cuda", "NVIDIA A100-SXM4-80GB", "bf16") == (312.0, "PEAK_TFLOPS (dense bf16)")
    # fp32 runs on fp32 / TF32 units (A100: 19.5 / 156 TFLOPS): the 312 of bf16 would understate MFU up to 16x
    peak, why = benchmark.choose_peak("cuda", "NVIDIA A100-SXM4-80GB", "fp32")
    assert peak is None and "dense bf16 peak of NVIDIA A100-SXM4-80GB (312)" in why
    assert "run with --dtype bf16 or pass --peak-tflops (the device's fp32 peak)" in why
    assert benchmark.choose_peak("cuda", "NVIDIA A100-SXM4-80GB", "fp32", 156.0) == (156.0, "--peak-tflops")
    assert benchmark.choose_peak("cpu", "x86_64", "bf16") == (None, "no known peak for this device; pass --peak-tflops")
    assert benchmark.choose_peak("cuda", "Tesla T4", "bf16")[0] is None


def test_throughput_rows_against_hand_computed_figures(monkeypatch):
    # Step times fixed to minildm 40, 90, 50 ms (median 50) and diffusers 100, 120, 80 ms (median 100), and
    # 3 GFLOPs per step at batch 4. By hand: minildm 4 / 0.05 s = 80 img/s, 3e9 / 0.05 s = 0.06 TFLOP/s, a quarter
    # of a 0.24 TFLOPS peak; diffusers 40 img/s, 0.03 TFLOP/s, 12.5%.
    timed = {}

    def fixed_times(steps, repeats, warmup, clock):
        timed.update(steps=sorted(steps), repeats=repeats, warmup=warmup)
        return {"minildm": [40.0, 90.0, 50.0], "diffusers": [100.0, 120.0, 80.0]}

    counted = []

    def fixed_flops(config, batch, dtype):
        counted.append((batch, dtype))
        return 3e9

    monkeypatch.setattr(benchmark, "time_interleaved", fixed_times)
    monkeypatch.setattr(benchmark.memory, "step_flops", fixed_flops)
    rows = benchmark.throughput(_config(TINY_DDPM), batch=4, repeats=3, warmup=0, peak=0.24, dtype="bf16")
    assert timed == {"steps": ["diffusers", "minildm"], "repeats": 3, "warmup": 0} and counted == [(4, "bf16")]
    assert rows["minildm"] == pytest.approx({"ms": 50.0, "images_per_s": 80.0, "tflops": 0.06, "mfu": 0.25,
                                             "flops": 3e9})
    assert rows["diffusers"] == pytest.approx({"ms": 100.0, "images_per_s": 40.0, "tflops": 0.03, "mfu": 0.125,
                                               "flops": 3e9})
    table = benchmark.format_throughput({"tiny": rows}).splitlines()
    assert table[1].split() == ["tiny", "minildm", "50.0", "80.0", "0.060", "25.0%"]
    assert table[2].split() == ["tiny", "diffusers", "100.0", "40.0", "0.030", "12.5%"]
    assert benchmark.throughput(_config(TINY_DDPM), batch=4, repeats=3, warmup=0)["minildm"]["mfu"] is None


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
