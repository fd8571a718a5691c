"""Datasets: procedural shapes and 2-D toys (offline), torchvision image sets, loaders.

Every image dataset returns `(image, label)` with `image` a float tensor `[C, H, W]` in [-1, 1];
the 2-D toys return `(point [2], 0)`.

    >>> from minildm import data
    >>> shapes = data.ShapesDataset(10_000, image_size=32, seed=0)   # ~1 s, no download
    >>> x, y = shapes[0]; shapes.captions[0]                          # 'a large red circle on the left'
    >>> points = data.toy_2d("moons", 1000)                           # [1000, 2]
    >>> dataset = data.build_dataset(config.data, train=True)         # dispatches on config.data.dataset

Downloaded datasets land in `<root>/<name>/` (`data/cifar10/`, `data/mnist/`); when a download is
impossible the error names the URL to fetch and the folder to put it in. The papers' datasets (LSUN, ImageNet,
CelebA-HQ) are fetched by hand and prepared with `python -m minildm.prepare` (its docstring tables their sources,
layouts and preprocessing); they are read with ADM's preprocessing (`center_crop_arr`, `ADMTransform`).
"""

from __future__ import annotations

import functools
import math
import os
import urllib.error
from pathlib import Path

import torch
from torch.utils.data import Dataset

# ---------------------------------------------------------------------------------------------
# Procedural shapes: class labels, captions and boxes for the conditioning chapters.

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan", "white")
SHAPES_LABELS = ("kind", "color", "kind_color")  # ShapesDataset's class labels: 5, 7 or 35 classes
SIZES = ("small", "large")
RGB = torch.tensor([
    [0.90, 0.10, 0.10], [0.10, 0.75, 0.20], [0.15, 0.30, 0.95], [0.95, 0.85, 0.10],
    [0.85, 0.20, 0.85], [0.10, 0.85, 0.90], [0.95, 0.95, 0.95],
])
# Half-side of each shape's bounding box, in units of the object's radius r.
_EXTENT = torch.tensor([1.0, 0.85, 1.0, 1.15, 1.0])
_RADIUS = {"small": 0.15, "large": 0.26}  # fraction of the image side; jittered by +-0.02
_WHERE = (("at the top left", "at the top", "at the top right"),
          ("on the left", "in the centre", "on the right"),
          ("at the bottom left", "at the bottom", "at the bottom right"))


def _shape_sdf(kind: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) to each object's shape; all tensors broadcast to [B, H, W]."""
    ax, ay = dx.abs(), dy.abs()
    circle = torch.sqrt(dx**2 + dy**2) - r
    square = torch.maximum(ax, ay) - 0.85 * r
    # isosceles triangle, apex (0, -r), base corners (+-r, r); y grows downwards
    triangle = torch.maximum(dy - r, (2 * ax - dy - r) / math.sqrt(5.0))
    diamond = (ax + ay - 1.15 * r) / math.sqrt(2.0)
    arm = 0.35 * r
    cross = torch.minimum(torch.maximum(ax - r, ay - arm), torch.maximum(ax - arm, ay - r))
    sdf = torch.stack([circle, square, triangle, diamond, cross])  # [5, B, H, W]
    return sdf.gather(0, kind.expand_as(circle)[None]).squeeze(0)


