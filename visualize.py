"""Predict and draw attention maps for images: top-5 classes, attention rollout, per-layer maps.

    python visualize.py --model_type ViT-B_16 --checkpoint checkpoint/ViT-B_16-224.npz \\
        --image cat.jpg --output output/attention/cat.png

`--checkpoint` takes an official `.npz` or a `.bin` that train.py saved (its `.json` sidecar
supplies model type, image size and class names; flags override it; at another `--img_size` the
position embeddings are resized as vit_jax resizes them). `--image` takes files, folders (with
their sub-folders) and globs, as predict.py does; an unreadable file is skipped and named.
Without it a photo bundled with scikit-learn is used (plus a held-out digit for a model trained
on scikit-learn's digits, such as the demo model), so the command runs offline.
Figures go to `output/attention/` unless `--output` says otherwise; with several images, one
figure per image is written, named `<output stem>_<image stem><suffix>`. Attention rollout
follows Abnar & Zuidema (2020); see `utils/evals/attention_maps.py`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

if __name__ == "__main__":  # Ctrl+C while the modules below load: exit 130, no traceback
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(128 + signum))

from matplotlib.backend_bases import FigureCanvasBase

from utils.infra.errors import UserError, run_cli
from utils.infra.flags import (
    HelpFormatter,
    add_model_flags,
    add_verbose,
    parse_first,
    positive_int,
    setup_logging,
)

logger = logging.getLogger("visualize")

SAMPLE_PHOTO = "china.jpg"
DEFAULT_OUTPUT = "output/attention/attention.png"  # output/ is kept out of git


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--checkpoint",
        default=None,
        help="Official .npz or train.py .bin. Default: the demo model `make demo` trains.",
    )
    add_model_flags(p, height_width=True)
    p.add_argument(
        "--image",
        nargs="+",
        default=None,
        help="Image files, folders (searched recursively) and glob patterns (default: a photo "
        "bundled with scikit-learn).",
    )
    p.add_argument(
        "--output", default=DEFAULT_OUTPUT, help="Figure file (.png, .jpg, .pdf, .svg, ...)."
    )
    p.add_argument("--top_k", type=positive_int, default=5, help="Predictions to print per image.")
    p.add_argument(
        "--layer_maps",
        choices=("raw", "rollout"),
        default="raw",
        help="Per-layer maps: each layer's head-mean attention, or the rollout up to it.",
    )
    p.add_argument("--dpi", type=positive_int, default=100, help="Figure resolution.")
    add_verbose(p)
    args = p.parse_args(argv)

    formats = FigureCanvasBase.get_supported_filetypes()
    if Path(args.output).suffix.lower().lstrip(".") not in formats:
        p.error(
            f"--output {args.output}: the file name must end in a figure format matplotlib "
            f"writes: {', '.join('.' + f for f in sorted(formats))}"
        )
    return args


if __name__ == "__main__":
    parse_first(parse_args)  # --help and a mistyped flag answer before torch loads

import matplotlib
from PIL import Image

from utils.data.preprocessing import find_images, readable_images
from utils.evals import attention_maps as am
from utils.evals.classification import top_k
from utils.infra.figures import save_figure
from utils.infra.file_io import check_output, checkpoint_files
from utils.infra.loading import load_model


def output_paths(output: str, names: list[str]) -> list[Path]:
    """`output` itself for one image; `<stem>_<image name><suffix>` for each of several."""
    path = Path(output)
    if len(names) == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{name}{path.suffix}") for name in names]


def gather_images(
    args: argparse.Namespace, dataset: str | None
) -> tuple[list[str], Iterator[tuple[int, Image.Image]], list[Path]]:
    """The names of the images, one figure each, (index, image) for each image that can be
    read, read one at a time, and the files read: `--image`'s files (by `find_images`' rule; an
    unreadable one is skipped and named) or the bundled sample photo (no file of the user's).

    Without `--image`, a model fine-tuned on scikit-learn's digits also gets a held-out digit,
    so that its predictions mean something.
    """
    if not args.image:
        logger.info("no --image given: using scikit-learn's sample photo %s", SAMPLE_PHOTO)
        images = [(Path(SAMPLE_PHOTO).stem, am.sample_image(SAMPLE_PHOTO))]
        if dataset == "digits":
            digit, label = am.sample_digit()
            images.append((f"digit_{label}", digit))
        return [name for name, _ in images], enumerate(image for _, image in images), []
    paths = find_images(args.image)
    stems = [p.stem for p in paths]
    names = [p.stem if stems.count(p.stem) == 1 else f"{p.stem}_{i}" for i, p in enumerate(paths)]
    return names, readable_images(paths), paths


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.verbose)
    matplotlib.use("Agg")  # files only, never a window
    checkpoint = args.checkpoint or am.demo_checkpoint()
    loaded = load_model(checkpoint, args.model_type, args.img_size)
    logger.info(
        "%s from %s at %dx%d %s, %s",
        loaded.model_type,
        loaded.source,
        *loaded.img_size,
        loaded.info or "",
        "class names known" if loaded.class_names else "class names unknown (showing indices)",
    )
    names, images, sources = gather_images(args, loaded.dataset)
    paths = output_paths(args.output, names)
    inputs = [*checkpoint_files(checkpoint), *sources]
    for path in paths:  # before any work; a figure is redrawn in place, an input never replaced
        check_output(path, overwrite=True, inputs=inputs)
    written = 0
    for index, image in images:
        name, path = names[index], paths[index]
        batch = am.preprocess([image], loaded.img_size)  # (1, 3, H, W)
        maps = am.compute_attention_maps(loaded.model, batch, layer_kind=args.layer_maps)
        predictions = top_k(maps.logits, args.top_k, loaded.class_names)[0]
        print(f"{name}:")
        for rank, (label, prob) in enumerate(predictions, start=1):
            print(f"  {rank}. {prob:6.1%}  {label}")
        fig = am.plot_attention(
            image, maps, predictions=predictions, title=f"{name} — {loaded.model_type}"
        )
        save_figure(path, fig, args.dpi)
        logger.info("wrote %s", path)
        written += 1
    if not written:
        raise UserError(
            f"None of the {len(names)} image(s) could be read (each is named above): pass "
            "image files PIL decodes."
        )
    skipped = len(names) - written
    logger.log(
        logging.WARNING if skipped else logging.INFO, "%d figure(s) for %d image(s)%s",
        written, len(names), f"; {skipped} unreadable image(s) skipped" if skipped else "",
    )  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
