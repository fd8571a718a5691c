"""Command line: `python -m minildm {presets,train,sample,fid,bpd,info} ...` (also installed as `minildm`).

    python -m minildm presets                                   # the preset table, with parameter counts
    python -m minildm presets --memory adm-imagenet256          # + memory and GFLOPs per training step
    python -m minildm train toy-shapes train.max_steps=500      # train a preset, key=value overrides
    python -m minildm train ddpm-cifar10 --out runs/cifar       # the DDPM CIFAR10 GPU run
    torchrun --nproc_per_node 8 -m minildm train ddpm-cifar10   # the same on 8 GPUs (global batch 128)
    python -m minildm train ddpm-cifar10 --resume               # continue where the checkpoint stopped
    python -m minildm sample runs/toy-shapes/checkpoint.safetensors --num 16 --steps 50 --out grid.png
    python -m minildm sample adm-imagenet64 --steps 25           # an official checkpoint, downloaded once
    python -m minildm sample ddpm-shapes.safetensors --classifier shapes-classifier.safetensors --classifier-scale 4
    python -m minildm sample ddpm-shapes-cond.safetensors --guidance-scale 3   # classifier-free guidance
    python -m minildm sample ldm-shapes-text.safetensors --prompt "a large red circle on the left" --sampler plms
    python -m minildm sample ldm-cin256-v2 --num 50000 --guidance-scale 1.5 --out samples.npz   # for FID
    python -m minildm sample adm-imagenet64 --num 50000 --batch-size 256 --out samples.npz   # ADM's .npz batch
    torchrun --nproc_per_node 8 -m minildm sample adm-imagenet64 --num-samples 50000 --out samples.npz  # same noise
    python -m minildm fid samples.npz VIRTUAL_imagenet64_labeled.npz   # FID, IS, KID, precision/recall
    python -m minildm bpd runs/toy-shapes/checkpoint.safetensors --num 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = __doc__.split("\n\n", 1)[1]


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 for a usage error with a message)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from minildm.checkpoints import CheckpointError
    from minildm.data import DatasetUnavailableError
    from minildm.train import RunLockedError, TrainingDiverged, TrainingInterrupted

    try:
        return args.run(args)
    except TrainingInterrupted as stopped:
        print(f"minildm {args.command}: {stopped}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"minildm {args.command}: interrupted", file=sys.stderr)
        return 130
    except (KeyError, ValueError, OSError, CheckpointError, DatasetUnavailableError, RunLockedError,
            TrainingDiverged) as error:
        # Errors that say what to change (unknown preset or key, bad value, missing or damaged file, a
        # dataset offline, a folder in use, a diverged run, a full disk): one line, no traceback.
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        if isinstance(error, OSError) and error.filename and not isinstance(error, ConnectionError):
            message = f"{error.strerror or error} ({error.filename})"
        print(f"minildm {args.command}: error: {message}", file=sys.stderr)
        return 2


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _device(name: str):
    """The torch device `name` (default: cuda if available), or a ValueError that says what exists."""
    import torch

    from minildm import metrics

    if name is None:
        return metrics.default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"--device {name}: this machine has no CUDA GPU that torch can use; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: there are {count} GPUs (cuda:0 .. cuda:{count - 1})")
    elif device.type != "cpu" and device.type != "mps":
        raise ValueError(f"--device {name!r}: minildm runs on cpu, cuda or mps")
    return name


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m minildm", description="minildm: train, sample and evaluate the course's diffusion models.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = commands.add_parser("presets", help="list the presets: name, parameters, summary",
                            description="List every preset with its parameter count (exact count of the original "
                                        "network for paper presets) and summary.")
    p.add_argument("--verify", action="store_true",
                   help="also build every minildm model on the meta device and check its parameter count")
    p.add_argument("--memory", action="store_true",
                   help="add memory and compute per training step (bf16 autocast, estimated on fake tensors, about "
                        "2 minutes for all): state GiB (weights, gradients, AdamW, EMA), activations MiB per image, "
                        "the largest batch per 80 GiB GPU, GFLOPs per image (forward + backward)")
    p.add_argument("names", nargs="*", metavar="PRESET", help="only these presets (default: all)")
    p.set_defaults(run=_presets)

    p = commands.add_parser("train", help="train a preset (key=value overrides; torchrun for several GPUs)",
                            description="Train PRESET. Overrides use the config syntax section.field=value, e.g. "
                                        "train.lr=1e-4 unet.dropout=0.0 data.root=/data. Under torchrun the global "
                                        "batch train.batch_size is split across the processes.")
    p.add_argument("preset", help="preset name (see `python -m minildm presets`)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=1000")
    p.add_argument("--out", help="output folder for checkpoint, samples and log (default: train.out_dir)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint.safetensors (without it an existing checkpoint is an error)")
    p.add_argument("--max-steps", type=_positive, help="total number of steps (same as train.max_steps=N)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    p.set_defaults(run=_train)

    p = commands.add_parser("sample", help="write samples of a checkpoint: a PNG grid, or an .npz batch for FID",
                            description="Sample from CHECKPOINT (a .safetensors file written by training, or the "
                                        "name of a preset with an official checkpoint, downloaded on first use). "
                                        "Sample i draws its noise and class from its own stream seeded from "
                                        "(--seed, i): the same noise and classes for any --batch-size and any "
                                        "number of processes, so the same samples up to float rounding (torchrun "
                                        "shards the indices; rank 0 writes --out).")
    p.add_argument("checkpoint", help="checkpoint file, or a preset name such as adm-imagenet64")
    p.add_argument("--num", "--num-samples", dest="num", type=_positive, default=16,
                   help="number of samples (default 16; FID: 50000). Under torchrun write --num-samples: torchrun's "
                        "own parser reads --num as an abbreviation of its --numa-binding")
    p.add_argument("--batch-size", type=_positive, default=64, help="samples per batch and process (default 64)")
    p.add_argument("--sampler", choices=("ddim", "ddpm", "plms"), default="ddim",
                   help="DDIM, ancestral DDPM or LDM's PLMS (latent diffusion checkpoints; default ddim)")
    p.add_argument("--steps", type=_positive, default=50, help="sampling steps, respaced evenly over T (default 50)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--out", default="samples.png",
                   help="output: a .png grid (default samples.png) or an .npz batch in ADM's layout (arr_0 uint8 "
                        "[N, H, W, C], arr_1 labels) for `python -m minildm fid` and ADM's evaluator")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights when the checkpoint has them (default: yes)")
    p.add_argument("--class", dest="label", type=int, help="class label for class-conditional models "
                                                           "(default: drawn uniformly per sample, as ADM)")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance w for class-conditional models trained with a null class: "
                        "eps_null + w (eps_class - eps_null); 1 = no guidance (default), 0 = unconditional")
    p.add_argument("--prompt", help="caption for a text-conditional latent diffusion checkpoint (every sample)")
    p.add_argument("--classifier", help="checkpoint of a noise-aware classifier (model=classifier) for classifier "
                                        "guidance, or a preset name such as adm-classifier64")
    p.add_argument("--classifier-scale", type=float, default=1.0,
                   help="classifier guidance scale s (ADM): s * grad log p(y | x_t); 0 = none (default 1 with "
                        "--classifier)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(run=_sample)

    p = commands.add_parser("fid", help="FID (and IS, KID, precision/recall) of a sample batch against a reference",
                            description="The FID protocol: FID of SAMPLES (an .npz from `sample --out x.npz`, or a "
                                        "folder of images) against REFERENCE: an .npz of images (arr_0), ADM's "
                                        "reference batch (its mu and sigma are used), a statistics file written by "
                                        "--save-stats, or a folder of images. Papers use 50,000 samples against the "
                                        "training set's statistics; compare only numbers computed the same way. "
                                        "With REFERENCE alone and --save-stats: compute its statistics once.",
                            epilog="python -m minildm fid samples.npz VIRTUAL_imagenet64_labeled.npz\n"
                                   "python -m minildm fid data/cifar10-train-png/ --save-stats cifar10_stats.npz\n"
                                   "python -m minildm fid samples.npz cifar10_stats.npz",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="SAMPLES REFERENCE", help="sample batch and reference, or the "
                                                                          "reference alone with --save-stats")
    p.add_argument("--save-stats", metavar="OUT.npz", help="write the reference's Inception statistics (mu, sigma)")
    p.add_argument("--fid-only", action="store_true", help="FID only (no IS, KID, precision/recall)")
    p.add_argument("--batch-size", type=_positive, default=250, help="images per Inception batch (default 250)")
    p.add_argument("--weights", help="Inception weights file (default: torch hub's cache, downloaded once)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(run=_fid)

    p = commands.add_parser("bpd", help="bits/dim (the variational bound) on held-out data",
                            description="Negative log-likelihood bound in bits/dim (Ho et al. 2020, Eq. 5) of "
                                        "CHECKPOINT on the first NUM items of the held-out split of its dataset. "
                                        "One network call per timestep per batch: T=1000 is slow on a CPU.")
    p.add_argument("checkpoint", help="checkpoint file written by training")
    p.add_argument("--num", type=_positive, default=64, help="number of held-out items (default 64)")
    p.add_argument("--batch-size", type=_positive, default=32)
    p.add_argument("--steps", type=_positive, help="evaluate the bound of the chain respaced to this many steps "
                                             "(default: all T steps, the paper's number)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.set_defaults(run=_bpd)

    p = commands.add_parser("info", help="print a checkpoint's metadata: step, version, config")
    p.add_argument("checkpoint")
    p.set_defaults(run=_info)
    return parser


# ---------------------------------------------------------------------------------------------
# Commands


def _presets(args) -> int:
    import minildm
    from minildm import presets

    names = args.names or presets.names()
    for name in names:
        presets.info(name)  # an unknown name: KeyError listing the presets, before any output
    columns = ""
    if args.memory:
        from minildm import memory

        columns = " " + " ".join(f"{c:>11}" for c in memory.COLUMNS)
    print(f"{'preset':<24} {'params':>13}{columns}  summary")
    for name in names:
        preset = presets.info(name)
        params, note = preset.params, ""
        if params is None or args.verify:
            built = sum(p.numel() for p in minildm.build_model(preset.config, device="meta").parameters())
            if params is not None and built != params:
                note = f" [minildm builds {built:,}]"
            params = built
        if args.memory:
            values = memory.preset_columns(name)  # keyed by memory.COLUMNS: the header's names
            columns = " " + " ".join(f"{values[key]:>11}" for key in memory.COLUMNS)
        print(f"{name:<24} {params:>13,}{columns}  {preset.summary}{note}")
    return 0


def _train(args) -> int:
    import os

    from minildm import checkpoints, config as config_lib, presets, train

    config = config_lib.override(presets.get(args.preset), args.overrides)
    out = Path(args.out or config.train.out_dir)
    existing = out / train.CHECKPOINT
    if existing.is_file() and not args.resume:
        step = checkpoints.read_metadata(existing)["step"]
        raise ValueError(f"{existing} already exists (step {step}); pass --resume to continue that run, "
                         f"or --out <folder> to start a new one")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the checkpoint, samples and log")
    config.train.out_dir = str(out)
    main_process = os.environ.get("RANK", "0") == "0"
    if args.device is not None:
        _device(args.device)
    if main_process and not args.quiet:
        overrides = f" (overrides: {' '.join(args.overrides)})" if args.overrides else ""
        print(f"training {args.preset} -> {out}{overrides}")
        if args.resume and not existing.is_file():
            print(f"--resume: no checkpoint in {out} yet, so this starts a new run")
    train.train(config, resume=args.resume, max_steps=args.max_steps, device=args.device, verbose=not args.quiet)
    if main_process and not args.quiet and config.train.save_every > 0:
        print(f"checkpoint: {existing}")
    return 0


def _load(args, checkpoint=None):
    """(model to use, config) from a checkpoint file or an official preset name (default: args.checkpoint).

    A preset name loads its released file (downloaded once, its size and SHA-256 checked); a latent diffusion
    preset is sampled as a whole model by `_sample_latent` instead.
    """
    from minildm import checkpoints, latent, presets

    checkpoint = checkpoint or args.checkpoint
    device = _device(args.device)
    path = Path(checkpoint)
    if not path.exists() and checkpoint in presets.names():
        if latent.is_latent_preset(checkpoint):
            raise ValueError(f"{checkpoint} is a latent diffusion preset: sample it as `python -m minildm sample "
                             f"{checkpoint}` (with --prompt or --class), not as a pixel model or a classifier")
        model, config = checkpoints.load_official(checkpoint, device=device)
        return model, config
    loaded = checkpoints.load(path, device=device, ema=args.ema)
    return (loaded.ema if args.ema and loaded.ema is not None else loaded.model), loaded.config


def _sample(args) -> int:
    """Sample a checkpoint to a .png grid or an .npz batch, sharded over the processes under torchrun."""
    import torch
    import torch.distributed as dist

    import minildm
    from minildm import evaluation, progress, train

    out = evaluation.check_output(args.out, (".png", ".npz"))  # before sampling: a long run must not fail at its end
    if _is_latent(args.checkpoint):
        return _sample_latent(args)
    if args.sampler == "plms" or args.prompt is not None:
        raise ValueError("--sampler plms and --prompt are for latent diffusion checkpoints (experiments.latent); "
                         f"{args.checkpoint} is not one")
    env = train.setup_distributed(_device(args.device))
    args.device = str(env.device)  # under torchrun: this process's GPU, cuda:LOCAL_RANK
    try:
        model, config = _load(args)
        if config.unet.super_res and config.model == "unet":
            raise ValueError("super-resolution models need low-resolution inputs; sample them from Python "
                             "(model_kwargs={'low_res': ...})")
        classifier = None
        if args.classifier:
            classifier, classifier_config = _load(args, args.classifier)
            if classifier_config.model != "classifier":
                raise ValueError(f"--classifier {args.classifier} holds a {classifier_config.model!r} model, not a "
                                 "noise-aware classifier (train one with `python -m minildm train shapes-classifier`)")
        if config.model != "unet":  # the 2-D toy: a scatter plot of points, one process
            if out.suffix.lower() == ".npz":
                raise ValueError("--out .npz holds images; this checkpoint is the 2-D toy: give --out points.png")
            if args.label is not None:
                raise ValueError(f"--class {args.label}: this model is unconditional (unet.num_classes=0); leave "
                                 "--class out (this checkpoint is the 2-D toy)")
            samples = train.generate(model, minildm.build_diffusion(config), config, args.num, sampler=args.sampler,
                                     steps=args.steps, eta=args.eta, seed=args.seed)
        else:  # sample_images checks --class against the model's (or the classifier's) classes
            images, labels = evaluation.sample_images(
                model, config, args.num, batch_size=args.batch_size, sampler=args.sampler, steps=args.steps,
                eta=args.eta, seed=args.seed, label=args.label, guidance_scale=args.guidance_scale,
                classifier=classifier, classifier_scale=args.classifier_scale if classifier is not None else 0.0,
                progress=progress.enabled())
        if env.main:
            if out.suffix.lower() == ".npz":
                path, count = evaluation.write_npz(out, images, labels), len(images)
            else:  # a grid: [-1, 1] floats, made here only (a float copy of 50,000 images would not fit in memory)
                if config.model == "unet":
                    samples = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
                path, count = train.save_grid(samples, out), len(samples)
            print(f"wrote {count} samples to {path}")
    finally:
        if env.started_here:
            dist.destroy_process_group()
    return 0


def _is_latent(checkpoint: str) -> bool:
    """Whether CHECKPOINT is a latent diffusion model: a file that says so, or a latent preset's name."""
    from minildm import checkpoints, latent

    if Path(checkpoint).is_file():
        return "latent" in checkpoints.read_metadata(checkpoint)["extra"]
    return not Path(checkpoint).exists() and latent.is_latent_preset(checkpoint)


