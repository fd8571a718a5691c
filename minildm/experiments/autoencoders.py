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

from minildm import autoencoder, checkpoints, data, metrics, presets, train
from minildm import config as config_lib

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
    out, device = [], ae.last_layer.device
    for batch in images.to(device).split(batch_size):
        if isinstance(ae, autoencoder.AutoencoderKL):
            out.append(ae.decode(ae.encode(batch).mode()))
        else:
            out.append(ae.decode(ae.encode(batch)[0]))
    return torch.cat(out).clamp(-1, 1).cpu()


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
    report.update(training_set_scores(ae, config))
    report.update(train_seconds=seconds, steps=config.train.max_steps, threads=torch.get_num_threads(),
                  machine=platform.machine(), command=f"python -m minildm.experiments.autoencoders ship {name}")
    path = Path(out or CHECKPOINTS / f"{name}.safetensors")
    checkpoints.save(path, ae, config, step=config.train.max_steps,
                     extra={"scale_factor": report["scale_factor_train"], "scores": report})
    path.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    write_card(name, path.parent)
    return report


def write_card(name: str, folder=None) -> Path:
    """Write the model card `<name>.md` and `<name>-reconstructions.png` of a shipped autoencoder from its scores."""
    folder = Path(folder or CHECKPOINTS)
    report = json.loads((folder / f"{name}.json").read_text())
    ae, scale = load_shipped(name, folder)
    config = config_lib.from_dict(checkpoints.read_metadata(folder / f"{name}.safetensors")["config"])
    c, loss, t = config.autoencoder, config.autoencoder_loss, config.train
    originals = heldout_images(8)
    from torchvision.utils import save_image

    save_image((torch.cat([originals, reconstruct(ae, originals)]) + 1) / 2,
               folder / f"{name}-reconstructions.png", nrow=8, padding=1, pad_value=1)
    kl = c.kind == "kl"
    r = report
    regulariser = (f"KL to N(0, I), weight {loss.kl_weight:g} (LDM's)" if kl else
                   f"codebook of {c.n_embed} codes x {c.embed_dim} (beta {c.beta:g} on the codebook term, taming's "
                   f"legacy placement), codebook weight {loss.codebook_weight:g}")
    gan = (f" + a {loss.disc_num_layers}-layer PatchGAN's hinge loss with the adaptive weight x {loss.disc_weight:g}, "
           f"from step {loss.disc_start:,}") if loss.disc_factor > 0 else "; no GAN term (disc_factor 0)"
    notes = "".join(f"- {note}\n" for note in r.get("notes", []))
    minutes, seconds = divmod(round(r["train_seconds"]), 60)
    side = "x".join(map(str, r["latent_shape"][1:]))
    usage_head, usage_rule, usage = ("", "", "") if kl else (
        " codes used | perplexity |", "---|---|",
        f" {r['codes_used']} of {r['codebook_size']} | {r['perplexity']:.1f} |")
    epoch = "" if kl or "epoch_codes_used" not in r else (
        f"- Codebook: one epoch of the training set ({config.data.num_samples:,} images) chooses "
        f"{r['epoch_codes_used']} of the {r['codebook_size']} codes (perplexity {r['epoch_perplexity']:.1f}); "
        f"{r['epoch_dead_codes']} are dead: "
        "never chosen, so they get no gradient.\n")
    card = f"""# Model card: `{name}.safetensors`

A {c.kind.upper()}-regularised autoencoder (LDM's first stage, Rombach et al. 2022, Sec. 3.1) for the course's
32x32 shapes: chapter 05 studies it, chapter 06 runs latent diffusion in its latent.

| | |
|---|---|
| file | `{name}.safetensors`, {(folder / f"{name}.safetensors").stat().st_size / 1e6:.1f} MB: `model.*` (the autoencoder; no EMA, no optimizer, no discriminator); the latent scale factor and these scores are in its metadata (`checkpoints.read_metadata(path)["extra"]`) |
| preset | `{name}`; train and score: `{r["command"]}` |
| network | LDM's {"AutoencoderKL" if kl else "VQModel"} (`minildm.autoencoder`): width {c.channels}, mult {",".join(f"{m:g}" for m in c.channel_mult)}, {c.num_res_blocks} res block per level, attention in the middle only, {c.norm_groups} GroupNorm groups, {sum(p.numel() for p in ae.parameters()):,} parameters; 32x32x3 -> {side}x{r["latent_shape"][0]} (f = {r["f"]}, {r["compression"]:g}x fewer numbers) |
| loss | LDM's: L1 + {loss.perceptual_weight:g} x perceptual distance (the offline substitute, distances of the shipped shapes-classifier's features at t = 0, `autoencoder_loss.ClassifierFeatureDistance`; not LPIPS) + {regulariser}{gan} |
| data | `ShapesDataset({config.data.num_samples:,}, 32)` (seed 0), no flips |
| optimizer | AdamW (weight decay 0, i.e. Adam) betas (0.5, 0.9) for the autoencoder and for the discriminator, lr {t.lr:g}, warm-up {t.warmup_steps} steps, cosine to 0 over the last {t.lr_decay_steps:,}; batch {t.batch_size}; no EMA, no clipping |
| time | {minutes} min {seconds} s of training steps for {r["steps"]:,} steps, one thread of a 2-core {r["machine"]} CPU, with another training run on the second core |

## Scores on {r["num_images"]:,} held-out shapes (seed 1, never trained on)

Reconstructions decode the posterior mean (KL) or the quantised latent (VQ), clamped to [-1, 1].

| PSNR (dB) | SSIM | reconstruction distance | latent std | scale factor |{usage_head}
|---|---|---|---|---|{usage_rule}
| {r["psnr"]:.2f} ± {r["psnr_std"]:.2f} | {r["ssim"]:.4f} ± {r["ssim_std"]:.4f} | {r["reconstruction_distance"]:.1f} | {r["latent_std"]:.3f} | {scale:.4f} |{usage}

- PSNR = 10 log10(4 / MSE) per image ([-1, 1] images), mean ± std over the images; SSIM: torchmetrics'
  (Gaussian window 11, sigma 1.5).
- Reconstruction distance: the Fréchet distance between the shapes-evaluator features of the originals and of
  their reconstructions (LDM's rFID in small; not Inception features; 0 = indistinguishable).
- Scale factor: 1 / std of the latents of the first 2,000 training images ({scale:.4f}; on the held-out images
  {r["scale_factor"]:.4f}). Latent diffusion trains on z x scale factor (LDM's `scale_by_std`; Stable Diffusion
  fixes 0.18215 for its KL-f8).
{epoch}{notes}
![8 held-out shapes and their reconstructions]({name}-reconstructions.png)

Top: held-out shapes; bottom: their reconstructions.
"""
    path = folder / f"{name}.md"
    path.write_text(card)
    return path


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


