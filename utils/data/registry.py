"""The datasets train.py fine-tunes on, and their facts that need no torch (`utils.data.loaders`
builds the loaders): which are held in memory, how each is augmented, which images are minival.

Splits follow the official configs: training uses `train[:98%]`, and the last 2% of the
training split (`HOLDOUT_FRACTION`) are held out as `minival`, never trained on and evaluated
with the test preprocessing, for choosing a model without looking at the test set. "Last" is
the dataset's own order: CIFAR's files, the digits' fixed split; an image folder, sorted by
class, holds out the last images of each class (otherwise minival would be one class).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "CROP_SCALES",
    "DATASETS",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_SIZE",
    "HOLDOUT_FRACTION",
    "IMAGEFOLDER_LAYOUT",
    "IN_MEMORY",
    "NO_FLIP",
    "holdout_split",
]

DATASETS = ("cifar10", "cifar100", "imagefolder", "digits")
IN_MEMORY = ("cifar10", "cifar100", "digits")  # uint8 arrays: cropped and resized on the device
NO_FLIP = ("digits",)  # a mirrored digit is a different (or no) digit
# An 8x8 digit cropped to 5% of its area is a 2x2-pixel blob, no longer a digit: crop less.
CROP_SCALES = {"digits": (0.3, 1.0)}
HOLDOUT_FRACTION = 0.02  # the official `train[:98%]`: the last 2% are minival
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
