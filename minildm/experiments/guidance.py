"""Guidance in small: fidelity against diversity as the guidance scale grows (ADM Sec. 4 and Fig. 4; Ho &
Salimans 2021, Fig. 2 and Tab. 1).

Sweeps on the shipped shapes checkpoints. Every scale draws the same N samples (the same x_T, labels
cycling over the 5 kinds), scored with `metrics.evaluate_shapes`: requested-kind accuracy (fidelity to
the requested class), precision (fidelity to the data), recall (diversity), the Fréchet and kernel
distances on shapes-evaluator features (not FID / KID: not Inception features).

- ``classifier``: ddpm-shapes (unconditional) guided by shapes-classifier with scale s (0 = no guidance);
  sampler ddim applies it on eps (ADM Algorithm 2), ddpm on the mean (Algorithm 1).
- ``free``: ddpm-shapes-cond with classifier-free guidance w (1 = no guidance, 0 = unconditional).
- ``classifier-cond``: ADM-G proper, the class-conditional ddpm-shapes-cond (asked for the same kind) guided by
  shapes-classifier with scale s (ADM's Tab. 4 guides its conditional models so).
- ``classifier-kind-color``: ddpm-shapes guided by shapes-classifier-kind-color towards one of the 35 classes
  kind x colour (sample i asks for class i mod 35), scored on kind and colour (`requested_class_accuracy`).
- ``free-kind-color``: ddpm-shapes-cond-kind-color (conditioned on the 35 classes) with classifier-free guidance w.

    python -m minildm.experiments.guidance classifier --sampler ddim --scales 0,1,2,4,8 --num 500 \\
        --out data/results/guidance_classifier_ddim.json
    python -m minildm.experiments.guidance free --scales 0,1,1.5,2,3,5 --num 500 \\
        --out data/results/guidance_free_ddim.json
    python -m minildm.experiments.guidance classifier-kind-color --scales 0,1,2,4,8,16,32 --num 525 \\
        --batch-size 105 --steps 25 --out data/results/guidance_classifier_kind_color_ddim25.json

The chapter draws the results with `plot_sweeps(reports)`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import minildm
from minildm import checkpoints, metrics

CHECKPOINTS = Path(__file__).resolve().parents[2] / "data" / "checkpoints"
MODELS = {"classifier": "ddpm-shapes", "free": "ddpm-shapes-cond", "classifier-cond": "ddpm-shapes-cond",
          "classifier-kind-color": "ddpm-shapes", "free-kind-color": "ddpm-shapes-cond-kind-color"}
CLASSIFIERS = {"classifier": "shapes-classifier", "classifier-cond": "shapes-classifier",
               "classifier-kind-color": "shapes-classifier-kind-color"}
# the classes a sweep asks for, as `evaluate_shapes`'s label (the others: "kind")
LABELS = {"classifier-kind-color": "kind_color", "free-kind-color": "kind_color"}
METRICS = ("requested_kind_accuracy", "requested_class_accuracy", "precision", "recall", "frechet_distance_to_real",
           "kernel_distance_to_real", "confident_fraction")
CLAIMS = {
    "classifier": "ADM Sec. 4.3, Fig. 4 / Tab. 4: raising the classifier scale trades diversity (recall) for "
                  "fidelity (precision, and how often the sample is the requested class).",
    "free": "Ho & Salimans 2021 (Fig. 2, Tab. 1) / GLIDE: classifier-free guidance makes the same trade with no "
            "classifier: precision and class fidelity rise and recall falls as w grows above 1.",
    "classifier-cond": "ADM Tab. 4: classifier guidance of the class-conditional model also trades recall for "
                       "precision as the scale grows (its best FIDs come from guiding the conditional model).",
    "free-kind-color": "Ho & Salimans 2021 (Fig. 2, Tab. 1), with a condition that fixes kind and colour: "
                       "precision and class fidelity rise and recall falls as w grows above 1.",
    "classifier-kind-color": "ADM Sec. 4.3, Fig. 4 / Tab. 4, with fine-grained classes as ImageNet's: raising the "
                             "classifier scale trades diversity (recall) for fidelity (precision, requested class).",
}


def load_shipped(name: str, folder=None):
    """(EMA network in eval mode, config) of a shipped checkpoint, e.g. "ddpm-shapes" or "shapes-classifier"."""
    path = Path(folder or CHECKPOINTS) / f"{name}.safetensors"
    loaded = checkpoints.load(path)
    network = loaded.ema if loaded.ema is not None else loaded.model
    return network.eval().requires_grad_(False), loaded.config


def sample(method: str, scale: float, num: int, *, sampler="ddim", steps=50, seed=0, batch_size=100,
           models=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [num, 3, 32, 32], requested classes [num]) for one row of a sweep.

    Sample i asks for class i mod the number of classes (the 5 kinds; the 35 kind x colour classes in the
    *-kind-color sweeps); batch b is drawn with seed `seed + b`, so every scale starts from the same noise.
    models: {"model": (net, config), "classifier": (net, config)} to reuse loaded networks.
    """
    models = models or {}
    model, config = models.get("model") or load_shipped(MODELS[method])
    guided = {"guidance_scale": scale} if method not in CLASSIFIERS else \
        {"classifier": (models.get("classifier") or load_shipped(CLASSIFIERS[method]))[0], "classifier_scale": scale}
    # classifier-cond: the conditional model is asked for the same kind y the classifier guides towards
    return metrics.sample_for_scoring(model, config, num, batch_size=batch_size, sampler=sampler, steps=steps,
                                      seed=seed, **guided)


