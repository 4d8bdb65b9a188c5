"""Datasets and loaders for fine-tuning: CIFAR-10/100, your own image folders, scikit-learn digits.

Preprocessing follows the official recipe (REFERENCE.md §3, `vit_jax/input_pipeline.py`): training
images get a random resized ("inception") crop covering 5%-100% of the area and a horizontal
flip; test images are resized; pixels are scaled to [-1, 1] (mean 0.5, std 0.5).

Training augmentation is seeded per image from (seed, epoch, index), so a run is the same for any
number of loader workers or processes: `torchrun --nproc_per_node 2` with the same total batch
sees exactly the images and crops that one process does.
"""

from __future__ import annotations

import logging
import os
import signal
from argparse import Namespace
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets, transforms

from utils.dist_utils import main_process_first
from utils.errors import UserError

__all__ = [
    "CROP_SCALE",
    "CROP_SCALES",
    "DATASETS",
    "IMAGEFOLDER_LAYOUT",
    "DigitsDataset",
    "SeededAugment",
    "ShardSampler",
    "build_datasets",
    "build_test_set",
    "build_transforms",
    "get_loader",
    "ignore_stop_signals",
]

logger = logging.getLogger(__name__)

DATASETS = ("cifar10", "cifar100", "imagefolder", "digits")
CROP_SCALE = (0.05, 1.0)  # area fraction of the inception crop (official)
NO_FLIP = ("digits",)  # a mirrored digit is a different (or no) digit
# An 8x8 digit cropped to 5% of its area is a 2x2-pixel blob, no longer a digit: crop less.
CROP_SCALES = {"digits": (0.3, 1.0)}
DIGITS_TEST_SIZE = 360  # the fixed held-out split of the 1,797 scikit-learn digits
DIGITS_SPLIT_SEED = 0

IMAGEFOLDER_LAYOUT = """\
    DIR/
      train/
        <class_a>/ img001.jpg, img002.png, ...
        <class_b>/ ...
      val/            (or test/)
        <class_a>/ ...
        <class_b>/ ..."""


def build_transforms(
    img_size: int | tuple[int, int],
    train: bool,
    flip: bool = True,
    crop_scale: tuple[float, float] = CROP_SCALE,
) -> Callable[[Image.Image], torch.Tensor]:
    """The official preprocessing: PIL image -> float tensor (3, H, W) in [-1, 1].

    Args:
        img_size: output size, an int (square) or (height, width).
        train: random resized crop (+ flip) when True, plain resize otherwise.
        flip: random horizontal flip in training.
        crop_scale: area fraction range of the training crop.
    """
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if train:
        steps: list[Callable] = [transforms.RandomResizedCrop(size, scale=crop_scale)]
        if flip:
            steps.append(transforms.RandomHorizontalFlip())
    else:
        steps = [transforms.Resize(size)]
    steps += [
        transforms.ToTensor(),
        transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    ]
    return transforms.Compose(steps)


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


class SeededAugment(Dataset):
    """Wraps a dataset so each image's random transform is seeded by (seed, epoch, index).

    The global torch RNG state of the caller is restored after each item, so the augmentation
    of an image does not depend on which worker or process loads it, nor on what ran before.
    Call `set_epoch` with the sampler's epoch (loader workers are re-created every epoch).
    """

    def __init__(self, base: Dataset, transform: Callable, seed: int):
        self.base = base
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.classes = list(getattr(base, "classes", []))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, target = self.base[index]
        seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        saved = torch.get_rng_state()  # cheaper than torch.random.fork_rng per image
        torch.default_generator.manual_seed(seed)
        try:
            return self.transform(image), target
        finally:
            torch.set_rng_state(saved)


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


def _cifar(dataset: str, data_dir: str, download: bool, train: bool) -> Dataset:
    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    try:
        return cls(data_dir, train=train, download=download)
    except RuntimeError as err:
        raise UserError(
            f"{dataset} is not in {data_dir} ({err}). Let train.py download it (it does unless "
            f"another process does), or place the extracted `{cls.base_folder}` folder from "
            f"{cls.url} inside --data_dir."
        ) from None
    except OSError as err:  # URLError is an OSError
        raise UserError(
            f"Could not download {dataset} from {cls.url} into {data_dir}: {err}. Check the "
            f"network, or download and extract the archive into --data_dir yourself."
        ) from None


def _imagefolder(data_dir: str, train: bool) -> Dataset:
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
            f"--dataset imagefolder needs --data_dir with {wanted}, one sub-folder per class; "
            f"{found}. Expected layout:\n{IMAGEFOLDER_LAYOUT}"
        )
    try:
        return datasets.ImageFolder(root)
    except (FileNotFoundError, OSError) as err:
        raise UserError(
            f"{root} does not hold images in the layout --dataset imagefolder needs ({err}). "
            f"Expected layout:\n{IMAGEFOLDER_LAYOUT}"
        ) from None


def _raw_split(dataset: str, data_dir: str, download: bool, train: bool) -> Dataset:
    """One split that returns PIL images (no transform yet); it has a `classes` list."""
    if dataset in ("cifar10", "cifar100"):
        return _cifar(dataset, data_dir, download, train)
    if dataset == "imagefolder":
        return _imagefolder(data_dir, train)
    if dataset == "digits":
        return DigitsDataset(train=train)
    raise UserError(f"Unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}.")


