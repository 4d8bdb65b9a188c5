"""train.py protects a user's work from the user's own mistakes: before any work, and at exit.

Each test runs train.py as a user would (in-process through `run_cli`, or as a subprocess) and
checks the exit code, the one-line message and that nothing of an earlier run was touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from tests.helpers import (
    expect_user_error,
    imports_torch,
    load_checkpoint,
    make_image_folder,
    run_script,
    tiny_args,
)
from utils.infra.errors import run_cli
from utils.infra.file_io import safe_load
from utils.infra.run_files import run_files

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
    proc = run_script("train.py", "--help", importtime=True)
    assert proc.returncode == 0
    assert "(default: 512)" in proc.stdout  # --train_batch_size
    assert not imports_torch(proc)  # parsed before torch is imported


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


def _bad_data_dir(root: Path) -> dict:
    return {"dataset": "imagefolder", "data_dir": root / "no_such_folder"}


def _bad_image(root: Path) -> dict:
    make_image_folder(root / "pics")
    (root / "pics" / "train" / "cat" / "9.png").write_bytes(b"not an image")
    return {"dataset": "imagefolder", "data_dir": root / "pics", "strict_images": True}


@pytest.mark.parametrize("typo", [_bad_data_dir, _bad_image], ids=["data_dir", "strict_images"])
def test_overwrite_deletes_nothing_when_a_check_fails(tmp_path: Path, capsys, typo) -> None:
    """--overwrite with a mistake found at start-up: the earlier run is still all there."""
    train.main(tiny_args(tmp_path, num_steps=2, eval_every=2))
    files = run_files(tmp_path / "out", tmp_path / "logs" / "tiny", "tiny")
    assert len(files) == 4  # .bin, .json, _last.pt, an event file
    before = {path: path.read_bytes() for path in files}
    expect_user_error(train.main, tiny_args(tmp_path, overwrite=True, **typo(tmp_path)), capsys)
    assert {path: path.read_bytes() for path in files} == before
    assert not (tmp_path / "out" / "tiny.lock").exists()  # released


def test_a_folder_where_the_last_state_goes_is_refused_at_start_up(tmp_path: Path, capsys) -> None:
    (tmp_path / "out" / "tiny_last.pt").mkdir(parents=True)
    for resume in (False, True):
        err = expect_user_error(train.main, tiny_args(tmp_path, resume=resume), capsys)
        assert "tiny_last.pt is a folder, not a file" in err
    assert not (tmp_path / "logs" / "tiny").exists() or not any(
        (tmp_path / "logs" / "tiny").glob("events.*")
    )  # no training started


@pytest.mark.parametrize("name", ["\udcff", "x\ud800"])
def test_a_name_that_is_not_text_is_one_message(tmp_path: Path, capsys, name: str) -> None:
    err = expect_user_error(train.main, tiny_args(tmp_path, name=name, log_dir=tmp_path), capsys)
    assert "cannot name a file" in err


@pytest.mark.slow
def test_a_name_the_locale_cannot_encode_is_one_message(tmp_path: Path) -> None:
    """Non-ASCII bytes under a plain C locale (no UTF-8 mode): not text to Python there."""
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    argv = [os.fsencode(a) for a in tiny_args(tmp_path)]
    argv[argv.index(b"--name") + 1] = "café".encode()
    proc = subprocess.run(
        [sys.executable, "train.py", *argv], cwd=REPO, env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert b"Traceback" not in proc.stderr
    assert b"cannot name a file" in proc.stderr
    assert b"LC_ALL=C.UTF-8" in proc.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_finished_run_whose_summary_cannot_be_printed_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """stdout on a full device (`train.py ... > /dev/full`): the run finished, exit 0."""
    full = open("/dev/full", "w")  # noqa: SIM115 - closed below
    monkeypatch.setattr(sys, "stdout", full)
    run_cli(lambda: train.cli(tiny_args(tmp_path, num_steps=2, eval_every=2)))  # no exit
    with contextlib.suppress(OSError):  # what could not be written is still buffered
        full.close()
    assert "Could not print the summary" in caplog.text
    assert "No space left on device" in caplog.text
    assert safe_load(tmp_path / "out" / "tiny_last.pt")["step"] == 2


def test_the_summary_names_only_files_that_exist(tmp_path: Path, capsys) -> None:
    """Only the last state was copied to another output folder, then resumed there."""
    train.main(tiny_args(tmp_path, num_steps=2, eval_every=2))
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(tmp_path / "out" / "tiny_last.pt", copy / "tiny_last.pt")
    capsys.readouterr()
    train.main(tiny_args(tmp_path, num_steps=2, output_dir=copy, resume=True))
    out = capsys.readouterr().out
    assert "Best checkpoint: step 2 by minival" in out  # what the state remembers
    assert f"\nCheckpoint: none in {copy} (" in out  # not the missing copy/tiny_checkpoint.bin
    assert f"\nLast state: {copy / 'tiny_last.pt'}\n" in out
