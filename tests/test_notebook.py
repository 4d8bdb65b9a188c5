"""The attention-map notebook: stored clean, and runs top to bottom headless on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.modeling import VisionTransformer
from models.npz import state_dict_to_npz
from utils.infra.file_io import save_npz

# Optional: a machine without Jupyter's packages (the GPU check's) skips the notebook's tests.
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "visualize_attention_map.ipynb"


def read_notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def with_parameters(nb: nbformat.NotebookNode, source: str) -> nbformat.NotebookNode:
    """Replace the cell tagged `parameters` (there must be exactly one)."""
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "the notebook needs one cell tagged 'parameters'"
    cells[0].source = source
    return nb


def execute(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    return nb


def outputs_text(nb: nbformat.NotebookNode) -> str:
    return "".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
    )


def images_shown(nb: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in out.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )


def test_notebook_is_stored_without_outputs():
    nb = read_notebook()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == []
        assert cell.execution_count is None


@pytest.mark.slow
def test_notebook_runs_on_a_bin_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer("testing", (32, 48), num_classes=10)
    torch.nn.init.normal_(model.head.weight, std=3.0)
    ckpt = tmp_path / "tiny_checkpoint.bin"
    torch.save(model.state_dict(), ckpt)
    names = [f"name_{i}" for i in range(10)]
    sidecar = {"model_type": "testing", "img_size": [32, 48], "dataset": "x", "class_names": names}
    ckpt.with_suffix(".json").write_text(json.dumps(sidecar))
    params = f"CHECKPOINT = {str(ckpt)!r}\nMODEL_TYPE = None\nIMAGE = None\nIMG_SIZE = None\n"
    nb = execute(with_parameters(read_notebook(), params + "LAYER, HEAD = 1, None\n"))
    text = outputs_text(nb)
    assert "testing from" in text
    assert "1. " in text
    assert text.count("name_") >= 5
    assert images_shown(nb) == 4  # patches, rollout + per-layer figure, chosen layer, Figure 7
    assert "mean attention distance over 2 scikit-learn sample photos" in text
    assert "top 16 filter components" in text  # at most D = 16 for the testing model


@pytest.mark.slow
def test_notebook_runs_on_an_npz_with_an_image_and_explains_a_missing_checkpoint(tmp_path):
    model = VisionTransformer("testing", 32, num_classes=5)
    npz = tmp_path / "tiny.npz"
    save_npz(npz, state_dict_to_npz(model.state_dict(), model.config))
    image = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(image)
    params = (
        f"CHECKPOINT = {str(npz)!r}\nMODEL_TYPE = 'testing'\nIMAGE = {str(image)!r}\n"
        "IMG_SIZE = (32, 64)\nLAYER, HEAD = 0, 1\n"
    )
    nb = execute(with_parameters(read_notebook(), params))
    text = outputs_text(nb)
    assert "input (32, 64), patch grid (2, 4)" in text
    assert "unknown" in text  # a 5-class npz has no known class names
    assert images_shown(nb) == 4

    missing = tmp_path / "nothing.bin"
    params = f"CHECKPOINT = {str(missing)!r}\nMODEL_TYPE = None\nIMAGE = None\nIMG_SIZE = None\n"
    nb = with_parameters(read_notebook(), params + "LAYER, HEAD = -1, 0\n")
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="No checkpoint at"):
        execute(nb)
