"""utils.infra.errors and utils.infra.flags: every way a command line ends is one line and a
distinct code."""

from __future__ import annotations

import argparse
import importlib
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import imports_torch, run_script
from utils.infra.errors import StoppedBySignal, UserError, run_cli
from utils.infra.flags import (
    HelpFormatter,
    http_url,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    random_seed,
    seconds,
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
        from utils.infra.errors import run_cli
        from utils.infra.stopping import GracefulExit

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
        (random_seed, "0", 0),
        (random_seed, "4294967295", 2**32 - 1),
        (positive_float, "3.4e38", 3.4e38),
        (seconds, "86400", 86400.0),
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
        (random_seed, "4294967296", "must be from 0 to 2**32 - 1 = 4294967295, got 4294967296"),
        (random_seed, "-1", "must be from 0 to 2**32 - 1"),
        (
            positive_float,
            "1e39",
            "must be at most 3.403e+38 in size (larger is inf",
        ),
        (non_negative_float, "1e300", "must be at most 3.403e+38 in size"),
        (seconds, "1e300", "must be at most 9223372036 seconds"),
        (seconds, "1e10", "must be at most 9223372036 seconds"),
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


@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        ("train", ["--name", "x", "--seed", "4294967296"], "argument --seed: must be from 0"),
        ("train", ["--name", "x", "--learning_rate", "1e39"], "argument --learning_rate: must"),
        (
            "utils.infra.download",
            ["ViT-B_16", "--timeout", "1e300"],
            "argument --timeout: must be at",
        ),
    ],
)
def test_numbers_that_later_break_are_refused_by_the_scripts_flags(
    capsys, script, argv, message
) -> None:
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as info:
        module.parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("script", "argv"),
    [
        ("train", ["--name", "x"]),
        ("eval", ["--checkpoint", "x.bin"]),
        ("predict", ["--checkpoint", "x.bin", "--image", "x.png"]),
        ("fewshot", ["--checkpoint", "x.npz", "--dataset", "digits"]),
        ("analyze", []),
    ],
)
def test_every_script_that_runs_a_model_on_a_gpu_takes_tf32_on_by_default(
    capsys, script, argv
) -> None:
    module = importlib.import_module(script)
    assert module.parse_args(argv).tf32 == "on"
    assert module.parse_args([*argv, "--tf32", "off"]).tf32 == "off"
    with pytest.raises(SystemExit) as info:
        module.parse_args([*argv, "--tf32", "true"])
    assert info.value.code == 2
    assert "argument --tf32: invalid choice: 'true'" in capsys.readouterr().err


def test_the_largest_seed_and_timeout_the_flags_take_work(tmp_path) -> None:
    import socket

    import numpy as np

    np.random.seed(random_seed(str(2**32 - 1)))
    with socket.socket() as sock:
        sock.settimeout(seconds(str(threading.TIMEOUT_MAX)))  # the socket layer can hold it


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps")
def test_ctrl_c_while_train_py_imports_torch_is_one_line_and_exit_130(tmp_path) -> None:
    argv = ["train.py", "--name", "x", "--dataset", "digits", "--output_dir", str(tmp_path)]
    proc = subprocess.Popen(
        [sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    # Wait until torch's shared library is being loaded: `import torch` is under way.
    while (
        proc.poll() is None and time.monotonic() < deadline and "libtorch" not in maps.read_text()
    ):
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.splitlines() == [
        "Interrupted (Ctrl+C): stopped at once. Every file written so far is complete "
        "(saves are atomic)."
    ]


# Runs a script as `python SCRIPT` does, pressing Ctrl+C (SIGINT) as it starts importing the
# project's first module, the script's first 0.1 s.
CTRL_C_AT_FIRST_IMPORT = """
import os, runpy, signal, sys

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("models", "utils"):
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)

sys.meta_path.insert(0, CtrlC())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize(
    "script",
    [
        "train.py",
        "eval.py",
        "predict.py",
        "export.py",
        "visualize.py",
        "fewshot.py",
        "analyze.py",
        "sweep.py",
    ],
)
def test_ctrl_c_before_the_project_modules_load_exits_130_quietly(script) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CTRL_C_AT_FIRST_IMPORT, script, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr == ""
    assert proc.stdout == ""  # stopped before --help was answered


@pytest.mark.slow
@pytest.mark.parametrize(
    "script", ["eval.py", "export.py", "fewshot.py", "predict.py", "sweep.py", "visualize.py"]
)
def test_help_answers_before_torch_loads(script) -> None:
    """Each script parses first (`utils.infra.flags.parse_first`), then imports torch."""
    proc = run_script(script, "--help", importtime=True)
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: ")
    assert not imports_torch(proc)


def test_a_mistake_found_by_parse_args_is_one_line_and_exit_2_before_torch_loads() -> None:
    """A `UserError` of a script's `parse_args` in the early parse: run_cli's line and code."""
    proc = run_script("sweep.py", "--name", "x", "--print_commands", "--collect", importtime=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert lines == [
        "error: --print_commands prints the runs still to do and --collect summarises the "
        "finished ones: pass one of them."
    ]
    assert not imports_torch(proc)
