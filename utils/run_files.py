"""A run's files: that they can be written, that a new run never overwrites an earlier one's, and
that one run at a time writes them.

A run named NAME owns `<output_dir>/NAME_checkpoint.bin` (+ `.json`), `<output_dir>/NAME_last.pt`
and the TensorBoard event files in its log folder. :func:`claim_run`, called before any work,
checks every location (a file where a folder should be, a read-only or uncreatable folder, a
name that leaves the output folder), refuses a new run whose name already has files unless it
resumes them or overwrites them on purpose, and holds `<output_dir>/NAME.lock` for the run's
lifetime, so that a second run of the same name refuses to start, naming the first one's PID.
The lock is an `fcntl.flock` on that file (`msvcrt.locking` on Windows), which the system
releases when its holder dies in any way (`kill -9` included): a lock file left by a dead process
is taken over without asking, never by guessing from PIDs.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import tempfile
from pathlib import Path

from utils.errors import UserError

try:
    import fcntl
except ImportError:  # Windows locks a byte of the file instead
    import msvcrt

    fcntl = None

__all__ = ["RunLock", "claim_run", "run_files"]

logger = logging.getLogger(__name__)

# The files of a run in --output_dir, with what each holds (for the messages).
OUTPUT_FILES = {
    "_checkpoint.bin": "the best model",
    "_checkpoint.json": "its description",
    "_last.pt": "the last training state",
}
EVENTS = "events.out.tfevents.*"  # TensorBoard's event files in the log folder
LONGEST_SUFFIX = "_checkpoint.json.tmp4194304"  # the longest name a run writes (a temp file)
NAME_MAX = 255  # bytes of one file name on common file systems


class RunLock:
    """A run's exclusive claim on its files, held until :meth:`release` (or the `with` block's end).

    Attributes:
        path: the lock file, `<output_dir>/<name>.lock` (None for a process that claims nothing).
    """

    def __init__(self, path: Path | None = None, fd: int | None = None):
        self.path = path
        self._fd = fd

    def release(self) -> None:
        """Give the run's files up: the lock file is removed, then unlocked. Idempotent."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # first: nobody may lock this file once it is unlinked
        os.close(self._fd)  # releases the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def run_files(output_dir: str | os.PathLike, log_dir: str | os.PathLike, name: str) -> list[Path]:
    """The files a run named `name` has written so far (checkpoints, last state, event files)."""
    found = [Path(output_dir) / f"{name}{suffix}" for suffix in OUTPUT_FILES]
    found = [path for path in found if path.is_file()]
    log = Path(log_dir)
    return found + (sorted(log.glob(EVENTS)) if log.is_dir() else [])


def claim_run(
    output_dir: str | os.PathLike,
    log_dir: str | os.PathLike,
    name: str,
    *,
    resume: bool,
    overwrite: bool,
    is_main: bool = True,
) -> RunLock:
    """Check a run's output locations and claim its files, before any work starts.

    Args:
        output_dir: where the checkpoints and the last state go (`--output_dir`); created.
        log_dir: the TensorBoard folder (`--log_dir`); created.
        name: the run's name (`--name`): a plain file name.
        resume: the run continues its files (`--resume`).
        overwrite: a new run may replace the files of an earlier run of this name
            (`--overwrite`): they are deleted here, before it starts.
        is_main: False on every process but the first under torchrun: it checks and claims
            nothing (only the first process writes the run's files).

    Returns:
        The lock, to release when the run ends (use it as a context manager).

    Raises:
        UserError: a bad name or location; another live run of this name; files of an
            earlier run of this name (without `resume` or `overwrite`); or both flags.
    """
    if not is_main:
        return RunLock()
    _check_name(name)
    if resume and overwrite:
        raise UserError(
            "--resume continues the run's files and --overwrite deletes them: pass one of them."
        )
    output_dir, log_dir = Path(output_dir), Path(log_dir)
    _check_folder(output_dir, "--output_dir")
    _check_folder(log_dir, "--log_dir")
    lock = _lock(output_dir / f"{name}.lock", name)
    try:
        earlier = [] if resume else run_files(output_dir, log_dir, name)
        if earlier and not overwrite:
            raise UserError(
                f"A run named {name} already has files: {_describe(earlier)}. A new run would "
                f"overwrite them. To continue that run, add --resume; to start again and delete "
                f"them, add --overwrite; to keep them, choose another --name."
            )
        for path in earlier:
            path.unlink()
        if earlier:
            logger.warning("--overwrite: deleted the earlier run's %s.", _describe(earlier))
    except BaseException:
        lock.release()
        raise
    return lock


def _check_name(name: str) -> None:
    """`name` must name files inside the output folder: no separators, no `..`, not empty."""
    separators = {"/", os.sep, os.altsep or "/"}
    plain = (
        name not in ("", ".", "..")
        and not any(sep in name for sep in separators)
        and "\0" not in name
        and not Path(name).is_absolute()
    )
    if not plain:
        suggestion = re.sub(r"[^\w.-]+", "-", name).strip(".-") or "run"
        raise UserError(
            f"--name {name!r} must be a plain name: it names the run's files inside --output_dir "
            f"and its log folder, and this one would put them elsewhere. Use e.g. --name "
            f"{suggestion} (and --output_dir for the folder)."
        )
    if len((name + LONGEST_SUFFIX).encode()) > NAME_MAX:
        raise UserError(
            f"--name is {len(name.encode())} bytes long; file names cannot hold more than "
            f"{NAME_MAX - len(LONGEST_SUFFIX)} of it. Choose a shorter --name."
        )


def _check_folder(folder: Path, flag: str) -> None:
    """Create `folder` and make sure a file can be written in it."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder: pass a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"{flag} {folder} cannot be created ({err.strerror or err}): pass a folder you can "
            "write to."
        ) from None
    try:  # permissions alone do not tell (root, read-only mounts, quotas): try it
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(
            f"{flag} {folder} is not writable ({err.strerror or err}): pass a folder you can "
            "write to."
        ) from None


def _describe(paths: list[Path]) -> str:
    events = [p for p in paths if p.match(EVENTS)]
    parts = [f"{p} ({OUTPUT_FILES[s]})" for p in paths for s in OUTPUT_FILES if p.name.endswith(s)]
    if events:
        parts.append(f"{len(events)} TensorBoard event file(s) in {events[0].parent}")
    return ", ".join(parts)


def _refuse(path: Path, name: str) -> UserError:
    try:
        holder = path.read_text(encoding="utf-8").strip() or "unknown"
    except OSError:
        holder = "unknown"
    return UserError(
        f"Another run named {name} is running (PID {holder}; it holds {path}). Two runs of one "
        "name would mix their files: wait for it to end or stop it, or choose another --name."
    )


def _try_lock(fd: int) -> bool:
    """Lock an open file for this process without waiting; False when another one holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK):
            return False
        raise
    return True


def _lock(path: Path, name: str) -> RunLock:
    """Take `path` for this process, or raise naming the live process that holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            raise _refuse(path, name)
        try:  # the file we locked may have been released and removed since we opened it
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = os.read(fd, 100).decode("utf-8", "replace").strip()
    if previous:  # a holder that died without releasing it (kill -9, power loss)
        logger.info("Took over %s from process %s, which no longer runs.", path, previous)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode())
    return RunLock(path, fd)
