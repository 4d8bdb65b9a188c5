"""What a checkpoint's description (its `.json` sidecar, or a `.safetensors` file's metadata) may
say, field by field, and the one message for a field that is wrong.

The fields that decide what a prediction says (`COVERED_FIELDS`: the weights' hash, the model,
its input size, its classes and their names) are covered by the description's own
`description_sha256`, so that an edit to them (a relabelled class) is refused on load like
damage to the weights; the other fields (step, accuracies) are facts about training.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from models.configs import is_size, is_whole, model_names
from models.npz import CheckpointError

__all__ = [
    "COVERED_FIELDS",
    "DESCRIPTION_SHA256",
    "PRECISIONS",
    "SAFETENSORS_SUFFIX",
    "check_description",
    "description_error",
    "description_sha256",
]

# The precisions a run computes in: `--precision`'s names, recorded in every description
# (`utils.recipe.precision` resolves the flags to one, `utils.recipe.amp` makes it autocast).
PRECISIONS = ("fp32", "fp16", "bf16")
SAFETENSORS_SUFFIX = ".safetensors"
# What `description_sha256` covers: the weights' hash (a sidecar's `sha256` of the file, a
# `.safetensors` file's `content_sha256` of its tensors) and what turns logits into predictions.
COVERED_FIELDS = (
    "sha256",
    "content_sha256",
    "model_type",
    "img_size",
    "num_classes",
    "dataset",
    "class_names",
)
DESCRIPTION_SHA256 = "description_sha256"

# The fields a description (a sidecar, a `.safetensors` file's metadata) may hold, each with
# the test of its value and what the test asks for; fields not listed are kept unchecked.


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(n, str) for n in value)


def _or_unknown(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or test(value)


def _is_fraction(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


_DESCRIPTION_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model_type": (lambda v: v in model_names(), "a model name, e.g. ViT-B_16"),
    "img_size": (is_size, "a positive whole number or a [height, width] pair of them"),
    "num_classes": (lambda v: is_whole(v, 1), "a whole number of at least 1"),
    "dataset": (_or_unknown(_is_text), "a dataset name, e.g. cifar10, or null"),
    "class_names": (_or_unknown(_is_names), "a list of class names (strings), or null"),
    "precision": (_or_unknown(PRECISIONS.__contains__), f"one of {', '.join(PRECISIONS)}, or null"),
    # Whether float32 matrix products and convolutions ran in TF32 (CUDA with `--tf32 on`).
    "tf32": (_or_unknown(lambda v: isinstance(v, bool)), "true or false, or null"),
    "step": (lambda v: is_whole(v, 0), "a whole number of at least 0"),
    "final_step": (lambda v: is_whole(v, 0), "a whole number of at least 0"),
    "selected_by": (_is_text, "the split the step was selected on, e.g. minival"),
    "sha256": (_is_sha256, "64 hexadecimal digits (what sha256sum prints)"),
    "previous_sha256": (_is_sha256, "64 hexadecimal digits (what sha256sum prints)"),
    "content_sha256": (_is_sha256, "64 hexadecimal digits"),
    DESCRIPTION_SHA256: (_is_sha256, "64 hexadecimal digits"),
}
_FRACTION = (_or_unknown(_is_fraction), "a number from 0 to 1, or null")  # every `*accuracy` field


def description_error(source: str | os.PathLike, field: str, value: Any, wanted: str) -> Exception:
    """The one message for a description field that is wrong: the file, the field, its value,
    what it must be, and the fix."""
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    source = os.fspath(source)
    fix = (
        "export it again"
        if source.endswith(SAFETENSORS_SUFFIX)
        else "correct it, or delete the file and pass --model_type, --img_size and --dataset"
    )
    return CheckpointError(
        f"{source}: the field {field!r} is {shown}, but it must be {wanted}. The description "
        f"was damaged, edited or written by another program: {fix}."
    )


def description_sha256(info: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the `COVERED_FIELDS` of a description, as canonical JSON (a field that
    is missing counts as null)."""
    covered = {field: info.get(field) for field in COVERED_FIELDS}
    text = json.dumps(covered, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_description(info: Any, source: str | os.PathLike) -> dict[str, Any]:
    """`info`, a checkpoint's description (sidecar or `.safetensors` metadata), checked field by
    field (`_DESCRIPTION_FIELDS`; class_names as many as num_classes when both are given), and
    against its `description_sha256` when it records one.

    Raises:
        CheckpointError: naming `source`, the field and what it must be.
    """
    if not isinstance(info, dict):
        raise description_error(source, "(the whole file)", info, "a JSON object of fields")
    for field, value in info.items():
        test, wanted = _DESCRIPTION_FIELDS.get(field) or (
            _FRACTION if field.endswith("accuracy") else (None, "")
        )
        if test is not None and not test(value):
            raise description_error(source, field, value, wanted)
    names, count = info.get("class_names"), info.get("num_classes")
    if names is not None and count is not None and len(names) != count:
        raise description_error(
            source, "class_names", names, f"a list of {count} names (num_classes is {count})"
        )
    recorded = info.get(DESCRIPTION_SHA256)
    if recorded is not None and recorded != description_sha256(info):
        raise CheckpointError(
            f"{os.fspath(source)} was edited or damaged after it was written: its "
            f"{', '.join(f for f in COVERED_FIELDS if f in info)} no longer match the "
            f"{DESCRIPTION_SHA256} recorded with them, and predictions would carry the changed "
            "names. Restore it from a copy; to relabel the classes on purpose, also delete its "
            f"{DESCRIPTION_SHA256} line (it then loads with a warning)."
        )
    return info
