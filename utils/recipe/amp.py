"""Mixed precision: the autocast context and the fp16 grad scalers for a `--precision` name
(`utils.recipe.precision` resolves the flags to one)."""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

__all__ = ["AUTOCAST_DTYPES", "StaticGradScaler", "autocast", "autocast_dtype", "make_scaler"]

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}




def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype `autocast` computes in for `precision` on `device` (None: fp32, no autocast)."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype == torch.float16 and device.type != "cuda":
        return torch.bfloat16  # the CPU has no fp16 autocast worth using
    return dtype


def autocast(precision: str, device: torch.device):
    """The autocast context for `precision` (a no-op for fp32)."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class StaticGradScaler:
    """A fixed loss scale (`--loss_scale S`), with GradScaler's interface.

    Gradients are unscaled before clipping; a step whose gradients overflowed is skipped with a
    warning (a fixed scale never adapts, so lower `--loss_scale` if this repeats).
    """

    def __init__(self, scale: float):
        self.scale_value = float(scale)
        self._finite = True

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch._foreach_div_(grads, self.scale_value)
        self._finite = bool(torch.stack([g.isfinite().all() for g in grads]).all())

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._finite:
            optimizer.step()
        else:
            logger.warning("fp16 gradients overflowed (scale %g): step skipped.", self.scale_value)

    def update(self) -> None:
        self._finite = True


def make_scaler(precision: str, loss_scale: float):
    """GradScaler for fp16 (dynamic when `loss_scale` is 0, fixed otherwise); None otherwise."""
    if precision != "fp16":
        return None
    if loss_scale > 0:
        return StaticGradScaler(loss_scale)
    return torch.amp.GradScaler("cuda")

