"""ADM's architecture ablation and iDDPM's learned variances, re-run at toy scale on a CPU.

Two experiments, each model trained for the same *CPU-time budget* (``time.process_time`` under one
thread, so the budget means the same work on a busy shared machine as on an idle one):

- ``adm``: the changes of Dhariwal & Nichol 2021 (Sec. 3, Tab. 1-3), each added alone to a small
  DDPM-style UNet and then all together ("adm"): attention at several resolutions with a fixed
  number of channels per head, BigGAN-style residual up/down sampling, adaptive group norm (AdaGN).
- ``variance``: Nichol & Dhariwal 2021 (Sec. 3.1, Fig. 8): a network trained with L_simple and a
  fixed variance against one trained with L_hybrid and learned variances (learned_range), sampled with
  10 ... 250 respaced ancestral steps. The L_simple network is sampled with both fixed variances
  (beta_t and the posterior beta~_t), which is a sampling-time choice.

Every model is an override list of one base config (`BASE`, 16x16 shapes), so the table of variants
below is the whole experiment. Sample quality is scored by `minildm.metrics.evaluate_shapes`.

    python -m minildm.ablation adm --budget 150 --out data/results/adm_ablation.json
    python -m minildm.ablation variance --budget 240 --out data/results/learned_variance.json
    python -m minildm.ablation adm --budget 2 --variants ddpm,adm --num-samples 16   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import minildm
from minildm import config as config_lib
from minildm import data, presets, schedules, train
from minildm.diffusion import GaussianDiffusion
from minildm.layers import count_parameters

# The small DDPM-style base: 16x16 shapes, widths 32/64/64, one res block per level, attention at 8x8
# with one head, strided-conv resampling, time embedding added to the features. The shipped results in
# data/results were measured with GroupNorm's 32 groups (one channel per group at width 32), before the
# image toys moved to 8 groups (see presets.py): the base keeps 32 so those results stay reproducible.
BASE_PRESET = "toy-shapes"
BASE = [
    "unet.channels=32", "unet.channel_mult=1,2,2", "unet.num_res_blocks=1", "unet.norm_groups=32",
    "unet.attention_resolutions=8", "unet.num_heads=1", "unet.num_head_channels=-1",
    "unet.resblock_updown=false", "unet.use_scale_shift_norm=false", "unet.dropout=0.0",
    "diffusion.beta_schedule=linear", "diffusion.model_var_type=fixed_large", "diffusion.loss_type=simple",
    "train.batch_size=32", "train.lr=1e-3", "train.warmup_steps=100", "train.ema_decay=0.995",
]
# ADM's changes (feature-map sides 8 and 4 are the 1/2 and 1/4 resolutions of a 16x16 image, as
# 32, 16, 8 are 1/4 ... 1/16 of ADM's 128x128 model; 16 channels per head as ADM's 64 at 4x the width).
ATTENTION = ["unet.attention_resolutions=8,4", "unet.num_head_channels=16"]
UPDOWN = ["unet.resblock_updown=true"]
ADAGN = ["unet.use_scale_shift_norm=true"]
ADM_VARIANTS = {
    "ddpm": [],
    "+attention": ATTENTION,
    "+updown": UPDOWN,
    "+adagn": ADAGN,
    "adm": ATTENTION + UPDOWN + ADAGN,
}
# Training order of a full run: the two ends of the ablation first, so a run cut short still compares them.
ADM_RUN_ORDER = ("ddpm", "adm", "+adagn", "+updown", "+attention")
# The learned-variance pair: the ADM network, cosine schedule (iDDPM).
VARIANCE_VARIANTS = {
    "fixed": ATTENTION + UPDOWN + ADAGN + ["diffusion.beta_schedule=cosine"],
    "learned": ATTENTION + UPDOWN + ADAGN + ["diffusion.beta_schedule=cosine", "unet.learn_sigma=true",
                                             "diffusion.model_var_type=learned_range", "diffusion.loss_type=hybrid"],
}
SAMPLING_STEPS = (10, 25, 50, 100, 250)


def make_config(overrides=(), *, base=BASE):
    """The config of one variant: `BASE_PRESET` with `base` then `overrides` applied (`config.override` syntax)."""
    return config_lib.override(presets.get(BASE_PRESET), list(base) + list(overrides))


# ---------------------------------------------------------------------------------------------
# Training for a fixed CPU budget


def train_for_budget(config, budget_s: float, *, max_steps: int | None = None, log_every: int = 25,
                     num_samples: int = 10_000, device=None):
    """Train `config`'s model until `budget_s` CPU seconds (process time) are spent; returns (model, ema, log).

    The loop is `train.train`'s (same deterministic batches, t and noise per step, warmup, clipping)
    without checkpoints, so it can stop on the clock; the EMA decay warms up as min(decay, (1+k)/(10+k)). log: dict(step, cpu_s, loss) lists, one
    entry per `log_every` steps (mean loss since the previous entry), and the totals. On a GPU the
    process time is the host's time, so pass `max_steps` there (and a large budget).
    """
    device = torch.device(device or "cpu")
    cfg = config.train
    torch.manual_seed(cfg.seed)
    model = minildm.build_model(config).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    diffusion = minildm.build_diffusion(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                  weight_decay=cfg.weight_decay)
    dataset = data.ShapesDataset(num_samples, config.data.image_size, seed=0)
    batches = train.StepBatches(len(dataset), cfg.batch_size, seed=cfg.seed)
    t_generator, noise_generator = torch.Generator(), torch.Generator(device)
    log = {"step": [], "cpu_s": [], "loss": []}
    running, count, step = 0.0, 0, 0
    start = time.process_time()
    model.train()
    while time.process_time() - start < budget_s and (max_steps is None or step < max_steps):
        x0, _ = dataset.tensors(batches.indices(step))
        t_generator.manual_seed(train.step_seed(cfg.seed, step))
        noise_generator.manual_seed(train.step_seed(cfg.seed, step))
        x0 = x0.to(device)
        t = torch.randint(0, diffusion.num_timesteps, (cfg.batch_size,), generator=t_generator).to(device)
        noise = torch.randn(x0.shape, generator=noise_generator, device=device)
        for group in optimizer.param_groups:
            group["lr"] = train.learning_rate(cfg, step)
        loss = diffusion.training_losses(model, x0, t, noise=noise)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        # EMA with a warmup (TensorFlow's num_updates rule): a run of a few hundred steps must not keep
        # a large share of the random initial weights in its average (0.995^400 = 13%).
        train.update_ema(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        step += 1
        running, count = running + loss.detach(), count + 1
        if step % log_every == 0:
            log["step"].append(step)
            log["cpu_s"].append(round(time.process_time() - start, 2))
            log["loss"].append(round(float(running) / count, 5))
            running, count = 0.0, 0
    model.eval()
    log["steps"] = step
    log["train_cpu_s"] = round(time.process_time() - start, 2)
    return model, ema, log


@torch.no_grad()
def quality(samples: torch.Tensor) -> dict:
    """Shapes-evaluator scores of samples [N, 3, H, W] in [-1, 1] (`minildm.metrics.evaluate_shapes`)."""
    from minildm import metrics

    scores = metrics.evaluate_shapes(samples)
    return {key: (round(float(value), 4) if isinstance(value, (int, float, np.floating)) else value)
            for key, value in dict(scores).items()}


def _try_quality(samples: torch.Tensor) -> dict | None:
    try:
        return quality(to_uint8(samples).float() / 127.5 - 1)  # scored as stored: 8-bit, like the real data
    except Exception as error:  # no usable metrics: the samples are kept, score them later (`evaluate`)
        print(f"  quality skipped ({error}); run `python -m minildm.ablation evaluate ...` later", flush=True)
        return None


def _summary(quality: dict | None) -> str:
    if quality is None:
        return "quality not scored"
    return (f"confident {quality['confident_fraction']:.3f}, Fréchet {quality['frechet_distance_to_real']:.1f} "
            f"(floor {quality['frechet_distance_floor']:.1f})")


def to_uint8(samples: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 [0, 255] (what is stored and scored)."""
    return ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# The two experiments