def _fid(args) -> int:
    """The FID protocol (`evaluation.fid_report`), or the reference's statistics alone (`--save-stats`)."""
    import json

    from minildm import evaluation, metrics

    if len(args.inputs) > 2:
        raise ValueError(f"fid takes SAMPLES REFERENCE (or REFERENCE alone with --save-stats); got {len(args.inputs)} "
                         "paths")
    options = {"batch_size": args.batch_size, "device": _device(args.device), "weights_path": args.weights}
    if len(args.inputs) == 1 and args.save_stats is None:
        raise ValueError("fid needs SAMPLES and REFERENCE, e.g. `python -m minildm fid samples.npz reference.npz`; "
                         "with one path, add --save-stats OUT.npz to compute that reference's statistics")
    try:
        if len(args.inputs) == 1:
            report = evaluation.reference_statistics(args.inputs[0], args.save_stats, **options)
        else:
            report = evaluation.fid_report(*args.inputs, save_stats=args.save_stats, fid_only=args.fid_only, **options)
    except metrics.InceptionWeightsUnavailable as error:  # offline: the message names the file, URL and folder
        print(f"minildm fid: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


def _sample_latent(args) -> int:
    """Sample a latent diffusion model: a checkpoint file, or a latent preset's released file (ldm-cin256-v2,
    sd-v1; downloaded once and checked); --prompt (text, CLIP), --class (class labels) or nothing (unconditional).

    --out .npz: ADM's batch for FID through `evaluation.sample_images` (per-sample seeds, sharded under torchrun,
    labels drawn per sample unless --class); .png: a grid of `latent.sample` (classes 0, 1, 2, ... in turn).
    """
    import torch
    import torch.distributed as dist

    import minildm
    from minildm import conditioning, evaluation, latent, progress, train

    if args.classifier:
        raise ValueError("--classifier: latent diffusion checkpoints are guided without a classifier; use "
                         "--guidance-scale")
    out = evaluation.check_output(args.out, (".png", ".npz"))
    env = train.setup_distributed(_device(args.device))
    try:
        if not Path(args.checkpoint).exists() and latent.is_latent_preset(args.checkpoint):
            try:
                ldm = latent.load_official(args.checkpoint, device=env.device, use_ema=args.ema)
            except conditioning.PretrainedWeightsUnavailable as error:  # CLIP's tokenizer offline: as a download
                raise ConnectionError(str(error)) from None
        else:
            ldm = latent.load(args.checkpoint, device=env.device, ema=args.ema)
        if out.suffix.lower() == ".npz":  # sample_images checks --class and --prompt against the conditioner
            images, labels = evaluation.sample_images(
                ldm, ldm.config, args.num, batch_size=args.batch_size, sampler=args.sampler, steps=args.steps,
                eta=args.eta, seed=args.seed, label=args.label, guidance_scale=args.guidance_scale,
                prompt=args.prompt, progress=progress.enabled())
            if env.main:
                print(f"wrote {len(images)} samples to {evaluation.write_npz(out, images, labels)}")
            return 0
        kind = ldm.config.latent.conditioner
        if kind in ("text", "clip"):
            if args.prompt is None:
                raise ValueError("this checkpoint draws captions: give --prompt 'a large red circle on the left'")
            conditions = [args.prompt] * args.num
        elif kind == "class":
            classes = ldm.config.latent.cond_vocab - 1  # the last class is the null class
            if args.label is not None and not 0 <= args.label < classes:
                raise ValueError(f"--class {args.label}: this model has classes 0 .. {classes - 1}")
            conditions = torch.full((args.num,), args.label) if args.label is not None else \
                torch.arange(args.num) % classes
        elif kind == "none":
            conditions = None
        else:
            raise ValueError(f"sampling a latent.conditioner={kind!r} checkpoint needs its conditions (boxes, ...): "
                             "use minildm.latent.sample from Python")
        samples = latent.sample(ldm, minildm.build_diffusion(ldm.config), conditions, num=args.num,
                                sampler=args.sampler, steps=args.steps, eta=args.eta,
                                guidance_scale=args.guidance_scale, seed=args.seed, progress=progress.enabled())
        if env.main:
            print(f"wrote {len(samples)} samples to {train.save_grid(samples, out)}")
        return 0
    finally:
        if env.started_here:
            dist.destroy_process_group()


def _bpd(args) -> int:
    import torch

    import minildm
    from minildm import data, progress, schedules

    model, config = _load(args)
    if config.model != "unet":
        raise ValueError("bits/dim is defined for images on the 256-level grid; this checkpoint is a 2-D toy")
    diffusion = minildm.build_diffusion(config)
    dataset = data.build_dataset(config.data, train=False)
    num = min(args.num, len(dataset))
    timesteps = None
    if args.steps:
        timesteps = schedules.space_timesteps(diffusion.num_timesteps, str(args.steps))
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(args.seed)
    totals = []
    for start in range(0, num, args.batch_size):
        items = [dataset[i] for i in range(start, min(start + args.batch_size, num))]
        x0 = torch.stack([item[0] for item in items]).to(device)
        y = torch.tensor([item[1] for item in items], device=device)
        kwargs = {"y": y} if config.unet.num_classes > 0 else None
        result = diffusion.bits_per_dim(model, x0, model_kwargs=kwargs, timesteps=timesteps, generator=generator,
                                        progress=progress.enabled())
        totals.append(result["total_bpd"].cpu())
    totals = torch.cat(totals).double()
    stderr = totals.std().item() / len(totals) ** 0.5 if len(totals) > 1 else float("nan")
    chain = f"{len(timesteps)}-step respaced chain" if timesteps else f"T={diffusion.num_timesteps}"
    print(f"bits/dim: {totals.mean().item():.4f} +- {stderr:.4f} (held-out {config.data.dataset}, n={num}, {chain})")
    return 0


def _info(args) -> int:
    import json

    from minildm import checkpoints

    metadata = checkpoints.read_metadata(args.checkpoint)
    keys = metadata.pop("keys")
    metadata.pop("optimizer", None)
    print(json.dumps(metadata, indent=2))
    print(f"{sum(k.startswith('model.') for k in keys)} model tensors, "
          f"{sum(k.startswith('ema.') for k in keys)} EMA tensors, "
          f"{sum(k.startswith('optimizer.') for k in keys)} optimizer tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
