"""Perceptual compression in small: LDM's first stage trained on 32x32 shapes (chapter 05).

Every model trains through `train.train` on the preset's data (ShapesDataset seed 0) and is scored on 1,000
held-out shapes (seed 1) by `evaluate`: PSNR and SSIM of the reconstructions (from the posterior mean / the
quantised latent), the reconstruction Fréchet distance on shapes-evaluator features (LDM's rFID, but not
Inception features), the latent's standard deviation and scale factor, and for VQ models the codebook usage.

    python -m minildm.experiments.autoencoders ship ae-kl-f4-shapes          # a shipped model and its card
    python -m minildm.experiments.autoencoders rate-distortion --steps 1500  # KL at f = 2, 4, 8 (LDM Fig. 2, Tab. 8)
    python -m minildm.experiments.autoencoders losses --steps 1500           # L1 / + perceptual / + GAN at f = 4
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from minildm import autoencoder, checkpoints, config as config_lib, data, metrics, presets, train

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINTS = ROOT / "data" / "checkpoints"
RESULTS = ROOT / "data" / "results"
HELDOUT_SEED = 1  # the held-out split of the procedural data (data.build_dataset(train=False))


def heldout_images(num: int = 1000, image_size: int = 32) -> torch.Tensor:
    """Held-out shapes [num, 3, side, side] in [-1, 1] (ShapesDataset seed 1, never trained on)."""
    return data.ShapesDataset(num, image_size, seed=HELDOUT_SEED).tensors()[0]


@torch.no_grad()
def reconstruct(ae: autoencoder.Autoencoder, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Deterministic reconstructions in [-1, 1]: KL decodes the posterior mean, VQ the quantised latent."""
    out = []
    for batch in images.split(batch_size):
        if isinstance(ae, autoencoder.AutoencoderKL):
            out.append(ae.decode(ae.encode(batch).mode()))
        else:
            out.append(ae.decode(ae.encode(batch)[0]))
    return torch.cat(out).clamp(-1, 1)


def evaluate(ae: autoencoder.Autoencoder, images: torch.Tensor | None = None) -> dict:
    """Reconstruction quality and latent statistics of `ae` on `images` (default: 1,000 held-out shapes)."""
    images = heldout_images() if images is None else images
    ae = ae.eval()
    rec = reconstruct(ae, images)
    psnr, ssim = metrics.psnr(images, rec), metrics.ssim(images, rec)
    latents = autoencoder.encode_latents(ae, images, generator=torch.Generator().manual_seed(0))
    c = ae.config
    report = {
        "kind": c.kind, "f": ae.factor, "latent_shape": list(ae.latent_shape(images.shape[-1])),
        "compression": images[0].numel() / latents[0].numel(),
        "psnr": psnr.mean().item(), "psnr_std": psnr.std().item(),
        "ssim": ssim.mean().item(), "ssim_std": ssim.std().item(),
        "reconstruction_distance": metrics.reconstruction_distance(images, rec),
        "latent_std": latents.flatten().std().item(), "scale_factor": 1.0 / latents.flatten().std().item(),
        "num_images": len(images),
    }
    if c.kind == "vq":
        usage = autoencoder.codebook_usage(ae, images)
        report.update(codebook_size=c.n_embed, codes_used=usage["used"], dead_codes=usage["dead"],
                      perplexity=usage["perplexity"])
    return report


def train_one(config, out_dir, *, max_steps=None, verbose=True) -> tuple[autoencoder.Autoencoder, float]:
    """Train `config` through the one training loop; (autoencoder in eval mode, wall seconds)."""
    torch.manual_seed(config.train.seed)
    start = time.perf_counter()
    model, _ = train.train(config, out_dir=out_dir, max_steps=max_steps, resume=True, verbose=verbose)
    return model.eval(), time.perf_counter() - start


def ship(name: str, *, out=None, run_dir=None) -> dict:
    """Train preset `name` fully, score it and write data/checkpoints/<name>.safetensors (+ .json card data).

    The checkpoint holds the autoencoder (no optimiser, no discriminator) and, in its metadata, the latent
    scale factor and the scores: `checkpoints.read_metadata(path)["extra"]`.
    """
    config = presets.get(name)
    run_dir = Path(run_dir or f"runs/{name}")
    ae, _ = train_one(config, run_dir)
    seconds = training_seconds(run_dir / "log.jsonl")
    report = evaluate(ae)
    training_images = data.build_dataset(config.data, train=True).tensors()[0][:2000]
    report["scale_factor_train"] = autoencoder.latent_scale_factor(ae, training_images,
                                                                   generator=torch.Generator().manual_seed(0))
    report.update(train_seconds=seconds, steps=config.train.max_steps, threads=torch.get_num_threads(),
                  machine=platform.machine(), command=f"python -m minildm.experiments.autoencoders ship {name}")
    path = Path(out or CHECKPOINTS / f"{name}.safetensors")
    checkpoints.save(path, ae, config, step=config.train.max_steps,
                     extra={"scale_factor": report["scale_factor_train"], "scores": report})
    path.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def training_seconds(log_path) -> float:
    """Time spent in training steps, from a run's log.jsonl (steps_per_s of every logged window; a resumed
    run's repeated windows count once), so a run stopped and resumed is timed as if it ran in one go."""
    records = {}
    for line in Path(log_path).read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    steps, seconds = 0, 0.0
    for step in sorted(records):
        seconds += (step - steps) / records[step]["steps_per_s"]
        steps = step
    return seconds


