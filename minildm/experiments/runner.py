"""What the paper-claim experiments share: one small base, training through `train.train`, scoring, statistics.

An experiment is a table of rows. A row names a variant (an override list of `BASE`) and how to evaluate
it (sampler, steps, variance, bits/dim); `run` trains every variant once per seed — each for a fixed
number of steps, through the package's training loop `train.train` — evaluates every row, and returns
per-seed results with mean ± standard error over seeds and the difference to a reference row paired by
seed (same data order, t, noise and sampling noise). Trained EMA weights and evaluations are cached in
`cache_dir` (default runs/experiments, git-ignored) keyed by the config's non-default values and the step
count, so experiments that share a model (the DDPM base is a row of all four) train it once.

Sample quality is `minildm.metrics.evaluate_shapes` (shapes-evaluator features, not FID); the likelihood
is the variational bound in bits/dim on held-out images: of the T-step chain (`bound_bits_per_dim`) or of the
respaced chain that was sampled (`GaussianDiffusion.bits_per_dim` with its timesteps).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import minildm
from minildm import config as config_lib
from minildm import data, presets, schedules, train
from minildm.layers import count_parameters

# The base: 16x16 shapes, a DDPM-style UNet of widths 16/32/32 (one res block per level, attention at 8x8
# with one head, strided-conv resampling, time embedding added), GroupNorm with 8 groups, T = 1000 linear
# betas, eps prediction, L_simple, sigma^2 = beta. Small enough for a few hundred steps per CPU minute.
BASE_PRESET = "toy-shapes"
BASE = [
    "unet.channels=16", "unet.channel_mult=1,2,2", "unet.num_res_blocks=1",
    "unet.attention_resolutions=8", "unet.num_heads=1", "unet.num_head_channels=-1",
    "unet.resblock_updown=false", "unet.use_scale_shift_norm=false", "unet.dropout=0.0",
    "diffusion.beta_schedule=linear", "diffusion.model_mean_type=eps", "diffusion.model_var_type=fixed_large",
    "diffusion.loss_type=simple", "diffusion.snr_gamma=0",
    "train.batch_size=16", "train.lr=1e-3", "train.warmup_steps=50", "train.ema_decay=0.995",
    "train.save_every=0", "train.sample_every=0", "train.log_every=0",
]
CACHE_DIR = Path("runs") / "experiments"
QUALITY_KEYS = ("confident_fraction", "frechet_distance_to_real", "frechet_distance_floor", "precision", "recall",
                "precision_floor", "recall_floor", "real_confident_fraction")
# Metrics compared with the reference row.
COMPARED = ("frechet_distance_to_real", "confident_fraction", "precision", "recall", "bits_per_dim", "heldout_loss")
HELDOUT_LOSS_IMAGES = 512
SEPARATION = "separated: |mean paired difference| > 2 standard errors (a lenient test with 2-3 seeds)"


def make_config(overrides=(), *, base=BASE):
    """The config of one variant: `BASE_PRESET` with `base` then `overrides` applied (`config.override` syntax)."""
    return config_lib.override(presets.get(BASE_PRESET), list(base) + list(overrides))


@dataclass
class Row:
    """One line of an experiment's table: a variant and how it is evaluated.

    sampler/steps/variance: how the samples are drawn ("ddim" or "ddpm" = ancestral, respaced to `steps`;
    variance overrides diffusion.model_var_type at sampling time, e.g. "fixed_small" for sigma^2 = beta~).
    bits: None, "bound" (the T-step bound, `bound_bits_per_dim`) or "chain" (the bound of the respaced
    `steps`-step chain that was sampled, `diffusion.bits_per_dim` with its timesteps). reference: the row it
    is compared with. heldout_loss: also report `heldout_loss` (comparable between rows of one schedule and
    one prediction target only).
    """

    name: str
    variant: str
    overrides: list = field(default_factory=list)
    sampler: str = "ddim"
    steps: int = 20
    variance: str | None = None
    bits: str | None = None
    reference: str | None = None
    heldout_loss: bool = False


@dataclass
class Settings:
    """The sizes of a run (the CLI's common arguments)."""

    seeds: tuple = (0, 1, 2)
    train_steps: int = 300
    num_samples: int = 256
    bpd_images: int = 32
    bpd_terms: int = 100
    extra: tuple = ()  # overrides applied to every variant (e.g. a larger image size)
    cache_dir: Path | None = CACHE_DIR
    device: torch.device | None = None  # where models train and are evaluated (None: CUDA if available, else CPU)


def resolve_device(name=None) -> torch.device:
    """`name` as a torch.device; None or "": CUDA when available, else the CPU (as `train.train` chooses)."""
    return torch.device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------
# Training (through train.train), with a cache of EMA weights


@dataclass
class Trained:
    """A trained variant: its key (hash of config and steps), config, EMA network (eval) and training record."""

    key: str
    config: object
    ema: torch.nn.Module
    record: dict


def model_key(config, steps: int) -> str:
    """A short hash of what determines the trained weights: the config's non-default values and the step count.

    Only values that differ from `config.Config()`'s defaults enter, so a new config field (with a default)
    keeps the cache valid; after changing the package's code or defaults, delete the cache.
    """
    default, current = config_lib.to_dict(config_lib.Config()), config_lib.to_dict(config)
    changed = {}
    for section, values in current.items():
        if isinstance(values, dict):
            values = {k: v for k, v in values.items() if default.get(section, {}).get(k, object()) != v}
            if values:
                changed[section] = values
        elif default.get(section) != values:
            changed[section] = values
    text = json.dumps({"config": changed, "steps": int(steps)}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


_TRAINING_DATA = {}


def _training_data(data_config):
    """The training set of a `DataConfig`, built once per process (rendering 10,000 shapes takes a while)."""
    key = repr(data_config)
    if key not in _TRAINING_DATA:
        _TRAINING_DATA.clear()
        _TRAINING_DATA[key] = data.build_dataset(data_config, train=True)
    return _TRAINING_DATA[key]


def train_model(config, steps: int, *, cache_dir=CACHE_DIR, log_every: int = 25, device=None) -> Trained:
    """Train `config`'s model for `steps` steps with `train.train` (or load it from `cache_dir`); EMA weights on
    `device` (`resolve_device`; the cache is keyed by config and steps, not by the device it was trained on).

    record: params, steps, train_cpu_s (process time of the training call, one thread), final_loss (mean of
    the last 50 steps' L), loss_curve (mean loss per `log_every` steps) and from_cache.
    """
    key, device = model_key(config, steps), resolve_device(device)
    path = Path(cache_dir) / f"{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True, map_location="cpu")
        ema = minildm.build_model(config)
        ema.load_state_dict(saved["ema"])
        return Trained(key, config, ema.to(device).eval().requires_grad_(False),
                       {**saved["record"], "from_cache": True})
    losses = []
    start = time.process_time()
    _, ema = train.train(config, dataset=_training_data(config.data), max_steps=steps,
                         out_dir=Path(cache_dir or CACHE_DIR) / key, resume=False, verbose=False, device=device,
                         callback=lambda step, loss: losses.append(loss))
    cpu_s = time.process_time() - start
    curve = [float(np.mean(losses[i:i + log_every])) for i in range(0, len(losses), log_every)]
    record = {"params": count_parameters(ema), "steps": len(losses), "train_cpu_s": round(cpu_s, 2),
              "final_loss": round(float(np.mean(losses[-50:])), 5) if losses else None,
              "loss_curve": {"step": [min(i + log_every, len(losses)) for i in range(0, len(losses), log_every)],
                             "loss": [round(v, 5) for v in curve]}}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"ema": ema.state_dict(), "record": record}, path)
    return Trained(key, config, ema, {**record, "from_cache": False})


