"""Mixed precision: the autocast context and the fp16 grad scalers for a `--precision` name
(`utils.recipe.precision` resolves the flags to one), and TF32 for float32 on CUDA (`--tf32`)."""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

__all__ = [
    "AUTOCAST_DTYPES",
    "StaticGradScaler",
    "autocast",
    "autocast_dtype",
    "make_scaler",
    "set_tf32",
]

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def set_tf32(enabled: bool, device: torch.device, log: bool = True) -> bool:
    """Run float32 matrix products and convolutions on CUDA in TF32 (`enabled`) or in full
    float32, saying which in one log line (unless `log` is False); returns whether they run in
    TF32 on `device`. On the CPU nothing is set (it has no TF32) and the answer is False.

    JAX, which vit_jax runs on, computes float32 dot products and convolutions on NVIDIA GPUs
    in TF32 by default (its documentation, "Matmul precision": `jax_default_matmul_precision`),
    and so does TensorFlow; PyTorch keeps float32 matrix products in full precision unless told
    (cuDNN convolutions allow TF32). So on is the official code's own arithmetic; off sets
    both switches to full float32, for bit-level comparisons.
    """
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    if log:
        logger.info(
            "TF32: %s.",
            "on for float32 matrix products and convolutions, as JAX computes them on GPUs "
            "(--tf32 off for full float32)"
            if enabled
            else "off, float32 matrix products and convolutions in full float32",
        )
    return enabled


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

    Gradients are unscaled before clipping; a step whose gradients overflowed is skipped (a fixed
    scale never adapts, so lower `--loss_scale` if this repeats). An optimizer that skips on the
    device (``_step_supports_amp_scaling``, as `utils.recipe.optim.SGDMomentum`) gets the
    overflow as GradScaler hands it over (``optimizer.found_inf``), and nothing is read back:
    the skipped steps are counted on the device and :meth:`report` warns about them where the
    loop waits anyway. Any other optimizer steps after the overflow is read (a host sync), with
    a warning for each skipped step.

    Args:
        scale: the loss scale.
        device: where the overflow count lives; None: the gradients' device, at the first
            `unscale_` (a compiled step wants it made beforehand).
    """

    def __init__(self, scale: float, device: torch.device | str | None = None):
        self.scale_value = float(scale)
        self._found_inf: torch.Tensor | None = None
        self._skipped = None if device is None else torch.zeros((), device=device)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch._foreach_div_(grads, self.scale_value)
        self._found_inf = ~torch.stack([g.isfinite().all() for g in grads]).all()
        if self._skipped is None:
            self._skipped = torch.zeros((), device=grads[0].device)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        found_inf = self._found_inf
        if found_inf is None:  # not unscaled: nothing was checked
            optimizer.step()
        elif getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf = found_inf  # GradScaler's hand-over: skipped on the device
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
            self._skipped.add_(found_inf)
        elif found_inf.item():
            logger.warning("fp16 gradients overflowed (scale %g): step skipped.", self.scale_value)
        else:
            optimizer.step()

    def update(self) -> None:
        self._found_inf = None

    def report(self) -> None:
        """Warn about the steps skipped since the last report (reads the device: a host sync)."""
        skipped = 0 if self._skipped is None else int(self._skipped.item())
        if skipped:
            self._skipped.zero_()
            logger.warning(
                "fp16 gradients overflowed (scale %g): %d step(s) skipped since the last report.",
                self.scale_value,
                skipped,
            )


def make_scaler(precision: str, loss_scale: float, device: torch.device | str | None = None):
    """GradScaler for fp16 (dynamic when `loss_scale` is 0, fixed otherwise); None otherwise.
    `device`: where a fixed scaler counts its skipped steps (`StaticGradScaler`)."""
    if precision != "fp16":
        return None
    if loss_scale > 0:
        return StaticGradScaler(loss_scale, device)
    return torch.amp.GradScaler("cuda")
