"""The papers' datasets (LSUN, ImageNet, CelebA-HQ, CIFAR10): ADM's preprocessing pixel for pixel, the preparation
command end to end, labels, and the errors that say what to fetch; on small stand-ins built in tmp_path."""

import dataclasses
import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minildm import config as config_module
from minildm import data, prepare, presets
from minildm.config import DataConfig

# ---------------------------------------------------------------------------------------------
# Transcriptions of ADM's preprocessing, the references the package must match.


def adm_center_crop_arr(pil_image, image_size):
    """guided-diffusion, guided_diffusion/image_datasets.py, center_crop_arr (transcribed)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def adm_lsun_image(webp_data, image_size):
    """guided-diffusion, datasets/lsun_bedroom.py, the body of read_images' loop (transcribed)."""
    img = Image.open(io.BytesIO(webp_data))
    width, height = img.size
    scale = image_size / min(width, height)
    img = img.resize((int(round(scale * width)), int(round(scale * height))), resample=Image.BOX)
    arr = np.array(img)
    h, w, _ = arr.shape
    h_off = (h - image_size) // 2
    w_off = (w - image_size) // 2
    return arr[h_off: h_off + image_size, w_off: w_off + image_size]


def adm_item(arr):
    """guided-diffusion ImageDataset.__getitem__ without the flip: float32 [C, H, W] = arr / 127.5 - 1."""
    return torch.from_numpy(np.transpose(arr.astype(np.float32) / 127.5 - 1, [2, 0, 1]))


def random_image(width, height, seed):
    """Smooth colours plus noise: every resampling filter changes such pixels."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    smooth = np.stack([xs * 255 / width, ys * 255 / height, (xs + ys) * 127 / (width + height)], axis=-1)
    return Image.fromarray(np.clip(smooth + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8))


def encoded(image, fmt="JPEG"):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


SIZES = [(64, 64), (100, 60), (60, 100), (257, 129), (129, 257), (300, 200), (67, 67), (33, 97), (512, 383)]


@pytest.mark.parametrize("image_size", [16, 32, 64])
def test_center_crop_arr_equals_adm_pixel_for_pixel(image_size):
    for seed, (width, height) in enumerate(SIZES):
        image = random_image(width, height, seed)
        expected = adm_center_crop_arr(image, image_size)
        ours = np.asarray(data.center_crop_arr(image, image_size))
        assert ours.shape == (image_size, image_size, 3)
        np.testing.assert_array_equal(ours, expected, err_msg=f"{width}x{height} -> {image_size}")
        # the tensor too: the same float32 arithmetic as ADM's ImageDataset, bit for bit
        assert torch.equal(data.ADMTransform(image_size, random_flip=False)(image), adm_item(expected))


def test_center_crop_arr_leaves_an_image_at_the_size_unchanged():
    image = random_image(32, 32, 0)
    np.testing.assert_array_equal(np.asarray(data.center_crop_arr(image, 32)), np.asarray(image))


def test_lsun_resize_equals_adm_lsun_bedroom_pixel_for_pixel():
    for seed, (width, height) in enumerate(SIZES):
        value = encoded(random_image(width, height, seed))
        expected = adm_lsun_image(value, 24)
        ours = np.asarray(data.lsun_resize(Image.open(io.BytesIO(value)).convert("RGB"), 24))
        np.testing.assert_array_equal(ours, expected, err_msg=f"{width}x{height}")


def test_adm_transform_flips_half_the_time():
    image = random_image(20, 20, 1)
    transform = data.ADMTransform(20, random_flip=True)
    plain = data.ADMTransform(20, random_flip=False)(image)
    torch.manual_seed(0)
    outputs = [transform(image) for _ in range(200)]
    flipped = [torch.equal(x, plain.flip(-1)) for x in outputs]
    assert all(f or torch.equal(x, plain) for f, x in zip(flipped, outputs))
    assert 0.4 < sum(flipped) / 200 < 0.6


# ---------------------------------------------------------------------------------------------
# Stand-ins in the official layouts.

LSUN_SIZES = [(40, 30), (30, 52), (64, 48), (33, 33), (90, 40)]


def make_lsun_lmdb(folder, sizes=LSUN_SIZES, fmt="JPEG"):
    """An lmdb like LSUN's exports (church_outdoor_train_lmdb/): keys are 40-hex-digit image ids, values encoded
    images; torchvision's LSUNClass reads keys in cursor order and decodes the values with PIL."""
    import lmdb

    folder.mkdir(parents=True)
    records = {}
    for i, (width, height) in enumerate(sizes):
        key = f"{(i * 7919 + 13) % 10**6:040x}".encode()  # not in insertion order
        records[key] = encoded(random_image(width, height, 100 + i), fmt)
    environment = lmdb.open(str(folder), map_size=1 << 26)
    with environment.begin(write=True) as transaction:
        for key, value in records.items():
            transaction.put(key, value)
    environment.close()
    return [records[key] for key in sorted(records)]  # lmdb's key order


