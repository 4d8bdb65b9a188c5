"""Figure 7 of the paper for a checkpoint: embedding filters, position embeddings, distances.

    python analyze.py                          # the demo model (`make demo` first), offline
    python analyze.py --checkpoint checkpoint/ViT-B_16.npz --image photos/ --num_images 128
    python analyze.py --checkpoint checkpoint/ViT-B_16.npz output/NAME_checkpoint.bin \\
        --dataset cifar10                       # before and after fine-tuning, in one figure

Section 4.5 and Appendix D.7 of Dosovitskiy et al. (ICLR 2021): the principal components of the
patch-embedding filters, the cosine similarity of the position embeddings, and each head's mean
attention distance in pixels over `--num_images` images (128, as the paper). The class token's
row and column are left out of the distance without renormalising; see `utils/evals/analysis.py`.

`--checkpoint` takes one file or two (any file `utils.infra.loading.load_model` reads: an
official or AugReg `.npz`, a train.py `.bin`, a `_last.pt`, a `.safetensors`); with two, every
figure shows both (same image size and patch grid needed for the side-by-side). `none` with
`--model_type` analyses a randomly initialised model (for timing, or as a baseline). Images come
from `--image` (files, folders with their sub-folders, globs, as predict.py takes them) or
`--dataset` (its test split); without either, a digits model gets held-out digits and any other
model scikit-learn's two sample photos. An unreadable image is skipped and named, and the count
used is said (a warning when it is fewer than `--num_images`).

Writes to `--output_dir`: `figure7.png` (the panels side by side), `embedding_filters.png`,
`position_similarity.png`, `attention_distance.png` (`--format` picks another matplotlib
format) and `analysis.json` with the numbers (with two checkpoints, one
`analysis_<file stem>.json` each).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

if __name__ == "__main__":  # Ctrl+C while the modules below load: exit 130, no traceback
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(128 + signum))

from matplotlib.backend_bases import FigureCanvasBase

from utils.data.registry import DATASETS, Columns, add_column_flags
from utils.infra.errors import UserError, run_cli
from utils.infra.flags import (
    HelpFormatter,
    add_model_flags,
    add_tf32_flag,
    add_verbose,
    parse_first,
    positive_int,
    setup_logging,
)

logger = logging.getLogger("analyze")

PANELS = ("filters", "position", "distance")
FIGURES = {  # file stem -> the panel it needs
    "embedding_filters": "filters",
    "position_similarity": "position",
    "attention_distance": "distance",
}
DEFAULT_OUTPUT_DIR = "output/analysis"  # output/ is kept out of git


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--checkpoint",
        nargs="+",
        default=None,
        metavar="FILE",
        help="One checkpoint, or two (before and after fine-tuning); `none` for random weights. "
        "Default: the demo model `make demo` trains.",
    )
    add_model_flags(p, height_width=True)
    p.add_argument(
        "--image", nargs="+", default=None, help="Image files, folders or globs for the distance."
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default=None,
        help="Take the distance's images from its test split.",
    )
    p.add_argument("--data_dir", default="./data", help="Where --dataset lives (as eval.py).")
    add_column_flags(p)
    p.add_argument(
        "--num_images", type=positive_int, default=128, help="Images for the attention distance."
    )
    p.add_argument("--batch_size", type=positive_int, default=8, help="Images per forward pass.")
    p.add_argument(
        "--num_components", type=positive_int, default=28, help="Embedding-filter components."
    )
    p.add_argument(
        "--panels",
        nargs="+",
        choices=PANELS,
        default=None,
        help="Default: every panel the model has.",
    )
    p.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help="Where figures and JSON go.")
    p.add_argument("--format", default="png", help="Figure format (png, pdf, svg, jpg, ...).")
    p.add_argument("--dpi", type=positive_int, default=100, help="Figure resolution.")
    add_tf32_flag(p)
    add_verbose(p)
    args = p.parse_args(argv)
    if args.checkpoint is not None and len(args.checkpoint) > 2:
        p.error("--checkpoint takes one file or two (before and after fine-tuning)")
    if args.image and args.dataset:
        p.error("--image and --dataset both give images: pass one of them")
    formats = FigureCanvasBase.get_supported_filetypes()
    args.format = args.format.lower().lstrip(".")
    if args.format not in formats:
        p.error(
            f"--format {args.format}: not a format matplotlib writes; one of "
            f"{', '.join(sorted(formats))}"
        )
    return args


if __name__ == "__main__":
    parse_first(parse_args)  # --help and a mistyped flag answer before torch loads

import matplotlib
import torch

from models.modeling import VisionTransformer
from utils.data.preprocessing import find_images, readable_images
from utils.evals import analysis
from utils.evals.attention_maps import demo_checkpoint
from utils.infra.figures import save_figure
from utils.infra.file_io import check_output, checkpoint_files, write_output
from utils.infra.loading import LoadedModel, check_finite_weights, load_model
from utils.infra.run_files import check_folder
from utils.recipe.amp import set_tf32


def is_random(checkpoint: str) -> bool:
    return checkpoint.lower() == "none"


def load(checkpoint: str, args: argparse.Namespace) -> LoadedModel:
    """The model of a checkpoint, or a randomly initialised one for `none`."""
    if not is_random(checkpoint):
        loaded = load_model(checkpoint, args.model_type, args.img_size)
        check_finite_weights(loaded)  # before the SVD of its patch embedding
        return loaded
    if args.model_type is None:
        raise UserError("--checkpoint none (random weights) needs --model_type.")
    logger.warning(
        "--checkpoint none: %s with random weights; its numbers describe no trained model.",
        args.model_type,
    )
    torch.manual_seed(0)
    model = VisionTransformer(args.model_type, args.img_size or 224, num_classes=1000)
    return LoadedModel(model.eval(), args.model_type, model.img_size, source="none")


def labels_of(checkpoints: list[str]) -> list[str]:
    """Figure labels: the file names, with the folder too when two names are the same."""
    names = [Path(c).name for c in checkpoints]
    if len(set(names)) < len(names):
        names = [str(Path(c)) for c in checkpoints]
    return [
        "random weights" if is_random(c) else n for c, n in zip(checkpoints, names, strict=True)
    ]


def json_paths(output_dir: Path, checkpoints: list[str]) -> list[Path]:
    """`analysis.json` for one checkpoint; `analysis_<stem>.json` each for two."""
    if len(checkpoints) == 1:
        return [output_dir / "analysis.json"]
    stems = [Path(c).stem for c in checkpoints]
    if stems[0] == stems[1]:
        stems = [f"{s}_{i}" for i, s in enumerate(stems, start=1)]
    return [output_dir / f"analysis_{s}.json" for s in stems]


def chosen_panels(args: argparse.Namespace, loaded: list[LoadedModel]) -> tuple[str, ...]:
    """The panels asked for, or all that every model has; a hybrid has no RGB filters."""
    hybrids = [m.model_type for m in loaded if not analysis.embeds_rgb(m.model)]
    if args.panels is None:
        if hybrids:
            logger.info(
                "%s embeds ResNet features, not RGB patches: no embedding-filter panel.",
                hybrids[0],
            )
        return tuple(p for p in PANELS if p != "filters" or not hybrids)
    if "filters" in args.panels and hybrids:
        raise UserError(
            f"--panels filters: {hybrids[0]} is a hybrid, whose patch embedding sees ResNet "
            "features, not RGB pixels, so it has no RGB filters to show. Leave out filters."
        )
    return tuple(p for p in PANELS if p in args.panels)


def check_side_by_side(
    loaded: list[LoadedModel], labels: list[str], panels: tuple[str, ...]
) -> None:
    """Two checkpoints drawn side by side must share their patch grid (and filter shape)."""
    if len(loaded) < 2:
        return
    (a, b), (la, lb) = loaded, labels
    if "position" in panels and a.model.grid_size != b.model.grid_size:
        raise UserError(
            f"{la} has a {'x'.join(map(str, a.model.grid_size))} patch grid and {lb} a "
            f"{'x'.join(map(str, b.model.grid_size))} one, so their position embeddings cannot "
            "be compared: pass --img_size so that both load at one size (position embeddings "
            "are resized to it)."
        )
    shapes = [tuple(m.model.embeddings.patch_embed.weight.shape[1:]) for m in loaded]
    if "filters" in panels and shapes[0] != shapes[1]:
        raise UserError(
            f"{la} has {shapes[0]} embedding filters and {lb} {shapes[1]}: they cannot be "
            "compared side by side. Pass --panels position distance."
        )


def image_source(args: argparse.Namespace, loaded: list[LoadedModel], paths: list[Path]):
    """A function img_size -> batches of the distance's images (`paths`, the files `--image`
    names, when it is given), and a description."""
    if args.image:
        described = f"up to {args.num_images} readable of {len(paths)} image file(s)"

        def batches(size: tuple[int, int]) -> Iterator[torch.Tensor]:
            images = (image for _, image in readable_images(paths))  # an unreadable one: named
            first = itertools.islice(images, args.num_images)
            return analysis.image_batches(first, size, args.batch_size)

        return batches, described
    if args.dataset:
        described = f"the first {args.num_images} readable images of the {args.dataset} test split"
        return (
            lambda size: analysis.dataset_batches(
                args.dataset,
                args.data_dir,
                size,
                args.num_images,
                args.batch_size,
                Columns(args.image_column, args.label_column),
            ),
            described,
        )
    dataset = "digits" if any(m.dataset == "digits" for m in loaded) else None
    return analysis.bundled_batches(dataset, args.num_images, args.batch_size)


def output_paths(args: argparse.Namespace, checkpoints: list[str]) -> list[Path]:
    """Every file `write_outputs` may write: the JSON of each checkpoint and each figure."""
    out = Path(args.output_dir)
    figures = ["figure7", *FIGURES]
    return json_paths(out, checkpoints) + [out / f"{stem}.{args.format}" for stem in figures]


def write_outputs(
    results: list[analysis.Analysis],
    args: argparse.Namespace,
    checkpoints: list[str],
    panels: tuple[str, ...],
) -> None:
    out = Path(args.output_dir)
    for result, path, checkpoint in zip(
        results, json_paths(out, checkpoints), checkpoints, strict=True
    ):
        facts = {"checkpoint": None if is_random(checkpoint) else checkpoint, **result.to_json()}
        text = (json.dumps(facts) + "\n").encode()
        write_output(path, lambda handle, text=text: handle.write(text), "--output_dir")
        logger.info("wrote %s", path)
    plots = {
        "embedding_filters": analysis.plot_embedding_filters,
        "position_similarity": analysis.plot_position_similarity,
        "attention_distance": analysis.plot_attention_distance,
    }
    title = " vs ".join(r.label for r in results) + f" ({results[0].model_type})"
    figures = {"figure7": analysis.plot_figure7(results, title=title)}
    figures.update(
        {stem: plots[stem](results) for stem, panel in FIGURES.items() if panel in panels}
    )
    for stem, fig in figures.items():
        path = out / f"{stem}.{args.format}"
        save_figure(path, fig, args.dpi, "--output_dir")
        logger.info("wrote %s", path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.verbose)
    matplotlib.use("Agg")  # files only, never a window
    checkpoints = args.checkpoint or [demo_checkpoint()]
    check_folder(Path(args.output_dir), "--output_dir")
    inputs = [f for c in checkpoints if not is_random(c) for f in checkpoint_files(c)]
    images = find_images(args.image) if args.image else []
    inputs += images
    for path in output_paths(args, checkpoints):  # a file is redrawn in place, an input never
        check_output(path, "--output_dir", overwrite=True, inputs=inputs)
    labels = labels_of(checkpoints)
    loaded = [load(c, args) for c in checkpoints]
    panels = chosen_panels(args, loaded)
    check_side_by_side(loaded, labels, panels)
    batches, described = image_source(args, loaded, images) if "distance" in panels else (None, "")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_tf32(args.tf32 == "on", device)
    results = []
    for model, label in zip(loaded, labels, strict=True):
        logger.info(
            "%s: %s at %dx%d, %dx%d patch grid",
            label,
            model.model_type,
            *model.img_size,
            *model.model.grid_size,
        )
        if batches is not None:
            logger.info("attention distance over %s, on %s", described, device)
        start = time.perf_counter()
        result = analysis.analyze_model(
            model.model.to(device),
            label,
            batches(model.img_size) if batches is not None else None,
            num_components=args.num_components,
            panels=panels,
        )
        if result.num_images:
            short = result.num_images < args.num_images
            fewer = f", fewer than --num_images {args.num_images}: no more readable images"
            logger.log(
                logging.WARNING if short else logging.INFO,
                "mean attention distance over %d images in %.1f s%s",
                result.num_images,
                time.perf_counter() - start,
                fewer if short else "",
            )
        model.model.cpu()
        results.append(result)
    write_outputs(results, args, checkpoints, panels)


if __name__ == "__main__":
    run_cli(main)