def render_shapes(objects: dict[str, torch.Tensor], image_size: int, background=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """Draw objects (dict of [N, K] tensors: kind, color, cx, cy, r, present) as uint8 images [N, 3, H, W].

    Edges are anti-aliased with the signed distance (coverage = clamp(0.5 - sdf / pixel, 0, 1));
    objects are painted in order k = 0..K-1, later ones on top.
    """
    n, k_max = objects["kind"].shape
    pixel = 1.0 / image_size
    grid = (torch.arange(image_size, dtype=torch.float32) + 0.5) * pixel  # pixel centres in [0, 1]
    u, v = grid[None, None, :], grid[None, :, None]  # x along width, y along height (downwards)
    image = torch.tensor(background, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, image_size, image_size)
    for k in range(k_max):
        view = {name: value[:, k].view(n, 1, 1) for name, value in objects.items()}
        sdf = _shape_sdf(view["kind"], u - view["cx"], v - view["cy"], view["r"])
        alpha = ((0.5 - sdf / pixel).clamp(0, 1) * view["present"])[:, None]  # [N, 1, H, W]
        image = image * (1 - alpha) + RGB[objects["color"][:, k]].view(n, 3, 1, 1) * alpha
    return (image * 255).round().clamp(0, 255).to(torch.uint8)


class ShapesDataset(Dataset):
    """Coloured shapes on black, at any resolution, deterministic from `seed`; needs no download.

    Each image holds 1..`max_objects` objects with a kind (`SHAPES`), a colour (`COLORS`), a size
    (`SIZES`) and a position. `label` picks the class: "kind" (5 classes), "color" (7) or
    "kind_color" (35); with several objects the first object's attributes give the class.
    Attributes: `images` (uint8 [N, 3, H, W]), `labels` [N], `captions` (list of str),
    `boxes` (list of [k, 4] tensors, (x0, y0, x1, y1) as fractions of the side), `box_labels`
    (list of [k] kind indices), `objects` (dict of [N, K] attribute tensors), `class_names`.
    One object: size small or large, anywhere inside the image; several: small objects in
    distinct cells of a 3x3 grid. Pixels are quantised to 8 bits like real photographs.
    """

    def __init__(self, num_samples: int = 10_000, image_size: int = 32, seed: int = 0, *,
                 max_objects: int = 1, label: str = "kind", chunk_size: int = 4096):
        if label not in SHAPES_LABELS:
            raise ValueError(f"label={label!r} is not supported; use one of {', '.join(SHAPES_LABELS)}")
        if not 1 <= max_objects <= 9:
            raise ValueError(f"max_objects={max_objects} must be between 1 and 9 (objects use cells of a 3x3 grid)")
        self.num_samples, self.image_size, self.seed = num_samples, image_size, seed
        self.max_objects, self.label = max_objects, label
        self.objects = self._sample_objects(torch.Generator().manual_seed(seed))
        # render in chunks so 256x256 sets do not need one huge float buffer
        chunks = [render_shapes({key: value[i:i + chunk_size] for key, value in self.objects.items()}, image_size)
                  for i in range(0, num_samples, chunk_size)]
        self.images = torch.cat(chunks) if chunks else torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)
        first_kind, first_color = self.objects["kind"][:, 0], self.objects["color"][:, 0]
        self.labels = {"kind": first_kind, "color": first_color,
                       "kind_color": first_kind * len(COLORS) + first_color}[label].clone()

    def _sample_objects(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        n, k = self.num_samples, self.max_objects

        def uniform(*shape):
            return torch.rand(*shape, generator=generator)

        kind = torch.randint(len(SHAPES), (n, k), generator=generator)
        color = torch.randint(len(COLORS), (n, k), generator=generator)
        if k == 1:  # one object: small or large, anywhere it fits
            size = torch.randint(2, (n, 1), generator=generator)
            r = torch.where(size == 1, _RADIUS["large"], _RADIUS["small"]) + 0.04 * (uniform(n, 1) - 0.5)
            half = r * _EXTENT[kind] + 0.02  # keep a small margin to the border
            cx, cy = half + (1 - 2 * half) * uniform(n, 1), half + (1 - 2 * half) * uniform(n, 1)
            present = torch.ones(n, 1)
        else:  # several small objects in distinct cells of a 3x3 grid
            size = torch.zeros(n, k, dtype=torch.long)
            r = 0.12 + 0.02 * uniform(n, k)
            cell = uniform(n, 9).argsort(dim=1)[:, :k]
            slack = (1 / 6 - r * _EXTENT[kind]).clamp(min=0)
            cx = (cell % 3 + 0.5) / 3 + slack * (2 * uniform(n, k) - 1)
            cy = (cell // 3 + 0.5) / 3 + slack * (2 * uniform(n, k) - 1)
            count = torch.randint(1, k + 1, (n, 1), generator=generator)
            present = (torch.arange(k)[None] < count).float()
        return {"kind": kind, "color": color, "size": size, "cx": cx, "cy": cy, "r": r, "present": present}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_names(self) -> list[str]:
        if self.label == "kind":
            return list(SHAPES)
        if self.label == "color":
            return list(COLORS)
        return [f"{color} {kind}" for kind in SHAPES for color in COLORS]

    def _present(self, i: int) -> list[int]:
        return [k for k in range(self.max_objects) if self.objects["present"][i, k] > 0]

    def _describe(self, i: int, k: int) -> str:
        o = {name: value[i, k].item() for name, value in self.objects.items()}
        col, row = min(int(o["cx"] * 3), 2), min(int(o["cy"] * 3), 2)
        return f"a {SIZES[o['size']]} {COLORS[o['color']]} {SHAPES[o['kind']]} {_WHERE[row][col]}"

    @functools.cached_property
    def captions(self) -> list[str]:
        """One sentence per image, e.g. 'a large red circle on the left and a small blue square at the top'."""
        out = []
        for i in range(self.num_samples):
            parts = [self._describe(i, k) for k in self._present(i)]
            out.append(parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1])
        return out

    @functools.cached_property
    def boxes(self) -> list[torch.Tensor]:
        """Per image a [k, 4] tensor of boxes (x0, y0, x1, y1) as fractions of the image side."""
        half = self.objects["r"] * _EXTENT[self.objects["kind"]]
        cx, cy = self.objects["cx"], self.objects["cy"]
        all_boxes = torch.stack([cx - half, cy - half, cx + half, cy + half], dim=-1)  # [N, K, 4]
        return [all_boxes[i, self._present(i)] for i in range(self.num_samples)]

    @functools.cached_property
    def box_labels(self) -> list[torch.Tensor]:
        """Per image a [k] tensor of the kind index of each box."""
        return [self.objects["kind"][i, self._present(i)] for i in range(self.num_samples)]

    def tensors(self, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch at once: (images [n, 3, H, W] in [-1, 1], labels [n]); all images if indices is None."""
        indices = slice(None) if indices is None else indices
        return self.images[indices].float() / 127.5 - 1, self.labels[indices]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        return self.images[index].float() / 127.5 - 1, int(self.labels[index])


# ---------------------------------------------------------------------------------------------
# 2-D toy distributions: small enough to see every density.

TOY_2D = ("moons", "gaussians8", "swissroll", "checkerboard", "circles")


def toy_2d(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`n` points [n, 2] (float32) of a 2-D toy distribution, scaled to roughly [-2, 2] with std ~1."""
    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    if name == "moons":  # two interleaving half circles (sklearn's make_moons), centred
        angle = math.pi * rand(n)
        lower = rand(n) < 0.5
        x = torch.where(lower, 1 - torch.cos(angle), torch.cos(angle))
        y = torch.where(lower, 0.5 - torch.sin(angle), torch.sin(angle))
        points = (torch.stack([x - 0.5, y - 0.25], dim=1) + 0.06 * randn(n, 2)) * torch.tensor([1.2, 2.0])
    elif name == "gaussians8":  # 8 Gaussians (std 0.1) on a circle of radius sqrt(2)
        angle = 2 * math.pi / 8 * torch.randint(8, (n,), generator=generator).float()
        points = math.sqrt(2) * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1) + 0.1 * randn(n, 2)
    elif name == "swissroll":  # a 2-D spiral with a little noise
        angle = 1.5 * math.pi * (1 + 2 * rand(n))
        points = torch.stack([angle * torch.cos(angle), angle * torch.sin(angle)], dim=1) / 7 + 0.03 * randn(n, 2)
    elif name == "checkerboard":  # uniform on the dark squares of a 4x4 board over [-2, 2]^2
        x = 4 * rand(n) - 2
        y = rand(n) - 2 * torch.randint(2, (n,), generator=generator).float() + torch.floor(x) % 2
        points = torch.stack([x, y], dim=1)
    elif name == "circles":  # two concentric rings
        angle = 2 * math.pi * rand(n)
        radius = torch.where(rand(n) < 0.5, 0.8, 1.8)
        points = radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1) + 0.05 * randn(n, 2)
    else:
        raise ValueError(f"unknown 2-D toy {name!r}; choose one of {', '.join(TOY_2D)}")
    return points.float()


