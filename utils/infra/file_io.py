"""Files that never lose work: atomic writes, safe loads, and the JSON sidecars of checkpoints.

Every write goes to a temporary file in the same directory, is flushed and fsynced, then renamed
over the target (`os.replace` is atomic on POSIX and Windows), so a crash or `kill -9` at any
instant leaves either the old or the new file, never a torn one. Every read of a PyTorch file
uses `torch.load(weights_only=True)`: a checkpoint can hold tensors and plain Python values only
and never runs code.

Damage after the write (a disk or copy error, an edit) is caught on load: a best checkpoint's
SHA-256 is recorded in its sidecar (`save_checkpoint`; `sha256sum` prints the same value), a
training state carries the SHA-256 of its own content (`with_content_sha256`), as an exported
`.safetensors` file does in its metadata, and a description (sidecar or metadata) carries a
`description_sha256` over that hash and the fields that label predictions. `safe_load`,
`load_safetensors` and `read_sidecar` verify them when present; files written before hashes
existed load as before (`utils.infra.loading` warns that they are not verified).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import safetensors
import safetensors.torch
import torch

from models.npz import CheckpointError
from utils.infra.atomic import (
    atomic_write,
    atomic_write_text,
    cleaned_up,
    commit_temp,
    file_sha256,
    write_temp,
)
from utils.infra.description import (
    DESCRIPTION_SHA256,
    SAFETENSORS_SUFFIX,
    check_description,
    description_sha256,
)
from utils.infra.errors import UserError

__all__ = [
    "CONTENT_SHA256",
    "atomic_save",
    "cannot_write",
    "check_output",
    "checkpoint_files",
    "content_sha256",
    "load_safetensors",
    "read_sidecar",
    "safe_load",
    "safetensors_info",
    "save_checkpoint",
    "save_npz",
    "save_safetensors",
    "sidecar_path",
    "with_content_sha256",
    "write_output",
    "write_sidecar",
]

logger = logging.getLogger(__name__)

CONTENT_SHA256 = "content_sha256"  # the key of a training state's own content hash


def cannot_write(path: str | os.PathLike, why: str, flag: str = "--output") -> UserError:
    """The error of an output file that cannot be written: what, why, and the flag to change."""
    return UserError(f"Cannot write {os.fspath(path)}: {why}. Pass another {flag}.")


def checkpoint_files(checkpoint: str | os.PathLike) -> list[Path]:
    """What a script reads of a checkpoint and must never write over: the file (or folder) and,
    for a file, its `.json` sidecar."""
    path = Path(checkpoint)
    return [path] if path.is_dir() else [path, sidecar_path(path)]


def _overlaps(output: Path, read: Path) -> bool:
    """Whether writing `output` would replace `read` or something inside or around it."""
    if output.exists() and read.exists() and os.path.samefile(output, read):  # hard links too
        return True
    out, inp = output.resolve(), read.resolve()
    return out == inp or out in inp.parents or inp in out.parents


def check_output(
    path: str | os.PathLike,
    flag: str = "--output",
    *,
    overwrite: bool,
    folder: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
    earlier: Callable[[Path], bool] | None = None,
) -> None:
    """The one rule for a file (or folder) a script writes where `flag` says, checked before
    any work: never the script's own input, never an existing output without `overwrite`, and
    with it only a regular file (or, for a folder, one that `earlier` recognises as written by
    an earlier run of the same kind). The write itself is atomic (`write_output`).

    Args:
        overwrite: the user's `--overwrite`.
        folder: the output is a folder (a Hugging Face export), not a file.
        inputs: what the script reads (`checkpoint_files`): refused as an output even with
            `overwrite`, as is a folder holding them or a path inside them.
        earlier: for a folder, whether an existing one is an earlier output of this kind;
            any other folder is never replaced.

    Raises:
        UserError: one of the above, the wrong kind (folder or file), or its nearest existing
            folder is not a writable folder.
    """
    path = Path(path)
    if path.is_dir() and not folder:
        raise cannot_write(path, "it is a directory, not a file", flag)
    if folder and path.exists() and not path.is_dir():
        raise cannot_write(path, "it is a file, and a folder is written there", flag)
    for read in inputs:
        if _overlaps(path, Path(read)):
            raise cannot_write(path, f"{read} is read from there, and is never replaced", flag)
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise cannot_write(path, "it is a device, pipe or socket, not a regular file", flag)
    if path.is_dir() and any(path.iterdir()) and not (earlier and earlier(path)):
        raise cannot_write(
            path, "it is a folder holding other files than an earlier export wrote", flag
        )
    if path.exists() and not overwrite:
        raise UserError(
            f"{path} already exists; pass --overwrite to replace it, or another {flag}."
        )
    parent = path.absolute().parent
    while not parent.exists():  # the writers create the missing folders
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise cannot_write(path, f"{parent} is not a writable folder", flag)


@contextlib.contextmanager
def writing(path: str | os.PathLike, flag: str = "--output") -> Iterator[None]:
    """Turn a failed write under it (permissions, a file where a folder should be, a full
    disk) into one `UserError` naming the output and the `flag` to change."""
    try:
        yield
    except OSError as err:
        raise cannot_write(path, err.strerror or str(err), flag) from None


def write_output(
    path: str | os.PathLike, write: Callable[[BinaryIO], object], flag: str = "--output"
) -> str:
    """Write an output file of a script (a prediction table, an export, a figure) atomically, or
    explain why not: every failure is one `UserError` naming the file and the `flag` to change.

    Only a regular file is ever replaced (`check_output` says what else is refused).

    Returns:
        The SHA-256 (hex) of the bytes written.
    """
    if os.path.exists(path) and not os.path.isfile(path):  # a device node, a pipe, a folder
        raise cannot_write(path, "it is not a regular file, and only one is ever replaced", flag)
    with writing(path, flag):
        return atomic_write(path, write, then=f"pass another {flag}, then run again")


def atomic_save(obj: Any, path: str | os.PathLike) -> str:
    """`torch.save(obj, path)` through `atomic_write`; returns the file's SHA-256 (hex)."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def save_checkpoint(state: Mapping[str, torch.Tensor], path: str | os.PathLike, **info: Any) -> str:
    """Write a best checkpoint (`torch.save(state)`) and its sidecar, with the checkpoint's SHA-256.

    A crash at any instant leaves a pair that loads: the checkpoint goes to its temporary file
    first; then the sidecar (`info`, `sha256` of the new file and `previous_sha256` of the one
    still in place) replaces the old sidecar; then the checkpoint is renamed into place. Killed
    between the two renames, the previous checkpoint stays, and its new sidecar still
    recognises it by `previous_sha256` (`safe_load` then warns that its facts describe a newer
    save that did not complete). `info` holds the sidecar's facts (see `write_sidecar`).

    Returns:
        The SHA-256 (hex) of the checkpoint written.

    Raises:
        UserError: the disk (or quota) is full, or the file size limit is reached.
    """
    path = os.fspath(path)
    previous = None
    if os.path.isfile(path):
        with contextlib.suppress(CheckpointError):  # an unreadable old sidecar: hash the file
            previous = read_sidecar(path).get("sha256")
        previous = previous or file_sha256(path)
    tmp, digest = write_temp(path, lambda handle: torch.save(dict(state), handle))
    with cleaned_up(tmp, path):
        facts = {**info, "sha256": digest}
        if previous and previous != digest:
            facts["previous_sha256"] = previous
        write_sidecar(path, **facts)
    commit_temp(tmp, path)
    return digest


