"""What train.py writes for people and programs to read: plain lines without a terminal, a
console that cannot be written, the summary's commands, metrics.jsonl, the missing-torch and
missing-wandb messages.

The runs whose output goes to a file or to /dev/full run as subprocesses, as a user's
`train.py > log 2>&1` (nohup, CI, a cluster job) does.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train
from tests.helpers import (
    REPO,
    crash_at,
    expect_user_error,
    make_image_folder,
    run_script,
    scalars,
    start_train,
    tiny_args,
)
from utils.infra.file_io import safe_load

pytestmark = pytest.mark.usefixtures("one_thread")

LONGEST_LINE = 300  # a log line a person can read (a tqdm bar's redraws make one of 10,000+)


def metrics(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def series(records: list[dict], tag: str) -> list[tuple[int, float]]:
    return [(r["step"], r["value"]) for r in records if r["tag"] == tag]


def wait(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_a_log_file_gets_plain_lines_not_progress_bars(tmp_path: Path) -> None:
    """`train.py > log 2>&1`: one line per --log_every steps, no carriage return, none long."""
    log = tmp_path / "log.txt"
    argv = tiny_args(tmp_path, num_steps=6, eval_every=3, log_every=2, eval_batch_size=16)
    assert wait(start_train(argv, log)) == 0
    text = log.read_text()
    assert "\r" not in text
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= LONGEST_LINE
    progress = [line.split("train: ", 1)[1] for line in lines if "train: Step " in line]
    assert [p.split(":")[0] for p in progress] == [
        "Step 2/6",
        "Step 3/6",  # logged before its evaluation
        "Step 3",
        "Step 3",  # test and minival
        "Step 4/6",
        "Step 6/6",
        "Step 6",
        "Step 6",
    ]
    assert "images/s, " in progress[0]
    assert progress[0].endswith(" left")


def test_a_console_that_cannot_be_written_loses_nothing(tmp_path: Path) -> None:
    """stdout and stderr on a full device: the run trains to the end and saves; exit 0."""
    argv = [
        sys.executable,
        "train.py",
        *tiny_args(tmp_path, num_steps=6, eval_every=3, save_every=100, eval_batch_size=16),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open("/dev/full", "w") as full:
        proc = subprocess.run(argv, cwd=REPO, env=env, stdout=full, stderr=full, timeout=240)
    assert proc.returncode == 0
    assert safe_load(tmp_path / "out" / "tiny_last.pt")["step"] == 6
    assert [step for step, _ in series(metrics(tmp_path / "logs" / "tiny"), "train/loss")] == [
        *range(1, 7)
    ]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_terminal_that_cannot_be_written_keeps_the_run_going(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The progress bars of a terminal whose writes fail (a full disk behind `script`, a
    closed pty) go quiet; the run finishes."""
    import utils.evals.classification as classification

    monkeypatch.setattr(train, "interactive", lambda: True)
    monkeypatch.setattr(classification, "interactive", lambda: True)
    full = open("/dev/full", "w")  # noqa: SIM115 - closed below
    with monkeypatch.context() as patch:
        patch.setattr(sys, "stderr", full)
        summary = train.main(tiny_args(tmp_path, num_steps=4, eval_every=2))
    with contextlib.suppress(OSError):  # what could not be written is still buffered
        full.close()
    assert summary.step == 4
    assert summary.selected_step > 0


def test_the_summary_tensorboard_command_works_as_typed(tmp_path: Path, capsys) -> None:
    train.main(tiny_args(tmp_path, num_steps=2, eval_every=2))
    out = capsys.readouterr().out
    command = out.split("\nTensorBoard: ", 1)[1].strip()
    assert command.split()[0] != "tensorboard"  # not on the PATH outside the environment
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # no virtual environment active
    proc = subprocess.run(
        f"{command} --inspect --tag train/loss", shell=True, cwd=Path.cwd(), env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"Event statistics for tag train/loss.*last_step\s+2\n", proc.stdout, re.S)


def test_a_finished_run_run_again_trains_and_logs_nothing(tmp_path: Path, capsys) -> None:
    argv = tiny_args(tmp_path, num_steps=2, eval_every=2)
    train.main(argv)
    log_dir = tmp_path / "logs" / "tiny"
    before = {p.name: p.read_bytes() for p in log_dir.iterdir()}
    capsys.readouterr()
    summary = train.main([*argv, "--resume"])
    assert summary.step == 2
    assert "\nTraining time: none (the run had finished already)\n" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in log_dir.iterdir()} == before  # no new event file


