"""vit_jax's update rule in plain Python (torch-free; `utils.recipe.optim` runs it in torch): the
learning-rate schedule, the decay types and the dtypes the momentum may be stored in.

The schedule (`vit_jax/train.py`, ``lr_fn``): ``lr_fn(s) = base * decay(p) * min(1, s / warmup)``
with ``p = clip((s - warmup) / (total - warmup), 0, 1)``; cosine decays to 0, linear to the
absolute rate ``linear_end = 1e-5``. optax calls it with its update count, 0 for the first
update: the k-th update (k = 1, 2, ...) uses ``lr_fn(k - 1)``. With warmup the first update
therefore moves nothing, though its gradient enters the momentum.
"""

from __future__ import annotations

import math

__all__ = [
    "DECAY_TYPES",
    "LINEAR_END",
    "OPTIM_DTYPES",
    "applied_lr",
    "linear_end_fraction",
    "lr_multiplier",
    "momentum_dtype_name",
]

DECAY_TYPES = ("cosine", "linear")
LINEAR_END = 1e-5  # vit_jax's `linear_end`: the learning rate linear decay ends at
OPTIM_DTYPES = ("bfloat16", "float32")  # momentum storage: vit_jax's bfloat16, or torch's float32


def lr_multiplier(
    step: int, total_steps: int, warmup_steps: int, decay_type: str, linear_end: float = 0.0
) -> float:
    """vit_jax's schedule ``lr_fn(step)`` as a fraction of the base rate.

    `step` is counted as optax counts: 0 for the first update, so the k-th update uses
    ``lr_multiplier(k - 1, ...)`` (see `applied_lr`).

    Args:
        step: optax's update count, 0 for the first update.
        total_steps: steps of the whole run (the decay ends there).
        warmup_steps: steps of linear warmup from 0 to the base rate.
        decay_type: "cosine" (to 0) or "linear" (to `linear_end`).
        linear_end: where linear decay ends, as a fraction of the base rate.

    Returns:
        A multiplier in [0, 1].
    """
    if decay_type not in DECAY_TYPES:
        raise ValueError(f"decay_type must be one of {DECAY_TYPES}, got {decay_type!r}")
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / decay_steps, 0.0), 1.0)
    if decay_type == "cosine":
        value = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        value = linear_end + (1.0 - linear_end) * (1.0 - progress)
    if warmup_steps > 0:
        value *= min(1.0, step / warmup_steps)
    return value


def linear_end_fraction(base_lr: float) -> float:
    """vit_jax's absolute `linear_end` as a fraction of `base_lr`."""
    return LINEAR_END / base_lr if base_lr > 0 else 0.0


def applied_lr(
    base_lr: float, update: int, total_steps: int, warmup_steps: int, decay_type: str
) -> float:
    """The learning rate the `update`-th update applies (1 for the first): ``lr_fn(update - 1)``.

    This is what `utils.recipe.optim.make_scheduler`'s ``get_last_lr()[0]`` reads just before that
    update's ``optimizer.step()``. (vit_jax logs ``lr_fn(step)`` with `step` counted from 1: the
    rate of the next update, not of the one just taken.)
    """
    end = linear_end_fraction(base_lr)
    return base_lr * lr_multiplier(update - 1, total_steps, warmup_steps, decay_type, end)


def momentum_dtype_name(dtype: object) -> str:
    """The name in `OPTIM_DTYPES` of a momentum dtype given as a name or a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    if name not in OPTIM_DTYPES:
        raise ValueError(f"momentum_dtype must be one of {OPTIM_DTYPES}, got {dtype!r}")
    return name
