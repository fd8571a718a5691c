"""The paper-claim experiments (minildm.experiments: ADM ablation, iDDPM, DDPM objectives), run for a few steps."""

import json
import math

import numpy as np
import pytest
import torch

import minildm
from minildm import ablation, schedules, train
from minildm.attention import AttentionBlock
from minildm.diffusion import GaussianDiffusion
from minildm.experiments import adm_ablation, ddpm_objectives, iddpm, runner
from minildm.unet import ResBlock

TINY = ["--train-steps", "2", "--num-samples", "8", "--extra", "data.num_samples=64"]


def test_variants_are_the_adm_changes():
    models = {name: minildm.build_model(runner.make_config(overrides))
              for name, overrides in adm_ablation.VARIANTS.items()}
    for name, model in models.items():
        blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
        attention = [m for m in model.modules() if isinstance(m, AttentionBlock)]
        adagn = name in ("+adagn", "adm")
        updown = name in ("+updown", "adm")
        multi = name in ("+attention", "adm")
        assert all(b.use_scale_shift_norm == adagn for b in blocks), name
        assert all(b.emb_layers[1].out_features == (2 if adagn else 1) * b.out_channels for b in blocks)
        assert any(b.updown for b in blocks) == updown, name
        # baseline: one head at 8x8; ADM: 8 channels per head (4 heads of 32 channels) at 8x8 and 4x4
        assert {a.num_heads for a in attention} == ({4} if multi else {1}), name
        assert len(attention) == (1 + 2 + 2 + 2 if multi else 1 + 1 + 2), name  # middle + down/up per level
        assert all(m.num_groups == 8 for m in model.modules() if isinstance(m, torch.nn.GroupNorm)), name
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    assert counts["+adagn"] > counts["ddpm"] and counts["+attention"] > counts["ddpm"]
    assert counts["adm"] == max(counts.values())
    # the chapter-03 names still resolve
    assert ablation.ADM_VARIANTS is adm_ablation.VARIANTS and ablation.make_config is runner.make_config


