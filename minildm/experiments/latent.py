"""Latent diffusion in small (chapter 06): the shipped shapes LDMs, how well they follow their conditions, and the
cost of latent against pixel space.

    python -m minildm.experiments.latent ship ldm-shapes-class      # train, score, write data/checkpoints/<name>.*
    python -m minildm.experiments.latent ship ldm-shapes-text
    python -m minildm.experiments.latent ship ldm-shapes-layout
    python -m minildm.experiments.latent follow ldm-shapes-text --num 500 --scales 0,1,2,3,5
    python -m minildm.experiments.latent card ldm-shapes-text       # rewrite a model card from its scores
    python -m minildm.experiments.latent cost                       # latent vs pixel: s / training step, s / sample
    python -m minildm.experiments.latent quality --num 500          # latent vs pixel: scores of the shipped models

Caption following is read off each sample by the course's shapes evaluator (kind, colour) and by its pixels
(position: the 3x3 cell of the centre of the object's bounding box; size: the box's longer side against the
small/large threshold), and compared with what the caption asked for; layouts by the IoU of the lit pixels with
the boxes and the evaluator's kind in each box (`box_scores`). The same scoring on real images of those
conditions is the ceiling.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

import minildm
from minildm import checkpoints, conditioning, data, latent, metrics, presets, train
from minildm.experiments.autoencoders import training_seconds
from minildm.layers import count_parameters

CHECKPOINTS = Path(__file__).resolve().parents[2] / "data" / "checkpoints"
RESULTS = Path(__file__).resolve().parents[2] / "data" / "results"
ATTRIBUTES = ("kind", "color", "position", "size")
LAYOUT_GRID = 8  # the layout model's lattice: 8 x 8 corner positions, 32 / 7 pixels apart at 32 x 32


def shapes_data(config, train_split: bool = True) -> data.ShapesDataset:
    """The preset's shapes (seed 0 for training, 1 held out), with its data.max_objects."""
    return data.ShapesDataset(config.data.num_samples if train_split else 2000, config.data.image_size,
                              seed=0 if train_split else 1, label="kind", max_objects=config.data.max_objects)


def build_for(name: str):
    """(config, fresh LatentDiffusion, training set) of preset `name`; the text model's tokenizer from the captions."""
    config = presets.get(name)
    shapes = shapes_data(config)
    tokenizer = None
    if config.latent.conditioner == "text":
        tokenizer = conditioning.WordTokenizer.from_captions(shapes.captions)
        config.latent.cond_vocab, config.latent.cond_length = tokenizer.vocab_size, tokenizer.max_length
    elif config.latent.conditioner == "layout":
        tokenizer = conditioning.LayoutTokenizer(len(data.SHAPES), grid=LAYOUT_GRID, max_boxes=config.data.max_objects)
    torch.manual_seed(config.train.seed)
    return config, latent.build(config, tokenizer=tokenizer), shapes


def conditions_of(config, shapes: data.ShapesDataset):
    """What the model is conditioned on: the kind labels [N], the captions (a list of str) or the layouts
    (boxes, kinds of the boxes)."""
    kind = config.latent.conditioner
    if kind == "layout":
        return shapes.boxes, shapes.box_labels
    return shapes.labels if kind == "class" else shapes.captions


def train_one(name: str, run_dir=None, max_steps=None):
    """Train preset `name` in `run_dir` (resumes); returns (config, EMA LatentDiffusion, seconds of encoding)."""
    config, ldm, shapes = build_for(name)
    start = time.perf_counter()
    z0, cond = latent.training_data(ldm, shapes.tensors()[0], conditions_of(config, shapes))
    encode_seconds = time.perf_counter() - start
    trained = train.train(config, dataset=(z0, cond), model=ldm, out_dir=run_dir or config.train.out_dir,
                          max_steps=max_steps)
    return config, trained.ema, encode_seconds


def ship(name: str, *, run_dir=None, out=None, num: int = 500) -> dict:
    """Train preset `name`, score its condition following and write data/checkpoints/<name>.safetensors + .json."""
    run_dir = Path(run_dir or f"runs/{name}")
    config, ema, encode_seconds = train_one(name, run_dir)
    report = {"train_seconds": training_seconds(run_dir / "log.jsonl"), "encode_seconds": encode_seconds,
              "steps": config.train.max_steps, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "command": f"python -m minildm.experiments.latent ship {name}"}
    report["follow"] = follow(ema, num=num, scales=(1.0, 3.0), max_objects=config.data.max_objects)
    path = Path(out or CHECKPOINTS / f"{name}.safetensors")
    checkpoints.save(path, ema, config, step=config.train.max_steps,
                     extra={**ema.checkpoint_metadata(), "scores": report})
    path.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    write_card(name, path.parent)
    return report


