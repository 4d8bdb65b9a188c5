"""utils.infra.run_files: a run's locations are checked first, earlier runs are never overwritten by
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

from utils.infra.errors import UserError
from utils.infra.file_io import atomic_save, save_checkpoint
from utils.infra.run_files import RUN_RECORD, claim_run, read_record, run_files

ROOT = Path(__file__).resolve().parents[1]


def _log(log_dir: Path, step: int = 40) -> list[Path]:
    """Write a TensorBoard event file into `log_dir`, as a run does; the folder's event files."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(log_dir)) as writer:
        writer.add_scalar("test/accuracy", 0.25, step)
    return sorted(log_dir.glob("events.out.tfevents.*"))


def _earlier_run(
    tmp_path: Path, name: str = "run", logs: Path | None = None, saved: bool = True
) -> dict[Path, bytes]:
    """The files a run leaves (written in the order train.py writes them), by path: finished, or
    killed before its first save (`saved=False`: its record and an event file)."""
    out, logs = tmp_path / "out", logs or tmp_path / "logs" / name
    with claim_run(out, logs, name, resume=False, overwrite=False) as lock:
        lock.begin({"name": name, "seed": 42})
        _log(logs)
        if saved:
            save_checkpoint({"w": torch.ones(3)}, out / f"{name}_checkpoint.bin", step=40)
            atomic_save({"step": 40}, out / f"{name}_last.pt")
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


def test_overwrite_deletes_the_earlier_run_when_asked(tmp_path, caplog) -> None:
    files = _earlier_run(tmp_path)
    with caplog.at_level(logging.WARNING), _claim(tmp_path, overwrite=True) as lock:
        assert {p: p.read_bytes() for p in files} == files  # kept until every check has passed
        lock.delete_earlier_run()
        assert not any(path.exists() for path in files)
    assert "--overwrite: deleted the earlier run's" in caplog.text
    with pytest.raises(UserError, match="pass one of them"):
        _claim(tmp_path, resume=True, overwrite=True)


def test_a_run_killed_before_its_first_save_is_started_afresh_with_overwrite(tmp_path) -> None:
    """Its event file is its own by its record: listed as its file, and --overwrite deletes it;
    the new run's record replaces the old one only after it is gone."""
    files = _earlier_run(tmp_path, saved=False)
    (events,) = files
    with pytest.raises(UserError, match="A run named run already has files: 1 TensorBoard"):
        _claim(tmp_path)
    with _claim(tmp_path, overwrite=True) as lock:
        lock.begin({"name": "run", "seed": 7})
    assert not events.exists()
    assert read_record(tmp_path / "logs" / "run")["settings"] == {"name": "run", "seed": 7}
    with _claim(tmp_path):  # nothing of its own left: a new run starts
        pass


def test_another_runs_log_in_a_shared_folder_is_never_a_runs_own(tmp_path) -> None:
    """Runs a and b log to one folder: b's refusal names a's log as a's, and neither b's
    --overwrite nor its --resume touches it; a's own --overwrite replaces it."""
    shared = tmp_path / "logs"
    files = _earlier_run(tmp_path, name="a", logs=shared)
    events = [p for p in files if p.parent == shared]
    assert len(events) == 1
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(UserError) as info:
            claim_run(tmp_path / "out", shared, "b", **{"resume": False, "overwrite": False,
                                                        **flags})  # fmt: skip
        message = str(info.value)
        assert f"--log_dir {shared} holds the TensorBoard log of another run, a (1 " in message
        assert "already has files" not in message
        assert "The curves of b would mix with them" in message
        assert {p: p.read_bytes() for p in files} == files  # untouched
    assert run_files(tmp_path / "out", shared, "b") == []
    with claim_run(tmp_path / "out", shared, "a", resume=False, overwrite=True) as lock:
        lock.begin({"name": "a"})
    assert not any(path.exists() for path in files)


