"""The paper's fine-tuning protocol as one command: a learning-rate grid scored on a development
split, the chosen rate retrained on the whole training split, the final step tested.

The protocol of Dosovitskiy et al. 2021 (Appendix B.1.1, Table 4), which vit_jax's presets
(`configs/common.py`) hold out data for but never run:

1. grid: one train.py run per learning rate, named `<name>-lr<rate>`, on the training split
   minus its last `--holdout_fraction` (the development split, train.py's "minival"), scored
   on that split at its final step (`--select final`: nothing is selected during training);
2. choice: the best development accuracy; a tie goes to the lower development loss, then to
   the smaller rate; a run whose loss is not finite never wins;
3. final runs: the chosen rate on 100 % of the training split (`--holdout_fraction 0 --select
   final`), once per seed (`--seeds N`: seeds `--seed`, `--seed` + 1, ...), named
   `<name>-final-lr<rate>-seed<seed>`; the result is each final step's test accuracy, and their
   mean [min, max];
4. `<output_dir>/<name>_sweep.json` (every run's flags and figures, the choice) and
   `<name>_sweep.md` (the tables, with the published figure for the same model and dataset
   beside ours where vit_jax publishes one).

    python sweep.py --name c10-b16 --dataset cifar10 --model_type ViT-B_16 \\
        --pretrained_dir checkpoint/ViT-B_16.npz --seeds 3 [any train.py flag]

Presets per dataset (`PRESETS`; printed first) set --num_steps, --warmup_steps,
--train_batch_size, --img_size, --holdout_fraction and the grid; every train.py flag given
overrides them. Run the same command again and it continues, whenever the last one was stopped:
a finished run is read back from its files (the checkpoint's `.json` sidecar), an interrupted one
continues with `--resume`, one killed before its first save starts afresh (its own log replaced),
nothing is trained twice or overwritten. Each run is recognised by the settings train.py recorded
with it (its log folder's run record, `utils.infra.run_files`): a run of this --name started with
other settings (another sweep's) is refused before anything trains, whatever `<name>_sweep.json`
says or whether it exists (it is a summary, rebuilt from the runs). Every run the sweep may start,
the final runs of every rate of the grid included, is checked (name, seed, folders) before the
first one trains. A run that diverged (train.py stops it) counts as diverged in this sweep and
is tried again by the next one. Under `torchrun` every process runs the sweep (each run is an
ordinary train.py run; the output folder must be shared by all nodes). `--print_commands` prints
the train.py commands still to run, for a job array, and `--collect` builds the summary from
their files.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from itertools import chain
from pathlib import Path

if __name__ == "__main__":  # Ctrl+C while the modules below load: exit 130, no traceback
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(128 + signum))

from utils.data.registry import DATASETS, HOLDOUT_FRACTION, Columns
from utils.infra.console import python_command
from utils.infra.errors import StoppedBySignal, UserError, run_cli
from utils.infra.flags import (
    SEED_MAX,
    HelpFormatter,
    add_verbose,
    count_at_most,
    parse_first,
    positive_float,
)

logger = logging.getLogger("sweep")

PAPER_GRID = (0.001, 0.003, 0.01, 0.03)  # Table 4, all datasets but ImageNet
MAX_SEEDS = 1000  # final runs (--seeds): each is a whole training run


@dataclass(frozen=True)
class Preset:
    """What the protocol fixes per dataset (train.py flags), and where it comes from."""

    num_steps: int
    warmup_steps: int
    train_batch_size: int
    img_size: int
    holdout_fraction: float
    learning_rates: tuple[float, ...]
    source: str


CIFAR = Preset(
    10_000, 500, 512, 384, HOLDOUT_FRACTION, PAPER_GRID, "the paper's Table 4; warmup as vit_jax's"
)
# Table 4's small datasets (Pets, Flowers) train 500 steps; 2 % held out, as for CIFAR.
YOUR_DATA = replace(
    CIFAR,
    num_steps=500,
    warmup_steps=100,
    source="the paper's Table 4 for Pets and Flowers; warmup ours",
)
PRESETS = {
    "cifar10": CIFAR,
    "cifar100": CIFAR,
    "imagefolder": YOUR_DATA,
    "hf": YOUR_DATA,
    # Not the paper's: the schedule of `make demo` (from scratch at 32x32). 10 % held out as
    # for the paper's small datasets: 2 % of 1,437 images would be 29, too few to rank rates.
    "digits": Preset(
        800, 50, 128, 32, 0.1, (0.01, 0.03, 0.1, 0.3), "this repository's demo schedule"
    ),
}


@dataclass(frozen=True)
class Published:
    test_accuracies: tuple[float, ...]
    source: str


# Test accuracies published for (model, dataset, steps, resolution): vit_jax's README,
# "Expected results", fine-tuning the ImageNet-21k checkpoints with its default recipe (one
# fixed rate, no grid; 384 px with 500 warmup steps, 224 px with 50 or 100).
VIT_JAX = "vit_jax README, ImageNet-21k checkpoint, default recipe (no grid)"
PUBLISHED = {
    ("ViT-B_16", "cifar10", 10_000, 384): Published((0.9902, 0.9890), f"{VIT_JAX}, two runs"),
    ("ViT-B_16", "cifar100", 10_000, 384): Published((0.9217, 0.9219), f"{VIT_JAX}, two runs"),
    ("ViT-B_16", "cifar10", 500, 224): Published((0.9859,), VIT_JAX),
    ("ViT-B_16", "cifar10", 1000, 224): Published((0.9886,), VIT_JAX),
    ("ViT-B_16", "cifar100", 500, 224): Published((0.8917,), VIT_JAX),
    ("ViT-B_16", "cifar100", 1000, 224): Published((0.9115,), VIT_JAX),
}

PRESET_FLAGS = ("num_steps", "warmup_steps", "train_batch_size", "img_size", "holdout_fraction")
# train.py flags the sweep sets itself, and why a user's value is refused.
SET_BY_SWEEP = {
    "learning_rate": "the sweep varies it: give the grid with --learning_rates",
    "select": "every run of the sweep keeps its final step (--select final), as the paper does",
    "resume": "the sweep continues its runs by itself: run the same command again",
    "overwrite": "the sweep never deletes a run that saved anything (it starts afresh only one "
    "killed before its first save): choose another --name, or delete the runs' files yourself",
}
# The effective train.py values a sweep is defined by: a rerun under the same --name must keep
# them (more --seeds may be added).
PROTOCOL_FLAGS = (
    "dataset",
    "model_type",
    "pretrained_dir",
    "img_size",
    "num_steps",
    "warmup_steps",
    "decay_type",
    "train_batch_size",
    "weight_decay",
    "max_grad_norm",
    "optim_dtype",
    "holdout_fraction",
    "seed",
)
# What makes one run of the sweep what it is: a run whose record gives another value for one of
# these was started by another sweep (or command) under this --name.
RUN_FLAGS = (*PROTOCOL_FLAGS, "learning_rate", "select")


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The sweep's own flags, and the rest (train.py's flags), checked without torch."""
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=HelpFormatter,
        allow_abbrev=False,  # --seed is train.py's, not an abbreviation of --seeds
        epilog="Every other flag goes to each train.py run (train.py --help lists them).",
    )
    p.add_argument("--name", required=True, help="Name of the sweep (its runs' name prefix).")
    p.add_argument(
        "--learning_rates",
        type=positive_float,
        nargs="+",
        default=None,
        help="The grid (default: the dataset's preset; the paper's 0.001 0.003 0.01 0.03).",
    )
    p.add_argument(
        "--seeds",
        type=count_at_most(MAX_SEEDS),
        default=1,
        help=f"Final runs with the chosen rate, with seeds --seed, --seed + 1, ... (at most "
        f"{MAX_SEEDS}).",
    )
    p.add_argument(
        "--print_commands",
        action="store_true",
        help="Print the train.py commands still to run (the grid, then, once it is done, the "
        "final runs), one a line, and train nothing.",
    )
    p.add_argument(
        "--collect",
        action="store_true",
        help="Train nothing: build the summary from the finished runs' files.",
    )
    for flag in SET_BY_SWEEP:
        p.add_argument(f"--{flag}", nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    add_verbose(p)
    args, train_argv = p.parse_known_args(argv)
    if args.verbose:
        train_argv.append("--verbose")  # train.py's too
    for flag, why in SET_BY_SWEEP.items():
        if getattr(args, flag) is not None:
            raise UserError(f"--{flag} is not a sweep flag: {why}.")
    if args.print_commands and args.collect:
        raise UserError(
            "--print_commands prints the runs still to do and --collect summarises the finished "
            "ones: pass one of them."
        )
    if args.learning_rates is not None:
        repeated = sorted({r for r in args.learning_rates if args.learning_rates.count(r) > 1})
        if repeated:
            raise UserError(
                f"--learning_rates lists {', '.join(map(str, repeated))} more than once; give "
                "each rate once."
            )
    return args, train_argv


if __name__ == "__main__":
    parse_first(parse_args)  # --help and a mistyped flag answer before torch loads

import torch

import train
from utils.data.loaders import build_test_set
from utils.infra.atomic import atomic_write_text
from utils.infra.dist_utils import run_distributed
from utils.infra.file_io import read_sidecar, sidecar_path
from utils.infra.run_files import (
    LONGEST_SUFFIX,
    NAME_MAX,
    RUN_RECORD,
    check_folder,
    check_name,
    check_run,
    event_files,
    read_record,
)
from utils.infra.stopping import NonFiniteLossError
from utils.infra.train_state import last_state_path

# --------------------------------------------------------------------------------------------
# Runs


@dataclass
class Trial:
    """One train.py run of the sweep, and what its files say about it.

    Attributes:
        kind: "grid" (scored on the development split) or "final" (trained on 100 %).
        status: "pending" (no files), "started" (killed before its first save: its record and
            its own log only, which a new start replaces), "partial" (a last state to resume),
            "finished", or "diverged" (stopped by a non-finite loss in this sweep, or its final
            loss is not finite).
        dev_accuracy, dev_loss: on the development split at the final step (grid runs).
        test_accuracy, test_loss: on the test set at the final step.
    """

    kind: str
    run: str
    learning_rate: float
    seed: int
    holdout_fraction: float
    argv: list[str]
    status: str = "pending"
    step: int | None = None
    dev_accuracy: float | None = None
    dev_loss: float | None = None
    test_accuracy: float | None = None
    test_loss: float | None = None

    @property
    def done(self) -> bool:
        return self.status in ("finished", "diverged")


def rate_text(rate: float) -> str:
    return f"{rate:g}"


def plan(
    name: str,
    base_argv: list[str],
    log_root: str,
    grid: Sequence[float],
    seed: int,
    holdout: float,
) -> list[Trial]:
    """The grid runs, in ascending order of rate."""
    trials = []
    for rate in sorted(grid):
        run = f"{name}-lr{rate_text(rate)}"
        argv = trial_argv(base_argv, run, log_root, rate)
        trials.append(Trial("grid", run, rate, seed, holdout, argv))
    names = [t.run for t in trials]
    if len(set(names)) < len(names):
        raise UserError(
            f"--learning_rates {' '.join(map(str, grid))} give runs of the same name "
            f"({', '.join(names)}): use rates that differ in their first 6 digits."
        )
    return trials


def final_trials(
    name: str, base_argv: list[str], log_root: str, rate: float, seeds: Sequence[int]
) -> list[Trial]:
    trials = []
    for seed in seeds:
        run = f"{name}-final-lr{rate_text(rate)}-seed{seed}"
        extra = ["--holdout_fraction", "0", "--seed", str(seed)]
        argv = trial_argv(
            without_flags(base_argv, ("holdout_fraction", "seed")), run, log_root, rate, extra
        )
        trials.append(Trial("final", run, rate, seed, 0.0, argv))
    return trials


def trial_argv(
    base_argv: list[str], run: str, log_root: str, rate: float, extra: Sequence[str] = ()
) -> list[str]:
    """train.py's flags for one run: the sweep's come last, so they win."""
    log_dir = os.path.join(log_root, run)
    return [
        *base_argv,
        *("--name", run, "--log_dir", log_dir, "--learning_rate", repr(rate)),
        *("--select", "final", *extra),
    ]


def read_trial(trial: Trial, output_dir: str, log_root: str, num_steps: int) -> None:
    """Set the trial's status and figures from its files, once they are shown to be this run's
    (`check_settings`): finished when its checkpoint is the final step's (`selected_by: final`
    at step `num_steps`), partial when a last state exists, started when only its own log does
    (killed before its first save), else pending.

    Raises:
        UserError: the run's files were started with other settings (another sweep's run), or
            say nothing of them; or the run cannot start (`run_files.check_run`: its name or
            folders, another run's log in its log folder).
    """
    log_dir = os.path.join(log_root, trial.run)
    checkpoint = Path(output_dir) / f"{trial.run}_checkpoint.bin"
    last = last_state_path(output_dir, trial.run)
    saved = [p for p in (checkpoint, sidecar_path(checkpoint), last) if p.is_file()]
    logged = event_files(log_dir, trial.run)[0]  # only what its record shows to be its own
    facts = read_sidecar(checkpoint) if checkpoint.is_file() else {}
    if facts.get("selected_by") == "final" and facts.get("step") == num_steps:
        trial.status = "finished"
    elif last.is_file():
        trial.status = "partial"
    else:
        trial.status = "started" if logged else "pending"
    if trial.status != "finished":  # the sweep may start it
        check_run(output_dir, log_dir, trial.run, resume=trial.status == "partial")
    if saved or logged:
        check_settings(trial, saved + logged, log_dir, last)
    if trial.status == "finished":
        trial.step = num_steps
        trial.test_accuracy, trial.test_loss = facts.get("accuracy"), facts.get("test_loss")
        if trial.kind == "grid":
            trial.dev_accuracy = facts.get("minival_accuracy")
            trial.dev_loss = facts.get("minival_loss")
        losses = [trial.test_loss] + ([trial.dev_loss] if trial.kind == "grid" else [])
        finite = all(x is not None and math.isfinite(x) for x in losses)
        trial.status = "finished" if finite else "diverged"


def check_settings(trial: Trial, files: list[Path], log_dir: str, last: Path) -> None:
    """The run's files must be this sweep's run: the settings recorded with the run (its log
    folder's record; for a run from before records, the flags its last state saved) must be the
    ones the sweep starts it with, in every `RUN_FLAGS` flag they name.

    Raises:
        UserError: another value in one of them, or no record of them.
    """
    record = read_record(log_dir)
    if record is not None and record["name"] == trial.run:
        settings, where = record["settings"], os.path.join(log_dir, RUN_RECORD)
    else:
        settings, where = saved_flags(last), str(last)
    if settings is None:
        raise UserError(
            f"{trial.run} has files ({', '.join(map(str, files))}) but no record of the settings "
            f"it was started with ({os.path.join(log_dir, RUN_RECORD)} is missing or damaged, "
            "and no last state holds them), so the sweep cannot tell whether it is this sweep's "
            "run. Delete its files to train it again, or choose another --name."
        )
    wanted = vars(train.parse_args(trial.argv))
    changed = changed_flags(wanted, settings, RUN_FLAGS, "it has")
    if changed:
        raise UserError(
            f"{trial.run} was started with other settings than this sweep gives it: "
            f"{'; '.join(changed)} (recorded in {where}). It belongs to another sweep of this "
            "--name, and would mix with this one's runs: choose another --name, or that sweep's "
            "settings."
        )


def changed_flags(wanted: dict, recorded: dict, flags: Iterable[str], had: str) -> list[str]:
    """`--flag value (<had> recorded value)` for each of `flags` that `recorded` names with
    another value than `wanted`."""
    return [
        f"--{flag} {wanted[flag]} ({had} {recorded[flag]})"
        for flag in flags
        if flag in recorded and recorded[flag] != wanted[flag]
    ]


def saved_flags(path: Path) -> dict | None:
    """The flags a last state saved (None when there is none, or it cannot be read): its pickle
    alone is read, its tensors stay on disk."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # damaged, or not a state: the message says the settings are unknown
        return None
    flags = saved.get("args") if isinstance(saved, dict) else None
    return flags if isinstance(flags, dict) and flags else None


def continue_flags(trial: Trial) -> list[str]:
    """What train.py needs besides the run's flags to go on from its files: `--resume` from its
    last state, or `--overwrite` to start afresh one killed before its first save (it replaces
    only what the run's record shows to be its own: its log)."""
    return {"partial": ["--resume"], "started": ["--overwrite"]}.get(trial.status, [])


def run_trial(trial: Trial, output_dir: str, log_root: str, num_steps: int) -> None:
    """Train (or continue) one run in this process, then read it back from its files."""
    argv = trial.argv + continue_flags(trial)
    logger.info(  # a line, whatever the paths: the whole command with -v or --print_commands
        "%s %s (%s run, learning rate %g, seed %d)",
        {"partial": "Continuing", "started": "Restarting"}.get(trial.status, "Training"),
        trial.run,
        trial.kind,
        trial.learning_rate,
        trial.seed,
    )
    logger.debug("%s", python_command("train.py", *argv))
    try:
        summary = train.main(argv)
    except NonFiniteLossError as err:
        logger.warning("%s diverged, so it is never chosen: %s", trial.run, err)
        trial.status = "diverged"
        return
    if summary.stopped:
        raise StoppedBySignal(
            summary.signal,
            f"The sweep stopped during {trial.run} (saved); run the same command again to "
            "continue.",
        )
    read_trial(trial, output_dir, log_root, num_steps)
    if not trial.done:
        raise UserError(
            f"{trial.run} ended without a final checkpoint in {output_dir}; run the same "
            "command again to continue it."
        )


# --------------------------------------------------------------------------------------------
# The choice and the summary


def choose(grid: Sequence[Trial]) -> tuple[Trial, str]:
    """The grid run with the best development accuracy, by train.py's selection rule
    (`is_better`: a tie goes to the lower loss, a non-finite loss never wins), over the rates
    in ascending order, so that a full tie keeps the smaller rate. Also says why.

    Raises:
        UserError: no run finished with a finite development loss.
    """
    best = None
    for trial in sorted(grid, key=lambda t: t.learning_rate):
        if trial.status != "finished" or trial.dev_accuracy is None or trial.dev_loss is None:
            continue
        result = {"accuracy": trial.dev_accuracy, "loss": trial.dev_loss}
        if not train.is_better(result, -1.0, math.inf):
            continue  # a non-finite loss
        if best is None or train.is_better(result, best.dev_accuracy, best.dev_loss):
            best = trial
    if best is None:
        raise UserError(
            f"No rate of the grid ({', '.join(rate_text(t.learning_rate) for t in grid)}) "
            "finished with a finite development loss: every run diverged. Try smaller "
            "--learning_rates."
        )
    why = f"the best development accuracy, {best.dev_accuracy:.4f}"
    tied = [
        t
        for t in grid
        if t is not best
        and t.status == "finished"
        and t.dev_accuracy == best.dev_accuracy
        and math.isfinite(t.dev_loss)
    ]
    if tied:
        rates = ", ".join(rate_text(t.learning_rate) for t in tied)
        same_loss = [t for t in tied if t.dev_loss == best.dev_loss]
        why += (
            f", tied with {rates}; the same loss as "
            f"{', '.join(rate_text(t.learning_rate) for t in same_loss)}: the smaller rate"
            if same_loss
            else f", tied with {rates}; the lowest development loss, {best.dev_loss:.4f}"
        )
    return best, why


def accuracy_spread(accuracies: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(accuracies),
        "min": min(accuracies),
        "max": max(accuracies),
        "runs": len(accuracies),
    }


def plain(value: float | None) -> float | None:
    """JSON has no NaN or infinity: a non-finite figure is written as null."""
    return value if value is None or math.isfinite(value) else None


def summarise(
    name: str,
    protocol: dict,
    grid: Sequence[Trial],
    finals: Sequence[Trial],
    chosen: Trial,
    why: str,
) -> dict:
    """Everything `<name>_sweep.json` holds."""

    def record(trial: Trial) -> dict:
        figures = ("dev_accuracy", "dev_loss", "test_accuracy", "test_loss")
        out = asdict(trial)
        out.update({key: plain(out[key]) for key in figures})
        return out

    finished = [t.test_accuracy for t in finals if t.status == "finished"]
    key = (protocol["model_type"], protocol["dataset"], protocol["num_steps"])
    published = PUBLISHED.get((*key, protocol["img_size"]))
    return {
        "name": name,
        "protocol": protocol,
        "grid": [record(t) for t in grid],
        "chosen": {"learning_rate": chosen.learning_rate, "run": chosen.run, "why": why},
        "final": [record(t) for t in finals],
        "test_accuracy": accuracy_spread(finished) if finished else None,
        "published": asdict(published) if published else None,
    }


def figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def markdown(summary: dict) -> str:
    """The sweep's tables: the grid with the choice, the final runs, ours beside the published."""
    p = summary["protocol"]
    chosen = summary["chosen"]
    lines = [
        f"## Sweep {summary['name']}: {p['model_type']} on {p['dataset']}",
        "",
        f"{p['num_steps']} steps ({p['warmup_steps']} warmup, {p['decay_type']}), batch "
        f"{p['train_batch_size']}, {p['img_size']}x{p['img_size']}, from {p['pretrained_dir']}. "
        f"Grid on the training split minus its last {p['holdout_fraction'] * 100:g} % (the "
        "development split), scored at the final step; the chosen rate retrained on 100 % of "
        "the training split; the final step's test accuracy.",
        "",
        "| learning rate | run | seed | dev accuracy | dev loss | |",
        "|---|---|---|---|---|---|",
    ]
    for t in summary["grid"]:
        mark = "chosen" if t["run"] == chosen["run"] else ""
        if t["status"] != "finished":
            mark = t["status"]
        lines.append(
            f"| {rate_text(t['learning_rate'])} | {t['run']} | {t['seed']} | "
            f"{figure(t['dev_accuracy'])} | {figure(t['dev_loss'])} | {mark} |"
        )
    lines += [
        "",
        f"Chosen: {rate_text(chosen['learning_rate'])} ({chosen['why']}).",
        "",
        "| final run | seed | learning rate | test accuracy |",
        "|---|---|---|---|",
    ]
    for t in summary["final"]:
        accuracy = figure(t["test_accuracy"]) if t["status"] == "finished" else t["status"]
        lines.append(f"| {t['run']} | {t['seed']} | {rate_text(t['learning_rate'])} | {accuracy} |")
    spread = summary["test_accuracy"]
    lines.append("")
    if spread:
        lines.append(
            f"Test accuracy: {spread['mean']:.4f} mean [{spread['min']:.4f}, {spread['max']:.4f}]"
            f" over {spread['runs']} seed(s)."
        )
    published = summary["published"]
    if published:
        values = ", ".join(f"{v:.4f}" for v in published["test_accuracies"])
        lines.append(
            f"Published for the same model, dataset, steps and size: {values} "
            f"({published['source']})."
        )
    else:
        lines.append("No published figure for this model, dataset, step count and size.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Entry point


def resolve(
    args: argparse.Namespace, train_argv: list[str]
) -> tuple[argparse.Namespace, list[str], Preset, list[float]]:
    """train.py's effective flags for the sweep (preset, then the user's), the flags as a
    list, the preset and the grid."""
    dataset = train.parse_args([*train_argv, "--name", args.name]).dataset
    preset = PRESETS[dataset]
    preset_argv = [f"--{flag}={getattr(preset, flag)}" for flag in PRESET_FLAGS]
    common = train.parse_args([*preset_argv, *train_argv, "--name", args.name])  # later wins
    # The user's flags, then the effective value of every preset flag (each flag once).
    base_argv = without_flags(train_argv, PRESET_FLAGS)
    for flag in PRESET_FLAGS:
        base_argv += [f"--{flag}", str(getattr(common, flag))]
    grid = sorted(args.learning_rates or preset.learning_rates)
    if common.holdout_fraction == 0:
        raise UserError(
            "--holdout_fraction 0 leaves no development split to score the grid on; the final "
            "runs train on 100 % by themselves. Leave it out (the preset holds out "
            f"{preset.holdout_fraction:g}) or give a fraction above 0."
        )
    return common, base_argv, preset, grid


def without_flags(argv: Sequence[str], flags: Sequence[str]) -> list[str]:
    """`argv` less every `--flag value` and `--flag=value` of `flags`."""
    kept, skip = [], False
    for token in argv:
        name = token.split("=", 1)[0]
        if skip:
            skip = False
        elif name.startswith("--") and name[2:] in flags:
            skip = "=" not in token
        else:
            kept.append(token)
    return kept


def check_test_split(common: argparse.Namespace) -> None:
    """The protocol ends with a test accuracy: the user's own data needs a test split (an
    image folder a val/ or test/ folder)."""
    if DATASETS[common.dataset].published:
        return  # CIFAR and digits have their test splits
    try:
        build_test_set(
            common.dataset,
            common.data_dir,
            common.img_size,
            download=False,
            columns=Columns(common.image_column, common.label_column),
        )
    except UserError as err:
        raise UserError(
            f"The sweep reports test accuracy, so it needs a test split. {err}"
        ) from None


def log_protocol(
    common: argparse.Namespace, preset: Preset, grid: Sequence[float], seeds: Sequence[int]
) -> None:
    lines = []
    for flag in PRESET_FLAGS:
        value, preset_value = getattr(common, flag), getattr(preset, flag)
        lines.append(f"--{flag} {value:g}" + (" (preset)" if value == preset_value else " (yours)"))
    given = tuple(grid) != tuple(sorted(preset.learning_rates))
    logger.info(
        "Protocol for %s (preset: %s): %s; grid %s (%s); final seeds %s.",
        common.dataset,
        preset.source,
        ", ".join(lines),
        " ".join(map(rate_text, grid)),
        "yours" if given else "preset",
        " ".join(map(str, seeds)),
    )


def check_same_protocol(path: Path, protocol: dict) -> bool:
    """A rerun under the same --name must be the same sweep (its runs would mix otherwise): the
    first word on it, before the runs' own records (`check_settings`), which decide where the
    summary is missing or damaged. Returns whether `path` holds a protocol."""
    if not path.exists():
        return False
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))["protocol"]
        if not isinstance(earlier, dict):
            raise TypeError(f"its protocol is {type(earlier).__name__}, not an object")
    except (OSError, ValueError, LookupError, TypeError) as err:  # not JSON, not an object, ...
        logger.warning(
            "%s is damaged (%s): this sweep's runs are checked by their own records, and the "
            "summary is written again from them.",
            path,
            err,
        )
        return False
    changed = changed_flags(protocol, earlier, protocol, "was")
    if changed:
        raise UserError(
            f"{path} describes a sweep of this --name with other settings: {'; '.join(changed)}. "
            "Its runs would mix with these: choose another --name, or the same settings."
        )
    return True


def final_seeds(seed: int, count: int) -> list[int]:
    """The final runs' seeds, `seed` .. `seed + count - 1`, each one train.py takes."""
    if seed + count - 1 > SEED_MAX:
        raise UserError(
            f"--seed {seed} with --seeds {count} gives the final runs seeds up to "
            f"{seed + count - 1}, above the largest seed, 2**32 - 1 = {SEED_MAX}: pass --seed "
            f"{SEED_MAX - count + 1} or less, or fewer --seeds."
        )
    return list(range(seed, seed + count))


def check_names_and_folders(
    name: str, output_dir: str, log_root: str, runs: Sequence[str], summaries: Sequence[Path]
) -> None:
    """What every run the sweep may start needs of --name and the folders, checked before the
    first one starts: --name a plain name short enough for the longest run name (a final run's,
    with the largest seed), the output and log folders creatable, no folder where the summary
    files go."""
    check_name(name)
    longest = max(runs, key=lambda run: len(os.fsencode(run)))
    added = len(os.fsencode(longest)) - len(os.fsencode(name))
    room = NAME_MAX - len(LONGEST_SUFFIX)  # what file names leave of a run's name
    if len(os.fsencode(longest)) > room:
        raise UserError(
            f"--name is {len(os.fsencode(name))} bytes long, too long for the sweep's runs: the "
            f"longest, {longest}, adds {added} bytes to it, and file names hold at most {room} "
            f"bytes of a run's name. Choose a --name of at most {room - added} bytes."
        )
    check_folder(Path(output_dir), "--output_dir", create=False)
    check_folder(Path(log_root), "--log_dir", create=False)
    for path in summaries:
        if path.is_dir():
            raise UserError(
                f"{path} is a folder, not a file: the sweep writes its summary there. Move the "
                "folder away, or choose another --name."
            )


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Run (or print, or collect) the sweep; returns the summary (None for --print_commands)."""
    args, train_argv = parse_args(argv)
    # Under torchrun one process group serves every run (train.py joins it).
    _, summary = run_distributed(lambda info: _sweep(args, train_argv, info.is_main), args.verbose)
    return summary


def _sweep(args: argparse.Namespace, train_argv: list[str], is_main: bool) -> dict | None:
    common, base_argv, preset, grid = resolve(args, train_argv)
    check_test_split(common)
    seeds = final_seeds(common.seed, args.seeds)
    protocol = {k: getattr(common, k) for k in PROTOCOL_FLAGS}
    protocol["learning_rates"] = grid
    output_dir, steps, log_root = common.output_dir, common.num_steps, common.log_dir
    out = Path(output_dir)
    json_path, md_path = out / f"{args.name}_sweep.json", out / f"{args.name}_sweep.md"
    grid_trials = plan(args.name, base_argv, log_root, grid, common.seed, common.holdout_fraction)
    # Every run the sweep may start: the grid, and the final runs of whichever rate it chooses.
    finals_of = {r: final_trials(args.name, base_argv, log_root, r, seeds) for r in grid}
    every_run = [*grid_trials, *chain.from_iterable(finals_of.values())]
    runs = [t.run for t in every_run]
    check_names_and_folders(args.name, output_dir, log_root, runs, [json_path, md_path])
    summarised = check_same_protocol(json_path, protocol)
    for trial in every_run:  # each recognised by its own record; another sweep's is refused
        read_trial(trial, output_dir, log_root, steps)
    if is_main:
        log_protocol(common, preset, grid, seeds)
        if not args.collect and not summarised:  # what a rerun must keep, from now on
            out.mkdir(parents=True, exist_ok=True)
            plan_text = json.dumps({"name": args.name, "protocol": protocol, "status": "planned"})
            atomic_write_text(json_path, plan_text + "\n")

    train_here = not (args.collect or args.print_commands)
    todo = [t for t in grid_trials if not t.done]
    if args.print_commands and todo:
        return print_commands(todo, "grid")
    if train_here:
        for trial in todo:
            run_trial(trial, output_dir, log_root, steps)
    require_done(grid_trials, args.collect)
    chosen, why = choose(grid_trials)
    if is_main or args.print_commands:
        logger.info("Chose learning rate %s: %s.", rate_text(chosen.learning_rate), why)
    finals = finals_of[chosen.learning_rate]
    for trial in finals:
        read_trial(trial, output_dir, log_root, steps)  # again: a job array may have run it
        if not trial.done and train_here:
            run_trial(trial, output_dir, log_root, steps)
    if args.print_commands:
        return print_commands([t for t in finals if not t.done], "final")
    require_done(finals, args.collect)

    summary = summarise(args.name, protocol, grid_trials, finals, chosen, why)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json_path, json.dumps(summary, indent=2) + "\n")
        table = markdown(summary)
        atomic_write_text(md_path, table)
        print(f"{table}\nSummary: {json_path}, {md_path}")
    return summary


def require_done(trials: Sequence[Trial], collect: bool) -> None:
    missing = [t.run for t in trials if not t.done]
    if missing:
        raise UserError(
            f"Not finished: {', '.join(missing)}. Run them first (sweep.py with the same flags "
            "and --print_commands prints their commands), then --collect."
            if collect
            else f"Not finished: {', '.join(missing)}; run the same command again."
        )


def print_commands(todo: list[Trial], phase: str) -> None:
    """One train.py command per run still to do in this `phase` ("grid", or "final" once the
    grid is done). An interrupted run's command continues it (`continue_flags`)."""
    for trial in todo:
        print(python_command("train.py", *trial.argv, *continue_flags(trial)))
    if not todo:
        logger.info("Every run is finished: --collect builds the summary.")
    elif phase == "grid":
        logger.info(
            "%d grid run(s) to do; when they are finished, --print_commands prints the final runs.",
            len(todo),
        )
    sys.stdout.flush()


if __name__ == "__main__":
    run_cli(main)
