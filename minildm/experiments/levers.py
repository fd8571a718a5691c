"""What limits sample quality per CPU minute: each training lever measured side by side at equal wall time.

Two steps, both on the `ddpm-shapes` preset (32x32 shapes, 1.1M-parameter UNet):

1. `throughput`: training images per second of one process for each lever that changes the speed of a step
   but not its arithmetic: torch threads (1 or 2), batch size, channels_last, `torch.compile`, and the bound
   term L_vlb that L_simple does not need (computed every step before the training loop skipped it).
2. `quality`: recipes trained for the SAME WALL TIME on this machine, converted to a step count with the
   throughput table of step 1 (so a busy machine changes how long a run takes, not what it measures), then
   sampled (DDIM, 50 steps) and scored with `minildm.metrics.evaluate_shapes`.

    python -m minildm.experiments.levers throughput --out data/results/levers_throughput.json
    python -m minildm.experiments.levers quality --throughput data/results/levers_throughput.json \\
        --minutes 3 --out data/results/levers_quality.json

3. `late`: the levers late in training, where the first two steps cannot look: from one training
   checkpoint (the shipped runs' constant-rate step 3,500), continue the same number of steps with each
   LATE recipe (so equal steps are equal wall time), then score like `python -m minildm.metrics score`.

    python -m minildm.experiments.levers late runs/ddpm-shapes/checkpoint.safetensors --steps 1000 \\
        --num-samples 256 --out data/results/levers_late.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import minildm
from minildm import config as config_lib
from minildm import data, presets, train

PRESET = "ddpm-shapes"

# One row per throughput lever: (name, config overrides, threads, channels_last, compile, bound term).
THROUGHPUT = [
    ("batch 16, 1 thread, bound term on (the shipped run)", ["train.batch_size=16"], 1, False, False, True),
    ("batch 16, 1 thread", ["train.batch_size=16"], 1, False, False, False),
    ("batch 16, 2 threads", ["train.batch_size=16"], 2, False, False, False),
    ("batch 32, 1 thread", ["train.batch_size=32"], 1, False, False, False),
    ("batch 64, 1 thread", ["train.batch_size=64"], 1, False, False, False),
    ("batch 64, 2 threads", ["train.batch_size=64"], 2, False, False, False),
    ("batch 64, 2 threads, channels_last", ["train.batch_size=64"], 2, True, False, False),
    ("batch 64, 2 threads, torch.compile", ["train.batch_size=64"], 2, False, True, False),
    ("batch 128, 2 threads", ["train.batch_size=128"], 2, False, False, False),
]

# Quality recipes: (name, overrides, the throughput row whose measured speed converts minutes to steps).
# All run one thread per process (the throughput table: a second thread does not pay on a shared 2-core
# machine, two runs side by side do). The first recipe is the previously shipped one.
SHIPPED = ["train.batch_size=16", "train.lr=1e-3", "train.ema_decay=0.995", "train.ema_warmup=false"]
WARM_EMA = ["train.ema_decay=0.999", "train.ema_warmup=true"]
QUALITY = [
    ("shipped: batch 16, lr 1e-3, EMA 0.995 without warm-up", SHIPPED,
     "batch 16, 1 thread, bound term on (the shipped run)"),
    ("batch 16, lr 1e-3, EMA 0.999 with warm-up", ["train.batch_size=16", "train.lr=1e-3"] + WARM_EMA,
     "batch 16, 1 thread"),
    ("batch 32, lr 2e-3, EMA 0.999 with warm-up", ["train.batch_size=32", "train.lr=2e-3"] + WARM_EMA,
     "batch 32, 1 thread"),
    ("batch 16, lr 1e-3, EMA 0.999 with warm-up, Min-SNR-5 weighting",
     ["train.batch_size=16", "train.lr=1e-3", "diffusion.snr_gamma=5"] + WARM_EMA, "batch 16, 1 thread"),
]


def machine_note(threads: int | None = None) -> str:
    return (f"{platform.machine()}, {torch.get_num_threads() if threads is None else threads} torch thread(s), "
            f"python {platform.python_version()}, torch {torch.__version__}")


def make_stepper(overrides, *, channels_last: bool, compile: bool, with_vb: bool):
    """One AdamW training step of `PRESET` + overrides on fixed shapes batches, as a function of k; and its batch."""
    config = config_lib.override(presets.get(PRESET), list(overrides))
    torch.manual_seed(0)
    model = minildm.build_model(config)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    diffusion = minildm.build_diffusion(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr)
    forward = torch.compile(model) if compile else model
    batch = config.train.batch_size
    x0, _ = data.ShapesDataset(batch * 4, config.data.image_size, seed=0).tensors()
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)

    def step(k):
        rows = slice((k % 4) * batch, (k % 4 + 1) * batch)
        t = torch.randint(0, diffusion.num_timesteps, (batch,))
        loss = diffusion.training_losses(forward, x0[rows], t, with_vb=with_vb)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, batch


def run_throughput(seconds: float, rounds: int = 4) -> dict:
    """Training images/s of each lever, timed round-robin (`rounds` turns of seconds / rounds each, median), so
    load from other processes on a shared machine falls on every lever alike."""
    steppers = []
    for name, overrides, threads, channels_last, compile, with_vb in THROUGHPUT:
        torch.set_num_threads(threads)
        step, batch = make_stepper(overrides, channels_last=channels_last, compile=compile, with_vb=with_vb)
        start = time.perf_counter()
        for k in range(3):  # warm-up (and compilation)
            step(k)
        steppers.append((name, step, batch, threads, time.perf_counter() - start))
    rates = {name: [] for name, *_ in steppers}
    for _ in range(rounds):
        for name, step, batch, threads, _ in steppers:
            torch.set_num_threads(threads)
            start, steps = time.perf_counter(), 0
            while time.perf_counter() - start < seconds / rounds:
                step(steps)
                steps += 1
            rates[name].append(steps / (time.perf_counter() - start))
    rows = {}
    for (name, overrides, threads, channels_last, compile, with_vb), (_, _, batch, _, warm_s) in zip(THROUGHPUT,
                                                                                                  steppers):
        steps_per_s = sorted(rates[name])[len(rates[name]) // 2]
        rows[name] = {"overrides": overrides, "threads": threads, "channels_last": channels_last,
                      "compile": compile, "bound_term": with_vb, "batch_size": batch,
                      "steps_per_s": round(steps_per_s, 3), "images_per_s": round(steps_per_s * batch, 1),
                      "rounds_steps_per_s": [round(r, 3) for r in rates[name]], "warmup_s": round(warm_s, 1)}
        print(f"{name:50s} {rows[name]['images_per_s']:7.1f} images/s ({steps_per_s:.2f} steps/s)", flush=True)
    return rows


# Late-training recipes: (name, overrides) applied when continuing a constant-rate checkpoint.
LATE = [
    ("constant lr 1e-3, Min-SNR-5 (the recipe so far)", []),
    ("constant lr 1e-3, plain L_simple (Min-SNR off)", ["diffusion.snr_gamma=0"]),
    ("lr decayed to 0 by a cosine, Min-SNR-5", ["train.lr_schedule=cosine"]),
    ("lr decayed to 0 by a cosine, plain L_simple", ["train.lr_schedule=cosine", "diffusion.snr_gamma=0"]),
]


def run_late(checkpoint, steps: int, num_samples: int, work_dir, recipes=None) -> dict:
    """Continue `checkpoint` for `steps` steps with each LATE recipe (cosine over exactly those steps), score."""
    import shutil

    from minildm import checkpoints, metrics

    start = checkpoints.read_metadata(checkpoint)["step"]
    results = {"start_step": start}
    for index, (name, overrides) in enumerate(LATE):
        if recipes is not None and index not in recipes:
            continue
        out = Path(work_dir) / f"late{index}"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(checkpoint, out / train.CHECKPOINT)
        config = config_lib.override(presets.get(PRESET), ["train.lr_schedule=constant", *overrides,
                                                           f"train.lr_decay_steps={steps}", "train.sample_every=0",
                                                           f"train.save_every={steps}", "train.log_every=0"])
        losses = []
        trained = train.train(config, max_steps=start + steps, out_dir=out, verbose=False,
                              callback=lambda step, loss: losses.append(loss))
        samples, _ = metrics.sample_for_scoring(trained.ema, config, num_samples)
        report = metrics.evaluate_shapes(samples)
        results[name] = {"overrides": overrides, "steps": f"{start} -> {start + steps}",
                         "final_loss": round(sum(losses[-100:]) / len(losses[-100:]), 5),
                         **{key: report[key] for key in ("confident_fraction", "frechet_distance_to_real",
                                                         "frechet_distance_floor", "precision", "recall")}}
        print(name, json.dumps(results[name]), flush=True)
    return results


def run_quality(throughput: dict, minutes: float, num_samples: int, recipes=None) -> dict:
    from minildm import metrics

    results = {}
    for index, (name, overrides, speed_row) in enumerate(QUALITY):
        if recipes is not None and index not in recipes:
            continue
        speed = throughput[speed_row]
        threads = throughput[speed_row]["threads"]
        torch.set_num_threads(threads)
        steps = int(minutes * 60 * speed["steps_per_s"])
        config = config_lib.override(presets.get(PRESET), list(overrides) + [
            f"train.max_steps={steps}", "train.save_every=0", "train.sample_every=0", "train.log_every=0"])
        losses = []
        start = time.perf_counter()
        trained = train.train(config, callback=lambda step, loss: losses.append(loss), verbose=False)
        train_s = time.perf_counter() - start
        samples = train.generate(trained.ema, minildm.build_diffusion(config), config, num_samples, steps=50,
                                 batch_size=256)
        report = metrics.evaluate_shapes(samples)
        results[name] = {
            "overrides": overrides, "runs_at": speed_row, "steps": steps,
            "images_seen": steps * config.train.batch_size, "train_wall_s_here": round(train_s, 1),
            "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 5),
            **{key: report[key] for key in ("confident_fraction", "frechet_distance_to_real",
                                            "frechet_distance_floor", "precision", "recall")},
        }
        print(name, json.dumps(results[name]), flush=True)
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m minildm.experiments.levers", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("throughput", help="training images/s for each speed lever")
    p.add_argument("--seconds", type=float, default=20.0, help="timed wall seconds per lever (after 3 warm-up steps)")
    p.add_argument("--rounds", type=int, default=4, help="round-robin turns the seconds are split into")
    p.add_argument("--out")
    p = commands.add_parser("quality", help="recipes at equal wall time, scored with minildm.metrics")
    p.add_argument("--throughput", required=True, help="the JSON written by the throughput command")
    p.add_argument("--minutes", type=float, default=3.0, help="wall minutes per recipe, at the measured speed")
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--recipes", help="comma-separated recipe numbers, 0 = the first of QUALITY (default: all)")
    p.add_argument("--out")
    p = commands.add_parser("late", help="late-training recipes continued from one checkpoint, scored")
    p.add_argument("checkpoint", help="a training checkpoint of the preset (with optimizer state)")
    p.add_argument("--steps", type=int, default=1000, help="steps each recipe continues for")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--recipes", help="comma-separated recipe numbers, 0 = the first of LATE (default: all)")
    p.add_argument("--work-dir", default="runs/levers-late", help="where the continued runs are written")
    p.add_argument("--out")
    args = parser.parse_args(argv)
    command = f"python -m minildm.experiments.levers {' '.join(argv) if argv else ''}".strip()
    if args.command == "throughput":
        report = {"experiment": "levers-throughput", "preset": PRESET, "machine": machine_note(2),
                  "rows": run_throughput(args.seconds, args.rounds)}
    elif args.command == "late":
        recipes = [int(i) for i in args.recipes.split(",")] if args.recipes else None
        report = {"experiment": "levers-late", "preset": PRESET, "checkpoint": args.checkpoint,
                  "continued_steps": args.steps, "num_samples": args.num_samples, "machine": machine_note(1),
                  "rows": run_late(args.checkpoint, args.steps, args.num_samples, args.work_dir, recipes)}
    else:
        throughput = json.loads(Path(args.throughput).read_text())["rows"]
        recipes = [int(i) for i in args.recipes.split(",")] if args.recipes else None
        report = {"experiment": "levers-quality", "preset": PRESET, "minutes": args.minutes,
                  "num_samples": args.num_samples, "machine": machine_note(),
                  "rows": run_quality(throughput, args.minutes, args.num_samples, recipes)}
    report["command"] = command
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