def test_a_log_without_a_record_is_nobodys_to_delete_but_a_resume_continues_it(tmp_path) -> None:
    """Event files that no record shows to be a run's (another program's, or a run's from before
    runs recorded themselves): a new run refuses, --overwrite included, and deletes nothing; a
    resume takes them as its log and records it, so a later --overwrite replaces them."""
    logs = tmp_path / "logs" / "run"
    (events,) = _log(logs)
    for overwrite in (False, True):
        unrecorded = r"holds 1 TensorBoard event file\(s\) that no run record \(\.run\.json\)"
        with pytest.raises(UserError, match=unrecorded + " there shows to be run's"):
            _claim(tmp_path, overwrite=overwrite)
        assert events.is_file()
    assert run_files(tmp_path / "out", logs, "run") == []
    with _claim(tmp_path, resume=True) as lock:
        lock.begin({"name": "run"})
    assert run_files(tmp_path / "out", logs, "run") == [events]
    with _claim(tmp_path, overwrite=True) as lock:
        lock.begin({"name": "run"})
    assert not events.exists()


@pytest.mark.parametrize("record", ["{not json", "[]", '{"name": 3, "settings": {}}', "\udcff"])
def test_a_damaged_record_shows_nothing_to_be_a_runs(tmp_path, record) -> None:
    logs = tmp_path / "logs" / "run"
    (events,) = _log(logs)
    (logs / RUN_RECORD).write_bytes(record.encode("utf-8", "surrogateescape"))
    assert read_record(logs) is None
    with pytest.raises(UserError, match="no run record"):
        _claim(tmp_path, overwrite=True)
    assert events.is_file()


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
    from utils.infra.run_files import claim_run
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


_FORKING_HOLDER = textwrap.dedent(
    """
    import multiprocessing, os, sys, time
    from utils.infra.run_files import claim_run
    lock = claim_run(sys.argv[1], sys.argv[2], "run", resume=False, overwrite=False)
    # As a DataLoader worker is: forked while the lock is held, and outliving its parent.
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
    child.start()
    print(os.getpid(), child.pid, flush=True)
    os.kill(os.getpid(), 9)
    """
)


@pytest.mark.skipif(os.name != "posix", reason="needs fork")
def test_children_of_a_killed_run_do_not_keep_its_lock(tmp_path, caplog) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _FORKING_HOLDER, str(tmp_path / "out"), str(tmp_path / "logs")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    pid, child = map(int, proc.stdout.readline().split())
    try:
        assert proc.wait(timeout=60) == -signal.SIGKILL
        os.kill(child, 0)  # the forked child still runs and still has the lock file open
        with (
            caplog.at_level(logging.INFO),
            claim_run(tmp_path / "out", tmp_path / "logs", "run", resume=True, overwrite=False),
        ):
            pass
        assert f"from process {pid} on" in caplog.text
    finally:
        os.kill(child, signal.SIGKILL)
        proc.stdout.close()


def test_a_dead_process_is_never_named_as_running(tmp_path) -> None:
    proc, _ = _holder(tmp_path, "release")
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)  # fmt: skip
        dead_pid = int(dead.stdout)
        # A record that names a process that has ended (as a holder that has not yet written
        # its own PID leaves it); the lock itself is held by a live process.
        with open(tmp_path / "out" / "run.lock", "r+") as record:
            record.write(f"{dead_pid} on {os.uname().nodename}\n")
            record.truncate()
        with pytest.raises(UserError) as info:
            claim_run(tmp_path / "out", tmp_path / "logs", "run", resume=True, overwrite=False)
        message = str(info.value)
        assert "Another run named run is running" in message
        assert f"PID {dead_pid}" not in message
        assert f"{dead_pid} no longer runs" in message
    finally:
        proc.communicate("go\n", timeout=60)


