"""The levers experiment: throughput rows and equal-wall-time recipes (tiny smoke settings)."""

import pytest
import torch

from minildm.experiments import levers


def test_stepper_trains_and_throughput_times_every_lever_round_robin(monkeypatch):
    monkeypatch.setattr(levers, "PRESET", "toy-shapes")
    monkeypatch.setattr(levers, "THROUGHPUT", [
        ("batch 4", ["train.batch_size=4"], 1, False, False, False),
        ("batch 4, bound term", ["train.batch_size=4"], 1, False, False, True),
        ("batch 4, channels_last", ["train.batch_size=4"], 1, True, False, False),
    ])
    rows = levers.run_throughput(seconds=0.3, rounds=2)
    assert list(rows) == ["batch 4", "batch 4, bound term", "batch 4, channels_last"]
    for row in rows.values():
        assert len(row["rounds_steps_per_s"]) == 2 and row["steps_per_s"] > 0
        assert row["images_per_s"] == pytest.approx(row["steps_per_s"] * 4, rel=0.01)
    assert torch.get_num_threads() >= 1


def test_quality_recipes_run_at_equal_wall_time(monkeypatch):
    monkeypatch.setattr(levers, "PRESET", "toy-shapes")
    throughput = {"slow": {"steps_per_s": 2.0, "threads": 1}, "fast": {"steps_per_s": 4.0, "threads": 1}}
    monkeypatch.setattr(levers, "QUALITY", [("a", ["train.batch_size=8"], "slow"),
                                            ("b", ["train.batch_size=8", "diffusion.snr_gamma=5"], "fast")])
    rows = levers.run_quality(throughput, minutes=0.05, num_samples=8)  # 3 s: 6 and 12 steps
    assert rows["a"]["steps"] == 6 and rows["b"]["steps"] == 12
    assert rows["b"]["images_seen"] == 96
    assert 0 <= rows["a"]["confident_fraction"] <= 1
    only_b = levers.run_quality(throughput, minutes=0.05, num_samples=8, recipes=[1])
    assert list(only_b) == ["b"]
