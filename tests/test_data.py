"""Datasets and loaders: transforms, digits, image folders, CIFAR's download path (offline),
the minival split, the two training paths (uint8 batches preprocessed on the device, and
per-image) and their seeding.

CIFAR is served from a loopback HTTP server as a `.tar.gz` built here in the exact CIFAR python
format (pickled dicts of uint8 rows, one file per batch plus the meta file), so torchvision's
real download, checksum and extraction code runs without touching the network.
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from tests.helpers import (
    CIFAR_LAYOUT,
    QuietHandler,
    assert_same_batches,
    decode_cifar_row,
    loader_args,
    make_image_folder,
    make_photo_folder,
    serve_cifar,
    set_epoch,
)
from utils.data.loaders import (
    READERS,
    CropBatch,
    DeviceAugment,
    DigitsDataset,
    InMemoryAugment,
    ResizeBatch,
    SeededAugment,
    ShardSampler,
    build_eval_loader,
    build_test_set,
    build_transforms,
    get_loader,
    prepare_batch,
)
from utils.data.registry import DATASETS, holdout_split
from utils.infra.errors import LoaderError, UserError
from utils.infra.watchdog import WatchedLoader


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """Undo the normalisation of an image kept at its size: (3, H, W) in [-1, 1] -> (H, W, 3)."""
    return np.round(image.permute(1, 2, 0).numpy() * 127.5 + 127.5).astype(np.uint8)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_download_over_http(
    dataset: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    args = loader_args(dataset, tmp_path / "data", holdout_fraction=0.0)
    with serve_cifar(dataset, monkeypatch, tmp_path) as files:
        train_loader, minival_loader, test_loader = get_loader(**args)
        served = len(QuietHandler.requests)
        assert served >= 1  # downloaded (torchvision probes redirects with a GET first) ...
        get_loader(**args)
        assert len(QuietHandler.requests) == served  # ... and found locally the second time
    layout = CIFAR_LAYOUT[dataset]
    train_files, test_files, label_key, num_classes = layout[2], layout[3], layout[6], layout[7]
    first = pickle.loads(files[train_files[0]])
    last_test = pickle.loads(files[test_files[-1]])
    train_set, test_set = train_loader.dataset, test_loader.dataset
    assert minival_loader is None
    assert len(train_set) == 8 * len(train_files)
    assert len(test_set) == 8 * len(test_files)
    assert train_set.classes == [f"class_{i:03d}" for i in range(num_classes)]
    assert train_set.targets[: len(first[label_key])].tolist() == first[label_key]
    np.testing.assert_array_equal(train_set.images[0], decode_cifar_row(first["data"][0]))
    # The transform maps pixel p to p / 127.5 - 1 at the original size (test: plain resize).
    image, label = test_set[len(test_set) - 1]
    want = decode_cifar_row(last_test["data"][-1]).astype(np.float32) / 127.5 - 1.0
    assert label == last_test[label_key][-1]
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), want, atol=1e-6)


def test_cifar_minival_is_the_last_2_percent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """250 training images: the first 245 train, the last 5 are minival (test preprocessing)."""
    with serve_cifar("cifar10", monkeypatch, tmp_path, per_file=50) as files:
        train_loader, minival_loader, test_loader = get_loader(**loader_args("cifar10", tmp_path))
    batches = [pickle.loads(files[name]) for name in CIFAR_LAYOUT["cifar10"][2]]
    rows = np.concatenate([b["data"] for b in batches])
    labels = [label for b in batches for label in b["labels"]]
    images = np.stack([decode_cifar_row(row) for row in rows])
    train_set, minival = train_loader.dataset, minival_loader.dataset
    assert (len(train_set), len(minival), len(test_loader.dataset)) == (245, 5, 50)
    np.testing.assert_array_equal(train_set.images, images[:245])
    assert train_set.targets.tolist() == labels[:245]
    held_out = [minival[i] for i in range(len(minival))]
    np.testing.assert_array_equal(np.stack([to_uint8(x) for x, _ in held_out]), images[245:])
    assert [label for _, label in held_out] == labels[245:]
    # Disjoint, and together the whole training split.
    train_keys = {image.tobytes() for image in train_set.images}
    minival_keys = {to_uint8(x).tobytes() for x, _ in held_out}
    assert not train_keys & minival_keys
    assert train_keys | minival_keys == {image.tobytes() for image in images}
    assert sum(len(prepare_batch(b, "cpu")[1]) for b in minival_loader) == 5


def test_holdout_split() -> None:
    train, minival = holdout_split(50_000, 0.02)  # CIFAR-10 and CIFAR-100: train[:98%]
    assert (len(train), minival) == (49_000, list(range(49_000, 50_000)))
    assert [len(part) for part in holdout_split(1437, 0.02)] == [1408, 29]  # digits
    assert holdout_split(10, 0.0) == (list(range(10)), [])
    # Per class (an image folder is sorted by class): the last 20% of each class.
    targets = [0] * 10 + [1] * 10 + [2] * 5
    train, minival = holdout_split(len(targets), 0.2, targets)
    assert minival == [8, 9, 18, 19, 24]
    assert sorted(train + minival) == list(range(len(targets)))


@pytest.mark.parametrize("fraction", [1.0, -0.1])
def test_holdout_fraction_out_of_range(fraction: float) -> None:
    with pytest.raises(UserError, match="--holdout_fraction"):
        get_loader(**loader_args("digits", holdout_fraction=fraction))


def test_missing_minival_warns(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    make_image_folder(tmp_path, n=4)
    _, minival_loader, _ = get_loader(**loader_args("imagefolder", tmp_path))
    assert minival_loader is None
    assert "no minival" in caplog.text


def test_cifar_missing_without_download(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cifar10 is not in"):
        build_test_set("cifar10", str(tmp_path), 32, download=False)


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
    left_bright = [
        transform(half_white(), np.random.default_rng(i))[0, :, :8].mean().item() > 0
        for i in range(40)
    ]
    if flip:
        assert 5 < sum(left_bright) < 35
    else:
        assert all(left_bright)


def test_train_crop_covers_5_to_100_percent() -> None:
    """The inception crop's source area: seen through how much of a small white square survives."""
    pixels = np.zeros((100, 100, 3), dtype=np.uint8)
    pixels[45:55, 45:55] = 255  # 1% of the area, in the centre
    transform = build_transforms(100, train=True, flip=False)
    white = [
        (transform(Image.fromarray(pixels), np.random.default_rng(i))[0] > 0).float().mean().item()
        for i in range(200)
    ]
    # A crop of area a shows the square at 1%/a of the output: at most 20x (a = 5%).
    assert max(white) <= 0.01 / 0.05 * 1.3
    assert max(white) > 0.05  # small crops do happen
    assert min(white) < 0.02  # near-full crops too (or crops missing the square)