def run_adm(budget_s: float, *, variants=None, num_samples: int = 128, sample_steps: int = 50,
            max_steps: int | None = None, samples_dir: Path | None = None, on_result=None, extra=(),
            device=None, log_every: int = 25) -> dict:
    """The ADM ablation: each variant trained for `budget_s` CPU seconds, then `num_samples` DDIM samples scored.

    extra: overrides applied to every variant (e.g. a larger image size); on_result(results) is called
    after each variant (to save partial results of a long run).
    """
    results = {}
    for name in variants or ADM_RUN_ORDER:
        config = make_config(ADM_VARIANTS[name] + list(extra))
        model, ema, log = train_for_budget(config, budget_s, max_steps=max_steps, device=device, log_every=log_every)
        diffusion = minildm.build_diffusion(config)
        start = time.process_time()
        samples = train.generate(ema, diffusion, config, num_samples, sampler="ddim", steps=sample_steps,
                                 batch_size=128).cpu()
        sample_cpu_s = round(time.process_time() - start, 2)
        if samples_dir is not None:
            Path(samples_dir).mkdir(parents=True, exist_ok=True)
            torch.save(to_uint8(samples), Path(samples_dir) / f"adm_{name}.pt")
            torch.save(ema.state_dict(), Path(samples_dir) / f"adm_{name}_ema.pt")
        results[name] = {
            "overrides": ADM_VARIANTS[name],
            "params": count_parameters(model),
            "steps": log["steps"], "train_cpu_s": log["train_cpu_s"],
            "final_loss": round(float(np.mean(log["loss"][-4:])), 5) if log["loss"] else None,
            "loss_curve": {k: log[k] for k in ("step", "cpu_s", "loss")},
            "sample_cpu_s": sample_cpu_s,
            "quality": _try_quality(samples),
        }
        print(f"{name:>11}: {results[name]['params']:,} params, {log['steps']} steps in {log['train_cpu_s']} CPU s, "
              f"final loss {results[name]['final_loss']}, {_summary(results[name]['quality'])}", flush=True)
        if on_result is not None:
            on_result(results)
    return results


