"""Stopping a run on purpose or when it diverges: SIGINT/SIGTERM/SIGUSR1 as a flag, non-finite
losses.

A signal makes the training loop finish the step, save the last state and exit with a resume hint
and the exit code 128 + signal (`utils.infra.errors.StoppedBySignal(stop.signum)`): 130 for
Ctrl+C, 143 for SIGTERM, 138 for SIGUSR1, a scheduler's warning before a time limit or
pre-emption (Slurm's `--signal=USR1@90`), on which a job script requeues itself; a single
process checks its flag after every step, ranks agree on theirs at the steps where they wait for
the device anyway. A loss that stays NaN or infinite stops the run with a clear error before
anything more is saved: the count is kept on the device and read where the loop waits.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from utils.infra.dist_utils import all_reduce_sum
from utils.infra.errors import StopAtOnce, UserError

__all__ = ["GracefulExit", "NonFiniteGuard", "NonFiniteLossError"]

logger = logging.getLogger(__name__)


# SIGUSR1 is a warning (Slurm sends it ahead of the time limit): the run saves and stops, and
# a repeat of it never escalates, since a launcher (torchrun) may forward the one its workers got.
WARNING_SIGNAL = getattr(signal, "SIGUSR1", None)  # None on Windows
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulExit:
    """Turn SIGINT/SIGTERM/SIGUSR1 into a flag the training loop checks after each step.

    Use as a context manager around the loop. The first signal only sets :attr:`requested`
    (the loop finishes the step, saves the last state and exits with a resume hint); then a
    SIGINT or SIGTERM raises `StopAtOnce` (a `KeyboardInterrupt`) at once, also in a step
    that waits (for a stuck loader worker, say), while a repeated SIGUSR1 changes nothing.
    The previous handlers come back on exit. Outside
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
            if signum == WARNING_SIGNAL:
                return
            raise StopAtOnce(signum)
        self.requested = True
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        logger.warning(
            "%s received: finishing the current step, then saving the last state "
            "(press Ctrl+C, or send SIGTERM, to stop at once, losing the steps since the last "
            "save).",
            self.signal_name,
        )

    def __enter__(self) -> GracefulExit:
        signals = (*STOP_SIGNALS, WARNING_SIGNAL) if WARNING_SIGNAL else STOP_SIGNALS
        try:
            for signum in signals:
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
        """Whether any process got a signal.

        A single process reads its own flag, with no device work. Under torch.distributed the
        flags are all-reduced on `device` and read back (a host sync): every rank must call it
        at the same steps, so that all stop together.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        requests = all_reduce_sum(torch.tensor([float(self.requested)], device=device))
        return bool(requests.item() > 0)


class NonFiniteLossError(UserError):
    """Training diverged: the loss stayed NaN or infinite for several steps."""


class NonFiniteGuard:
    """Count consecutive non-finite losses on the device; give up with a clear error after
    `patience` of them.

    :meth:`record` takes each step's loss and says, as a boolean tensor, whether to skip the
    update: it never reads the device, so a step (compiled or not) runs without a host sync;
    :meth:`at_step` numbers the records, for the messages. :meth:`report` reads the counts where
    the loop waits for the device anyway (a log, an evaluation, a save): it warns about the
    skipped updates and raises `NonFiniteLossError` if the loss was non-finite `patience` times
    in a row, even if it recovered after that, naming the step where that happened, as a check
    after every step would have. (Under fp16 the grad scaler skips steps with non-finite
    gradients instead.)
    """

    # The counts, one float64 tensor (steps are exact in it):
    _STEP = 0  # the step of the next record
    _RUN = 1  # non-finite losses in a row up to the latest record
    _SKIPPED = 2  # non-finite losses since the last report
    _LAST_LOSS, _LAST_STEP, _LAST_RUN = 3, 4, 5  # the latest non-finite loss
    _STOP_LOSS, _STOP_STEP = 6, 7  # where the run reached `patience` (step 0: never)

    def __init__(self, patience: int = 3, device: torch.device | str = "cpu"):
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        self.patience = patience
        self.counts = torch.zeros(8, dtype=torch.float64, device=device)

    def at_step(self, step: int) -> None:
        """Number the next record `step` (a fill on the device; nothing read back or copied)."""
        self.counts[self._STEP].fill_(step)

    def record(self, loss: torch.Tensor) -> torch.Tensor:
        """Count the next step's `loss` (all-reduced under DDP, so that every rank decides
        alike); True, as a tensor, when it is not finite and the update must be skipped."""
        c, loss = self.counts, loss.detach().double()
        bad = ~torch.isfinite(loss)
        step = c[self._STEP]
        run = torch.where(bad, c[self._RUN] + 1, 0)
        stops = (run == self.patience) & (c[self._STOP_STEP] == 0)
        c.copy_(
            torch.stack(
                [
                    step + 1,
                    run,
                    c[self._SKIPPED] + bad,
                    torch.where(bad, loss, c[self._LAST_LOSS]),
                    torch.where(bad, step, c[self._LAST_STEP]),
                    torch.where(bad, run, c[self._LAST_RUN]),
                    torch.where(stops, loss, c[self._STOP_LOSS]),
                    torch.where(stops, step, c[self._STOP_STEP]),
                ]
            )
        )
        return bad

    def report(self) -> None:
        """Warn about the updates skipped since the last report; stop a diverged run.

        Reads the counts from the device (a host sync).

        Raises:
            NonFiniteLossError: `patience` consecutive non-finite losses.
        """
        counts = self.counts.tolist()
        skipped = int(counts[self._SKIPPED])
        if skipped:
            self.counts[self._SKIPPED].fill_(0)
            value, step = counts[self._LAST_LOSS], int(counts[self._LAST_STEP])
            run = int(counts[self._LAST_RUN])
            if skipped == 1:
                logger.warning(
                    "Step %d: loss is %s; skipping the update (%d/%d).",
                    step,
                    value,
                    run,
                    self.patience,
                )
            else:
                logger.warning(
                    "%d steps up to step %d had a non-finite loss (the last: %s, %d/%d in a "
                    "row); their updates were skipped.",
                    skipped,
                    step,
                    value,
                    run,
                    self.patience,
                )
        if counts[self._STOP_STEP]:
            raise NonFiniteLossError(
                f"Training diverged: the loss was {counts[self._STOP_LOSS]} for {self.patience} "
                f"consecutive steps (last: step {int(counts[self._STOP_STEP])}). The best "
                "checkpoint was not overwritten. Lower --learning_rate, keep gradient clipping "
                "on (--max_grad_norm 1.0), or use --fp16 (the loss scaler skips overflowing "
                "steps)."
            )

    def check(self, loss: float | torch.Tensor, step: int) -> bool:
        """`record` and `report` at once, for a loop that waits for every step: True when
        `loss` is finite (apply the step); False to skip it.

        Args:
            loss: the step's loss.
            step: its number, for the messages.

        Raises:
            NonFiniteLossError: `patience` consecutive non-finite losses.
        """
        self.at_step(step)
        skip = self.record(torch.as_tensor(loss, device=self.counts.device))
        self.report()
        return not skip.item()