# --------------------------------------------------------------------------------------------
# Digits, seeded augmentation, the two training paths, shards


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


def test_seeded_augment_depends_on_seed_epoch_index_only() -> None:
    base = DigitsDataset(train=True)
    aug = SeededAugment(base, build_transforms(32, train=True), seed=1)
    first = aug[3][0]
    torch.rand(100)  # the global RNGs do not matter ...
    np.random.rand(100)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    assert torch.equal(aug[3][0], first)
    assert torch.equal(torch.get_rng_state(), torch_state)  # ... and items draw nothing from them
    np.testing.assert_array_equal(np.random.get_state()[1], numpy_state)
    aug.set_epoch(1)
    assert not torch.equal(aug[3][0], first)
    assert not torch.equal(SeededAugment(base, aug.transform, seed=2)[3][0], first)


def test_digits_train_loader_matches_the_per_image_path() -> None:
    """The loader's uint8 batches, finished on the device by `prepare_batch`, equal the per-image
    transform of the same images with the same seeds (digits: no flip, crops of 30%-100%)."""
    args = loader_args("digits", img_size=16, micro_batch_size=32, seed=5)
    train_loader, minival_loader, test_loader = get_loader(**args)
    assert (len(train_loader.dataset), len(minival_loader.dataset)) == (1408, 29)
    assert len(test_loader.dataset) == 360
    assert train_loader.dataset.classes == [str(d) for d in range(10)]
    set_epoch(train_loader, 1)
    batch = next(iter(train_loader))
    assert isinstance(batch, CropBatch)
    assert batch.images.dtype == torch.uint8
    images, labels = prepare_batch(batch, torch.device("cpu"))
    assert images.shape == (32, 3, 16, 16)
    per_image = SeededAugment(
        DigitsDataset(train=True),
        build_transforms(16, train=True, flip=False, crop_scale=(0.3, 1.0)),
        seed=5,
    )
    per_image.set_epoch(1)
    indices = list(train_loader.sampler)[:32]
    assert max(indices) < 1408  # never a minival image
    for image, label, index in zip(images, labels, indices, strict=True):
        want, want_label = per_image[index]
        torch.testing.assert_close(image, want, atol=1e-5, rtol=0)
        assert label.item() == want_label
    assert (batch.boxes[:, 2] * batch.boxes[:, 3] < 64).any()  # real crops, not all whole
    assert not batch.flips.any()


