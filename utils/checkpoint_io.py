"""Checkpoint I/O that never loses work: atomic writes, safe loads, resumable training state.

Three kinds of file live in `--output_dir`:

- `<name>_checkpoint.bin`: the best model, a plain `state_dict` (the original port's format),
  with a JSON sidecar `<name>_checkpoint.json` describing it (model type, image size, classes).
- `<name>_last.pt`: the last training state (:func:`save_training_state`), everything needed to
  continue a run exactly: model, optimizer, scheduler, grad scaler, step, best accuracy, RNG
  states, data-order position, args and model config.
- official `.npz` files are read by `models.checkpoint`; :func:`load_weights_into` accepts both.

Every write goes to a temporary file in the same directory, is flushed and fsynced, then renamed
over the target (`os.replace` is atomic on POSIX and Windows), so a crash or `kill -9` at any
instant leaves either the old or the new file, never a torn one. Every read uses
`torch.load(weights_only=True)`: a checkpoint can hold tensors and plain Python values only and
never runs code. Everything stored here is chosen to load under that restriction.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import random
import re
import signal
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import nn

from models.checkpoint import (
    CheckpointError,
    checkpoint_num_classes,
    clean_state_dict,
    guess_model_type,
    load_npz,
    load_pretrained,
)
from models.configs import ViTConfig, checked_img_size, find_config, get_config, model_names
from models.modeling import VisionTransformer
from utils.atomic_io import atomic_write
from utils.dist_utils import all_reduce_sum
from utils.errors import UserError
from utils.formats import SAFETENSORS_SUFFIX, load_safetensors, safetensors_info

__all__ = [
    "STATE_FORMAT",
    "GracefulExit",
    "LoadedModel",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "TrainingState",
    "atomic_save",
    "atomic_write_text",
    "get_rng_state",
    "guess_state_dict_model",
    "last_state_path",
    "load_model",
    "load_model_weights",
    "load_state_into",
    "load_training_state",
    "load_weights_into",
    "native_img_size",
    "read_sidecar",
    "resolve_resume",
    "safe_load",
    "save_training_state",
    "set_rng_state",
    "sidecar_path",
    "write_sidecar",
]

logger = logging.getLogger(__name__)

STATE_FORMAT = "vit-pytorch-training-state"
STATE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Atomic writes


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
            "models.checkpoint.load_npz (eval.py and train.py accept it directly)."
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
# Model weights


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def guess_state_dict_model(state: Mapping[str, torch.Tensor]) -> str | None:
    """Registry name whose architecture matches a state dict of ours, or None."""
    try:
        hidden = int(state["encoder.norm.weight"].shape[0])
        patch = tuple(state["embeddings.patch_embed.weight"].shape[2:])
    except KeyError:
        return None
    layers = sum(1 for k in state if k.startswith("encoder.blocks.") and k.endswith("norm1.weight"))
    units = [
        re.match(r"embeddings\.backbone\.stages\.(\d+)\.units\.\d+\.conv1\.weight$", k)
        for k in state
    ]
    stages = [int(m.group(1)) for m in units if m]
    resnet = tuple(stages.count(b) for b in range(max(stages) + 1)) if stages else None
    return find_config(hidden, layers, patch, resnet)


def load_model_weights(path: str | os.PathLike, model_type: str | None = None) -> dict:
    """The model `state_dict` in a checkpoint train.py wrote (best `.bin` or last-state `.pt`).

    `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes are stripped.

    Args:
        path: a plain state dict or a training state (a dict with a "model" entry).
        model_type: when given, a training state of another model is refused.

    Raises:
        CheckpointError: missing, corrupt or unsafe file; not a model checkpoint; another model.
    """
    if os.fspath(path).endswith(SAFETENSORS_SUFFIX):  # export.py's format: tensors only
        return clean_state_dict(load_safetensors(path))
    obj = safe_load(path)
    if isinstance(obj, Mapping) and obj.get("format") == STATE_FORMAT:
        saved = obj.get("model_type")
        if model_type and saved and get_config(model_type).name != saved:
            raise CheckpointError(
                f"{path} holds a {saved} model, not {model_type}: pass --model_type {saved}."
            )
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"{path} is not a model checkpoint (expected a state_dict of tensors, found "
            f"{type(obj).__name__}). Pass the output/<name>_checkpoint.bin train.py wrote."
        )
    return clean_state_dict(obj)


def _check_state_fits(model: nn.Module, state: Mapping[str, torch.Tensor], path: str) -> None:
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unused = sorted(set(state) - set(target))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in state and tuple(state[k].shape) != tuple(target[k].shape)
    ]
    if not (missing or unused or mismatched):
        return
    config = getattr(model, "config", None)
    name = getattr(config, "name", type(model).__name__)
    parts = [f"{path} does not fit model {name}."]
    if missing:
        parts.append(f"Missing {len(missing)} key(s): {', '.join(missing[:8])}.")
    if unused:
        parts.append(f"Unused {len(unused)} key(s): {', '.join(unused[:8])}.")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched[:8])}.")
    guess = guess_state_dict_model(state)
    wrong = {m.split(":")[0] for m in mismatched}
    if guess and guess != name:
        parts.append(f"It looks like a {guess} checkpoint: pass --model_type {guess}.")
    elif not (missing or unused) and wrong <= {"head.weight", "head.bias"}:
        classes = state["head.bias"].shape[0]
        parts.append(f"Its head has {classes} classes: use a dataset with {classes} classes.")
    elif not (missing or unused) and wrong == {"embeddings.pos_embed"}:
        parts.append("The image size differs: pass the --img_size the model was trained at.")
    else:
        parts.append("Check --model_type, --img_size and the class count against the checkpoint.")
    raise CheckpointError(" ".join(parts))


def load_weights_into(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint into a `VisionTransformer` strictly, whatever its format.

    Accepts an official `.npz` (its head included; position embeddings are resized to the
    model's grid), a train.py `.bin` state dict, or a last-state `.pt`.

    Raises:
        CheckpointError: unreadable file, or keys/shapes that do not fit; every mismatch is named
            with both shapes.
    """
    path = os.fspath(path)
    bare = _unwrap(model)
    if path.endswith(".npz"):
        config = getattr(bare, "config", None)
        load_pretrained(bare, load_npz(path, getattr(config, "name", None)), zero_head=False)
        return
    load_state_into(bare, load_model_weights(path), path)


def load_state_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a state dict of ours strictly, explaining any misfit.

    Args:
        model: the model (DDP / torch.compile wrappers are looked through).
        state: from :func:`load_model_weights`.
        source: the file it came from, for the messages.

    Raises:
        CheckpointError: missing or unused keys, or shapes that differ (each named, both shapes).
    """
    bare = _unwrap(model)
    _check_state_fits(bare, state, source)
    target = bare.state_dict()
    with torch.no_grad():
        bare.load_state_dict({k: v.to(target[k].dtype) for k, v in state.items()}, strict=True)


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
    """The sidecar of `checkpoint`, or {} when there is none.

    A `.safetensors` file carries its description inside (see `utils.formats`): that is read.

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
class TrainingState:
    """What :func:`load_training_state` hands back to the training loop.

    Attributes:
        step: optimizer steps done (the loop continues with step + 1).
        best_accuracy: best evaluation accuracy so far.
        epoch: epoch the next batch belongs to.
        batches_in_epoch: batches of that epoch already consumed (the loop skips them).
        args: the saved command-line arguments (plain values).
        best_step: the step of `best_accuracy` (0 when unknown).
    """

    step: int
    best_accuracy: float
    epoch: int
    batches_in_epoch: int
    args: dict[str, Any]
    best_step: int = 0


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
    scheduler: Any | None,
    scaler: Any | None,
    step: int,
    best_accuracy: float,
    epoch: int,
    batches_in_epoch: int,
    args: Any,
    rng_states: list[dict[str, Any]] | None = None,
    best_step: int = 0,
) -> None:
    """Write the last training state atomically (call on rank 0 only).

    Args:
        path: usually :func:`last_state_path`.
        model: the model, possibly wrapped in DDP / torch.compile; its config, image size and
            class count are stored so that a resume with another model is refused.
        optimizer: its `state_dict` is saved.
        scheduler: an LR scheduler or None.
        scaler: a `torch.amp.GradScaler` (saved), or None / a stateless fixed-scale scaler.
        step: optimizer steps done.
        best_accuracy: best evaluation accuracy so far.
        epoch: epoch of the next batch.
        batches_in_epoch: batches of `epoch` consumed so far.
        args: an `argparse.Namespace` or a mapping; stored as plain values.
        rng_states: one :func:`get_rng_state` per rank (gathered under DDP); default: this
            process's.
        best_step: the step of `best_accuracy`.
    """
    bare = _unwrap(model)
    config = getattr(bare, "config", None)
    args_dict = vars(args) if hasattr(args, "__dict__") and not isinstance(args, Mapping) else args
    state = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "model_type": getattr(config, "name", None),
        "model_config": _plain(dataclasses.asdict(config)) if config is not None else None,
        "img_size": _plain(getattr(bare, "img_size", None)),
        "num_classes": getattr(bare, "num_classes", None),
        "model": clean_state_dict(bare.state_dict()),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if hasattr(scaler, "state_dict") else None,
        "step": int(step),
        "best_accuracy": float(best_accuracy),
        "best_step": int(best_step),
        "data_position": {"epoch": int(epoch), "batches_in_epoch": int(batches_in_epoch)},
        "rng": rng_states if rng_states is not None else [get_rng_state()],
        "args": _plain(dict(args_dict or {})),
    }
    atomic_save(state, path)


def _check_same_model(saved: Mapping[str, Any], model: nn.Module, path: str) -> None:
    bare = _unwrap(model)
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


def load_training_state(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    rank: int = 0,
    restore_rng: bool = True,
) -> TrainingState:
    """Restore a :func:`save_training_state` file into freshly built training objects.

    Call on every rank after building the model, optimizer, scheduler, scaler and data loaders,
    and before the first batch (restoring the RNG must be the last thing before training goes
    on, so that nothing else draws random numbers in between).

    Args:
        path: the state file.
        model: same architecture, image size and class count as the saved one.
        optimizer: restored when given.
        scheduler: restored when given.
        scaler: restored when given and saved.
        rank: this process's rank; selects its RNG state when one per rank was saved.
        restore_rng: restore Python, NumPy, torch (and CUDA) RNG states.

    Returns:
        Step, best accuracy, data position and the saved args.

    Raises:
        UserError: unreadable file, not a training state, or a different model.
    """
    path = os.fspath(path)
    saved = safe_load(path)
    if not isinstance(saved, Mapping) or saved.get("format") != STATE_FORMAT:
        raise UserError(
            f"{path} is not a training state (a *_last.pt file train.py writes); --resume needs "
            "one. A best checkpoint (*_checkpoint.bin) holds weights only and can be evaluated "
            "with eval.py or used as --pretrained_dir, but not resumed."
        )
    _check_same_model(saved, model, path)
    bare = _unwrap(model)
    _check_state_fits(bare, saved["model"], path)
    bare.load_state_dict(saved["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(saved["optimizer"])
    if scheduler is not None and saved.get("scheduler") is not None:
        scheduler.load_state_dict(saved["scheduler"])
    if hasattr(scaler, "load_state_dict") and saved.get("scaler") is not None:
        scaler.load_state_dict(saved["scaler"])
    if restore_rng:
        states = saved["rng"]
        if rank >= len(states):
            logger.warning(
                "The saved run had %d process(es), this one has more: rank %d reuses rank 0's "
                "RNG state, so random augmentation and dropout will not repeat exactly.",
                len(states),
                rank,
            )
        set_rng_state(states[rank] if rank < len(states) else states[0])
    position = saved["data_position"]
    return TrainingState(
        step=int(saved["step"]),
        best_accuracy=float(saved["best_accuracy"]),
        epoch=int(position["epoch"]),
        batches_in_epoch=int(position["batches_in_epoch"]),
        args=dict(saved.get("args") or {}),
        best_step=int(saved.get("best_step", 0)),
    )


# --------------------------------------------------------------------------------------------
# Stopping cleanly


class GracefulExit:
    """Turn SIGINT/SIGTERM into a flag the training loop checks after each step.

    Use as a context manager around the loop. The first signal only sets :attr:`requested`
    (the loop finishes the step, saves the last state and exits with a resume hint); a second
    SIGINT raises `KeyboardInterrupt` at once. The previous handlers come back on exit. Outside
    the main thread signals cannot be caught and the helper does nothing.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
        self.signals = signals
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        logger.warning(
            "%s received: finishing the current step, then saving the last state "
            "(press Ctrl+C again to stop at once, losing the steps since the last save).",
            self.signal_name,
        )

    def __enter__(self) -> GracefulExit:
        try:
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread
            self._restore()
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def should_stop(self, device: torch.device | str = "cpu") -> bool:
        """Whether any process got a signal (all-reduced under torch.distributed).

        Every rank must call it at the same point of every step, so that all stop together.
        """
        requests = all_reduce_sum(torch.tensor([float(self.requested)], device=device))
        return bool(requests.item() > 0)


class NonFiniteLossError(UserError):
    """Training diverged: the loss stayed NaN or infinite for several steps."""


class NonFiniteGuard:
    """Count consecutive non-finite losses; give up with a clear error after `patience`.

    The loop skips the optimizer step whenever :meth:`check` returns False (under fp16 the grad
    scaler already skips steps with non-finite gradients; the guard still stops a run whose loss
    never recovers).
    """

    def __init__(self, patience: int = 3):
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        self.patience = patience
        self.consecutive = 0

    def check(self, loss: float | torch.Tensor, step: int) -> bool:
        """True when `loss` is finite (apply the step); False to skip it.

        Args:
            loss: the step's loss (all-reduced under DDP so that every rank decides alike).
            step: the step number, for the messages.

        Raises:
            NonFiniteLossError: `patience` consecutive non-finite losses.
        """
        value = float(loss.detach().float().item() if torch.is_tensor(loss) else loss)
        if np.isfinite(value):
            self.consecutive = 0
            return True
        self.consecutive += 1
        logger.warning(
            "Step %d: loss is %s; skipping the update (%d/%d).",
            step,
            value,
            self.consecutive,
            self.patience,
        )
        if self.consecutive >= self.patience:
            raise NonFiniteLossError(
                f"Training diverged: the loss was {value} for {self.consecutive} consecutive "
                f"steps (last: step {step}). The best checkpoint was not overwritten. Lower "
                "--learning_rate, keep gradient clipping on (--max_grad_norm 1.0), or use --fp16 "
                "(the loss scaler skips overflowing steps)."
            )
        return False


# --------------------------------------------------------------------------------------------
# A ready model from any checkpoint file (eval.py, visualize.py and the notebook use this)


@dataclasses.dataclass
class LoadedModel:
    """A model built from a checkpoint file, and what is known about it.

    Attributes:
        model: the `VisionTransformer`, on the CPU, in eval mode.
        model_type: registry name.
        img_size: (height, width) the model takes.
        source: the checkpoint path.
        dataset: the dataset it was fine-tuned on (sidecar), "imagenet2012" for a 1000-class
            official `.npz`, else None.
        class_names: class names recorded by train.py's sidecar, else None.
        precision: the precision it was trained in (sidecar), else None.
        info: training facts from the sidecar (step, accuracy).
    """

    model: VisionTransformer
    model_type: str
    img_size: tuple[int, int]
    source: str
    dataset: str | None = None
    class_names: list[str] | None = None
    precision: str | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def native_img_size(config: ViTConfig, pos_embed_tokens: int) -> tuple[int, int] | None:
    """The square input size a position embedding of `pos_embed_tokens` tokens was made for."""
    cells = pos_embed_tokens - (1 if config.classifier == "token" else 0)
    side = math.isqrt(max(cells, 0))
    if not side or side * side != cells:
        return None
    stride = config.patch_size[0]
    if config.resnet is not None:
        stride *= 4 * 2 ** max(len(config.resnet.num_layers) - 1, 0)
    return side * stride, side * stride


def _registered(model_type: str) -> ViTConfig:
    try:
        return get_config(model_type)
    except KeyError as err:
        raise UserError(str(err.args[0])) from None


def load_model(
    checkpoint: str | os.PathLike,
    model_type: str | None = None,
    img_size: int | tuple[int, int] | list[int] | None = None,
) -> LoadedModel:
    """Build the model a checkpoint holds and load it strictly, ready for inference.

    Args:
        checkpoint: an official `.npz`, a train.py `.bin` (its `.json` sidecar, when present,
            gives model type, image size, dataset, class names and precision), a `_last.pt`,
            or an export.py `.safetensors` (the same description inside).
        model_type: registry name; overrides the sidecar. Guessed from the shapes when omitted.
        img_size: input size (int or (H, W)); overrides the sidecar. Defaults to the size the
            checkpoint's position embeddings were made for.

    Raises:
        UserError: missing or unreadable file, unknown model, no classifier head, an image
            size that is unknown or not a multiple of the patch size, or weights that do not
            fit (each key named with both shapes).
    """
    path = os.fspath(checkpoint)
    sidecar: dict[str, Any] = {}
    if path.endswith(".npz"):
        weights = load_npz(path, model_type)
        model_type = model_type or guess_model_type(weights)
        num_classes = checkpoint_num_classes(weights)
        pos = weights.get("Transformer/posembed_input/pos_embedding")
    else:
        sidecar = read_sidecar(path)
        state = load_model_weights(path, model_type)
        model_type = model_type or sidecar.get("model_type") or guess_state_dict_model(state)
        num_classes = int(state["head.bias"].shape[0]) if "head.bias" in state else None
        pos = state.get("embeddings.pos_embed")
    if model_type is None:
        raise UserError(
            f"Cannot tell which model {path} holds: pass --model_type "
            f"(one of {', '.join(model_names())})."
        )
    config = _registered(model_type)
    if num_classes is None:
        raise UserError(
            f"{path} has no classifier head, so it cannot predict: fine-tune it with train.py "
            "first, or use an imagenet21k+imagenet2012 checkpoint."
        )
    size = img_size or sidecar.get("img_size")
    if size is None and pos is not None:
        size = native_img_size(config, pos.shape[1])
    if size is None:
        raise UserError(f"Cannot tell the image size {path} was made for: pass --img_size.")
    model = VisionTransformer.empty(
        config, checked_img_size(config, size), num_classes
    )  # every weight loaded
    if path.endswith(".npz"):
        load_pretrained(model, weights)
    else:
        load_state_into(model, state, path)
    dataset = sidecar.get("dataset") or ("imagenet2012" if num_classes == 1000 else None)
    return LoadedModel(
        model=model.eval(),
        model_type=config.name,
        img_size=model.img_size,
        source=path,
        dataset=dataset,
        class_names=sidecar.get("class_names"),
        precision=sidecar.get("precision"),
        info={k: sidecar[k] for k in ("step", "accuracy") if k in sidecar},
    )
