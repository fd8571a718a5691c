"""Metrics: Fréchet distance identities and closed forms, KID and IS against torchmetrics, the shipped shapes
evaluator, evaluate_shapes, and the Inception metrics (offline error; the pipeline with random weights)."""

import json
import math
import os
import urllib.error

import pytest
import torch
from torch import nn

from minildm import data, metrics
from minildm.experiments.guidance import CHECKPOINTS


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_is_zero_for_identical_sets_and_symmetric():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 8, generator=g) @ torch.randn(8, 8, generator=g)
    b = 0.5 * torch.randn(200, 8, generator=g) + 1.0
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert metrics.frechet_distance(a, b) == pytest.approx(metrics.frechet_distance(b, a), rel=1e-9)
    assert metrics.frechet_distance(a, b) > 1.0


def test_frechet_distance_of_few_points_in_many_dimensions_equals_the_gaussian_formula():
    # N_a N_b < D^2: the trace term comes from the singular values of the N_a x N_b cross product, not from a
    # D x D eigendecomposition; both are exact, so they agree to float64 rounding of the near-zero eigenvalues.
    g = torch.Generator().manual_seed(4)
    a = torch.randn(12, 300, generator=g, dtype=torch.float64) @ torch.randn(300, 300, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(9, 300, generator=g, dtype=torch.float64) + 0.2
    gaussian = metrics.gaussian_frechet_distance(*metrics._gaussian(a), *metrics._gaussian(b))
    assert metrics.frechet_distance(a, b) == pytest.approx(gaussian, rel=1e-8)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9 * gaussian)


def test_precision_recall_in_chunks_equals_the_whole_distance_matrix():
    g = torch.Generator().manual_seed(5)
    real, fake = torch.randn(60, 5, generator=g), torch.randn(50, 5, generator=g) + 0.7
    whole = metrics.precision_recall(real, fake, chunk_size=1000)
    assert metrics.precision_recall(real, fake, chunk_size=7) == whole and 0 < whole["precision"] < 1


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift():
    # Same covariance, means differ by c: the distance is |c|^2 exactly.
    a = torch.randn(500, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0], dtype=torch.float64)
    assert metrics.frechet_distance(a, a + shift) == pytest.approx(shift.square().sum().item(), rel=1e-9)


def test_gaussian_frechet_distance_diagonal_closed_form():
    # Diagonal covariances commute: d = |m1 - m2|^2 + sum_i (s1_i - s2_i)^2 with s the standard deviations.
    m1, m2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, -1.0])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 0.5, 0.5])
    expected = (m1 - m2).square().sum() + (s1 - s2).square().sum()  # 10 + 4 + 2.25 = 16.25
    got = metrics.gaussian_frechet_distance(m1, torch.diag(s1**2), m2, torch.diag(s2**2))
    assert got == pytest.approx(expected.item(), rel=1e-12) and expected.item() == 16.25


