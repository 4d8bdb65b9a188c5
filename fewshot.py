"""Few-shot linear evaluation of pre-trained checkpoints, exactly as big_vision computes it.

    python fewshot.py --checkpoint checkpoint/imagenet21k_ViT-B_16.npz --dataset cifar100
    python fewshot.py --checkpoint a.npz b.npz output/run_checkpoint.bin --dataset imagefolder \
        --data_dir /data/flowers --shots 1 5 10 25 --seeds 3 --l2_reg 256 1024 4096 \
        --output output/fewshot.json --cache_dir cache/features
    torchrun --nproc_per_node 4 fewshot.py --checkpoint ... --dataset ...   # embedding is sharded

Each checkpoint embeds the whole training split and the whole test split once (its
`pre_logits`: the pooled token after the final LayerNorm, through the Dense + tanh
representation layer when the checkpoint has one; an ImageNet-21k `.npz` keeps it). Then, per
seed and shot count, a ridge regression is fit in closed form on k images per class and scored
on the test split (`utils.evals.fewshot`, following `big_vision/evaluators/fewshot_lsr.py`). Several
`--l2_reg` values share one eigendecomposition. The table shows the mean and standard deviation
over seeds, one column per checkpoint; `--output` holds every seed's accuracy.

Images go through eval.py's test preprocessing at each model's size (`--preprocess eval`), or
big_vision's `resize(256)|central_crop(224)` (`--preprocess big_vision`). `--cache_dir` keeps the
features, keyed by the checkpoint's SHA-256, the dataset, the split, the preprocessing, the
image size, the precision and `--tf32`: a second run (other l2 values, more seeds, more shots)
embeds nothing again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # Ctrl+C while the modules below load: exit 130, no traceback
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(128 + signum))

from utils.data.registry import DATASETS, Columns, add_column_flags
from utils.infra.description import PRECISIONS
from utils.infra.errors import UserError, run_cli
from utils.infra.flags import (
    HelpFormatter,
    add_model_flags,
    add_process_flags,
    add_tf32_flag,
    add_verbose,
    count_at_most,
    parse_first,
    positive_float,
    positive_int,
)

logger = logging.getLogger("fewshot")

PREPROCESSING = ("eval", "big_vision")
BIG_VISION_RESIZE = 256 / 224  # big_vision's `resize(256)|central_crop(224)`, at any size
CACHE_FORMAT = 1  # bump when what a cached file holds changes
SHOWN_CLASSES = 10  # short classes named in a warning
MAX_SEEDS = 1000  # --seeds: a typo of more would run (and hold results) for hours


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--checkpoint",
        nargs="+",
        required=True,
        help="One or more: official .npz files, train.py's <name>_checkpoint.bin (or _last.pt).",
    )
    add_model_flags(
        p, model_type_help="For every checkpoint. Default: each one's sidecar, file name or shapes."
    )
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument(
        "--data_dir",
        default="./data",
        help="CIFAR folder, or an image folder root with train/ and val/ (or test/), or a "
        "Hugging Face dataset (--dataset hf).",
    )
    add_column_flags(p)
    p.add_argument(
        "--preprocess",
        choices=PREPROCESSING,
        default="eval",
        help="eval: eval.py's test preprocessing (a plain resize to the model size); "
        "big_vision: resize to 256/224 of the size, then the central crop (big_vision's).",
    )
    p.add_argument(
        "--resize_size",
        type=positive_int,
        default=None,
        help="With --preprocess big_vision: the square resize before the crop. Default: "
        "256 for 224 (img_size * 256 / 224).",
    )
    p.add_argument(
        "--shots",
        type=positive_int,
        nargs="+",
        default=[1, 5, 10, 25],
        help="Training images per class.",
    )
    p.add_argument(
        "--seeds",
        type=count_at_most(MAX_SEEDS),
        default=3,
        help=f"Seeds 0 .. N-1 (N at most {MAX_SEEDS}).",
    )
    p.add_argument(
        "--l2_reg",
        type=positive_float,
        nargs="+",
        default=[1024.0],
        help="Ridge regularisation; several values share one eigendecomposition.",
    )
    p.add_argument("--output", default=None, help="output/fewshot.json: every seed's accuracy.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --output file.")
    p.add_argument(
        "--cache_dir", default=None, help="Keep the features here; reused by later runs."
    )
    p.add_argument("--batch_size", type=positive_int, default=64, help="Per process.")
    add_process_flags(p)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="Autocast precision.")
    add_tf32_flag(p)
    add_verbose(p)
    args = p.parse_args(argv)
    if args.resize_size is not None and args.preprocess != "big_vision":
        p.error("--resize_size applies to --preprocess big_vision only; drop it or add that.")
    if args.output and Path(args.output).suffix.lower() != ".json":
        p.error(f"--output must end in .json, got {args.output}")
    if args.output and Path(args.output).is_dir():
        p.error(f"--output {args.output} is a directory; pass a file, e.g. output/fewshot.json")
    if args.cache_dir and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        p.error(f"--cache_dir {args.cache_dir} is a file; pass a directory.")
    args.shots = sorted(set(args.shots))
    args.l2_reg = list(dict.fromkeys(args.l2_reg))
    return args


if __name__ == "__main__":
    parse_first(parse_args)  # --help and a mistyped flag answer before torch loads

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from tqdm import tqdm

from utils.data.loaders import (
    Indexed,
    build_eval_loader,
    build_split,
    build_transforms,
    check_same_classes,
)
from utils.data.preprocessing import ResizeCentralCrop
from utils.evals.fewshot import fewshot_evaluate, short_classes
from utils.infra.atomic import file_sha256
from utils.infra.console import interactive
from utils.infra.dist_utils import DistInfo, main_process_first, run_distributed
from utils.infra.file_io import (
    check_output,
    checkpoint_files,
    content_sha256,
    save_npz,
    write_output,
)
from utils.infra.loading import (
    LoadedModel,
    check_finite_weights,
    folder_weight_files,
    is_model_folder,
    load_model,
)
from utils.recipe.amp import autocast, set_tf32

# --------------------------------------------------------------------------------------------
# Data


def preprocessing(args: argparse.Namespace, size: tuple[int, int]):
    """The per-image transform for a model of input `size`, and the words that name it."""
    if args.preprocess == "eval":
        return build_transforms(size, train=False), f"eval {size[0]}x{size[1]}"
    resize = (
        (args.resize_size, args.resize_size)
        if args.resize_size
        else tuple(round(s * BIG_VISION_RESIZE) for s in size)
    )
    name = f"big_vision resize {resize[0]}x{resize[1]} central_crop {size[0]}x{size[1]}"
    return ResizeCentralCrop(resize, size), name


def load_splits(args: argparse.Namespace, info: DistInfo) -> tuple[Dataset, Dataset, list[str]]:
    """The whole training and test splits, untransformed, with the same classes."""
    with main_process_first(info.local_rank):
        download = info.local_rank == 0
        columns = Columns(args.image_column, args.label_column)
        train, classes = build_split(args.dataset, args.data_dir, True, download, columns)
        test, test_classes = build_split(args.dataset, args.data_dir, False, download, columns)
    check_same_classes(args.dataset, classes, test_classes)
    for name, split in (("training", train), ("test", test)):
        if len(split) == 0:
            raise UserError(f"The {args.dataset} {name} split in {args.data_dir} has no images.")
    return train, test, classes


def data_signature(args: argparse.Namespace, split: Dataset) -> str:
    """What identifies a split's images: the name of a published dataset, or the files of an
    image folder or a table (path, size, modification time), so that changed files are
    embedded again."""
    if DATASETS[args.dataset].published:
        return args.dataset
    return f"{os.path.realpath(args.data_dir)} {content_sha256(split.content(args.data_dir))}"


def warn_short_classes(train: Dataset, classes: Sequence[str], shots: Sequence[int]) -> None:
    """A warning per shot count that some class cannot fill, naming the classes."""
    for k in shots:
        short = short_classes(train.targets, k, len(classes))
        if not short:
            continue
        named = ", ".join(f"{classes[c]} ({n})" for c, n in short[:SHOWN_CLASSES])
        more = f" and {len(short) - SHOWN_CLASSES} more" if len(short) > SHOWN_CLASSES else ""
        logger.warning(
            "%d-shot: %d class(es) have fewer than %d training images and contribute all they "
            "have (as big_vision does): %s%s.",
            k,
            len(short),
            k,
            named,
            more,
        )


# --------------------------------------------------------------------------------------------
# Features


def embed(
    loaded: LoadedModel,
    split: Dataset,
    transform: Any,
    classes: Sequence[str],
    args: argparse.Namespace,
    info: DistInfo,
    desc: str,
) -> tuple[np.ndarray, np.ndarray] | None:
    """`forward_features` of every image of `split`, sharded over the processes.

    Returns:
        (features (N, D) float32, labels (N,) int64) in dataset order on process 0 (unreadable
        images left out), None on the others.
    """
    dataset = Indexed(split, transform, classes)
    loader = build_eval_loader(
        dataset, args.batch_size, args.num_workers, info.rank, info.world_size
    )
    model = loaded.model.to(info.device).eval()
    features, labels, indices = [], [], []
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in tqdm(
            loader,
            desc=desc,
            unit="batch",
            disable=not (info.is_main and interactive()),
            leave=False,
        ):
            if batch is None:  # every image of it was unreadable
                continue
            images, targets, positions = batch
            with autocast(args.precision, info.device):
                pooled = model.forward_features(images.to(info.device, non_blocking=True))[0]
            features.append(pooled.float().cpu().numpy())
            labels.append(targets.numpy())
            indices.append(positions.numpy())
    width = loaded.model.head.in_features
    part = (
        np.concatenate(features) if features else np.zeros((0, width), np.float32),
        np.concatenate(labels) if labels else np.zeros(0, np.int64),
        np.concatenate(indices) if indices else np.zeros(0, np.int64),
    )
    parts = [part]
    if info.distributed:
        parts = [None] * info.world_size
        dist.all_gather_object(parts, part)
    seconds = time.perf_counter() - start
    if not info.is_main:
        return None
    feats, targets, positions = (np.concatenate(column) for column in zip(*parts, strict=True))
    order = np.argsort(positions, kind="stable")
    logger.info(
        "%s: %d images in %.1f s, %.1f images/s (%d process(es)).",
        desc,
        len(order),
        seconds,
        len(order) / max(seconds, 1e-9),
        info.world_size,
    )
    return feats[order].astype(np.float32), targets[order].astype(np.int64)


def cache_file(cache_dir: str, key: dict[str, Any]) -> Path:
    return Path(cache_dir) / f"{key['dataset']}-{key['split']}-{content_sha256(key)[:24]}.npz"


def read_cache(
    path: Path, key: dict[str, Any], num_classes: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Cached (features, labels) for `key`, or None (missing, damaged, or another key). An
    entry whose features are not finite or whose labels are not classes is damaged too."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = json.loads(str(data["key"]))
            features, labels = data["features"], data["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
        logger.warning("Ignoring the damaged feature cache %s (%s); embedding again.", path, err)
        return None
    if stored != key or len(features) != len(labels):
        logger.warning("The feature cache %s holds other features; embedding again.", path)
        return None
    problem = entry_problem(features, labels, num_classes)
    if problem:
        logger.warning(
            "Ignoring the damaged feature cache %s (%s); embedding again.", path, problem
        )
        return None
    return features, labels


def entry_problem(features: np.ndarray, labels: np.ndarray, num_classes: int) -> str | None:
    """What makes cached features and labels unusable, or None."""
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
        return f"features of {features.dtype} {features.shape}, not a float (N, D) array"
    if not np.isfinite(features).all():
        return "features that are not finite"
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        return f"labels of {labels.dtype} {labels.shape}, not an integer (N,) array"
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        return f"labels from {labels.min()} to {labels.max()}, not classes 0 to {num_classes - 1}"
    return None


def split_features(
    loaded: LoadedModel,
    sha256: str,
    split: Dataset,
    split_name: str,
    classes: Sequence[str],
    args: argparse.Namespace,
    info: DistInfo,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Features and labels of one split: from `--cache_dir` when there, else embedded (and
    cached). On process 0; None on the others."""
    transform, described = preprocessing(args, loaded.img_size)
    path = cached = None
    if args.cache_dir and info.is_main:
        key = {
            "format": CACHE_FORMAT,
            "checkpoint_sha256": sha256,
            "model_type": loaded.model_type,
            "img_size": list(loaded.img_size),
            "dataset": args.dataset,
            "data": data_signature(args, split),
            "split": split_name,
            "preprocess": described,
            "precision": args.precision,
            "tf32": args.tf32,
        }
        path = cache_file(args.cache_dir, key)
        cached = read_cache(path, key, len(classes))
    hit = [cached is not None]
    if info.distributed:
        dist.broadcast_object_list(hit, src=0)  # the other processes embed only on a miss
    if hit[0]:
        if info.is_main:
            logger.info("%s %s features: from %s.", args.dataset, split_name, path)
        return cached
    desc = f"{Path(loaded.source).name}: {args.dataset} {split_name}"
    embedded = embed(loaded, split, transform, classes, args, info, desc)
    if embedded is not None and not np.isfinite(embedded[0]).all():
        fix = "pass another checkpoint"
        if args.precision != "fp32":
            fix = f"they overflow in {args.precision}: pass --precision fp32, or another checkpoint"
        raise UserError(
            f"{loaded.source}: its features of the {args.dataset} {split_name} images are not "
            f"finite (NaN or infinite), so no linear fit exists; {fix}."
        )
    if embedded is not None and path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        features, labels = embedded
        save_npz(path, {"features": features, "labels": labels, "key": np.array(json.dumps(key))})
        logger.info("Cached the %s %s features in %s.", args.dataset, split_name, path)
    return embedded


