"""Evaluation at scale: sampling sharded over processes, one seed per sample, ADM's `.npz` batches, the FID protocol.

    python -m minildm sample CKPT --num 50000 --batch-size 256 --out samples.npz            # one process
    torchrun --nproc_per_node 8 -m minildm sample CKPT --num-samples 50000 --batch-size 256 --out samples.npz
    python -m minildm sample ldm-cin256-v2 --num 50000 --steps 250 --guidance-scale 1.5 --out samples.npz  # an LDM
    python -m minildm fid samples.npz VIRTUAL_imagenet64_labeled.npz    # ADM's reference batch (mu, sigma inside)
    python -m minildm fid data/cifar10-train-png/ --save-stats cifar10_train_stats.npz   # reference stats, once
    python -m minildm fid samples.npz cifar10_train_stats.npz

Sample i (a global index 0 .. N-1) draws x_T, every step's noise and its class label from its own streams seeded
from (seed, i) (`sampling.PerSampleGenerator`, `class_labels`), so its noise and label are the same for any batch
size and any number of processes; its pixels are the same up to float rounding (the network's kernels block the
arithmetic differently for other batch sizes: tests/test_evaluation.py measures at most one uint8 level on fewer
than 1% of the pixels). The indices are dealt in rounds of world_size x batch_size: in round k process r samples
[k W B + r B, k W B + (r + 1) B), and one all_gather per round puts the batches in index order on rank 0, which
alone writes the file (a temporary file renamed into place).

Latent diffusion models (`latent.LatentDiffusion`) take the same path: each batch of indices is one call of
`latent.sample` with the batch's `PerSampleGenerator` (x_T and every step's noise of the latents from sample i's
stream; ddim, plms or ddpm; classifier-free guidance with the conditioner's null condition), decoded by the first
stage to images in [-1, 1]. A class-conditional LDM labels its samples as a pixel model does (its conditioner's
classes less the null class); a text-conditional one draws every sample from the one prompt (no labels); a
layout-conditional one is refused (each sample would need its own boxes).

(Under torchrun spell --num as --num-samples: torchrun's own parser takes --num for its --numa-binding.)

The `.npz` layout is the one ADM's `image_sample.py` writes and its `evaluations/evaluator.py` reads: `arr_0`
uint8 [N, H, W, C] and, for a class-conditional model, `arr_1` int64 [N] labels.

The FID protocol (Heusel et al. 2017; as ADM reports it, Dhariwal & Nichol 2021): 50,000 samples against the
statistics (mean mu and covariance sigma of the 2048-d pool_3 features of Inception v3) of the whole training set.
ADM's reference batches (evaluations/README.md of guided-diffusion) carry exactly that: mu and sigma over the whole
dataset, and 10,000 of its images in arr_0 for precision and recall. Here the features come from torchmetrics'
Inception (`metrics.load_inception`: torch-fidelity's port of the TF graph that TTUR, pytorch-fid and ADM's
evaluator run), resized as that graph does (TF1 bilinear). Numbers differ between implementations by more than
rounding, so compare only FIDs computed the same way:
- the network: the TF-Inception port vs torchvision's ImageNet Inception v3 (other weights, other features);
- resizing to 299 x 299: the TF graph's bilinear resize vs antialiased or bicubic resizes (clean-fid, Parmar et al.
  2022, measured the effect), and JPEG / PNG round trips of the samples (the `.npz` keeps the exact uint8 pixels);
- N: the estimate is biased upwards at small N (Chong & Forsyth 2020: the bias falls roughly as 1/N), so FIDs of
  10,000 samples are not comparable with FIDs of 50,000;
- the reference set: training vs validation images vs ADM's reference batches, and its preprocessing (centre
  crop, resize) all move the number.
"""

from __future__ import annotations

import math
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from minildm import checkpoints, data, guidance, metrics, sampling

STATS_FORMAT = "minildm.inception-stats/1"
FEATURE_EXTRACTOR = "torchmetrics NoTrainInceptionV3 (inception-v3-compat, torch-fidelity's TF port), pool_3 [2048]"
ADM_EXTRACTOR = "TF Inception pool_3 (ADM's evaluator)"  # ADM's reference batches: the graph torch-fidelity ports


