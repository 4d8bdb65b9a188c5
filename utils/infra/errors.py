"""User-facing errors: one clear paragraph and exit code 2, never a traceback.

`models/` raises plain `ValueError` subclasses (`ConfigError`, `CheckpointError`) worded for the
user; the scripts' `run_cli` treats them like a `UserError`. Exit codes of every script:

    0    done
    2    a mistake the user can fix (bad flag, missing or damaged file); the message says how
    130  Ctrl+C (128 + SIGINT): a run that stopped after saving, or a second Ctrl+C at once
    143  SIGTERM (128 + SIGTERM): a run that stopped after saving, or a second SIGTERM at once
    138  SIGUSR1 (128 + SIGUSR1), a scheduler's warning: a run that stopped after saving; a
         job script requeues on it (tools/slurm/train.sbatch)

128 + signal is what a shell reports for a process a signal killed, so a scheduler or
`make a && make b` sees that the run did not finish.

This module imports nothing heavy (no torch), so that `--help` answers at once.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable

from models.configs import ConfigError
from models.npz import CheckpointError

__all__ = [
    "USER_ERRORS",
    "LoaderError",
    "StopAtOnce",
    "StoppedBySignal",
    "UserError",
    "exit_interrupted",
    "run_cli",
]

logger = logging.getLogger(__name__)


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, wrong checkpoint).

    The message names the problem and the fix; command-line entry points print it and exit 2.
    """


class LoaderError(UserError):
    """The data loader failed: a worker died, hung or raised (one message, not its traceback)."""


USER_ERRORS = (UserError, ConfigError, CheckpointError)  # what run_cli turns into a message


class StopAtOnce(KeyboardInterrupt):
    """A second SIGINT or SIGTERM: stop now, without saving (`run_cli` exits 128 + signal)."""

    def __init__(self, signum: int):
        super().__init__()
        self.signum = int(signum)


class StoppedBySignal(Exception):  # noqa: N818 - not an error: a run that stopped as asked
    """Raised by a `main` that stopped early on a signal (after saving what it had to).

    `run_cli` exits with `128 + signum` (SIGINT 130, SIGTERM 143), the code a shell reports
    for a process killed by that signal, printing the message, if any, on one line.

    Args:
        signum: the signal that stopped the run; None when it is not known (under torchrun
            another process may have received it), which exits as SIGTERM does.
        message: what to print (e.g. how to resume).
    """

    def __init__(self, signum: int | None, message: str = ""):
        super().__init__(message)
        self.signum = int(signum) if signum is not None else int(signal.SIGTERM)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def run_cli(main: Callable[[], object]) -> None:
    """Run a command-line `main`; every way it can end becomes one line and an exit code.

    A user's mistake (`USER_ERRORS`) prints its message and exits 2; `StoppedBySignal` exits
    128 + signal; a Ctrl+C that reaches here (the second one in train.py, the first elsewhere)
    prints one line and exits 130, a second SIGTERM in train.py (`StopAtOnce`) 143.
    """
    # `exit_interrupted` is set by `utils.infra.flags.parse_first`
    if signal.getsignal(signal.SIGINT) is exit_interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except StoppedBySignal as stop:
        if str(stop):
            print(str(stop), file=sys.stderr)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt as err:  # a second Ctrl+C (or SIGTERM: `StopAtOnce`)
        exit_interrupted(getattr(err, "signum", int(signal.SIGINT)))


def exit_interrupted(signum: int = int(signal.SIGINT), *_: object) -> None:
    """Print the one line of an interrupt and exit with 128 + `signum`. Also a SIGINT handler,
    for the seconds a script spends importing torch before `run_cli` runs
    (`signal.signal(SIGINT, exit_interrupted)`)."""
    how = "Ctrl+C" if signum == signal.SIGINT else signal.Signals(signum).name
    print(
        f"Interrupted ({how}): stopped at once. Every file written so far is complete "
        "(saves are atomic).",
        file=sys.stderr,
    )
    sys.exit(128 + signum)
