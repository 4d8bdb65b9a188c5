"""The figures in img/ that the README shows are what tools/make_figures.py draws now.

Each PNG carries the numbers it was drawn from; the test draws it again from them with today's
code and compares the decoded pixels. A change of style (colour map, colour bar, axis limits,
titles) that was not followed by `python3 tools/make_figures.py` fails here.
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.evals import attention_maps as am

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("patches.png", "attention_map.png", "figure7.png")


def make_figures():
    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "tools/make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pixels(png: bytes | Path) -> np.ndarray:
    with Image.open(io.BytesIO(png) if isinstance(png, bytes) else png) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def differing_share(a: np.ndarray, b: np.ndarray) -> float:
    """The share of pixels that differ by more than 16 levels in some channel (1.0: sizes
    differ). Text rendered by another FreeType could move a few edge pixels; a changed word of
    a title moves about 0.1 % of a README figure's pixels, a colour map most of them."""
    if a.shape != b.shape:
        return 1.0
    return float((np.abs(a - b).max(axis=-1) > 16).mean())


@pytest.mark.parametrize("name", FIGURES)
def test_a_committed_figure_is_what_make_figures_draws(name, one_thread):
    committed = ROOT / "img" / name
    drawn = make_figures().redraw(committed)
    share = differing_share(pixels(drawn), pixels(committed))
    assert share < 2e-4, (
        f"img/{name} is not what tools/make_figures.py draws now ({share:.2%} of its pixels "
        "differ): run `python tools/make_figures.py` and commit img/."
    )


def test_the_committed_figures_show_what_the_readme_says():
    """The demo model on a held-out digit (and it reads the digit), Figure 7 over 128 digits."""
    chunks = {}
    for name in FIGURES:
        with Image.open(ROOT / "img" / name) as image:
            chunks[name] = json.loads(image.info[make_figures().CHUNK])
    attention = chunks["attention_map.png"]
    assert attention["image"] == {"digit": 0}
    label = am.sample_digit(0)[1]
    assert attention["title"] == f"held-out digit {label}: demo (digits-demo_checkpoint.bin)"
    assert attention["predictions"][0][0] == str(label)
    (result,) = chunks["figure7.png"]["results"]
    assert (result["model_type"], result["num_images"]) == ("demo", 128)
    assert chunks["patches.png"]["image"] == {"photo": "china.jpg"}


def test_the_comparison_sees_a_change_of_style(monkeypatch, one_thread):
    committed = ROOT / "img" / "attention_map.png"
    monkeypatch.setattr(am, "ATTENTION_CMAP", "jet")  # the colour map the figure once had
    drawn = make_figures().redraw(committed)
    assert differing_share(pixels(drawn), pixels(committed)) > 0.1


@pytest.mark.slow
def test_a_figure_keeps_the_numbers_it_was_drawn_from(tmp_path, best_checkpoint, one_thread):
    """make_figures draws from the model's numbers, rounded, and keeps them in the file; drawn
    again from the file, the figure is the same to the byte."""
    from models.modeling import VisionTransformer

    module = make_figures()
    model = VisionTransformer("demo", img_size=32, num_classes=10)
    checkpoint = best_checkpoint(model, name="digits-demo", dataset="digits")
    out = tmp_path / "img"
    module.main(["--checkpoint", str(checkpoint), "--output_dir", str(out), "--dpi", "40"])
    with Image.open(out / "attention_map.png") as image:
        data = json.loads(image.info[module.CHUNK])
    maps = am.compute_attention_maps(model, am.preprocess([am.sample_digit(0)[0]], (32, 32)))
    np.testing.assert_allclose(data["rollout"], maps.rollout[0].numpy(), atol=1e-5)
    assert data["dpi"] == 40
    for name in FIGURES:
        assert module.redraw(out / name) == (out / name).read_bytes()
    Image.new("RGB", (4, 4)).save(tmp_path / "other.png")
    with pytest.raises(ValueError, match="did not draw it"):
        module.redraw(tmp_path / "other.png")