def test_one_log_folder_belongs_to_one_run(tmp_path) -> None:
    """A run of the same name in another --output_dir but the same --log_dir is refused, and
    its --overwrite deletes nothing of the live run's log."""
    proc, pid = _holder(tmp_path, "release")
    events = tmp_path / "logs" / "events.out.tfevents.1.host.1.0"
    events.write_bytes(b"live run's curves")
    (tmp_path / "logs" / RUN_RECORD).write_text('{"name": "run", "settings": {}}')  # as it would
    try:
        for name, overwrite in [("run", True), ("other", False)]:
            with pytest.raises(UserError) as info:
                claim_run(tmp_path / "out2", tmp_path / "logs", name, resume=False,
                          overwrite=overwrite)  # fmt: skip
            message = str(info.value)
            assert f"PID {pid} on " in message
            assert f"--log_dir {tmp_path / 'logs'}" in message
            assert "mix their curves" in message
        assert events.read_bytes() == b"live run's curves"
        assert sorted(os.listdir(tmp_path / "out2")) == []  # the refused runs hold nothing
    finally:
        proc.communicate("go\n", timeout=60)
    with claim_run(
        tmp_path / "out2", tmp_path / "logs", "run", resume=False, overwrite=True
    ) as lock:
        lock.delete_earlier_run()
    assert not events.exists()  # once that run of this name has ended, --overwrite may delete it


def test_one_process_cannot_claim_a_run_twice(tmp_path) -> None:
    with _claim(tmp_path):
        with pytest.raises(UserError, match=f"is running \\(PID {os.getpid()} on "):
            _claim(tmp_path)
        with pytest.raises(UserError, match="mix their curves"):
            claim_run(tmp_path / "out2", tmp_path / "logs" / "run", "run", resume=False,
                      overwrite=False)  # fmt: skip
        # The refusals left the first claim intact: another process is still refused.
        proc = subprocess.run([sys.executable, "-c", _HOLDER, str(tmp_path / "out"),
                               str(tmp_path / "logs" / "run"), "release"], cwd=ROOT,
                              input="go\n", capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 1
        assert f"is running (PID {os.getpid()} on " in proc.stderr


@pytest.mark.skipif(os.name != "posix", reason="symbolic and hard links")
@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda path, victim: path.symlink_to(victim), "is a symbolic link"),
        (lambda path, victim: os.link(victim, path), "is a hard link"),
        # e.g. a poetry.lock in --output_dir .
        (lambda path, victim: path.write_bytes(victim.read_bytes()), "is not a lock file"),
    ],
    ids=["symlink", "hard link", "foreign file"],
)
def test_a_lock_path_that_is_not_a_lock_file_is_never_written(tmp_path, make, says) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("the user's data\n")
    (tmp_path / "out").mkdir()
    make(tmp_path / "out" / "run.lock", victim)
    with pytest.raises(UserError, match=f"run.lock {says}.*choose another --name"):
        _claim(tmp_path)
    assert victim.read_text() == "the user's data\n"
    assert (tmp_path / "out" / "run.lock").read_text() == "the user's data\n"


@pytest.mark.parametrize("where", ["run.lock", "run_checkpoint.bin", "run_checkpoint.json",
                                   "run_last.pt"])  # fmt: skip
def test_a_folder_where_a_run_file_goes_is_found_at_start_up(tmp_path, where) -> None:
    (tmp_path / "out" / where).mkdir(parents=True)
    for resume in (False, True):
        with pytest.raises(UserError, match=f"{where} is a folder, not a file.*another --name"):
            _claim(tmp_path, resume=resume)
    assert not (tmp_path / "out" / "run.lock").is_file()


@pytest.mark.parametrize("name", ["\udcff", "a\ud800b"])
def test_a_name_that_is_not_text_is_one_message(tmp_path, name) -> None:
    with pytest.raises(
        UserError, match=r"--name .* cannot name a file.*Use e\.g\. --name (run|a-b)\."
    ):
        _claim(tmp_path, name=name)
    assert sorted(os.listdir(tmp_path)) == []
