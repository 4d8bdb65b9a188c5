"""The run's TensorBoard log, written so that its failures (a full disk) end the run with one
message after the last state is saved, instead of tracebacks from TensorBoard's thread."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

from utils.infra.errors import UserError

__all__ = ["EventLog"]


class EventLog:
    """The run's TensorBoard log: `SummaryWriter`'s `add_scalar`, `flush` and `close`, whose write
    failures (a full disk, a folder gone) are kept in :attr:`error` instead of raised.

    TensorBoard writes from a thread of its own, which prints its traceback and makes every later
    call from the run raise the same error. Here the first error ends the logging: later calls do
    nothing, and the thread's traceback is not printed (until :meth:`close`), so that the run can
    save its last state and end with one message (:meth:`check`).

    Args:
        log_dir: the log folder (`--log_dir`).
        purge_step: TensorBoard drops the events logged from this step on (for a resume).
    """

    def __init__(self, log_dir: str | os.PathLike, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter  # TensorBoard: only when training

        self.log_dir = Path(log_dir)
        self.error: OSError | None = None
        self._excepthook = threading.excepthook
        threading.excepthook = self._quiet_writer_thread
        self._writer = self._call(SummaryWriter, log_dir=str(log_dir), purge_step=purge_step)

    def _quiet_writer_thread(self, failure: threading.ExceptHookArgs) -> None:
        writer_thread = type(failure.thread).__module__.startswith("tensorboard.")
        if not (writer_thread and issubclass(failure.exc_type, OSError)):
            self._excepthook(failure)  # the run reports it at its next call

    def _call(self, method: Callable, *args: object, **kwargs: object) -> object:
        if self.error is None:
            try:
                return method(*args, **kwargs)
            except OSError as err:
                self.error = err
        return None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._call(self._writer.add_scalar, tag, value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._call(self._writer.flush)

    def close(self) -> None:
        """Close the log (its thread ends); errors here are kept too. Idempotent."""
        if self._writer is not None:
            if self.error is None:
                self._call(self._writer.close)
            else:  # end its thread; what it could not write stays unwritten
                with contextlib.suppress(Exception):
                    self._writer.close()
            self._writer = None
        threading.excepthook = self._excepthook

    def check(self) -> None:
        """Raise what went wrong, as one message.

        Raises:
            UserError: a write failed; the run stopped after saving its last state.
        """
        if self.error is not None:
            raise UserError(
                f"TensorBoard could not write to --log_dir {self.log_dir} "
                f"({self.error.strerror or self.error}), so training stopped after saving the "
                "last state. Make room there (or fix the folder), then continue with the same "
                "command plus --resume."
            )

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
