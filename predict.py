"""Predict the classes of images with a trained or official Vision Transformer.

    python predict.py --checkpoint output/NAME_checkpoint.bin --image photos/ cat.jpg
    python predict.py --checkpoint output/NAME_checkpoint.bin --image 'photos/**/*.jpg' \
        --output output/preds.csv --top_k 5
    python predict.py --checkpoint checkpoint/ViT-B_16-224.npz --image photos/ \
        --output output/preds.json
    python predict.py --checkpoint output/NAME_checkpoint.bin --dataset hf --data_dir my_table \
        --output output/preds.csv
    torchrun --nproc_per_node 4 predict.py --checkpoint ... --image ... --output output/preds.csv

`--image` takes files, folders (searched recursively for image files) and glob patterns; or
`--dataset` names a split of a dataset train.py reads (`--split test` by default: an image
folder's `val/` or `test/`, a Hugging Face table's test split, CIFAR's, the digits'), each
image named by its file or, in a table, by its row. The images go through eval.py's test-time
preprocessing (`utils.data.loaders.build_transforms`) in batches, read by DataLoader workers.
Class names come from the checkpoint (a train.py sidecar or an exported `.safetensors`;
ImageNet-1k names for 1000-class heads); unknown ones print as indices. `--output` ends in
`.csv` (path, label_i, probability_i for i = 1..k, error) or `.json`; without it a table is
printed; an existing output is replaced only with `--overwrite` (never the checkpoint's
sidecar). An image that cannot be read is reported with the reason and skipped. Under
`torchrun`, process r takes images r, r + N, r + 2N, ... and process 0 writes one output in
input order.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # Ctrl+C while the modules below load: exit 130, no traceback
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(128 + signum))

from utils.data.registry import DATASETS, Columns, add_column_flags
from utils.infra.errors import run_cli
from utils.infra.flags import (
    HelpFormatter,
    add_model_flags,
    add_process_flags,
    add_tf32_flag,
    add_verbose,
    parse_first,
    positive_int,
)

logger = logging.getLogger("predict")

OUTPUT_FORMATS = (".csv", ".json")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="train.py's output/<name>_checkpoint.bin, an exported .safetensors, or an official "
        ".npz.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--image",
        nargs="+",
        help="Image files, folders (searched recursively) and glob patterns (quote them).",
    )
    source.add_argument(
        "--dataset",
        choices=DATASETS,
        help="Or the images of a dataset's split (--split), read as train.py and eval.py read "
        "it: an image folder, a Hugging Face table (hf), cifar10/100 or digits.",
    )
    p.add_argument(
        "--data_dir",
        default="./data",
        help="With --dataset: the image folder's root, the table, or where CIFAR is.",
    )
    p.add_argument(
        "--split", choices=("test", "train"), default="test", help="With --dataset: which split."
    )
    add_column_flags(p)
    p.add_argument(
        "--output", default=None, help="output/preds.csv or output/preds.json (default: print)."
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an existing --output file (never the checkpoint or its sidecar).",
    )
    p.add_argument("--top_k", type=positive_int, default=5, help="Classes per image.")
    p.add_argument(
        "--batch_size", type=positive_int, default=64, help="Images per batch and process."
    )
    add_process_flags(p, workers="Image-reading")
    add_model_flags(p)
    add_tf32_flag(p)
    add_verbose(p)
    args = p.parse_args(argv)
    if args.output and Path(args.output).suffix.lower() not in OUTPUT_FORMATS:
        p.error(f"--output must end in {' or '.join(OUTPUT_FORMATS)}, got {args.output}")
    if args.output and Path(args.output).is_dir():
        p.error(f"--output {args.output} is a directory; pass a file, e.g. preds.csv")
    return args


if __name__ == "__main__":
    parse_first(parse_args)  # --help and a mistyped flag answer before torch loads

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from utils.data.loaders import build_split, build_transforms
from utils.data.preprocessing import (
    BadImageError,
    UnreadableImages,
    find_images,
    read_image,
    to_rgb,
)
from utils.evals.classification import top_k
from utils.infra.console import interactive
from utils.infra.dist_utils import DistInfo, main_process_first, run_distributed
from utils.infra.file_io import check_output, checkpoint_files, write_output
from utils.infra.loading import load_model
from utils.recipe.amp import set_tf32

# --------------------------------------------------------------------------------------------
# Finding and reading images


@dataclass
class Item:
    """One image of the input list: its tensor, or the reason it could not be read."""

    index: int
    image: torch.Tensor | None
    error: str | None


class Images:
    """The input images: their names, and each one read as 8-bit RGB by its index (decoded in
    full, so that truncation shows; `BadImageError` when it cannot be read)."""

    def __init__(
        self, paths: Sequence[Path] | None = None, split: Dataset | None = None, name: str = ""
    ):
        self.paths, self.split = paths, split
        if split is None:
            self.names = [str(path) for path in paths]
        elif isinstance(split, UnreadableImages):  # an image folder or a table
            self.names = [split.image_name(i) for i in range(len(split))]
        else:  # held in memory (CIFAR, digits): named by their place
            self.names = [f"{name} #{i}" for i in range(len(split))]

    def read(self, index: int) -> Image.Image:
        if self.split is None:
            return read_image(self.paths[index])
        if isinstance(self.split, UnreadableImages):
            return self.split.decode(index)
        image, _ = self.split[index]
        return to_rgb(image if isinstance(image, Image.Image) else Image.fromarray(image))


class ImageFiles:
    """The images at `indices`, preprocessed; one that cannot be read gives an `Item` with the
    reason. A map-style dataset (`__getitem__`, `__len__`) for a `DataLoader`."""

    def __init__(
        self,
        images: Images,
        indices: Sequence[int],
        transform: Callable[[Image.Image], torch.Tensor],
    ):
        self.images = images
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Item:
        try:
            rgb = self.images.read(self.indices[i])
        except BadImageError as err:  # reported, never fatal
            return Item(self.indices[i], None, err.reason)
        return Item(self.indices[i], self.transform(rgb), None)


def dataset_images(args: argparse.Namespace, info: DistInfo) -> Images:
    """The images of `--dataset`'s `--split` (downloaded first where CIFAR is missing, by the
    first process of each node)."""
    with main_process_first(info.local_rank):
        split, _ = build_split(
            args.dataset,
            args.data_dir,
            train=args.split == "train",
            download=info.local_rank == 0,
            columns=Columns(args.image_column, args.label_column),
        )
    return Images(split=split, name=f"{args.dataset} {args.split}")


def collate_readable(items: list[Item]) -> tuple[list[int], torch.Tensor | None, list[Item]]:
    """(indices of the readable images, their batch or None, the unreadable items)."""
    readable = [item for item in items if item.image is not None]
    batch = torch.stack([item.image for item in readable]) if readable else None
    return [item.index for item in readable], batch, [i for i in items if i.image is None]


# --------------------------------------------------------------------------------------------
# Prediction


def predict(
    args: argparse.Namespace, paths: list[Path] | None, info: DistInfo
) -> tuple[list[dict] | None, int]:
    """Every process's records in input order on process 0 (None elsewhere), and the class
    count; each process predicts its share of `paths`, or of `--dataset`'s split."""
    images = Images(paths) if paths is not None else dataset_images(args, info)
    names = images.names
    loaded = load_model(args.checkpoint, args.model_type, args.img_size)
    model = loaded.model.to(info.device)
    set_tf32(args.tf32 == "on", info.device)
    classes = loaded.class_names  # the sidecar's, or the dataset's known names
    if info.is_main:
        logger.info(
            "%s (%s, %dx%d, %d classes, %s) on %d image(s), %d process(es).",
            args.checkpoint,
            loaded.model_type,
            *loaded.img_size,
            model.num_classes,
            "class names known" if classes else "class names unknown: showing indices",
            len(names),
            info.world_size,
        )
    indices = list(range(info.rank, len(names), info.world_size))
    dataset = ImageFiles(images, indices, build_transforms(loaded.img_size, train=False))
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        collate_fn=collate_readable,
        pin_memory=info.device.type == "cuda",
    )
    records: dict[int, dict] = {}
    with torch.inference_mode():
        for batch_indices, images, unreadable in tqdm(
            loader, desc="predict", unit="batch", disable=not (info.is_main and interactive())
        ):
            for item in unreadable:
                records[item.index] = {"path": names[item.index], "error": item.error}
            if images is None:
                continue
            logits = model(images.to(info.device, non_blocking=True))[0].float().cpu()
            for index, best in zip(batch_indices, top_k(logits, args.top_k, classes), strict=True):
                records[index] = {
                    "path": names[index],
                    "labels": [label for label, _ in best],
                    "probabilities": [round(prob, 6) for _, prob in best],  # as the CSV
                }
    return gather(records, info), model.num_classes


