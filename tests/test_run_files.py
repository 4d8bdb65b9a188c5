"""utils.run_files: a run's locations are checked first, earlier runs are never overwritten by
mistake, and one process at a time writes a run's files."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from utils.errors import UserError
from utils.file_io import atomic_save, save_checkpoint
from utils.run_files import claim_run, run_files

ROOT = Path(__file__).resolve().parents[1]


def _earlier_run(tmp_path: Path, name: str = "run") -> dict[Path, bytes]:
    """The files a finished run leaves (written as train.py writes them), by path."""
    out, logs = tmp_path / "out", tmp_path / "logs" / name
    save_checkpoint({"w": torch.ones(3)}, out / f"{name}_checkpoint.bin", step=40, accuracy=0.25)
    atomic_save({"step": 40}, out / f"{name}_last.pt")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(logs)) as writer:
        writer.add_scalar("test/accuracy", 0.25, 40)
    return {p: p.read_bytes() for p in run_files(out, logs, name)}


def _claim(tmp_path: Path, name: str = "run", **flags):
    flags = {"resume": False, "overwrite": False, **flags}
    return claim_run(tmp_path / "out", tmp_path / "logs" / name, name, **flags)


def test_a_new_run_never_overwrites_an_earlier_run_of_its_name(tmp_path) -> None:
    files = _earlier_run(tmp_path)
    assert len(files) == 4  # .bin, .json, _last.pt, one event file
    with pytest.raises(UserError) as info:
        _claim(tmp_path)
    message = str(info.value)
    assert "A run named run already has files" in message
    assert "run_checkpoint.bin (the best model)" in message
    assert "run_last.pt (the last training state)" in message
    assert "1 TensorBoard event file(s)" in message
    for offer in ("--resume", "--overwrite", "--name"):
        assert offer in message
    assert {p: p.read_bytes() for p in files} == files  # untouched
    assert not (tmp_path / "out" / "run.lock").exists()  # a refused run holds nothing
    with _claim(tmp_path, resume=True):  # continuing them is what --resume is for
        assert {p: p.read_bytes() for p in files} == files
    with _claim(tmp_path, name="other"):  # so is another name
        pass


def test_overwrite_deletes_the_earlier_run_first(tmp_path, caplog) -> None:
    files = _earlier_run(tmp_path)
    with caplog.at_level(logging.WARNING), _claim(tmp_path, overwrite=True):
        assert not any(path.exists() for path in files)
    assert "--overwrite: deleted the earlier run's" in caplog.text
    with pytest.raises(UserError, match="pass one of them"):
        _claim(tmp_path, resume=True, overwrite=True)


@pytest.mark.parametrize("name", ["../..", "../escaped", "/tmp/abs", "a/b", "..", ".", ""])
def test_a_name_that_leaves_the_output_folder_is_refused(tmp_path, name) -> None:
    with pytest.raises(UserError, match=r"must be a plain name.*Use e\.g\. --name [\w.-]+ "):
        claim_run(tmp_path / "out", tmp_path / "logs", name, resume=False, overwrite=False)
    assert sorted(os.listdir(tmp_path)) == []  # checked before anything is created
    with pytest.raises(UserError, match="shorter --name"):
        claim_run(tmp_path / "out", tmp_path / "logs", "x" * 250, resume=False, overwrite=False)


def test_every_output_location_is_checked_before_any_work(tmp_path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    logs = tmp_path / "logs"
    for output_dir, match in [
        (a_file, r"--output_dir .*a_file is a file, not a folder"),
        (a_file / "sub", r"--output_dir .*a_file/sub cannot be created \(Not a directory\)"),
    ]:
        with pytest.raises(UserError, match=match):
            claim_run(output_dir, logs, "run", resume=False, overwrite=False)
    with pytest.raises(UserError, match=r"--log_dir .*a_file is a file"):
        claim_run(tmp_path / "out", a_file, "run", resume=False, overwrite=False)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_unwritable_folder_is_refused_even_for_root(tmp_path) -> None:
    # /proc refuses new files to every user, root included (a chmod would not stop root).
    with pytest.raises(UserError, match="--output_dir /proc is not writable"):
        claim_run("/proc", tmp_path / "logs", "run", resume=False, overwrite=False)
    with pytest.raises(UserError, match="--log_dir /proc/vit/logs cannot be created"):
        claim_run(tmp_path / "out", "/proc/vit/logs", "run", resume=False, overwrite=False)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_folder_is_refused(tmp_path) -> None:
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    with pytest.raises(UserError, match="is not writable"):
        claim_run(read_only, tmp_path / "logs", "run", resume=False, overwrite=False)


_HOLDER = textwrap.dedent(
    """
    import os, sys
    from utils.run_files import claim_run
    lock = claim_run(sys.argv[1], sys.argv[2], "run", resume=False, overwrite=False)
    print(os.getpid(), flush=True)
    sys.stdin.readline()  # hold the run until told
    if sys.argv[3] == "crash":
        os.kill(os.getpid(), 9)  # dies without releasing anything
    lock.release()
    """
)


def _holder(tmp_path: Path, end: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path / "out"), str(tmp_path / "logs"), end],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return proc, int(proc.stdout.readline())


def test_two_runs_of_one_name_at_once_the_second_refuses_naming_the_first(tmp_path) -> None:
    proc, pid = _holder(tmp_path, "release")
    try:
        with pytest.raises(UserError) as info:
            claim_run(tmp_path / "out", tmp_path / "logs", "run", resume=True, overwrite=False)
        assert f"Another run named run is running (PID {pid} on " in str(info.value)
        assert "choose another --name" in str(info.value)
    finally:
        proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0
    assert not (tmp_path / "out" / "run.lock").exists()  # released on exit
    with claim_run(tmp_path / "out", tmp_path / "logs", "run", resume=False, overwrite=False):
        pass


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, caplog) -> None:
    proc, pid = _holder(tmp_path, "crash")
    proc.communicate("go\n", timeout=60)
    assert proc.returncode == -signal.SIGKILL
    lock_file = tmp_path / "out" / "run.lock"
    assert lock_file.read_text().startswith(f"{pid} on ")  # left behind
    with (
        caplog.at_level(logging.INFO),
        claim_run(tmp_path / "out", tmp_path / "logs", "run", resume=True, overwrite=False),
    ):
        assert lock_file.read_text().startswith(f"{os.getpid()} on ")
    assert f"from process {pid} on" in caplog.text
    assert "which no longer runs" in caplog.text


def test_other_processes_under_torchrun_claim_nothing(tmp_path) -> None:
    _earlier_run(tmp_path)
    lock = claim_run(tmp_path / "x", tmp_path / "y", "../..", resume=False, overwrite=False,
                     is_main=False)  # fmt: skip
    lock.release()
    assert not (tmp_path / "x").exists()
