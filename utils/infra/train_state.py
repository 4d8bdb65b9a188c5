"""The training state: everything `--resume` needs to continue a run exactly.

`<output_dir>/<name>_last.pt` holds model, optimizer, grad scaler, the run's progress
(:class:`TrainState`), every rank's RNG states, the data-order position, the args and the model
config, what split the training images into training and minival, the precision, and the
SHA-256 of all that (`content_sha256`), checked on load. It loads with
`torch.load(weights_only=True)`: only tensors and plain Python values are stored. A resume
refuses a state of another model, image size, class count or data split.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from utils.infra.dist_utils import unwrap
from utils.infra.errors import UserError
from utils.infra.file_io import atomic_save, safe_load, with_content_sha256

__all__ = [
    "STATE_FORMAT",
    "TrainState",
    "get_rng_state",
    "last_state_path",
    "load_training_state",
    "resolve_resume",
    "save_training_state",
    "saved_model_type",
    "set_rng_state",
]

logger = logging.getLogger(__name__)

# Marks a training state (read by utils.infra.loading too).
STATE_FORMAT = "vit-pytorch-training-state"
STATE_VERSION = 1  # a state of a later version is refused, not misread
# TrainState fields saved under another key than their own (the layout of earlier versions).
SAVED_UNDER = {"epoch": "data_position", "batches_in_epoch": "data_position"}


# --------------------------------------------------------------------------------------------
# RNG state, stored as tensors and plain Python values (loadable with weights_only=True)


def get_rng_state() -> dict[str, Any]:
    """The RNG states of Python `random`, NumPy's global generator, torch CPU and CUDA."""
    version, python_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": (version, tuple(python_state), gauss),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("CUDA device count changed since the save: CUDA RNG not restored.")


# --------------------------------------------------------------------------------------------
# Training state


@dataclasses.dataclass
class TrainState:
    """Progress of a run: what the last state stores besides the training objects.

    Attributes:
        step: optimizer steps done (the loop continues with step + 1).
        epoch: pass over the training set the next batch belongs to (seeds the sampler and
            the augmentation).
        batches_in_epoch: micro-batches of `epoch` consumed so far (a resume skips them).
        best_accuracy: best accuracy so far on the split the best checkpoint is selected on
            (minival, or test without one); -1 before the first evaluation.
        best_step: the step of `best_accuracy` (0 before the first evaluation).
        best_loss: the loss on that split at `best_step` (breaks ties of accuracy).
        best_test_accuracy: the test accuracy at `best_step`.
        args: the command-line arguments of the run that saved it (plain values; empty for a
            new run).
        split: what defines the minival split (`holdout_fraction`, `train_images`,
            `minival_images`): a resume with another split is refused, since minival would
            then hold images the model trained on (empty in states written before it was kept).
        precision: the precision the run trains in ("fp32", "fp16", "bf16"; None when unknown).
        tf32: whether its float32 matrix products run in TF32 (CUDA with `--tf32 on`; None when
            unknown).
    """

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_accuracy: float = -1.0
    best_step: int = 0
    best_loss: float = math.inf
    best_test_accuracy: float = -1.0
    args: dict[str, Any] = dataclasses.field(default_factory=dict)
    split: dict[str, Any] = dataclasses.field(default_factory=dict)
    precision: str | None = None
    tf32: bool | None = None


def last_state_path(output_dir: str | os.PathLike, name: str) -> Path:
    """Where a run keeps its last training state: `<output_dir>/<name>_last.pt`."""
    return Path(output_dir) / f"{name}_last.pt"


def resolve_resume(resume: str, output_dir: str | os.PathLike, name: str) -> Path:
    """The file `--resume` refers to: a path, or `auto` for this run's last state.

    Raises:
        UserError: the file does not exist.
    """
    path = last_state_path(output_dir, name) if resume == "auto" else Path(resume)
    if not path.is_file():
        found = sorted(p.name for p in Path(output_dir).glob("*_last.pt"))
        hint = f" Saved states in {output_dir}: {', '.join(found)}." if found else ""
        raise UserError(
            f"Cannot resume: {path} does not exist (--resume takes a *_last.pt file, or no value "
            f"for the last state of --name {name} in --output_dir {output_dir}).{hint} Start "
            "without --resume to begin a new run."
        )
    return path