def test_gaussian_frechet_distance_non_commuting_2x2_closed_form():
    # For 2x2 A = S1 S2 with eigenvalues l1, l2 >= 0: Tr sqrt(A) = sqrt(Tr A + 2 sqrt(det A)).
    s1 = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    s2 = torch.tensor([[1.0, -0.3], [-0.3, 0.5]], dtype=torch.float64)
    product = s1 @ s2
    trace_sqrt = math.sqrt(product.trace().item() + 2 * math.sqrt(torch.linalg.det(product).item()))
    expected = (s1.trace() + s2.trace()).item() - 2 * trace_sqrt
    zero = torch.zeros(2, dtype=torch.float64)
    assert metrics.gaussian_frechet_distance(zero, s1, zero, s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_with_singular_covariance_is_finite():
    # Fewer points than dimensions: rank-deficient covariances must not give NaN or a negative value.
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(10, 32, generator=g), torch.randn(12, 32, generator=g)
    value = metrics.frechet_distance(a, b)
    assert math.isfinite(value) and value > 0
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        metrics.frechet_distance(torch.randn(10), torch.randn(10))
    with pytest.raises(ValueError, match="same D"):
        metrics.frechet_distance(torch.randn(10, 3), torch.randn(10, 4))


def test_precision_recall_of_k_nn_manifolds():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(400, 4, generator=generator)
    same = metrics.precision_recall(real, torch.randn(400, 4, generator=generator))
    assert same["precision"] > 0.8 and same["recall"] > 0.8
    # a collapsed generator: every sample sits at the data mode -> high precision, almost no recall
    collapsed = metrics.precision_recall(real, 0.05 * torch.randn(400, 4, generator=generator))
    assert collapsed["precision"] > 0.95 and collapsed["recall"] < 0.2
    # samples far from the data: no precision
    assert metrics.precision_recall(real, real + 10)["precision"] == 0
    # hand-checkable case, k = 1: real points 0 and 1 (radius 1 each); fake at 1.5 is inside, 3 is not
    two = metrics.precision_recall(torch.tensor([[0.0], [1.0]]), torch.tensor([[1.5], [3.0]]), k=1)
    assert two["precision"] == 0.5
    with pytest.raises(ValueError, match="more than 3 points"):
        metrics.precision_recall(real[:3], real)


# ---------------------------------------------------------------------------------------------
# KID and IS


def test_kernel_inception_distance_is_zero_for_one_distribution_and_positive_for_a_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 16, generator=g), torch.randn(500, 16, generator=g)
    same = metrics.kernel_inception_distance(a, b, subset_size=200, generator=g)
    assert abs(same["mean"]) < same["std"], same  # unbiased: 0 within its spread, at N = 200
    shifted = metrics.kernel_inception_distance(a, b + 0.5, subset_size=200, generator=g)
    assert shifted["mean"] > 10 * max(shifted["std"], same["std"]), shifted


@pytest.mark.filterwarnings("ignore:Metric `.*` will save all extracted features")
def test_kernel_inception_distance_equals_torchmetrics():
    from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd

    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 32, generator=g, dtype=torch.float64)
    b = 1.2 * torch.randn(300, 32, generator=g, dtype=torch.float64) + 0.1
    ours = metrics.kernel_inception_distance(a, b, subsets=1, subset_size=300)  # the whole sets: no randomness
    assert ours["mean"] == pytest.approx(poly_mmd(a, b).item(), rel=1e-10)
    # the metric class itself, fed features through an identity "feature extractor"; every subset is the whole set
    reference = KernelInceptionDistance(feature=nn.Identity(), subsets=3, subset_size=300)
    reference.update(a, real=True)
    reference.update(b, real=False)
    assert ours["mean"] == pytest.approx(reference.compute()[0].item(), rel=1e-10)
    with pytest.raises(ValueError, match="subset_size=1000"):
        metrics.kernel_inception_distance(a, b)