def load_shipped(name: str, folder=None) -> tuple[autoencoder.Autoencoder, float]:
    """(autoencoder in eval mode, latent scale factor) of a shipped shapes autoencoder."""
    path = Path(folder or CHECKPOINTS) / f"{name}.safetensors"
    loaded = checkpoints.load(path, ema=False)
    return loaded.model.requires_grad_(False), float(loaded.metadata["extra"]["scale_factor"])


def _variant(base: str, overrides: list[str], steps: int):
    config = config_lib.override(presets.get(base), overrides)
    config.train.max_steps = steps
    config.autoencoder_loss.disc_start = min(config.autoencoder_loss.disc_start, steps // 2)
    config.train.lr_decay_steps = steps // 3
    config.train.save_every = steps  # the finished run is kept: a second sweep with the same variant reuses it
    return config


RATE_DISTORTION = {  # f = 2^(levels - 1); the latent keeps 3 channels: 16x16x3, 8x8x3, 4x4x3
    2: ["autoencoder.channel_mult=1,2"],
    4: ["autoencoder.channel_mult=1,2,2"],
    8: ["autoencoder.channel_mult=1,2,2,2"],
}
LOSSES = {  # what each term of LDM's loss buys, at f = 4
    "L1": ["autoencoder_loss.perceptual=none", "autoencoder_loss.disc_factor=0"],
    "L1 + perceptual": ["autoencoder_loss.disc_factor=0"],
    "L1 + perceptual + GAN": [],
}


def sweep(variants: dict, steps: int, *, base="ae-kl-f4-shapes", run_root="runs/autoencoders", out=None,
          grid=None) -> dict:
    """Train each variant (preset `base` + overrides) for `steps` steps and score it; returns and writes a report.

    A variant whose finished run is already in `run_root` (same base, overrides and steps) is scored, not
    retrained. grid: a PNG of 8 held-out images (top row) and each variant's reconstructions (one row each).
    """
    rows, grids = {}, [heldout_images(8)]
    for key, overrides in variants.items():
        config = _variant(base, overrides, steps)
        slug = "-".join(o.split(".")[-1].replace("=", "") for o in sorted(overrides)).replace(",", "") or "base"
        run_dir = Path(run_root) / f"{base}-{steps}-{slug}"
        timing = run_dir / "seconds.json"
        ae, seconds = train_one(config, run_dir, verbose=False)
        if timing.is_file():  # trained by an earlier sweep: report that run's time
            seconds = json.loads(timing.read_text())["train_seconds"]
        else:
            timing.write_text(json.dumps({"train_seconds": seconds}))
        rows[str(key)] = {**evaluate(ae), "overrides": overrides, "train_seconds": seconds}
        grids.append(reconstruct(ae, grids[0]))
        print(key, {k: round(v, 4) if isinstance(v, float) else v for k, v in rows[str(key)].items()}, flush=True)
    report = {"base": base, "steps": steps, "rows": rows, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "command": " ".join(["python -m minildm.experiments.autoencoders",
                                                                 *sys.argv[1:]])}
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    if grid:
        from torchvision.utils import save_image

        save_image((torch.cat(grids).clamp(-1, 1) + 1) / 2, grid, nrow=len(grids[0]), padding=1)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minildm.experiments.autoencoders", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ship_parser = sub.add_parser("ship", help="train a shapes autoencoder preset and write its checkpoint")
    ship_parser.add_argument("name", choices=["ae-kl-f4-shapes", "ae-vq-f4-shapes"])
    for command in ("rate-distortion", "losses"):
        p = sub.add_parser(command)
        p.add_argument("--steps", type=int, default=1500)
        p.add_argument("--base", default="ae-kl-f4-shapes")
        p.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.command == "ship":
        print(json.dumps(ship(args.name), indent=2))
    else:
        variants, stem = (RATE_DISTORTION, "ae_rate_distortion") if args.command == "rate-distortion" \
            else (LOSSES, "ae_losses")
        out = Path(args.out or RESULTS / f"{stem}.json")
        sweep(variants, args.steps, base=args.base, out=out, grid=out.with_name(f"{stem}_reconstructions.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
