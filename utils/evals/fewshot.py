"""Few-shot linear evaluation, computed as big_vision's `evaluators/fewshot_lsr.py` computes it.

The paper's "linear few-shot" accuracies (Section 4.1) fit a closed-form ridge regression from a
frozen representation (`pre_logits`) of k training images per class to the test split:

- sampling (per seed `s`): `rng = np.random.default_rng(s)`; for every class `c` in
  `range(num_classes)`, in order, one `rng.permutation(np.where(train_labels == c)[0])`, drawn
  once per seed and shared by every shot count; the k-shot subset is the concatenation of each
  permutation's first k indices (a class with fewer images gives all it has);
- solve: standardise with the subset's mean and population standard deviation (+ 1e-5), append a
  constant column of 100 (a bias that is hardly regularised), targets `2 * one_hot - 1`, then
  `W = (X^T X + l2 I)^-1 X^T Y` through the eigendecomposition of `X^T X` when the subset has at
  least as many rows as columns, else `W = X^T (X X^T + l2 I)^-1 Y` through that of `X X^T`;
  one decomposition serves every l2 value;
- score: test features standardised with the subset's statistics, `argmax(X_test W)`, accuracy
  over the whole test split.

big_vision computes in float32 (`configs/common_fewshot.py`: shots 1, 5, 10, 25; l2 2^10; three
seeds, each reported on its own); so does this module. It needs NumPy only; torch tensors are
accepted and converted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "BIAS",
    "DEFAULT_L2_REG",
    "DEFAULT_SEEDS",
    "DEFAULT_SHOTS",
    "STD_EPS",
    "FewshotResult",
    "class_permutations",
    "fewshot_accuracy",
    "fewshot_evaluate",
    "fewshot_indices",
    "fit_ridge",
    "short_classes",
    "standardize",
]

DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_SEEDS = 3
DEFAULT_L2_REG = 2.0**10
BIAS = 100.0  # the constant feature: large, so its weight is almost unregularised
STD_EPS = 1e-5  # added to the standard deviation (not the variance)


def _array(values: Any, dtype: Any | None = None) -> np.ndarray:
    """A NumPy array of a NumPy array, a (CPU or GPU) torch tensor or a sequence."""
    if hasattr(values, "detach"):  # a torch tensor, without importing torch
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def _labels(labels: Any) -> np.ndarray:
    labels = _array(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(
            f"labels must be a 1-D array of integers, got {labels.dtype} {labels.shape}"
        )
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be class indices from 0, got {labels.min()}")
    return labels.astype(np.int64)


def _num_classes(num_classes: int | None, *labels: np.ndarray) -> int:
    implied = max((int(y.max()) + 1 for y in labels if y.size), default=0)
    if num_classes is None:
        return implied
    if num_classes < implied:
        raise ValueError(f"num_classes={num_classes}, but the labels go up to {implied - 1}")
    return num_classes


def class_permutations(
    train_labels: Any, seed: int, num_classes: int | None = None
) -> list[np.ndarray]:
    """Per class, in class order, a random order of its training positions (drawn once per seed).

    Every class in `range(num_classes)` draws its permutation, an empty one included, so the
    random stream is that of big_vision whatever classes are missing.
    """
    labels = _labels(train_labels)
    rng = np.random.default_rng(seed)
    return [
        rng.permutation(np.where(labels == c)[0]) for c in range(_num_classes(num_classes, labels))
    ]


def _subset(permutations: Sequence[np.ndarray], shots: int) -> np.ndarray:
    return np.concatenate([p[:shots] for p in permutations]).astype(np.int64)


def fewshot_indices(
    train_labels: Any, shots: int, seed: int, num_classes: int | None = None
) -> np.ndarray:
    """The positions of the `shots`-shot training subset of `seed`, class by class.

    Args:
        train_labels: (N,) class indices of the training split.
        shots: images per class; a class with fewer gives all it has.
        seed: the seed of `np.random.default_rng`.
        num_classes: classes to draw for (default: what the labels imply).

    Returns:
        (at most shots * num_classes,) int64 positions into `train_labels`: the first `shots`
        of class 0's permutation, then of class 1's, ...; the 1-shot subset of a seed is inside
        its 5-shot subset.
    """
    return _subset(class_permutations(train_labels, seed, num_classes), shots)


def short_classes(
    train_labels: Any, shots: int, num_classes: int | None = None
) -> list[tuple[int, int]]:
    """(class, training images) of every class with fewer than `shots` training images."""
    labels = _labels(train_labels)
    counts = np.bincount(labels, minlength=_num_classes(num_classes, labels))
    return [(c, int(n)) for c, n in enumerate(counts) if n < shots]


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """`(x - mean) / std` with the constant bias column appended: (N, D) -> (N, D + 1)."""
    x = (x - mean) / std
    return np.pad(x, ((0, 0), (0, 1)), constant_values=x.dtype.type(BIAS))


@dataclass
class _Ridge:
    """A fitted classifier: the subset's statistics and one weight matrix per l2 value."""

    mean: np.ndarray  # (1, D)
    std: np.ndarray  # (1, D), 1e-5 added
    weights: list[np.ndarray]  # (D + 1, C) each

    def scores(self, x: np.ndarray, which: int) -> np.ndarray:
        return standardize(x, self.mean, self.std) @ self.weights[which]


