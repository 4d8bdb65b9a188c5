"""Make the README figures in `img/`: attention maps, an image cut into patches, Figure 7.

    python tools/make_figures.py                      # the demo model (`make demo` first)
    python tools/make_figures.py --checkpoint checkpoint/ViT-B_16-224.npz --model_type ViT-B_16

Writes `img/attention_map.png` (prediction, attention rollout and per-layer maps; for the digits
demo model on a held-out digit, otherwise on a photo bundled with scikit-learn) and
`img/patches.png` (that photo resized to 224x224 and cut into the 16x16 patches ViT-B_16 sees)
and `img/figure7.png` (the paper's Figure 7 as `analyze.py` draws it: embedding filters, position
similarity, mean attention distance over 128 held-out digits for a digits model, otherwise over
the two bundled photos).
PNGs over 250 KB are palette-quantised to stay small.

Each PNG carries the numbers it was drawn from (rounded to 5 decimals) in a text chunk named
`make_figures`, and is drawn from exactly those: `redraw(path)` draws it again without the
model, so tests/test_figures.py can tell whether a committed figure is what this code draws now.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, PngImagePlugin

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


DPI = 90
CHUNK = "make_figures"  # the PNG text chunk holding what a figure was drawn from
DECIMALS = 5


def rounded(value):
    """`value` with every array and float as plain lists and numbers rounded to `DECIMALS`."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return np.round(value.astype(np.float64), DECIMALS).tolist()
    if isinstance(value, float | np.floating):
        return round(float(value), DECIMALS)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v) for v in value]
    return value


def figure_image(source: dict) -> Image.Image:
    """The image a figure shows: a held-out digit, a bundled photo, or a file."""
    if "digit" in source:
        return am.sample_digit(source["digit"])[0]
    if "photo" in source:
        return am.sample_image(source["photo"])
    return am.open_image(source["file"])


def draw(name: str, data: dict) -> Figure:
    """Figure `name` of `img/` from the numbers in `data` (what the PNG's chunk holds)."""
    if name == "patches.png":
        return am.plot_patches(figure_image(data["image"]), (224, 224), (16, 16))
    if name == "attention_map.png":
        maps = am.AttentionMaps(
            logits=torch.empty(0),
            rollout=torch.tensor([data["rollout"]]),
            layers=torch.tensor([data["layers"]]),
            layer_kind=data["layer_kind"],
            description=data["description"],
            attentions=[],
        )
        predictions = [(label, p) for label, p in data["predictions"]]
        image = figure_image(data["image"])
        return am.plot_attention(image, maps, predictions=predictions, title=data["title"])
    if name == "figure7.png":
        results = [analysis_from_json(r) for r in data["results"]]
        return analysis.plot_figure7(results, title=data["title"])
    raise ValueError(f"no figure called {name!r}")


def analysis_from_json(facts: dict) -> analysis.Analysis:
    """The reverse of `Analysis.to_json`."""
    arrays = ("mean_attention_distance", "position_similarity", "embedding_components",
              "explained_variance_ratio")  # fmt: skip
    return analysis.Analysis(
        label=facts["label"],
        model_type=facts["model_type"],
        img_size=tuple(facts["img_size"]),
        patch_size=tuple(facts["patch_size"]),
        grid=tuple(facts["grid"]),
        num_prefix_tokens=facts["num_prefix_tokens"],
        num_images=facts["num_images"],
        **{k: None if facts[k] is None else np.asarray(facts[k]) for k in arrays},
    )


def encode_png(fig: Figure, dpi: int, data: dict, max_bytes: int = 250_000) -> bytes:
    """`fig` as PNG bytes with `data` in its text chunk; 256 colours when the RGB file would
    exceed `max_bytes`."""
    with Image.open(io.BytesIO(render_figure(fig, "png", dpi))) as image:
        rgb = image.convert("RGB")
    chunk = PngImagePlugin.PngInfo()
    chunk.add_text(CHUNK, json.dumps(data, separators=(",", ":")), zip=True)
    encoded = io.BytesIO()
    rgb.save(encoded, format="png", optimize=True, pnginfo=chunk)
    if encoded.tell() > max_bytes:
        encoded = io.BytesIO()
        rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            encoded, format="png", optimize=True, pnginfo=chunk
        )
    return encoded.getvalue()


def save_png(path: Path, data: dict, dpi: int) -> None:
    """Draw figure `path.name` from `data` (rounded first, as the chunk keeps it) and write it
    atomically."""
    data = rounded({**data, "dpi": dpi})
    encoded = encode_png(draw(path.name, data), dpi, data)
    write_output(path, lambda handle: handle.write(encoded), flag="--output_dir")
    logger.info("wrote %s (%.0f KB)", path, len(encoded) / 1024)


def redraw(path: str | Path) -> bytes:
    """A figure this script wrote, drawn again from the numbers in its chunk (same size)."""
    with Image.open(path) as image:
        if CHUNK not in image.info:
            raise ValueError(f"{path} has no {CHUNK!r} chunk: this script did not draw it")
        data = json.loads(image.info[CHUNK])
    return encode_png(draw(Path(path).name, data), data["dpi"], data)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", default=am.DEMO_CHECKPOINT, help="Official .npz or .bin.")
    p.add_argument("--model_type", choices=model_names(), default=None)
    p.add_argument("--image", default=None, help="Image for the attention figure.")
    p.add_argument("--output_dir", default="img")
    p.add_argument("--dpi", type=positive_int, default=DPI)
    args = p.parse_args(argv)
    if not Path(args.checkpoint).exists():  # a file, or a Hugging Face folder
        raise UserError(
            f"Checkpoint {args.checkpoint} does not exist: run `make demo` first, or pass "
            "--checkpoint (an official .npz or a .bin that train.py saved)."
        )
    out = Path(args.output_dir)
    for name in ("patches.png", "attention_map.png", "figure7.png"):
        check_output(out / name, flag="--output_dir", overwrite=True)  # the figures are redrawn
    photo = {"photo": "china.jpg"}
    save_png(out / "patches.png", {"image": photo}, args.dpi)

    loaded = load_model(args.checkpoint, args.model_type)
    if args.image:
        source, name = {"file": args.image}, Path(args.image).stem
    elif loaded.dataset == "digits":
        source = {"digit": 0}
        name = f"held-out digit {am.sample_digit(0)[1]}"
    else:
        source, name = photo, "scikit-learn sample photo"
    image = figure_image(source)
    maps = am.compute_attention_maps(loaded.model, am.preprocess([image], loaded.img_size))
    attention = {
        "image": source,
        "title": f"{name}: {loaded.model_type} ({Path(args.checkpoint).name})",
        "predictions": top_k(maps.logits, 5, loaded.class_names)[0],
        "rollout": maps.rollout[0],
        "layers": maps.layers[0],
        "layer_kind": maps.layer_kind,
        "description": maps.description,
    }
    save_png(out / "attention_map.png", attention, args.dpi)

    batches, described = analysis.bundled_batches(loaded.dataset, num_images=128, batch_size=8)
    logger.info("Figure 7: attention distance over %s", described)
    label = Path(args.checkpoint).name
    result = analysis.analyze_model(loaded.model, label, batches(loaded.img_size))
    data = {"title": f"{loaded.model_type} ({label})", "results": [result.to_json()]}
    save_png(out / "figure7.png", data, args.dpi)


if __name__ == "__main__":
    run_cli(main)
