"""The ADM ablation and learned-variance experiments (minildm.ablation), run for a few steps."""

import json

import pytest
import torch

import minildm
from minildm import ablation
from minildm.attention import AttentionBlock
from minildm.unet import ResBlock


def test_variants_are_the_adm_changes():
    models = {name: minildm.build_model(ablation.make_config(overrides))
              for name, overrides in ablation.ADM_VARIANTS.items()}
    for name, model in models.items():
        blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
        attention = [m for m in model.modules() if isinstance(m, AttentionBlock)]
        adagn = name in ("+adagn", "adm")
        updown = name in ("+updown", "adm")
        multi = name in ("+attention", "adm")
        assert all(b.use_scale_shift_norm == adagn for b in blocks), name
        assert all(b.emb_layers[1].out_features == (2 if adagn else 1) * b.out_channels for b in blocks)
        assert any(b.updown for b in blocks) == updown, name
        # baseline: one head everywhere; ADM: 16 channels per head at 8x8 and 4x4
        assert {a.num_heads for a in attention} == ({4} if multi else {1}), name
        assert len(attention) == (1 + 2 + 2 + 2 if multi else 1 + 1 + 2), name  # middle + down/up per level
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    assert counts["+adagn"] > counts["ddpm"] and counts["+attention"] > counts["ddpm"]
    assert counts["adm"] == max(counts.values())


def test_train_for_budget_stops_on_the_clock_and_on_max_steps():
    config = ablation.make_config()
    _, _, log = ablation.train_for_budget(config, 0.0, num_samples=64)
    assert log["steps"] == 0
    model, ema, log = ablation.train_for_budget(config, 1e9, max_steps=4, log_every=2, num_samples=64)
    assert log["steps"] == 4 and log["step"] == [2, 4] and len(log["loss"]) == 2
    assert all(0 < loss < 5 for loss in log["loss"])
    # the EMA moved away from the initial weights but is not the trained network
    torch.manual_seed(config.train.seed)
    initial = minildm.build_model(config)
    name = "input_blocks.0.0.weight"
    weights = {k: dict(m.named_parameters())[name] for k, m in (("init", initial), ("model", model), ("ema", ema))}
    assert not torch.equal(weights["ema"], weights["init"]) and not torch.equal(weights["ema"], weights["model"])


def test_adm_experiment_cli_and_evaluate(tmp_path):
    out = tmp_path / "adm.json"
    report = ablation.main(["adm", "--budget", "1000", "--max-steps", "2", "--variants", "ddpm,adm",
                            "--num-samples", "4", "--sample-steps", "3", "--samples-dir", str(tmp_path), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"].keys() == {"ddpm", "adm"} == report["results"].keys()
    for entry in saved["results"].values():
        assert entry["steps"] == 2 and entry["params"] > 0 and entry["final_loss"] is None  # no log entry yet
    assert saved["results"]["adm"]["params"] > saved["results"]["ddpm"]["params"]
    samples = torch.load(tmp_path / "adm_adm.pt")
    assert samples.shape == (4, 3, 16, 16) and samples.dtype == torch.uint8
    with pytest.raises(SystemExit):
        ablation.main(["adm", "--variants", "nope"])


def test_evaluate_fills_quality_from_stored_samples(tmp_path):
    report = ablation.main(["adm", "--budget", "1000", "--max-steps", "1", "--variants", "ddpm",
                            "--num-samples", "4", "--sample-steps", "3", "--samples-dir", str(tmp_path), "--out", str(tmp_path / "a.json")])
    assert report["results"]["ddpm"]["quality"]["num_images"] == 4
    evaluated = ablation.main(["evaluate", "--report", str(tmp_path / "a.json"), "--samples-dir", str(tmp_path),
                               "--grid", str(tmp_path / "grid.png")])
    assert evaluated["results"]["ddpm"]["quality"] == report["results"]["ddpm"]["quality"]
    assert evaluated["sample_grid"]["rows"] == ["ddpm"] and (tmp_path / "grid.png").is_file()


def test_variance_experiment_samples_both_fixed_variances_and_the_learned_one(tmp_path):
    results = ablation.run_variance(1000, steps=[2, 5], num_samples=2, bpd_samples=2, max_steps=1,
                                    samples_dir=tmp_path)
    assert set(results["fixed"]["sampling"]) == {"L_simple, sigma^2=beta", "L_simple, sigma^2=beta_tilde"}
    assert set(results["learned"]["sampling"]) == {"L_hybrid, learned sigma"}
    # learn_sigma doubles only the output conv: 3 more output channels of a 3x3 conv from 32 channels
    assert results["learned"]["params"] - results["fixed"]["params"] == 3 * 32 * 9 + 3
    for entry in results.values():
        for rows in entry["sampling"].values():
            assert [row["sampling_steps"] for row in rows] == [2, 5]
            assert all(row["bits_per_dim"] > 0 for row in rows)
    assert (tmp_path / ablation.variance_samples_file("learned", "L_hybrid, learned sigma", 5)).is_file()