class Toy2DDataset(Dataset):
    """`num_samples` points of `toy_2d(name)` drawn once from `seed`; items are (point [2], 0)."""

    num_classes = 0

    def __init__(self, name: str = "moons", num_samples: int = 10_000, seed: int = 0):
        self.name = name
        self.points = toy_2d(name, num_samples, torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, index: int):
        return self.points[index], 0


# ---------------------------------------------------------------------------------------------
# Torchvision datasets, with an error that says what to download when the network is unavailable.

class DatasetUnavailableError(RuntimeError):
    """A dataset is not on disk and could not be downloaded; the message says what to fetch and where."""


_DOWNLOADS = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "put cifar-10-python.tar.gz in {folder}/ (it is extracted there on the next run)"),
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/"
              "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (4 files)",
              "put the 4 .gz files in {folder}/MNIST/raw/ (they are extracted there on the next run)"),
}


def _download_error(name: str, folder: Path, error: Exception) -> DatasetUnavailableError:
    url, where = _DOWNLOADS[name]
    return DatasetUnavailableError(
        f"{name} is not in {folder} and could not be downloaded ({type(error).__name__}: {error}).\n"
        f"Download {url} on a machine with network access and {where.format(folder=folder)}.\n"
        f"Or pick a dataset that needs no download: data.dataset=shapes or data.dataset=toy2d.")


