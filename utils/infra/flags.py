"""What the command lines share: value types that refuse bad numbers, the help format, logging,
and `parse_first`.

It imports nothing heavy. Every script parses first, then imports: its `parse_args`, near the
top, uses only torch-free modules (this one, `models.configs`, the owners of its choices:
`utils.data.registry`, `utils.recipe.precision`, `utils.recipe.update_rule`);
`parse_first(parse_args)` runs it under `if __name__ == "__main__":`; the script's heavy imports
follow. So `--help` and a mistyped flag answer at once, before torch loads. A value type raises
`argparse.ArgumentTypeError`, which argparse prints as one line (`error: argument --img_size:
must be at least 1, got 0`) before exiting with code 2, the code of every other user mistake
(`utils.infra.errors`).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import signal
import sys
import threading
import urllib.parse
from collections.abc import Callable

from models.configs import model_names
from utils.infra.errors import UserError, exit_interrupted, run_cli

__all__ = [
    "HelpFormatter",
    "add_model_flags",
    "add_process_flags",
    "add_tf32_flag",
    "add_verbose",
    "count_at_most",
    "default_num_workers",
    "fraction",
    "http_url",
    "log_level",
    "non_negative_float",
    "non_negative_int",
    "parse_first",
    "positive_float",
    "positive_int",
    "random_seed",
    "require_torch",
    "seconds",
    "setup_logging",
]

FLOAT32_MAX = 3.4028234663852886e38  # a larger number is inf as a float32 (learning rates are)
SEED_MAX = 2**32 - 1  # NumPy's seeds are 32-bit (`np.random.seed`)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def _float(text: str) -> float:
    """A number that stays finite as a float32 (what the training step computes in)."""
    value = _finite(text)
    if abs(value) > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(
            f"must be at most {FLOAT32_MAX:.4g} in size (larger is infinite in float32), got {text}"
        )
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1 (sizes, counts, steps)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def count_at_most(maximum: int) -> Callable[[str], int]:
    """The type of a count from 1 to `maximum`: a count that sizes the work (runs, seeds) gets a
    bound, so that a typo is refused at once, not after hours or gigabytes."""

    def count(text: str) -> int:
        value = positive_int(text)
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return count


def non_negative_int(text: str) -> int:
    """An integer of at least 0 (worker counts, intervals where 0 means never)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"cannot be negative, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0 (learning rates, timeouts)."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def seconds(text: str) -> float:
    """A duration above 0 that the clock and the socket layer can wait for (timeouts)."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    if value > threading.TIMEOUT_MAX:
        raise argparse.ArgumentTypeError(
            f"must be at most {threading.TIMEOUT_MAX:.0f} seconds (the longest wait the "
            f"system's clock can hold), got {text}"
        )
    return value


def random_seed(text: str) -> int:
    """A random seed: a whole number from 0 to 2**32 - 1, the range NumPy takes."""
    value = _int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**32 - 1 = {SEED_MAX}, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number of at least 0 (weight decay, clipping norm, loss scale: 0 turns off)."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"cannot be negative, got {text}")
    return value


def add_verbose(parser: argparse.ArgumentParser) -> None:
    """`--verbose`: log details too, e.g. every key of a checkpoint that does not fit a model."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="Log details too, e.g. every key of a checkpoint that does not fit the model.",
    )


def log_level(verbose: bool, is_main: bool = True) -> int:
    """DEBUG with --verbose, INFO otherwise; warnings only on processes other than the first."""
    if not is_main:
        return logging.WARNING
    return logging.DEBUG if verbose else logging.INFO


def setup_logging(verbose: bool = False, rank: int = 0, world_size: int = 1) -> None:
    """Every script's logging: to stderr, one format (time, level, the rank under torchrun, the
    logger, the message), `log_level`'s level. Nothing changes where logging is set up already
    (a test, a notebook, a script calling another's function)."""
    where = f"[rank {rank}] " if world_size > 1 else ""
    logging.basicConfig(
        format=f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=log_level(verbose, rank == 0),
    )


def fraction(text: str) -> float:
    """A number in [0, 1): the share of a split held out."""
    value = _float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {value}")
    return value


