"""Files that never lose work: atomic writes, safe loads, and the JSON sidecars of checkpoints.

Every write goes to a temporary file in the same directory, is flushed and fsynced, then renamed
over the target (`os.replace` is atomic on POSIX and Windows), so a crash or `kill -9` at any
instant leaves either the old or the new file, never a torn one. Every read of a PyTorch file
uses `torch.load(weights_only=True)`: a checkpoint can hold tensors and plain Python values only
and never runs code.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import safetensors
import safetensors.torch
import torch

from models.npz import CheckpointError
from utils.errors import UserError

__all__ = [
    "SAFETENSORS_SUFFIX",
    "atomic_save",
    "atomic_write",
    "atomic_write_text",
    "load_safetensors",
    "read_sidecar",
    "safe_load",
    "safetensors_info",
    "save_npz",
    "save_safetensors",
    "sidecar_path",
    "write_sidecar",
]

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


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)` that leaves either the old or the new file, never a torn one.

    Writes to `<path>.tmp<pid>` in the same directory, flushes and fsyncs it, renames it over
    `path` and fsyncs the directory. On any error the temporary file is removed and `path` is
    untouched.

    Raises:
        UserError: the disk (or quota) is full; names the path and the fix.
    """
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file (e.g. a JSON sidecar) atomically, like :func:`atomic_save`."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Write arrays as an uncompressed `.npz` (the official checkpoint format), atomically."""
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


# --------------------------------------------------------------------------------------------
# Safe loading


def safe_load(path: str | os.PathLike) -> Any:
    """`torch.load` restricted to tensors and plain Python values, onto the CPU.

    Raises:
        UserError: the file is missing, truncated or not a PyTorch file, or it holds pickled
            objects that would need code to rebuild (such a file is never loaded).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a directory, not a checkpoint file" if os.path.isdir(path) else "does not exist"
        raise CheckpointError(
            f"Checkpoint {path} {what}. Pass the .bin/.pt file train.py wrote (e.g. "
            "output/<name>_checkpoint.bin) or an official .npz."
        )
    if path.endswith(".npz") or (zipfile.is_zipfile(path) and _looks_like_npz(path)):
        raise CheckpointError(
            f"{path} is a NumPy .npz checkpoint, not a PyTorch one; load it with "
            "models.npz.load_npz (eval.py and train.py accept it directly)."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:
            raise CheckpointError(
                f"{path} holds pickled Python objects besides tensors ({found.group(1)}, e.g. a "
                "whole model or custom classes); loading it could run code, so it is refused. "
                "Re-save only plain data: torch.save(model.state_dict(), path)."
            ) from None
        raise CheckpointError(_corrupt_message(path, err)) from None
    except Exception as err:  # a damaged file fails in many ways (zip, pickle, storage)
        raise CheckpointError(_corrupt_message(path, err)) from None


def _looks_like_npz(path: str) -> bool:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return bool(names) and all(name.endswith(".npy") for name in names)


def _corrupt_message(path: str, err: BaseException) -> str:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"{path} is not a readable PyTorch checkpoint: it is truncated, corrupt or another kind "
        f"of file ({type(err).__name__}: {first_line[:200]}). Use another checkpoint, e.g. the "
        "previous one, or train again."
    )


# --------------------------------------------------------------------------------------------
# Sidecars: what a best checkpoint is (eval.py reads them for its defaults)


def sidecar_path(checkpoint: str | os.PathLike) -> Path:
    """`output/x_checkpoint.bin` -> `output/x_checkpoint.json`."""
    return Path(checkpoint).with_suffix(".json")


def write_sidecar(checkpoint: str | os.PathLike, **info: Any) -> None:
    """Describe a checkpoint in its JSON sidecar, atomically.

    Conventional keys: model_type, img_size, num_classes, dataset, class_names, step, accuracy.
    """
    atomic_write_text(sidecar_path(checkpoint), json.dumps(info, indent=2, sort_keys=True) + "\n")


def read_sidecar(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of `checkpoint`, or {} when there is none (a `.safetensors` file carries its
    own, in its metadata).

    Raises:
        CheckpointError: the sidecar exists but is not valid JSON.
    """
    if os.fspath(checkpoint).endswith(SAFETENSORS_SUFFIX):
        return safetensors_info(checkpoint)
    path = sidecar_path(checkpoint)
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} (the description next to the checkpoint) is not valid JSON ({err}); delete "
            "it and pass --model_type, --img_size and --dataset explicitly."
        ) from None
    return info if isinstance(info, dict) else {}


# --------------------------------------------------------------------------------------------
# safetensors: the weights and what a sidecar would say, in one file. Every metadata value is
# JSON text ("img_size": "[384, 384]"), so a file carries the same facts as a `.json` sidecar;
# "format": "pt" marks PyTorch tensors, as other safetensors writers do.


SAFETENSORS_SUFFIX = ".safetensors"


def save_safetensors(
    path: str | os.PathLike, state: Mapping[str, torch.Tensor], info: Mapping[str, Any]
) -> None:
    """Write a state dict and its description as one `.safetensors` file, atomically.

    Args:
        path: the file to write.
        state: tensors by name (each stored contiguous, on the CPU).
        info: JSON-serialisable facts (model_type, img_size, class_names, ...); each value is
            stored as its JSON text.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {"format": "pt", **{k: json.dumps(v) for k, v in info.items() if v is not None}}
    data = safetensors.torch.save(tensors, metadata=metadata)
    atomic_write(path, lambda handle: handle.write(data))


@contextlib.contextmanager
def _reading(path: str) -> Iterator[None]:
    """Turn a missing or unreadable file into a `CheckpointError` that says what to do."""
    if not os.path.isfile(path):
        raise CheckpointError(
            f"Checkpoint {path} does not exist. Pass a .safetensors file that export.py wrote."
        )
    try:
        yield
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable .safetensors file: it is truncated or another kind of "
            f"file ({err}). Export it again."
        ) from None


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file, on the CPU.

    Raises:
        CheckpointError: missing, truncated or not a safetensors file.
    """
    path = os.fspath(path)
    with _reading(path):
        return safetensors.torch.load_file(path, device="cpu")


def safetensors_info(path: str | os.PathLike) -> dict[str, Any]:
    """The description stored in a `.safetensors` file (the header only is read).

    Values written by :func:`save_safetensors` come back as the Python values they were;
    values another writer stored as plain text stay strings. `"format"` is left out.

    Raises:
        CheckpointError: missing, truncated or not a safetensors file.
    """
    path = os.fspath(path)
    with _reading(path), safetensors.safe_open(path, framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
    info: dict[str, Any] = {}
    for key, text in metadata.items():
        if key == "format":
            continue
        try:
            info[key] = json.loads(text)
        except ValueError:
            info[key] = text
    return info