def test_train_batches_do_not_depend_on_the_number_of_workers() -> None:
    def epoch(workers: int, number: int) -> list[CropBatch]:
        loader = get_loader(**loader_args("digits", num_workers=workers, micro_batch_size=64))[0]
        set_epoch(loader, number)
        return list(loader)

    def same(a: list[CropBatch], b: list[CropBatch]) -> bool:
        fields = ("images", "labels", "boxes", "flips")
        return all(
            torch.equal(getattr(x, f), getattr(y, f))
            for x, y in zip(a, b, strict=True)
            for f in fields
        )

    alone = epoch(0, 2)
    assert len(alone) == 1408 // 64
    assert same(alone, epoch(2, 2))
    assert not same(alone, epoch(0, 3))


@pytest.mark.parametrize("workers", [0, 2])
def test_image_folder_batches_equal_the_per_image_path(tmp_path: Path, workers: int) -> None:
    """Photos of many sizes (some over twice the model's side): training batches, their crops
    cut in the workers and finished on the device, equal the per-image path (`SeededAugment`,
    what `dataset[index]` computes) for the same seeds, epoch after epoch; so do the minival
    and test batches (the test preprocessing)."""
    make_photo_folder(tmp_path, n=8)
    args = {"micro_batch_size": 5, "num_workers": workers, "holdout_fraction": 0.25}
    train_loader, minival_loader, test_loader = get_loader(
        **loader_args("imagefolder", tmp_path, **args)
    )
    train_set = train_loader.dataset
    assert isinstance(train_set, DeviceAugment)
    for epoch in (0, 1):
        train_loader.sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        indices = list(train_loader.sampler)
        for i, batch in enumerate(train_loader):
            assert isinstance(batch, ResizeBatch)
            assert batch.pixels.dtype == torch.uint8
            images, labels = prepare_batch(batch, torch.device("cpu"))
            for image, label, index in zip(images, labels, indices[5 * i :], strict=False):
                want, want_label = train_set[index]
                torch.testing.assert_close(image, want, atol=1e-5, rtol=0)
                assert label.item() == want_label
        assert i == 12 // 5 - 1
    for loader in (minival_loader, test_loader):
        batches = [prepare_batch(batch, "cpu") for batch in loader]
        images, labels = (torch.cat(parts) for parts in zip(*batches, strict=True))
        assert len(images) == len(loader.dataset) == (4 if loader is minival_loader else 6)
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            want, want_label = loader.dataset[index]
            torch.testing.assert_close(image, want, atol=1e-5, rtol=0)
            assert label.item() == want_label


