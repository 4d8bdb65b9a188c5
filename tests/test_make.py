"""The Makefile's commands for TensorBoard and the notebook work as typed, in the environment
`make` installs into (its install step is taken as done: `-o .venv/.installed`)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import train
from tests.helpers import REPO, tiny_args

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")

PATH_WITHOUT_VENV = {**os.environ, "PATH": "/usr/bin:/bin"}  # as typed in a fresh shell


def make(*argv: str, dry_run: bool = False) -> subprocess.CompletedProcess:
    flags = ["-n"] if dry_run else []
    return subprocess.run(
        ["make", "--no-print-directory", "-o", ".venv/.installed", *flags, *argv],
        cwd=REPO,
        env=PATH_WITHOUT_VENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.usefixtures("one_thread")
def test_make_tensorboard_reads_the_runs_logs(tmp_path: Path) -> None:
    """The recipe's command (its server left out: `--inspect` reads the logs and exits)."""
    train.main(tiny_args(tmp_path, num_steps=2, eval_every=2))
    recipe = make("tensorboard", f"LOGDIR={tmp_path / 'logs'}", dry_run=True)
    assert recipe.returncode == 0, recipe.stderr
    command = recipe.stdout.strip()
    proc = subprocess.run(
        f"{command} --inspect --tag train/loss",
        shell=True,
        cwd=REPO,
        env=PATH_WITHOUT_VENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"train/loss.*last_step\s+2\n", proc.stdout, re.S)


@pytest.mark.skipif(importlib.util.find_spec("notebook") is not None, reason="notebook installed")
def test_make_notebook_without_jupyter_says_how_to_install_it() -> None:
    proc = make("notebook")
    assert proc.returncode != 0
    assert "Jupyter Notebook is not installed in .venv" in proc.stderr
    assert ".venv/bin/python -m pip install notebook" in proc.stderr
    assert "Traceback" not in proc.stderr
