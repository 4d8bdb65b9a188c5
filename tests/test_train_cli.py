"""train.py protects a user's work from the user's own mistakes: before any work, and at exit.

Each test runs train.py as a user would (in-process through `run_cli`, or as a subprocess) and
checks the exit code, the one-line message and that nothing of an earlier run was touched.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from tests.helpers import expect_user_error, load_checkpoint, make_image_folder, tiny_args
from utils.errors import run_cli
from utils.file_io import safe_load

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rerunning_a_name_never_overwrites_the_earlier_run(tmp_path: Path, capsys) -> None:
    train.main(tiny_args(tmp_path, num_steps=2, eval_every=2))
    best = tmp_path / "out" / "tiny_checkpoint.bin"
    before = best.read_bytes()
    err = expect_user_error(train.main, tiny_args(tmp_path, num_steps=2), capsys)
    assert "--resume" in err
    assert "--overwrite" in err
    assert best.read_bytes() == before  # refused before any work
    summary = train.main(tiny_args(tmp_path, num_steps=2, eval_every=2, overwrite=True))
    assert summary.step == 2


@pytest.mark.parametrize(
    "flags",
    [{"output_dir": "a_file"}, {"log_dir": "a_file"}, {"name": "../escape"}],
    ids=["output_dir is a file", "log_dir is a file", "name leaves the folder"],
)
def test_bad_output_locations_stop_before_any_work(tmp_path: Path, capsys, flags: dict) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    flags = {k: tmp_path / v if k.endswith("_dir") else v for k, v in flags.items()}
    expect_user_error(train.main, tiny_args(tmp_path, **flags), capsys)
    assert not list(tmp_path.rglob("*.pt"))


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--learning_rate", "nan"),
        ("--learning_rate", "-1"),
        ("--weight_decay", "-1"),
        ("--img_size", "0"),
        ("--holdout_fraction", "1"),
    ],
)
def test_bad_numbers_are_one_line_and_exit_2(tmp_path: Path, flag: str, value: str) -> None:
    argv = [*tiny_args(tmp_path), flag, value]
    proc = subprocess.run(
        [sys.executable, "train.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert f"argument {flag}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_is_quick_and_shows_defaults() -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "train.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert "(default: 512)" in proc.stdout  # --train_batch_size
    assert "| torch\n" not in proc.stderr  # parsed before torch is imported


def test_a_model_of_ours_starts_another_fine_tune(tmp_path: Path) -> None:
    """A train.py checkpoint as --pretrained_dir: another class count and image size."""
    train.main(tiny_args(tmp_path, name="first", num_steps=2, eval_every=2))
    first = tmp_path / "out" / "first_checkpoint.bin"
    make_image_folder(tmp_path / "pics", classes=("a", "b", "c"), n=6)
    argv = tiny_args(
        tmp_path,
        name="second",
        model_type=False,  # read from the sidecar
        pretrained_dir=first,
        dataset="imagefolder",
        data_dir=tmp_path / "pics",
        img_size=48,
        num_steps=1,
        eval_every=0,
        learning_rate=1e-9,
        warmup_steps=0,
    )
    train.main(argv)
    meta, state = load_checkpoint(tmp_path / "out", "second")
    assert (meta["model_type"], meta["img_size"], meta["num_classes"]) == ("testing", [48, 48], 3)
    old = safe_load(first)
    # The encoder starts from the first model (one tiny step later), the head from zero.
    torch.testing.assert_close(state["encoder.norm.weight"], old["encoder.norm.weight"])
    assert state["embeddings.pos_embed"].shape[1] == 1 + 3 * 3  # resized from 2x2 to 3x3
    assert np.abs(state["head.weight"].numpy()).max() < 1e-6


def test_a_run_stopped_before_any_evaluation_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """SIGTERM during step 1 of a run that evaluates only at the end: no best checkpoint yet."""
    real_step = train.train_step

    def step_then_signal(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        signal.raise_signal(signal.SIGTERM)  # as a scheduler would, mid-run
        return loss

    monkeypatch.setattr(train, "train_step", step_then_signal)
    with pytest.raises(SystemExit) as stopped:
        run_cli(lambda: train.cli(tiny_args(tmp_path, num_steps=5, eval_every=0)))
    assert stopped.value.code == 128 + signal.SIGTERM
    out = capsys.readouterr().out
    assert "Best checkpoint: none (no evaluation ran)" in out
    assert "Checkpoint: none written" in out
    assert "-1.0000" not in out
    assert not (tmp_path / "out" / "tiny_checkpoint.bin").exists()
    assert safe_load(tmp_path / "out" / "tiny_last.pt")["step"] == 1
