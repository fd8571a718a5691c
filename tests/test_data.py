import time
import urllib.error
import urllib.request

import pytest
import torch

from minildm import data
from minildm.config import DataConfig


def test_shapes_dataset_contract():
    dataset = data.ShapesDataset(64, image_size=16, seed=0)
    x, y = dataset[3]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1  # black background is exactly -1
    assert isinstance(y, int) and 0 <= y < dataset.num_classes == 5
    assert dataset.class_names == list(data.SHAPES)
    assert len(dataset) == len(dataset.captions) == len(dataset.boxes) == 64
    images, labels = dataset.tensors()
    assert images.shape == (64, 3, 16, 16) and torch.equal(labels, dataset.labels)
    assert torch.equal(images[3], x)


def test_shapes_deterministic_from_seed_and_any_resolution():
    a, b = data.ShapesDataset(32, 32, seed=5), data.ShapesDataset(32, 32, seed=5)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, data.ShapesDataset(32, 32, seed=6).images)
    # the same objects drawn at two resolutions: downsampling the large one gives nearly the small one
    small, large = data.ShapesDataset(8, 16, seed=1), data.ShapesDataset(8, 64, seed=1)
    assert small.captions == large.captions
    pooled = torch.nn.functional.avg_pool2d(large.tensors()[0], 4)
    assert (pooled - small.tensors()[0]).abs().mean() < 0.03


def test_shapes_caption_colour_and_box_match_the_pixels():
    dataset = data.ShapesDataset(40, image_size=32, seed=2)
    for i in range(40):
        kind, color = data.SHAPES[dataset.objects["kind"][i, 0]], data.COLORS[dataset.objects["color"][i, 0]]
        assert f"{color} {kind}" in dataset.captions[i]
        assert dataset.labels[i] == data.SHAPES.index(kind)
        box = (dataset.boxes[i][0] * 32).tolist()  # pixels
        image = dataset.images[i].float()
        lit = image.sum(0) > 0
        ys, xs = torch.nonzero(lit, as_tuple=True)
        lit_box = [xs.min() + 0.5, ys.min() + 0.5, xs.max() + 0.5, ys.max() + 0.5]  # centres of the outermost pixels
        # tight within anti-aliasing: every edge of the box within 1.5 pixels of the drawn pixels
        torch.testing.assert_close(torch.tensor(lit_box).float(), torch.tensor(box), atol=1.5, rtol=0)
        # the object's centre pixel has the named colour
        cx, cy = int(dataset.objects["cx"][i, 0] * 32), int(dataset.objects["cy"][i, 0] * 32)
        if kind == "triangle":  # the centroid of the triangle lies below the box centre
            cy = int((dataset.objects["cy"][i, 0] + 0.3 * dataset.objects["r"][i, 0]) * 32)
        torch.testing.assert_close(image[:, cy, cx] / 255, data.RGB[data.COLORS.index(color)], atol=0.01, rtol=0)


def test_shapes_captions_positions():
    dataset = data.ShapesDataset(200, image_size=32, seed=3)
    for i in range(200):
        cx = dataset.objects["cx"][i, 0]
        caption = dataset.captions[i]
        if cx < 1 / 3:
            assert caption.endswith("left")
        elif cx > 2 / 3:
            assert caption.endswith("right")
        else:
            assert not caption.endswith(("left", "right"))


def test_shapes_several_objects_and_label_kinds():
    dataset = data.ShapesDataset(100, image_size=32, seed=0, max_objects=3, label="kind_color")
    counts = torch.tensor([len(b) for b in dataset.boxes])
    assert counts.min() == 1 and counts.max() == 3
    assert all(caption.count(" and ") + caption.count(", ") == len(b) - 1 for caption, b in zip(dataset.captions, dataset.boxes))
    assert dataset.num_classes == 35 and dataset.class_names[0] == "red circle"
    kind, color = dataset.objects["kind"][:, 0], dataset.objects["color"][:, 0]
    assert torch.equal(dataset.labels, kind * 7 + color)
    assert all(torch.equal(dataset.box_labels[i], dataset.objects["kind"][i, :counts[i]]) for i in range(100))
    assert data.ShapesDataset(4, 8, label="color").num_classes == 7
    with pytest.raises(ValueError, match="label"):
        data.ShapesDataset(4, 8, label="size")


def test_shapes_are_fast():
    start = time.perf_counter()
    data.ShapesDataset(10_000, image_size=32, seed=0)
    assert time.perf_counter() - start < 10  # ~0.5 s alone; generous for a shared 2-core machine


@pytest.mark.parametrize("name", data.TOY_2D)
def test_toy_2d(name):
    points = data.toy_2d(name, 4000, torch.Generator().manual_seed(0))
    assert points.shape == (4000, 2) and points.dtype == torch.float32
    assert points.abs().max() < 3 and 0.7 < points.std() < 1.3
    assert torch.equal(points, data.toy_2d(name, 4000, torch.Generator().manual_seed(0)))