# ---------------------------------------------------------------------------------------------
# Evaluation: samples scored by the shapes evaluator, bits/dim on held-out images


def _cached(cache_dir, name: str, compute):
    """compute() once per (cache_dir, name); results are small dicts saved with torch.save."""
    path = Path(cache_dir) / name if cache_dir else None
    if path is not None and path.is_file():
        return torch.load(path, weights_only=True)
    result = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, path)
    return result


def sampling_process(model: Trained, variance: str | None = None):
    """The process a row samples with: the model's own, or with diffusion.model_var_type = `variance`."""
    config = model.config
    if variance is not None:
        config = config_lib.override(config, [f"diffusion.model_var_type={variance}"])
    return minildm.build_diffusion(config)


def to_uint8(samples: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 [0, 255] (what is stored and scored, like the 8-bit real data)."""
    return ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def sample_and_score(model: Trained, row: Row, num_samples: int, *, seed: int = 0, cache_dir=CACHE_DIR) -> dict:
    """`num_samples` samples of the row's sampler, scored by `metrics.evaluate_shapes`: dict(samples, quality, cpu_s).

    The sampling noise is the same for every variant (`seed`), so paired differences see the same x_T.
    """
    from minildm import metrics

    name = f"{model.key}-{row.sampler}{row.steps}-{row.variance or 'own'}-n{num_samples}-seed{seed}.pt"

    def compute():
        diffusion = sampling_process(model, row.variance)
        start = time.process_time()
        samples = train.generate(model.ema, diffusion, model.config, num_samples, sampler=row.sampler,
                                 steps=row.steps, seed=seed, batch_size=256)
        images = to_uint8(samples.cpu())
        cpu_s = time.process_time() - start
        scores = metrics.evaluate_shapes(images.float() / 127.5 - 1)
        return {"samples": images, "cpu_s": round(cpu_s, 2),
                "quality": {key: round(float(scores[key]), 4) for key in QUALITY_KEYS}}

    return _cached(cache_dir, name, compute)


@functools.lru_cache(maxsize=2)
def held_out_images(num: int, image_size: int) -> torch.Tensor:
    """`num` held-out shapes [num, 3, H, W] (data seed 1, never trained on), on the 8-bit grid of [-1, 1]."""
    return data.ShapesDataset(num, image_size, seed=1).tensors()[0]


@torch.no_grad()
def bound_bits_per_dim(model, diffusion, x0: torch.Tensor, num_terms: int | None = None, *, seed: int = 0) -> dict:
    """The T-step variational bound in bits/dim (Ho et al. 2020, Eq. 5), its sum over t estimated from `num_terms`.

    L = L_T + L_0 + sum_{t=1}^{T-1} L_t: L_T and the decoder term L_0 exactly; the T-1 KL terms by stratified
    sampling — [1, T) cut into `num_terms` equal strata, one t drawn uniformly in each (numpy seed `seed`),
    its term weighted by the stratum's size: an unbiased estimate that needs num_terms + 1 network calls
    instead of T. num_terms=None (or >= T-1) takes every term: then it equals `diffusion.bits_per_dim`
    (the same noise draws for the same `seed`). Returns dict(total_bpd [N], timesteps, weights).
    """
    T = diffusion.num_timesteps
    if num_terms is None or num_terms >= T - 1:
        picks, weights = np.arange(1, T), np.ones(T - 1)
    else:
        edges = np.linspace(1, T, num_terms + 1).round().astype(np.int64)
        sizes = np.diff(edges)
        picks = edges[:-1] + (np.random.default_rng(seed).random(num_terms) * sizes).astype(np.int64)
        weights = sizes.astype(np.float64)
    timesteps, weights = np.concatenate([[0], picks]), np.concatenate([[1.0], weights])
    generator = torch.Generator(x0.device).manual_seed(seed)
    n, total = x0.shape[0], torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
    for t_value, weight in zip(timesteps[::-1], weights[::-1]):  # last to first, as bits_per_dim draws its noise
        t = torch.full((n,), int(t_value), dtype=torch.long, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = diffusion.q_sample(x0, t, noise)
        term = diffusion.vb_terms_bpd(model(x_t, t), x0, x_t, t, clip_denoised=True)
        total += weight * term.double()
    total += diffusion.prior_bpd(x0).double()
    return {"total_bpd": total, "timesteps": timesteps.tolist(), "weights": weights.tolist()}


@torch.no_grad()
def heldout_loss(model, diffusion, x0: torch.Tensor, *, seed: int = 0) -> float:
    """The training loss (the mean-target MSE of `training_losses`, L_simple for eps) on held-out images x0 [N, ...].

    Image i is noised at t_i, N values spread evenly over [0, T), with noise drawn from `seed`: every model
    sees the same (x0, t, noise), so differences between models are not sampling noise of t.
    """
    t = torch.from_numpy(np.linspace(0, diffusion.num_timesteps - 1, len(x0)).round().astype(np.int64))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device  # the same numbers on any device: drawn on the CPU, then moved
    x0, t, noise = x0.to(device), t.to(device), noise.to(device)
    return diffusion.training_losses(model, x0, t, noise=noise, with_vb=False)["mse"].mean().item()


def model_bits_per_dim(model: Trained, row: Row, settings: Settings, *, seed: int = 0) -> float | None:
    """The row's bits/dim on `settings.bpd_images` held-out images: the T-step bound or the sampled chain's."""
    if row.bits is None:
        return None
    diffusion = sampling_process(model, row.variance)
    x0 = held_out_images(settings.bpd_images, model.config.data.image_size).to(next(model.ema.parameters()).device)
    if row.bits == "bound":
        name = f"{model.key}-bound{settings.bpd_terms}-{row.variance or 'own'}-n{len(x0)}-seed{seed}.pt"
        compute = lambda: {"bpd": bound_bits_per_dim(model.ema, diffusion, x0, settings.bpd_terms,  # noqa: E731
                                                     seed=seed)["total_bpd"].mean().item()}
    elif row.bits == "chain":
        name = f"{model.key}-chain{row.steps}-{row.variance or 'own'}-n{len(x0)}-seed{seed}.pt"
        timesteps = schedules.space_timesteps(diffusion.num_timesteps, str(row.steps))
        compute = lambda: {"bpd": diffusion.bits_per_dim(  # noqa: E731
            model.ema, x0, timesteps=timesteps,
            generator=torch.Generator(x0.device).manual_seed(seed))["total_bpd"].mean().item()}
    else:
        raise ValueError(f"row {row.name!r}: bits={row.bits!r}; use None, 'bound' or 'chain'")
    return round(_cached(settings.cache_dir, name, compute)["bpd"], 4)


# ---------------------------------------------------------------------------------------------
# Statistics over seeds


def mean_stderr(values) -> dict:
    """dict(mean, stderr, n) of a list of numbers; stderr = sample standard deviation / sqrt(n), None for n < 2."""
    values = [float(v) for v in values if v is not None]
    n = len(values)
    if n == 0:
        return {"mean": None, "stderr": None, "n": 0}
    mean = sum(values) / n
    stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None
    return {"mean": mean, "stderr": stderr, "n": n}


def paired_difference(values: dict, reference: dict) -> dict:
    """mean_stderr of values[seed] - reference[seed] over the seeds both have, with `separated` (> 2 SE)."""
    seeds = [s for s in values if s in reference and values[s] is not None and reference[s] is not None]
    summary = mean_stderr([values[s] - reference[s] for s in seeds])
    summary["separated"] = bool(summary["stderr"] is not None and abs(summary["mean"]) > 2 * summary["stderr"])
    return summary


def aggregate(per_seed: list[dict], keys) -> dict:
    """{key: mean_stderr over the per-seed entries} for the keys present in them."""
    return {key: mean_stderr([entry.get(key) for entry in per_seed])
            for key in keys if any(entry.get(key) is not None for entry in per_seed)}


def _rounded(value, digits: int = 5):
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return round(value, digits) if isinstance(value, float) else value


# ---------------------------------------------------------------------------------------------
# The loop over seeds and rows


def run(rows: list[Row], settings: Settings, *, on_result=None, log=print) -> dict:
    """Train and evaluate every row for every seed (seed by seed, so a run cut short has whole seeds).

    Returns dict(models, results): models[key] is each trained network's record (variant, seed, overrides,
    params, steps, train CPU s, loss curve); results[row.name] holds the row's settings, its per-seed
    entries, their `aggregate` (mean ± standard error) and `vs_reference` (paired by seed).
    on_result(partial) is called after every evaluated (seed, row).
    """
    models, per_seed, trained = {}, {row.name: [] for row in rows}, {}
    for seed in settings.seeds:
        for row in rows:
            config = make_config(list(row.overrides) + list(settings.extra) + [f"train.seed={seed}"])
            key = model_key(config, settings.train_steps)
            if key not in trained:
                trained[key] = train_model(config, settings.train_steps, cache_dir=settings.cache_dir,
                                           device=settings.device)
                model = trained[key]
                models[key] = {"variant": row.variant, "seed": seed, "overrides": list(row.overrides), **model.record}
                log(f"seed {seed} {row.variant:>24}: {model.record['params']:,} params, {model.record['steps']} steps "
                    f"in {model.record['train_cpu_s']:.0f} CPU s{' (cached)' if model.record['from_cache'] else ''}, "
                    f"final loss {model.record['final_loss']}")
            model = trained[key]
            scored = sample_and_score(model, row, settings.num_samples, cache_dir=settings.cache_dir)
            entry = {"seed": seed, "model": key, "steps": model.record["steps"],
                     "train_cpu_s": model.record["train_cpu_s"], "final_loss": model.record["final_loss"],
                     "sample_cpu_s": scored["cpu_s"], **scored["quality"],
                     "bits_per_dim": model_bits_per_dim(model, row, settings)}
            if row.heldout_loss:
                x0 = held_out_images(HELDOUT_LOSS_IMAGES, config.data.image_size)
                entry["heldout_loss"] = round(_cached(settings.cache_dir, f"{key}-heldout{len(x0)}.pt", lambda: {
                    "loss": heldout_loss(model.ema, minildm.build_diffusion(config), x0)})["loss"], 6)
            per_seed[row.name].append(entry)
            log(f"seed {seed} {row.name:>36}: confident {entry['confident_fraction']:.3f}, Fréchet "
                f"{entry['frechet_distance_to_real']:.1f} (floor {entry['frechet_distance_floor']:.1f}), precision "
                f"{entry['precision']:.3f}, recall {entry['recall']:.3f}, bits/dim {entry['bits_per_dim']}")
            if on_result is not None:
                on_result(summarise(rows, models, per_seed))
    return summarise(rows, models, per_seed)


def summarise(rows: list[Row], models: dict, per_seed: dict) -> dict:
    """The report's `models` and `results` from the per-seed entries gathered so far."""
    keys = ("train_cpu_s", "final_loss", "sample_cpu_s", *QUALITY_KEYS, "bits_per_dim", "heldout_loss")
    results = {}
    for row in rows:
        entries = per_seed[row.name]
        params = {models[e["model"]]["params"] for e in entries}
        result = {"variant": row.variant, "overrides": list(row.overrides), "sampler": row.sampler,
                  "sampling_steps": row.steps, "variance": row.variance or "the model's own", "bits": row.bits,
                  "params": params.pop() if len(params) == 1 else sorted(params),
                  "per_seed": entries, "aggregate": aggregate(entries, keys)}
        if row.reference is not None and row.reference != row.name:
            reference = {e["seed"]: e for e in per_seed.get(row.reference, [])}
            mine = {e["seed"]: e for e in entries}
            result["vs_reference"] = {"reference": row.reference, **{
                key: paired_difference({s: e.get(key) for s, e in mine.items()},
                                       {s: e.get(key) for s, e in reference.items()})
                for key in COMPARED if any(e.get(key) is not None for e in entries)}}
        results[row.name] = result
    return _rounded({"models": models, "results": results})