# ---------------------------------------------------------------------------------------------
# Per-sample labels, one batch of global indices


def class_labels(seed: int, indices: Sequence[int], num_classes: int) -> torch.Tensor:
    """Labels int64 [B] of samples `indices`: sample i's is uniform over 0 .. num_classes - 1 (as ADM's
    image_sample.py draws them), from its own stream `sampling.sample_seed(seed, i, stream=1)`."""
    draws = [torch.randint(num_classes, (), generator=torch.Generator().manual_seed(sampling.sample_seed(seed, i, 1)))
             for i in indices]
    return torch.stack(draws) if draws else torch.zeros(0, dtype=torch.long)


def sample_indices(model, diffusion, config, indices: Sequence[int], *, seed: int = 0, sampler: str = "ddim",
                   steps: int = 50, eta: float = 0.0, labels: torch.Tensor | None = None, cond_fn=None,
                   device=None, noise_device="cpu") -> torch.Tensor:
    """Samples [B, C, H, W] in [-1, 1] of the global `indices`, each from its own seeded stream (any batch size).

    labels: int64 [B] for a conditional (or classifier-guided) model, else None. The sampler walks `steps`
    timesteps respaced evenly over T (DDIM with `eta`, or ancestral DDPM), clipping pred_x0 if config says so.
    noise_device: where the per-sample streams draw. The CPU (default) gives the same samples on every device;
    "cuda" is faster for large images (B = 256 at 3 x 256 x 256 costs 0.3 s per step on one CPU thread) but
    CUDA's generator draws other numbers, so its samples match only other CUDA runs.
    """
    from minildm import schedules

    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"unknown sampler {sampler!r}; use ddim or ddpm")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    shape = (len(indices), config.unet.in_channels, config.unet.image_size, config.unet.image_size)
    timesteps = schedules.space_timesteps(diffusion.num_timesteps, str(min(steps, diffusion.num_timesteps)))
    kwargs = {"generator": sampling.PerSampleGenerator(seed, indices, noise_device), "device": device,
              "progress": False, "clip_denoised": config.sample.clip_denoised, "cond_fn": cond_fn,
              "model_kwargs": None if labels is None else {"y": labels.to(device)}}
    if sampler == "ddim":
        return sampling.ddim_sample(model, diffusion, shape, timesteps, eta=eta, **kwargs)
    return sampling.ddpm_sample(model, diffusion, shape, timesteps, **kwargs)


