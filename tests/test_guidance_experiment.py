"""The guidance sweep (`python -m minildm.experiments.guidance`) on the shipped checkpoints, at a tiny size."""

import json

import matplotlib.pyplot as plt
import pytest
import torch

from minildm.experiments import guidance


def test_classifier_sweep_shares_noise_across_scales_and_reports_every_metric(tmp_path):
    report = guidance.main(["classifier", "--scales", "0,3", "--num", "4", "--steps", "2", "--batch-size", "2",
                            "--out", str(tmp_path / "sweep.json")])
    assert [row["scale"] for row in report["rows"]] == [0.0, 3.0]
    assert set(guidance.METRICS) <= set(report["rows"][0])
    assert report["command"].startswith("python -m minildm.experiments.guidance classifier --scales 0,3")
    assert json.loads((tmp_path / "sweep.json").read_text())["rows"] == report["rows"]
    plain, _ = guidance.sample("classifier", 0.0, 4, steps=2, batch_size=2)
    guided, labels = guidance.sample("classifier", 3.0, 4, steps=2, batch_size=2)
    assert labels.tolist() == [0, 1, 2, 3]
    assert not torch.allclose(plain, guided)  # same x_T, the guidance moved the samples


def test_classifier_free_sweep_seeds_and_plot():
    report = guidance.sweep("free", [1.0, 2.0], num=4, steps=2, batch_size=4, verbose=False)
    other = guidance.sweep("free", [1.0, 2.0], num=4, steps=2, batch_size=4, seed=1000, verbose=False)
    assert report["scale_convention"].startswith("classifier-free w: 1 = none")
    combined = guidance.combine_seeds([report, other])
    assert combined["num_seeds"] == 2 and combined["seeds"] == [0, 1000]
    for row, a, b in zip(combined["rows"], report["rows"], other["rows"]):
        assert row["precision"] == pytest.approx((a["precision"] + b["precision"]) / 2)
        assert row["precision_sd"] == pytest.approx(abs(a["precision"] - b["precision"]) / 2 ** 0.5)
    with pytest.raises(ValueError, match="same scales"):
        guidance.combine_seeds([report, {**other, "rows": other["rows"][:1]}])
    figure = guidance.plot_sweeps({"free": [report, other], "classifier": {**report, "method": "classifier"}})
    assert [axis.get_xlabel() for axis in figure.axes] == ["classifier scale s  /  classifier-free w - 1"] * 3
    # classifier-free w is drawn at w - 1: the same strength as classifier scale s (minildm.guidance)
    free, classifier = figure.axes[0].containers
    assert list(free.lines[0].get_xdata()) == [0.0, 1.0] and list(classifier.lines[0].get_xdata()) == [1.0, 2.0]
    assert figure.axes[0].get_legend_handles_labels()[1] == ["free (2 seeds)", "classifier"]
    assert free.has_yerr and not classifier.has_yerr  # bars for two seeds; one seed has none (not bars of length 0)
    plt.close(figure)
    with pytest.raises(ValueError, match="unknown method 'clip'"):
        guidance.sweep("clip", [1.0], num=2)


def test_implicit_classifier_rows():
    rows = guidance.implicit_classifier(num=6, timesteps=(300, 900))
    assert [row["t"] for row in rows] == [300, 900]
    assert all(-1 <= row["cosine"] <= 1 and row["norm_ratio"] > 0 for row in rows)


def test_classifier_guidance_of_the_conditional_model_asks_both_for_the_kind():
    # ADM-G: the class-conditional model gets the requested kind as y, and the classifier guides towards it.
    report = guidance.sweep("classifier-cond", [0.0, 3.0], num=4, steps=2, batch_size=4, verbose=False)
    assert report["model"] == "ddpm-shapes-cond" and report["classifier"] == "shapes-classifier"
    assert report["scale_convention"] == "classifier scale s: 0 = none"
    plain, labels = guidance.sample("classifier-cond", 0.0, 4, steps=2, batch_size=4)
    unconditional, _ = guidance.sample("classifier", 0.0, 4, steps=2, batch_size=4)
    guided, _ = guidance.sample("classifier-cond", 3.0, 4, steps=2, batch_size=4)
    assert labels.tolist() == [0, 1, 2, 3]
    assert not torch.allclose(plain, unconditional)  # another network: the conditional one
    assert not torch.allclose(plain, guided)  # same x_T and labels, the classifier moved the samples


def test_kind_color_sweep_asks_for_35_classes_and_scores_kind_and_colour():
    report = guidance.sweep("classifier-kind-color", [0.0, 3.0], num=4, steps=2, batch_size=4, verbose=False)
    assert report["classifier"] == "shapes-classifier-kind-color" and report["label"] == "kind_color"
    row = report["rows"][0]
    assert 0 <= row["requested_class_accuracy"] <= row["requested_kind_accuracy"] <= 1
    _, labels = guidance.sample("classifier-kind-color", 0.0, 40, steps=1, batch_size=40)
    assert labels.tolist() == [i % 35 for i in range(40)]  # class = kind * 7 + colour, every class in turn


def test_classifier_free_kind_color_sweep_asks_the_35_class_model():
    report = guidance.sweep("free-kind-color", [1.0, 3.0], num=4, steps=2, batch_size=4, verbose=False)
    assert report["model"] == "ddpm-shapes-cond-kind-color" and report["classifier"] is None
    assert report["label"] == "kind_color" and report["scale_convention"].startswith("classifier-free w: 1 = none")
    row = report["rows"][0]
    assert 0 <= row["requested_class_accuracy"] <= row["requested_kind_accuracy"] <= 1
    plain, labels = guidance.sample("free-kind-color", 1.0, 4, steps=2, batch_size=4)
    guided, _ = guidance.sample("free-kind-color", 3.0, 4, steps=2, batch_size=4)
    assert labels.tolist() == [0, 1, 2, 3] and not torch.allclose(plain, guided)