# ---------------------------------------------------------------------------------------------
# Reports: the JSON written to data/results, the sample grid


def machine_note(device=None) -> str:
    """Where the numbers were measured: CPU, cores, threads, load at the start, the GPU if one was used, library
    versions (no paths)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    device = torch.device(device or "cpu")
    gpu = f", {device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), {torch.get_num_threads()} torch "
            f"thread(s), load average {load:.1f} at the start{gpu}, python {platform.python_version()}, "
            f"torch {torch.__version__}, minildm {minildm.__version__}")


def add_arguments(parser, *, seeds: str = "0,1,2", train_steps: int = 300) -> None:
    """The CLI arguments every experiment shares (sizes, cache, output)."""
    parser.add_argument("--seeds", default=seeds, help="training seeds (train.seed), comma-separated")
    parser.add_argument("--train-steps", type=int, default=train_steps, help="training steps of every model")
    parser.add_argument("--num-samples", type=int, default=256, help="samples scored per model and sampler")
    parser.add_argument("--bpd-images", type=int, default=32, help="held-out images for bits/dim")
    parser.add_argument("--bpd-terms", type=int, default=100,
                        help="KL terms of the T-step bound evaluated (stratified); 0: all T")
    parser.add_argument("--variants", default="", help="comma-separated subset of the rows (default: all)")
    parser.add_argument("--extra", default="", help="overrides for every variant, e.g. 'unet.channels=32 ...'")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="", help="where models train and are evaluated, e.g. cpu, cuda, cuda:1 "
                                                     "(default: CUDA when available, else the CPU)")
    parser.add_argument("--cache-dir", default=str(CACHE_DIR), help="trained weights and evaluations ('' = none)")
    parser.add_argument("--out", default="", help="write the results JSON here")
    parser.add_argument("--grid", default="", help="also save 16 samples of each row (first seed) as a PNG here")


def settings_from(args) -> Settings:
    return Settings(seeds=tuple(int(s) for s in args.seeds.split(",") if s), train_steps=args.train_steps,
                    num_samples=args.num_samples, bpd_images=args.bpd_images,
                    bpd_terms=args.bpd_terms or None, extra=tuple(args.extra.split()),
                    cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                    device=resolve_device(getattr(args, "device", "")))


def select(rows: list[Row], names: str, parser) -> list[Row]:
    """The rows named in `names` (comma-separated; all if empty), plus the reference rows they need."""
    wanted = [n for n in names.split(",") if n]
    if not wanted:
        return rows
    known = {row.name for row in rows}
    unknown = set(wanted) - known
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(row.name for row in rows)}")
    needed = set(wanted) | {row.reference for row in rows if row.name in wanted and row.reference}
    return [row for row in rows if row.name in needed]


def ddim_experiment_main(experiment: str, module: str, description: str, claim: str, rows, second_metric: str,
                         argv=None) -> dict:
    """The command line of an experiment scored on DDIM samples: `rows(sample_steps)` run by `main_run`, then
    the paired verdicts on the Fréchet distance and on `second_metric`."""
    import argparse
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    add_arguments(parser)
    parser.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the scored samples")
    args = parser.parse_args(argv)
    selected = select(rows(args.sample_steps), args.variants, parser)
    report = main_run(experiment, module, claim, selected, args, argv)
    print("\n".join(verdicts(report) + verdicts(report, second_metric)))
    return report


def main_run(experiment: str, module: str, claim: str, rows: list[Row], args, argv) -> dict:
    """Run `rows` with the CLI's settings, writing the report (partial after every row) to args.out."""
    torch.set_num_threads(args.threads)
    settings = settings_from(args)
    start_cpu, start_wall = time.process_time(), time.time()
    report = {
        "experiment": experiment,
        "claim": claim,
        "command": f"OMP_NUM_THREADS={args.threads} MINILDM_PROGRESS=0 python -m {module} " + " ".join(argv),
        "machine": machine_note(settings.device),
        "settings": {"base": {"preset": BASE_PRESET, "overrides": BASE}, "seeds": list(settings.seeds),
                     "device": str(settings.device),
                     "train_steps": settings.train_steps, "num_samples": settings.num_samples,
                     "bpd_images": settings.bpd_images, "bpd_terms": settings.bpd_terms, "extra": list(settings.extra),
                     "rows": {row.name: {"variant": row.variant, "overrides": list(row.overrides),
                                         "sampler": row.sampler, "steps": row.steps, "variance": row.variance,
                                         "bits": row.bits, "reference": row.reference} for row in rows}},
        "statistics": "mean ± standard error over training seeds (sample std / sqrt(n)); vs_reference: the "
                      "difference to the reference row paired by seed, " + SEPARATION,
        "complete": False,
    }

    def save(partial):
        report.update(partial)
        report["cpu_s"] = round(time.process_time() - start_cpu, 1)
        report["cpu_note"] = ("cpu_s: this invocation (models, samples and bits/dim found in the cache cost it "
                              "nothing); train_cpu_s_total, sample_cpu_s_total: what the reported models and "
                              "samples cost when they were made, cached or not")
        report["train_cpu_s_total"] = round(sum(m["train_cpu_s"] for m in report["models"].values()), 1)
        report["sample_cpu_s_total"] = round(sum(e["sample_cpu_s"] for r in report["results"].values()
                                                 for e in r["per_seed"]), 1)
        report["wall_s"] = round(time.time() - start_wall, 1)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")

    results = run(rows, settings, on_result=save)
    report["complete"] = True
    if args.grid and settings.cache_dir:
        report["sample_grid"] = {"file": Path(args.grid).name,
                                 "rows": sample_grid(rows, settings, args.grid)}
    save(results)
    return report