def make_imagenet(root, split_sizes={"train": 3, "val": 1}):
    """data/imagenet/{train,val}/<synset>/<file>.JPEG with two synsets (created in reverse order)."""
    seed = 0
    for synset in ("n02085620", "n01440764"):
        for split, count in split_sizes.items():
            (root / split / synset).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                name = f"{synset}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{synset[-3:]}{i}.JPEG"
                seed += 1
                random_image(50 + 7 * i, 40 + 11 * i, seed).save(root / split / synset / name)


@pytest.fixture
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# ---------------------------------------------------------------------------------------------
# LSUN


def test_prepare_lsun_end_to_end_and_read_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # torchvision's LSUNClass writes its key cache in the working directory
    root = tmp_path / "data"
    values = make_lsun_lmdb(root / "lsun" / "church_outdoor_train_lmdb")
    assert prepare.main(["lsun", "--category", "church_outdoor", "--root", str(root), "--image-size", "16"]) == 0

    out = root / "lsun_church_outdoor16"
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == [f"church_outdoor_{i:07d}.png" for i in range(len(values))]
    assert not (root / "lsun_church_outdoor16.partial").exists()
    manifest = json.loads((out / "prepared.json").read_text())
    assert (manifest["count"], manifest["image_size"], manifest["category"]) == (len(values), 16, "church_outdoor")
    for file, value in zip(files, values):  # key order, ADM's conversion, lossless
        np.testing.assert_array_equal(np.asarray(Image.open(file)), adm_lsun_image(value, 16))

    config = DataConfig(dataset="lsun", category="church_outdoor", root=str(root), image_size=16, random_flip=False)
    dataset = data.build_dataset(config)
    assert len(dataset) == len(values)
    x, y = dataset[2]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 0
    assert -1 <= x.min() < -0.5 and 0.5 < x.max() <= 1
    assert torch.equal(x, adm_item(adm_lsun_image(values[2], 16)))
    # the lmdb export read directly (torchvision's LSUNClass) gives the same pixels as the prepared folder
    direct = data.build_dataset(dataclasses.replace(config, path=str(root / "lsun" / "church_outdoor_train_lmdb")))
    assert len(direct) == len(values)
    assert all(torch.equal(direct[i][0], dataset[i][0]) and direct[i][1] == 0 for i in range(len(values)))