def sweep(method: str, scales, *, num=500, sampler="ddim", steps=50, seed=0, batch_size=100, verbose=True) -> dict:
    """One row per scale: the `evaluate_shapes` figures of `METRICS` (and their real-data floors), seconds."""
    if method not in MODELS:
        raise ValueError(f"unknown method {method!r}; use {' or '.join(MODELS)}")
    classifier, label = CLASSIFIERS.get(method), LABELS.get(method, "kind")
    models = {"model": load_shipped(MODELS[method])}
    if classifier:
        models["classifier"] = load_shipped(classifier)
    rows = []
    for scale in scales:
        start = time.perf_counter()
        images, labels = sample(method, scale, num, sampler=sampler, steps=steps, seed=seed, batch_size=batch_size,
                                models=models)
        seconds = time.perf_counter() - start
        report = metrics.evaluate_shapes(images, labels=labels, label=label)
        row = {"scale": scale, "seconds": round(seconds, 1), **{key: report[key] for key in METRICS},
               "precision_floor": report["precision_floor"], "recall_floor": report["recall_floor"],
               "frechet_distance_floor": report["frechet_distance_floor"]}
        rows.append(row)
        if verbose:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return {"method": method, "model": MODELS[method], "classifier": classifier,
            "label": label, "sampler": sampler, "steps": steps, "num": num, "seed": seed,
            "claim": CLAIMS[method], "scale_convention": "classifier scale s: 0 = none" if classifier
            else "classifier-free w: 1 = none, 0 = unconditional",
            "metric": report["metric"], "rows": rows,
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}"}


def implicit_classifier(num: int = 200, timesteps=(50, 150, 300, 500, 700, 900), *, seed: int = 0) -> list[dict]:
    """How alike are ddpm-shapes-cond's implicit classifier and shapes-classifier? One row per t.

    On held-out shapes x0 (data seed 1) with their kinds y, at x_t = q_sample(x0, t):
      implicit  g_imp = -(eps(x_t, y) - eps(x_t, null)) / sqrt(1 - a_t)   (what classifier-free guidance scales)
      explicit  g_cls = ∇_x log p_phi(y | x_t, t)                          (what classifier guidance scales)
    Returns per t: the mean cosine similarity of the two per image, and the ratio of their mean norms
    |g_imp| / |g_cls|: classifier-free w moves eps like classifier guidance with s ≈ w · ratio would, when the
    two point the same way (`minildm.guidance`, scale conventions).
    """
    from minildm import data, guidance

    model, config = load_shipped(MODELS["free"])
    classifier, _ = load_shipped(CLASSIFIERS["classifier"])
    diffusion = minildm.build_diffusion(config)
    images, kinds = data.ShapesDataset(num, config.unet.image_size, seed=1).tensors()
    generator = torch.Generator().manual_seed(seed)
    gradient = guidance.classifier_gradient(classifier, 1.0)
    null = guidance.null_labels(num, config.unet.num_classes)
    rows = []
    for step in timesteps:
        t = torch.full((num,), step)
        x_t = diffusion.q_sample(images, t, torch.randn(images.shape, generator=generator))
        with torch.no_grad():
            eps_cond, eps_null = model(x_t, t, y=kinds), model(x_t, t, y=null)
        implicit = -(eps_cond - eps_null).flatten(1) / (1 - diffusion.alpha_bar[step]) ** 0.5
        explicit = gradient(x_t, t, y=kinds).flatten(1)
        cosine = torch.nn.functional.cosine_similarity(implicit, explicit, dim=1)
        rows.append({"t": step, "cosine": round(cosine.mean().item(), 4),
                     "norm_ratio": round((implicit.norm(dim=1).mean() / explicit.norm(dim=1).mean()).item(), 4)})
    return rows