def _plain(value: Any) -> Any:
    """Args as plain values only (a weights_only load refuses anything else)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def save_training_state(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any | None,
    state: TrainState,
    args: Any,
    rng_states: list[dict[str, Any]] | None = None,
) -> None:
    """Write the last training state atomically (call on rank 0 only).

    Args:
        path: usually :func:`last_state_path`.
        model: the model, possibly wrapped in DDP / torch.compile; its config, image size and
            class count are stored so that a resume with another model is refused.
        optimizer: its `state_dict` is saved. The schedule is not: it is a function of the
            step, rebuilt on resume from the command's flags (`make_scheduler(..., step)`).
        scaler: its `state_dict` is saved (`torch.amp.GradScaler`'s format), if it has one.
        state: the run's progress (its `args` field is not used; `args` is).
        args: an `argparse.Namespace` or a mapping; stored as plain values.
        rng_states: one :func:`get_rng_state` per rank (gathered under DDP); default: this
            process's.
    """
    bare = unwrap(model)
    config = getattr(bare, "config", None)
    args_dict = vars(args) if hasattr(args, "__dict__") and not isinstance(args, Mapping) else args
    saved = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "model_type": getattr(config, "name", None),
        "model_config": _plain(dataclasses.asdict(config)) if config is not None else None,
        "img_size": _plain(getattr(bare, "img_size", None)),
        "num_classes": getattr(bare, "num_classes", None),
        "model": bare.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if hasattr(scaler, "state_dict") else None,
        "rng": rng_states if rng_states is not None else [get_rng_state()],
        "args": _plain(dict(args_dict or {})),
    }
    for field in dataclasses.fields(TrainState):
        if field.name != "args":  # the run's own flags are `args`, above
            group = SAVED_UNDER.get(field.name)
            (saved.setdefault(group, {}) if group else saved)[field.name] = _plain(
                getattr(state, field.name)
            )
    atomic_save(with_content_sha256(saved), path)  # verified by safe_load


def saved_model_type(path: str | os.PathLike) -> str | None:
    """The model a training state says it was trained as (None when it says nothing).

    Reads the state's pickle alone (its tensors stay on disk, mapped), so that a resume does
    not read and hash the whole file twice: `load_training_state` verifies it afterwards. A
    file that cannot be read so gets `safe_load`'s one message.
    """
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # damaged, unsafe, not a file: say which, as every loader does
        saved = safe_load(path)
    return saved.get("model_type") if isinstance(saved, Mapping) else None


def _check_same_model(saved: Mapping[str, Any], model: nn.Module, path: str) -> None:
    bare = unwrap(model)
    config = getattr(bare, "config", None)
    problems = []
    if config is not None and saved.get("model_type") != config.name:
        problems.append(
            f"it was trained with --model_type {saved.get('model_type')}, not {config.name}"
        )
    elif config is not None and saved.get("model_config") != _plain(dataclasses.asdict(config)):
        problems.append(f"its {config.name} configuration differs from the registry's")
    if saved.get("img_size") is not None and saved["img_size"] != _plain(bare.img_size):
        problems.append(
            f"it was trained at --img_size {saved['img_size'][0]}, not {bare.img_size[0]}"
        )
    if saved.get("num_classes") is not None and saved["num_classes"] != bare.num_classes:
        problems.append(f"it has {saved['num_classes']} classes, the model {bare.num_classes}")
    if problems:
        raise UserError(
            f"Cannot resume from {path}: {'; '.join(problems)}. Resume with the same model "
            "settings, or start a new run with another --name."
        )


def _describe_split(split: Mapping[str, Any]) -> str:
    counts = ""
    if "train_images" in split:
        counts = f" ({split['train_images']} training / {split['minival_images']} minival images)"
    return f"--holdout_fraction {split['holdout_fraction']}{counts}"


def _check_same_split(saved: Mapping[str, Any], split: Mapping[str, Any], path: str) -> None:
    saved_split = saved.get("split") or {}
    if not saved_split and "holdout_fraction" in (saved.get("args") or {}):  # an older state
        saved_split = {"holdout_fraction": saved["args"]["holdout_fraction"]}
    if all(saved_split.get(key, value) == value for key, value in split.items()):
        return
    raise UserError(
        f"Cannot resume from {path}: the saved run split its training images with "
        f"{_describe_split(saved_split)}, this command with {_describe_split(split)}. Another "
        "split would put images the model trained on into minival, and compare the best so far "
        "with accuracies on another split. Resume with --holdout_fraction "
        f"{saved_split['holdout_fraction']} and the same images, or start a new run with "
        "another --name."
    )


def load_training_state(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any | None = None,
    rank: int = 0,
    split: Mapping[str, Any] | None = None,
) -> TrainState:
    """Restore a :func:`save_training_state` file into freshly built training objects.

    Call on every rank after building the model, optimizer, scaler and data loaders,
    and before the first batch (restoring the RNG must be the last thing before training goes
    on, so that nothing else draws random numbers in between).

    Args:
        path: the state file.
        model: same architecture, image size and class count as the saved one.
        optimizer: restored when given (then rebuild the schedule at the returned step).
        scaler: restored when given and saved.
        rank: this process's rank; selects its RNG state when one per rank was saved (Python,
            NumPy, torch and CUDA RNGs are restored).
        split: this run's :attr:`TrainState.split`; another than the saved one is refused.

    Returns:
        The saved progress, with the saved args.

    Raises:
        UserError: unreadable file, not a training state, a different model or split.
    """
    path = os.fspath(path)
    saved = safe_load(path)
    if not isinstance(saved, Mapping) or saved.get("format") != STATE_FORMAT:
        raise UserError(
            f"{path} is not a training state (a *_last.pt file train.py writes); --resume needs "
            "one. A best checkpoint (*_checkpoint.bin) holds weights only and can be evaluated "
            "with eval.py or used as --pretrained_dir, but not resumed."
        )
    if not isinstance(saved.get("version", 1), int) or saved.get("version", 1) > STATE_VERSION:
        raise UserError(
            f"{path} is a training state of format version {saved.get('version')!r}, newer than "
            f"this code reads ({STATE_VERSION}): resume it with the version that wrote it."
        )
    _check_same_model(saved, model, path)
    if split is not None:
        _check_same_split(saved, split, path)
    unwrap(model).load_state_dict(saved["model"])  # the same model: checked above
    if optimizer is not None:
        optimizer.load_state_dict(saved["optimizer"])
    if hasattr(scaler, "load_state_dict") and saved.get("scaler") is not None:
        scaler.load_state_dict(saved["scaler"])
    states = saved["rng"]
    if rank >= len(states):
        logger.warning(
            "The saved run had %d process(es), this one has more: rank %d reuses rank 0's "
            "RNG state, so random augmentation and dropout will not repeat exactly.",
            len(states),
            rank,
        )
    set_rng_state(states[rank] if rank < len(states) else states[0])
    progress = {"args": dict(saved.get("args") or {})}
    for field in dataclasses.fields(TrainState):
        group = SAVED_UNDER.get(field.name)
        source = (saved.get(group) or {}) if group else saved
        if field.name != "args" and source.get(field.name) is not None:
            progress[field.name] = source[field.name]
    # States written before the test accuracy at the best step was kept: the selection split
    # was the test set then.
    progress.setdefault("best_test_accuracy", progress.get("best_accuracy", -1.0))
    return TrainState(**progress)