def test_mean_stderr_and_paired_difference():
    summary = runner.mean_stderr([1.0, 2.0, 3.0, 4.0])
    assert summary["mean"] == 2.5 and summary["n"] == 4
    assert summary["stderr"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert runner.mean_stderr([5.0]) == {"mean": 5.0, "stderr": None, "n": 1}
    assert runner.mean_stderr([None]) == {"mean": None, "stderr": None, "n": 0}
    # paired by seed: only seeds both have; separated when |mean| > 2 standard errors
    diff = runner.paired_difference({0: 10.0, 1: 12.0, 2: 11.0, 3: 99.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert diff["n"] == 3 and diff["mean"] == pytest.approx(9.0)
    assert diff["stderr"] == pytest.approx(1 / math.sqrt(3)) and diff["separated"]  # differences 9, 10, 8
    assert not runner.paired_difference({0: 1.0, 1: 3.0}, {0: 2.0, 1: 2.0})["separated"]


def test_training_goes_through_train_train_and_is_cached(tmp_path, monkeypatch):
    calls = []
    original = train.train

    def spy(config, **kwargs):
        calls.append((config, kwargs))
        return original(config, **kwargs)

    monkeypatch.setattr(train, "train", spy)
    config = runner.make_config(["data.num_samples=64"])
    model = runner.train_model(config, 3, cache_dir=tmp_path)
    assert len(calls) == 1
    trained_config, kwargs = calls[0]
    assert kwargs["max_steps"] == 3 and kwargs["verbose"] is False and not kwargs["resume"]
    assert trained_config.train.save_every == 0 and trained_config.train.sample_every == 0
    assert not any(tmp_path.glob("*/*")), "train.train wrote files"
    record = model.record
    assert record["steps"] == 3 and record["params"] == 280_755 and not record["from_cache"]
    assert 0 < record["final_loss"] < 5 and record["train_cpu_s"] >= 0
    again = runner.train_model(config, 3, cache_dir=tmp_path)
    assert len(calls) == 1 and again.record["from_cache"]
    for a, b in zip(model.ema.parameters(), again.ema.parameters()):
        assert torch.equal(a, b)
    # another seed is another model; a value equal to its default (e.g. of a newly added field) changes nothing
    other_seed = runner.make_config(["data.num_samples=64", "train.seed=1"])
    assert runner.model_key(config, 3) != runner.model_key(other_seed, 3)
    assert runner.model_key(config, 3) == runner.model_key(runner.make_config(["data.num_samples=64",
                                                                               "unet.super_res=false"]), 3)


def test_adm_experiment_writes_per_seed_and_aggregated_results(tmp_path):
    out, grid = tmp_path / "adm.json", tmp_path / "grid.png"
    report = adm_ablation.main(["--seeds", "0,1", *TINY, "--sample-steps", "2", "--variants", "adm",
                                "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--grid", str(grid)])
    saved = json.loads(out.read_text())
    assert saved["results"].keys() == {"ddpm", "adm"}  # the reference row comes along
    assert saved["complete"] and saved["command"].startswith("OMP_NUM_THREADS=1 MINILDM_PROGRESS=0 python -m "
                                                             "minildm.experiments.adm_ablation --seeds 0,1")
    assert "/" not in saved["machine"] and saved["settings"]["train_steps"] == 2
    assert saved["train_cpu_s_total"] == pytest.approx(sum(m["train_cpu_s"] for m in saved["models"].values()), abs=0.1)
    assert len(saved["models"]) == 4 and grid.is_file() and saved["sample_grid"]["rows"] == ["ddpm", "adm"]
    adm, ddpm = saved["results"]["adm"], saved["results"]["ddpm"]
    assert adm["params"] > ddpm["params"] and [e["seed"] for e in adm["per_seed"]] == [0, 1]
    for result in (adm, ddpm):
        for entry in result["per_seed"]:
            assert entry["steps"] == 2 and entry["sample_cpu_s"] >= 0
            assert {"confident_fraction", "frechet_distance_to_real", "frechet_distance_floor", "precision",
                    "recall"} <= entry.keys()
            assert 0 < entry["heldout_loss"] < 5 and entry["bits_per_dim"] is None
        values = [e["frechet_distance_to_real"] for e in result["per_seed"]]
        summary = result["aggregate"]["frechet_distance_to_real"]
        assert summary["n"] == 2 and summary["mean"] == pytest.approx(np.mean(values), abs=1e-4)
        assert summary["stderr"] == pytest.approx(abs(values[0] - values[1]) / 2, abs=1e-4)
    differences = [a["frechet_distance_to_real"] - b["frechet_distance_to_real"]
                   for a, b in zip(adm["per_seed"], ddpm["per_seed"])]
    assert adm["vs_reference"]["frechet_distance_to_real"]["mean"] == pytest.approx(np.mean(differences), abs=1e-3)
    assert "vs_reference" not in ddpm and len(runner.verdicts(report)) == 1
    assert adm_ablation.plot(report) is not None
    with pytest.raises(SystemExit):
        adm_ablation.main(["--variants", "nope"])



def test_device_option_reaches_training_and_cached_models(tmp_path, monkeypatch):
    devices = []
    original = train.train

    def spy(config, **kwargs):
        devices.append(kwargs["device"])
        return original(config, **kwargs)

    monkeypatch.setattr(train, "train", spy)
    args = ["--seeds", "0", *TINY, "--sample-steps", "2", "--variants", "ddpm", "--cache-dir", str(tmp_path)]
    report = adm_ablation.main([*args, "--device", "cpu"])
    assert devices == [torch.device("cpu")] and report["settings"]["device"] == "cpu"
    assert report["results"]["ddpm"]["per_seed"][0]["heldout_loss"] > 0
    config = runner.make_config(["data.num_samples=64", "train.seed=0"])
    cached = runner.train_model(config, 2, cache_dir=tmp_path, device="cpu")
    assert cached.record["from_cache"] and next(cached.ema.parameters()).device == torch.device("cpu")
    assert runner.resolve_device("") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert runner.resolve_device("cpu") == torch.device("cpu")

def test_iddpm_and_ddpm_experiments_report_samples_and_bits_per_dim(tmp_path):
    cache = ["--cache-dir", str(tmp_path / "cache"), "--seeds", "0", *TINY, "--bpd-images", "2"]
    variance = iddpm.main(["variance", *cache, "--sample-steps", "2"])
    assert list(variance["results"]) == ["L_simple sigma^2=beta: 2 steps", "L_simple sigma^2=beta~: 2 steps",
                                         "L_hybrid learned sigma: 2 steps"]
    learned = variance["results"]["L_hybrid learned sigma: 2 steps"]
    fixed = variance["results"]["L_simple sigma^2=beta: 2 steps"]
    # learn_sigma doubles only the output conv: 3 more output channels of a 3x3 conv from 16 channels
    assert learned["params"] - fixed["params"] == 3 * 16 * 9 + 3
    assert all(r["per_seed"][0]["bits_per_dim"] > 0 for r in variance["results"].values())
    assert learned["vs_reference"]["reference"] == "L_simple sigma^2=beta: 2 steps"
    schedule = iddpm.main(["schedule", *cache, "--sample-steps", "2"])
    assert list(schedule["results"]) == ["linear: 2 steps", "cosine: 2 steps"]
    # the cosine model and its sigma^2 = beta samples are shared with the variance experiment (cached)
    assert (schedule["results"]["cosine: 2 steps"]["per_seed"][0]["frechet_distance_to_real"]
            == fixed["per_seed"][0]["frechet_distance_to_real"])
    objectives = ddpm_objectives.main([*cache, "--bpd-terms", "3", "--sample-steps", "2", "--variants", "x0 + L_vlb"])
    assert list(objectives["results"]) == ["eps + L_simple", "x0 + L_vlb"]
    assert all(r["per_seed"][0]["bits_per_dim"] > 0 for r in objectives["results"].values())
    for figure in (iddpm.plot_variance(variance), iddpm.plot_schedule(schedule), ddpm_objectives.plot(objectives)):
        assert figure is not None


def test_bound_estimate_takes_every_term_or_a_stratified_sample():
    diffusion = GaussianDiffusion(schedules.beta_schedule("cosine", 20))
    x0 = torch.randint(0, 256, (3, 3, 4, 4)).float() / 127.5 - 1

    def model(x_t, t):  # any deterministic denoiser
        return 0.5 * x_t + 0.01 * t.view(-1, 1, 1, 1)

    full = runner.bound_bits_per_dim(model, diffusion, x0, None, seed=3)
    reference = diffusion.bits_per_dim(model, x0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(full["total_bpd"].float(), reference["total_bpd"])
    sampled = runner.bound_bits_per_dim(model, diffusion, x0, 4, seed=3)
    assert sampled["timesteps"][0] == 0 and len(sampled["timesteps"]) == 5
    assert sum(sampled["weights"]) == 20  # L_0 once, the 19 KL terms by 4 strata
    assert all(1 <= t < 20 for t in sampled["timesteps"][1:]) and np.all(np.diff(sampled["timesteps"]) > 0)
    assert math.isfinite(sampled["total_bpd"].mean().item())