def test_the_summary_names_unreadable_images_only_when_some_were(tmp_path: Path, capsys) -> None:
    make_image_folder(tmp_path / "pics")
    argv = tiny_args(tmp_path, dataset="imagefolder", data_dir=tmp_path / "pics", num_steps=1)
    train.main([*argv, "--train_batch_size", "4"])
    assert "\nUnreadable images skipped: 0\n" in capsys.readouterr().out


@pytest.mark.parametrize("rate", [0.004321, 0.5, 7.25, 56.78, 1234.5, 98765.4])
def test_rates_keep_three_significant_digits(rate: float) -> None:
    """A slow run's speed is not "0 images/s"."""
    text = train.rate_text(rate)
    assert "e" not in text
    assert float(text) == pytest.approx(rate, rel=5e-3)


def test_metrics_jsonl_holds_every_scalar_tensorboard_holds(tmp_path: Path) -> None:
    """TensorBoard's own reader is the oracle: the same tags, steps and values."""
    train.main(tiny_args(tmp_path, num_steps=4, eval_every=2))
    log_dir = tmp_path / "logs" / "tiny"
    records = metrics(log_dir)
    assert all(isinstance(r["wall_time"], float) for r in records)
    board = scalars(log_dir)
    assert {r["tag"] for r in records} == set(board)
    for tag, logged in board.items():
        mine = series(records, tag)
        assert [s for s, _ in mine] == [s for s, _ in logged], tag
        assert [v for _, v in mine] == pytest.approx([v for _, v in logged], rel=1e-6), tag


def test_a_crash_then_resume_neither_repeats_nor_loses_a_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crashed in step 5, last saved at step 4; a torn line at the end (a crash within a write,
    on another system) is dropped too; the resume logs steps 5 and on once."""
    argv = tiny_args(tmp_path, num_steps=8, eval_every=4, save_every=4)
    with monkeypatch.context() as patch:
        crash_at(patch, 5)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train.main(argv)
    log_dir = tmp_path / "logs" / "tiny"
    with (log_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 1, "tag": "train/lo')
    train.main([*argv, "--resume"])
    records = metrics(log_dir)
    assert [s for s, _ in series(records, "train/loss")] == list(range(1, 9))
    assert [s for s, _ in series(records, "test/accuracy")] == [4, 8]
    board = scalars(log_dir)["train/loss"]
    assert [v for _, v in series(records, "train/loss")] == pytest.approx(
        [v for _, v in board], rel=1e-6
    )


@pytest.mark.parametrize("argv", [["--help"], ["--name", "x"]], ids=["help", "a run"])
def test_a_python_without_torch_is_told_which_python_to_use(argv: list[str]) -> None:
    """`python3 train.py` outside the environment: one message, for --help too."""
    code = (
        "import runpy, sys; sys.modules['torch'] = None; sys.argv[0] = 'train.py'; "
        "runpy.run_path('train.py', run_name='__main__')"
    )
    proc = run_script("-c", code, *argv, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "PyTorch is not installed for this Python" in proc.stderr
    assert ".venv/bin/python train.py" in proc.stderr


def test_wandb_without_the_package_is_one_message(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as where it is not installed
    err = expect_user_error(train.main, [*tiny_args(tmp_path), "--wandb"], capsys)
    assert "the wandb package is not installed" in err
    assert "-m pip install wandb" in err
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="needs wandb")
def test_wandb_logs_the_scalars_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train.main([*tiny_args(tmp_path, num_steps=2, eval_every=2), "--wandb"])
    log_dir = tmp_path / "logs" / "tiny"
    run_id = (log_dir / "wandb_run_id").read_text().strip()
    (path,) = (log_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    logged = {}  # tag -> {step: value}, as W&B recorded them
    for record in _wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            for tag, value in items.items():
                if not tag.startswith("_"):
                    logged.setdefault(tag, {})[items["_step"]] = value
    expected = {}
    for line in metrics(log_dir):
        expected.setdefault(line["tag"], {})[line["step"]] = line["value"]
    assert logged == expected  # every scalar of metrics.jsonl, step for step


def _wandb_records(path: Path):
    """The protobuf records of a `.wandb` file: W&B's header (":W&B", magic, version), then
    LevelDB's log format (32 KiB blocks of chunks: CRC, length, FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, chunk_header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    position, pieces = 7, []
    while position + chunk_header <= len(data):
        if block - position % block < chunk_header:  # a block's tail too short for a chunk
            position += block - position % block
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        body = data[position + chunk_header : position + chunk_header + length]
        position += chunk_header + length
        if kind == 0:  # padding
            continue
        pieces.append(body)
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            yield record