def test_lsun_export_is_read_when_not_prepared(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    values = make_lsun_lmdb(tmp_path / "lsun" / "cat", sizes=[(30, 20), (20, 30)], fmt="WEBP")  # objects: lsun/cat/
    dataset = data.build_dataset(DataConfig(dataset="lsun", category="cat", root=str(tmp_path), image_size=8,
                                            random_flip=False))
    assert len(dataset) == 2 and torch.equal(dataset[1][0], adm_item(adm_lsun_image(values[1], 8)))


def test_prepare_lsun_resumes_and_stops_at_max_images(tmp_path, capsys):
    lmdb_dir = tmp_path / "bedroom_train_lmdb"
    values = make_lsun_lmdb(lmdb_dir)
    out = tmp_path / "bedrooms"
    # an interrupted run: one image written, one half-written temporary file
    partial = tmp_path / "bedrooms.partial"
    partial.mkdir()
    marker = np.full((8, 8, 3), 7, np.uint8)
    Image.fromarray(marker).save(partial / "bedroom_0000001.png")
    (partial / "bedroom_0000002.png.tmp").write_bytes(b"trunc")  # an earlier version's temporary name
    (partial / ".bedroom_0000009.png.tmp4242-0a1b2c3d").write_bytes(b"trunc")  # checkpoints.atomic_path's
    assert prepare.main(["lsun", "--lmdb", str(lmdb_dir), "--out", str(out), "--image-size", "8",
                         "--max-images", "4"]) == 0
    assert "resuming" in capsys.readouterr().out
    names = sorted(f.name for f in out.glob("*.png"))
    assert names == [f"bedroom_{i:07d}.png" for i in range(4)]  # the category from the export's name; 4 of 5
    np.testing.assert_array_equal(np.asarray(Image.open(out / "bedroom_0000001.png")), marker)  # kept, not redone
    np.testing.assert_array_equal(np.asarray(Image.open(out / "bedroom_0000002.png")), adm_lsun_image(values[2], 8))
    assert not partial.exists()
    assert sorted(f.name for f in out.iterdir()) == [*names, "prepared.json"]  # no temporary file came along
    # a finished folder is left alone
    assert prepare.main(["lsun", "--lmdb", str(lmdb_dir), "--out", str(out), "--image-size", "8"]) == 0
    assert "already prepared" in capsys.readouterr().out and len(list(out.glob("*.png"))) == 4


def test_a_failed_conversion_closes_the_lmdb_and_the_progress_bar_and_keeps_no_half_image(tmp_path, monkeypatch):
    import lmdb

    lmdb_dir = tmp_path / "bedroom_train_lmdb"
    make_lsun_lmdb(lmdb_dir)
    environments, bars, lmdb_open = [], [], lmdb.open

    class Environment:  # lmdb's own type cannot be patched: a wrapper that records close()
        def __init__(self, *args, **kwargs):
            self.inner, self.closed = lmdb_open(*args, **kwargs), False
            environments.append(self)

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def close(self):
            self.closed = True
            self.inner.close()

    class Bar:
        def __init__(self, *args, **kwargs):
            self.closed = False
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.closed = True

        def update(self, n=1):
            pass

    save = Image.Image.save

    def disk_full_at_the_third(image, fp, *args, **kwargs):
        if "0000002" in str(fp):
            Path(fp).write_bytes(b"half a png")
            raise OSError(28, "No space left on device")
        return save(image, fp, *args, **kwargs)

    monkeypatch.setattr(lmdb, "open", Environment)
    monkeypatch.setattr(prepare, "progress", Bar)
    monkeypatch.setattr(Image.Image, "save", disk_full_at_the_third)
    with pytest.raises(OSError, match="No space left"):
        prepare.prepare_lsun(lmdb_dir, tmp_path / "out", image_size=8)
    assert environments and all(e.closed for e in environments) and [b.closed for b in bars] == [True]
    partial = tmp_path / "out.partial"
    assert sorted(f.name for f in partial.iterdir()) == ["bedroom_0000000.png", "bedroom_0000001.png"]


def test_prepare_with_workers_writes_the_same_images(tmp_path):
    lmdb_dir = tmp_path / "lsun" / "church_outdoor_train_lmdb"
    values = make_lsun_lmdb(lmdb_dir, sizes=LSUN_SIZES[:3])
    out = prepare.prepare_lsun(lmdb_dir, tmp_path / "out", image_size=8, workers=2, prefix="church_outdoor")
    for i, value in enumerate(values):
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"church_outdoor_{i:07d}.png")),
                                      adm_lsun_image(value, 8))


def test_the_paper_preset_reads_the_prepared_data(tmp_path, capsys):
    root = tmp_path / "data"
    make_lsun_lmdb(root / "lsun" / "church_outdoor_train_lmdb", sizes=[(300, 260), (260, 280)])
    assert prepare.main(["--preset", "ddpm-lsun-church256", "--root", str(root)]) == 0
    preset = presets.get("ddpm-lsun-church256")
    config_module.validate(preset)  # the configs' validation knows the new datasets
    dataset = data.build_dataset(dataclasses.replace(preset.data, root=str(root)))
    x, y = dataset[0]
    assert len(dataset) == 2 and x.shape == (3, 256, 256) and y == 0 and -1 <= x.min() and x.max() <= 1


# ---------------------------------------------------------------------------------------------
# ImageNet and CelebA-HQ


def test_imagenet_labels_are_sorted_synsets_and_pixels_are_adm(tmp_path):
    make_imagenet(tmp_path / "imagenet")
    config = DataConfig(dataset="imagenet", root=str(tmp_path), image_size=16, random_flip=False)
    train = data.build_dataset(config)
    assert train.classes == ["n01440764", "n02085620"] and len(train) == 6
    assert [y for _, y in train.samples] == [0, 0, 0, 1, 1, 1]
    for index in (0, 4):
        path, label = train.samples[index]
        x, y = train[index]
        assert y == label and x.shape == (3, 16, 16)
        with Image.open(path) as image:
            assert torch.equal(x, adm_item(adm_center_crop_arr(image.convert("RGB"), 16)))
    val = data.build_dataset(config, train=False)
    assert len(val) == 2 and [y for _, y in val.samples] == [0, 1]


