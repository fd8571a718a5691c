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


def test_late_recipes_continue_one_checkpoint_and_only_the_cosine_rows_decay(monkeypatch, tmp_path):
    from minildm import checkpoints, config, presets, train

    monkeypatch.setattr(levers, "PRESET", "toy-shapes")
    get = presets.get
    monkeypatch.setattr(presets, "get", lambda name: config.override(get(name), ["train.warmup_steps=0"]))
    start = config.override(presets.get("toy-shapes"), ["train.batch_size=8", "train.save_every=3",
                                                        "train.sample_every=0"])
    train.train(start, max_steps=3, out_dir=tmp_path / "start", verbose=False)
    rates = {}
    real_learning_rate = train.learning_rate
    monkeypatch.setattr(train, "learning_rate", lambda cfg, step, total=None: rates.setdefault(
        (cfg.lr_schedule, cfg.lr_decay_steps, step), real_learning_rate(cfg, step, total)))
    rows = levers.run_late(tmp_path / "start" / train.CHECKPOINT, steps=4, num_samples=8, work_dir=tmp_path / "late",
                           recipes=[0, 2])
    assert rows["start_step"] == 3 and list(rows)[1:] == [levers.LATE[0][0], levers.LATE[2][0]]
    assert rows[levers.LATE[0][0]]["steps"] == "3 -> 7"
    assert rates[("constant", 4, 6)] == 1e-3  # toy-shapes' lr, unchanged
    assert rates[("cosine", 4, 3)] == pytest.approx(1e-3) and rates[("cosine", 4, 6)] < 2e-4
    assert checkpoints.read_metadata(tmp_path / "late" / "late2" / train.CHECKPOINT)["step"] == 7
