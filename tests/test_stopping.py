"""utils.infra.stopping: signals become a flag; a loss that stays non-finite stops the run."""

from __future__ import annotations

import logging
import math
import os
import signal
import time

import pytest
import torch

from tests.helpers import HostReads
from utils.infra.errors import StoppedBySignal, UserError, run_cli
from utils.infra.stopping import GracefulExit, NonFiniteGuard, NonFiniteLossError


def test_graceful_exit_turns_signals_into_a_flag() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    with GracefulExit() as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested
        assert stop.signal_name == "SIGTERM"
        assert stop.signum == signal.SIGTERM  # train.py exits 128 + signum after saving
        assert stop.should_stop()
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl+C stops at once
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_at_once_with_its_exit_code(first: int, capsys) -> None:
    """SIGTERM twice (a scheduler's stop, repeated) stops at once as Ctrl+C twice does: while a
    step waits (for a stuck loader worker, say), the first signal alone cannot end it."""

    def waiting_step() -> None:
        with GracefulExit():
            signal.raise_signal(first)
            signal.raise_signal(signal.SIGTERM)
            time.sleep(60)  # never reached

    start = time.monotonic()
    with pytest.raises(SystemExit) as info:
        run_cli(waiting_step)
    assert time.monotonic() - start < 10
    assert info.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "Interrupted (SIGTERM): stopped at once." in err
    assert "Traceback" not in err


def test_sigusr1_is_a_warning_that_stops_after_saving_and_never_escalates(capsys) -> None:
    """Slurm's `--signal=USR1@90` warning: the run stops after the step, saves and exits 138, the
    code a job script requeues on. A launcher forwarding the workers' warning repeats it: no
    stop at once then; SIGTERM after it (the time limit itself) still stops at once."""
    with GracefulExit() as stop:
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGUSR1)
        assert stop.should_stop()
        assert (stop.signum, stop.signal_name) == (signal.SIGUSR1, "SIGUSR1")
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)

    def stopped_by_warning() -> None:
        with GracefulExit() as stop:
            signal.raise_signal(signal.SIGUSR1)
        raise StoppedBySignal(stop.signum)

    with pytest.raises(SystemExit) as info:
        run_cli(stopped_by_warning)
    assert info.value.code == 138
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # restored on exit


def test_non_finite_guard() -> None:
    guard = NonFiniteGuard(patience=3)
    assert guard.check(torch.tensor(1.0), step=1)
    assert not guard.check(float("nan"), step=2)
    assert not guard.check(torch.tensor(float("inf")), step=3)
    assert guard.check(0.5, step=4)  # a finite loss resets the count
    assert not guard.check(float("nan"), step=5)
    assert not guard.check(float("nan"), step=6)
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps.*not overwritten"):
        guard.check(float("nan"), step=7)
    assert issubclass(NonFiniteLossError, UserError)


def test_non_finite_guard_counts_on_the_device(caplog: pytest.LogCaptureFixture) -> None:
    """`record` reads nothing back; `report`, where the loop syncs anyway, warns about the
    updates skipped since the last report and stops a run whose loss was non-finite 3 times in
    a row, naming the step it happened at, even when the loss recovered after it."""
    guard = NonFiniteGuard(patience=3)
    losses = [1.0, math.nan, math.inf, 2.0, math.nan, math.nan, math.nan, 0.5]  # steps 1 to 8
    reads, skips = HostReads(), []
    with reads:
        for step, loss in enumerate(losses, start=1):
            guard.at_step(step)
            skips.append(guard.record(torch.tensor(loss)))
            if step == 4:
                reads.phase = "report"
                with caplog.at_level(logging.WARNING):
                    guard.report()  # steps 2 and 3: warned about, no stop
                reads.phase = None
    assert reads.counts[None] == 0
    assert [bool(skip) for skip in skips] == [not math.isfinite(x) for x in losses]
    assert "2 steps up to step 3 had a non-finite loss (the last: inf, 2/3 in a row)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(NonFiniteLossError) as stopped:
        guard.report()
    assert "the loss was nan for 3 consecutive steps (last: step 7)" in str(stopped.value)
    assert "3 steps up to step 7 had a non-finite loss (the last: nan, 3/3 in a row)" in caplog.text