@pytest.mark.filterwarnings("ignore:Metric `.*` will save all extracted features")
@pytest.mark.filterwarnings("ignore:std... degrees of freedom")  # torchmetrics' IS at splits=1
def test_frechet_distance_and_inception_score_equal_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore

    g = torch.Generator().manual_seed(2)
    a = torch.randn(400, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    b = torch.randn(400, 8, generator=g, dtype=torch.float64) + 0.3
    identity = nn.Identity()
    identity.num_features = 8
    fid = FrechetInceptionDistance(feature=identity)
    fid.update(a, real=True)
    fid.update(b, real=False)
    assert metrics.frechet_distance(a, b) == pytest.approx(fid.compute().item(), rel=1e-6)
    logits = 3 * torch.randn(200, 10, generator=g, dtype=torch.float64)
    score = InceptionScore(feature=nn.Identity(), splits=1)
    score.update(logits)
    assert metrics.inception_score(logits, splits=1)["mean"] == pytest.approx(score.compute()[0].item(), rel=1e-10)
    assert metrics.inception_score(torch.zeros(100, 10))["mean"] == pytest.approx(1.0)  # no confident class: IS = 1


def test_confident_fraction():
    probs = torch.tensor([[0.95, 0.05], [0.5, 0.5], [0.1, 0.9], [0.2, 0.8]])
    assert metrics.confident_fraction(probs) == 0.5
    assert metrics.confident_fraction(probs, threshold=0.75) == 0.75


# ---------------------------------------------------------------------------------------------
# The shipped evaluator


def test_shipped_evaluator_classifies_heldout_shapes():
    accuracy = metrics.heldout_accuracy(num=500, seed=5)
    assert accuracy["kind"] >= 0.98 and accuracy["color"] >= 0.98, accuracy


def test_evaluate_shapes_real_images_reach_the_floor():
    images, _ = data.ShapesDataset(256, 32, seed=7).tensors()
    report = metrics.evaluate_shapes(images, num_reference=1000)
    assert report["confident_fraction"] >= 0.95 and report["real_confident_fraction"] >= 0.95
    assert report["frechet_distance_to_real"] < 1.5 * report["frechet_distance_floor"]
    assert sum(report["class_histogram"].values()) == pytest.approx(1.0, abs=1e-3)
    assert min(report["class_histogram"].values()) > 0.1  # five kinds, roughly uniform
    assert "not FID" in report["metric"]
    assert report["precision"] > 0.8 and report["recall"] > 0.8  # real images: close to the real-vs-real floor
    assert abs(report["precision"] - report["precision_floor"]) < 0.1
    assert abs(report["kernel_distance_to_real"]) < 3 * report["kernel_distance_to_real_std"]  # unbiased: about 0
    assert abs(report["kernel_distance_floor"]) < 3 * report["kernel_distance_floor_std"]
    assert "not KID" in report["kernel_metric"]


def test_evaluate_shapes_requested_kind_accuracy():
    dataset = data.ShapesDataset(64, 32, seed=7)
    images, kinds = dataset.tensors()
    assert metrics.evaluate_shapes(images, labels=kinds, num_reference=200)["requested_kind_accuracy"] == 1.0
    wrong = metrics.evaluate_shapes(images, labels=(kinds + 1) % 5, num_reference=200)
    assert wrong["requested_kind_accuracy"] < 0.05
    with pytest.raises(ValueError, match="requested classes"):
        metrics.evaluate_shapes(images, labels=kinds[:10], num_reference=200)


def test_evaluate_shapes_requested_kind_and_colour():
    """kind_color labels (class = kind * 7 + colour) are scored on both parts; a wrong colour alone is a miss."""
    dataset = data.ShapesDataset(64, 32, seed=7, label="kind_color")
    images, classes = dataset.tensors()
    right = metrics.evaluate_shapes(images, labels=classes, label="kind_color", num_reference=200)
    assert right["requested_kind_accuracy"] == right["requested_color_accuracy"] == 1.0
    assert right["requested_class_accuracy"] == 1.0
    kind, color = classes // 7, classes % 7
    wrong_color = metrics.evaluate_shapes(images, labels=kind * 7 + (color + 1) % 7, label="kind_color",
                                          num_reference=200)
    assert wrong_color["requested_kind_accuracy"] == 1.0
    assert wrong_color["requested_color_accuracy"] < 0.05 and wrong_color["requested_class_accuracy"] < 0.05
    colors_only = metrics.evaluate_shapes(images, labels=color, label="color", num_reference=200)
    assert colors_only["requested_color_accuracy"] == 1.0 and "requested_kind_accuracy" not in colors_only
    with pytest.raises(ValueError, match="not a shapes label"):
        metrics.evaluate_shapes(images, labels=classes, label="kind-color", num_reference=200)


def test_evaluate_shapes_noise_and_blank_images_score_badly():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(128, 3, 32, 32, generator=g).clamp(-1, 1)
    blank = torch.full((128, 3, 32, 32), -1.0)
    for images in (noise, blank):
        report = metrics.evaluate_shapes(images, num_reference=1000)
        assert report["confident_fraction"] <= 0.1
        assert report["frechet_distance_to_real"] > 10 * report["frechet_distance_floor"]
        assert report["kernel_distance_to_real"] > 10 * report["kernel_distance_to_real_std"]
        assert report["kernel_distance_to_real"] > 100 * abs(report["kernel_distance_floor"])


def test_evaluate_shapes_resizes_other_sizes_with_a_matching_reference():
    # 16x16 shapes are compared with 16x16 real shapes, both resized to 32x32 for the evaluator.
    images, _ = data.ShapesDataset(64, 16, seed=7).tensors()
    report = metrics.evaluate_shapes(images, num_reference=500)
    assert report["frechet_distance_to_real"] < 2 * report["frechet_distance_floor"]


def test_evaluator_save_load_round_trip_and_missing_file(tmp_path):
    model = metrics.ShapesEvaluator().eval()
    path = metrics.save_evaluator(model, tmp_path / "evaluator.safetensors", info={"note": "untrained"})
    loaded = metrics.load_evaluator(path)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded(x), model(x))
    assert metrics.evaluator_info(path) == {"note": "untrained"}
    with pytest.raises(FileNotFoundError, match="train-evaluator"):
        metrics.load_evaluator(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------
# Inception metrics (torchmetrics' Inception v3; its weights come from GitHub)


def test_inception_weights_are_looked_for_where_torch_fidelity_caches_them(tmp_path, monkeypatch):
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert metrics.INCEPTION_WEIGHTS_URL == URL_INCEPTION_V3
    assert metrics.inception_weights_path() == tmp_path / "hub" / "checkpoints" / metrics.INCEPTION_WEIGHTS_FILE
    wanted = []

    def offline(url, dst, *args, **kwargs):  # records where torch-fidelity would put the file, then fails offline
        wanted.append(dst)
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(urllib.error.URLError):
        FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    assert wanted == [str(metrics.inception_weights_path())]


def test_inception_metrics_offline_raise_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = []

    def offline(url, dst, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # never touch the network here
    images = torch.zeros(4, 3, 32, 32)
    with pytest.raises(metrics.InceptionWeightsUnavailable) as error:
        metrics.inception_metrics(images, images)
    message = str(error.value)
    assert isinstance(error.value, RuntimeError) and calls == [metrics.INCEPTION_WEIGHTS_URL]
    for needed in (metrics.INCEPTION_WEIGHTS_FILE, metrics.INCEPTION_WEIGHTS_URL,
                   str(tmp_path / "hub" / "checkpoints"), "TORCH_HOME", "name resolution"):
        assert needed in message, needed
    with pytest.raises(metrics.InceptionWeightsUnavailable, match="not asked"):
        metrics.load_inception(download=False)
    with pytest.raises(metrics.InceptionWeightsUnavailable, match="missing.pth"):
        metrics.load_inception(tmp_path / "missing.pth")
    assert len(calls) == 1


def test_inception_metrics_pipeline_with_random_weights(tmp_path, monkeypatch):
    # The real weights cannot be downloaded here: write randomly initialised ones where they are looked for,
    # which runs everything after the download (uint8 conversion, 299x299 resize, pool and logits, the metrics).
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    with monkeypatch.context() as patch:
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: None)
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None)
        torch.manual_seed(0)
        random_state = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    os.makedirs(metrics.inception_weights_path().parent)
    torch.save(random_state, metrics.inception_weights_path())
    real, _ = data.ShapesDataset(8, 32, seed=1).tensors()
    fake = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    report = metrics.inception_metrics(real, fake, splits=2, device="cpu")
    assert report["num_real"] == report["num_fake"] == 8
    for key in ("fid", "inception_score", "kid", "precision", "recall"):
        assert math.isfinite(report[key]), (key, report)
    assert report["fid"] > 0 and report["inception_score"] >= 1