def _raw_datasets(
    dataset: str, data_dir: str, download: bool
) -> tuple[Dataset, Dataset, list[str]]:
    """Both splits (no transform yet), checked to have the same classes."""
    train_set = _raw_split(dataset, data_dir, download, train=True)
    test_set = _raw_split(dataset, data_dir, download, train=False)
    if list(train_set.classes) != list(test_set.classes):
        raise UserError(
            f"The class folders of the training split ({', '.join(train_set.classes)}) and the "
            f"test split ({', '.join(test_set.classes)}) differ; both need the same class "
            "sub-folders."
        )
    return train_set, test_set, list(train_set.classes)


def build_datasets(
    dataset: str, data_dir: str, img_size: int | tuple[int, int], download: bool = True
) -> tuple[Dataset, Dataset, list[str]]:
    """The train and test sets of `dataset`, with the official preprocessing attached.

    Args:
        dataset: one of `DATASETS`.
        data_dir: where CIFAR lives (downloaded there when missing and `download`), or the
            root of an image folder (`train/`, `val/` or `test/`, one sub-folder per class).
            Unused for `digits`.
        img_size: model input size.
        download: fetch CIFAR when it is missing.

    Returns:
        (train_set, test_set, class_names). Items are (tensor (3, H, W) in [-1, 1], label).
        The training set applies random augmentation from the global torch RNG; `get_loader`
        re-wraps it to seed augmentation per image.

    Raises:
        UserError: unknown dataset, missing data or wrong folder layout.
    """
    train_set, test_set, class_names = _raw_datasets(dataset, data_dir, download)
    train_set.transform = _train_transform(dataset, img_size)
    test_set.transform = build_transforms(img_size, train=False)
    return train_set, test_set, class_names


def build_test_set(
    dataset: str, data_dir: str, img_size: int | tuple[int, int], download: bool = True
) -> tuple[Dataset, list[str]]:
    """The test split alone, with the test preprocessing (for evaluation).

    Reads nothing of the training split: an image folder needs only `val/` (or `test/`), such
    as an ImageNet validation set. Arguments and errors as `build_datasets`.
    """
    test_set = _raw_split(dataset, data_dir, download, train=False)
    test_set.transform = build_transforms(img_size, train=False)
    return test_set, list(test_set.classes)


def _train_transform(dataset: str, img_size: int | tuple[int, int]) -> Callable:
    scale = CROP_SCALES.get(dataset, CROP_SCALE)
    return build_transforms(img_size, train=True, flip=dataset not in NO_FLIP, crop_scale=scale)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: leave SIGINT/SIGTERM to the training process.

    Ctrl+C in a terminal signals the whole foreground process group, workers included. A
    worker that died of it would break the batch or evaluation the training process finishes
    before it saves and exits (`train.py` stops cleanly on those signals); the training process
    shuts its workers down itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def get_loader(args: Namespace) -> tuple[DataLoader, DataLoader]:
    """Training and evaluation loaders for this process (the original port's entry point).

    Reads `args.dataset`, `args.data_dir`, `args.img_size`, `args.seed`, `args.num_workers`,
    `args.eval_batch_size`, `args.train_batch_size` (total) and `args.micro_batch_size` (per
    process and forward pass; derived from the total, `args.gradient_accumulation_steps` and
    the world size when absent), `args.rank`, `args.local_rank`, `args.world_size` (default
    0, rank and 1). The first process of each node downloads missing data; the others wait.

    The training loader shuffles with a `DistributedSampler` (call `set_epoch` on both the
    sampler and the dataset each epoch) and drops the last incomplete batch; the test loader
    holds this rank's shard of the test set, every image on exactly one rank.

    Both loaders get a private `torch.Generator`: otherwise every `iter(loader)` draws its
    worker seed from the global torch RNG, and a resumed run (which starts iterating at another
    point) would see other dropout masks than an uninterrupted one.
    """
    rank = getattr(args, "rank", 0)
    world_size = getattr(args, "world_size", 1)
    # One download per node (the first process of each), as the original port did.
    local_rank = max(getattr(args, "local_rank", rank), 0)
    with main_process_first(local_rank):
        download = local_rank == 0
        train_raw, test_set, _ = _raw_datasets(args.dataset, args.data_dir, download=download)
    train_set = SeededAugment(train_raw, _train_transform(args.dataset, args.img_size), args.seed)
    test_set.transform = build_transforms(args.img_size, train=False)
    accumulation = getattr(args, "gradient_accumulation_steps", 1)
    micro_batch = getattr(args, "micro_batch_size", None) or args.train_batch_size // (
        world_size * accumulation
    )
    if len(train_set) < micro_batch * world_size:
        raise UserError(
            f"The training set has {len(train_set)} images, fewer than one batch of "
            f"{micro_batch * world_size} per forward pass; lower --train_batch_size or raise "
            "--gradient_accumulation_steps."
        )
    train_sampler = DistributedSampler(
        train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed
    )
    workers = args.num_workers
    # Not persistent: workers are re-created each epoch and so see `train_set.set_epoch`.
    train_loader = DataLoader(
        train_set,
        batch_size=micro_batch,
        sampler=train_sampler,
        num_workers=workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator(),
        worker_init_fn=ignore_stop_signals,
    )
    test_loader = DataLoader(
        test_set,
        batch_size=args.eval_batch_size,
        sampler=ShardSampler(len(test_set), rank, world_size),
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        generator=torch.Generator(),
        worker_init_fn=ignore_stop_signals,
    )
    return train_loader, test_loader