def test_prepare_imagenet_keeps_the_tree_and_the_pixels(tmp_path):
    make_imagenet(tmp_path / "imagenet")
    config = DataConfig(dataset="imagenet", root=str(tmp_path), image_size=16, random_flip=False)
    source = data.build_dataset(config)
    assert prepare.main(["imagenet", "--root", str(tmp_path), "--image-size", "16"]) == 0
    assert (tmp_path / "imagenet16" / "train" / "n01440764" / "n01440764_0.png").is_file()
    assert (tmp_path / "imagenet16" / "val" / "n02085620" / "ILSVRC2012_val_6200.png").is_file()
    prepared = data.build_dataset(config)  # the prepared folder is found first
    assert str(prepared.root).endswith("imagenet16/train") and prepared.classes == source.classes
    assert all(torch.equal(prepared[i][0], source[i][0]) and prepared[i][1] == source[i][1] for i in range(6))


def test_celebahq_flat_folder_and_prepare(tmp_path):
    folder = tmp_path / "celebahq"
    folder.mkdir()
    for i in range(3):
        random_image(64, 64, i).save(folder / f"{i}.jpg")
    config = DataConfig(dataset="celebahq", root=str(tmp_path), image_size=16, random_flip=False)
    source = data.build_dataset(config)
    x, y = source[1]
    assert len(source) == 3 and x.shape == (3, 16, 16) and y == 0
    with Image.open(folder / "1.jpg") as image:  # 64 -> 32 -> 16 by 2x2 box averages, each rounded to 8 bits
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float()
    pooled = torch.nn.functional.avg_pool2d(pixels[None], 4)[0] / 127.5 - 1
    torch.testing.assert_close(x, pooled, atol=2.5 / 127.5, rtol=0)  # the pixels' noise has std 40 / 127.5
    assert prepare.main(["celebahq", "--root", str(tmp_path), "--image-size", "16"]) == 0
    prepared = data.build_dataset(config)
    assert sorted(p.name for p in prepared.files) == ["0.png", "1.png", "2.png"]
    assert all(torch.equal(prepared[i][0], source[i][0]) for i in range(3))


# ---------------------------------------------------------------------------------------------
# Missing data: what to fetch, the layout, the command.


@pytest.mark.parametrize("name, category, expected", [
    ("lsun", "church_outdoor", ["http://dl.yf.io/lsun/scenes/church_outdoor_train_lmdb.zip", "https://www.yf.io/p/lsun",
                                "lsun/church_outdoor_train_lmdb/data.mdb",
                                "lsun_church_outdoor256/church_outdoor_0000000.png",
                                "python -m minildm.prepare lsun --category church_outdoor --image-size 256 --root"]),
    ("lsun", "cat", ["http://dl.yf.io/lsun/objects/cat.zip", "lsun/cat/data.mdb"]),
    ("imagenet", "", ["https://image-net.org/challenges/LSVRC/2012", "ILSVRC2012_img_train.tar",
                      "imagenet/train/n01440764/n01440764_10026.JPEG", "imagenet/val/n01440764/",
                      "python -m minildm.prepare imagenet --image-size 256 --root"]),
    ("celebahq", "", ["https://github.com/tkarras/progressive_growing_of_gans", "CelebAMask-HQ",
                      "celebahq/0.jpg", "python -m minildm.prepare celebahq --image-size 256 --root"]),
])
def test_missing_dataset_says_what_to_fetch_the_layout_and_the_command(tmp_path, name, category, expected):
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.build_dataset(DataConfig(dataset=name, category=category, root=str(tmp_path), image_size=256))
    message = str(info.value)
    for text in expected:
        assert text in message, (text, message)
    assert str(tmp_path) in message and "data.path" in message and "--check` says what is found" in message


