"""The precision a run computes in: the flags (`--precision`, or the original port's Apex
`--fp16 --fp16_opt_level`) resolved to one of `utils.infra.description.PRECISIONS`. Torch-free;
`utils.recipe.amp` turns the name into autocast and a grad scaler.
"""

from __future__ import annotations

import logging

from utils.infra.errors import UserError

__all__ = ["OPT_LEVELS", "resolve_precision"]

logger = logging.getLogger(__name__)

OPT_LEVELS = ("O0", "O1", "O2", "O3")  # the Apex opt levels `--fp16_opt_level` takes


def resolve_precision(
    precision: str | None, fp16: bool, fp16_opt_level: str, loss_scale: float, device_type: str
) -> str:
    """The precision to run at, from `--precision` or `--fp16 --fp16_opt_level`, on a device of
    `device_type` ("cuda", "cpu", ...); `--loss_scale` is only checked for a warning."""
    if fp16:
        from_fp16 = "fp32" if fp16_opt_level == "O0" else "fp16"
        if precision is not None and precision != from_fp16:
            raise UserError(
                f"--fp16 --fp16_opt_level {fp16_opt_level} means {from_fp16}, but "
                f"--precision {precision} was given too; pass only one of them."
            )
        if fp16_opt_level == "O3":
            logger.warning(
                "Apex O3 (pure fp16 without fp32 master weights) is not offered; running as "
                "O2: fp16 autocast with fp32 weights and loss scaling."
            )
        precision = from_fp16
    precision = precision or "fp32"
    if precision == "fp16" and device_type != "cuda":
        logger.warning("fp16 needs CUDA; running with bfloat16 autocast on the %s.", device_type)
        precision = "bf16"
    if loss_scale and precision != "fp16":
        logger.warning("--loss_scale %g is ignored: it applies to fp16 only.", loss_scale)
    return precision
