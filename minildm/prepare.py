"""Prepare the papers' datasets: `python -m minildm.prepare <dataset> [--check]`.

The course's own data is generated (`data.ShapesDataset`); the papers' datasets are fetched by hand (size,
licences, sign-in) and converted once into folders of PNGs at the training resolution. Training reads them with
ADM's preprocessing (`data.ADMTransform`: `data.center_crop_arr`, which leaves an image already at the size
unchanged, a random flip, x / 127.5 - 1), so a prepared folder and its source give the same pixels.

Each dataset: where to fetch it (by hand), the layout under `data/` that is looked for, the prepared folder, and
the preprocessing (as the papers did it):

    dataset      data.dataset=lsun, data.category=church_outdoor | bedroom | cat | horse (any LSUN category)
    source       https://www.yf.io/p/lsun (script: github.com/fyu/lsun, `python download.py -c church_outdoor`):
                 http://dl.yf.io/lsun/scenes/<category>_train_lmdb.zip, http://dl.yf.io/lsun/objects/<category>.zip
    layout       data/lsun/church_outdoor_train_lmdb/{data.mdb,lock.mdb} (objects: data/lsun/cat/...), the
                 unzipped lmdb export; keys are image ids, values encoded images (read as torchvision's LSUNClass)
    prepared     data/lsun_church_outdoor256/church_outdoor_0000000.png ... (key order)
    command      python -m minildm.prepare lsun --category church_outdoor --image-size 256
    preprocess   ADM's datasets/lsun_bedroom.py: one BOX resize of the shorter side to 256, central square
                 (data.lsun_resize); training adds a random flip (data.random_flip; off for bedrooms)

    dataset      data.dataset=imagenet (ILSVRC2012, 1,281,167 training images, 1000 classes)
    source       https://image-net.org/challenges/LSVRC/2012/2012-downloads.php (sign in): ILSVRC2012_img_train.tar
                 (138 GB, one tar per class: extract each), ILSVRC2012_img_val.tar (sort into synset folders)
    layout       data/imagenet/train/n01440764/n01440764_10026.JPEG ... (1000 synset folders),
                 data/imagenet/val/n01440764/ILSVRC2012_val_00000293.JPEG ...
    prepared     data/imagenet64/train/n01440764/n01440764_10026.png ... (optional: the full-size images are read
                 as they are, with the same result; preparing saves the decoding at every step)
    command      python -m minildm.prepare imagenet --image-size 64
    preprocess   ADM's center_crop_arr (data.center_crop_arr): BOX halving while the shorter side is >= 2 x size,
                 BICUBIC so it is the size, central square; random flip; label = index of the sorted synset folder

    dataset      data.dataset=celebahq (30,000 faces)
    source       https://github.com/tkarras/progressive_growing_of_gans (dataset_tool.py create_celebahq: CelebA and
                 the delta files); the same images as JPEGs: CelebA-HQ-img/ of github.com/switchablenorms/CelebAMask-HQ
    layout       data/celebahq/0.jpg ... 29999.jpg (a flat folder, 1024 x 1024, any names)
    prepared     data/celebahq256/0.png ...
    command      python -m minildm.prepare celebahq --image-size 256
    preprocess   center_crop_arr: 1024 -> 512 -> 256 by 2x2 BOX averaging, as PGGAN's pyramid of resolutions
                 (DDPM read tfds celeb_a_hq/256, made from it); random flip

    dataset      data.dataset=cifar10 (50,000 training images, 10 classes)
    source       https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (torchvision downloads it)
    layout       data/cifar10/cifar-10-python.tar.gz, extracted to data/cifar10/cifar-10-batches-py/
    command      python -m minildm.prepare cifar10
    preprocess   none at 32 x 32; random flip

More commands (defaults: `--root data`, `--image-size 256`; the paths default to the folders above):

    python -m minildm.prepare lsun --category church_outdoor --max-images 1000 --workers 4
    python -m minildm.prepare lsun --lmdb data/lsun/church_outdoor_train_lmdb --out data/lsun_church_outdoor256
    python -m minildm.prepare celebahq --src CelebAMask-HQ/CelebA-HQ-img --image-size 256
    python -m minildm.prepare lsun --category bedroom --check   # the expected layout and what is found
    python -m minildm.prepare --preset ddpm-lsun-church256 --check

Preparation writes into `<out>.partial/` (each image to a temporary name, then renamed) and renames that folder to
`<out>` when every image is written, with `prepared.json` (source, preprocessing, count); an interrupted run
resumes where it stopped. Not reproduced: DDPM's LSUN data came through StyleGAN2's `dataset_tool.py create_lsun`
(central square, then one antialiased resize), and LDM's loaders (albumentations rescale and crop) differ from ADM's
in the resampling filters; minildm prepares every set the ADM way.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

from minildm import checkpoints, data
from minildm.progress import progress

PREPARED = ("lsun", "imagenet", "celebahq")

SOURCES = {
    "lsun": {
        "title": "LSUN {category}",
        "page": "https://www.yf.io/p/lsun (download script: https://github.com/fyu/lsun)",
        "url": "http://dl.yf.io/lsun/scenes/{category}_train_lmdb.zip",
        "object_url": "http://dl.yf.io/lsun/objects/{category}.zip",
        "layout": "{source}/data.mdb and lock.mdb (the unzipped official lmdb export; its values are encoded "
                  "images), prepared into {prepared}/{category}_0000000.png ...",
        "preprocessing": "ADM datasets/lsun_bedroom.py: BOX resize of the shorter side to the size, central square",
    },
    "imagenet": {
        "title": "ImageNet (ILSVRC2012)",
        "page": "https://image-net.org/challenges/LSVRC/2012/2012-downloads.php (sign in, accept the terms)",
        "url": "ILSVRC2012_img_train.tar (138 GB, one tar per class: extract each) and ILSVRC2012_img_val.tar "
               "(sort the 50,000 images into the same synset folders)",
        "layout": "{source}/train/n01440764/n01440764_10026.JPEG ... (1000 synset folders) and "
                  "{source}/val/n01440764/ILSVRC2012_val_00000293.JPEG ...; optionally prepared into "
                  "{prepared}/train/n01440764/n01440764_10026.png ...",
        "preprocessing": "ADM center_crop_arr: BOX halving while the shorter side >= 2 x size, BICUBIC to the size, "
                         "central square; label = index of the sorted synset folder",
    },
    "celebahq": {
        "title": "CelebA-HQ",
        "page": "https://github.com/tkarras/progressive_growing_of_gans (dataset_tool.py create_celebahq); the same "
                "30,000 images as JPEGs: CelebA-HQ-img/ of https://github.com/switchablenorms/CelebAMask-HQ",
        "url": "CelebAMask-HQ.zip (its CelebA-HQ-img/ folder, 30,000 1024x1024 JPEGs)",
        "layout": "{source}/0.jpg ... 29999.jpg (a flat folder of the 30,000 images, any names), "
                  "prepared into {prepared}/0.png ...",
        "preprocessing": "ADM center_crop_arr (1024 -> 256: two 2x2 BOX halvings, PGGAN's pyramid)",
    },
    "cifar10": {
        "title": "CIFAR10",
        "page": "https://www.cs.toronto.edu/~kriz/cifar.html",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "layout": "{source}/cifar-10-python.tar.gz, extracted by torchvision to {source}/cifar-10-batches-py/",
        "preprocessing": "none (32x32); random flip",
    },
}


def source_url(name: str, category: str = "") -> str:
    """What to download for a dataset (the LSUN URL depends on the category: scenes and objects differ)."""
    info = SOURCES[name]
    if name == "lsun" and category not in data.LSUN_SCENES:
        return info["object_url"].format(category=category)
    return info["url"].format(category=category)


def command(name: str, image_size: int = 256, category: str = "", root: str | Path = "data") -> str:
    """The preparation command for a dataset (--root only when it is not data/)."""
    args = ["python -m minildm.prepare", name]
    if name == "lsun":
        args.append(f"--category {category}")
    if name != "cifar10":
        args.append(f"--image-size {image_size}")
    if Path(root) != Path("data"):
        args.append(f"--root {root}")
    return " ".join(args)


# ---------------------------------------------------------------------------------------------
# Conversion: one job per image, written atomically, so an interrupted run resumes.

_CROPS = {"lsun": data.lsun_resize, "center": data.center_crop_arr}


def _convert(job) -> None:
    """Decode one image (bytes or a file), crop it to the size and save it as PNG at `target` (atomic)."""
    from PIL import Image

    source, target, crop, image_size = job
    if target.exists():  # written by an earlier, interrupted run
        return
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image = _CROPS[crop](image.convert("RGB"), image_size)
    except OSError as error:  # name the image: the run stops here and resumes after it is fixed or removed
        origin = f"the record for {target.name}" if isinstance(source, bytes) else source
        raise OSError(f"cannot decode {origin}: {error}") from error
    # fsynced before the rename (a resumed run trusts every .png it finds); no fsync of the folder per image: a
    # rename lost in a power cut only means the image is converted again
    with checkpoints.atomic_path(target, sync_folder=False) as temporary:
        image.save(temporary, format="PNG")


def _run(jobs, total: int, workers: int, description: str) -> None:
    with progress(total=total, desc=description, unit="img") as bar:  # closed on an error too
        if workers > 1:
            import multiprocessing

            with multiprocessing.Pool(workers) as pool:
                for _ in pool.imap_unordered(_convert, jobs, chunksize=16):
                    bar.update()
        else:
            for job in jobs:
                _convert(job)
                bar.update()


def _lsun_jobs(lmdb_dir: Path, partial: Path, prefix: str, image_size: int, limit: int):
    """(encoded image, target, crop, size) for the first `limit` records, in key order (ADM's naming)."""
    import lmdb

    environment = lmdb.open(str(lmdb_dir), readonly=True, lock=False, readahead=False, max_readers=126)
    try:  # closed also when a conversion fails and the generator is dropped
        with environment.begin(write=False) as transaction:
            for i, (_, value) in enumerate(transaction.cursor()):
                if i >= limit:
                    break
                yield bytes(value), partial / f"{prefix}_{i:07d}.png", "lsun", image_size
    finally:
        environment.close()


def _temporaries(folder: Path) -> list[Path]:
    """Files of conversions that a killed process left: `checkpoints.atomic_path`'s `.<name>.tmp<pid>-<random>`
    and the `<name>.tmp` of earlier versions."""
    return [p for p in folder.rglob("*") if p.is_file() and (p.name.endswith(".tmp") or
                                                             (p.name.startswith(".") and ".tmp" in p.name))]


def _finish(partial: Path, out: Path, manifest: dict) -> Path:
    for leftover in _temporaries(partial):  # never part of the finished folder
        leftover.unlink()
    manifest["count"] = sum(1 for p in partial.rglob("*.png"))
    with checkpoints.atomic_path(partial / "prepared.json") as temporary:
        temporary.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(partial, out)  # the folder appears complete or not at all
    print(f"wrote {manifest['count']} images to {out}")
    return out


def _start(out: Path) -> Path | None:
    if out.exists():
        print(f"{out} is already prepared (delete it to prepare it again)")
        return None
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        print(f"resuming in {partial}")
    partial.mkdir(parents=True, exist_ok=True)
    return partial


def prepare_lsun(lmdb_dir: str | Path, out: str | Path, image_size: int = 256, max_images: int | None = None,
                 workers: int = 1, prefix: str | None = None) -> Path:
    """Convert an official LSUN lmdb export into `out`/<prefix>_0000000.png ... (ADM's `lsun_bedroom.py`)."""
    try:
        import lmdb
    except ImportError as error:
        raise ImportError("reading LSUN's lmdb exports needs the lmdb package: pip install lmdb") from error
    lmdb_dir, out = Path(lmdb_dir), Path(out)
    if not data.is_lmdb(lmdb_dir):
        raise data.DatasetUnavailableError(
            f"{lmdb_dir} is not an LSUN lmdb export (no data.mdb in it): download "
            f"{source_url('lsun', 'church_outdoor')} (or your category's file; page {SOURCES['lsun']['page']}), "
            f"unzip it and pass the folder holding data.mdb and lock.mdb with --lmdb")
    prefix = prefix or lmdb_dir.name.removesuffix("_train_lmdb").removesuffix("_val_lmdb")
    partial = _start(out)
    if partial is None:
        return out
    environment = lmdb.open(str(lmdb_dir), readonly=True, lock=False)
    total = environment.stat()["entries"]
    environment.close()
    total = min(total, max_images or total)
    _run(_lsun_jobs(lmdb_dir, partial, prefix, image_size, total), total, workers, f"lsun {prefix} {image_size}")
    return _finish(partial, out, {"dataset": "lsun", "category": prefix, "image_size": image_size,
                                  "source": str(lmdb_dir), "preprocessing": SOURCES["lsun"]["preprocessing"]})


def prepare_folder(name: str, source: str | Path, out: str | Path, image_size: int = 256,
                   max_images: int | None = None, workers: int = 1) -> Path:
    """Resize every image under `source` with `center_crop_arr` into `out`, keeping sub-folders (ImageNet's
    train/<synset>/, val/<synset>/) and names, as PNG; the first `max_images` in sorted order if given."""
    source, out = Path(source), Path(out)
    layout = SOURCES[name]["layout"].format(source=source, prepared=out, category="")
    files = data.image_files(source) if source.is_dir() else []
    if not files:
        raise data.DatasetUnavailableError(f"no images under {source}. Fetch {SOURCES[name]['url']} "
                                           f"(page: {SOURCES[name]['page']}).\nExpected layout: {layout}")
    if name == "imagenet" and not (source / "train").is_dir():
        raise data.DatasetUnavailableError(f"{source} has no train/ folder; expected layout: {layout}")
    files = files[:max_images] if max_images else files
    partial = _start(out)
    if partial is None:
        return out
    jobs = ((path, partial / path.relative_to(source).with_suffix(".png"), "center", image_size) for path in files)
    _run(jobs, len(files), workers, f"{name} {image_size}")
    return _finish(partial, out, {"dataset": name, "image_size": image_size, "source": str(source),
                                  "preprocessing": SOURCES[name]["preprocessing"]})


# ---------------------------------------------------------------------------------------------
# --check: the expected layout and what is on disk.

def _describe(path: Path) -> str:
    if not path.exists():
        return "missing"
    if data.is_lmdb(path):
        return "found (lmdb export)"
    count = len(data.image_files(path))
    return f"found, {count:,} images" if count else "exists but holds no images"


def check(name: str, root: str | Path = "data", image_size: int = 256, category: str = "") -> bool:
    """Print a dataset's source, expected layout and preparation command, and whether it is on disk; True if
    `data.build_dataset` would find it."""
    if name == "cifar10":
        folders = {"source": Path(root) / "cifar10", "prepared": Path(root) / "cifar10"}
        found = (folders["source"] / "cifar-10-batches-py").is_dir()
    else:
        folders = data.paper_dataset_folders(name, root, image_size, category)
        found = any(p.is_dir() and (data.is_lmdb(p) or data._has_images(p)) for p in folders.values())
    info = SOURCES[name]
    print(f"{info['title'].format(category=category)} ({image_size}x{image_size}): "
          f"{'found' if found else 'NOT FOUND'}")
    print(f"  fetch:         {source_url(name, category)}")
    print(f"  official page: {info['page']}")
    print(f"  layout:        {info['layout'].format(**folders, category=category)}")
    if name != "cifar10":
        print(f"  prepared:      {folders['prepared']}/  {_describe(folders['prepared'])}")
    print(f"  source:        {folders['source']}/  {_describe(folders['source'])}")
    print(f"  preprocessing: {info['preprocessing']}")
    print(f"  prepare:       {command(name, image_size, category, root)}")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minildm.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("dataset", nargs="?", choices=[*PREPARED, "cifar10"])
    parser.add_argument("--preset", help="take the dataset, category, size and root from a preset's data section")
    parser.add_argument("--root", default=None, help="the data folder (default: data)")
    parser.add_argument("--image-size", type=int, default=None, help="side of the prepared images (default: 256)")
    parser.add_argument("--category", default=None, help="LSUN category: church_outdoor, bedroom, cat, horse, ...")
    parser.add_argument("--src", "--lmdb", dest="src", help="the download (default: <root>/<dataset>/...)")
    parser.add_argument("--out", help="the prepared folder (default: <root>/<dataset><size>)")
    parser.add_argument("--max-images", type=int, default=None, help="only the first N images (a stand-in)")
    parser.add_argument("--workers", type=int, default=1, help="processes that decode and resize")
    parser.add_argument("--check", action="store_true", help="print the expected layout and what is found")
    args = parser.parse_args(argv)
    name, root, image_size, category = args.dataset, "data", 256, ""
    if args.preset:
        from minildm import presets

        config = presets.get(args.preset).data
        name, root, image_size, category = config.dataset, config.root, config.image_size, config.category
        if name not in (*PREPARED, "cifar10"):
            parser.error(f"preset {args.preset} trains on data.dataset={name}, which needs no preparation")
    if name is None:
        parser.error("name a dataset (lsun, imagenet, celebahq, cifar10) or a --preset")
    root, image_size, category = args.root or root, args.image_size or image_size, args.category or category
    if name == "lsun" and not category:
        if args.check or not args.src:
            parser.error("lsun needs --category (church_outdoor, bedroom, cat, horse, ...)")
        category = Path(args.src).name.removesuffix("_train_lmdb")  # the export's name: bedroom_train_lmdb
    try:
        if args.check:
            return 0 if check(name, root, image_size, category) else 1
        if name == "cifar10":
            dataset = data.cifar10(root, train=True)
            print(f"CIFAR10: {len(dataset):,} training images in {Path(root) / 'cifar10'}")
            return 0
        folders = data.paper_dataset_folders(name, root, image_size, category)
        source, out = args.src or folders["source"], args.out or folders["prepared"]
        if name == "lsun":
            prepare_lsun(source, out, image_size, args.max_images, args.workers, prefix=category)
        else:
            prepare_folder(name, source, out, image_size, args.max_images, args.workers)
    except (data.DatasetUnavailableError, ImportError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