DESCRIPTION = {
    "class": "class-conditional: the kind of shape (circle, square, triangle, diamond, cross) is one context token "
             "from LDM's `ClassEmbedder` (6 rows: the 5 kinds and the null class 5)",
    "text": "text-to-image: a caption ('a large red circle on the left') becomes 8 word tokens (`WordTokenizer`, "
            "26 words) and LDM's `TransformerEmbedder` (2 layers, width 64, trained with the UNet) turns them into "
            "8 context tokens; the empty caption is the null condition",
    "layout": "layout-to-image: 1-2 boxes, each (kind, top-left corner, bottom-right corner) on an 8x8 lattice "
              "(`LayoutTokenizer`, LDM's layout tokens), through LDM's `TransformerEmbedder` (2 layers, width 64); "
              "no boxes is the null condition",
}


def write_card(name: str, folder=None) -> Path:
    """Write `<name>.md` and `<name>-samples.png` of a shipped shapes LDM from its checkpoint and .json scores."""
    from torchvision.utils import save_image

    folder = Path(folder or CHECKPOINTS)
    report = json.loads((folder / f"{name}.json").read_text())
    ldm = load_shipped(name, folder)
    config, kind = ldm.config, ldm.config.latent.conditioner
    scenes = requests(16, max_objects=config.data.max_objects)
    conditions = conditions_of(config, scenes)
    diffusion = minildm.build_diffusion(config)
    rows = [latent.sample(ldm, diffusion, conditions, steps=25, guidance_scale=w, seed=0) for w in (1.0, 3.0)]
    save_image((torch.cat([scenes.tensors()[0], *rows]) + 1) / 2, folder / f"{name}-samples.png", nrow=16,
               padding=1, pad_value=1)
    sweep = RESULTS / f"{name}_follow_ddim.json"  # the chapter's sweep over more scales, when it has been run
    follow_report = json.loads(sweep.read_text()) if sweep.is_file() else report["follow"]
    keys = {"layout": ["iou", "box_kind", "empty_outside"], "class": ["kind"]}.get(
        kind, ["kind", "color", "position", "size", "all"])
    table = "| w | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    for w, scores in follow_report["scales"].items():
        table += f"| {w} | " + " | ".join(f"{scores[key]:.3f}" for key in keys) + " |\n"
    table += "| real images | " + " | ".join(f"{follow_report['real'][key]:.3f}" for key in keys) + " |\n"
    minutes, seconds = divmod(round(report["train_seconds"]), 60)
    t, u = config.train, config.unet
    counts = {part: count_parameters(module) for part, module in
              (("UNet", ldm.unet), ("conditioner", ldm.cond_stage_model), ("first stage", ldm.first_stage_model))}
    asked = {"layout": "layouts", "class": "kinds", "text": "captions"}[kind]
    scoring = {
        "layout": "IoU of the lit pixels with the boxes, the evaluator's kind of each box's crop, no object outside "
                  "the boxes.",
        "class": "Kind as the course's shapes evaluator reads it (the class asks for nothing else).",
        "text": "Kind and colour as the course's shapes evaluator reads them; position: the 3x3 cell of the object's "
                "box centre; size: its longer side against 0.4 of the image; all: the four at once.",
    }[kind]
    rows_text = f"real images of the asked {asked} (top), samples at w = 1 (middle) and w = 3 (bottom)"
    card = f"""# Model card: `{name}.safetensors`

A latent diffusion model (Rombach et al. 2022) for the course's 32x32 shapes, {DESCRIPTION[kind]}.

It diffuses in the 8x8x3 latent of the shipped KL autoencoder of chapter 05 (`ae-kl-f4-shapes`), scaled by its stored
factor s = {ldm.scale_factor.item():.4f}. Chapter 06 samples it.

| | |
|---|---|
| file | `{name}.safetensors`, {(folder / f"{name}.safetensors").stat().st_size / 1e6:.1f} MB: `model.*` = the EMA weights of the whole `LatentDiffusion` (UNet `model.diffusion_model.*`, conditioner `cond_stage_model.*`, a copy of the first stage `first_stage_model.*`, `scale_factor`); the tokenizer and the first stage's settings in its metadata. Load with `minildm.latent.load(path)` |
| preset | `{name}`; train and score: `{report["command"]}` |
| network | UNet {counts["UNet"]:,} parameters (ch {u.channels}, mult {",".join(f"{m:g}" for m in u.channel_mult)}, {u.num_res_blocks} res block per level, SpatialTransformer at 8x8 and 4x4, {u.num_head_channels} channels per head, context {u.context_dim}); conditioner {counts["conditioner"]:,}; first stage {counts["first stage"]:,} (frozen) |
| process | LDM's: T = 1000, sqrt-linear betas {config.diffusion.beta_start:g} to {config.diffusion.beta_end:g}, eps prediction, L2 loss with Min-SNR-{config.diffusion.snr_gamma:g} weighting |
| training | {t.max_steps:,} steps of batch {t.batch_size} on latents encoded once (posterior means of {config.data.num_samples:,} shapes, {report["encode_seconds"]:.0f} s), AdamW lr {t.lr:g} (warm-up {t.warmup_steps}, cosine over the last {t.lr_decay_steps:,} steps), EMA {t.ema_decay:g} with warm-up, condition dropout {t.cond_dropout:g} (classifier-free guidance) |
| time | {minutes} min {seconds} s wall on one thread of a 2-core {report["machine"]} CPU (other runs shared the machine) |
{"".join(f"{chr(10)}- {note}" for note in report.get("notes", []))}

![samples](./{name}-samples.png)

*{rows_text}; DDIM 25 steps, seed 0.*

## Condition following

{follow_report["num"]} held-out scenes (data seed 1), their {asked} asked for, one sample each, DDIM {follow_report["steps"]} steps, seed {follow_report["seed"]}; the same scoring on the real images is the ceiling.
{scoring}

{table}
`w` is the classifier-free guidance scale (1: none, the conditional model alone; 0: the unconditional model).
{f"Scores from `{follow_report['command']}`." if "command" in follow_report else ""}
{against_pixels(kind)}"""
    path = folder / f"{name}.md"
    path.write_text(card)
    return path


