"""Data-loading workers: a worker that dies or fails ends the run with one message, after saving,
and leaves no process behind; what a worker finds unreadable reaches the run's log.

Real processes, real signals: train.py runs as a subprocess with `--num_workers 2`, a worker is
found through /proc and killed with SIGKILL, as the out-of-memory killer does.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.data import Dataset

import train
from tests.helpers import REPO, make_image_folder, start_train, tiny_args
from utils.infra.errors import LoaderError
from utils.infra.file_io import safe_load
from utils.infra.flags import default_num_workers
from utils.infra.train_state import last_state_path
from utils.infra.watchdog import WatchedLoader, loader_error

DEADLINE = 180  # s: a regression fails here instead of hanging the suite

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc"
)]  # fmt: skip


def start(tmp_path: Path, **flags) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "run.log"
    return start_train(tiny_args(tmp_path, num_workers=2, **flags), log), log


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # the thread ended
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def session_processes(sid: int) -> list[int]:
    """The live processes of session `sid` (zombies are already dead)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # state, ppid, pgrp, session
            alive.append(int(stat.parent.name))
    return alive


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> tuple[int, str]:
    """Wait for train.py to exit; kill its session and fail if it does not in `timeout`."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"train.py still running after {timeout} s:\n{log.read_text()[-3000:]}")
    deadline = time.monotonic() + 10  # workers die with their parent (PR_SET_PDEATHSIG)
    while session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = session_processes(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"
    return code, log.read_text()


def assert_one_message(text: str) -> str:
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text[-3000:]
    return errors[0]


@pytest.mark.slow
def test_a_killed_worker_ends_the_run_with_one_message_after_saving(tmp_path: Path) -> None:
    proc, log = start(tmp_path, num_steps=100_000, eval_every=0, save_every=2)
    path = last_state_path(tmp_path / "out", "tiny")
    deadline = time.monotonic() + DEADLINE
    while not (path.exists() and children(proc.pid)):  # training, with its workers
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    workers = children(proc.pid)
    os.kill(workers[0], signal.SIGKILL)
    code, text = finish(proc, log, timeout=60)
    assert code == 2, text[-3000:]
    message = assert_one_message(text)
    # torch reports the signal when its SIGCHLD check sees the death first, else only the death.
    assert re.search(
        rf"worker \(pid {workers[0]}\) (is killed by signal: Killed|exited unexpectedly)", message
    ), message
    assert "out-of-memory killer" in message
    saved = int(message.split("Saved the last state at step ")[1].split(";")[0])
    assert safe_load(path)["step"] == saved  # what a stop saves: the step it ended on
    assert "--resume" in message


@pytest.mark.slow
def test_an_error_in_every_worker_is_one_message_and_exit_2(tmp_path: Path) -> None:
    """Every training image unreadable: the workers raise; the run says so once and exits."""
    root = tmp_path / "pics"
    make_image_folder(root, n=4)
    for image in (root / "train").rglob("*.png"):
        image.write_text("not an image")
    proc, log = start(tmp_path, dataset="imagefolder", data_dir=root, train_batch_size=4)
    code, text = finish(proc, log, timeout=DEADLINE)
    assert code == 2, text[-3000:]
    message = assert_one_message(text)
    assert message == "error: No image of the training split can be read (see the warnings)."
    for image in (root / "train").rglob("*.png"):
        named = [line for line in text.splitlines() if f"{image}: PIL cannot identify" in line]
        assert len(named) == 1, (image, text[-3000:])  # by the training process, once


def test_what_a_worker_finds_unreadable_reaches_the_log_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A truncated JPEG in train/, two workers, three epochs: named once, counted in the summary."""
    root = tmp_path / "pics"
    make_image_folder(root, n=4)
    good = root / "train" / "cat" / "0.png"
    truncated = root / "train" / "cat" / "9.jpg"
    Image.open(good).save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:100])
    argv = tiny_args(
        tmp_path, dataset="imagefolder", data_dir=root, num_workers=2, train_batch_size=4
    )
    argv += ["--num_steps", "6", "--eval_every", "3", "--holdout_fraction", "0"]
    with caplog.at_level(logging.WARNING):
        summary = train.main(argv)
    named = [r.getMessage() for r in caplog.records if str(truncated) in r.getMessage()]
    assert len(named) == 1, named  # 6 steps of 2 batches: 3 epochs of the same workers
    assert "Skipping an unreadable image" in named[0]
    assert "truncated or damaged" in named[0]
    assert summary.unreadable_images == 1