def _image_transform(image_size: int, random_flip: bool, resize: bool, channels: int = 3):
    from torchvision import transforms

    steps = []
    if resize:  # shorter side to image_size, then the central square (ADM/LDM preprocessing)
        steps += [transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
                  transforms.CenterCrop(image_size)]
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * channels, [0.5] * channels)]
    return transforms.Compose(steps)


def cifar10(root: str | Path = "data", train: bool = True, image_size: int = 32, random_flip: bool = True):
    """CIFAR10 in `<root>/cifar10/`, images [3, image_size, image_size] in [-1, 1] (resized if not 32)."""
    from torchvision import datasets

    folder = Path(root) / "cifar10"
    transform = _image_transform(image_size, random_flip and train, resize=image_size != 32)
    try:
        return datasets.CIFAR10(folder, train=train, transform=transform, download=True)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        raise _download_error("cifar10", folder, error) from error


def mnist(root: str | Path = "data", train: bool = True, image_size: int = 32):
    """MNIST in `<root>/mnist/`, images [1, image_size, image_size] in [-1, 1].

    28x28 digits are zero-padded (black border) to image_size when the difference is even
    (32: pad 2), resized otherwise. No flips: a mirrored digit is not a digit.
    """
    from torchvision import datasets, transforms

    folder = Path(root) / "mnist"
    steps = []
    if image_size != 28:
        pad = image_size - 28
        steps.append(transforms.Pad(pad // 2) if pad > 0 and pad % 2 == 0 else
                     transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True))
    steps += [transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]
    try:
        return datasets.MNIST(folder, train=train, transform=transforms.Compose(steps), download=True)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        raise _download_error("mnist", folder, error) from error


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def image_files(path: str | Path) -> list[Path]:
    """Every image file under `path` (recursively, by `IMAGE_EXTENSIONS`), in sorted order: the one listing that
    training (`ImageFiles`), preparation and the FID's folders of images share."""
    return sorted(p for p in Path(path).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageFiles(Dataset):
    """Every image under `path` (recursively), label 0; for flat folders such as CelebA-HQ or LSUN exports."""

    num_classes = 0

    def __init__(self, path: str | Path, transform):
        self.files = image_files(path)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.files[index]) as image:
            return self.transform(image.convert("RGB")), 0