def against_pixels(kind: str) -> str:
    """The cards' section on latent against pixel space, from data/results/ldm_cost.json and ldm_vs_pixel.json."""
    cost_path, quality_path = RESULTS / "ldm_cost.json", RESULTS / "ldm_vs_pixel.json"
    if kind == "layout" or not cost_path.is_file():
        return ""
    c = json.loads(cost_path.read_text())
    mine, pixel = c[f"latent_{kind}"], c["pixel"]
    text = ("\n## Against pixel space\n\n"
            f"Against the shipped class-conditional pixel UNet `ddpm-shapes-cond` (32x32x3, {pixel['params']:,} "
            f"parameters), on one thread, measured side by side (`{c['command']}`): a training step of batch "
            f"{c['batch']} takes {1000 * mine['step_seconds']:.0f} ms here against {1000 * pixel['step_seconds']:.0f} "
            f"ms ({mine['step_ratio']:.1f}x faster), a sample (DDIM {c['steps']} steps, decoding included) "
            f"{1000 * mine['sample_seconds']:.0f} ms against {1000 * pixel['sample_seconds']:.0f} ms "
            f"({mine['sample_ratio']:.1f}x), with {mine['params']:,} trained parameters on {mine['values_per_image']} "
            f"numbers per image instead of {pixel['values_per_image']:,}. Encoding the training set once costs "
            f"{1000 * c['encode_seconds_per_image']:.1f} ms per image.\n")
    if kind == "class" and quality_path.is_file():
        q = json.loads(quality_path.read_text())
        rows = "".join(f"| {label} | {q['pixel'][key]:.3f} | {q['latent'][key]:.3f} |\n" for label, key in (
            ("Fréchet distance (floor {:.1f})".format(q["pixel"]["frechet_distance_floor"]), "frechet_distance_to_real"),
            ("precision", "precision"), ("recall", "recall"), ("requested kind", "requested_kind_accuracy"),
            ("confident", "confident_fraction")))
        text += f"""
Sample quality at equal N ({q["num"]} samples each, kinds i mod 5, DDIM {q["steps"]} steps, no guidance; on
shapes-evaluator features, not FID; `{q["command"]}`):

| | pixel UNet | this model |
|---|---|---|
{rows}| training images | {q["pixel"]["train_images"]:,} | {q["latent"]["train_images"]:,} |
"""
    return text