def http_url(text: str) -> str:
    """An http:// or https:// address with a host (a download mirror)."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(
            f"expected an http:// or https:// address, e.g. https://example.org/vit_models, "
            f"got {text!r}"
        )
    return text


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help` with the description's lines kept as written and every flag's default shown
    (except where there is none to show: None, or off for a switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_first(parse_args: Callable[[], object]) -> None:
    """Parse the command line before the script's heavy imports: `--help`, a mistyped flag or
    another mistake of `parse_args` answers now (`run_cli`'s one line, exit 2), not after torch
    has loaded (seconds). A Ctrl+C during those imports prints `exit_interrupted`'s one line;
    `run_cli` restores the usual handler. An interpreter without torch is told first (for
    `--help` too), so that no command seems to work until the run fails."""
    run_cli(require_torch)
    run_cli(parse_args)
    signal.signal(signal.SIGINT, exit_interrupted)


def require_torch() -> None:
    """Refuse, in one message, an interpreter without PyTorch: `python3 train.py` typed outside
    the virtual environment that `make` installs into.

    Raises:
        UserError: torch cannot be imported; the message names the interpreter to use.
    """
    if importlib.util.find_spec("torch") is None:
        script = os.path.basename(sys.argv[0]) or "train.py"
        raise UserError(
            f"PyTorch is not installed for this Python ({sys.executable}). Run the scripts "
            f"with the environment that `make install` (or `make demo`) creates: "
            f".venv/bin/python {script} ..., or activate it first (source .venv/bin/activate)."
        )


def add_model_flags(
    parser: argparse.ArgumentParser,
    height_width: bool = False,
    model_type_help: str = "Default: the model the checkpoint holds (its description, official "
    "file name or shapes).",
) -> None:
    """`--model_type` and `--img_size` of a script that reads a checkpoint: both None unless
    given (the checkpoint says). With `height_width`, `--img_size` takes HEIGHT WIDTH too and
    holds an int or a (height, width) pair."""
    parser.add_argument("--model_type", choices=model_names(), default=None, help=model_type_help)
    if height_width:
        size = {
            "nargs": "+",
            "action": _HeightWidth,
            "metavar": "SIZE",
            "help": "Input size, one value or HEIGHT WIDTH (default: the checkpoint's own).",
        }
    else:
        size = {"help": "Default: the size it was trained at."}
    parser.add_argument("--img_size", type=positive_int, default=None, **size)


MAX_DEFAULT_WORKERS = 8  # each decodes a few hundred images/s: enough for a fast GPU


def default_num_workers() -> int:
    """Loader workers per process by default: the CPUs this process may run on
    (`os.sched_getaffinity`), shared among the processes of this machine (torchrun's
    `LOCAL_WORLD_SIZE`), less one for the process itself; at least 1, at most
    `MAX_DEFAULT_WORKERS`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    per_process = cpus // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return min(MAX_DEFAULT_WORKERS, max(1, per_process - 1))


def add_process_flags(parser: argparse.ArgumentParser, workers: str = "Data-loading") -> None:
    """`--num_workers` (`default_num_workers`) and `--local_rank`, of a script whose every
    process reads data (under torchrun)."""
    parser.add_argument(
        "--num_workers",
        type=non_negative_int,
        default=default_num_workers(),
        help=f"{workers} worker processes per process (default: one per CPU this process may "
        f"use, less one, at most {MAX_DEFAULT_WORKERS}; here %(default)s).",
    )
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=-1,
        help="Set by older launchers; torchrun sets LOCAL_RANK instead (both work).",
    )


def add_tf32_flag(parser: argparse.ArgumentParser) -> None:
    """`--tf32 {on,off}` of a script that runs a model on a GPU (`utils.recipe.amp.set_tf32`)."""
    parser.add_argument(
        "--tf32",
        choices=("on", "off"),
        default="on",
        help="On CUDA, compute float32 matrix products and convolutions in TF32, as JAX (and so "
        "vit_jax) and TensorFlow do by default; off: full float32, for bit-level comparisons. "
        "No effect on the CPU.",
    )


class _HeightWidth(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if len(values) > 2:
            parser.error(f"{option_string} takes one value or two (HEIGHT WIDTH)")
        setattr(namespace, self.dest, values[0] if len(values) == 1 else tuple(values))