def image_folder(path: str | Path, image_size: int = 256, random_flip: bool = True):
    """Images of a folder, resized (shorter side) and centre-cropped to image_size, in [-1, 1].

    Sub-folders of images become classes (torchvision `ImageFolder`); images directly in
    `path` make an unconditional set (`ImageFiles`, label 0).
    """
    from torchvision import datasets

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"image folder {path} does not exist; set data.path=<folder of images> "
                                f"(for example data/celebahq256, with the images directly in it or in class sub-folders)")
    transform = _image_transform(image_size, random_flip, resize=True)
    has_direct_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir())
    dataset = ImageFiles(path, transform) if has_direct_images else datasets.ImageFolder(path, transform=transform)
    if len(dataset) == 0:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {path}")
    return dataset


def photo(image_size: int = 256) -> torch.Tensor:
    """A real photograph that ships with matplotlib (Grace Hopper, 512x600), centre-cropped to a square
    and resized (antialiased bicubic) to image_size: [3, image_size, image_size] in [-1, 1]."""
    import matplotlib.cbook
    from PIL import Image

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as image:
        transform = _image_transform(image_size, random_flip=False, resize=True)
        return transform(image.convert("RGB"))


# ---------------------------------------------------------------------------------------------
# The papers' datasets: LSUN, ImageNet and CelebA-HQ, read with ADM's preprocessing. They are not
# downloadable here (size, licences, sign-in); `minildm.prepare` writes and checks the folders they are read from,
# and its module docstring tables each dataset's source, layout, command and preprocessing.

def center_crop_arr(image, image_size: int):
    """ADM's resize and centre crop of a PIL image (guided-diffusion `image_datasets.center_crop_arr`).

    Halve both sides with a BOX filter while the shorter side is >= 2 * image_size, resize (BICUBIC) so the
    shorter side is image_size (sides rounded half to even, as Python's round), then keep the central
    image_size x image_size square (offsets rounded down). Returns a PIL image; on an image that is already
    image_size x image_size it changes nothing, so prepared folders read back exactly.
    """
    from PIL import Image

    while min(image.size) >= 2 * image_size:  # BOX halving first: better than one large bicubic step
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    left, top = (image.width - image_size) // 2, (image.height - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def lsun_resize(image, image_size: int):
    """ADM's LSUN conversion of a PIL image (guided-diffusion `datasets/lsun_bedroom.py`).

    One BOX resize so the shorter side is image_size (sides `int(round(side * scale))`), then the central
    image_size x image_size square (offsets rounded down).
    """
    from PIL import Image

    scale = image_size / min(image.size)
    image = image.resize(tuple(int(round(side * scale)) for side in image.size), resample=Image.BOX)
    left, top = (image.width - image_size) // 2, (image.height - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


class ADMTransform:
    """PIL image -> float tensor [3, image_size, image_size] in [-1, 1], as ADM's `ImageDataset.__getitem__`.

    `crop(image, image_size)` (default `center_crop_arr`), then a horizontal flip with probability 1/2 when
    random_flip (drawn from torch's generator, so DataLoader workers are seeded), then x / 127.5 - 1 in float32.
    """

    def __init__(self, image_size: int, random_flip: bool = True, crop=center_crop_arr):
        self.image_size, self.random_flip, self.crop = image_size, random_flip, crop

    def __call__(self, image) -> torch.Tensor:
        import numpy as np

        array = np.asarray(self.crop(image.convert("RGB"), self.image_size))  # [H, W, 3] uint8
        x = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x