def load_shipped(name: str, folder=None) -> latent.LatentDiffusion:
    return latent.load(Path(folder or CHECKPOINTS) / f"{name}.safetensors")


# ---------------------------------------------------------------------------------------------
# Condition following


def requests(num: int, seed: int = 1, max_objects: int = 1) -> data.ShapesDataset:
    """`num` held-out scenes (seed 1): their captions, kinds, colours, positions, sizes and boxes are what is
    asked for."""
    return data.ShapesDataset(num, 32, seed=seed, label="kind", max_objects=max_objects)


def read_attributes(images: torch.Tensor, evaluator=None) -> dict[str, torch.Tensor]:
    """What each image [N, 3, 32, 32] in [-1, 1] shows: kind and colour (the evaluator's argmax), position (0-8,
    the 3x3 cell of the centre of the lit pixels' bounding box, row-major) and size (0 small, 1 large: the box's
    longer side against 0.4 of the image: small objects span at most 0.39, large ones at least 0.41), all [N]."""
    evaluator = evaluator or metrics.load_evaluator()
    out = metrics.classify(images, evaluator)
    lit = ((images + 1) / 2).amax(1) > 0.25  # [N, H, W]: the object (the background is black)
    side = images.shape[-1]
    index = torch.arange(side)

    def extent(mask):  # first and last lit index along the last dim, as fractions of the side
        first = torch.where(mask, index, side).amin(-1)
        last = torch.where(mask, index, -1).amax(-1)
        return first.float() / side, (last.float() + 1) / side

    x0, x1 = extent(lit.any(1))
    y0, y1 = extent(lit.any(2))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    position = (cy * 3).long().clamp(0, 2) * 3 + (cx * 3).long().clamp(0, 2)
    size = (torch.maximum(x1 - x0, y1 - y0) > 0.4).long()
    return {"kind": out["kind"], "color": out["color"], "position": position, "size": size}


def asked_attributes(scenes: data.ShapesDataset) -> dict[str, torch.Tensor]:
    """What the captions of `scenes` ask for, in `read_attributes`' terms, all [N]."""
    o = scenes.objects
    cx, cy = o["cx"][:, 0], o["cy"][:, 0]
    position = (cy * 3).long().clamp(0, 2) * 3 + (cx * 3).long().clamp(0, 2)
    return {"kind": o["kind"][:, 0], "color": o["color"][:, 0], "position": position, "size": o["size"][:, 0]}


def follow_scores(images: torch.Tensor, scenes: data.ShapesDataset, evaluator=None) -> dict[str, float]:
    """Share of images whose kind, colour, position, size (and all four) are the asked ones."""
    seen, asked = read_attributes(images, evaluator), asked_attributes(scenes)
    hits = {key: (seen[key] == asked[key]).float() for key in ATTRIBUTES}
    scores = {key: hit.mean().item() for key, hit in hits.items()}
    scores["all"] = torch.stack(list(hits.values())).prod(0).mean().item()
    return scores


def box_scores(images: torch.Tensor, scenes: data.ShapesDataset, evaluator=None) -> dict[str, float]:
    """How well images [N, 3, 32, 32] draw the layouts of `scenes`.

    iou: mean IoU of the lit pixels with the union of the asked boxes (an object fills 50-80% of its box, so
    real images score below 1: the real score is the ceiling); box_kind: share of boxes whose crop (the box and
    a 2-pixel margin, pasted on black at its place) the evaluator reads as the asked kind; empty_outside: share
    of images with (almost) nothing lit outside the boxes (at most 3 pixels).
    """
    evaluator = evaluator or metrics.load_evaluator()
    n, side = images.shape[0], images.shape[-1]
    lit = ((images + 1) / 2).amax(1) > 0.25
    inside = torch.zeros(n, side, side, dtype=torch.bool)
    crops, kinds = [], []
    for i in range(n):
        for box, kind in zip(scenes.boxes[i], scenes.box_labels[i]):
            x0, y0 = (box[:2] * side).floor().long().clamp(0, side)
            x1, y1 = (box[2:] * side).ceil().long().clamp(0, side)
            inside[i, y0:y1, x0:x1] = True
            a0, b0 = max(int(x0) - 2, 0), max(int(y0) - 2, 0)
            a1, b1 = min(int(x1) + 2, side), min(int(y1) + 2, side)
            crop = torch.full_like(images[i], -1)
            crop[:, b0:b1, a0:a1] = images[i, :, b0:b1, a0:a1]
            crops.append(crop)
            kinds.append(int(kind))
    iou = (lit & inside).sum((1, 2)).float() / (lit | inside).sum((1, 2)).clamp_min(1)
    read = metrics.classify(torch.stack(crops), evaluator)["kind"]
    return {"iou": iou.mean().item(), "box_kind": (read == torch.tensor(kinds)).float().mean().item(),
            "empty_outside": ((lit & ~inside).sum((1, 2)) <= 3).float().mean().item()}