@pytest.mark.parametrize("dataset", ["digits", "imagefolder"])
def test_workers_persist_across_epochs_and_follow_set_epoch(tmp_path: Path, dataset: str) -> None:
    """Two workers, three epochs: the same two processes, and each epoch's batches are what
    one process draws for that epoch."""
    make_photo_folder(tmp_path, n=8)

    def loader(workers: int):
        args = loader_args(dataset, tmp_path, num_workers=workers, micro_batch_size=4)
        return get_loader(**args)[0]

    alone, workers = loader(0), loader(2)
    pids = set()
    for epoch in (0, 1, 2):
        for each in (alone, workers):
            set_epoch(each, epoch)
        assert_same_batches(workers, alone)
        pids.add(tuple(w.pid for w in workers._iterator._workers))
    assert len(pids) == 1


def test_minival_and_test_loaders_are_sharded() -> None:
    """Every minival and test image on exactly one of 2 ranks, with the test preprocessing."""
    seen: dict[str, list[int]] = {"minival": [], "test": []}
    for rank in range(2):
        args = loader_args("digits", rank=rank, local_rank=rank, world_size=2)
        _, minival_loader, test_loader = get_loader(**args)
        for name, loader in (("minival", minival_loader), ("test", test_loader)):
            assert isinstance(loader.sampler, ShardSampler)
            seen[name] += list(loader.sampler)
            images, _ = prepare_batch(next(iter(loader)), torch.device("cpu"))
            assert images.shape[1:] == (3, 32, 32)
    assert sorted(seen["minival"]) == list(range(29))
    assert sorted(seen["test"]) == list(range(360))
    # The held-out digits are the last of the training split, preprocessed for testing.
    digits = DigitsDataset(train=True)
    image, label = minival_loader.dataset[28]
    want = build_transforms(32, train=False)(digits[1436][0])
    torch.testing.assert_close(image, want, atol=0, rtol=0)
    assert label == digits.targets[1436]


def test_build_eval_loader() -> None:
    test_set, _ = build_test_set("digits", "unused", 16)
    shards = [build_eval_loader(test_set, 50, 0, rank, 3) for rank in range(3)]
    labels = [prepare_batch(b, "cpu")[1] for loader in shards for b in loader]
    assert sum(len(y) for y in labels) == 360
    assert sorted(i for loader in shards for i in loader.sampler) == list(range(360))


