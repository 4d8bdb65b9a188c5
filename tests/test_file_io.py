"""utils.file_io: atomic writes, safe loads and sidecars never lose or run anything."""

from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.npz import CheckpointError
from utils import file_io
from utils.errors import UserError
from utils.file_io import (
    atomic_save,
    atomic_write_text,
    read_sidecar,
    safe_load,
    sidecar_path,
    write_sidecar,
)

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Atomic writes


class _FullDisk:
    """A file that accepts `limit` bytes, then fails like a full disk."""

    def __init__(self, path: str, limit: int):
        self.handle = open(path, "wb")  # noqa: SIM115 - closed in __exit__
        self.limit = limit

    def write(self, data) -> int:
        if self.handle.tell() + len(data) > self.limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def test_atomic_save_round_trip_leaves_no_temp_file(tmp_path) -> None:
    path = tmp_path / "sub" / "x.pt"
    atomic_save({"w": torch.arange(5)}, path)
    assert torch.equal(safe_load(path)["w"], torch.arange(5))
    assert os.listdir(path.parent) == ["x.pt"]


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where) -> None:
    path = tmp_path / "run_last.pt"
    atomic_save({"w": torch.zeros(10)}, path)
    if where == "write":
        monkeypatch.setattr(file_io, "_open_temp", lambda p: _FullDisk(p, limit=2000))
    else:

        def fsync(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(file_io.os, "fsync", fsync)
    with pytest.raises(UserError, match="No space left") as info:
        atomic_save({"w": torch.ones(100_000)}, path)
    message = str(info.value)
    assert str(path) in message
    assert "previous file there is unchanged" in message
    assert "--output_dir" in message
    monkeypatch.undo()
    assert torch.equal(safe_load(path)["w"], torch.zeros(10))
    assert os.listdir(tmp_path) == ["run_last.pt"]


def test_other_write_errors_propagate_and_keep_the_previous_file(tmp_path) -> None:
    path = tmp_path / "x.pt"
    atomic_write_text(path, "old")
    with pytest.raises(AttributeError):
        atomic_save({"f": lambda: 0}, path)  # a lambda cannot be pickled
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.pt"]


@pytest.mark.slow
def test_kill_9_during_saves_never_leaves_a_torn_file(tmp_path) -> None:
    path = tmp_path / "state.pt"
    child = textwrap.dedent(
        f"""
        import sys, torch
        from utils.file_io import atomic_save
        i = 0
        while True:
            atomic_save({{"i": i, "w": torch.full((1_000_000,), float(i))}}, {str(path)!r})
            print(i, flush=True)
            i += 1
        """
    )
    for delay in (0.07, 0.31):
        proc = subprocess.Popen(
            [sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "0"  # one complete save exists
        time.sleep(delay)  # then kill at some instant of a later save
        proc.kill()
        proc.wait()
        proc.stdout.close()
        state = safe_load(path)
        assert torch.equal(state["w"], torch.full((1_000_000,), float(state["i"])))


def test_text_sidecar(tmp_path) -> None:
    ckpt = tmp_path / "run_checkpoint.bin"
    assert read_sidecar(ckpt) == {}
    write_sidecar(ckpt, model_type="testing", img_size=32, class_names=["a", "b"])
    assert sidecar_path(ckpt) == tmp_path / "run_checkpoint.json"
    assert read_sidecar(ckpt)["class_names"] == ["a", "b"]
    sidecar_path(ckpt).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_sidecar(ckpt)


def test_a_save_removes_temp_files_of_writers_that_died(tmp_path) -> None:
    path = tmp_path / "run_last.pt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs, like a writer killed with -9 mid-save
    orphan = tmp_path / f"run_last.pt.tmp{dead.pid}"
    orphan.write_bytes(b"half a checkpoint")
    alive = tmp_path / f"run_last.pt.tmp{os.getppid()}"  # a writer still at work: kept
    alive.write_bytes(b"in progress")
    other = tmp_path / "other.pt.tmp1"  # another file's temp: not ours to judge
    other.write_bytes(b"x")
    atomic_save({"step": 1}, path)
    assert not orphan.exists()
    assert alive.exists()
    assert other.exists()
    assert safe_load(path) == {"step": 1}


# --------------------------------------------------------------------------------------------
# Safe loading


class _Exploit:
    """Unpickling this would create a file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_safe_load_refuses_pickled_code(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(1), "x": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match=r"\(getattr, .*could run code, so it is refused"):
        safe_load(path)
    assert not marker.exists()
    torch.save({"args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError, match=r"\(argparse\.Namespace, e\.g\. a whole model"):
        safe_load(path)


def test_safe_load_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"missing\.bin does not exist"):
        safe_load(tmp_path / "missing.bin")
    with pytest.raises(CheckpointError, match="is a directory"):
        safe_load(tmp_path)
    good = tmp_path / "good.bin"
    torch.save({"w": torch.zeros(1000)}, good)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good.read_bytes()[:1500])
    with pytest.raises(CheckpointError, match="truncated, corrupt or another kind"):
        safe_load(truncated)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world" * 10)
    with pytest.raises(CheckpointError, match="truncated, corrupt or another kind"):
        safe_load(junk)
    npz = tmp_path / "weights.bin"
    np.savez(npz.open("wb"), a=np.zeros(3))
    with pytest.raises(CheckpointError, match=r"NumPy \.npz checkpoint"):
        safe_load(npz)
