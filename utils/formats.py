"""safetensors files with a description inside: the weights and what a JSON sidecar would say.

A `.safetensors` file holds named tensors and a flat `str -> str` metadata table, and loading it
never runs code. Here every metadata value is JSON (`"model_type": "\\"ViT-B_16\\""`,
`"img_size": "[384, 384]"`, `"class_names": "[\\"cat\\", ...]"`), so a file carries the same
facts as train.py's `<name>_checkpoint.json` sidecar; `"format": "pt"` marks PyTorch tensors,
as other safetensors writers do. `utils.checkpoint_io` reads these files wherever it reads a
`.bin`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import safetensors
import safetensors.torch
import torch

from models.checkpoint import CheckpointError
from utils.atomic_io import atomic_write

__all__ = ["SAFETENSORS_SUFFIX", "load_safetensors", "safetensors_info", "save_safetensors"]

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
