"""Datasets and loaders for fine-tuning: CIFAR-10/100, your own image folders, Hugging Face
`datasets` tables, scikit-learn digits.

Preprocessing is the official one (`vit_jax/input_pipeline.py`; see `utils.data.preprocessing`):
training images get a crop sampled as `tf.image.sample_distorted_bounding_box` does (5%-100% of
the area) and a horizontal flip; test images are resized; everything is float32, scaled to
[-1, 1] by `(x - 127.5) / 127.5`.

Each dataset's torch-free facts are its `DatasetSpec` (`utils.data.registry.DATASETS`, with the
splits); `READERS` here reads its splits. `get_loader` is the entry point.

Loader workers only read pixels and draw the random choices; the float arithmetic (the
resize, the flip, the scaling) runs on the training device in whole batches (`prepare_batch`),
to the tensors the per-image path (`SeededAugment`, `WithTransform` with `Preprocess`) gives:

- training on datasets held in memory as uint8 arrays (CIFAR, digits): workers gather uint8
  batches and sample each image's crop box and flip (`InMemoryAugment`, `CropBatch`);
- training on image folders and Hugging Face tables: workers decode each image, sample its box
  and flip and cut the box out (`DeviceAugment`, `ResizeBatch`);
- evaluation (every dataset): workers decode, the device resizes (`DeviceResize`).

Training augmentation is seeded per image from (seed, epoch, index), so a run is the same for
any number of loader workers or processes: `torchrun --nproc_per_node 2` with the same total
batch sees exactly the images and crops that one process does. Workers persist across epochs
and passes; the epoch reaches them through shared memory (`set_epoch`).

An image of an image folder or a table that cannot be read (truncated, not an image, a
decompression bomb) is named in a warning once and skipped, never fatal: in training the next
readable image of the split takes its place (batches keep their size, and a resumed run makes
the same choice); in evaluation it is left out of the count. `strict_images` checks every image
at start-up instead and refuses to start, listing the bad ones.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, default_collate
from torchvision import datasets
from torchvision.datasets.utils import check_integrity

from models.configs import to_pair
from utils.data.hf import read_hf
from utils.data.preprocessing import (
    CROP_AREA,
    BadImageError,
    Preprocess,
    UnreadableImages,
    Walk,
    crop_resize_batch,
    pack_crops,
    read_image,
    resize_batch,
    sample_augment,
    walk_files,
)
from utils.data.registry import (
    DATASETS,
    DIGITS_SPLIT_SEED,
    DIGITS_TEST_SIZE,
    HOLDOUT_FRACTION,
    Columns,
    DatasetSpec,
    holdout_split,
)
from utils.infra.dist_utils import main_process_first
from utils.infra.download import fetch_archive, mirror_url
from utils.infra.errors import UserError
from utils.infra.watchdog import WatchedLoader

__all__ = [
    "READERS",
    "CropBatch",
    "DeviceAugment",
    "DeviceResize",
    "DigitsDataset",
    "ImageFolderFiles",
    "InMemoryAugment",
    "Indexed",
    "ResizeBatch",
    "SeededAugment",
    "ShardSampler",
    "WithTransform",
    "augment_rng",
    "build_eval_loader",
    "build_split",
    "build_test_set",
    "build_transforms",
    "check_images",
    "check_same_classes",
    "get_loader",
    "prepare_batch",
    "resize_eval_batches",
    "skip_unreadable",
    "unreadable_images",
]

logger = logging.getLogger(__name__)


def get_loader(
    dataset: str,
    data_dir: str,
    img_size: int | tuple[int, int],
    seed: int,
    micro_batch_size: int,
    eval_batch_size: int,
    num_workers: int,
    holdout_fraction: float = HOLDOUT_FRACTION,
    strict_images: bool = False,
    rank: int = 0,
    local_rank: int | None = None,
    world_size: int = 1,
    columns: Columns | None = None,
) -> tuple[DataLoader, DataLoader | None, DataLoader]:
    """Training, minival and test loaders for this process (the original port's entry point).

    Args:
        dataset, data_dir: what to load, and where (CIFAR is downloaded there when missing).
        img_size: the model's input size.
        seed: seeds the shuffling and the augmentation.
        micro_batch_size: images per process and forward pass (the training loader's batch).
        eval_batch_size: images per process and batch of the minival and test loaders.
        num_workers: loader worker processes, per loader.
        holdout_fraction: the last fraction of the training split held out as minival (0: none).
        strict_images: check every image of an image folder or a table first (on the first
            process of each node) and refuse unreadable ones; otherwise they are skipped with
            a warning.
        rank, local_rank, world_size: this process among all (`local_rank` defaults to `rank`);
            the first process of each node downloads missing data, the others wait.
        columns: the image and label columns of a table (`--dataset hf`); default `Columns()`.

    The training loader shuffles with a `DistributedSampler` (call `set_epoch` on both the
    sampler and the dataset each epoch, before iterating) and drops the last incomplete batch.
    Its batches are `CropBatch`es for datasets held in memory (CIFAR, digits), `ResizeBatch`es
    for the others; the minival and test loaders (`build_eval_loader`) yield `ResizeBatch`es
    with the test preprocessing. `prepare_batch` finishes any of them on the device.

    Every loader gets a private `torch.Generator`: otherwise each `iter(loader)` draws its
    worker seed from the global torch RNG, and a resumed run (which starts iterating at another
    point) would see other dropout masks than an uninterrupted one.

    Returns:
        (train_loader, minival_loader, test_loader); minival_loader is None when nothing is
        held out.

    Raises:
        UserError: bad data (see `build_test_set`), a holdout fraction outside [0, 1), a
            training set smaller than one batch, or unreadable images with `strict_images`.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise UserError(
            f"--holdout_fraction {holdout_fraction} must be in [0, 1): the fraction of the "
            f"training split held out as minival ({HOLDOUT_FRACTION} officially, 0 for none)."
        )
    spec = _spec(dataset)
    # One download per node (the first process of each), as the original port did.
    local_rank = max(rank if local_rank is None else local_rank, 0)
    with main_process_first(local_rank):
        download = local_rank == 0
        train_raw, test_raw, classes = _raw_datasets(spec, data_dir, download, columns)
        if strict_images and not spec.in_memory and download:
            for split in (train_raw, test_raw):
                check_images(split)
    size = to_pair(img_size)
    test_transform = build_transforms(size, train=False)

    # Sorted by class (an image folder): hold out the end of each class, not the last class.
    by_class = train_raw.targets if spec.holdout_by_class else None
    train_idx, minival_idx = holdout_split(len(train_raw), holdout_fraction, by_class)
    if spec.in_memory:
        cut = len(train_idx)  # a prefix: the arrays are sliced, not copied
        train_set = InMemoryAugment(
            train_raw.data[:cut],
            train_raw.targets[:cut],
            classes,
            size,
            seed,
            **_augment_options(spec),
        )
    else:
        train_set = DeviceAugment(
            Subset(train_raw, train_idx),
            build_transforms(size, train=True, **_augment_options(spec)),
            seed,
            classes,
        )
    if len(train_set) < micro_batch_size * world_size:
        raise UserError(
            f"The training set has {len(train_set)} images, fewer than one batch of "
            f"{micro_batch_size * world_size} per forward pass; lower --train_batch_size or raise "
            "--gradient_accumulation_steps."
        )
    train_sampler = DistributedSampler(
        train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed
    )
    # Persistent workers: `train_set.set_epoch` reaches them through shared memory.
    train_loader = _watched(
        train_set,
        batch_size=micro_batch_size,
        sampler=train_sampler,
        num_workers=num_workers,
        collate_fn=_as_is,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        generator=torch.Generator(),
    )

    def eval_loader(split: Dataset) -> DataLoader:
        return build_eval_loader(split, eval_batch_size, num_workers, rank, world_size)

    minival_loader = None
    if minival_idx:
        minival = DeviceResize(Subset(train_raw, minival_idx), test_transform, classes)
        minival_loader = eval_loader(minival)
    elif holdout_fraction > 0:
        logger.warning(
            "--holdout_fraction %g of %d training images holds none out: no minival.",
            holdout_fraction,
            len(train_raw),
        )
    test_set = DeviceResize(test_raw, test_transform, classes)
    return train_loader, minival_loader, eval_loader(test_set)


def build_eval_loader(
    dataset: Dataset, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """An evaluation loader: this rank's shard of `dataset`, every image on exactly one rank.

    Workers persist across passes (evaluation runs many times in training) and ignore Ctrl+C
    (`init_worker`); their failures are one `LoaderError` (`WatchedLoader`). Unreadable images
    are left out of their batch (a batch of none is None). A `DeviceResize` yields
    `ResizeBatch`es (finished by `prepare_batch`), any other dataset its collated items
    (`skip_unreadable`). The private generator keeps `iter(loader)` from drawing on the global
    torch RNG.
    """
    return _watched(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world_size),
        num_workers=num_workers,
        collate_fn=_as_is if isinstance(dataset, DeviceResize) else skip_unreadable,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        generator=torch.Generator(),
    )


def resize_eval_batches(loader: DataLoader, batch_size: int) -> None:
    """Make an evaluation loader's next passes yield batches of `batch_size` images.

    Its workers, forked already or not, are left as they are: they load the indices the main
    process's batch sampler hands them, and every pass (persistent workers too) samples them
    anew, dropping what was prefetched. Call it between passes: torch refuses to set a built
    DataLoader's `batch_size` because a pass under way would go on with the old size.
    """
    loader.batch_sampler.batch_size = batch_size
    object.__setattr__(loader, "batch_size", batch_size)  # what it reports, kept true


def build_test_set(
    dataset: str,
    data_dir: str,
    img_size: int | tuple[int, int],
    download: bool = True,
    columns: Columns | None = None,
) -> tuple[Dataset, list[str]]:
    """The test split alone, with the test preprocessing (for evaluation), as a `DeviceResize`.

    Reads nothing of the training split: an image folder needs only `val/` (or `test/`), such
    as an ImageNet validation set; a table only its test split.

    Args:
        dataset: a key of `utils.data.registry.DATASETS`.
        data_dir: where CIFAR lives (downloaded there when missing and `download`), or the
            root of an image folder or of a table (`--dataset hf`). Unused for `digits`.
        columns: the image and label columns of a table; default `Columns()`.

    Returns:
        (test_set, class_names). Items are (tensor (3, H, W) in [-1, 1], label); the batches
        of its loader (`build_eval_loader`) are resized on the device.

    Raises:
        UserError: unknown dataset, missing data or wrong folder layout.
    """
    split = _read_split(_spec(dataset), data_dir, False, download, columns)
    classes = list(split.classes)
    return DeviceResize(split, build_transforms(img_size, train=False), classes), classes


def build_split(
    dataset: str,
    data_dir: str,
    train: bool,
    download: bool = True,
    columns: Columns | None = None,
) -> tuple[Dataset, list[str]]:
    """One whole split (nothing held out) without a transform: items are (PIL image, label).

    Wrap it in `WithTransform` for a preprocessing of your own, e.g. the test one on the
    training split (few-shot evaluation embeds both splits that way). Arguments and errors as
    `build_test_set`; `train` picks the split (an image folder's `train/`).
    """
    split = _read_split(_spec(dataset), data_dir, train, download, columns)
    return split, list(split.classes)


def check_same_classes(dataset: str, train: Sequence[str], test: Sequence[str]) -> None:
    """Refuse a training and a test split of `dataset` with other classes.

    Raises:
        UserError: the dataset's `classes_differ` message.
    """
    if list(train) != list(test):
        message = _spec(dataset).classes_differ
        raise UserError(message.format(train=", ".join(train), test=", ".join(test)))


# --------------------------------------------------------------------------------------------
# Splits


def _spec(dataset: str) -> DatasetSpec:
    if dataset not in DATASETS:
        raise UserError(f"Unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}.")
    return DATASETS[dataset]


def _raw_datasets(
    spec: DatasetSpec, data_dir: str, download: bool, columns: Columns | None
) -> tuple[Dataset, Dataset, list[str]]:
    """Both splits (no transform yet), checked to have the same classes."""
    train_set = _read_split(spec, data_dir, True, download, columns)
    test_set = _read_split(spec, data_dir, False, download, columns)
    check_same_classes(spec.name, train_set.classes, test_set.classes)
    return train_set, test_set, list(train_set.classes)


def _read_split(
    spec: DatasetSpec, data_dir: str, train: bool, download: bool, columns: Columns | None
) -> Dataset:
    """One split that returns PIL images (no transform yet); it has a `classes` list."""
    return READERS[spec.reader](spec, data_dir, train, download, columns or Columns())


CIFAR_URL = "VIT_CIFAR_URL"  # the variable naming a mirror of the CIFAR archives
MAX_CIFAR = 1 << 30  # bytes; each archive is about 163 MiB


def _cifar(
    cls: type[datasets.CIFAR10],
    spec: DatasetSpec,
    data_dir: str,
    train: bool,
    download: bool,
    columns: Columns,
) -> Dataset:
    """One CIFAR split (`cls`: torchvision's CIFAR10 or CIFAR100); the archive is downloaded
    (`utils.infra.download.fetch_archive`) if missing."""
    dataset = spec.name
    try:
        return cls(data_dir, train=train, download=False)
    except RuntimeError:
        pass  # missing or damaged: which one is said below
    folder = os.path.join(data_dir, cls.base_folder)
    if os.path.isdir(folder):
        published = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
        bad = [n for n, md5 in published if not check_integrity(os.path.join(folder, n), md5)]
        raise UserError(
            f"{folder} is damaged: {', '.join(bad)} missing or not the published file(s) (MD5). "
            f"Delete the folder {folder} (and {cls.filename} next to it, if damaged) to download "
            f"{dataset} again."
        )
    if not download:
        raise UserError(
            f"{dataset} is not in {data_dir}. Let train.py download it (it does unless another "
            f"process does), or place the extracted `{cls.base_folder}` folder from {cls.url} "
            "inside --data_dir."
        )
    # torchvision's own address unless the variable names a mirror with the same file names.
    base = mirror_url(None, CIFAR_URL, cls.url.rsplit("/", 1)[0])
    fetch_archive(
        f"{base}/{cls.filename}",
        os.path.join(data_dir, cls.filename),
        cls.tgz_md5,
        cls.base_folder,
        mirror=f"the {CIFAR_URL} variable at a mirror that holds {cls.filename}",
        limit=MAX_CIFAR,
    )
    return cls(data_dir, train=train, download=False)


def _imagefolder(
    spec: DatasetSpec, data_dir: str, train: bool, download: bool, columns: Columns
) -> Dataset:
    names = ("train",) if train else ("val", "test")
    root = next(
        (os.path.join(data_dir, n) for n in names if os.path.isdir(os.path.join(data_dir, n))),
        None,
    )
    if root is None:
        found = (
            f"{data_dir} holds {sorted(os.listdir(data_dir))}"
            if os.path.isdir(data_dir)
            else f"{data_dir} does not exist"
        )
        wanted = "train/ and val/ (or test/) folders" if train else "a val/ (or test/) folder"
        raise UserError(
            f"--dataset {spec.name} needs --data_dir with {wanted}, one sub-folder per class; "
            f"{found}. Expected layout:\n{spec.layout}"
        )
    try:
        return ImageFolderFiles(root)
    except (FileNotFoundError, OSError) as err:
        raise UserError(
            f"{root} does not hold images in the layout --dataset {spec.name} needs ({err}). "
            f"Expected layout:\n{spec.layout}"
        ) from None


def _digits(
    spec: DatasetSpec, data_dir: str, train: bool, download: bool, columns: Columns
) -> Dataset:
    return DigitsDataset(train=train)


# `DatasetSpec.reader` -> the function that reads one split of it:
# (spec, data_dir, train, download, columns) -> a dataset of untransformed (PIL image, label)
# with `classes` and `targets`, and a `transform` attribute the caller may set.
READERS: dict[str, Callable[..., Dataset]] = {
    "cifar10": partial(_cifar, datasets.CIFAR10),
    "cifar100": partial(_cifar, datasets.CIFAR100),
    "imagefolder": _imagefolder,
    "digits": _digits,
    "hf": read_hf,
}


class ImageFolderFiles(UnreadableImages, datasets.ImageFolder):
    """torchvision's `ImageFolder`, walked by `walk_files` and read with `read_image`; an
    unreadable file gives None.

    Class folders and their images follow `walk_files`' rules: hidden entries
    (`.ipynb_checkpoints`) and links to folders are left out, with one warning that counts them.
    An unreadable file is recorded and named in a warning once (`UnreadableImages`). Training
    (`SeededAugment`) replaces such an item, evaluation leaves it out (`DeviceResize`).
    """

    def __init__(self, root: str):
        self.walk = Walk()
        super().__init__(root, loader=read_image)
        self.walk.report(root)
        self.watch_images(len(self.samples))

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        walk = walk_files(directory, (), recursive=False)
        self.walk.hidden += walk.hidden
        self.walk.linked_folders += walk.linked_folders
        classes = [folder.name for folder in walk.folders]
        if not classes:
            raise FileNotFoundError(f"no class folder in {directory}")
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(
        self, directory: str, class_to_idx: dict[str, int], **unused
    ) -> list[tuple[str, int]]:
        samples = []
        for name, target in class_to_idx.items():
            walk = walk_files(os.path.join(directory, name), datasets.folder.IMG_EXTENSIONS)
            if not walk.files:
                raise FileNotFoundError(f"no image in class folder {name}")
            samples += [(str(path), target) for path in walk.files]
            for kind in ("hidden", "linked_folders", "broken_links"):
                getattr(self.walk, kind).extend(getattr(walk, kind))
        return samples

    def image_source(self, index: int) -> str:
        return self.samples[index][0]

    def image_name(self, index: int) -> str:
        return self.samples[index][0]

    def content(self, data_dir: str) -> list:
        """What identifies the split's images and labels: each file's path from `data_dir`,
        class, size and modification time."""
        files = []
        for path, target in self.samples:
            stat = os.stat(path)
            files.append([os.path.relpath(path, data_dir), target, stat.st_size, stat.st_mtime_ns])
        return files


class DigitsDataset(Dataset):
    """The 8x8 handwritten digits bundled with scikit-learn (1,797 images, 10 classes).

    Real data that needs no download. The split is fixed: a stratified 360-image test set drawn
    with seed 0, the other 1,437 images for training. Images are grey, returned as RGB PIL
    images (upscaled by the transform).
    """

    classes: Sequence[str] = tuple(str(d) for d in range(10))

    def __init__(self, train: bool, transform: Callable | None = None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
        indices = np.arange(len(images))
        train_idx, test_idx = train_test_split(
            indices,
            test_size=DIGITS_TEST_SIZE,
            stratify=digits.target,
            random_state=DIGITS_SPLIT_SEED,
        )
        keep = np.sort(train_idx if train else test_idx)
        self.data = images[keep]
        self.targets = [int(t) for t in digits.target[keep]]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Image.Image, int]:
        image = Image.fromarray(self.data[index]).convert("RGB")  # grey (8, 8) -> RGB
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def check_images(dataset: UnreadableImages, shown: int = 20) -> None:
    """Decode every image of an image folder or a table once (JPEGs at 1/8 scale), in this
    process.

    Raises:
        UserError: listing the images that cannot be read and why.
    """
    logger.info("Checking that the %d images in %s can be read.", len(dataset), dataset.root)
    bad = []
    for index in range(len(dataset)):
        try:
            dataset.decode(index, check_only=True)
        except BadImageError as err:
            bad.append(str(err))
    if bad:
        more = f"\n  ... and {len(bad) - shown} more" if len(bad) > shown else ""
        raise UserError(
            f"{len(bad)} of the {len(dataset)} images in {dataset.root} cannot be read:\n  "
            + "\n  ".join(bad[:shown])
            + f"{more}\nRemove or replace them, or leave out --strict_images to skip them with a "
            "warning."
        )


# --------------------------------------------------------------------------------------------
# Training preprocessing


def build_transforms(
    img_size: int | tuple[int, int],
    train: bool,
    flip: bool = True,
    crop_scale: tuple[float, float] = CROP_AREA,
) -> Preprocess:
    """The official preprocessing of one image: PIL image -> float tensor (3, H, W) in [-1, 1].

    `img_size` is an int (square) or (height, width). Call the result as `transform(image, rng)`;
    in training (a random crop of `crop_scale` of the area, a random flip if `flip`; otherwise a
    plain resize), `rng` (a numpy Generator, see `augment_rng`) draws the crop box and the flip.
    """
    return Preprocess(to_pair(img_size), train=train, flip=flip, area_range=crop_scale)


def _augment_options(spec: DatasetSpec) -> dict:
    """`flip` and `crop_scale` of the training preprocessing of a dataset."""
    return {"flip": spec.flip, "crop_scale": spec.crop_area or CROP_AREA}


def augment_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random source of one training image's augmentation in one epoch."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))


class _SharedEpoch:
    """The epoch of a training set's augmentation, in shared memory: loader workers persist
    across epochs and read what `set_epoch` writes in this process. Call it between epochs,
    before iterating, as the sampler's."""

    def __init__(self):
        self._epoch = multiprocessing.RawValue("q", 0)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch


class SeededAugment(_SharedEpoch, Dataset):
    """Wraps a dataset so each image's random transform is seeded by (seed, epoch, index).

    The transform is called as `transform(image, rng)` with `augment_rng(seed, epoch, index)`,
    so the augmentation of an image does not depend on which worker or process loads it, nor
    on what ran before. Call `set_epoch` with the sampler's epoch.

    Args:
        base: yields (image, label) without a transform.
        transform: e.g. `build_transforms(..., train=True)`.
        classes: default: `base.classes`.
    """

    def __init__(
        self, base: Dataset, transform: Callable, seed: int, classes: Sequence[str] | None = None
    ):
        super().__init__()
        self.base = base
        self.transform = transform
        self.seed = seed
        self.classes = list(classes if classes is not None else getattr(base, "classes", []))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, target = self.readable(index)
        return self.transform(image, augment_rng(self.seed, self.epoch, index)), target

    def readable(self, index: int) -> tuple[Image.Image, int]:
        """The untransformed item `index`; an unreadable image (None) is replaced by the next
        readable one, so that a batch keeps its size (its crop is still drawn for `index`,
        whoever loads it).

        Raises:
            UserError: no image of the split can be read.
        """
        item, other = self.base[index], index
        while item is None:
            other = (other + 1) % len(self.base)
            if other == index:
                raise UserError("No image of the training split can be read (see the warnings).")
            item = self.base[other]
        return item


class DeviceAugment(SeededAugment):
    """`SeededAugment` with the training `Preprocess`, whose loader yields `ResizeBatch`es.

    A loader over it gathers whole batches (`__getitems__`): each image is decoded, its crop
    box and flip are drawn from `augment_rng(seed, epoch, index)` (`Preprocess.crop`) and the
    box is cut out as uint8; `prepare_batch` resizes, mirrors and normalises the batch on the
    training device, to the tensors `SeededAugment` computes per image (as `dataset[index]`
    still does). Unreadable images are replaced as there.
    """

    def __getitems__(self, indices: Sequence[int]) -> ResizeBatch:
        crops, flips, targets = [], [], []
        for index in indices:
            image, target = self.readable(index)
            crop, flip = self.transform.crop(image, augment_rng(self.seed, self.epoch, index))
            crops.append(crop)
            flips.append(flip)
            targets.append(target)
        return ResizeBatch.pack(crops, flips, targets, self.transform.size)


class WithTransform(Dataset):
    """(transform(image), label) of a dataset that yields untransformed (image, label)."""

    def __init__(self, base: Dataset, transform: Callable, classes: Sequence[str]):
        self.base = base
        self.transform = transform
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        item = self.base[index]
        if item is None:  # unreadable: left out of its batch (`skip_unreadable`)
            return None
        image, target = item
        return self.transform(image), target


class DeviceResize(WithTransform):
    """`WithTransform` with the test `Preprocess`, whose loader yields `ResizeBatch`es.

    A loader over it gathers whole batches (`__getitems__`): workers decode the images, the
    device resizes and normalises them (`prepare_batch`), to the tensors `dataset[index]`
    computes per image. Unreadable images are left out of their batch; a batch of none is
    None.
    """

    def __getitems__(self, indices: Sequence[int]) -> ResizeBatch | None:
        items = [item for item in (self.base[i] for i in indices) if item is not None]
        if not items:
            return None
        crops = [self.transform.crop(image)[0] for image, _ in items]
        targets = [target for _, target in items]
        return ResizeBatch.pack(crops, [False] * len(crops), targets, self.transform.size)


class Indexed(WithTransform):
    """(transform(image), label, index), or None for an unreadable image: each image's position
    in `base` travels with it, e.g. through the shards of several processes."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int] | None:
        item = super().__getitem__(index)
        return None if item is None else (*item, index)


class _DeviceBatch:
    """A batch of uint8 pixels that `prepare_batch` finishes on the device: its tensors
    (`TENSORS`) move together."""

    TENSORS: ClassVar[tuple[str, ...]]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def pin_memory(self):
        """Called by a `DataLoader(pin_memory=True)`: every tensor, so that no copy to the GPU
        waits for the GPU (a copy from pageable memory synchronises the stream)."""
        return replace(self, **{name: getattr(self, name).pin_memory() for name in self.TENSORS})

    def to(self, device: torch.device):
        """The tensors on `device`, copied asynchronously (from pinned memory)."""
        moved = {name: getattr(self, name).to(device, non_blocking=True) for name in self.TENSORS}
        return replace(self, **moved)


@dataclass
class CropBatch(_DeviceBatch):
    """A training batch before preprocessing: uint8 pixels plus each image's random choices.

    Attributes:
        images: (B, H, W, 3) uint8, the uncropped images.
        labels: (B,) int64.
        boxes: (B, 4) int64 crop boxes (top, left, height, width).
        flips: (B,) bool, mirror these images.
        size: output (height, width).
    """

    TENSORS: ClassVar[tuple[str, ...]] = ("images", "labels", "boxes", "flips")

    images: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor
    size: tuple[int, int]


@dataclass
class ResizeBatch(_DeviceBatch):
    """Decoded images before preprocessing: each image's uint8 crop (in evaluation the whole
    image) and where the bilinear resize reads it (`utils.data.preprocessing.pack_crops`).

    Attributes:
        pixels: (N, W, 3) uint8, the rows of every crop, one crop after the other, zeros right
            of the narrower ones; a crop side over twice the output side keeps only the lines
            the resize reads.
        labels: (B,) int64.
        rows: (B, 2, out_h) int64, the two rows of `pixels` each output row reads.
        row_weights: (B, out_h) float32, the second row's weight.
        cols, col_weights: the same for columns (a mirrored image's in reverse order).
    """

    TENSORS: ClassVar[tuple[str, ...]] = (
        "pixels",
        "labels",
        "rows",
        "row_weights",
        "cols",
        "col_weights",
    )

    pixels: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor
    row_weights: torch.Tensor
    cols: torch.Tensor
    col_weights: torch.Tensor

    @classmethod
    def pack(
        cls,
        crops: Sequence[np.ndarray],
        flips: Sequence[bool],
        targets: Sequence[int],
        size: tuple[int, int],
    ) -> ResizeBatch:
        pixels, rows, row_weights, cols, col_weights = pack_crops(crops, flips, size)
        labels = torch.tensor(targets, dtype=torch.int64)
        return cls(pixels, labels, rows, row_weights, cols, col_weights)


class InMemoryAugment(_SharedEpoch, Dataset):
    """Training images held as a uint8 array: items are `CropBatch`es, preprocessed on the device.

    A loader over it gathers whole batches (`__getitems__`) and samples each image's crop box
    and flip from `augment_rng(seed, epoch, index)`, drawing exactly what `SeededAugment` with
    `build_transforms(size, train=True, ...)` draws for that image; `prepare_batch` then
    produces the same tensors the per-image path would.

    Args:
        images: (N, H, W, 3) or grey (N, H, W) uint8.
        size: output (height, width).
        flip: mirror half of the images.
        crop_scale: area fraction range of the crop.
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: Sequence[int],
        classes: Sequence[str],
        size: tuple[int, int],
        seed: int,
        flip: bool = True,
        crop_scale: tuple[float, float] = CROP_AREA,
    ):
        super().__init__()
        if images.ndim == 3:  # grey: the model reads RGB
            images = np.repeat(images[..., None], 3, axis=-1)
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = list(classes)
        self.size = tuple(size)
        self.seed = seed
        self.flip = flip
        self.crop_scale = tuple(crop_scale)

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: Sequence[int]) -> CropBatch:
        height, width = self.images.shape[1:3]
        choices = [
            sample_augment(
                height, width, augment_rng(self.seed, self.epoch, i), self.crop_scale, self.flip
            )
            for i in indices
        ]
        return CropBatch(
            images=torch.from_numpy(self.images[indices]),  # fancy indexing copies
            labels=torch.from_numpy(self.targets[indices]),
            boxes=torch.tensor([box for box, _ in choices], dtype=torch.int64),
            flips=torch.tensor([flip for _, flip in choices], dtype=torch.bool),
            size=self.size,
        )

    def __getitem__(self, index: int) -> CropBatch:
        return self.__getitems__([index])