# ---------------------------------------------------------------------------------------------
# Training the evaluator: its objective, through the one training loop (train.train)


def test_evaluator_objective_is_cross_entropy_plus_the_outliers_cross_entropy_to_uniform():
    y = torch.tensor([0, 5, 34])
    shapes_logits = 3.0 * nn.functional.one_hot(y, 35).float()
    outlier_logits = torch.zeros(2, 35)
    outlier_logits[1, 0] = 2.0  # a confident outlier costs more than the uniform one
    seen = {}

    def model(x):
        seen["x"] = x
        return torch.cat([shapes_logits, outlier_logits])

    x0 = torch.rand(3, 3, 32, 32) * 2 - 1
    torch.manual_seed(7)
    losses = metrics.evaluator_objective(num_outliers=2)(model, x0, y, None, None)  # t and noise unused
    cross_entropy = math.log(math.exp(3) + 34) - 3  # -log softmax([3, 0, ..., 0])_0
    # -mean_c log softmax(row)_c: ln 35 for the uniform row, log(e^2 + 34) - 2/35 for the other; mean over rows
    uniform = (math.log(35) + math.log(math.exp(2) + 34) - 2 / 35) / 2
    torch.testing.assert_close(losses, torch.full((3,), cross_entropy + uniform))
    # the model saw the batch, then 2 outliers drawn from the global RNG (the loop seeds it every step)
    assert seen["x"].shape == (5, 3, 32, 32) and torch.equal(seen["x"][:3], x0)
    assert seen["x"].min() >= -1 and seen["x"].max() <= 1
    torch.manual_seed(7)
    torch.testing.assert_close(seen["x"][3:], metrics._outliers(2))
    # without outliers: the plain cross-entropy
    torch.testing.assert_close(metrics.evaluator_objective(0)(lambda x: shapes_logits, x0, y, None, None),
                               torch.full((3,), cross_entropy))
    with pytest.raises(ValueError, match="labelled"):
        metrics.evaluator_objective()(model, x0, None, None, None)