@pytest.mark.parametrize(
    ("cpus", "processes", "workers"),
    [(16, "1", 8), (16, "4", 3), (4, "1", 3), (2, "1", 1), (1, "1", 1), (64, "2", 8)],
)
def test_default_workers_follow_the_cpus_of_each_process(
    monkeypatch: pytest.MonkeyPatch, cpus: int, processes: str, workers: int
) -> None:
    """The CPUs this process may run on, shared by the processes of the machine, one left to
    each process itself; at least one worker, at most 8."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
    assert default_num_workers() == workers
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert train.parse_args(["--name", "x"]).num_workers == min(8, max(1, cpus - 1))


# A batch travels from a worker through shared memory (/dev/shm) and file descriptors. Where
# those run out, the worker's queue fails to send it in a background thread, which only prints
# the error: without the watchdog the training process waited LOADER_TIMEOUT (600 s) for it.
FULL_SHM = (
    "unable to allocate shared memory(shm) for file </torch_1_2_3>: No space left on device (28)"
)


class _Unsendable:
    """Fails to be sent as a tensor does when /dev/shm is full (torch's words)."""

    def __reduce__(self):
        raise RuntimeError(FULL_SHM)


class _UnsendableBatches(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> _Unsendable:
        return _Unsendable()


def _keep(items: list) -> list:
    return items


def test_a_batch_a_worker_cannot_send_is_its_error_at_once() -> None:
    loader = WatchedLoader(
        _UnsendableBatches(), batch_size=2, num_workers=1, collate_fn=_keep, timeout=30
    )
    start = time.monotonic()
    with pytest.raises(LoaderError) as info:
        next(iter(loader))
    assert time.monotonic() - start < 15  # not the loader's timeout
    assert str(info.value).startswith(f"A data-loading worker failed: RuntimeError: {FULL_SHM}.")
    assert "/dev/shm" in str(info.value)


SMALL_SHM_LOADER = """
import time, torch
from torch.utils.data import Dataset
from utils.infra.watchdog import WatchedLoader

class Large(Dataset):
    def __len__(self):
        return 8

    def __getitems__(self, indices):
        return {"x": torch.ones(len(indices), 1 << 18)}  # 2 MiB a batch, in 64 KiB of /dev/shm

start = time.monotonic()
try:
    loader = WatchedLoader(Large(), batch_size=2, num_workers=1, collate_fn=lambda b: b, timeout=60)
    next(iter(loader))
except Exception as err:
    print(f"{time.monotonic() - start:.1f} s: {type(err).__name__}: {err}")
"""


def _can_mount_in_a_namespace() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", "/mnt"]
    return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(not _can_mount_in_a_namespace(), reason="needs unprivileged mount namespaces")
def test_a_full_dev_shm_ends_the_loader_at_once(tmp_path: Path) -> None:
    """A real 64 KiB /dev/shm (a tmpfs mounted in a user namespace of the test's own)."""
    script = tmp_path / "loader.py"
    script.write_text(SMALL_SHM_LOADER)
    command = 'mount -t tmpfs -o size=64k tmpfs /dev/shm && exec "$0" "$1"'
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", command, sys.executable, str(script)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    found = re.fullmatch(r"([\d.]+) s: LoaderError: (.*)\n", done.stdout)
    assert found, done.stdout + done.stderr[-3000:]
    assert float(found.group(1)) < 15, found.group(0)  # not the loader's 60 s
    assert "No space left on device" in found.group(2)
    assert "docker run --shm-size" in found.group(2)


@pytest.mark.slow
def test_too_few_file_descriptors_end_the_run_with_one_message(tmp_path: Path) -> None:
    """`ulimit -n 32`: the workers of training or of the first evaluation fail to start or to
    send a batch; the run says so once and exits, whichever comes first."""
    log = tmp_path / "run.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    with log.open("w") as handle:
        proc = subprocess.Popen(
            [sys.executable, "train.py", *tiny_args(tmp_path, num_workers=2)],
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=handle,
            start_new_session=True,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32)),
        )
    code, text = finish(proc, log, timeout=DEADLINE)
    assert code == 2, text[-3000:]
    message = assert_one_message(text)
    assert "ulimit -n" in message


class _Pids(Dataset):
    """Item i is (i, the pid of the process that loaded it)."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, os.getpid()


def test_started_workers_exist_before_the_first_batch_and_serve_every_pass() -> None:
    import multiprocessing

    loader = WatchedLoader(
        _Pids(), batch_size=3, num_workers=2, persistent_workers=True, collate_fn=list
    )
    before = {p.pid for p in multiprocessing.active_children()}
    loader.start_workers()
    started = {p.pid for p in multiprocessing.active_children()} - before
    assert len(started) == 2  # forked now, not at the first batch
    for _ in range(2):  # the batches prefetched at the start are not lost or repeated
        items = [item for batch in loader for item in batch]
        assert sorted(index for index, _ in items) == list(range(10))
        assert {pid for _, pid in items} == started  # the same workers: they persist
    del loader


def _sleep_forever() -> None:
    time.sleep(600)


def test_a_connection_broken_by_a_killed_worker_names_the_worker() -> None:
    """A worker killed while it hands over a batch breaks the connection first (an EOFError or
    ConnectionResetError in the training process): the message names the dead worker, as
    torch's own report of it would, not the limits on passing batches."""
    worker = multiprocessing.get_context("fork").Process(target=_sleep_forever)
    alive = multiprocessing.get_context("fork").Process(target=_sleep_forever)
    worker.start()
    alive.start()
    try:
        os.kill(worker.pid, signal.SIGKILL)
        broken = ConnectionResetError(104, "Connection reset by peer")
        message = str(loader_error(broken, [alive, worker]))
        assert f"worker (pid {worker.pid}) is killed by signal: Killed" in message
        assert "out-of-memory killer" in message
        # with every worker alive, it is the limits on passing batches
        assert "could not pass a batch" in str(loader_error(EOFError(), [alive]))
    finally:
        alive.kill()
        alive.join()
        worker.join()
