"""Atomic file writes: temp file in the same directory, fsync, rename (`os.replace`).

Used for every checkpoint this project writes (`utils.checkpoint_io`, `models.checkpoint`).
Imports nothing of the project but `utils.errors`, so any module can use it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
from collections.abc import Callable
from typing import BinaryIO

from utils.errors import UserError

__all__ = ["atomic_write"]

logger = logging.getLogger(__name__)

_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


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


def _no_space_error(err: BaseException) -> OSError | None:
    """The out-of-space `OSError` behind `err`, if any (torch wraps write errors)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return err
        err = err.__cause__ or err.__context__
    return None


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Write a file so that a crash at any instant leaves the old or the new one, never a torn one.

    `write(handle)` fills `<path>.tmp<pid>` in the same directory; it is flushed and fsynced,
    renamed over `path`, and the directory fsynced. On any error the temporary file is removed
    and `path` is untouched; a full disk becomes a `UserError` that says so. A successful write
    also removes temporary files that writers killed mid-save left behind.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with _open_temp(tmp) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if _no_space_error(err) is not None:
            kept = " The previous file there is unchanged." if os.path.exists(path) else ""
            raise UserError(
                f"No space left on the device while saving {path}.{kept} Free some disk space "
                "or choose another --output_dir, then run again (with --resume to continue)."
            ) from None
        raise
    _fsync_dir(directory)
    _remove_orphaned_temps(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is not ours (PermissionError), or cannot be checked
        return True
    return True


def _remove_orphaned_temps(path: str) -> None:
    """Delete `<path>.tmp<pid>` files of writers that died mid-save (e.g. by `kill -9`)."""
    for stale in glob.glob(f"{glob.escape(path)}.tmp*"):
        pid = stale[len(path) + len(".tmp") :]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(stale)
                logger.info("Removed %s, left by an interrupted save.", stale)
