"""The datasets train.py fine-tunes on, and their facts that need no torch (`utils.data.loaders`
builds the loaders): one frozen `DatasetSpec` per `--dataset` name in :data:`DATASETS`, the
scripts' `--dataset` choices. Adding a source is one entry here and its reader in
`utils.data.loaders.READERS`.

Splits follow the official configs: training uses `train[:98%]`, and the last 2% of the
training split (`HOLDOUT_FRACTION`) are held out as `minival`, never trained on and evaluated
with the test preprocessing, for choosing a model without looking at the test set. "Last" is
the dataset's own order: CIFAR's files, the digits' fixed split; an image folder, sorted by
class, holds out the last images of each class (otherwise minival would be one class), and so
does a Hugging Face dataset.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "DATASETS",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_SIZE",
    "HOLDOUT_FRACTION",
    "Columns",
    "DatasetSpec",
    "add_column_flags",
    "holdout_split",
]

HOLDOUT_FRACTION = 0.02  # the official `train[:98%]`: the last 2% are minival
DIGITS_TEST_SIZE = 360  # the fixed held-out split of the 1,797 scikit-learn digits
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset, as `--dataset` names it.

    Attributes:
        name: the `--dataset` value.
        reader: the key of `utils.data.loaders.READERS` whose function reads one split.
        published: a published dataset, downloaded or bundled, whose name fixes its images;
            otherwise the user's own files under `--data_dir` (their test split is checked
            before a sweep starts, and few-shot caches key them by their files).
        in_memory: the training images are held as uint8 arrays, gathered by loader workers;
            otherwise workers decode each image (and cut its training crop out), an unreadable
            one is skipped with a warning and `--strict_images` checks them all. Either way the
            device resizes.
        holdout_by_class: minival is the end of each class, not of the whole split.
        num_classes: known before reading the data; None: the data says.
        flip: mirror half of the training images.
        crop_area: area fraction range of the training crop; None: the official
            `utils.data.preprocessing.CROP_AREA`.
        layout: the files `--data_dir` must hold, shown when it holds something else.
        classes_differ: the message when the training and test splits have other classes
            (formatted with `train` and `test`, the class names).
    """

    name: str
    reader: str
    published: bool = False
    in_memory: bool = False
    holdout_by_class: bool = False
    num_classes: int | None = None
    flip: bool = True
    crop_area: tuple[float, float] | None = None
    layout: str = ""
    classes_differ: str = (
        "The classes of the training split ({train}) and the test split ({test}) differ."
    )


_IMAGEFOLDER_LAYOUT = """\
    DIR/
      train/
        <class_a>/ img001.jpg, img002.png, ...
        <class_b>/ ...
      val/            (or test/)
        <class_a>/ ...
        <class_b>/ ..."""

_HF_LAYOUT = """\
    DIR/                      a DatasetDict saved with save_to_disk
      dataset_dict.json
      train/  test/
    DIR/                      parquet files named by split (e.g. written by to_parquet)
      train-00000-of-00002.parquet  train-00001-of-00002.parquet  test-00000-of-00001.parquet
                              (or train.parquet, test.parquet; or all in DIR/data/, as on the Hub)
    DIR/                      a folder per split
      train/  test/           each a Dataset saved with save_to_disk, or *.parquet files
    A split named validation stands in for a missing test split."""


def _build_registry() -> dict[str, DatasetSpec]:
    cifar10 = DatasetSpec("cifar10", "cifar10", published=True, in_memory=True, num_classes=10)
    yours = DatasetSpec("imagefolder", "imagefolder", holdout_by_class=True)
    specs = [
        cifar10,
        replace(cifar10, name="cifar100", reader="cifar100", num_classes=100),
        replace(
            yours,
            layout=_IMAGEFOLDER_LAYOUT,
            classes_differ="The class folders of the training split ({train}) and the test "
            "split ({test}) differ; both need the same class sub-folders.",
        ),
        DatasetSpec(
            "digits",
            "digits",
            published=True,
            in_memory=True,
            num_classes=10,
            flip=False,  # a mirrored digit is a different (or no) digit
            # Cropped to 5% of its area, an 8x8 digit is a 2x2-pixel blob, no longer a digit.
            crop_area=(0.3, 1.0),
        ),
        replace(
            yours,
            name="hf",
            reader="hf",
            layout=_HF_LAYOUT,
            classes_differ="The classes of the training split ({train}) and the test split "
            "({test}) differ; both need the same label names (of a ClassLabel feature) or, "
            "without them, the same label values.",
        ),
    ]
    return {spec.name: spec for spec in specs}


DATASETS: dict[str, DatasetSpec] = _build_registry()


@dataclass(frozen=True)
class Columns:
    """The columns of a table of images (`--dataset hf`) that hold the images and the labels."""

    image: str = "image"
    label: str = "label"


def add_column_flags(parser: argparse.ArgumentParser) -> None:
    """`--image_column` and `--label_column` of a script that takes `--dataset` (read into a
    `Columns` by the script)."""
    parser.add_argument(
        "--image_column",
        default=Columns.image,
        help="With --dataset hf: the column of the images (an Image feature, or encoded bytes).",
    )
    parser.add_argument(
        "--label_column",
        default=Columns.label,
        help="With --dataset hf: the column of the integer labels (class names from its "
        "ClassLabel feature, else its distinct values, sorted).",
    )


def holdout_split(
    num_images: int, fraction: float, targets: Sequence[int] | None = None
) -> tuple[list[int], list[int]]:
    """Indices of the training part and of the held-out last `fraction` (minival).

    As TFDS's `train[:98%]`, the cut is at the index closest to `(1 - fraction) * num_images`.
    With `targets`, the cut is made in each class separately (for datasets sorted by class).

    Returns:
        (train_indices, minival_indices): disjoint, ascending, together every index.
    """
    if targets is None:
        groups = [np.arange(num_images)]
    else:  # the indices of each class, in dataset order
        targets = np.asarray(targets)
        order = np.argsort(targets, kind="stable")
        groups = np.split(order, np.cumsum(np.bincount(targets))[:-1])
    cuts = [round(len(group) * (1.0 - fraction)) for group in groups]
    train = np.concatenate([group[:cut] for group, cut in zip(groups, cuts, strict=True)])
    minival = np.concatenate([group[cut:] for group, cut in zip(groups, cuts, strict=True)])
    return np.sort(train).tolist(), np.sort(minival).tolist()
