"""`make demo`, the README's first command: its training run reaches 0.95 test accuracy on digits.

Runs the exact `train.py` command of the Makefile's `demo` recipe (only the output and log
folders moved into a temporary directory), then checks the printed accuracy against the
saved checkpoint re-scored with a plain loop.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.modeling import VisionTransformer
from utils.data.loaders import DigitsDataset, build_transforms

REPO = Path(__file__).resolve().parents[1]


def demo_command() -> str:
    """The shell command of the Makefile's `demo` recipe, joined across continuation lines."""
    text = (REPO / "Makefile").read_text()
    match = re.search(r"^demo:.*\n((?:\t.*\n?)+)", text, flags=re.MULTILINE)
    assert match, "the Makefile has no demo target"
    recipe = match.group(1).replace("\\\n", " ")
    lines = [line.strip() for line in recipe.splitlines() if "train.py" in line]
    assert len(lines) == 1, recipe
    # A fresh output folder here: the demo starts a new run (no --resume).
    return lines[0].replace("$(PY)", shlex.quote(sys.executable)).replace("$(DEMO_RESUME)", "")


@pytest.mark.slow
def test_demo_reaches_95_percent(tmp_path: Path) -> None:
    command = demo_command()
    assert "--dataset digits" in command
    out, logs = tmp_path / "out", tmp_path / "logs"
    command += f" --output_dir {shlex.quote(str(out))} --log_dir {shlex.quote(str(logs))}"
    proc = subprocess.run(
        ["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = re.search(
        r"Best checkpoint: step \d+ by minival .*; test accuracy ([0-9.]+)", proc.stdout
    )
    accuracy = float(best.group(1))
    seconds = float(re.search(r"Training time: ([0-9.]+) s", proc.stdout).group(1))
    assert accuracy >= 0.95, f"demo accuracy {accuracy} after {seconds:.0f} s"
    hint = re.search(r"TensorBoard: (\S+) -m tensorboard.main --logdir (\S+)", proc.stdout)
    shown = hint.group(1)  # the interpreter that ran it, as typed in the repo's folder
    found = REPO / shown if "/" in shown else Path(shutil.which(shown))
    assert found.resolve() == Path(sys.executable).resolve()
    assert hint.group(2) == shlex.quote(str(logs))
    checkpoint = re.search(r"Checkpoint: (\S+)", proc.stdout).group(1)

    # Independent re-scoring of the saved model.
    meta = json.loads(Path(checkpoint).with_suffix(".json").read_text())
    model = VisionTransformer(meta["model_type"], meta["img_size"], meta["num_classes"])
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    model.eval()
    test = DigitsDataset(train=False, transform=build_transforms(meta["img_size"], train=False))
    images = torch.stack([test[i][0] for i in range(len(test))])
    with torch.no_grad():
        predictions = model(images)[0].argmax(dim=1)
    rescored = (predictions == torch.tensor(test.targets)).sum().item() / len(test)
    assert rescored == pytest.approx(accuracy, abs=1e-4)
    assert rescored >= 0.95