def fixed_variance_diffusions(config) -> dict[str, GaussianDiffusion]:
    """How to sample each model of the variance experiment: {label: process}."""
    betas = minildm.build_diffusion(config).betas
    return {"beta": GaussianDiffusion(betas, model_var_type="fixed_large"),
            "beta_tilde": GaussianDiffusion(betas, model_var_type="fixed_small")}


def run_variance(budget_s: float, *, steps=SAMPLING_STEPS, num_samples: int = 128, bpd_samples: int = 0,
                 max_steps: int | None = None, samples_dir: Path | None = None, on_result=None, extra=(),
                 device=None, log_every: int = 25) -> dict:
    """Fixed variance + L_simple vs learned_range + L_hybrid: quality (and bits/dim) vs respaced ancestral steps.

    Both models are trained first; then every sampler runs 10 steps, then 25, ... so a run cut short
    still compares them. on_result(results) is called after each sampled row (partial results).
    """
    results, trained = {}, {}
    for name, overrides in VARIANCE_VARIANTS.items():
        config = make_config(overrides + list(extra))
        model, ema, log = train_for_budget(config, budget_s, max_steps=max_steps, device=device, log_every=log_every)
        if name == "fixed":
            samplers = {f"L_simple, sigma^2={label}": d for label, d in fixed_variance_diffusions(config).items()}
        else:
            samplers = {"L_hybrid, learned sigma": minildm.build_diffusion(config)}
        if samples_dir is not None:
            Path(samples_dir).mkdir(parents=True, exist_ok=True)
            torch.save(ema.state_dict(), Path(samples_dir) / f"variance_{name}_ema.pt")
        results[name] = {"overrides": overrides, "params": count_parameters(model), "steps": log["steps"],
                         "train_cpu_s": log["train_cpu_s"],
                         "final_loss": round(float(np.mean(log["loss"][-4:])), 5) if log["loss"] else None,
                         "loss_curve": {k: log[k] for k in ("step", "cpu_s", "loss")},
                         "sampling": {label: [] for label in samplers}}
        trained[name] = (config, ema, samplers)
        print(f"{name}: {log['steps']} steps in {log['train_cpu_s']} CPU s, final loss {results[name]['final_loss']}",
              flush=True)
        if on_result is not None:
            on_result(results)
    image_size = next(iter(trained.values()))[0].data.image_size
    held_out = data.ShapesDataset(max(bpd_samples, 1), image_size, seed=1).tensors()[0]  # built once
    for num_steps in steps:
        for name, (config, ema, samplers) in trained.items():
            device_of_model = next(ema.parameters()).device
            for label, diffusion in samplers.items():
                start = time.process_time()
                samples = train.generate(ema, diffusion, config, num_samples, sampler="ddpm", steps=num_steps,
                                         batch_size=128).cpu()
                row = {"sampling_steps": num_steps, "sample_cpu_s": round(time.process_time() - start, 2)}
                if samples_dir is not None:
                    torch.save(to_uint8(samples), Path(samples_dir) / variance_samples_file(name, label, num_steps))
                row["quality"] = _try_quality(samples)
                if bpd_samples:
                    timesteps = schedules.space_timesteps(diffusion.num_timesteps, str(num_steps))
                    bpd = diffusion.bits_per_dim(ema, held_out.to(device_of_model), timesteps=timesteps,
                                                 generator=torch.Generator(device_of_model).manual_seed(0))
                    row["bits_per_dim"] = round(bpd["total_bpd"].mean().item(), 4)
                results[name]["sampling"][label].append(row)
                print(f"{label:>30} {num_steps:>4} steps: {_summary(row['quality'])}, "
                      f"bits/dim {row.get('bits_per_dim')}", flush=True)
                if on_result is not None:
                    on_result(results)
    return results


def variance_samples_file(name: str, label: str, num_steps: int) -> str:
    """File name of the stored samples of one (model, sampler, steps) cell of the variance experiment."""
    key = label.split(",")[1].strip().replace(" ", "_").replace("^", "").replace("=", "_")
    return f"variance_{name}_{key}_{num_steps}.pt"