LSUN_SCENES = ("bedroom", "bridge", "church_outdoor", "classroom", "conference_room", "dining_room", "kitchen",
               "living_room", "restaurant", "tower")


def paper_dataset_folders(name: str, root: str | Path = "data", image_size: int = 256,
                          category: str = "") -> dict[str, Path]:
    """Where a paper dataset is looked for, in order: {"prepared": folder written by `minildm.prepare`,
    "source": the official download, unpacked}. ImageNet's folders hold train/ and val/."""
    root = Path(root)
    if name == "lsun":
        if not category:
            raise ValueError("data.dataset=lsun needs an LSUN category: set data.category=church_outdoor "
                             "(or bedroom, cat, horse, ...; the scenes are " + ", ".join(LSUN_SCENES) + ")")
        export = f"{category}_train_lmdb" if category in LSUN_SCENES else category
        return {"prepared": root / f"lsun_{category}{image_size}", "source": root / "lsun" / export}
    if name in ("imagenet", "celebahq"):
        return {"prepared": root / f"{name}{image_size}", "source": root / name}
    raise ValueError(f"{name!r} is not one of the papers' prepared datasets (lsun, imagenet, celebahq)")


def is_lmdb(path: str | Path) -> bool:
    """True for an lmdb environment folder (LSUN's official exports: data.mdb and lock.mdb)."""
    return (Path(path) / "data.mdb").is_file()


def _label_zero(_) -> int:
    return 0