def to_uint8(samples: torch.Tensor) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C], round((x + 1) 127.5) (what a PNG of them holds).

    ADM's image_sample.py truncates instead of rounding (a -0.5 / 255 shift of every pixel on average).
    """
    return ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# ---------------------------------------------------------------------------------------------
# Sharded sampling: the rounds, the gather, the .npz


def shard(num: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """The global indices process `rank` samples in each round: round k holds [k W B + r B, k W B + (r + 1) B).

    Every process gets the same number of rounds (ceil(num / (W B))); the last ones may be short or empty.
    """
    if num < 1 or batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need num >= 1, batch_size >= 1 and 0 <= rank < world_size; got num={num}, "
                         f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
    per_round = world_size * batch_size
    starts = (k * per_round + rank * batch_size for k in range(math.ceil(num / per_round)))
    return [list(range(min(start, num), min(start + batch_size, num))) for start in starts]


def sample_images(model, config, num: int, *, batch_size: int = 64, sampler: str = "ddim", steps: int = 50,
                  eta: float = 0.0, seed: int = 0, label: int | None = None, guidance_scale: float = 1.0,
                  classifier=None, classifier_scale: float = 0.0, prompt: str | None = None, progress: bool = True,
                  noise_device="cpu") -> tuple[np.ndarray | None, np.ndarray | None]:
    """`num` samples sharded over the torch.distributed processes (or this one): (uint8 [N, H, W, C], labels [N])
    in index order on rank 0, (None, None) on the others.

    model: a pixel-space UNet (`sample_indices`) or a `latent.LatentDiffusion` (config = its config; `latent.sample`
    draws the latents of each batch with the batch's `sampling.PerSampleGenerator`, ddim / plms / ddpm, and the
    first stage decodes them). batch_size is per process. label: every sample's class (else drawn per sample,
    `class_labels`); labels is None for an unconditional, unguided or text-conditional model. prompt: the caption
    of every sample of a text-conditional latent model. Guidance as `train.generate` (`guidance.guided_model`) for
    pixel models, classifier-free only for latent ones. Progress bar on rank 0. noise_device: see `sample_indices`
    ("cuda": this process's GPU). A label the model (or its classifier) has no class for is a ValueError that names
    --class, the command line's option for it.
    """
    from minildm.progress import progress as progress_bar

    if config.model != "unet":
        raise ValueError(f"sample_images draws images; this is a {config.model!r} model (the 2-D toy: use "
                         "train.generate and a .png plot)")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    setup = _latent_draw if _is_latent(model) else _pixel_draw
    draw, classes, (side, channels) = setup(
        model, config, sampler=sampler, steps=steps, eta=eta, seed=seed, guidance_scale=guidance_scale,
        classifier=classifier, classifier_scale=classifier_scale, prompt=prompt, device=device,
        noise_device=device if noise_device == "cuda" else noise_device)
    if label is not None and not 0 <= label < max(classes, 1):
        raise ValueError(f"--class {label}: this model has classes 0 .. {classes - 1}" if classes else
                         f"--class {label}: {_unconditional(model, config)}")
    images = np.empty((num, side, side, channels), np.uint8) if rank == 0 else None
    labels = np.empty(num, np.int64) if rank == 0 and classes else None
    bar = progress_bar(total=num, disable=not progress or rank != 0, desc=f"sampling ({world_size} processes)")
    filled = 0  # rounds cover consecutive index ranges: round k starts where round k - 1 ended
    for indices in shard(num, batch_size, rank, world_size):
        y = None
        if classes:
            y = torch.full((len(indices),), label) if label is not None else class_labels(seed, indices, classes)
        batch = torch.zeros(0, side, side, channels, dtype=torch.uint8, device=device)
        if indices:
            batch = to_uint8(draw(indices, y))
        round_images, round_labels = _gather(batch, batch_size), _gather(y.to(device), batch_size) if classes else None
        if rank == 0:
            images[filled:filled + len(round_images)] = round_images.cpu().numpy()
            if labels is not None:
                labels[filled:filled + len(round_labels)] = round_labels.cpu().numpy()
        filled += len(round_images)
        bar.update(len(round_images))
    bar.close()
    return images, labels


def _is_latent(model) -> bool:
    from minildm import latent

    return isinstance(model, latent.LatentDiffusion)


def _pixel_draw(model, config, *, sampler, steps, eta, seed, guidance_scale, classifier, classifier_scale, prompt,
                device, noise_device):
    """(draw(indices, y) -> images [B, C, H, W] in [-1, 1], number of classes, (side, channels)) of a pixel UNet."""
    import minildm

    if prompt is not None:
        raise ValueError("--prompt is for text-conditional latent diffusion models; this is a pixel-space UNet")
    model, cond_fn, classes = guidance.guided_model(model, config, guidance_scale=guidance_scale,
                                                    classifier=classifier, classifier_scale=classifier_scale,
                                                    device=device)
    diffusion = minildm.build_diffusion(config)

    def draw(indices, y):
        return sample_indices(model, diffusion, config, indices, seed=seed, sampler=sampler, steps=steps, eta=eta,
                              labels=y, cond_fn=cond_fn, device=device, noise_device=noise_device)
    return draw, classes, (config.unet.image_size, config.unet.in_channels)


def _latent_draw(ldm, config, *, sampler, steps, eta, seed, guidance_scale, classifier, classifier_scale, prompt,
                 device, noise_device):
    """The same for a `latent.LatentDiffusion`: class labels (the conditioner's vocabulary less its null class),
    one caption for every sample (text, CLIP), or nothing (unconditional); layouts are refused."""
    import minildm
    from minildm import latent

    kind = config.latent.conditioner
    if classifier is not None or classifier_scale != 0:
        raise ValueError("--classifier: latent diffusion models are guided without a classifier; use "
                         "--guidance-scale (classifier-free guidance)")
    if kind == "layout":
        raise ValueError("a layout-conditional model draws each sample from its own boxes, which an .npz batch "
                         "cannot ask for: sample it from Python with minildm.latent.sample(ldm, diffusion, (boxes, "
                         "labels)), or give a class-, text- or un-conditional checkpoint")
    if kind in ("text", "clip") and prompt is None:
        raise ValueError("this checkpoint draws captions: give --prompt 'a large red circle on the left' (the "
                         "caption of every sample)")
    if kind not in ("text", "clip") and prompt is not None:
        raise ValueError(f"--prompt is for text-conditional models; this one has latent.conditioner={kind!r}: "
                         "leave --prompt out")
    diffusion = minildm.build_diffusion(config)
    classes = config.latent.cond_vocab - 1 if kind == "class" else 0  # the last class is the null class

    def draw(indices, y):
        conditions = [prompt] * len(indices) if prompt is not None else y
        return latent.sample(ldm, diffusion, conditions, num=len(indices), sampler=sampler, steps=steps, eta=eta,
                             guidance_scale=guidance_scale,
                             generator=sampling.PerSampleGenerator(seed, indices, noise_device))
    first_stage = ldm.first_stage_model.config
    return draw, classes, (config.data.image_size, first_stage.out_channels)


def _unconditional(model, config) -> str:
    """Why --class does not apply: the second half of its error message."""
    if not _is_latent(model):
        return ("this model is unconditional (unet.num_classes=0); leave --class out, or guide it with a classifier "
                "(--classifier, with a --classifier-scale other than 0)")
    if config.latent.conditioner in ("text", "clip"):
        return "this model is text-conditional; leave --class out and give --prompt"
    return "this latent diffusion model is unconditional (latent.conditioner='none'); leave --class out"


def _gather(rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Every process's `rows` ([n_r, ...], n_r <= batch_size) concatenated in rank order, on every process.

    all_gather needs equal shapes: the counts go first, then the rows padded to batch_size. (gloo and NCCL both
    implement all_gather; with NCCL the tensors are on this process's GPU.)
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return rows
    world_size = dist.get_world_size()
    count = torch.tensor([len(rows)], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    padded = torch.zeros(batch_size, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    padded[:len(rows)] = rows
    gathered = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:int(c)] for g, c in zip(gathered, counts)])


SUFFIX_USES = {".png": "a grid to look at", ".npz": "the batch that ADM's evaluator and `python -m minildm fid` read"}


def check_output(path, suffixes=(".npz",), option: str = "--out") -> Path:
    """`path` as a Path once it is known to be writable (its folder created); raises ValueError saying what to change
    and naming `option`, the command-line option that gave the path.

    Checked before sampling, so a long run does not fail at its end: the suffix, and a temporary file created and
    removed in the folder (which also catches read-only file systems, whatever the permission bits say).
    """
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        uses = "; ".join(f"{suffix}: {SUFFIX_USES[suffix]}" for suffix in suffixes if suffix in SUFFIX_USES)
        raise ValueError(f"{option} {path}: give a file ending in {' or '.join(suffixes)}"
                         + (f" ({uses})" if len(suffixes) > 1 else ""))
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name such as "
                         f"{path / ('samples' + suffixes[0])}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as error:
        raise ValueError(f"{option} {path}: cannot write in {path.parent} ({error.strerror or error}); choose a "
                         "writable folder") from None
    return path


def write_npz(path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write ADM's sample batch atomically: arr_0 uint8 [N, H, W, C] (and arr_1 int64 [N] labels) in `path`.

    The file is written under a temporary name in the same folder and renamed into place (`checkpoints.atomic_path`,
    with the umask's permissions), so a reader never sees half a file and an interrupted run leaves the previous
    file intact.
    """
    path = Path(path)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 [N, H, W, C] with C = 1 or 3 (ADM's layout; `to_uint8` converts "
                         f"[-1, 1] tensors); got {images.dtype} {images.shape}")
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, dtype=np.int64)
        if arrays["arr_1"].shape != (len(images),):
            raise ValueError(f"labels must be [N] = [{len(images)}], one per image; got {arrays['arr_1'].shape}")
    return _savez_atomically(path, arrays)


def _savez_atomically(path: Path, arrays: dict) -> Path:
    """np.savez into a temporary file of path's folder, then rename it to path (`checkpoints.atomic_path`)."""
    with checkpoints.atomic_path(path) as temporary, open(temporary, "wb") as file:
        np.savez(file, **arrays)  # a file object: numpy adds no second ".npz"
    return path


# ---------------------------------------------------------------------------------------------
# The FID protocol: images or statistics in, Inception features, FID / IS / KID / precision-recall out


def read_batches(path, batch_size: int = 500) -> Iterator[np.ndarray]:
    """uint8 [n, H, W, 3] batches of the images in `path`: an .npz's arr_0 (read piece by piece from the archive,
    so 50,000 images at 256 x 256 need not fit in memory) or a folder of image files (sorted, recursive)."""
    path = Path(path)
    if path.is_dir():
        yield from _folder_batches(path, batch_size)
        return
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as member:
        version = np.lib.format.read_magic(member)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"{path}: arr_0 is in .npy format version {version[0]}.{version[1]}; this reader streams "
                             "versions 1.0 and 2.0 (what np.savez writes): save it again with np.savez or "
                             "evaluation.write_npz")
        shape, fortran_order, dtype = read_header(member)
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or fortran_order:
            raise ValueError(f"{path}: arr_0 must be uint8 images [N, H, W, C] (ADM's layout, C = 1 or 3); got "
                             f"{dtype} {shape}; write it with evaluation.write_npz(path, evaluation.to_uint8(x))")
        row = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            batch = np.frombuffer(bytearray(member.read(count * row)), np.uint8).reshape(count, *shape[1:])
            yield np.repeat(batch, 3, axis=-1) if shape[-1] == 1 else batch  # Inception reads RGB


