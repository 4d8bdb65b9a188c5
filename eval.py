"""Evaluate a fine-tuned or official Vision Transformer on the test split of a dataset.

    python eval.py --checkpoint output/cifar10-100_500_checkpoint.bin
    python eval.py --model_type ViT-B_16 --checkpoint output/NAME_checkpoint.bin \
        --dataset cifar10 --img_size 224
    python eval.py --checkpoint checkpoint/imagenet21k+imagenet2012_ViT-B_16-224.npz \
        --dataset imagefolder --data_dir /data/imagenet        # val/<class>/... inside
    torchrun --nproc_per_node 2 eval.py --checkpoint ...      # the test set is sharded

Prints the test loss, top-1 accuracy (and top-5 with more than 10 classes) and throughput over
the whole test split. The checkpoint is a train.py `.bin` (or a `_last.pt` training state) or an
official `.npz`. For a `.bin`, flags left out come from the `<name>_checkpoint.json` train.py
writes next to it; for an `.npz`, the class count comes from its head, the model from its shapes
and the image size from its position embeddings. Evaluation is train.py's own `evaluate` on the
same test preprocessing, so the accuracy equals what train.py logged for the checkpoint.
`--img_size` (one value or HEIGHT WIDTH) evaluates at another size: the position embeddings are
resized as vit_jax resizes them to fine-tune at a new size, and a log line says so.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Sequence

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
    parse_first,
    positive_int,
)

logger = logging.getLogger("eval")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="train.py's output/<name>_checkpoint.bin (or _last.pt), or an official .npz.",
    )
    add_model_flags(p, height_width=True)
    p.add_argument(
        "--dataset", choices=DATASETS, default=None, help="Default: the one it was trained on."
    )
    p.add_argument(
        "--data_dir",
        default="./data",
        help="CIFAR folder, or an image folder root with val/ (or test/), one folder per class, "
        "or a Hugging Face dataset with a test split (--dataset hf).",
    )
    add_column_flags(p)
    p.add_argument(
        "--eval_batch_size",
        type=positive_int,
        default=None,
        help="Per process. Default: auto: on CUDA the largest batch that fits (the memory "
        "plan), at most 1024; 64 without CUDA.",
    )
    add_process_flags(p)
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="Autocast precision. Default: the one it was trained with (sidecar), else fp32.",
    )
    add_tf32_flag(p)
    add_verbose(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_first(parse_args)  # --help and a mistyped flag answer before torch loads

from functools import partial

from torch.utils.data import Dataset

from utils.data.loaders import ShardSampler, build_eval_loader, build_test_set
from utils.evals.classification import evaluate
from utils.infra.dist_utils import DistInfo, main_process_first, run_distributed
from utils.infra.loading import load_model
from utils.infra.memory import evaluation_batch_size
from utils.recipe.amp import autocast, set_tf32


def load_test_set(
    args: argparse.Namespace, dataset: str, img_size: tuple[int, int], info: DistInfo
) -> tuple[Dataset, list[str]]:
    """The test split, with train.py's test preprocessing, and its class names."""
    with main_process_first(info.rank):
        return build_test_set(
            dataset,
            args.data_dir,
            img_size,
            download=info.is_main,
            columns=Columns(args.image_column, args.label_column),
        )


def run(args: argparse.Namespace, info: DistInfo) -> dict[str, float]:
    """Load, check against the dataset, evaluate; returns train.evaluate's result + throughput."""
    loaded = load_model(args.checkpoint, args.model_type, args.img_size)
    dataset = args.dataset or loaded.dataset
    if dataset is None:
        raise UserError(
            f"Which dataset should {args.checkpoint} be evaluated on? Pass --dataset "
            f"(one of {', '.join(DATASETS)})."
        )
    model = loaded.model
    test_set, class_names = load_test_set(args, dataset, model.img_size, info)
    if len(class_names) != model.num_classes:
        raise UserError(
            f"{args.checkpoint} predicts {model.num_classes} classes but the {dataset} test set "
            f"has {len(class_names)}; evaluate it on the dataset it was trained for."
        )
    if loaded.class_names and list(loaded.class_names) != list(class_names):
        logger.warning("The dataset's class names differ from those the model was trained with.")
    logger.info(
        "Evaluating %s (%s, %d classes, %dx%d) on the %s test split (%d images, %d process(es)).",
        args.checkpoint,
        model.config.name,
        model.num_classes,
        *model.img_size,
        dataset,
        len(test_set),
        info.world_size,
    )
    model.to(info.device)
    precision = args.precision or loaded.precision or "fp32"
    set_tf32(args.tf32 == "on", info.device)
    shard = ShardSampler(len(test_set), info.rank, info.world_size)
    batch_size = evaluation_batch_size(
        args.eval_batch_size,
        model,
        info.device,
        partial(autocast, precision, info.device),
        cap=len(shard),
        check=True,
    )
    loader = build_eval_loader(test_set, batch_size, args.num_workers, info.rank, info.world_size)
    start = time.perf_counter()
    result = evaluate(model, loader, info.device, precision, progress=info.is_main)
    seconds = time.perf_counter() - start
    result.update(
        images_per_second=result["count"] / max(seconds, 1e-9),
        model_type=model.config.name,
        dataset=dataset,
    )
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Parse flags, evaluate (sharded under torchrun), print the summary on rank 0."""
    args = parse_args(argv)
    info, result = run_distributed(lambda info: run(args, info), args.verbose, args.local_rank)
    if info.is_main:
        lines = [
            f"Checkpoint: {args.checkpoint} ({result['model_type']})",
            f"Dataset: {result['dataset']} test split, {result['count']} images",
            f"Loss: {result['loss']:.4f}",
            f"Top-1 accuracy: {result['accuracy']:.4f}",
        ]
        if "top5" in result:
            lines.append(f"Top-5 accuracy: {result['top5']:.4f}")
        lines.append(f"Throughput: {result['images_per_second']:.1f} images/s")
        print("\n".join(lines))
    return result


if __name__ == "__main__":
    run_cli(main)