def sample_grid(rows: list[Row], settings: Settings, path, per_row: int = 16, zoom: int = 4) -> list[str]:
    """Save `per_row` cached samples of each row (first seed) as one PNG, one row each, pixels repeated `zoom`
    times (nearest neighbour); returns the row names."""
    from torch.nn.functional import interpolate
    from torchvision.utils import save_image

    images = []
    for row in rows:
        config = make_config(list(row.overrides) + list(settings.extra) + [f"train.seed={settings.seeds[0]}"])
        model = Trained(model_key(config, settings.train_steps), config, None, {})
        scored = sample_and_score(model, row, settings.num_samples, cache_dir=settings.cache_dir)
        images.append(scored["samples"][:per_row].float() / 255)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(interpolate(torch.cat(images), scale_factor=zoom, mode="nearest"), path, nrow=per_row, padding=2)
    return [row.name for row in rows]


# ---------------------------------------------------------------------------------------------
# Figures a notebook draws from a report


def bar_chart(ax, report: dict, metric: str, rows=None, *, floor: str | None = None, title: str | None = None,
              ylabel: str | None = None):
    """Bars of a metric's mean over seeds ± 1 standard error, each seed's value a dot; `floor`: a dashed line."""
    rows = rows or list(report["results"])
    means, errors = [], []
    for i, name in enumerate(rows):
        result = report["results"][name]
        summary = result["aggregate"].get(metric, {"mean": None, "stderr": None})
        means.append(summary["mean"] if summary["mean"] is not None else float("nan"))
        errors.append(summary["stderr"] or 0.0)
        values = [e[metric] for e in result["per_seed"] if e.get(metric) is not None]
        ax.plot([i] * len(values), values, "k.", ms=4, zorder=3)
    ax.bar(range(len(rows)), means, yerr=errors, capsize=4, color="tab:gray", alpha=0.8)
    if floor is not None:
        level = report["results"][rows[0]]["aggregate"][floor]["mean"]
        ax.axhline(level, color="k", ls="--", lw=1, label=f"real images ({level:.3g})")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(rows)), rows, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel=ylabel or metric, title=title)
    return ax