def _folder_batches(folder: Path, batch_size: int) -> Iterator[np.ndarray]:
    from PIL import Image

    files = data.image_files(folder)
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(data.IMAGE_EXTENSIONS)}); give a folder of the "
                         "reference images, an .npz with arr_0, or a statistics .npz")
    size = None
    for start in range(0, len(files), batch_size):
        batch = [np.asarray(Image.open(f).convert("RGB")) for f in files[start:start + batch_size]]
        for file, image in zip(files[start:start + batch_size], batch):
            size = size or image.shape
            if image.shape != size:
                raise ValueError(f"{file} is {image.shape[1]}x{image.shape[0]} but the first image is "
                                 f"{size[1]}x{size[0]}: resize and crop the reference set to the samples' size first "
                                 "(as the dataset's preparation does), then compute its statistics")
        yield np.stack(batch)


def read_source(path) -> dict:
    """What a FID input holds: {"images": bool, "mu", "sigma" (or None), "extractor", "path"}.

    An .npz with mu and sigma is a statistics file (minildm's, `save_statistics`, or ADM's reference batch, whose
    arr_0 also holds images); an .npz with only arr_0 is an image batch; a folder holds image files.
    """
    path = Path(path)
    if path.is_dir():
        return {"path": path, "images": True, "mu": None, "sigma": None, "extractor": None}
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give a sample batch (.npz from `python -m minildm sample "
                                "--out samples.npz`), a reference batch or statistics .npz, or a folder of images")
    if path.suffix.lower() != ".npz":
        raise ValueError(f"{path}: FID inputs are .npz files (arr_0 images and/or mu, sigma) or folders of images")
    with np.load(path) as archive:
        keys = set(archive.files)
        if not keys & {"arr_0", "mu"}:
            raise ValueError(f"{path} has neither arr_0 (images) nor mu and sigma (statistics); it holds "
                             f"{sorted(keys)}")
        mu = archive["mu"].astype(np.float64) if "mu" in keys else None
        sigma = archive["sigma"].astype(np.float64) if "sigma" in keys else None
        extractor = str(archive["extractor"]) if "extractor" in keys else None
    if (mu is None) != (sigma is None) or (mu is not None and (mu.shape != (2048,) or sigma.shape != (2048, 2048))):
        raise ValueError(f"{path}: mu and sigma must be [2048] and [2048, 2048] (Inception pool_3 statistics)")
    if extractor is None and mu is not None:  # ADM's reference batches: the TF graph, which torch-fidelity ports
        extractor = ADM_EXTRACTOR
    return {"path": path, "images": "arr_0" in keys, "mu": mu, "sigma": sigma, "extractor": extractor}


