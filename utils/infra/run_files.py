"""A run's files: that they can be written, that a new run never overwrites an earlier one's, and
that one run at a time writes them.

A run named NAME owns `<output_dir>/NAME_checkpoint.bin` (+ `.json`), `<output_dir>/NAME_last.pt`
and the TensorBoard event files of its log folder (`--log_dir`) that the folder's run record shows
to be its own. :func:`claim_run`, called before any work, checks every location (a file where a
folder should be, a folder where a file goes, a read-only or uncreatable folder, a name that leaves
the output folder or is not text), refuses a new run whose name already has files unless it
resumes them or overwrites them on purpose, and holds two locks for the run's lifetime:
`<output_dir>/NAME.lock` (one run of a name per output folder) and `<log_dir>/.tensorboard-lock`
(one run per log folder, whatever its name or output folder). A second run refuses to start,
naming the first one's PID.

The run record, `<log_dir>/.run.json`, names the run that logs to the folder and holds its settings
(train.py's flags). The run writes it (:meth:`RunLock.begin`) before its first event file, so every
event file in a folder whose record names the run is provably the run's own: only those count as
its files, only those `--overwrite` deletes, and a run killed before its first save can be started
afresh. Event files that a record does not show to be a run's (another run's log in a shared folder,
a log from before runs recorded themselves) are never deleted: a new run refuses to mix its curves
with them. Programs that plan runs (sweep.py) read the record to recognise a run by its settings.

The locks are POSIX record locks (`fcntl.lockf`; `msvcrt.locking` on Windows). They belong to the
process that took them: the system releases them when it dies in any way (`kill -9` included),
and processes it forks (DataLoader workers) never hold them, even when they outlive it (an
`flock` would be shared with them). A lock file left by a dead process is taken over without
asking. Their pitfall: closing any descriptor of a lock file in the holding process drops its
lock, so only :class:`RunLock` opens it, and a second claim of a held lock in one process is
refused before its file is opened. A lock path is opened without following a symbolic link and
written only when it holds a lock record (or nothing): a link, a hard link, a folder or another
file there is one message, and stays untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from utils.infra.atomic import atomic_write_text, process_alive
from utils.infra.errors import UserError

try:
    import fcntl
except ImportError:  # Windows locks a byte of the file instead
    import msvcrt

    fcntl = None

__all__ = [
    "RUN_RECORD",
    "RunLock",
    "check_folder",
    "check_log_folder",
    "check_name",
    "check_run",
    "claim_run",
    "event_files",
    "read_record",
    "run_files",
    "write_record",
]

logger = logging.getLogger(__name__)

# The files of a run in --output_dir, with what each holds (for the messages).
OUTPUT_FILES = {
    "_checkpoint.bin": "the best model",
    "_checkpoint.json": "its description",
    "_last.pt": "the last training state",
}
EVENTS = "events.out.tfevents.*"  # TensorBoard's event files in the log folder
LOG_LOCK = ".tensorboard-lock"  # never a run's own lock, `<name>.lock`, in a shared folder
RUN_RECORD = ".run.json"  # in the log folder: the run whose event files are there, its settings
LONGEST_SUFFIX = "_checkpoint.json.tmp4194304"  # the longest name a run writes (a temp file)
NAME_MAX = 255  # bytes of one file name on common file systems
RECORD = re.compile(r"(\d+) on (\S*)\n?")  # what a lock file holds: "PID on HOST"
RECORD_MAX = 300  # bytes: a lock file larger than this is not one
NOT_A_LOCK = "is not a lock file (it holds other data, which the lock would overwrite)"

# The locks this process holds, by (folder device, folder inode, file name): opening one of
# them again and closing it would drop the lock.
_HELD: set[tuple[int, int, str]] = set()


class RunLock:
    """A run's exclusive claim on its files, held until :meth:`release` (or the `with` block's end).

    Attributes:
        earlier: the files of an earlier run of this name that `--overwrite` replaces; they are
            deleted only by :meth:`begin` (or :meth:`delete_earlier_run`), once every start-up
            check has passed.
    """

    def __init__(self) -> None:
        self.earlier: list[Path] = []
        self._held: list[tuple[Path, int, tuple[int, int, str]]] = []
        self._run: tuple[Path, str] | None = None  # (log folder, name): what `begin` records

    def take(self, path: Path, refuse: Callable[[str], UserError], fix: str) -> None:
        """Lock `path` for this process too; `refuse(holder)` is raised when another holds it."""
        folder = os.stat(path.parent)
        key = (folder.st_dev, folder.st_ino, path.name)
        if key in _HELD:  # opening it again would drop the lock when closed
            raise refuse(f"PID {os.getpid()} on {socket.gethostname()}: this process")
        while True:
            fd = _open_lock_file(path, fix)
            try:
                if not _try_lock(fd):
                    raise refuse(_holder(_read_record(fd)))
                # The file we locked may have been released and removed since we opened it.
                try:
                    opened, now = os.fstat(fd), os.stat(path, follow_symlinks=False)
                    same = (opened.st_dev, opened.st_ino) == (now.st_dev, now.st_ino)
                except FileNotFoundError:
                    same = False
                previous = _read_record(fd) if same else ""
                if previous and not RECORD.fullmatch(previous):
                    raise UserError(f"{path} {NOT_A_LOCK}. Move it away, or {fix}.")
            except BaseException:
                os.close(fd)
                raise
            if same:
                break
            os.close(fd)
        if previous:  # a holder that died without releasing it (kill -9, power loss)
            logger.info(
                "Took over %s from process %s, which no longer runs.", path, previous.strip()
            )
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode())
        _HELD.add(key)
        self._held.append((path, fd, key))

    def delete_earlier_run(self) -> None:
        """Delete the earlier run's files that `--overwrite` replaces (logged). Idempotent. The
        run record stays until :meth:`begin` replaces it: a kill in between leaves what is left
        of them provably the run's own."""
        for path in self.earlier:
            path.unlink(missing_ok=True)
        if self.earlier:
            logger.warning("--overwrite: deleted the earlier run's %s.", _describe(self.earlier))
        self.earlier = []

    def begin(self, settings: Mapping[str, Any]) -> None:
        """The run starts writing, every start-up check passed: delete the earlier run's files
        (`--overwrite`), then record the run and its `settings` (its flags) in its log folder,
        before its first event file. A resumed run's record is brought up to date (a log from
        before runs recorded themselves becomes its own). Nothing on the other processes under
        torchrun."""
        self.delete_earlier_run()
        if self._run is not None:
            write_record(*self._run, settings)

    def release(self) -> None:
        """Give the run's files up: each lock file is removed, then unlocked. Idempotent."""
        while self._held:
            path, fd, key = self._held.pop()
            with contextlib.suppress(OSError):
                os.unlink(path)  # first: nobody may lock this file once it is unlinked
            os.close(fd)  # releases the lock
            _HELD.discard(key)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def run_files(output_dir: str | os.PathLike, log_dir: str | os.PathLike, name: str) -> list[Path]:
    """The files a run named `name` has written so far: checkpoints, last state, and the event
    files its record shows to be its own (:func:`event_files`)."""
    found = [Path(output_dir) / f"{name}{suffix}" for suffix in OUTPUT_FILES]
    found = [path for path in found if path.is_file()]
    return found + event_files(log_dir, name)[0]


