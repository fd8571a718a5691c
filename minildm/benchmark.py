"""Speed of minildm's UNet against diffusers' `UNet2DModel` built to the same architecture.

    python -m minildm.benchmark --preset ddpm-cifar10 --device cpu --batch 8 --steps 8
    python -m minildm.benchmark --preset adm-imagenet64 --set unet.channels=64 --batch 4   # a reduced ADM
    python -m minildm.benchmark --preset ddpm-cifar10 --device cuda --dtype bf16 --batch 128
    python -m minildm.benchmark --preset ddpm-cifar10 --batch 2 --profile   # torch.profiler tables instead
    python -m minildm.benchmark --mfu --batch 128 --dtype bf16     # img/s and MFU: ddpm-cifar10 and adm-imagenet64

Both networks are built from the same `UNetConfig` (`diffusers_kwargs` translates it; DDPM presets
into google/ddpm-cifar10-32's layout) and must have the same number of parameters (35,746,307 for
ddpm-cifar10; every paper preset matches exactly except adm-imagenet512, see `known_difference`).
Two things are timed, with the same inputs, the same process code and the same threads:

- train step: `GaussianDiffusion.training_losses` (forward, L_simple / L_hybrid), backward, AdamW step;
- DDIM step:  `sampling.ddim_step` in eval mode under no_grad (one model call + the DDIM update, Eq. 12).

Rounds are interleaved and the order alternates (minildm, diffusers, then diffusers, minildm, ...),
so a change of machine load hits both; the table reports medians and the median of the per-round
ratios minildm / diffusers with their range. On a CPU shared with other jobs use `--threads 1
--clock process` (CPU time of this process): several threads on a loaded machine mostly wait.

Two things this benchmark found, for the record:
- SDPA only takes its fused (flash) kernel for 4-D q, k, v with unit stride on the head channels;
  attention.qkv_attention used to pass 3-D views and got the math fallback, which made ADM-64's DDIM
  step 1.28x slower than diffusers on CPU (fixed there; on CUDA the same rule applies).
- The first AdamW steps of a zero-initialised UNet (zero out-convs, as in guided-diffusion) have
  exactly-zero gradients and second moments for most weights, and CPU sqrt of exact zeros is ~20x
  slower than of other floats; hence the default of 3 untimed warmup rounds.

Training throughput and MFU (`--mfu`): the train step of each preset in `--presets` (default ddpm-cifar10 and
adm-imagenet64), both models interleaved as above, reported as images/s and model FLOPs utilisation
    MFU = model FLOPs of one step / step time / peak FLOPS of the device
with the model FLOPs of minildm's network (`memory.step_flops`: forward + backward, recomputation not counted,
the same figure for diffusers' network of equal architecture) and the peak from `PEAK_TFLOPS` (dense bf16 tensor
cores, NVIDIA's data sheets; used for `--dtype bf16` only) or `--peak-tflops` (needed on a CPU, an unlisted GPU
or in fp32, whose peak is the device's fp32 / TF32 one; without it MFU is "n/a").

Needs diffusers: `pip install -e .[bench]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from minildm import build_diffusion, build_model, memory, presets, sampling, schedules
from minildm.config import Config, UNetConfig, override
from minildm.layers import count_parameters

INSTALL_HINT = "diffusers is not installed; install the benchmark extra: pip install -e .[bench]"


# ---------------------------------------------------------------------------------------------
# The same architecture in diffusers


def diffusers_kwargs(unet: UNetConfig) -> tuple[dict, list[str]]:
    """`UNet2DModel(**kwargs)` equivalent to `unet.UNet(unet)`, and notes on what cannot be matched.

    DDPM presets (no AdaGN, no BigGAN up/down) use google/ddpm-cifar10-32's layout (TF-style time
    embedding and asymmetric downsampling pad, eps 1e-6); ADM presets map use_scale_shift_norm ->
    resnet_time_scale_shift="scale_shift", resblock_updown -> Resnet{Down,Up}sample blocks,
    learn_sigma -> 2x out_channels, num_classes -> num_class_embeds, num_head_channels -> attention_head_dim.
    """
    if not unet.conv_resample:
        raise ValueError("unet.conv_resample=False (average-pool resampling) has no UNet2DModel equivalent; "
                         "benchmark a preset with conv_resample=True")
    notes = []
    levels = range(len(unet.channel_mult))
    widths = [int(mult * unet.channels) for mult in unet.channel_mult]
    attention = [unet.image_size // 2**level in unet.attention_resolutions for level in levels]
    plain = "ResnetDownsampleBlock2D" if unet.resblock_updown else "DownBlock2D"
    down_types = ["AttnDownBlock2D" if a else plain for a in attention]
    plain = "ResnetUpsampleBlock2D" if unet.resblock_updown else "UpBlock2D"
    up_types = ["AttnUpBlock2D" if a else plain for a in attention][::-1]

    # diffusers has one head width for the whole model (None: one head per layer).
    if unet.num_head_channels > 0:
        head_dim = unet.num_head_channels
    elif unet.num_heads == 1:
        head_dim = None
    else:
        head_dim = widths[-1] // unet.num_heads
        attended = {w for w, a in zip(widths, attention) if a} | {widths[-1]}
        if len(attended) > 1:
            notes.append(f"num_heads={unet.num_heads} at widths {sorted(attended)}: diffusers uses {head_dim} "
                         "channels per head everywhere, so some layers have other head counts (same parameters)")
    if widths[0] != unet.channels:
        notes.append(f"channel_mult[0]={unet.channel_mult[0]}: diffusers embeds t with {widths[0]} sinusoids, "
                     f"minildm (ADM) with {unet.channels}, so time_embed's first Linear differs in size")
    if unet.num_heads_upsample not in (-1, unet.num_heads) and unet.num_head_channels <= 0:
        notes.append("num_heads_upsample is not expressible in diffusers (same parameters)")

    ddpm = not (unet.use_scale_shift_norm or unet.resblock_updown)
    kwargs = dict(
        sample_size=unet.image_size,
        in_channels=unet.in_channels * (2 if unet.super_res else 1),
        out_channels=unet.out_channels * (2 if unet.learn_sigma else 1),
        block_out_channels=tuple(widths),
        layers_per_block=unet.num_res_blocks,
        down_block_types=tuple(down_types),
        up_block_types=tuple(up_types),
        attention_head_dim=head_dim,
        norm_num_groups=unet.norm_groups,
        attn_norm_num_groups=unet.norm_groups,  # else UNetMidBlock2D drops its attention norm with scale_shift
        norm_eps=1e-6 if ddpm else 1e-5,
        flip_sin_to_cos=not ddpm,  # ADM: [cos | sin], frequencies / half
        freq_shift=1 if ddpm else 0,  # DDPM (TF): [sin | cos], frequencies / (half - 1)
        downsample_padding=0 if ddpm else 1,
        downsample_type="resnet" if unet.resblock_updown else "conv",
        upsample_type="resnet" if unet.resblock_updown else "conv",
        resnet_time_scale_shift="scale_shift" if unet.use_scale_shift_norm else "default",
        dropout=unet.dropout,
        num_class_embeds=unet.num_classes or None,
    )
    if widths[0] != unet.channels:  # diffusers' default is 4 x width 0 (an argument older releases lack)
        kwargs["time_embedding_dim"] = 4 * unet.channels
    return kwargs, notes


def known_difference(unet: UNetConfig) -> int:
    """minildm minus diffusers parameters that no UNet2DModel setting removes: 0 unless channel_mult[0] != 1
    (minildm's time_embed starts with Linear(channels, 4 channels), diffusers' with Linear(width 0, 4 channels))."""
    return (unet.channels - int(unet.channel_mult[0] * unet.channels)) * 4 * unet.channels


class DiffusersDenoiser(nn.Module):
    """A `UNet2DModel` with minildm's signature: model(x_t, t, y=None, context=None, low_res=None) -> Tensor."""

    def __init__(self, unet: UNetConfig):
        super().__init__()
        try:
            from diffusers import UNet2DModel
        except ImportError:
            raise ImportError(INSTALL_HINT) from None
        kwargs, self.notes = diffusers_kwargs(unet)
        self.unet = UNet2DModel(**kwargs)

    def forward(self, x_t, t, y=None, context=None, low_res=None):
        if low_res is not None:  # as minildm's super_res UNet: concatenate the upsampled low-res image
            x_t = torch.cat([x_t, F.interpolate(low_res, x_t.shape[-2:], mode="bilinear").to(x_t.dtype)], dim=1)
        return self.unet(x_t, t, class_labels=y).sample


