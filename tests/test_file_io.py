"""utils.infra.file_io: atomic writes, safe loads and sidecars never lose or run anything."""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import pickle
import resource
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from models.npz import CheckpointError
from tests.helpers import damage, script_error
from utils.infra import atomic, file_io
from utils.infra.atomic import atomic_write_text, file_sha256
from utils.infra.errors import UserError
from utils.infra.file_io import (
    CONTENT_SHA256,
    atomic_save,
    content_sha256,
    read_sidecar,
    safe_load,
    save_checkpoint,
    sidecar_path,
    with_content_sha256,
    write_output,
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
        monkeypatch.setattr(atomic, "_open_temp", lambda p: _FullDisk(p, limit=2000))
    else:

        def fsync(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(atomic.os, "fsync", fsync)
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
    child = textwrap.dedent(
        """
        import sys, torch
        from utils.infra.file_io import atomic_save
        i = 0
        while True:
            atomic_save({"i": i, "w": torch.full((1_000_000,), float(i))}, sys.argv[1])
            print(i, flush=True)
            i += 1
        """
    )
    # Two writers, each to its own file, started together (their imports overlap).
    delays = {tmp_path / "state0.pt": 0.07, tmp_path / "state1.pt": 0.31}
    procs = {
        path: subprocess.Popen(
            [sys.executable, "-c", child, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        for path in delays
    }
    try:
        for path, delay in delays.items():
            proc = procs[path]
            assert proc.stdout.readline().strip() == "0"  # one complete save exists
            time.sleep(delay)  # then kill at some instant of a later save
            proc.kill()
            proc.wait()
            state = safe_load(path)
            assert torch.equal(state["w"], torch.full((1_000_000,), float(state["i"])))
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
            proc.stdout.close()


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
    """Unpickling this would call `action(marker)`: a stand-in for arbitrary code."""

    def __init__(self, action, marker):
        self.action, self.marker = action, marker

    def __reduce__(self):
        return (self.action, (self.marker,))


def _plain_pickle(obj, path: Path) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=4)


# Creating a file, or calling a function of the `os` module (as `os.system` would).
@pytest.mark.parametrize(
    "exploit", [lambda m: _Exploit(Path.touch, m), lambda m: _Exploit(os.mkdir, str(m))]
)
@pytest.mark.parametrize("save", [torch.save, _plain_pickle])
def test_safe_load_refuses_pickled_code_and_says_so_plainly(tmp_path, exploit, save) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    save({"w": torch.zeros(1), "x": exploit(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        safe_load(path)
    message = str(info.value)
    assert "was not loaded: it holds code or Python objects that are not tensors" in message
    assert "could run that code" in message
    assert "weights_only" not in message  # never the advice to switch the safety off
    assert "truncated" not in message
    assert "corrupt" not in message
    assert not marker.exists()
    torch.save({"args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError, match=r"not tensors \(argparse\.Namespace\)"):
        safe_load(path)


# --------------------------------------------------------------------------------------------
# Content hashes: damage after the write is caught on load


def test_every_write_returns_the_sha256_that_sha256sum_prints(tmp_path) -> None:
    path = tmp_path / "x.pt"
    digest = atomic_save({"w": torch.arange(1000)}, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == file_sha256(path)
    arrays = tmp_path / "x.npz"  # np.savez seeks back while writing: hashed from the file
    digest = atomic.atomic_write(arrays, lambda handle: np.savez(handle, a=np.arange(50)))
    assert digest == hashlib.sha256(arrays.read_bytes()).hexdigest()


def _state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4000, generator=generator), "b": torch.randn(3, generator=generator)}


def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_recorded_hash(tmp_path) -> None:
    path = tmp_path / "run_checkpoint.bin"
    digest = save_checkpoint(_state(0), path, model_type="testing", step=10)
    assert read_sidecar(path)["sha256"] == digest == file_sha256(path)
    assert read_sidecar(path)["step"] == 10
    assert torch.equal(safe_load(path)["w"], _state(0)["w"])
    damage(path)
    with pytest.raises(CheckpointError) as info:
        safe_load(path)
    message = str(info.value)
    assert f"{path} is damaged" in message
    assert f"recorded {digest}" in message
    assert str(sidecar_path(path)) in message
    assert file_sha256(path) in message


def test_a_checkpoint_without_a_recorded_hash_loads_as_before(tmp_path) -> None:
    path = tmp_path / "old_checkpoint.bin"
    atomic_save(_state(0), path)
    write_sidecar(path, model_type="testing")  # as runs before hashes wrote it
    assert torch.equal(safe_load(path)["w"], _state(0)["w"])


def test_a_save_killed_between_its_two_files_leaves_a_pair_that_loads(
    tmp_path, monkeypatch, caplog
) -> None:
    path = tmp_path / "run_checkpoint.bin"
    first = save_checkpoint(_state(0), path, step=1)

    commit = file_io.commit_temp

    # dies after the sidecar, before the checkpoint
    def killed(tmp: str, target: str, *then: str) -> None:
        if target == str(path):
            raise SystemExit("killed")
        commit(tmp, target, *then)

    monkeypatch.setattr(file_io, "commit_temp", killed)
    with pytest.raises(SystemExit):
        save_checkpoint(_state(1), path, step=2)
    monkeypatch.undo()
    assert read_sidecar(path)["step"] == 2  # the new sidecar, the old checkpoint
    assert read_sidecar(path)["previous_sha256"] == first
    with caplog.at_level("WARNING"):
        assert torch.equal(safe_load(path)["w"], _state(0)["w"])
    assert "whose save did not complete" in caplog.text
    second = save_checkpoint(_state(1), path, step=2)  # the next save completes the pair
    assert torch.equal(safe_load(path)["w"], _state(1)["w"])
    assert read_sidecar(path)["sha256"] == second
    assert os.listdir(tmp_path) == sorted(["run_checkpoint.bin", "run_checkpoint.json"])


def test_a_state_carries_the_hash_of_its_own_content(tmp_path) -> None:
    state = {"model": _state(0), "step": 7, "rng": (3, [1.5, None], "x"), "flag": True}
    path = tmp_path / "run_last.pt"
    atomic_save(with_content_sha256(state), path)
    loaded = safe_load(path)
    assert CONTENT_SHA256 not in loaded
    assert content_sha256(loaded) == content_sha256(state)
    assert content_sha256({**state, "step": 8}) != content_sha256(state)
    damage(path)
    with pytest.raises(CheckpointError, match=r"run_last\.pt is damaged: what it holds no longer"):
        safe_load(path)


# --------------------------------------------------------------------------------------------
# The file size limit (`ulimit -f`)


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="POSIX file size limits only")
def test_the_file_size_limit_is_one_message_and_keeps_the_previous_file(tmp_path) -> None:
    path = tmp_path / "run_last.pt"
    atomic_save({"w": torch.zeros(10)}, path)
    child = textwrap.dedent(
        f"""
        import torch
        from utils.infra.errors import run_cli
        from utils.infra.file_io import atomic_save
        run_cli(lambda: atomic_save({{"w": torch.ones(1_000_000)}}, {str(path)!r}))
        """
    )
    limit = 200_000  # bytes: the new state (4 MB) does not fit

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    # Exit code 2, not killed by SIGXFSZ.
    err = script_error("-c", child, timeout=300, preexec_fn=limit_file_size, env=env)
    assert "file size limit was reached while saving" in err
    assert "previous file there is unchanged" in err
    assert torch.equal(safe_load(path)["w"], torch.zeros(10))
    assert os.listdir(tmp_path) == ["run_last.pt"]


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


def _pickle_span(path: Path) -> tuple[int, int]:
    """Where the bytes of a torch file's pickle (`<archive>/data.pkl`) lie in the file."""
    with zipfile.ZipFile(path) as archive:
        record = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
    with open(path, "rb") as handle:
        handle.seek(record.header_offset + 26)  # the local header's name and extra lengths
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
    start = record.header_offset + 30 + name_length + extra_length
    return start, record.file_size


def test_a_flipped_bit_in_a_states_pickle_is_called_damage_never_code(tmp_path) -> None:
    path = tmp_path / "run_last.pt"
    state = {"format": "x", "step": 3, "model": _state(0), "args": {"lr": 0.1, "name": "run"}}
    atomic_save(with_content_sha256(state), path)
    good = path.read_bytes()
    start, size = _pickle_span(path)
    flipped = tmp_path / "flipped_last.pt"
    for offset in range(0, size, 3):  # a third of the pickle's bytes, each bit in turn
        data = bytearray(good)
        data[start + offset] ^= 1 << (offset % 8)
        flipped.write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            safe_load(flipped)
        message = str(info.value)
        assert message.startswith(f"{flipped} is damaged: "), (offset, message)
        assert "data.pkl" in message
        assert "holds code" not in message


def test_an_output_is_written_only_over_a_regular_file(tmp_path) -> None:
    pipe = tmp_path / "preds.csv"
    os.mkfifo(pipe)  # as a device node: opening it to read would wait for a writer
    with pytest.raises(UserError, match="it is not a regular file"):
        write_output(pipe, lambda handle: handle.write(b"rows"))
    assert pipe.is_fifo()
    ordinary = tmp_path / "old.csv"
    ordinary.write_text("old")
    write_output(ordinary, lambda handle: handle.write(b"new"))
    assert ordinary.read_text() == "new"