def read_record(log_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run record of a log folder, `{"name": ..., "settings": {flag: value}}`, or None when
    there is none or the file is not one (unreadable, damaged, another program's)."""
    try:
        record = json.loads((Path(log_dir) / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not JSON (UnicodeDecodeError too)
        return None
    valid = (
        isinstance(record, dict)
        and isinstance(record.get("name"), str)
        and isinstance(record.get("settings"), dict)
    )
    return record if valid else None


def write_record(log_dir: str | os.PathLike, name: str, settings: Mapping[str, Any]) -> None:
    """Record (atomically) that the event files of `log_dir` are the run `name`'s, with its
    settings (plain values; others are written as text)."""
    record = {"name": name, "settings": dict(settings)}
    text = json.dumps(record, indent=2, sort_keys=True, default=str)
    atomic_write_text(Path(log_dir) / RUN_RECORD, text + "\n")


def event_files(log_dir: str | os.PathLike, name: str) -> tuple[list[Path], list[Path]]:
    """The TensorBoard event files in `log_dir`: the run `name`'s own (the folder's record names
    it), and the others (another run's, or written without a record)."""
    log = Path(log_dir)
    events = sorted(log.glob(EVENTS)) if log.is_dir() else []
    if not events:
        return [], []
    record = read_record(log)
    own = record is not None and record["name"] == name
    return (events, []) if own else ([], events)


def check_log_folder(log_dir: str | os.PathLike, name: str, *, resume: bool) -> None:
    """Refuse to start the run `name` (or, `resume`, to continue it) in a log folder that holds
    event files that are not provably its own: its curves would mix with them, and they are not
    its to delete. A resumed run may continue a log without a record (it predates records).

    Raises:
        UserError: naming whose log it is, when a record says so.
    """
    others = event_files(log_dir, name)[1]
    if not others:
        return
    record = read_record(log_dir)
    owner = record["name"] if record is not None else None
    if resume and owner is None:
        return
    files = f"{len(others)} TensorBoard event file(s)"
    if owner is not None:
        whose = f"the TensorBoard log of another run, {owner} ({files}, {log_dir}/{RUN_RECORD})"
    else:
        whose = (
            f"{files} that no run record ({RUN_RECORD}) there shows to be {name}'s (another "
            "program's, or a run's from before train.py recorded its runs)"
        )
    fix = (
        f"continue {name} with the --log_dir it logged to"
        if resume
        else "pass another --log_dir (its default, logs/<name>, follows --name), or move them "
        "away (--overwrite deletes only a run's own files)"
    )
    raise UserError(
        f"--log_dir {log_dir} holds {whose}. The curves of {name} would mix with them: {fix}."
    )


def check_run(
    output_dir: str | os.PathLike, log_dir: str | os.PathLike, name: str, *, resume: bool
) -> None:
    """What :func:`claim_run` checks, less what needs a folder created or a lock: for a program
    that plans runs (sweep.py), to refuse one before any of them starts.

    Raises:
        UserError: a bad name or location, or a log folder holding another run's log.
    """
    check_name(name)
    output_dir, log_dir = Path(output_dir), Path(log_dir)
    check_folder(output_dir, "--output_dir", create=False)
    check_folder(log_dir, "--log_dir", create=False)
    _check_output_paths(output_dir, name)
    check_log_folder(log_dir, name, resume=resume)


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
            (`--overwrite`): they are listed in the lock's `earlier`, to delete with
            :meth:`RunLock.begin` once the run's other checks have passed.
        is_main: False on every process but the first under torchrun: it checks and claims
            nothing (only the first process writes the run's files).

    Returns:
        The lock, to release when the run ends (use it as a context manager).

    Raises:
        UserError: a bad name or location; another live run of this name or in this log
            folder; files of an earlier run of this name (without `resume` or `overwrite`);
            a log folder holding event files that are not the run's own (:func:`check_log_folder`);
            or both flags.
    """
    lock = RunLock()
    if not is_main:
        return lock
    check_name(name)
    if resume and overwrite:
        raise UserError(
            "--resume continues the run's files and --overwrite deletes them: pass one of them."
        )
    output_dir, log_dir = Path(output_dir), Path(log_dir)
    check_folder(output_dir, "--output_dir")
    check_folder(log_dir, "--log_dir")
    _check_output_paths(output_dir, name)
    try:
        lock.take(
            output_dir / f"{name}.lock",
            lambda holder: UserError(
                f"Another run named {name} is running ({holder}; it holds {output_dir}/"
                f"{name}.lock). Two runs of one name would mix their files: wait for it to end "
                "or stop it, or choose another --name."
            ),
            "choose another --name",
        )
        lock.take(
            log_dir / LOG_LOCK,
            lambda holder: UserError(
                f"Another run ({holder}) writes its TensorBoard log to --log_dir {log_dir}. Two "
                "runs in one log folder would mix their curves (and an --overwrite would delete "
                "the other's): wait for it to end or stop it, or pass another --log_dir (its "
                "default, logs/<name>, follows --name)."
            ),
            "pass another --log_dir",
        )
        check_log_folder(log_dir, name, resume=resume)  # another run's log is never ours
        earlier = [] if resume else run_files(output_dir, log_dir, name)
        if earlier and not overwrite:
            raise UserError(
                f"A run named {name} already has files: {_describe(earlier)}. A new run would "
                f"overwrite them. To continue that run, add --resume; to start again and delete "
                f"them, add --overwrite; to keep them, choose another --name."
            )
        lock.earlier = earlier
        lock._run = (log_dir, name)
    except BaseException:
        lock.release()
        raise
    return lock


def _suggestion(name: str) -> str:
    """A plain ASCII name close to `name`, for the messages."""
    return re.sub(r"[^\w.-]+", "-", name, flags=re.ASCII).strip(".-") or "run"


def _check_output_paths(output_dir: Path, name: str) -> None:
    """A folder where a run's file goes is found now, not at the first save hours later."""
    for suffix, what in OUTPUT_FILES.items():
        path = output_dir / f"{name}{suffix}"
        if path.is_dir():
            raise UserError(
                f"{path} is a folder, not a file: the run writes {what} there. Move the folder "
                "away, or choose another --name."
            )


def check_name(name: str) -> None:
    """`name` must name files inside the output folder: no separators, no `..`, not empty, text
    that file names (and the UTF-8 of the run's state) can hold."""
    separators = {"/", os.sep, os.altsep or "/"}
    plain = (
        name not in ("", ".", "..")
        and not any(sep in name for sep in separators)
        and "\0" not in name
        and not Path(name).is_absolute()
    )
    if not plain:
        raise UserError(
            f"--name {name!r} must be a plain name: it names the run's files inside --output_dir "
            f"and its log folder, and this one would put them elsewhere. Use e.g. --name "
            f"{_suggestion(name)} (and --output_dir for the folder)."
        )
    locale = sys.getfilesystemencoding()
    for encoding, encode in [(locale, os.fsencode), ("utf-8", lambda text: text.encode("utf-8"))]:
        try:
            encode(name)
        except UnicodeEncodeError as err:
            utf8 = locale.lower().replace("-", "") == "utf8"
            other = "" if utf8 else ", or a UTF-8 locale (e.g. LC_ALL=C.UTF-8)"
            raise UserError(
                f"--name {name!r} cannot name a file: {err.object[err.start : err.end]!r} has no "
                f"{encoding} form (it stands for bytes this locale, {locale}, could not read as "
                f"text). Use e.g. --name {_suggestion(name)}{other}."
            ) from None
    if len(os.fsencode(name + LONGEST_SUFFIX)) > NAME_MAX:
        raise UserError(
            f"--name is {len(os.fsencode(name))} bytes long; file names cannot hold more than "
            f"{NAME_MAX - len(LONGEST_SUFFIX)} of it. Choose a shorter --name."
        )


def check_folder(folder: Path, flag: str, create: bool = True) -> None:
    """Create `folder` and make sure a file can be written in it; without `create`, only that
    neither it nor a folder above it is a file."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder: pass a folder.")
    if not create:
        above = next((p for p in folder.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise UserError(
                f"{flag} {folder} cannot be created: {above} is a file, not a folder. Pass a "
                "folder you can write to."
            )
        return
    problem = "cannot be created"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Permissions alone do not tell (root, read-only mounts, quotas): try it.
        problem = "is not writable"
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(
            f"{flag} {folder} {problem} ({err.strerror or err}): pass a folder you can write to."
        ) from None


def _describe(paths: list[Path]) -> str:
    events = [p for p in paths if p.match(EVENTS)]
    parts = [f"{p} ({OUTPUT_FILES[s]})" for p in paths for s in OUTPUT_FILES if p.name.endswith(s)]
    if events:
        parts.append(f"{len(events)} TensorBoard event file(s) in {events[0].parent}")
    return ", ".join(parts)


def _holder(record: str) -> str:
    """Who holds a lock, from its record; a recorded process that has ended is not named."""
    match = RECORD.fullmatch(record)
    if match is None:
        return "a process whose PID is not recorded"
    pid, host = int(match[1]), match[2]
    if host == socket.gethostname() and pid > 0 and not process_alive(pid):
        return f"its PID is not yet recorded; the recorded process {pid} no longer runs"
    return f"PID {pid} on {host}"


def _read_record(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, RECORD_MAX + 1).decode("utf-8", "replace")
    except OSError:  # Windows: the locked byte cannot be read
        return ""


def _try_lock(fd: int) -> bool:
    """Lock an open file for this process without waiting; False when another one holds it."""
    try:
        if fcntl is not None:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # from offset 0 to the end, any size
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK):
            return False
        raise
    return True


def _open_lock_file(path: Path, fix: str) -> int:
    """Open (or create) a lock file that is this path's own: never through a symbolic link, never
    a folder, a device or a file with another name (a hard link)."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_BINARY", 0), 0o644)
    except OSError as err:
        if path.is_symlink():
            problem = "is a symbolic link (the lock would write the file it points to)"
        elif path.is_dir():
            problem = "is a folder, not a file: the run keeps its lock there"
        else:
            problem = f"cannot be opened ({err.strerror or err})"
        raise UserError(f"{path} {problem}. Remove it, or {fix}.") from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_nlink > 1:
        problem = "is a hard link to another file (the lock would write that file too)"
    elif info.st_size > RECORD_MAX:
        problem = NOT_A_LOCK
    if problem:
        os.close(fd)
        raise UserError(f"{path} {problem}. Move it away, or {fix}.")
    return fd