# ---------------------------------------------------------------------------------------------
# The timed steps


def make_inputs(config: Config, batch: int, device, seed: int = 0) -> dict:
    """One batch shared by both models: x0, noise [N, C, H, W], t [N], the DDIM pair, y / low_res if needed."""
    u = config.unet
    g = torch.Generator().manual_seed(seed)
    shape = (batch, u.in_channels, u.image_size, u.image_size)
    kept = schedules.space_timesteps(config.diffusion.num_timesteps, "ddim50")
    inputs = {
        "x0": torch.rand(shape, generator=g) * 2 - 1,
        "noise": torch.randn(shape, generator=g),
        "t": torch.randint(0, config.diffusion.num_timesteps, (batch,), generator=g),
        "x_t": torch.randn(shape, generator=g),
        "ddim_pair": (kept[len(kept) // 2], kept[len(kept) // 2 - 1]),  # a mid-chain step of a 50-step DDIM
        "model_kwargs": {},
    }
    if u.num_classes:
        inputs["model_kwargs"]["y"] = torch.randint(0, u.num_classes, (batch,), generator=g)
    if u.super_res:
        low = (batch, u.in_channels, u.image_size // 4, u.image_size // 4)
        inputs["model_kwargs"]["low_res"] = torch.rand(low, generator=g) * 2 - 1
    return _to(inputs, device)


def train_step(model: nn.Module, diffusion, inputs: dict, dtype: str = "fp32", lr: float = 1e-4) -> Callable:
    """A closure running one training step: loss (autocast for bf16), backward, AdamW step."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    device_type = inputs["x0"].device.type

    def step():
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            losses = diffusion.training_losses(model, inputs["x0"], inputs["t"], noise=inputs["noise"],
                                               model_kwargs=inputs["model_kwargs"])
        losses["loss"].mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def ddim_step(model: nn.Module, diffusion, inputs: dict, dtype: str = "fp32") -> Callable:
    """A closure running one deterministic DDIM step (eval mode, no_grad) from inputs["x_t"]."""
    model.eval()
    t, t_prev = inputs["ddim_pair"]
    device_type = inputs["x_t"].device.type

    def step():
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            sampling.ddim_step(model, diffusion, inputs["x_t"], t, t_prev, model_kwargs=inputs["model_kwargs"])

    return step


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def time_interleaved(steps: dict[str, Callable], repeats: int, warmup: int = 1,
                     clock: str = "wall") -> dict[str, list[float]]:
    """Milliseconds of each call, {name: [ms per round]}; round r runs the steps in turn, reversed every
    other round (A B, B A, A B, ...). The first `warmup` rounds are run but not recorded.
    clock="process" counts the CPU time of this process instead of wall time: with one thread on a shared
    CPU it leaves out the time other programs hold the core (but not their effect on the caches)."""
    now = CLOCKS[clock]
    names = list(steps)
    times = {name: [] for name in names}
    for r in range(warmup + repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            _synchronize()
            start = now()
            steps[name]()
            _synchronize()
            if r >= warmup:
                times[name].append(1000 * (now() - start))
    return times


# ---------------------------------------------------------------------------------------------
# Training throughput and MFU

# Peak dense (no sparsity) bf16 tensor-core TFLOPS, from NVIDIA's data sheets: A100 (SXM and PCIe) 312;
# H100 SXM 989.4, H100 PCIe 756; H200 (SXM) 989.4. Matched against torch.cuda.get_device_name, first match wins.
PEAK_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0))


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak (TFLOPS) of a known GPU named like torch.cuda.get_device_name, else None."""
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def choose_peak(device_type: str, device_name: str, dtype: str,
                given: float | None = None) -> tuple[float | None, str]:
    """(peak TFLOPS for MFU, where it comes from or why there is none). `given` (--peak-tflops) wins; else the
    PEAK_TFLOPS figure of a known GPU, which is a dense bf16 peak and so only the peak of a bf16 run: an fp32 run
    uses fp32 or TF32 units (an A100: 19.5 / 156 TFLOPS, not 312) and gets None."""
    if given is not None:
        return given, "--peak-tflops"
    table = peak_tflops(device_name) if device_type == "cuda" else None
    if table is None:
        return None, "no known peak for this device; pass --peak-tflops"
    if dtype != "bf16":
        return None, (f"PEAK_TFLOPS holds the dense bf16 peak of {device_name} ({table:g}), not the {dtype} one; "
                      f"run with --dtype bf16 or pass --peak-tflops (the device's {dtype} peak)")
    return table, "PEAK_TFLOPS (dense bf16)"


def mfu(flops_per_step: float, step_seconds: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s of the model's own work over the device's peak (peak in TFLOPS)."""
    return flops_per_step / step_seconds / (peak * 1e12)


def throughput(config: Config, *, batch: int, repeats: int, warmup: int = 3, device="cpu", dtype: str = "fp32",
               clock: str = "wall", peak: float | None = None, seed: int = 0) -> dict:
    """Train steps of minildm and diffusers at equal architecture, interleaved: {model: dict(ms, images_per_s,
    tflops, mfu)} from the median step time; mfu is None without a peak."""
    device = torch.device(device)
    torch.manual_seed(seed)
    models = {"minildm": build_model(config).to(device), "diffusers": DiffusersDenoiser(config.unet).to(device)}
    counts = {name: count_parameters(model) for name, model in models.items()}
    if counts["minildm"] - counts["diffusers"] != known_difference(config.unet):
        raise AssertionError(f"parameter counts differ ({counts}): diffusers_kwargs mistranslates this config")
    diffusion = build_diffusion(config)
    inputs = make_inputs(config, batch, device, seed)
    times = time_interleaved({name: train_step(model, diffusion, inputs, dtype) for name, model in models.items()},
                             repeats, warmup, clock)
    flops = memory.step_flops(config, batch, dtype)
    rows = {}
    for name, ms in times.items():
        seconds = statistics.median(ms) / 1000
        rows[name] = {"ms": 1000 * seconds, "images_per_s": batch / seconds, "tflops": flops / seconds / 1e12,
                      "mfu": None if peak is None else mfu(flops, seconds, peak), "flops": flops}
    return rows


def format_throughput(results: dict[str, dict]) -> str:
    """One row per (preset, model): ms per step, images/s, achieved model TFLOP/s, MFU."""
    rows = [f"{'preset':<24} {'model':<10} {'ms/step':>9} {'img/s':>9} {'TFLOP/s':>9} {'MFU':>7}"]
    for preset, models in results.items():
        for name, r in models.items():
            share = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            rows.append(f"{preset:<24} {name:<10} {r['ms']:>9.1f} {r['images_per_s']:>9.1f} {r['tflops']:>9.3f} "
                        f"{share:>7}")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# The comparison


def compare(config: Config, *, batch: int, repeats: int, warmup: int = 3, device="cpu", dtype: str = "fp32",
            channels_last: bool = False, clock: str = "wall", seed: int = 0,
            log: Callable[[str], None] = print) -> dict:
    """Build both models, check parameter counts, time both steps; returns counts, notes and times."""
    if config.model != "unet":
        raise ValueError(f"the benchmark compares UNets; this config has model={config.model!r}")
    device = torch.device(device)
    torch.manual_seed(seed)
    ours = build_model(config).to(device)
    theirs = DiffusersDenoiser(config.unet).to(device)
    if channels_last:
        ours, theirs = ours.to(memory_format=torch.channels_last), theirs.to(memory_format=torch.channels_last)
    counts = {"minildm": count_parameters(ours), "diffusers": count_parameters(theirs)}
    log(parameter_line(counts, theirs.notes))
    if counts["minildm"] - counts["diffusers"] != known_difference(config.unet):
        raise AssertionError(f"parameter counts differ ({counts}) by more than the known "
                             f"{known_difference(config.unet):,}: diffusers_kwargs mistranslates this config")
    diffusion = build_diffusion(config)
    inputs = make_inputs(config, batch, device, seed)
    models = {"minildm": ours, "diffusers": theirs}
    results = {"counts": counts, "notes": theirs.notes, "times": {}}
    for label, make in (("train step", train_step), ("DDIM step", ddim_step)):
        log(f"timing {label} ...")
        results["times"][label] = time_interleaved(
            {name: make(model, diffusion, inputs, dtype) for name, model in models.items()}, repeats, warmup, clock)
    return results


def parameter_line(counts: dict, notes: list[str]) -> str:
    a, b = counts["minildm"], counts["diffusers"]
    verdict = "equal" if a == b else f"differ by {a - b:+,}"
    verdict = "; ".join([verdict, *notes])
    return f"parameters: minildm {a:,}  diffusers {b:,}  ({verdict})"


def format_table(times: dict[str, dict[str, list[float]]]) -> str:
    """Median ms of each model and the median (min..max) of the per-round ratios minildm / diffusers."""
    rows = [f"{'step':<12} {'minildm ms':>11} {'diffusers ms':>13} {'ratio minildm/diffusers (range)':>32}"]
    for label, t in times.items():
        ratios = [a / b for a, b in zip(t["minildm"], t["diffusers"])]
        spread = f"{statistics.median(ratios):.3f} ({min(ratios):.2f}..{max(ratios):.2f})"
        rows.append(f"{label:<12} {statistics.median(t['minildm']):>11.1f} "
                    f"{statistics.median(t['diffusers']):>13.1f} {spread:>32}")
    return "\n".join(rows)


def profile(config: Config, *, batch: int, device="cpu", dtype: str = "fp32", warmup: int = 3,
            row_limit: int = 15) -> str:
    """torch.profiler tables (top ops by self time) of one train step and one DDIM step of each model."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = torch.device(device)
    diffusion = build_diffusion(config)
    inputs = make_inputs(config, batch, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables = []
    for name, model in (("minildm", build_model(config)), ("diffusers", DiffusersDenoiser(config.unet))):
        for label, make in (("train step", train_step), ("DDIM step", ddim_step)):
            step = make(model.to(device), diffusion, inputs, dtype)
            for _ in range(warmup):
                step()
            with torch_profile(activities=activities) as prof:
                step()
                _synchronize()
            tables.append(f"== {name}, {label}\n" + prof.key_averages().table(sort_by=sort, row_limit=row_limit))
    return "\n".join(tables)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minildm.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="ddpm-cifar10", help="a UNet preset (python -m minildm presets)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. unet.channels=64 (a reduced model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (after --warmup rounds)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed rounds first; >= 3 so that a zero-initialised UNet has no all-zero AdamW state")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="process: CPU time of this process (steadier on a shared CPU with --threads 1)")
    parser.add_argument("--channels-last", action="store_true", help="both models in channels_last")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of both steps instead")
    parser.add_argument("--mfu", action="store_true",
                        help="training img/s and MFU of each of --presets, minildm and diffusers, instead")
    parser.add_argument("--presets", nargs="+", default=["ddpm-cifar10", "adm-imagenet64"],
                        help="the presets of --mfu (each with the --set overrides)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOPS for MFU at --dtype (default: PEAK_TFLOPS by GPU name, "
                             "dense bf16, for --dtype bf16 only)")
    args = parser.parse_args(argv)
    try:
        import diffusers
    except ImportError:
        raise SystemExit(INSTALL_HINT) from None

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mfu:
        return main_mfu(args, diffusers.__version__)
    config = override(presets.get(args.preset), args.set)
    device = torch.device(args.device)
    name = args.preset + (" " + " ".join(args.set) if args.set else "")
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    load = " load average %.2f %.2f %.2f," % os.getloadavg() if hasattr(os, "getloadavg") else ""
    print(f"{name}: batch {args.batch} x {config.unet.in_channels}x{config.unet.image_size}x{config.unet.image_size},"
          f" {args.dtype}, {device.type} ({hardware}), {torch.get_num_threads()} threads, {args.clock} clock,{load} "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        print(f"note: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: several threads will wait "
              "on each other and timings will be noisy; --threads 1 is steadier on a shared machine")
    if args.profile:
        print(profile(config, batch=args.batch, device=device, dtype=args.dtype, warmup=args.warmup))
        return
    results = compare(config, batch=args.batch, repeats=args.steps, warmup=args.warmup, device=device,
                      dtype=args.dtype, channels_last=args.channels_last, clock=args.clock)
    print(format_table(results["times"]))


def main_mfu(args, diffusers_version: str) -> None:
    """`--mfu`: the throughput table of every preset in args.presets, with its header line."""
    device = torch.device(args.device)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak, source = choose_peak(device.type, hardware, args.dtype, args.peak_tflops)
    shown = "unknown" if peak is None else f"{peak:g} TFLOPS ({source})"
    print(f"training throughput: batch {args.batch}, {args.dtype}, {device.type} ({hardware}), "
          f"{torch.get_num_threads()} threads, peak {shown}, torch {torch.__version__}, diffusers {diffusers_version}"
          + (f"; overrides {' '.join(args.set)}" if args.set else ""))
    results = {}
    for name in args.presets:
        config = override(presets.get(name), args.set)
        results[name] = throughput(config, batch=args.batch, repeats=args.steps, warmup=args.warmup, device=device,
                                   dtype=args.dtype, clock=args.clock, peak=peak)
    print(format_throughput(results))
    if peak is None:
        print(f"MFU n/a: {source}")


def _to(inputs: dict, device) -> dict:
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
        elif isinstance(value, dict):
            value = _to(value, device)
        moved[key] = value
    return moved


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1:])