def gather(records: dict[int, dict], info: DistInfo) -> list[dict] | None:
    """Every process's records in input order, on process 0 (None elsewhere)."""
    if not info.distributed:
        return [records[i] for i in sorted(records)]
    everyone: list[dict[int, dict] | None] = [None] * info.world_size
    dist.all_gather_object(everyone, records)
    if not info.is_main:
        return None
    merged = {index: record for part in everyone for index, record in part.items()}
    return [merged[i] for i in sorted(merged)]


# --------------------------------------------------------------------------------------------
# Output


def to_csv(records: list[dict], k: int) -> str:
    """path, label_1, probability_1, ..., label_k, probability_k, error."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    ranks = [(f"label_{i}", f"probability_{i}") for i in range(1, k + 1)]
    writer.writerow(["path", *(name for pair in ranks for name in pair), "error"])
    for record in records:
        pairs = zip(record.get("labels", []), record.get("probabilities", []), strict=True)
        cells = [cell for label, prob in pairs for cell in (label, f"{prob:.6f}")]
        cells += [""] * (2 * k - len(cells))
        writer.writerow([record["path"], *cells, record.get("error", "")])
    return out.getvalue()


def to_json(records: list[dict], args: argparse.Namespace) -> str:
    """{"checkpoint", "top_k", "predictions": [{path, labels, probabilities} or {path, error}]}."""
    document = {"checkpoint": str(args.checkpoint), "top_k": args.top_k, "predictions": records}
    return json.dumps(document, indent=2) + "\n"


def to_table(records: list[dict]) -> str:
    """One line per image: the path, then `label (probability)` for each of the top k."""
    width = max(len(record["path"]) for record in records)
    lines = []
    for record in records:
        if "error" in record:
            shown = f"unreadable: {record['error']}"
        else:
            pairs = zip(record["labels"], record["probabilities"], strict=True)
            shown = "  ".join(f"{label} ({prob:.3f})" for label, prob in pairs)
        lines.append(f"{record['path']:<{width}}  {shown}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Entry point


def main(argv: Sequence[str] | None = None) -> list[dict] | None:
    """Parse flags, predict (split over processes under torchrun), write or print on process 0.

    Returns:
        The records in input order on process 0, None on the others.
    """
    args = parse_args(argv)
    paths = find_images(args.image) if args.image else None  # before joining: a typo fails now
    if args.output:
        check_output(
            args.output, overwrite=args.overwrite, inputs=checkpoint_files(args.checkpoint)
        )

    _, (everything, num_classes) = run_distributed(
        lambda info: predict(args, paths, info), args.verbose, args.local_rank
    )
    if everything is None:
        return None
    skipped = [record for record in everything if "error" in record]
    for record in skipped:
        logger.warning("Skipped %s: %s", record["path"], record["error"])
    if args.output:
        suffix = Path(args.output).suffix.lower()
        k = min(args.top_k, num_classes)
        text = to_csv(everything, k) if suffix == ".csv" else to_json(everything, args)
        write_output(args.output, lambda handle: handle.write(text.encode("utf-8")))
        print(
            f"Wrote predictions for {len(everything) - len(skipped)} image(s) to {args.output}"
            + (f"; {len(skipped)} unreadable file(s) skipped (listed there)." if skipped else ".")
        )
    else:
        print(to_table(everything))
    return everything


if __name__ == "__main__":
    run_cli(main)
