"""Learning-rate schedules of the official fine-tuning recipe: linear warmup, then cosine or linear.

Follows `vit_jax/utils.py` (`create_learning_rate_schedule`) as REFERENCE.md §3 describes it:
the rate at optimizer step ``s`` (counted from 1) is ``base * decay(progress) * min(1, s / warmup)``
with ``progress = clip((s - warmup) / (total - warmup), 0, 1)``. Cosine decays to 0 at the last
step; linear decays to 0 as the original PyTorch port's schedule did (vit_jax ends linear decay at
1e-5 instead). The first update uses ``lr(1)``, never ``lr(0) = 0``.

With PyTorch's ``LambdaLR`` the scheduler's counter starts at 0 and advances after each
``optimizer.step()``, so the multiplier for counter ``c`` is the official value at ``s = c + 1``.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["DECAY_TYPES", "lr_multiplier", "make_scheduler"]

DECAY_TYPES = ("cosine", "linear")


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, decay_type: str) -> float:
    """The official learning rate at 1-based optimizer step `step`, as a fraction of the base.

    Args:
        step: optimizer step, 1 for the first update.
        total_steps: steps of the whole run (the rate reaches 0 there for cosine and linear).
        warmup_steps: steps of linear warmup from 0 to the base rate.
        decay_type: "cosine" or "linear".

    Returns:
        A multiplier in [0, 1].
    """
    if decay_type not in DECAY_TYPES:
        raise ValueError(f"decay_type must be one of {DECAY_TYPES}, got {decay_type!r}")
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / decay_steps, 0.0), 1.0)
    cosine = decay_type == "cosine"
    value = 0.5 * (1.0 + math.cos(math.pi * progress)) if cosine else 1.0 - progress
    if warmup_steps > 0:
        value *= min(1.0, step / warmup_steps)
    return value


def make_scheduler(
    optimizer: Optimizer, total_steps: int, warmup_steps: int, decay_type: str = "cosine"
) -> LambdaLR:
    """A `LambdaLR` that gives the official 1-based schedule.

    Call `optimizer.step()` and then `scheduler.step()` once per optimizer step; the rate in
    effect for the k-th update (k = 1, 2, ...) is `base * lr_multiplier(k, ...)`.
    """
    if decay_type not in DECAY_TYPES:
        raise ValueError(f"decay_type must be one of {DECAY_TYPES}, got {decay_type!r}")
    return LambdaLR(
        optimizer,
        lambda counter: lr_multiplier(counter + 1, total_steps, warmup_steps, decay_type),
    )