def combine_seeds(reports) -> dict:
    """One report from sweeps of the same scales with different seeds: each metric's mean, and its standard
    deviation over the seeds as `<metric>_sd` (0 for a single seed); `num_seeds` says how many."""
    reports = reports if isinstance(reports, (list, tuple)) else [reports]
    scales = [row["scale"] for row in reports[0]["rows"]]
    if any([row["scale"] for row in report["rows"]] != scales for report in reports):
        raise ValueError("the sweeps to combine must have the same scales")

    rows = []
    for i, scale in enumerate(scales):
        row = {"scale": scale}
        for key in METRICS:
            values = torch.tensor([report["rows"][i][key] for report in reports], dtype=torch.float64)
            row[key] = values.mean().item()
            row[f"{key}_sd"] = values.std().item() if len(values) > 1 else 0.0
        rows.append(row)
    return {**reports[0], "rows": rows, "num_seeds": len(reports), "seeds": [report["seed"] for report in reports]}


def plot_sweeps(reports: dict, axes=None):
    """Requested-class accuracy, precision and recall against the scale, one line per sweep; returns the figure.

    reports: {label: sweep report, or a list of the same sweep with different seeds (drawn as the mean with
    error bars of ± one standard deviation over the seeds; one seed: no bars)}. The requested class is the kind,
    or kind and colour for classifier-kind-color. Classifier scales s and classifier-free w - 1 share the x axis
    (the same strength on the model's own classifier, `minildm.guidance`).
    """
    import matplotlib.pyplot as plt

    if axes is None:
        figure, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    figure, ticks = axes[0].figure, set()
    for label, report in reports.items():
        report = combine_seeds(report)
        shift = 1 if report["method"].startswith("free") else 0
        x = [row["scale"] - shift for row in report["rows"]]
        ticks.update(x)
        if report["num_seeds"] > 1:
            label = f"{label} ({report['num_seeds']} seeds)"
        for axis, key in zip(axes, ("requested_class_accuracy", "precision", "recall")):
            spread = [row[f"{key}_sd"] for row in report["rows"]] if report["num_seeds"] > 1 else None
            axis.errorbar(x, [row[key] for row in report["rows"]], yerr=spread, fmt="o-", capsize=3, markersize=4,
                          label=label)
    titles = ("requested class (fidelity to y)", "precision (fidelity)", "recall (diversity)")
    ticks = sorted(x for x in ticks if x == int(x))
    for axis, title in zip(axes, titles):
        axis.set_xscale("symlog", linthresh=1, linscale=0.5)  # scales 0, 1, 2, 4, ... 32 spread evenly
        axis.set_xticks(ticks, [f"{x:g}" for x in ticks])
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("classifier scale s  /  classifier-free w - 1")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    return figure


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m minildm.experiments.guidance", description=__doc__.split("\n")[0])
    parser.add_argument("method", choices=sorted(MODELS))
    parser.add_argument("--scales", required=True, help="comma-separated scales, e.g. 0,1,2,4,8")
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--num", type=int, default=500, help="samples per scale (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args(argv)
    scales = [float(s) for s in args.scales.split(",")]
    report = sweep(args.method, scales, num=args.num, sampler=args.sampler, steps=args.steps, seed=args.seed,
                   batch_size=args.batch_size)
    report["command"] = "python -m minildm.experiments.guidance " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
