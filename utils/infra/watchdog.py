"""The loader workers' watchdog: every way a DataLoader worker can fail (killed, crashed, stuck,
out of shared memory or file descriptors) ends the run with one message (`LoaderError`), and no
worker outlives or blocks the process that started it.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import multiprocessing
import multiprocessing.queues
import multiprocessing.util  # registers its exit handler before ours
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess

from torch._utils import ExceptionWrapper
from torch.utils.data import DataLoader, Dataset, get_worker_info

from utils.infra.errors import USER_ERRORS, LoaderError

__all__ = ["LOADER_TIMEOUT", "WatchedLoader", "init_worker", "loader_error"]

# The longest one batch may take to arrive from the loader workers before the run gives up on
# them as stuck (a hung network file system): 100x what a batch of 512 large JPEGs takes.
LOADER_TIMEOUT = 600.0


def init_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: leave SIGINT/SIGTERM to the training process, die with it.

    Ctrl+C in a terminal signals the whole foreground process group, workers included. A
    worker that died of it would break the batch or evaluation the training process finishes
    before it saves and exits (`train.py` stops cleanly on those signals); the training process
    shuts its workers down itself (or kills them at exit: `_kill_leftover_workers`). On Linux a
    worker is also killed when the training process dies (`prctl(PR_SET_PDEATHSIG)`), so that a
    `kill -9` of the run leaves no worker behind. A batch the worker cannot send comes back as
    its error (`_send_error_instead`).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    multiprocessing.queues.Queue._on_queue_feeder_error = _send_error_instead
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _send_error_instead(queue: multiprocessing.queues.Queue, err: Exception, obj: object) -> None:
    """In a worker: a batch that could not be sent is answered with the error instead.

    Sending moves a batch's tensors into shared memory and passes their file descriptors; a
    full /dev/shm or too low `ulimit -n` fails there, in the queue's feeder thread, where
    multiprocessing only prints the error and drops the batch: the training process would wait
    `LOADER_TIMEOUT` for it. The error goes in the batch's place (torch's worker sends
    `(index, batch)` pairs) and is raised where the batch is awaited, as a worker's exception
    is; what cannot be answered so ends the worker, which the training process notices at once.
    """
    index, data = obj if isinstance(obj, tuple) and len(obj) == 2 else (None, None)
    info = get_worker_info()
    if index is None or info is None or isinstance(data, ExceptionWrapper):
        traceback.print_exc()
        os._exit(1)
    queue.put((index, ExceptionWrapper(where=f"in DataLoader worker process {info.id}")))


@atexit.register  # after multiprocessing's own exit handler is registered: runs before it
def _kill_leftover_workers() -> None:
    """Kill the loader workers still alive when the process exits (after an error, say).

    multiprocessing's exit handler stops daemonic children with SIGTERM, which workers ignore
    (`init_worker`), then waits for them: forever.
    """
    children = [p for p in multiprocessing.active_children() if p.daemon]
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)


class WatchedLoader(DataLoader):
    """A DataLoader whose worker failures end the run with one message (`LoaderError`).

    - A worker that dies (the out-of-memory killer, a bus error on a full /dev/shm) or raises
      is reported by torch as a RuntimeError or the worker's exception with its traceback in
      the message; `loader_error` turns either into one `LoaderError`. torch's SIGCHLD handler
      raises its error at whatever the main process is doing (mid optimizer step, mid save);
      here it acts only while the main process waits for a batch (`_on_child_exit`), so the
      error comes out of `next()`, where a run can still save a consistent state.
    - A batch that takes longer than `LOADER_TIMEOUT` (a stuck worker) is such an error too.
    - `after_batch` runs after each batch arrives, or fails to (the loaders name the unreadable
      images their workers met there).
    """

    def __init__(self, dataset: Dataset, after_batch: Callable[[], None] | None = None, **options):
        if options.get("num_workers", 0) > 0:
            options.setdefault("timeout", LOADER_TIMEOUT)
            options.setdefault("worker_init_fn", init_worker)
        super().__init__(dataset, **options)
        self.after_batch = after_batch

    def start_workers(self) -> None:
        """Fork the workers now rather than at the first batch, where they persist
        (`persistent_workers`); the first pass reuses them.

        A fork copies every lock some other thread of the process holds at that instant, held,
        into the worker, which then waits for it forever. Under torch.distributed the
        collectives' threads are busy during training, so a loader first iterated then (an
        evaluation loader at the first evaluation) could fork a worker that never delivers a
        batch; at set-up no collective is in flight.
        """
        if self.num_workers > 0 and self.persistent_workers:
            iter(self)

    def __iter__(self):
        global _awaiting_batch
        _awaiting_batch = True  # starting workers: their death is an error now
        try:
            iterator = super().__iter__()
            if self.num_workers > 0:
                _watch_child_exits()
        except Exception as err:
            failure = loader_error(err)
            if failure is None:
                raise
            raise failure from None
        finally:
            _awaiting_batch = False
        return self._batches(iterator)

    def _batches(self, iterator):
        global _awaiting_batch
        while True:
            _awaiting_batch = True
            try:
                _raise_deferred_child_exit()
                batch = next(iterator)
            except StopIteration:
                return
            except Exception as err:
                workers = getattr(iterator, "_workers", ())
                failure = loader_error(err, workers) if self.num_workers > 0 else None
                if failure is None:
                    raise
                raise failure from None
            finally:
                _awaiting_batch = False
                if self.after_batch is not None:
                    self.after_batch()
            yield batch


_awaiting_batch = False  # the main process is inside `WatchedLoader`'s `next()`
_child_exited = False  # a child exited while it was not
_torch_sigchld = None  # torch's SIGCHLD handler: raises if a loader worker failed


def _on_child_exit(signum: int, frame: object) -> None:
    global _child_exited
    if _awaiting_batch:
        _torch_sigchld(signum, frame)
    else:
        _child_exited = True  # checked when the next batch is awaited


def _watch_child_exits() -> None:
    """Put `_on_child_exit` in front of the SIGCHLD handler torch installed (main thread)."""
    global _torch_sigchld
    current = signal.getsignal(signal.SIGCHLD)
    if current is _on_child_exit or not callable(current):
        return
    if threading.current_thread() is threading.main_thread():
        _torch_sigchld = current
        signal.signal(signal.SIGCHLD, _on_child_exit)


def _raise_deferred_child_exit() -> None:
    global _child_exited
    if _child_exited:
        _child_exited = False
        _torch_sigchld(signal.SIGCHLD, None)


def loader_error(err: BaseException, workers: Sequence[BaseProcess] = ()) -> LoaderError | None:
    """The one message for an error torch reports about its loader workers, else None.

    torch words them so: "DataLoader worker (pid N) is killed by signal: Killed.", "...
    exited unexpectedly", "DataLoader timed out after N seconds.", "Too many open files.
    Communication with the workers is no longer possible", an EOFError when a batch's shared
    memory could not be passed (too few file descriptors), and an exception raised in a worker
    comes back as its type with "Caught X in DataLoader worker process N" and the worker's
    traceback as its message. Starting workers without file descriptors or room in /dev/shm
    raises an OSError. A worker killed while it hands over a batch breaks the connection
    (EOFError, ConnectionResetError): when one of `workers` (the loader's) has died, its death
    is the message.
    """
    text = str(err)
    fewer = "lower --num_workers, or use --num_workers 0 to load in the training process"
    if "in DataLoader worker process" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        if isinstance(err, USER_ERRORS):  # ours, raised in a worker: its own message
            return LoaderError(last.split(": ", 1)[-1])
        if "Too many open files" in text or "No space left on device" in text:
            return LoaderError(f"A data-loading worker failed: {last}. {_limits_hint()}")
        return LoaderError(
            f"A data-loading worker failed: {last}. Run with --num_workers 0 to see where."
        )
    if isinstance(err, OSError) and err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOSPC):
        # starting a worker: its pipes, or its queue's semaphores in /dev/shm
        return LoaderError(
            f"The data-loading workers could not start ({err.strerror}). {_limits_hint()}"
        )
    if isinstance(err, (EOFError, ConnectionError)):  # a batch's file descriptors were lost
        dead = _dead_worker(workers)
        if dead is not None:
            return _worker_died(str(dead.pid), _death(dead.exitcode), fewer)
        return LoaderError(
            f"The data-loading workers could not pass a batch ({err!r}). {_limits_hint()}"
        )
    if not isinstance(err, RuntimeError):
        return None
    found = re.search(r"DataLoader worker \(pid\(?s?\)? ([\d, ]+)\) (.*?)(\. |\.$|$)", text)
    if found:
        return _worker_died(found.group(1), found.group(2), fewer)
    if text.startswith("DataLoader timed out after "):
        seconds = text.removeprefix("DataLoader timed out after ").split()[0]
        return LoaderError(
            f"No batch came from the data-loading workers in {seconds} s: one is "
            f"stuck (a hung network file system?). Check the data folder's storage, or "
            f"{fewer}."
        )
    if "Too many open files" in text:
        return LoaderError(f"The data loader ran out of file descriptors. {_limits_hint()}")
    return None


def _worker_died(pids: str, what: str, fewer: str) -> LoaderError:
    """The message for dead workers `pids`; `what` in torch's words ("is killed by signal:
    Killed", "exited unexpectedly")."""
    if "Bus error" in what:
        cause = "the shared memory (/dev/shm) is likely too small. " + _limits_hint()
    elif "Killed" in what:
        cause = f"usually the out-of-memory killer: {fewer}, or a smaller batch"
    else:  # found dead without its exit status
        cause = (
            f"killed (the out-of-memory killer kills the largest process) or crashed: {fewer}, "
            "or a smaller batch"
        )
    return LoaderError(f"A data-loading worker (pid {pids}) {what}: {cause}.")


def _death(exitcode: int) -> str:
    """How a process ended, in torch's words for its workers."""
    if exitcode < 0:
        return f"is killed by signal: {signal.strsignal(-exitcode) or -exitcode}"
    return "exited unexpectedly"


def _dead_worker(workers: Sequence[BaseProcess], wait: float = 1.0) -> BaseProcess | None:
    """A worker among `workers` that has ended with an error, waiting up to `wait` seconds for
    one to be seen dead (its connection may break a moment before its exit is)."""
    deadline = time.monotonic() + wait
    while workers:
        for worker in workers:
            if worker.exitcode not in (None, 0):
                return worker
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return None


def _limits_hint() -> str:
    return (
        "Workers pass batches through shared memory (/dev/shm, e.g. `docker run --shm-size 8g`) "
        "and file descriptors (`ulimit -n`, raise it to 4096 or more): raise those limits, or "
        "use --num_workers 0."
    )