def evaluate(report: dict, samples_dir) -> dict:
    """Fill in the `quality` of every entry of a results report from the samples stored in `samples_dir`."""
    samples_dir = Path(samples_dir)
    for name, entry in report["results"].items():
        if report["experiment"] == "adm":
            entry["quality"] = quality(_load_samples(samples_dir / f"adm_{name}.pt"))
            continue
        for label, rows in entry["sampling"].items():
            for row in rows:
                path = samples_dir / variance_samples_file(name, label, row["sampling_steps"])
                row["quality"] = quality(_load_samples(path))
    return report


def _load_samples(path: Path) -> torch.Tensor:
    return torch.load(path).float() / 127.5 - 1


def sample_grid(report: dict, samples_dir, path, per_row: int = 16) -> list[str]:
    """Save `per_row` stored samples of every entry as one PNG, one row each; returns the row labels."""
    from torchvision.utils import save_image

    samples_dir, rows, labels = Path(samples_dir), [], []
    for name, entry in report["results"].items():
        if report["experiment"] == "adm":
            rows.append(_load_samples(samples_dir / f"adm_{name}.pt")[:per_row])
            labels.append(name)
            continue
        for label, cells in entry["sampling"].items():
            for row in cells:
                file = samples_dir / variance_samples_file(name, label, row["sampling_steps"])
                rows.append(_load_samples(file)[:per_row])
                labels.append(f"{label}, {row['sampling_steps']} steps")
    save_image((torch.cat(rows) + 1) / 2, path, nrow=per_row, padding=1)
    return labels


def machine_note() -> str:
    """Where the numbers were measured: CPU, thread count, library versions."""
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
            f"python {platform.python_version()}, torch {torch.__version__}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m minildm.ablation", description=__doc__.split("\n")[0])
    parser.add_argument("experiment", choices=("adm", "variance", "evaluate"),
                        help="evaluate: score the samples of an existing report (--report, --samples-dir)")
    parser.add_argument("--report", default="", help="results JSON to evaluate")
    parser.add_argument("--grid", default="", help="evaluate: also save a PNG of 16 samples per entry here")
    parser.add_argument("--budget", type=float, default=150.0, help="CPU seconds of training per model")
    parser.add_argument("--variants", default="", help="comma-separated subset of the ADM variants")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of the ADM experiment's samples")
    parser.add_argument("--steps", default=",".join(map(str, SAMPLING_STEPS)),
                        help="sampling steps (variance experiment)")
    parser.add_argument("--bpd-samples", type=int, default=0, help="held-out images for bits/dim (0: skip)")
    parser.add_argument("--max-steps", type=int, default=None, help="also stop at this many training steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples-dir", default="", help="also save the samples (uint8 .pt) here")
    parser.add_argument("--out", default="", help="write the results JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    samples_dir = Path(args.samples_dir) if args.samples_dir else None
    if args.experiment == "evaluate":
        if not (args.report and samples_dir):
            parser.error("evaluate needs --report RESULTS.json and --samples-dir DIR (where the run saved its samples)")
        report = evaluate(json.loads(Path(args.report).read_text()), samples_dir)
        report["evaluated_with"] = "python -m minildm.ablation " + " ".join(argv if argv is not None else sys.argv[1:])
        if args.grid:
            report["sample_grid"] = {"file": Path(args.grid).name,
                                     "rows": sample_grid(report, samples_dir, args.grid)}
        Path(args.out or args.report).write_text(json.dumps(report, indent=1) + "\n")
        return report
    start = time.time()
    report = {
        "experiment": args.experiment,
        "command": f"OMP_NUM_THREADS={args.threads} python -m minildm.ablation " + " ".join(argv if argv is not None else sys.argv[1:]),
        "budget_cpu_s_per_model": args.budget,
        "base": {"preset": BASE_PRESET, "overrides": BASE},
        "machine": machine_note(),
        "complete": False,
        "results": {},
    }

    def save(results):
        report["results"], report["wall_s"] = results, round(time.time() - start, 1)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")

    if args.experiment == "adm":
        variants = [v for v in args.variants.split(",") if v] or None
        unknown = set(variants or []) - set(ADM_VARIANTS)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(ADM_VARIANTS)}")
        results = run_adm(args.budget, variants=variants, num_samples=args.num_samples, max_steps=args.max_steps,
                          sample_steps=args.sample_steps, samples_dir=samples_dir, on_result=save)
    else:
        results = run_variance(args.budget, steps=[int(s) for s in args.steps.split(",")],
                               num_samples=args.num_samples, bpd_samples=args.bpd_samples,
                               max_steps=args.max_steps, samples_dir=samples_dir, on_result=save)
    report["complete"] = True
    save(results)
    return report


if __name__ == "__main__":
    main()