# --------------------------------------------------------------------------------------------
# Evaluation and reporting


def checkpoint_sha256(path: str) -> str:
    """The SHA-256 of a checkpoint file (as `sha256sum` prints it); of a Hugging Face folder,
    that of its `config.json` and weight files' hashes."""
    if not is_model_folder(path):
        return file_sha256(path)
    files = [os.path.join(path, "config.json"), *folder_weight_files(path)]
    return content_sha256([[os.path.basename(f), file_sha256(f)] for f in files])


def evaluate_checkpoint(
    path: str,
    splits: tuple[Dataset, Dataset, list[str]],
    args: argparse.Namespace,
    info: DistInfo,
) -> list[dict[str, Any]] | None:
    """One checkpoint's entries of the results (one per l2 value), on process 0."""
    train, test, classes = splits
    loaded = load_model(path, args.model_type, args.img_size, keep_pre_logits=True)
    check_finite_weights(loaded)
    sha256 = checkpoint_sha256(path) if info.is_main else ""
    width = loaded.model.head.in_features
    if info.is_main:
        logger.info(
            "%s: %s at %dx%d, %d-wide representation (%s).",
            path,
            loaded.model_type,
            *loaded.img_size,
            width,
            "pre_logits: Dense + tanh" if loaded.model.pre_logits is not None else "pooled token",
        )
    train_features = split_features(loaded, sha256, train, "train", classes, args, info)
    test_features = split_features(loaded, sha256, test, "test", classes, args, info)
    if not info.is_main:
        return None
    results = fewshot_evaluate(
        *train_features, *test_features, args.shots, args.seeds, args.l2_reg, len(classes)
    )
    identity = {
        "checkpoint": str(path),
        "sha256": sha256,
        "model_type": loaded.model_type,
        "img_size": list(loaded.img_size),
        "representation_width": width,
        "pre_logits": loaded.model.pre_logits is not None,
        "preprocess": preprocessing(args, loaded.img_size)[1],
        "train_images": len(train_features[1]),
        "test_images": len(test_features[1]),
    }
    return [
        {
            **identity,
            "l2_reg": l2,
            "results": [r.as_dict() for r in results if r.l2_reg == l2],
            "summary": summarize([r for r in results if r.l2_reg == l2], args.shots),
        }
        for l2 in args.l2_reg
    ]