def line_chart(ax, report: dict, metric: str, groups: dict, *, ylabel: str | None = None, title: str | None = None):
    """One line per group {label: [row names]} against sampling steps, mean ± 1 standard error over seeds."""
    ticks = set()
    for label, names in groups.items():
        steps = [report["results"][n]["sampling_steps"] for n in names]
        summaries = [report["results"][n]["aggregate"].get(metric, {"mean": None, "stderr": None}) for n in names]
        means = [s["mean"] if s["mean"] is not None else float("nan") for s in summaries]
        ax.errorbar(steps, means, yerr=[s["stderr"] or 0.0 for s in summaries], marker="o", capsize=3, label=label)
        ticks.update(steps)
    ax.set(xscale="log", xlabel="sampling steps", ylabel=ylabel or metric, title=title)
    ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    return ax


def verdicts(report: dict, metric: str = "frechet_distance_to_real", *, lower_is_better: bool = True) -> list[str]:
    """One line per compared row: the paired difference of `metric` to its reference and what it says."""
    lines = []
    for name, result in report["results"].items():
        diff = result.get("vs_reference", {}).get(metric)
        if diff is None or diff["mean"] is None:
            continue
        if not diff["separated"]:
            word = "not separated from"
        else:
            word = "better than" if (diff["mean"] < 0) == lower_is_better else "worse than"
        stderr = f" ± {diff['stderr']:.3g}" if diff["stderr"] is not None else ""
        lines.append(f"{name}: {metric} {diff['mean']:+.3g}{stderr} vs {result['vs_reference']['reference']} "
                     f"(n={diff['n']} seeds) -> {word} it")
    return lines
