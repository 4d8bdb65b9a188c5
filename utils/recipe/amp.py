"""Mixed precision: the autocast context and the fp16 loss scaler for a `--precision` name
(`utils.recipe.precision` resolves the flags to one), and TF32 for float32 on CUDA (`--tf32`)."""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from utils.recipe.optim import SGDMomentum

__all__ = [
    "AUTOCAST_DTYPES",
    "LossScaler",
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


class LossScaler:
    """fp16 loss scaling with `torch.amp.GradScaler`'s interface, arithmetic and saved state, but
    with all its state in tensors on the device: no call reads anything back, so torch.compile
    traces a whole training step through it (GradScaler keeps per-optimizer Python state that
    it cannot trace).

    Dynamic (`--loss_scale 0`; GradScaler's defaults): the scale starts at `init_scale`, is
    multiplied by `backoff_factor` after a step whose gradients overflowed, and by
    `growth_factor` after `growth_interval` clean steps in a row (GradScaler's own kernels,
    ``torch._amp_update_scale_`` and ``torch._amp_foreach_non_finite_check_and_unscale_``).
    Fixed (`dynamic=False`, `--loss_scale S`): the scale stays `init_scale`; lower it if
    overflows repeat.

    Gradients are unscaled before clipping (`unscale_`, or else in `step`), and a step whose
    gradients overflowed is skipped. `utils.recipe.optim.SGDMomentum` gets the overflow as its
    step's `skip`, and another optimizer that skips on the device (``_step_supports_amp_scaling``)
    as GradScaler hands it over (``optimizer.found_inf``); nothing is read back: the skipped
    steps are counted on the device and :meth:`report` warns about them where the loop waits
    anyway. Any other optimizer steps after the overflow is read (a host sync), with a warning
    for each skipped step. The gradients must lie on one device (no model parallelism).

    Args:
        init_scale: the first (dynamic) or only (fixed) loss scale.
        dynamic: whether the scale adapts.
        growth_factor, backoff_factor, growth_interval: how it adapts, as GradScaler's.
        device: where the state lives; None: the CPU, moved to the loss's device at the first
            `scale` (a compiled step wants it made there beforehand).
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        *,
        dynamic: bool = True,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        device: torch.device | str | None = None,
    ):
        self.dynamic = dynamic
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self._scale = torch.full((), float(init_scale), device=device)
        self._growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self._skipped = torch.zeros((), device=device)  # since the last `report`
        self._found_inf: torch.Tensor | None = None  # this step's, from `unscale_`

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        if self._scale.device != loss.device:  # made elsewhere: follow the loss, once
            self._scale, self._growth_tracker, self._skipped = (
                t.to(loss.device) for t in (self._scale, self._growth_tracker, self._skipped)
            )
        return loss * self._scale

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scale and note whether any is inf or NaN, as
        `torch.amp.GradScaler.unscale_` does (by the float32 reciprocal of the scale)."""
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self._found_inf = torch.zeros((), device=self._scale.device)
        inv_scale = self._scale.double().reciprocal().float()
        for dtype in dict.fromkeys(g.dtype for g in grads):  # the kernel takes one dtype
            torch._amp_foreach_non_finite_check_and_unscale_(
                [g for g in grads if g.dtype == dtype], self._found_inf, inv_scale
            )

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._found_inf is None:
            self.unscale_(optimizer)
        found_inf = self._found_inf
        if isinstance(optimizer, SGDMomentum):
            # Skipped on the device, told so by an argument: the class's `step`, because any
            # attribute written on the optimizer (GradScaler's hand-over, the schedule's wrapper
            # of `step`) is a write torch 2.11's compiler cannot trace.
            type(optimizer).step(optimizer, skip=found_inf != 0)
            self._skipped.add_(found_inf)
        elif getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf = found_inf  # GradScaler's hand-over: skipped on the device
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
            self._skipped.add_(found_inf)
        elif found_inf.item():
            logger.warning("fp16 gradients overflowed (scale %g): step skipped.", self.get_scale())
        else:
            optimizer.step()

    def update(self) -> None:
        """Adapt the scale to this step's overflow (dynamic), on the device."""
        if self.dynamic and self._found_inf is not None:
            torch._amp_update_scale_(
                self._scale,
                self._growth_tracker,
                self._found_inf,
                self.growth_factor,
                self.backoff_factor,
                self.growth_interval,
            )
        self._found_inf = None

    def get_scale(self) -> float:
        """The current scale (a host sync)."""
        return self._scale.item()

    def report(self) -> int:
        """Warn about the steps skipped since the last report (reads the device: a host sync);
        returns their number."""
        skipped = int(self._skipped.item())
        if not skipped:
            return 0
        self._skipped.zero_()
        logger.warning(
            "fp16 gradients overflowed (scale %g): %d step(s) skipped since the last report.",
            self.get_scale(),  # a dynamic one's now
            skipped,
        )
        return skipped

    def state_dict(self) -> dict[str, float | int]:
        """`torch.amp.GradScaler`'s state dict (Python numbers: a host sync), so that each loads
        the other's; empty for a fixed scale, which `--loss_scale` sets (as a disabled
        GradScaler's)."""
        if not self.dynamic:
            return {}
        return {
            "scale": self.get_scale(),
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "_growth_tracker": int(self._growth_tracker.item()),
        }

    def load_state_dict(self, state_dict: dict[str, float | int]) -> None:
        """Continue a dynamic scale saved by this class or by `torch.amp.GradScaler`; a fixed
        scale keeps `--loss_scale`, and an empty state (a fixed scale's) changes nothing."""
        if not self.dynamic or not state_dict:
            return
        self._scale.fill_(state_dict["scale"])
        self._growth_tracker.fill_(state_dict["_growth_tracker"])
        self.growth_factor = float(state_dict["growth_factor"])
        self.backoff_factor = float(state_dict["backoff_factor"])
        self.growth_interval = int(state_dict["growth_interval"])


def make_scaler(
    precision: str, loss_scale: float, device: torch.device | str | None = None
) -> LossScaler | None:
    """The fp16 loss scaler, its state on `device`: dynamic when `loss_scale` is 0 (as
    `torch.amp.GradScaler`'s defaults), fixed otherwise; None for other precisions."""
    if precision != "fp16":
        return None
    if loss_scale > 0:
        return LossScaler(loss_scale, dynamic=False, device=device)
    return LossScaler(device=device)
