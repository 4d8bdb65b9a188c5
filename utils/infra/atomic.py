"""Writes that never leave a torn file: to a temporary file beside the target, flushed and
fsynced, then renamed over it (`os.replace` is atomic on POSIX and Windows), so a crash or
`kill -9` at any instant leaves either the old or the new file. A full disk or the file size
limit becomes one `UserError` that says what to do.

Imports no torch: the run records (`utils.infra.run_files`) are written through it before a
script has loaded torch; `utils.infra.file_io` builds checkpoints and sidecars on it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from utils.infra.errors import UserError

__all__ = [
    "RUN_AGAIN",
    "atomic_write",
    "atomic_write_text",
    "cleaned_up",
    "commit_temp",
    "file_sha256",
    "process_alive",
    "write_temp",
]

logger = logging.getLogger(__name__)

_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_TOO_LARGE = (errno.EFBIG,)  # the file size limit (`ulimit -f`; Python ignores SIGXFSZ)


def _fsync_dir(directory: str) -> None:
    """Make a rename durable. Not possible on every platform (Windows); skipped there."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_temp(path: str):
    """The temporary file a write goes to first (a hook the tests use to simulate a full disk)."""
    return open(path, "wb")


def _write_error(err: BaseException, codes: tuple[int, ...]) -> OSError | None:
    """The `OSError` with one of `codes` behind `err`, if any (torch wraps write errors)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in codes:
            return err
        err = err.__cause__ or err.__context__
    return None


class _HashingWriter:
    """A file handle that hashes the bytes written through it.

    The hash is the file's only while writes are sequential: a writer that seeks (zip files,
    `np.savez`) marks it unusable, and the file is hashed again from disk.
    """

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.sequential = True

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.handle.write(data)

    def seek(self, *args) -> int:
        self.sequential = False
        return self.handle.seek(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)


# What to do after a full disk, when the caller does not say: a training run's files.
RUN_AGAIN = "choose another --output_dir, then run again (with --resume to continue)"


@contextlib.contextmanager
def cleaned_up(tmp: str, path: str, then: str = RUN_AGAIN) -> Iterator[None]:
    """On any error, remove `tmp`; a full disk or the file size limit becomes a `UserError`
    whose advice ends with `then` (the flags of the script that writes)."""
    try:
        yield
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        kept = " The previous file there is unchanged." if os.path.exists(path) else ""
        if _write_error(err, _NO_SPACE) is not None:
            raise UserError(
                f"No space left on the device while saving {path}.{kept} Free some disk space "
                f"or {then}."
            ) from None
        if _write_error(err, _TOO_LARGE) is not None:
            raise UserError(
                f"The file size limit was reached while saving {path}.{kept} Raise it "
                f"(`ulimit -f unlimited`, or ask the administrator of the system) or {then}."
            ) from None
        raise


def write_temp(
    path: str, write: Callable[[BinaryIO], object], then: str = RUN_AGAIN
) -> tuple[str, str]:
    """Fill `<path>.tmp<pid>` with `write(handle)`, flush and fsync it.

    Returns:
        (the temporary file, the SHA-256 of its bytes).
    """
    tmp = f"{path}.tmp{os.getpid()}"
    with cleaned_up(tmp, path, then):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with _open_temp(tmp) as handle:
            writer = _HashingWriter(handle)
            write(writer)
            handle.flush()
            os.fsync(handle.fileno())
        digest = writer.sha256.hexdigest() if writer.sequential else file_sha256(tmp)
    return tmp, digest


def commit_temp(tmp: str, path: str, then: str = RUN_AGAIN) -> None:
    """Rename the temporary file over `path` and make the rename durable."""
    with cleaned_up(tmp, path, then):
        os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    _remove_orphaned_temps(path)


def atomic_write(
    path: str | os.PathLike, write: Callable[[BinaryIO], object], then: str = RUN_AGAIN
) -> str:
    """Write a file so that a crash at any instant leaves the old or the new one, never a torn one.

    `write(handle)` fills `<path>.tmp<pid>` in the same directory; it is flushed and fsynced,
    renamed over `path`, and the directory fsynced. On any error the temporary file is removed
    and `path` is untouched; a full disk or the file size limit (`ulimit -f`) becomes a
    `UserError` that says so and advises to free space or `then` (the default names
    train.py's flags). A successful write also removes temporary files that writers killed
    mid-save left behind.

    Returns:
        The SHA-256 (hex) of the bytes written, as `sha256sum` prints it.
    """
    path = os.fspath(path)
    tmp, digest = write_temp(path, write, then)
    commit_temp(tmp, path, then)
    return digest


def _remove_orphaned_temps(path: str) -> None:
    """Delete `<path>.tmp<pid>` files of writers that died mid-save (e.g. by `kill -9`)."""
    for stale in glob.glob(f"{glob.escape(path)}.tmp*"):
        pid = stale[len(path) + len(".tmp") :]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(stale)
                logger.info("Removed %s, left by an interrupted save.", stale)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file (a JSON sidecar, a run record) atomically, as `atomic_write`."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of a file's bytes, as `sha256sum` prints it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists, also under another user (signal 0 only asks). Elsewhere
    than POSIX it is taken to exist: there `os.kill(pid, 0)` would send a Ctrl+C event."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is not ours (PermissionError), or cannot be checked
        pass
    return True