def test_other_missing_data_errors(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="data.category=church_outdoor"):
        data.build_dataset(DataConfig(dataset="lsun", root=str(tmp_path)))
    with pytest.raises(data.DatasetUnavailableError, match=f"{tmp_path / 'nowhere'} is missing"):
        data.build_dataset(DataConfig(dataset="celebahq", path=str(tmp_path / "nowhere")))
    make_imagenet(tmp_path / "imagenet", {"train": 1})  # no val/
    with pytest.raises(data.DatasetUnavailableError, match="imagenet/val is missing or holds no images"):
        data.build_dataset(DataConfig(dataset="imagenet", root=str(tmp_path), image_size=16), train=False)
    # preparation: not an lmdb export, an ImageNet without train/, no images, no lmdb package
    (tmp_path / "notlmdb").mkdir()
    assert prepare.main(["lsun", "--lmdb", str(tmp_path / "notlmdb"), "--out", str(tmp_path / "o")]) == 1
    assert "no data.mdb" in capsys.readouterr().err
    assert prepare.main(["imagenet", "--src", str(tmp_path / "imagenet" / "train"), "--out", str(tmp_path / "o")]) == 1
    assert "has no train/ folder" in capsys.readouterr().err
    assert prepare.main(["celebahq", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no images under" in err and "CelebAMask-HQ" in err and not (tmp_path / "celebahq256.partial").exists()
    (tmp_path / "faces").mkdir()
    (tmp_path / "faces" / "0.jpg").write_bytes(b"not a jpeg")
    assert prepare.main(["celebahq", "--src", str(tmp_path / "faces"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert f"cannot decode {tmp_path / 'faces' / '0.jpg'}" in err and (tmp_path / "o.partial").is_dir()  # resumable
    monkeypatch.setitem(__import__("sys").modules, "lmdb", None)
    assert prepare.main(["lsun", "--category", "bedroom", "--root", str(tmp_path)]) == 1
    assert "pip install lmdb" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare.main(["lsun", "--check"])
    assert "--category" in capsys.readouterr().err


def test_cifar10_offline_through_prepare(tmp_path, offline, capsys):
    assert prepare.main(["cifar10", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in err and str(tmp_path / "cifar10") in err


def test_check_prints_the_layout_and_what_is_found(tmp_path, capsys):
    root = str(tmp_path)
    assert prepare.main(["lsun", "--category", "church_outdoor", "--root", root, "--image-size", "8", "--check"]) == 1
    out = capsys.readouterr().out
    assert "NOT FOUND" in out and "church_outdoor_train_lmdb.zip" in out and "data.mdb" in out
    assert f"{tmp_path / 'lsun_church_outdoor8'}/  missing" in out
    assert "python -m minildm.prepare lsun --category church_outdoor --image-size 8 --root" in out
    make_lsun_lmdb(tmp_path / "lsun" / "church_outdoor_train_lmdb", sizes=LSUN_SIZES[:2])
    assert prepare.main(["lsun", "--category", "church_outdoor", "--root", root, "--image-size", "8", "--check"]) == 0
    assert "found (lmdb export)" in capsys.readouterr().out
    prepare.main(["lsun", "--category", "church_outdoor", "--root", root, "--image-size", "8"])
    capsys.readouterr()
    assert prepare.main(["lsun", "--category", "church_outdoor", "--root", root, "--image-size", "8", "--check"]) == 0
    assert "found, 2 images" in capsys.readouterr().out
    assert prepare.main(["--preset", "adm-imagenet64", "--root", root, "--check"]) == 1
    out = capsys.readouterr().out
    assert "ImageNet" in out and "(64x64)" in out and "imagenet/train/n01440764" in out
    assert prepare.main(["cifar10", "--root", root, "--check"]) == 1
    assert "cifar-10-python.tar.gz" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        prepare.main(["--preset", "ddpm-shapes", "--check"])
    assert "needs no preparation" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Presets name their datasets.

PAPER_DATA = {
    "ddpm-cifar10": ("cifar10", ""), "iddpm-cifar10": ("cifar10", ""),
    "ddpm-celebahq256": ("celebahq", ""), "ldm-celebahq256": ("celebahq", ""),
    "ddpm-lsun-church256": ("lsun", "church_outdoor"), "ldm-lsun-churches256": ("lsun", "church_outdoor"),
    "ddpm-lsun-bedroom256": ("lsun", "bedroom"), "iddpm-lsun-bedroom256": ("lsun", "bedroom"),
    "adm-lsun-bedroom": ("lsun", "bedroom"), "ddpm-lsun-cat256": ("lsun", "cat"), "adm-lsun-cat": ("lsun", "cat"),
    "adm-lsun-horse": ("lsun", "horse"), "iddpm-imagenet64-cond": ("imagenet", ""),
    "adm-imagenet64": ("imagenet", ""), "adm-imagenet256": ("imagenet", ""), "adm-classifier128": ("imagenet", ""),
    "adm-upsampler-64-256": ("imagenet", ""), "ldm-cin256-v2": ("imagenet", ""),
}


def test_paper_presets_name_their_dataset():
    for name, (dataset, category) in PAPER_DATA.items():
        config = presets.get(name)
        assert (config.data.dataset, config.data.category) == (dataset, category), name
        config_module.validate(config)
    assert not presets.get("adm-lsun-bedroom").data.random_flip and presets.get("adm-lsun-cat").data.random_flip