def summarize(results: Sequence[Any], shots: Sequence[int]) -> list[dict[str, Any]]:
    """Per shot count: mean and (population) standard deviation of the seeds' accuracies."""
    rows = []
    for k in shots:
        accuracies = [r.accuracy for r in results if r.shots == k]
        rows.append(
            {
                "shots": k,
                "mean": float(np.mean(accuracies)),
                "std": float(np.std(accuracies)),
                "seeds": len(accuracies),
            }
        )
    return rows


def to_table(evaluations: Sequence[dict[str, Any]], args: argparse.Namespace) -> str:
    """Accuracy (%) mean ± std over seeds: one block per l2, one row per shot count, one column
    per checkpoint."""
    paths = list(dict.fromkeys(e["checkpoint"] for e in evaluations))
    names = [Path(p).name for p in paths]
    if len(set(names)) < len(names):  # two files of one name in different folders
        names = paths
    first = evaluations[0]
    lines = [
        f"Few-shot linear accuracy (%) on {args.dataset}: {first['test_images']} test images, "
        f"mean ± std over {args.seeds} seed(s), {first['preprocess'].split()[0]} preprocessing."
    ]
    for l2 in args.l2_reg:
        by_path = {e["checkpoint"]: e for e in evaluations if e["l2_reg"] == l2}
        cells = [["shots", *names]]
        for row, k in enumerate(args.shots):
            cells.append(
                [
                    str(k),
                    *(
                        f"{100 * by_path[p]['summary'][row]['mean']:.2f} ± "
                        f"{100 * by_path[p]['summary'][row]['std']:.2f}"
                        for p in paths
                    ),
                ]
            )
        widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
        lines.append(f"\nl2_reg {l2:g}")
        lines += [
            "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells
        ]
    return "\n".join(lines)