def test_toy_2d_shapes_of_the_distributions():
    gaussians = data.toy_2d("gaussians8", 4000, torch.Generator().manual_seed(0))
    assert torch.allclose(gaussians.norm(dim=1).mean(), torch.tensor(2**0.5), atol=0.02)
    board = data.toy_2d("checkerboard", 4000, torch.Generator().manual_seed(0))
    parity = (torch.floor(board[:, 0]) + torch.floor(board[:, 1])) % 2
    assert (parity == parity[0]).all()  # only squares of one colour
    with pytest.raises(ValueError, match="moons"):
        data.toy_2d("spiral3d", 10)


def test_build_dataset_dispatch():
    shapes = data.build_dataset(DataConfig(dataset="shapes", image_size=8, num_samples=20))
    assert isinstance(shapes, data.ShapesDataset) and shapes[0][0].shape == (3, 8, 8)
    held_out = data.build_dataset(DataConfig(dataset="shapes", image_size=8, num_samples=20), train=False)
    assert not torch.equal(shapes.images, held_out.images)
    toy = data.build_dataset(DataConfig(dataset="toy2d", toy="swissroll", num_samples=30))
    point, label = toy[0]
    assert point.shape == (2,) and label == 0 and len(toy) == 30
    with pytest.raises(ValueError, match="shapes, toy2d, cifar10"):
        data.build_dataset(DataConfig(dataset="imagenet21k"))


@pytest.fixture
def offline(monkeypatch):
    """No network: every URL open fails like an unplugged cable."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_cifar10_offline_error_says_what_to_download_and_where(tmp_path, offline):
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.build_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))
    message = str(info.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert str(tmp_path / "cifar10") in message and "cifar-10-python.tar.gz" in message


def test_mnist_offline_error_says_what_to_download_and_where(tmp_path, offline):
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.mnist(tmp_path, train=True)
    message = str(info.value)
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/" in message and "ubyte.gz" in message
    assert str(tmp_path / "mnist" / "MNIST" / "raw") in message


def _fake_cifar10(folder, n=10):
    """A CIFAR10-format folder (pickled batches) so the torchvision loader runs without a download."""
    import pickle

    import numpy as np

    base = folder / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(range(n))}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


def test_cifar10_transform(tmp_path, monkeypatch):
    _fake_cifar10(tmp_path / "cifar10")
    from torchvision.datasets import cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args: True)  # md5s of the fake files differ
    dataset = data.build_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), image_size=16))
    x, y = dataset[0]
    assert x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1 and y == 0
    assert len(dataset) == 50
    plain = data.cifar10(tmp_path, train=False, random_flip=False)
    raw = torch.from_numpy(plain.data[0]).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(plain[0][0], raw)


def test_mnist_padding_to_32(tmp_path, monkeypatch):
    from torchvision import datasets

    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    monkeypatch.setattr(datasets.MNIST, "_check_exists", lambda self: True)
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    monkeypatch.setattr(datasets.MNIST, "_load_data", lambda self: (images, torch.arange(5)))
    padded = data.mnist(tmp_path, image_size=32)[1][0]
    assert padded.shape == (1, 32, 32)
    assert (padded[:, :2] == -1).all() and (padded[:, :, -2:] == -1).all()
    torch.testing.assert_close(padded[0, 2:30, 2:30], images[1].float() / 127.5 - 1)
    assert data.mnist(tmp_path, image_size=16)[0][0].shape == (1, 16, 16)


def test_image_folder_flat_and_classes(tmp_path):
    from PIL import Image

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (255, 0, 0)).save(flat / f"{i}.png")
    dataset = data.build_dataset(DataConfig(dataset="imagefolder", path=str(flat), image_size=16))
    x, y = dataset[0]
    assert len(dataset) == 3 and x.shape == (3, 16, 16) and y == 0
    torch.testing.assert_close(x[:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    for name in ("cats", "dogs"):
        (tmp_path / "classes" / name).mkdir(parents=True)
        Image.new("RGB", (20, 20)).save(tmp_path / "classes" / name / "a.jpg")
    classes = data.image_folder(tmp_path / "classes", image_size=8)
    assert [y for _, y in classes] == [0, 1]
    with pytest.raises(FileNotFoundError, match="data.path"):
        data.image_folder(tmp_path / "missing")


def test_photo_is_a_real_image_at_any_size():
    x = data.photo(64)
    assert x.shape == (3, 64, 64) and -1 <= x.min() < -0.5 and 0.5 < x.max() <= 1
    small = data.photo(16)
    pooled = torch.nn.functional.avg_pool2d(x[None], 4)[0]
    correlation = torch.corrcoef(torch.stack([pooled.flatten(), small.flatten()]))[0, 1]
    assert correlation > 0.95  # the same picture at two resolutions
