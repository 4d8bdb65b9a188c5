"""Make the README figures in `img/`: attention maps, an image cut into patches, Figure 7.

    python3 tools/make_figures.py                      # the demo model (`make demo` first)
    python3 tools/make_figures.py --checkpoint checkpoint/ViT-B_16-224.npz --model_type ViT-B_16

Writes `img/attention_map.png` (prediction, attention rollout and per-layer maps; for the digits
demo model on a held-out digit, otherwise on a photo bundled with scikit-learn) and
`img/patches.png` (that photo resized to 224x224 and cut into the 16x16 patches ViT-B_16 sees)
and `img/figure7.png` (the paper's Figure 7 as `analyze.py` draws it: embedding filters, position
similarity, mean attention distance over 128 held-out digits for a digits model, otherwise over
the two bundled photos).
PNGs over 250 KB are palette-quantised to stay small.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

from matplotlib.figure import Figure
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

from models.configs import model_names
from utils.evals import analysis
from utils.evals import attention_maps as am
from utils.evals.classification import top_k
from utils.infra.errors import UserError, run_cli
from utils.infra.figures import render_figure
from utils.infra.file_io import check_output, write_output
from utils.infra.flags import positive_int, setup_logging
from utils.infra.loading import load_model

logger = logging.getLogger("make_figures")


def save_png(fig: Figure, path: Path, dpi: int, max_bytes: int = 250_000) -> None:
    """Save `fig` as a PNG, atomically; 256 colours when the RGB file would exceed `max_bytes`."""
    with Image.open(io.BytesIO(render_figure(fig, "png", dpi))) as image:
        rgb = image.convert("RGB")
    encoded = io.BytesIO()
    rgb.save(encoded, format="png", optimize=True)
    if encoded.tell() > max_bytes:
        encoded = io.BytesIO()
        rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            encoded, format="png", optimize=True
        )
    data = encoded.getvalue()
    write_output(path, lambda handle: handle.write(data), flag="--output_dir")
    logger.info("wrote %s (%.0f KB)", path, len(data) / 1024)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", default=am.DEMO_CHECKPOINT, help="Official .npz or .bin.")
    p.add_argument("--model_type", choices=model_names(), default=None)
    p.add_argument("--image", default=None, help="Image for the attention figure.")
    p.add_argument("--output_dir", default="img")
    p.add_argument("--dpi", type=positive_int, default=90)
    args = p.parse_args(argv)
    if not Path(args.checkpoint).exists():  # a file, or a Hugging Face folder
        raise UserError(
            f"Checkpoint {args.checkpoint} does not exist: run `make demo` first, or pass "
            "--checkpoint (an official .npz or a .bin that train.py saved)."
        )
    out = Path(args.output_dir)
    for name in ("patches.png", "attention_map.png"):
        check_output(out / name, flag="--output_dir", overwrite=True)  # the figures are redrawn
    photo = am.sample_image("china.jpg")
    save_png(am.plot_patches(photo, (224, 224), (16, 16)), out / "patches.png", args.dpi)

    loaded = load_model(args.checkpoint, args.model_type)
    if args.image:
        image, name = am.open_image(args.image), Path(args.image).stem
    elif loaded.dataset == "digits":
        image, label = am.sample_digit()
        name = f"held-out digit {label}"
    else:
        image, name = photo, "scikit-learn sample photo"
    maps = am.compute_attention_maps(loaded.model, am.preprocess([image], loaded.img_size))
    predictions = top_k(maps.logits, 5, loaded.class_names)[0]
    title = f"{name}: {loaded.model_type} ({Path(args.checkpoint).name})"
    fig = am.plot_attention(image, maps, predictions=predictions, title=title)
    save_png(fig, out / "attention_map.png", args.dpi)

    batches, described = analysis.bundled_batches(loaded.dataset, num_images=128, batch_size=8)
    logger.info("Figure 7: attention distance over %s", described)
    label = Path(args.checkpoint).name
    result = analysis.analyze_model(loaded.model, label, batches(loaded.img_size))
    fig = analysis.plot_figure7([result], title=f"{loaded.model_type} ({label})")
    save_png(fig, out / "figure7.png", args.dpi)


if __name__ == "__main__":
    run_cli(main)