def test_train_evaluator_trains_through_the_one_loop(monkeypatch):
    """train_evaluator is a recipe for train.train: one call with a ShapesEvaluator, kind x colour shapes and
    the evaluator objective. 60 steps on 512 shapes take the training cross-entropy from ln 35 = 3.56 to 2.07
    (measured, 3.5 s); a loop that did not train would leave it at 3.56."""
    from minildm import train

    calls = []
    real_train = train.train

    def spy(config, **kwargs):
        calls.append((config, kwargs))
        return real_train(config, **kwargs)

    monkeypatch.setattr(train, "train", spy)
    torch.manual_seed(0)
    initial = metrics.ShapesEvaluator()  # train_evaluator's initialisation: seeded by `seed`
    model = metrics.train_evaluator(num_samples=512, steps=60, batch_size=32, num_outliers=8)
    (config, kwargs), = calls
    assert isinstance(kwargs["model"], metrics.ShapesEvaluator) and kwargs["dataset"].label == "kind_color"
    assert config.train.max_steps == 60 and config.train.lr_schedule == "cosine" and config.train.save_every == 0
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    images, labels = data.ShapesDataset(512, 32, seed=0, label="kind_color").tensors()
    with torch.no_grad():
        before = nn.functional.cross_entropy(initial(images), labels).item()
        after = nn.functional.cross_entropy(model(images), labels).item()
    assert before > 3.4 and after < 2.6


def test_score_reads_the_classes_a_checkpoint_was_trained_on(capsys):
    # ddpm-shapes-cond-kind-color takes class = kind * 7 + colour: `score` asks for i mod 35 and scores kind and colour
    path = CHECKPOINTS / "ddpm-shapes-cond-kind-color.safetensors"
    assert metrics.main(["score", str(path), "--num", "4", "--batch-size", "4", "--steps", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"requested_kind_accuracy", "requested_color_accuracy", "requested_class_accuracy"} <= set(report)
