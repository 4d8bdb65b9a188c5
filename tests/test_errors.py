"""utils.errors and utils.flags: every way a command line ends is one line and a distinct code."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from utils.errors import StoppedBySignal, UserError, run_cli
from utils.flags import (
    HelpFormatter,
    http_url,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

ROOT = Path(__file__).resolve().parents[1]


def _exit_code(main, capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_cli(main)
    return info.value.code, capsys.readouterr().err


def test_each_ending_has_its_exit_code_and_one_line(capsys) -> None:
    def mistake() -> None:
        raise UserError("--img_size 0 is not an image size.")

    def stopped(signum: int | None) -> None:
        raise StoppedBySignal(signum, "Stopped; continue with --resume.")

    def interrupted() -> None:
        raise KeyboardInterrupt

    assert _exit_code(mistake, capsys) == (2, "error: --img_size 0 is not an image size.\n")
    assert _exit_code(lambda: stopped(signal.SIGTERM), capsys) == (
        143,
        "Stopped; continue with --resume.\n",
    )
    assert _exit_code(lambda: stopped(signal.SIGINT), capsys)[0] == 130
    assert _exit_code(lambda: stopped(None), capsys)[0] == 143  # signalled elsewhere: SIGTERM
    code, err = _exit_code(interrupted, capsys)
    assert code == 130
    assert err.count("\n") == 1
    assert "Interrupted (Ctrl+C)" in err
    run_cli(lambda: {"accuracy": 1.0})  # a finished run returns; its result is not a code


def test_a_second_ctrl_c_exits_130_with_one_line_and_no_traceback() -> None:
    child = textwrap.dedent(
        """
        import time
        from utils.errors import run_cli
        from utils.stopping import GracefulExit

        def main():
            with GracefulExit():
                print("ready", flush=True)
                while True:
                    time.sleep(0.01)

        run_cli(main)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)  # the first: a request to stop after the step
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)  # the second: at once
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("Interrupted (Ctrl+C)")


@pytest.mark.parametrize(
    ("convert", "text", "value"),
    [
        (positive_int, "3", 3),
        (non_negative_int, "0", 0),
        (positive_float, "3e-2", 0.03),
        (non_negative_float, "0", 0.0),
        (http_url, "http://127.0.0.1:8000/vit", "http://127.0.0.1:8000/vit"),
    ],
)
def test_flag_types_take_good_values(convert, text, value) -> None:
    assert convert(text) == value


@pytest.mark.parametrize(
    ("convert", "text", "message"),
    [
        (positive_int, "0", "must be at least 1, got 0"),
        (positive_int, "-224", "must be at least 1, got -224"),
        (positive_int, "2.5", "expected a whole number, got '2.5'"),
        (non_negative_int, "-1", "cannot be negative, got -1"),
        (positive_float, "nan", "expected a finite number, got nan"),
        (positive_float, "-1", "must be above 0, got -1"),
        (positive_float, "0", "must be above 0, got 0"),
        (non_negative_float, "-1", "cannot be negative, got -1"),
        (non_negative_float, "inf", "expected a finite number, got inf"),
        (http_url, "notaurl", "expected an http:// or https:// address"),
        (http_url, "ftp://host/x", "expected an http:// or https:// address"),
    ],
)
def test_flag_types_refuse_bad_values_with_exit_code_2(capsys, convert, text, message) -> None:
    parser = argparse.ArgumentParser(prog="script.py")
    parser.add_argument("--value", type=convert)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--value", text])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument --value: {message}" in err
    assert "Traceback" not in err


def test_help_shows_defaults_but_not_empty_ones() -> None:
    parser = argparse.ArgumentParser(
        description="Line one.\n    indented example", formatter_class=HelpFormatter
    )
    parser.add_argument("--eval_batch_size", type=positive_int, default=64, help="Per process.")
    parser.add_argument("--model_type", default=None, help="Default: from the checkpoint.")
    parser.add_argument("--overwrite", action="store_true", help="Replace it.")
    text = parser.format_help()
    assert "Per process. (default: 64)" in text
    assert "(default: None)" not in text
    assert "(default: False)" not in text
    assert "\n    indented example" in text  # examples keep their lines