def test_in_memory_items_are_seeded_like_the_per_image_path() -> None:
    """One `InMemoryAugment` item draws the box and flip `SeededAugment` draws for that index."""
    pixels = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    data = InMemoryAugment(pixels, list(range(6)), ["a"] * 6, (48, 48), seed=9)
    arrays = [(image, i) for i, image in enumerate(pixels)]
    per_image = SeededAugment(arrays, build_transforms(48, train=True), seed=9)
    for index in range(6):
        images, _ = prepare_batch(data[index], torch.device("cpu"))
        torch.testing.assert_close(images[0], per_image[index][0], atol=1e-5, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_batches_prepared_on_cuda() -> None:
    """With a GPU the loader pins every tensor of a `CropBatch`; the result is the CPU one."""
    loader = get_loader(**loader_args("digits", num_workers=1, micro_batch_size=16))[0]
    assert loader.pin_memory
    batch = next(iter(loader))
    assert all(getattr(batch, name).is_pinned() for name in ("images", "labels", "boxes", "flips"))
    images, labels = prepare_batch(batch, torch.device("cuda"))
    want, want_labels = prepare_batch(batch, torch.device("cpu"))
    torch.testing.assert_close(images.cpu(), want, atol=1e-5, rtol=0)
    assert torch.equal(labels.cpu(), want_labels)


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
    args = loader_args("imagefolder", tmp_path, holdout_fraction=0.0, micro_batch_size=4)
    train_loader, _, test_loader = get_loader(**args)
    train, test = train_loader.dataset, test_loader.dataset
    assert train.classes == ["cat", "dog", "eel"]
    assert (len(train), len(test)) == (12, 6)
    image, label = test[len(test) - 1]
    assert label == 2
    assert image.shape == (3, 32, 32)
    assert image[0].mean().item() == pytest.approx(400 / 255 - 1, abs=0.01)  # red 200 of class 2
    # Per-image training batches are ready-made (images, labels).
    images, labels = prepare_batch(next(iter(train_loader)), torch.device("cpu"))
    assert images.shape == (4, 3, 32, 32)
    assert labels.dtype == torch.int64


def test_imagefolder_minival_is_the_end_of_each_class(tmp_path: Path) -> None:
    make_image_folder(tmp_path, classes=("cat", "dog", "eel"), n=10)
    args = loader_args("imagefolder", tmp_path, holdout_fraction=0.2)
    train_loader, minival_loader, _ = get_loader(**args)
    assert (len(train_loader.dataset), len(minival_loader.dataset)) == (24, 6)
    held_out = [minival_loader.dataset[i] for i in range(6)]
    assert [label for _, label in held_out] == [0, 0, 1, 1, 2, 2]
    # Files 8.png and 9.png of each class: green 130 and 140, a flat colour kept by resizing.
    greens = [round(image[1].mean().item() * 127.5 + 127.5) for image, _ in held_out]
    assert greens == [130, 140] * 3


def test_imagefolder_wrong_layout(tmp_path: Path) -> None:
    (tmp_path / "cats").mkdir()
    with pytest.raises(UserError, match=r"train/(.|\n)*val/"):
        get_loader(**loader_args("imagefolder", tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        get_loader(**loader_args("imagefolder", os.fspath(tmp_path / "missing")))


def test_imagefolder_class_mismatch(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    (tmp_path / "val" / "dog").rename(tmp_path / "val" / "doge")
    with pytest.raises(UserError, match="differ"):
        get_loader(**loader_args("imagefolder", tmp_path))


def test_registry_entries_reach_the_loaders() -> None:
    """Every entry is keyed by its name and has a reader; what digits' entry says (no flip, a
    larger crop, 10 classes, held in memory) is what its training set does."""
    for name, spec in DATASETS.items():
        assert spec.name == name
        assert spec.reader in READERS
    spec = DATASETS["digits"]
    train_set = get_loader(**loader_args("digits"))[0].dataset
    assert isinstance(train_set, InMemoryAugment) == spec.in_memory
    assert (spec.flip, spec.crop_area) == (False, (0.3, 1.0))
    assert (train_set.flip, train_set.crop_scale) == (spec.flip, spec.crop_area)
    assert len(train_set.classes) == spec.num_classes


def test_unknown_dataset() -> None:
    assert set(DATASETS) == {"cifar10", "cifar100", "imagefolder", "digits", "hf"}
    with pytest.raises(UserError, match="Unknown dataset"):
        build_test_set("mnist", ".", 32)


class _Stuck(torch.utils.data.Dataset):
    """Item 0 never arrives (a worker stuck on a hung file system); the others raise."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        if index == 0:
            time.sleep(3600)
        raise ValueError(f"item {index} is broken")


@pytest.mark.slow  # ~11 s: torch waits 5 s for the stuck worker, twice, before leaving it
def test_a_stuck_or_failing_worker_is_one_loader_error_not_a_wait() -> None:
    start = time.monotonic()
    with pytest.raises(LoaderError, match=r"No batch came from the data-loading workers in 1 s"):
        next(iter(WatchedLoader(_Stuck(), num_workers=1, timeout=1)))
    assert time.monotonic() - start < 30
    failing = WatchedLoader(Subset(_Stuck(), [1, 2]), num_workers=1)
    with pytest.raises(LoaderError) as info:
        next(iter(failing))
    message = str(info.value)
    assert message.startswith("A data-loading worker failed: ValueError: item 1 is broken.")
    assert "Traceback" not in message
    assert "--num_workers 0" in message