def follow(ldm: latent.LatentDiffusion, *, num: int = 500, scales=(1.0, 3.0), steps: int = 25, seed: int = 0,
           sampler: str = "ddim", max_objects: int = 1) -> dict:
    """Condition following at each guidance scale: N samples for N held-out captions (kinds, layouts), scored
    (`follow_scores`; layouts: `box_scores`)."""
    scenes = requests(num, max_objects=max_objects)
    evaluator = metrics.load_evaluator()
    conditions = conditions_of(ldm.config, scenes)
    score = box_scores if ldm.config.latent.conditioner == "layout" else follow_scores
    report = {"num": num, "steps": steps, "sampler": sampler, "seed": seed,
              "real": score(scenes.tensors()[0], scenes, evaluator), "scales": {}}
    for scale in scales:
        start = time.perf_counter()
        images = latent.sample(ldm, minildm.build_diffusion(ldm.config), conditions, sampler=sampler, steps=steps,
                               guidance_scale=scale, seed=seed, batch_size=250)
        scores = score(images, scenes, evaluator)
        scores["seconds"] = time.perf_counter() - start
        report["scales"][f"{scale:g}"] = scores
    return report


# ---------------------------------------------------------------------------------------------
# Latent against pixel space


def cost(*, batch: int = 32, samples: int = 64, steps: int = 25, repeats: int = 7) -> dict:
    """Seconds per training step (batch `batch`) and per sample (DDIM `steps`, decoding included) of the shapes
    LDMs (class and text) against the shipped pixel-space UNet (ddpm-shapes-cond), measured in this process on
    one thread, the models' steps interleaved so that a busy machine slows all alike; the ratios are what latent
    space buys. Also the encoder's seconds per training image, paid once when the latents are cached (LDM
    encodes on the fly, in every step)."""
    torch.manual_seed(0)
    pixel_config = presets.get("ddpm-shapes-cond")
    models = {"pixel": (minildm.build_model(pixel_config), pixel_config, (3, 32, 32))}
    for kind in ("class", "text"):
        config, ldm, shapes = build_for(f"ldm-shapes-{kind}")
        models[f"latent_{kind}"] = (ldm, config, (3, 8, 8))
    conditions = {"pixel": torch.arange(batch) % 5, "latent_class": torch.arange(batch) % 5,
                  "latent_text": latent.tokenize(models["latent_text"][0], shapes.captions[:batch])}
    optimizers = {name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                  for name, (model, _, _) in models.items()}
    times = {name: [] for name in models}
    for repeat in range(repeats + 2):
        for name, (model, _, shape) in models.items():
            x, t = torch.randn(batch, *shape), torch.randint(0, 1000, (batch,))
            start = time.perf_counter()
            loss = (model(x, t, y=conditions[name]) - x).pow(2).mean()
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            if repeat >= 2:  # the first two are warm-up
                times[name].append(time.perf_counter() - start)
    report = {"batch": batch, "samples": samples, "steps": steps, "threads": torch.get_num_threads(),
              "machine": platform.machine()}
    for name, (model, config, shape) in models.items():
        model.eval()
        diffusion = minildm.build_diffusion(config)
        labels = torch.arange(samples) % 5
        start = time.perf_counter()
        with torch.no_grad():
            if name == "pixel":
                train.generate(model, diffusion, config, samples, steps=steps, y=labels)
            else:
                latent.sample(model, diffusion, labels if name == "latent_class" else
                              conditions[name].repeat(samples // batch + 1, 1)[:samples], steps=steps)
        report[name] = {"params": count_parameters(model) - (count_parameters(model.first_stage_model)
                                                             if name != "pixel" else 0),
                        "step_seconds": sorted(times[name])[len(times[name]) // 2],
                        "sample_seconds": (time.perf_counter() - start) / samples,
                        "values_per_image": math.prod(shape)}
    ldm = models["latent_class"][0]
    images = torch.rand(batch, 3, 32, 32) * 2 - 1
    start = time.perf_counter()
    ldm.encode(images)
    report["encode_seconds_per_image"] = (time.perf_counter() - start) / batch
    for name in ("latent_class", "latent_text"):
        report[name]["step_ratio"] = report["pixel"]["step_seconds"] / report[name]["step_seconds"]
        report[name]["sample_ratio"] = report["pixel"]["sample_seconds"] / report[name]["sample_seconds"]
    return report


def quality(*, num: int = 500, steps: int = 25, seed: int = 0, folder=None) -> dict:
    """The shipped class-conditional LDM against the shipped class-conditional pixel UNet (ddpm-shapes-cond), each
    asked for kinds i mod 5 with DDIM `steps`, no guidance: `metrics.evaluate_shapes` scores and sampling seconds,
    plus each model's training time from its card data."""
    from minildm.experiments import guidance as guidance_experiment

    folder = Path(folder or CHECKPOINTS)
    labels = torch.arange(num) % 5
    report = {"num": num, "steps": steps, "seed": seed, "threads": torch.get_num_threads()}
    ldm = load_shipped("ldm-shapes-class", folder)
    start = time.perf_counter()
    images = latent.sample(ldm, minildm.build_diffusion(ldm.config), labels, steps=steps, seed=seed, batch_size=250)
    report["latent"] = {"sample_seconds": time.perf_counter() - start, **metrics.evaluate_shapes(images, labels=labels)}
    pixel, config = guidance_experiment.load_shipped("ddpm-shapes-cond", folder)
    start = time.perf_counter()
    images = train.generate(pixel, minildm.build_diffusion(config), config, num, steps=steps, seed=seed, y=labels,
                            batch_size=250)
    report["pixel"] = {"sample_seconds": time.perf_counter() - start, **metrics.evaluate_shapes(images, labels=labels)}
    card = json.loads((folder / "ldm-shapes-class.json").read_text())
    report["latent"]["train_seconds"] = card["train_seconds"]
    report["latent"]["train_images"] = card["steps"] * ldm.config.train.batch_size
    report["pixel"]["train_images"] = config.train.max_steps * config.train.batch_size
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minildm.experiments.latent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    ship_parser = commands.add_parser("ship", help="train a shapes LDM preset, score it, write data/checkpoints")
    ship_parser.add_argument("name")
    ship_parser.add_argument("--num", type=int, default=500)
    card_parser = commands.add_parser("card", help="rewrite the model card of a shipped shapes LDM")
    card_parser.add_argument("name")
    follow_parser = commands.add_parser("follow", help="condition following of a shipped model against the scale")
    follow_parser.add_argument("name")
    follow_parser.add_argument("--num", type=int, default=500)
    follow_parser.add_argument("--scales", default="1,2,3,5")
    follow_parser.add_argument("--sampler", default="ddim")
    follow_parser.add_argument("--out")
    cost_parser = commands.add_parser("cost", help="latent vs pixel: seconds per training step and per sample")
    cost_parser.add_argument("--out", default=str(RESULTS / "ldm_cost.json"))
    quality_parser = commands.add_parser("quality", help="the class LDM against the pixel UNet: scores at equal N")
    quality_parser.add_argument("--num", type=int, default=500)
    quality_parser.add_argument("--out", default=str(RESULTS / "ldm_vs_pixel.json"))
    args = parser.parse_args(argv)
    if args.command == "ship":
        print(json.dumps(ship(args.name, num=args.num), indent=2))
    elif args.command == "card":
        print(write_card(args.name))
    elif args.command == "follow":
        scales = [float(s) for s in args.scales.split(",")]
        ldm = load_shipped(args.name)
        report = follow(ldm, num=args.num, scales=scales, sampler=args.sampler,
                        max_objects=ldm.config.data.max_objects)
        report["command"] = "python -m minildm.experiments.latent " + " ".join(sys.argv[1:] if argv is None else argv)
        out = Path(args.out or RESULTS / f"{args.name}_follow_{args.sampler}.json")
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    else:
        report = cost() if args.command == "cost" else quality(num=args.num)
        report["command"] = "python -m minildm.experiments.latent " + " ".join(sys.argv[1:] if argv is None else argv)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