def training_set_scores(ae: autoencoder.Autoencoder, config) -> dict:
    """The scale factor from the first 2,000 training images (as the training loop stores it) and, for a VQ
    model, the codes one epoch of the training set chooses (codes never chosen are dead: they get no gradient)."""
    images = data.build_dataset(config.data, train=True).tensors()[0]
    scores = {"scale_factor_train": autoencoder.stored_scale_factor(ae, images)}
    if config.autoencoder.kind == "vq":
        usage = autoencoder.codebook_usage(ae, images)
        scores.update(epoch_codes_used=usage["used"], epoch_dead_codes=usage["dead"],
                      epoch_perplexity=usage["perplexity"])
    return scores


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
    4: [],  # the preset's own mult 1,2,2 (and the same run as the "L1 + perceptual" row of LOSSES)
    8: ["autoencoder.channel_mult=1,2,2,2"],
}
LOSSES = {  # what each term of LDM's loss buys, at f = 4 (ae-kl-f4-shapes has no GAN term: disc_factor 0).
    # The preset's own row comes last: run beside `rate-distortion`, it then reuses that sweep's finished f = 4 run.
    "L1": ["autoencoder_loss.perceptual=none"],
    "L1 + perceptual + GAN": ["autoencoder_loss.disc_factor=1"],
    "L1 + perceptual": [],
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
        while True:
            try:
                ae, seconds = train_one(config, run_dir, verbose=False)
                break
            except train.RunLockedError:  # the other sweep is training this very run: wait, then reuse it
                time.sleep(30)
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

        save_image((torch.cat(grids).clamp(-1, 1) + 1) / 2, grid, nrow=len(grids[0]), padding=1, pad_value=1)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minildm.experiments.autoencoders", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ship_parser = sub.add_parser("ship", help="train a shapes autoencoder preset and write its checkpoint")
    ship_parser.add_argument("name", choices=["ae-kl-f4-shapes", "ae-vq-f4-shapes"])
    card_parser = sub.add_parser("card", help="rewrite the model card of a shipped autoencoder from its scores")
    card_parser.add_argument("name", choices=["ae-kl-f4-shapes", "ae-vq-f4-shapes"])
    for command in ("rate-distortion", "losses"):
        p = sub.add_parser(command)
        p.add_argument("--steps", type=int, default=1500)
        p.add_argument("--base", default="ae-kl-f4-shapes")
        p.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.command == "ship":
        print(json.dumps(ship(args.name), indent=2))
    elif args.command == "card":
        print(write_card(args.name))
    else:
        variants, stem = (RATE_DISTORTION, "ae_rate_distortion") if args.command == "rate-distortion" \
            else (LOSSES, "ae_losses")
        out = Path(args.out or RESULTS / f"{stem}.json")
        sweep(variants, args.steps, base=args.base, out=out, grid=out.with_name(f"{stem}_reconstructions.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