def _has_images(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*"))


def _not_prepared_error(name: str, root, image_size: int, category: str = "",
                        missing: Path | None = None) -> DatasetUnavailableError:
    from minildm import prepare  # the table of sources and commands lives with the preparation command

    info, folders = prepare.SOURCES[name], paper_dataset_folders(name, root, image_size, category)
    where = f" ({missing} is missing or holds no images)" if missing else ""
    return DatasetUnavailableError(
        f"{info['title'].format(category=category)} is not on disk{where}: neither {folders['prepared']}/ (prepared)"
        f" nor {folders['source']}/ (the official download) holds it, and it cannot be downloaded automatically.\n"
        f"Fetch: {prepare.source_url(name, category)}; official page: {info['page']}.\n"
        f"Expected layout: {info['layout'].format(**folders, category=category)}\n"
        f"Then prepare it: {prepare.command(name, image_size, category, root)}\n"
        f"Or point data.path at a folder of images{' or an lmdb export' if name == 'lsun' else ''}; "
        f"`{prepare.command(name, image_size, category, root)} --check` says what is found.")


def paper_dataset(name: str, root: str | Path = "data", train: bool = True, image_size: int = 256,
                  random_flip: bool = True, category: str = "", path: str | Path = "") -> Dataset:
    """LSUN, ImageNet or CelebA-HQ as (image [3, image_size, image_size] in [-1, 1], label), ADM's preprocessing.

    Reads `path` if given, else the prepared folder, else the official download (`paper_dataset_folders`).
    ImageNet: torchvision `ImageFolder` of <folder>/train (or /val when train=False), label = index of the
    sorted synset folder (n01440764 -> 0). LSUN and CelebA-HQ: label 0; they have no held-out split in the papers,
    so train=False gives the training images without flips. An LSUN lmdb export is read through torchvision's
    `LSUNClass` (it caches the key list in a `_cache_*` file in the working directory).
    """
    from torchvision import datasets

    folders = paper_dataset_folders(name, root, image_size, category)
    candidates = [Path(path)] if path else [folders["prepared"], folders["source"]]
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None:
        raise _not_prepared_error(name, root, image_size, category, missing=Path(path) if path else None)
    if name == "lsun" and is_lmdb(folder):  # the same pixels as the folder `minildm.prepare lsun` writes
        transform = ADMTransform(image_size, random_flip and train, crop=lsun_resize)
        return datasets.LSUNClass(str(folder), transform=transform, target_transform=_label_zero)
    transform = ADMTransform(image_size, random_flip and train)
    if name == "imagenet":
        folder = folder / ("train" if train else "val")
    if not _has_images(folder):
        raise _not_prepared_error(name, root, image_size, category, missing=folder)
    if name == "imagenet":
        return datasets.ImageFolder(folder, transform=transform)
    return ImageFiles(folder, transform)


# ---------------------------------------------------------------------------------------------
# Your own data: any map-style dataset or a tensor of images.


class ExampleDataset(Dataset):
    """Items of any map-style dataset as `(example, label)`: the form the training loop reads.

    An item may be an image tensor `[C, H, W]` (or a point `[D]`), a tuple `(image, label, ...)` or a dict
    `{"image": ..., "label": ...}`; a missing label reads as -1 (unconditional). Images are not rescaled:
    they must already be in [-1, 1] (`train.train` checks the first batch).
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if isinstance(item, dict):
            if "image" not in item:
                raise KeyError(f"dataset items are dicts without an 'image' key (keys: {sorted(item)}); "
                               "name the image 'image' and the class 'label'")
            example, label = item["image"], item.get("label", -1)
        elif isinstance(item, (tuple, list)):
            example, label = item[0], (item[1] if len(item) > 1 else -1)
        else:
            example, label = item, -1
        return torch.as_tensor(example, dtype=torch.float32), torch.as_tensor(label, dtype=torch.int64)


def as_dataset(examples) -> Dataset:
    """A dataset for `train.train(config, dataset=...)`: a tensor `[N, C, H, W]` (or `[N, D]` points) in [-1, 1],
    a `(tensor, labels)` pair, or any map-style dataset (see `ExampleDataset`)."""
    if isinstance(examples, torch.Tensor):
        return ExampleDataset(torch.utils.data.TensorDataset(examples))
    if isinstance(examples, tuple) and len(examples) == 2 and all(isinstance(v, torch.Tensor) for v in examples):
        return ExampleDataset(torch.utils.data.TensorDataset(*examples))
    if not hasattr(examples, "__getitem__") or not hasattr(examples, "__len__"):
        raise TypeError(f"cannot train on a {type(examples).__name__}: pass a tensor of images [N, C, H, W] in "
                        "[-1, 1], a (images, labels) pair of tensors or a map-style dataset (__len__, __getitem__)")
    return ExampleDataset(examples)


# ---------------------------------------------------------------------------------------------
# One entry point for configs (batches for training: train.StepBatches).

DATASETS = ("shapes", "toy2d", "cifar10", "mnist", "imagefolder", "lsun", "imagenet", "celebahq")


def build_dataset(config, train: bool = True) -> Dataset:
    """The dataset of a `DataConfig`: (image [C, H, W] in [-1, 1], label), or (point [2], 0) for toy2d.

    The procedural sets use seed 0 for train and seed 1 for the held-out split. Shapes ignore
    `random_flip` (a flip would contradict their captions and boxes). lsun, imagenet and celebahq are read by
    `paper_dataset` from the folders `minildm.prepare` writes (data.category names the LSUN category).
    """
    name, root = config.dataset, config.root
    if name == "shapes":
        return ShapesDataset(config.num_samples, config.image_size, seed=0 if train else 1,
                             max_objects=config.max_objects, label=config.label)
    if name == "toy2d":
        return Toy2DDataset(config.toy, config.num_samples, seed=0 if train else 1)
    if name == "cifar10":
        return cifar10(root, train, config.image_size, config.random_flip)
    if name == "mnist":
        return mnist(root, train, config.image_size)
    if name == "imagefolder":
        path = config.path or os.path.join(root, "imagefolder")
        return image_folder(path, config.image_size, config.random_flip and train)
    if name in ("lsun", "imagenet", "celebahq"):
        return paper_dataset(name, root, train, config.image_size, config.random_flip, config.category, config.path)
    raise ValueError(f"unknown dataset {name!r}; set data.dataset to one of {', '.join(DATASETS)}")

