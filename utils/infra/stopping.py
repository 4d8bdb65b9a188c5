"""Stopping a run on purpose or when it diverges: SIGINT/SIGTERM as a flag, non-finite losses.

The training loop checks both after every optimizer step: a signal makes it finish the step, save
the last state and exit with a resume hint and the exit code 128 + signal
(`utils.infra.errors.StoppedBySignal(stop.signum)`); a loss that stays NaN or infinite stops it
with a clear error before anything more is saved.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

import numpy as np
import torch

from utils.infra.dist_utils import all_reduce_sum
from utils.infra.errors import StopAtOnce, UserError

__all__ = ["GracefulExit", "NonFiniteGuard", "NonFiniteLossError"]

logger = logging.getLogger(__name__)


class GracefulExit:
    """Turn SIGINT/SIGTERM into a flag the training loop checks after each step.

    Use as a context manager around the loop. The first signal only sets :attr:`requested`
    (the loop finishes the step, saves the last state and exits with a resume hint); a second
    SIGINT or SIGTERM raises `StopAtOnce` (a `KeyboardInterrupt`) at once, also in a step
    that waits (for a stuck loader worker, say). The previous handlers come back on exit. Outside
    the main thread signals cannot be caught and the helper does nothing. `signum` and
    `signal_name` say which signal came first (None when none reached this process).
    """

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise StopAtOnce(signum)
        self.requested = True
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        logger.warning(
            "%s received: finishing the current step, then saving the last state "
            "(press Ctrl+C again, or send SIGTERM again, to stop at once, losing the steps since "
            "the last save).",
            self.signal_name,
        )

    def __enter__(self) -> GracefulExit:
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
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