def _as_is(batch: CropBatch | ResizeBatch | None) -> CropBatch | ResizeBatch | None:
    """`collate_fn` of datasets whose `__getitems__` returns whole batches."""
    return batch


def prepare_batch(
    batch: CropBatch | ResizeBatch | Sequence[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch from any of our loaders -> model-ready `(images, labels)` on `device`.

    A `CropBatch` or `ResizeBatch` travels as uint8 and is cropped, resized, mirrored and
    normalised there; an `(images, labels)` batch is only moved.
    """
    if isinstance(batch, CropBatch):
        batch = batch.to(device)
        return crop_resize_batch(batch.images, batch.boxes, batch.flips, batch.size), batch.labels
    if isinstance(batch, ResizeBatch):
        batch = batch.to(device)
        taps = (batch.rows, batch.row_weights, batch.cols, batch.col_weights)
        return resize_batch(batch.pixels, *taps), batch.labels
    images, labels = batch
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------
# Loaders


class ShardSampler(torch.utils.data.Sampler[int]):
    """Evaluation shard of one rank: indices rank, rank + world, ... (no padding, no repeats).

    Unlike `DistributedSampler`, which pads with repeated images, the shards of all ranks
    together cover every index exactly once.
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def skip_unreadable(items: list) -> list | None:
    """`collate_fn` of evaluation loaders: a batch of the readable items, None if none is."""
    kept = [item for item in items if item is not None]
    return default_collate(kept) if kept else None


def unreadable_images(*loaders: DataLoader | None) -> int:
    """How many distinct images of these loaders' image folders or tables were found
    unreadable."""
    sources = {
        id(s): s for loader in loaders if loader is not None for s in _decoded(loader.dataset)
    }
    return sum(len(source.unreadable()) for source in sources.values())


def _watched(dataset: Dataset, **options) -> WatchedLoader:
    """A `WatchedLoader` that names the unreadable images its workers met after each batch."""
    sources = _decoded(dataset)
    report = sources[0].report_unreadable if sources else None
    return WatchedLoader(dataset, after_batch=report, **options)


def _decoded(dataset: Dataset) -> list[UnreadableImages]:
    """The image folder or table a dataset decodes its images from (through `Subset`,
    `SeededAugment`, ...), if any."""
    while not isinstance(dataset, UnreadableImages):
        dataset = getattr(dataset, "base", getattr(dataset, "dataset", None))
        if dataset is None:
            return []
    return [dataset]
