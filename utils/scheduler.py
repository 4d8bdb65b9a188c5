"""Learning-rate schedules of the official fine-tuning recipe: linear warmup, then cosine or linear.

Follows `vit_jax/utils.py` (`create_learning_rate_schedule`):
the rate at optimizer step ``s`` (counted from 1) is ``base * decay(progress) * min(1, s / warmup)``
with ``progress = clip((s - warmup) / (total - warmup), 0, 1)``. Cosine decays to 0 at the last
step; linear decays to vit_jax's ``linear_end = 1e-5`` (an absolute rate), not to 0 as the
original PyTorch port did. The first update uses ``lr(1)``, never ``lr(0) = 0``.

With PyTorch's ``LambdaLR`` the scheduler's counter starts at 0 and advances after each
``optimizer.step()``, so the multiplier for counter ``c`` is the official value at ``s = c + 1``.
"""

from __future__ import annotations

import functools
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from utils.flags import DECAY_TYPES

__all__ = ["DECAY_TYPES", "LINEAR_END", "lr_multiplier", "make_scheduler"]

LINEAR_END = 1e-5  # vit_jax's `linear_end`: the learning rate linear decay ends at


def lr_multiplier(
    step: int, total_steps: int, warmup_steps: int, decay_type: str, linear_end: float = 0.0
) -> float:
    """The official learning rate at 1-based optimizer step `step`, as a fraction of the base.

    Args:
        step: optimizer step, 1 for the first update.
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
    cosine = decay_type == "cosine"
    if cosine:
        value = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        value = linear_end + (1.0 - linear_end) * (1.0 - progress)
    if warmup_steps > 0:
        value *= min(1.0, step / warmup_steps)
    return value


def make_scheduler(
    optimizer: Optimizer, total_steps: int, warmup_steps: int, decay_type: str = "cosine"
) -> LambdaLR:
    """A `LambdaLR` that gives the official 1-based schedule.

    Call `optimizer.step()` and then `scheduler.step()` once per optimizer step; the rate in
    effect for the k-th update (k = 1, 2, ...) is `base * lr_multiplier(k, ...)`, linear decay
    ending at the absolute rate `LINEAR_END` whatever the base.
    """
    if decay_type not in DECAY_TYPES:
        raise ValueError(f"decay_type must be one of {DECAY_TYPES}, got {decay_type!r}")

    def schedule(base_lr: float):
        end = LINEAR_END / base_lr if base_lr > 0 else 0.0
        official = functools.partial(
            lr_multiplier,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            decay_type=decay_type,
            linear_end=end,
        )
        return lambda counter: official(counter + 1)

    return LambdaLR(optimizer, [schedule(group["lr"]) for group in optimizer.param_groups])