def _writer(flag: str | None) -> Callable[..., str]:
    """`write_output` for a script's output named by `flag`, else `atomic_write`."""
    if flag is None:
        return atomic_write
    return lambda path, write: write_output(path, write, flag)


def save_npz(
    path: str | os.PathLike, arrays: Mapping[str, np.ndarray], flag: str | None = None
) -> None:
    """Write arrays as an uncompressed `.npz` (the official checkpoint format), atomically.

    `flag`: for a script's output, the flag that names it (see `write_output`).
    """
    _writer(flag)(path, lambda handle: np.savez(handle, **arrays))


# --------------------------------------------------------------------------------------------
# Safe loading


def _feed(digest: Any, value: Any) -> None:
    """Add `value` (tensors and plain values, nested) to `digest`, with types and shapes."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {flat.dtype} {tuple(value.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        digest.update(f"map {len(value)};".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, list | tuple):
        digest.update(f"{type(value).__name__} {len(value)};".encode())
        for item in value:
            _feed(digest, item)
    else:  # numbers, strings, None (numpy scalars as the Python numbers they equal)
        plain = value.item() if isinstance(value, np.generic) else value
        digest.update(f"{type(plain).__name__} {plain!r};".encode())


def content_sha256(obj: Any) -> str:
    """SHA-256 (hex) of what a checkpoint holds: every tensor's bytes, dtype and shape, and every
    plain value, in order. The same after a `torch.save` / `torch.load` round trip."""
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def with_content_sha256(obj: Mapping[str, Any]) -> dict[str, Any]:
    """`obj` plus its own `content_sha256` (a file cannot hold its own file hash, but it can hold
    the hash of its content), which `safe_load` verifies and removes."""
    return {**obj, CONTENT_SHA256: content_sha256(obj)}


def _verify_file(path: str) -> None:
    """Compare a checkpoint with the SHA-256 its sidecar recorded, when it recorded one."""
    info = read_sidecar(path)
    expected = info.get("sha256")
    if not expected:
        return
    actual = file_sha256(path)
    if actual == expected:
        return
    if actual == info.get("previous_sha256"):
        logger.warning(
            "%s is the checkpoint saved before the last one, whose save did not complete (the "
            "run was killed mid-save); the step and accuracy in %s describe that newer one.",
            path,
            sidecar_path(path),
        )
        return
    raise CheckpointError(
        f"{path} is damaged: its SHA-256 is {actual}, but {sidecar_path(path)} recorded "
        f"{expected} when it was saved. The file changed after it was written (a disk or copy "
        "error, or an edit). Use an intact copy, or train again."
    )


def _check_parts(path: str, everything: bool) -> None:
    """Refuse a PyTorch (zip) file a part of which no longer matches the CRC-32 the zip recorded
    for it: the pickle alone (small, so always checked), or every part.

    The checks that follow (the sidecar's SHA-256, the content hash inside a training state)
    cover the tensors; a flipped bit in the pickle can otherwise look like anything, e.g. a
    reference to code, or remove the content hash it holds.
    """
    if not zipfile.is_zipfile(path):
        return
    name = "its directory"
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if everything or info.filename.endswith(".pkl"):
                    name = info.filename
                    with archive.open(info) as part:
                        while part.read(1 << 24):
                            pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as err:
        raise CheckpointError(
            f"{path} is damaged: {name} ({err}) no longer matches the CRC-32 checksum recorded "
            "when the file was written (a disk or copy error, or an edit). Use an intact copy, "
            "e.g. the previous checkpoint, or train again."
        ) from None


def _verify_content(obj: Any, path: str) -> Any:
    """`obj` without its `content_sha256`, after checking it (when it has one)."""
    if not isinstance(obj, dict) or CONTENT_SHA256 not in obj:
        return obj
    expected = obj.pop(CONTENT_SHA256)
    actual = content_sha256(obj)
    if actual != expected:
        raise CheckpointError(
            f"{path} is damaged: what it holds no longer matches the SHA-256 recorded inside it "
            f"when it was saved ({expected}; now {actual}). The file changed after it was "
            "written (a disk or copy error, or an edit). Use an intact copy, or start again."
        )
    return obj


def safe_load(path: str | os.PathLike) -> Any:
    """`torch.load` restricted to tensors and plain Python values, onto the CPU, verified.

    A checkpoint whose sidecar records a `sha256`, or that holds a `content_sha256`, is checked
    against it (the latter is removed from what is returned).

    Damage is told apart from a file that references code: the CRC-32 checksums the zip
    recorded for its parts are checked first (the pickle's always, every part's when loading
    fails).

    Raises:
        CheckpointError: the file is missing, truncated, damaged (its hash or checksum differs
            from the recorded one) or not a PyTorch file, or it holds pickled objects that
            would need code to rebuild (such a file is never loaded).
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
    _check_parts(path, everything=False)
    _verify_file(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # refused below
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        _check_parts(path, everything=True)  # damage first: it can look like anything
        # torch's restricted unpickler names what it refused; its advice to switch the
        # restriction off is never passed on.
        found = re.search(r"GLOBAL (\S+)", str(err))
        names = [found.group(1)] if found else _pickled_globals(path)
        if names:
            raise CheckpointError(
                f"{path} was not loaded: it holds code or Python objects that are not tensors "
                f"({', '.join(names[:3])}), e.g. a whole pickled model, and loading it could run "
                "that code. Only tensors and plain values (numbers, strings, lists, dicts) are "
                "ever loaded. If you made the file, save the weights alone: "
                "torch.save(model.state_dict(), path)."
            ) from None
        refused = re.search(r"Unsupported [^\n]*", str(err))
        detail = refused.group(0) if refused else err
        raise CheckpointError(_corrupt_message(path, detail)) from None
    except Exception as err:  # a damaged file fails in many ways (zip, pickle, storage)
        _check_parts(path, everything=True)
        raise CheckpointError(_corrupt_message(path, err)) from None
    return _verify_content(obj, path)


def _pickled_globals(path: str) -> list[str]:
    """What a plain (not zip) pickle file would import to rebuild its objects, read with
    `pickletools` (which parses, never runs); [] for anything else."""
    names: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as handle:
            for opcode, arg, _ in pickletools.genops(handle):
                if opcode.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(".".join(strings[-2:]))  # module and name, pushed before it
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # not a pickle, or a damaged one: no names
        return []
    return names


def _looks_like_npz(path: str) -> bool:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return bool(names) and all(name.endswith(".npy") for name in names)


def _corrupt_message(path: str, err: BaseException | str) -> str:
    if isinstance(err, BaseException):
        text = str(err).strip()
        err = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
    return (
        f"{path} is not a readable PyTorch checkpoint: it is truncated, corrupt or another kind "
        f"of file ({err[:200]}). Use another checkpoint, e.g. the previous one, or train again."
    )


# --------------------------------------------------------------------------------------------
# Sidecars: what a best checkpoint is (eval.py reads them for its defaults)


def sidecar_path(checkpoint: str | os.PathLike) -> Path:
    """`output/x_checkpoint.bin` -> `output/x_checkpoint.json`."""
    return Path(checkpoint).with_suffix(".json")


def write_sidecar(checkpoint: str | os.PathLike, **info: Any) -> None:
    """Describe a checkpoint in its JSON sidecar, atomically, with the `description_sha256` of
    the fields that decide its predictions (`check_description` verifies it on every read).

    Conventional keys: model_type, img_size, num_classes, dataset, class_names, step, accuracy.
    """
    info.pop(DESCRIPTION_SHA256, None)
    info[DESCRIPTION_SHA256] = description_sha256(info)
    atomic_write_text(sidecar_path(checkpoint), json.dumps(info, indent=2, sort_keys=True) + "\n")


def read_sidecar(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of `checkpoint`, checked by `check_description`, or {} when there is none (a
    `.safetensors` file carries its own, in its metadata).

    Raises:
        CheckpointError: the sidecar exists but is not a JSON object, or one of its fields has
            the wrong type or value.
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
    return check_description(info, path)


# --------------------------------------------------------------------------------------------
# safetensors: the weights and what a sidecar would say, in one file. Every metadata value is
# JSON text ("img_size": "[384, 384]"), so a file carries the same facts as a `.json` sidecar;
# "format": "pt" marks PyTorch tensors, as other safetensors writers do.


def save_safetensors(
    path: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    info: Mapping[str, Any],
    flag: str | None = None,
) -> None:
    """Write a state dict (each tensor contiguous, on the CPU) and its description as one
    `.safetensors` file, atomically. Each value of `info` (model_type, img_size, ...) is stored as
    its JSON text, with the `content_sha256` of the tensors and the `description_sha256` that
    covers it and the class names (`load_safetensors` and `check_description` verify both);
    `flag`: for a script's output, the flag that names it (see `write_output`)."""
    tensors = {k: state[k].detach().cpu().contiguous() for k in sorted(state)}
    described = {k: v for k, v in info.items() if v is not None and k != DESCRIPTION_SHA256}
    described[CONTENT_SHA256] = content_sha256(tensors)
    described[DESCRIPTION_SHA256] = description_sha256(described)
    metadata = {"format": "pt", **{k: json.dumps(v) for k, v in described.items()}}
    data = safetensors.torch.save(tensors, metadata=metadata)
    _writer(flag)(path, lambda handle: handle.write(data))


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
    """The tensors of a `.safetensors` file, on the CPU, checked against the `content_sha256`
    its metadata records (when it records one: files of other writers do not).

    Raises:
        CheckpointError: missing, truncated, damaged or not a safetensors file.
    """
    path = os.fspath(path)
    with _reading(path):
        tensors = safetensors.torch.load_file(path, device="cpu")
    expected = safetensors_info(path).get(CONTENT_SHA256)
    if expected is None:
        return tensors
    actual = content_sha256({k: tensors[k] for k in sorted(tensors)})
    if actual != expected:
        raise CheckpointError(
            f"{path} is damaged: its tensors no longer match the SHA-256 recorded in it when it "
            f"was written ({expected}; now {actual}), a disk or copy error, or an edit. Use an "
            "intact copy, or export it again."
        )
    return tensors


def safetensors_info(path: str | os.PathLike) -> dict[str, Any]:
    """The description stored in a `.safetensors` file (the header only is read).

    Values written by :func:`save_safetensors` come back as the Python values they were;
    values another writer stored as plain text stay strings. `"format"` is left out.

    Raises:
        CheckpointError: missing, truncated or not a safetensors file, or a field of the
            description has the wrong type or value (`check_description`).
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
    return check_description(info, path)