def fit_ridge(
    x: Any, y: Any, num_classes: int, l2_regs: Iterable[float], dtype: Any = np.float32
) -> _Ridge:
    """Ridge regression of `2 * one_hot(y) - 1` on the standardised, padded `x`, for every l2.

    One eigendecomposition (`X^T X` when N >= D + 1, `X X^T` otherwise) serves every l2 value,
    as big_vision's `_precompute_cache` and `_eig_fewshot_acc_fn`.

    Args:
        x: (N, D) features of the training subset.
        y: (N,) its labels.
        num_classes: C, the width of the targets.
        l2_regs: regularisation strengths (> 0).
        dtype: float32 as big_vision; float64 for a reference.
    """
    x = _array(x, dtype)
    y = _labels(y)
    mean = x.mean(axis=0, keepdims=True)
    std = x.std(axis=0, keepdims=True) + x.dtype.type(STD_EPS)  # population std (ddof 0)
    padded = standardize(x, mean, std)  # (N, D + 1)
    targets = (2.0 * np.eye(num_classes, dtype=dtype)[y] - 1.0).astype(dtype)  # (N, C)
    rows, cols = padded.shape
    if rows >= cols:
        eigs, q = np.linalg.eigh(padded.T @ padded)  # (D + 1,), (D + 1, D + 1)
        rhs = q.T @ (padded.T @ targets)
        lhs = q
    else:
        eigs, q = np.linalg.eigh(padded @ padded.T)  # (N,), (N, N)
        rhs = q.T @ targets
        lhs = padded.T @ q
    weights = [(lhs / (eigs + x.dtype.type(l2))[None, :]) @ rhs for l2 in l2_regs]
    return _Ridge(mean, std, weights)


@dataclass(frozen=True)
class FewshotResult:
    """The accuracy of one (shots, seed, l2) fit over the whole test split."""

    shots: int
    seed: int
    l2_reg: float
    correct: int
    count: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else float("nan")

    def as_dict(self) -> dict[str, float | int]:
        return {
            "shots": self.shots,
            "seed": self.seed,
            "accuracy": self.accuracy,
            "correct": self.correct,
            "count": self.count,
        }


def _batches(labels: np.ndarray, size: int) -> Iterable[tuple[int, np.ndarray]]:
    for start in range(0, len(labels), size):
        yield start, labels[start : start + size]


def fewshot_evaluate(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: Iterable[int] | int = DEFAULT_SEEDS,
    l2_regs: Sequence[float] = (DEFAULT_L2_REG,),
    num_classes: int | None = None,
    batch_size: int = 4096,
) -> list[FewshotResult]:
    """Every (seed, shots, l2) accuracy: one permutation per class and seed, one
    eigendecomposition per (seed, shots).

    Args:
        train_features, test_features: (N, D) and (M, D) representations.
        train_labels, test_labels: (N,) and (M,) class indices.
        seeds: the seeds, or a count n for `range(n)`.
        num_classes: default: what the labels imply.
        batch_size: test rows scored at a time (bounds the memory of `X_test W`).

    Returns:
        Results ordered by seed, then shots, then l2.
    """
    train_x = _array(train_features, np.float32)
    test_x = _array(test_features, np.float32)
    train_y, test_y = _labels(train_labels), _labels(test_labels)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"features must be (N, D) arrays of one width, got {train_x.shape} and {test_x.shape}"
        )
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("every feature row needs one label")
    if not (np.isfinite(train_x).all() and np.isfinite(test_x).all()):
        raise ValueError("features must be finite (NaN or infinite values have no linear fit)")
    classes = _num_classes(num_classes, train_y, test_y)
    results = []
    for seed in range(seeds) if isinstance(seeds, int) else seeds:
        permutations = class_permutations(train_y, seed, classes)
        for k in shots:
            subset = _subset(permutations, k)
            ridge = fit_ridge(train_x[subset], train_y[subset], classes, l2_regs)
            for which, l2 in enumerate(l2_regs):
                correct = sum(
                    int((ridge.scores(test_x[i : i + batch_size], which).argmax(1) == y).sum())
                    for i, y in _batches(test_y, batch_size)
                )
                results.append(FewshotResult(k, seed, float(l2), correct, len(test_y)))
    return results


def fewshot_accuracy(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    shots: int,
    seed: int,
    l2_reg: float = DEFAULT_L2_REG,
    num_classes: int | None = None,
) -> float:
    """Test accuracy of the ridge classifier fit on the `shots`-shot subset of `seed`.

    big_vision's `{name}_{shots}shot-seed-{seed}` number for these features.
    """
    (result,) = fewshot_evaluate(
        train_features,
        train_labels,
        test_features,
        test_labels,
        [shots],
        [seed],
        [l2_reg],
        num_classes,
    )
    return result.accuracy
