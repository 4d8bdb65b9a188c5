"""Datasets and preprocessing: transforms, digits, image folders, CIFAR's download path (offline).

CIFAR is served from a loopback HTTP server as a `.tar.gz` built here in the exact CIFAR python
format (pickled dicts of uint8 rows, one file per batch plus the meta file), so torchvision's
real download, checksum and extraction code runs without touching the network.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import (
    CIFAR_LAYOUT,
    QuietHandler,
    decode_cifar_row,
    make_image_folder,
    serve_cifar,
)
from utils.data_utils import (
    DATASETS,
    DigitsDataset,
    SeededAugment,
    ShardSampler,
    build_datasets,
    build_transforms,
)
from utils.errors import UserError


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_download_over_http(
    dataset: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    with serve_cifar(dataset, monkeypatch, tmp_path) as files:
        train_set, test_set, classes = build_datasets(dataset, str(data_dir), 32, download=True)
        served = len(QuietHandler.requests)
        assert served >= 1  # downloaded (torchvision probes redirects with a GET first) ...
        build_datasets(dataset, str(data_dir), 32, download=True)
        assert len(QuietHandler.requests) == served  # ... and found locally the second time
    layout = CIFAR_LAYOUT[dataset]
    train_files, test_files, label_key, num_classes = layout[2], layout[3], layout[6], layout[7]
    first = pickle.loads(files[train_files[0]])
    last_test = pickle.loads(files[test_files[-1]])
    assert len(train_set) == 8 * len(train_files)
    assert len(test_set) == 8 * len(test_files)
    assert classes == [f"class_{i:03d}" for i in range(num_classes)]
    assert train_set.targets[: len(first[label_key])] == first[label_key]
    # The transform maps pixel p to p / 127.5 - 1 at the original size (test: plain resize).
    image, label = test_set[len(test_set) - 1]
    want = decode_cifar_row(last_test["data"][-1]).astype(np.float32) / 127.5 - 1.0
    assert label == last_test[label_key][-1]
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), want, atol=1e-6)


def test_cifar_missing_without_download(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cifar10 is not in"):
        build_datasets("cifar10", str(tmp_path), 32, download=False)


# --------------------------------------------------------------------------------------------
# Transforms


def test_test_transform_is_resize_to_minus_one_one() -> None:
    image = Image.new("RGB", (8, 6), (255, 0, 0))
    out = build_transforms((12, 16), train=False)(image)
    assert out.shape == (3, 12, 16)
    assert torch.all(out[0] == 1.0)
    assert torch.all(out[1:] == -1.0)


def half_white(size: int = 16) -> Image.Image:
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[:, : size // 2] = 255
    return Image.fromarray(pixels)


@pytest.mark.parametrize("flip", [True, False])
def test_train_transform_flips_only_when_asked(flip: bool) -> None:
    # Full-area crops (scale 1): only the flip changes which half is bright.
    transform = build_transforms(16, train=True, flip=flip, crop_scale=(1.0, 1.0))
    torch.manual_seed(0)
    left_bright = [transform(half_white())[0, :, :8].mean().item() > 0 for _ in range(40)]
    if flip:
        assert 5 < sum(left_bright) < 35
    else:
        assert all(left_bright)


def test_train_crop_covers_5_to_100_percent() -> None:
    """The inception crop's source area: seen through how much of a small white square survives."""
    pixels = np.zeros((100, 100, 3), dtype=np.uint8)
    pixels[45:55, 45:55] = 255  # 1% of the area, in the centre
    transform = build_transforms(100, train=True, flip=False)
    torch.manual_seed(0)
    white = [(transform(Image.fromarray(pixels))[0] > 0).float().mean().item() for _ in range(200)]
    # A crop of area a shows the square at 1%/a of the output: at most 20x (a = 5%).
    assert max(white) <= 0.01 / 0.05 * 1.3
    assert max(white) > 0.05  # small crops do happen
    assert min(white) < 0.02  # near-full crops too (or crops missing the square)


# --------------------------------------------------------------------------------------------
# Digits, seeded augmentation, shards


def test_digits_split_is_fixed_and_disjoint() -> None:
    train, test = DigitsDataset(train=True), DigitsDataset(train=False)
    assert (len(train), len(test)) == (1437, 360)
    assert sorted(set(test.targets)) == list(range(10))
    again = DigitsDataset(train=False)
    np.testing.assert_array_equal(test.data, again.data)
    train_rows = {row.tobytes() for row in train.data}
    # sklearn's digits hold a few exact duplicates; nearly all test images are unseen.
    assert sum(row.tobytes() in train_rows for row in test.data) < 5
    image, label = test[0]
    assert image.size == (8, 8)
    assert image.mode == "RGB"
    assert label == test.targets[0]


def test_digits_through_build_datasets() -> None:
    train, _test, classes = build_datasets("digits", "unused", 32)
    assert classes == [str(d) for d in range(10)]
    image, _ = train[0]
    assert image.shape == (3, 32, 32)
    assert image.min() >= -1
    assert image.max() <= 1


def test_seeded_augment_depends_on_seed_epoch_index_only() -> None:
    base = DigitsDataset(train=True)
    aug = SeededAugment(base, build_transforms(32, train=True), seed=1)
    first = aug[3][0]
    state = torch.get_rng_state()
    torch.rand(100)  # the global RNG does not matter ...
    assert torch.equal(aug[3][0], first)
    assert not torch.equal(torch.get_rng_state(), state)  # ... and is not reset by an item
    aug.set_epoch(1)
    assert not torch.equal(aug[3][0], first)
    assert not torch.equal(SeededAugment(base, aug.transform, seed=2)[3][0], first)


@pytest.mark.parametrize(("length", "world"), [(10, 3), (7, 2), (1, 4), (360, 2)])
def test_shards_cover_every_index_once(length: int, world: int) -> None:
    seen = [i for rank in range(world) for i in ShardSampler(length, rank, world)]
    assert sorted(seen) == list(range(length))
    assert sum(len(ShardSampler(length, r, world)) for r in range(world)) == length


# --------------------------------------------------------------------------------------------
# Image folders


@pytest.mark.parametrize("test_name", ["val", "test"])
def test_imagefolder(tmp_path: Path, test_name: str) -> None:
    make_image_folder(tmp_path, test_name, classes=("cat", "dog", "eel"))
    train, test, classes = build_datasets("imagefolder", str(tmp_path), 32)
    assert classes == ["cat", "dog", "eel"]
    assert (len(train), len(test)) == (12, 6)
    image, label = test[len(test) - 1]
    assert label == 2
    assert image.shape == (3, 32, 32)
    assert image[0].mean().item() == pytest.approx(400 / 255 - 1, abs=0.01)  # red 200 of class 2


def test_imagefolder_wrong_layout(tmp_path: Path) -> None:
    (tmp_path / "cats").mkdir()
    with pytest.raises(UserError, match=r"train/(.|\n)*val/"):
        build_datasets("imagefolder", str(tmp_path), 32)
    with pytest.raises(UserError, match="does not exist"):
        build_datasets("imagefolder", os.fspath(tmp_path / "missing"), 32)


def test_imagefolder_class_mismatch(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    (tmp_path / "val" / "dog").rename(tmp_path / "val" / "doge")
    with pytest.raises(UserError, match="differ"):
        build_datasets("imagefolder", str(tmp_path), 32)


def test_unknown_dataset() -> None:
    assert set(DATASETS) == {"cifar10", "cifar100", "imagefolder", "digits"}
    with pytest.raises(UserError, match="Unknown dataset"):
        build_datasets("mnist", ".", 32)