def image_features(path, inception, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Inception pool features [N, 2048] and logits [N, 1008] of the images in `path` (`read_batches`)."""
    pools, logits = [], []
    for batch in read_batches(path, batch_size):
        pool, logit = metrics.inception_features(torch.from_numpy(batch).permute(0, 3, 1, 2), inception, batch_size)
        pools.append(pool)
        logits.append(logit)
    return torch.cat(pools), torch.cat(logits)


def statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) in float64: the mean and unbiased covariance of features [N, D] (np.cov, as ADM)."""
    mean, covariance = metrics._gaussian(features)
    return mean.numpy(), covariance.numpy()


def save_statistics(path, mu: np.ndarray, sigma: np.ndarray, num: int) -> Path:
    """Write reference statistics (mu, sigma, the image count and the feature extractor) as an .npz, atomically."""
    return _savez_atomically(check_output(path, option="--save-stats"), {"mu": mu, "sigma": sigma, "num": np.int64(num),
                                                  "extractor": np.str_(FEATURE_EXTRACTOR),
                                                  "format": np.str_(STATS_FORMAT)})


def fid_report(samples, reference, *, save_stats=None, fid_only: bool = False, batch_size: int = 250, device=None,
               weights_path=None, inception=None, splits: int = 10, kid_subsets: int = 100,
               kid_subset_size: int = 1000, k: int = 3, seed: int = 0) -> dict:
    """FID of `samples` against `reference` (each an .npz batch, a statistics .npz or a folder), and, where both
    hold images, IS, KID and precision/recall: what `python -m minildm fid` prints.

    The reference's mu and sigma are used when the file has them (ADM's reference batches, `save_statistics`);
    otherwise they are computed from its images, and `save_stats` writes them for the next run. One Inception
    (`metrics.load_inception`, TF1 resize as ADM's evaluator) scores both sets: FID (`metrics.gaussian_frechet_distance`
    of the fitted Gaussians), IS on the samples' logits, KID and k-NN precision/recall on the two feature sets
    (computed on `device`). fid_only skips all but FID (and the reference's images when it has statistics).
    inception: an Inception already loaded with `metrics.load_inception(..., antialias=False)` (loading takes
    seconds: pass one to score many batches); default: loaded from `weights_path` or torch hub's cache.
    A statistics file made with another feature extractor than ours or ADM's gets a note: its FID is not comparable.
    """
    device = device or metrics.default_device()
    sample_source, reference_source = read_source(samples), read_source(reference)
    if save_stats is not None:
        _check_save_stats(save_stats, reference_source)
    inception = _inception(inception, weights_path, device)
    report = {"num_samples": None, "num_reference": None}
    fake = real = None
    if sample_source["images"]:
        fake, fake_logits = image_features(samples, inception, batch_size)
        report["num_samples"] = len(fake)
    wants_reference_images = save_stats is not None or reference_source["mu"] is None or \
        (not fid_only and fake is not None)
    if reference_source["images"] and wants_reference_images:
        real, _ = image_features(reference, inception, batch_size)
        report["num_reference"] = len(real)
    if save_stats is not None:
        report["saved_statistics"] = str(save_statistics(save_stats, *statistics(real), len(real)))
    if reference_source["mu"] is None:
        report["reference_statistics"] = f"computed from the {len(real)} images of {reference}"
    else:
        report["reference_statistics"] = f"read from {reference} ({reference_source['extractor']})"
    if fake is not None and reference_source["mu"] is None:  # both feature sets: the Fréchet distance of their fits
        report["fid"] = metrics.frechet_distance(fake, real)
    else:  # statistics on one side at least: the Fréchet distance of the two Gaussians
        mu_fake, sigma_fake = statistics(fake) if fake is not None else (sample_source["mu"], sample_source["sigma"])
        mu_real, sigma_real = statistics(real) if reference_source["mu"] is None else \
            (reference_source["mu"], reference_source["sigma"])
        report["fid"] = metrics.gaussian_frechet_distance(mu_fake, sigma_fake, mu_real, sigma_real)
    if not fid_only and fake is not None:
        report.update(_other_metrics(fake, fake_logits, real, device, splits, kid_subsets, kid_subset_size, k, seed))
    notes = [note for note in map(_extractor_note, (sample_source, reference_source)) if note]
    if report["num_samples"] is not None and report["num_samples"] < 50_000:
        notes.append(f"FID of {report['num_samples']} samples: biased upwards against the 50,000-sample "
                     "protocol; compare only at equal N and reference")
    if notes:
        report["note"] = " ".join(notes)
    return report


def _extractor_note(source: dict) -> str | None:
    """A warning for statistics made with another network or resize than ours (or ADM's, which ours ports)."""
    if source["mu"] is None or source["extractor"] in (FEATURE_EXTRACTOR, ADM_EXTRACTOR):
        return None
    return (f"{source['path']} holds statistics from {source['extractor']!r}, not from {FEATURE_EXTRACTOR} (or "
            "ADM's TF graph, which it ports): feature extractors differ by more than rounding, so this FID is not "
            "comparable with ours; compute the statistics again from the images (--save-stats).")


def _check_save_stats(save_stats, reference_source: dict) -> Path:
    """The --save-stats path, checked before any work: writable, .npz, and a reference that holds images."""
    if not reference_source["images"]:
        raise ValueError(f"--save-stats: {reference_source['path']} holds statistics, not images; give the "
                         "reference images (an .npz with arr_0 or a folder) to compute statistics from")
    return check_output(save_stats, option="--save-stats")


def _inception(inception, weights_path, device):
    """The Inception to score with: the one given, else loaded as ADM's evaluator resizes (`metrics.load_inception`)."""
    return inception if inception is not None else metrics.load_inception(weights_path, device, antialias=False)


def _other_metrics(fake, fake_logits, real, device, splits, kid_subsets, kid_subset_size, k, seed) -> dict:
    """IS of the samples; KID and precision/recall when the reference's features are there too."""
    score = metrics.inception_score(fake_logits, min(splits, len(fake)), generator=torch.Generator().manual_seed(seed))
    out = {"inception_score": score["mean"], "inception_score_std": score["std"]}
    if real is not None and min(len(real), len(fake)) > k:  # k-NN radii need more than k points per set
        kid = metrics.kernel_inception_distance(real, fake, subsets=kid_subsets,
                                                subset_size=min(kid_subset_size, len(real), len(fake)),
                                                generator=torch.Generator().manual_seed(seed))
        out.update(kid=kid["mean"], kid_std=kid["std"], **metrics.precision_recall(real.to(device), fake.to(device), k))
    return out


def reference_statistics(reference, out, *, batch_size: int = 250, device=None, weights_path=None,
                         inception=None) -> dict:
    """Compute the Inception statistics (mu, sigma) of the reference images once and write them to `out`
    (`python -m minildm fid REFERENCE --save-stats out.npz`); returns {"num_reference", "saved_statistics"}."""
    out = _check_save_stats(out, read_source(reference))
    inception = _inception(inception, weights_path, device or metrics.default_device())
    real, _ = image_features(reference, inception, batch_size)
    mu, sigma = statistics(real)
    return {"num_reference": len(real), "saved_statistics": str(save_statistics(out, mu, sigma, len(real)))}