def write_results(path: str, document: dict[str, Any]) -> None:
    text = (json.dumps(document, indent=2) + "\n").encode()
    write_output(path, lambda handle: handle.write(text), "--output")


# --------------------------------------------------------------------------------------------
# Entry point


def run(args: argparse.Namespace, info: DistInfo) -> dict[str, Any] | None:
    """Embed and evaluate every checkpoint; the results document on process 0."""
    set_tf32(args.tf32 == "on", info.device)
    splits = load_splits(args, info)
    train, test, classes = splits
    if info.is_main:
        logger.info(
            "%s: %d training and %d test images, %d classes; shots %s, %d seed(s), l2 %s.",
            args.dataset,
            len(train),
            len(test),
            len(classes),
            " ".join(map(str, args.shots)),
            args.seeds,
            " ".join(f"{l2:g}" for l2 in args.l2_reg),
        )
        warn_short_classes(train, classes, args.shots)
    evaluations = []
    for path in args.checkpoint:
        evaluations += evaluate_checkpoint(path, splits, args, info) or []
    if not info.is_main:
        return None
    return {
        "dataset": args.dataset,
        "data_dir": None if args.dataset == "digits" else str(args.data_dir),
        "num_classes": len(classes),
        "class_names": list(classes),
        "shots": args.shots,
        "seeds": list(range(args.seeds)),
        "precision": args.precision,
        "tf32": args.tf32,
        "evaluations": evaluations,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Parse flags, evaluate (embedding sharded under torchrun), print and write on process 0."""
    args = parse_args(argv)
    if args.output:  # before any work
        read = [file for path in args.checkpoint for file in checkpoint_files(path)]
        check_output(args.output, overwrite=args.overwrite, inputs=read)
    _, document = run_distributed(lambda info: run(args, info), args.verbose, args.local_rank)
    if document is None:
        return None
    if args.output:
        write_results(args.output, document)
    print(to_table(document["evaluations"], args))
    if args.output:
        print(f"Every seed's accuracy: {args.output}")
    return document


if __name__ == "__main__":
    run_cli(main)
