"""The run's log of scalars: TensorBoard's event files, `metrics.jsonl` beside them, and
optionally Weights & Biases, written so that their failures (a full disk) end the run with one
message after the last state is saved, instead of tracebacks from TensorBoard's thread."""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from utils.infra.errors import UserError

__all__ = ["METRICS", "WANDB_ID", "EventLog", "MetricsFile"]

METRICS = "metrics.jsonl"  # in the log folder: one JSON object per scalar
WANDB_ID = "wandb_run_id"  # in the log folder: the W&B run a resume continues


class MetricsFile:
    """`<log_dir>/metrics.jsonl`: one line per scalar, `{"step": 10, "tag": "train/loss",
    "value": 0.53, "wall_time": 1765140000.5}` (seconds since the epoch, as TensorBoard's), for
    pandas (`read_json(path, lines=True)`), jq or a spreadsheet. A non-finite value is written
    as `NaN` or `Infinity`, as Python's json module does.

    Each line goes to the file in one append (`O_APPEND`, one `write`): a crash, even a
    `kill -9`, leaves whole lines. Opened with `purge_step` (a resume), the lines from that step
    on, which the interrupted run logged after its last saved state, are dropped (they are
    logged again), as is a line cut short; without it (a new run) the file starts empty.

    Args:
        path: the file.
        purge_step: keep only the lines of earlier steps; None starts anew.
    """

    def __init__(self, path: str | os.PathLike, purge_step: int | None = None):
        self.path = Path(path)
        kept = _lines_before(self.path, purge_step) if purge_step is not None else []
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)  # whole: the old lines, or the kept ones
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def write(self, tag: str, value: float, step: int) -> None:
        record = {"step": step, "tag": tag, "value": value, "wall_time": round(time.time(), 3)}
        line = (json.dumps(record) + "\n").encode("utf-8")
        if os.write(self._fd, line) != len(line):  # a disk that filled up within the line
            raise OSError(f"{self.path}: only part of a line was written")

    def flush(self) -> None:
        os.fsync(self._fd)  # never behind the last saved state, even after a power cut

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def _lines_before(path: Path, step: int) -> list[str]:
    """The whole lines of `path` (none when it is missing) whose step is below `step`."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    kept = []
    for line in text.splitlines(keepends=True):
        try:
            record = json.loads(line) if line.endswith("\n") else None
        except json.JSONDecodeError:
            record = None
        if (
            isinstance(record, dict)
            and isinstance(record.get("step"), int)
            and record["step"] < step
        ):
            kept.append(line)
    return kept


class EventLog:
    """The run's log of scalars: TensorBoard's event files, `metrics.jsonl` (`MetricsFile`) and,
    when asked, Weights & Biases. `SummaryWriter`'s `add_scalar`, `flush` and `close`, whose
    write failures (a full disk, a folder gone) are kept in :attr:`error` instead of raised.

    TensorBoard writes from a thread of its own, which prints its traceback and makes every later
    call from the run raise the same error. Here the first error ends the logging: later calls do
    nothing, and the thread's traceback is not printed (until :meth:`close`), so that the run can
    save its last state and end with one message (:meth:`check`).

    Args:
        log_dir: the log folder (`--log_dir`).
        purge_step: the logs drop what was logged from this step on (for a resume); W&B keeps
            it, and ignores the steps logged again.
        wandb: a W&B run's `name` and `config` to log to as well (`wandb` must be installed;
            `WANDB_PROJECT`, `WANDB_MODE` and W&B's other variables apply). A resume continues
            the W&B run whose id `<log_dir>/wandb_run_id` holds.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        purge_step: int | None = None,
        wandb: dict | None = None,
    ):
        from torch.utils.tensorboard import SummaryWriter  # TensorBoard: only when training

        self.log_dir = Path(log_dir)
        self.error: OSError | None = None
        self._failed: str | None = None  # what could not be written: the start of `check`
        self._excepthook = threading.excepthook
        threading.excepthook = self._quiet_writer_thread
        self._writer = self._call(SummaryWriter, log_dir=str(log_dir), purge_step=purge_step)
        self._metrics = self._call(
            MetricsFile, self.log_dir / METRICS, purge_step, failed=self._metrics_failed
        )
        self._wandb = None
        if wandb is not None and self.error is None:
            self._wandb = self._call(_start_wandb, self.log_dir, purge_step is not None, **wandb)

    def _quiet_writer_thread(self, failure: threading.ExceptHookArgs) -> None:
        writer_thread = type(failure.thread).__module__.startswith("tensorboard.")
        if not (writer_thread and issubclass(failure.exc_type, OSError)):
            self._excepthook(failure)  # the run reports it at its next call

    @property
    def _metrics_failed(self) -> str:
        return f"{self.log_dir / METRICS} could not be written"

    def _call(
        self, method: Callable, *args: object, failed: str | None = None, **kwargs: object
    ) -> object:
        """`method(*args, **kwargs)`, unless an earlier call failed; an OSError is kept as the
        log's `error`, and `failed` (what could not be written) as the start of `check`'s
        message (None: TensorBoard's log folder)."""
        if self.error is None:
            try:
                return method(*args, **kwargs)
            except OSError as err:
                self.error = err
                self._failed = failed
        return None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        value = float(value)
        if self._writer is not None:
            self._call(self._writer.add_scalar, tag, value, step)
        if self._metrics is not None:
            self._call(self._metrics.write, tag, value, step, failed=self._metrics_failed)
        if self._wandb is not None and math.isfinite(value):
            self._wandb.log({tag: value}, step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._call(self._writer.flush)
        if self._metrics is not None:
            self._call(self._metrics.flush, failed=self._metrics_failed)

    def close(self) -> None:
        """Close the log (its thread ends); errors here are kept too. Idempotent."""
        if self._writer is not None:
            if self.error is None:
                self._call(self._writer.close)
            else:  # end its thread; what it could not write stays unwritten
                with contextlib.suppress(Exception):
                    self._writer.close()
            self._writer = None
        if self._metrics is not None:
            with contextlib.suppress(OSError):
                self._metrics.close()
            self._metrics = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        threading.excepthook = self._excepthook

    def check(self) -> None:
        """Raise what went wrong, as one message.

        Raises:
            UserError: a write failed; the run stopped after saving its last state.
        """
        if self.error is not None:
            what = self._failed or f"TensorBoard could not write to --log_dir {self.log_dir}"
            raise UserError(
                f"{what} ({self.error.strerror or self.error}), so training stopped after "
                "saving the last state. Make room there (or fix the folder), then continue with "
                "the same command plus --resume."
            )

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _start_wandb(log_dir: Path, resume: bool, name: str, config: dict) -> object:
    """A W&B run in `log_dir`: the one `<log_dir>/wandb_run_id` names for a resume, else new."""
    import wandb  # optional: only with --wandb

    id_file = log_dir / WANDB_ID
    resumed = resume and id_file.is_file()
    run_id = id_file.read_text().strip() if resumed else uuid.uuid4().hex[:8]  # W&B's id form
    id_file.write_text(run_id + "\n")
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "vit-pytorch"),
        name=name,
        id=run_id,
        resume="allow",
        dir=str(log_dir),
        config=config,
    )
