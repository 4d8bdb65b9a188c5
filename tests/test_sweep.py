"""sweep.py: the paper's protocol (grid on a development split, retrain on 100 %, test).

The choice is checked against constructed results and, end to end, against the development
figures TensorBoard's own reader finds in each grid run's log; the retrain's training-set size
against the log; continuing against an uninterrupted sweep; `--print_commands` + `--collect`
against one sweep.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sweep
import train
from tests.helpers import expect_user_error, free_port, make_image_folder, scalars, tiny_args
from utils.data.registry import DATASETS
from utils.infra.errors import StoppedBySignal

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def trial(rate: float, accuracy: float | None, loss: float | None, status: str = "finished"):
    return sweep.Trial(
        "grid", f"s-lr{rate:g}", rate, 0, 0.1, [], status, 4, accuracy, loss, None, None
    )


# --------------------------------------------------------------------------------------------
# The choice, on constructed results


@pytest.mark.parametrize(
    ("results", "want", "why"),
    [
        # the best development accuracy wins, whatever its loss
        ([(0.01, 0.90, 0.1), (0.03, 0.95, 0.9), (0.1, 0.93, 0.2)], 0.03, "accuracy, 0.9500"),
        # a tie of accuracy goes to the lower loss, even at a larger rate
        ([(0.01, 0.95, 0.3), (0.03, 0.95, 0.2), (0.1, 0.90, 0.1)], 0.03, "lowest development loss"),
        # a full tie goes to the smaller rate, in whatever order the grid was given
        ([(0.1, 0.95, 0.2), (0.03, 0.95, 0.2), (0.01, 0.80, 0.2)], 0.03, "the smaller rate"),
        # a non-finite development loss never wins, however accurate
        ([(0.01, 0.90, 0.5), (0.03, 1.00, math.nan), (0.1, 1.00, math.inf)], 0.01, "0.9000"),
    ],
)
def test_choose(results: list, want: float, why: str) -> None:
    chosen, reason = sweep.choose([trial(*r) for r in results])
    assert chosen.learning_rate == want
    assert why in reason
    assert why in reason


def test_choose_skips_diverged_and_unfinished_runs_and_refuses_when_none_is_left() -> None:
    grid = [
        trial(0.01, None, None, "diverged"),
        trial(0.03, 0.5, 0.7),
        trial(0.1, 0.9, 0.1, "partial"),
    ]
    assert sweep.choose(grid)[0].learning_rate == 0.03
    with pytest.raises(sweep.UserError, match="every run diverged"):
        sweep.choose([trial(0.01, None, None, "diverged"), trial(0.03, 0.9, math.nan)])


def test_summary_aggregates_the_final_runs_and_puts_the_published_figure_beside() -> None:
    protocol = {
        **dict.fromkeys(sweep.PROTOCOL_FLAGS, 0),
        "model_type": "ViT-B_16",
        "dataset": "cifar10",
        "num_steps": 10_000,
        "img_size": 384,
        "holdout_fraction": 0.02,
        "decay_type": "cosine",
        "pretrained_dir": "checkpoint/ViT-B_16.npz",
    }
    grid = [trial(0.003, 0.98, 0.05), trial(0.01, 0.99, 0.04)]
    finals = [
        sweep.Trial(
            "final", f"s-final-seed{s}", 0.01, s, 0.0, [], "finished", 4, None, None, a, 0.1
        )
        for s, a in ((0, 0.9890), (1, 0.9910), (2, 0.9900))
    ]
    chosen, why = sweep.choose(grid)
    summary = sweep.summarise("s", protocol, grid, finals, chosen, why)
    spread = summary["test_accuracy"]
    assert spread["mean"] == pytest.approx(0.99)
    assert (spread["min"], spread["max"], spread["runs"]) == (0.9890, 0.9910, 3)
    assert tuple(summary["published"]["test_accuracies"]) == (0.9902, 0.9890)
    table = sweep.markdown(summary)
    assert "Test accuracy: 0.9900 mean [0.9890, 0.9910] over 3 seed(s)." in table
    assert "0.9902, 0.9890 (vit_jax README" in table
    assert "| 0.01 | s-lr0.01 | 0 | 0.9900 | 0.0400 | chosen |" in table
    # Another step count: no published figure to compare with.
    summary = sweep.summarise("s", {**protocol, "num_steps": 20}, grid, finals, chosen, why)
    assert summary["published"] is None
    # JSON has no NaN: a diverged run's figures are null.
    summary = sweep.summarise(
        "s", protocol, [*grid, trial(0.03, 0.5, math.nan)], finals, chosen, why
    )
    assert json.loads(json.dumps(summary, allow_nan=False))["grid"][2]["dev_loss"] is None


def test_presets_cover_every_dataset() -> None:
    assert set(sweep.PRESETS) == set(DATASETS)
    for dataset in ("cifar10", "cifar100"):
        preset = sweep.PRESETS[dataset]
        assert (preset.num_steps, preset.train_batch_size, preset.img_size) == (10_000, 512, 384)
        assert (preset.holdout_fraction, preset.learning_rates) == (0.02, sweep.PAPER_GRID)
    assert sweep.PRESETS["imagefolder"].holdout_fraction == 0.02


# --------------------------------------------------------------------------------------------
# Bad input: one message, exit 2, before any training


def sweep_args(tmp_path: Path, name: str = "s", **flags) -> list[str]:
    """A sweep of tiny runs on digits: tiny_args's train.py flags, without the run's name and
    log folder (the sweep names them), with sweep flags added."""
    sweep_flags = {k: flags.pop(k) for k in ("learning_rates", "seeds") if k in flags}
    base = {"num_steps": 4, "eval_every": 0, "eval_batch_size": 360, **flags}
    argv = tiny_args(tmp_path, name=name, log_dir=tmp_path / "logs", **base)
    for key, value in sweep_flags.items():
        argv += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    return argv


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"learning_rates": []}, "--learning_rates: expected at least one argument"),
        ({"learning_rates": [0.01, 0]}, "--learning_rates: must be above 0, got 0"),
        ({"learning_rates": [0.01, -0.1]}, "must be above 0"),
        ({"learning_rates": [0.01, 0.01]}, "lists 0.01 more than once"),
        ({"learning_rate": 0.1}, "--learning_rate is not a sweep flag"),
        ({"select": "minival"}, "--select is not a sweep flag"),
        ({"resume": True}, "--resume is not a sweep flag"),
        ({"overwrite": True}, "--overwrite is not a sweep flag"),
        ({"print_commands": True, "collect": True}, "pass one of them"),
        ({"holdout_fraction": 0}, "no development split"),
        ({"seeds": 0}, "--seeds: must be at least 1"),
    ],
)
def test_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture, flags: dict, message: str
) -> None:
    err = expect_user_error(sweep.main, sweep_args(tmp_path, **flags), capsys)
    assert message in err
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_a_dataset_without_a_test_split_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    make_image_folder(tmp_path / "pics")
    shutil.rmtree(tmp_path / "pics" / "val")  # train/ only
    argv = sweep_args(tmp_path, dataset="imagefolder", data_dir=tmp_path / "pics")
    err = expect_user_error(sweep.main, argv, capsys)
    assert "needs a test split" in err
    assert "val/ (or test/)" in err
    assert not (tmp_path / "out").exists()


def test_a_rerun_with_other_settings_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "out").mkdir()
    protocol = {"num_steps": 8, "learning_rates": [0.03, 0.3]}
    (tmp_path / "out" / "s_sweep.json").write_text(json.dumps({"protocol": protocol}))
    err = expect_user_error(sweep.main, sweep_args(tmp_path, learning_rates=[0.03, 0.3]), capsys)
    assert "--num_steps 4 (was 8)" in err


def test_collect_before_the_runs_names_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = [*sweep_args(tmp_path, learning_rates=[0.03, 0.3]), "--collect"]
    err = expect_user_error(sweep.main, argv, capsys)
    assert "Not finished: s-lr0.03, s-lr0.3" in err
    assert "--print_commands" in err


# --------------------------------------------------------------------------------------------
# End to end on digits: 2 rates, 2 seeds


GRID = {"learning_rates": [0.03, 0.3], "seeds": 2}


def dev_figures(log_dir: Path, steps: int = 4) -> tuple[float, float]:
    logged = scalars(log_dir)
    return dict(logged["minival/accuracy"])[steps], dict(logged["minival/loss"])[steps]


@pytest.mark.slow
def test_digits_sweep_end_to_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        summary = sweep.main(sweep_args(tmp_path, **GRID))
    # The choice is the one the development figures in the grid runs' own logs say.
    logged = {r: dev_figures(tmp_path / "logs" / f"s-lr{r:g}") for r in (0.03, 0.3)}
    want = max(logged, key=lambda r: (logged[r][0], -logged[r][1], -r))
    assert summary["chosen"]["learning_rate"] == want
    for run in summary["grid"]:
        accuracy, loss = logged[run["learning_rate"]]
        assert run["dev_accuracy"] == pytest.approx(accuracy, abs=1e-6)
        assert run["dev_loss"] == pytest.approx(loss, abs=1e-5)
    # The grid runs train on 90 % of the 1,437 training images, the final runs on all of them,
    # once per seed, and report their final step's test accuracy.
    trained = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Training ")]
    assert sum("(1293 train / 144 minival / 360 test images" in m for m in trained) == 2
    assert sum("(1437 train / 0 minival / 360 test images" in m for m in trained) == 2
    finals = summary["final"]
    assert [f["seed"] for f in finals] == [42, 43]
    for run in finals:
        assert run["run"] == f"s-final-lr{want:g}-seed{run['seed']}"
        test = dict(scalars(tmp_path / "logs" / run["run"])["test/accuracy"])
        assert list(test) == [4]
        assert run["test_accuracy"] == pytest.approx(test[4], abs=1e-6)
    accuracies = [f["test_accuracy"] for f in finals]
    assert summary["test_accuracy"]["mean"] == pytest.approx(sum(accuracies) / 2)
    # The files say the same, and the table is printed.
    saved = json.loads((tmp_path / "out" / "s_sweep.json").read_text())
    assert saved["chosen"] == summary["chosen"]
    table = (tmp_path / "out" / "s_sweep.md").read_text()
    assert table in capsys.readouterr().out
    assert f"Chosen: {want:g} (" in table

    # Run again: everything is read back, nothing trained.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.pt")}
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = sweep.main(sweep_args(tmp_path, **GRID))
    assert again == summary
    assert not any(r.getMessage().startswith("Training ") for r in caplog.records)
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.pt")}

    # One more seed: only that run trains.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        more = sweep.main(sweep_args(tmp_path, **{**GRID, "seeds": 3}))
    assert more["grid"] == summary["grid"]
    assert more["final"][:2] == summary["final"]
    started = [r.getMessage() for r in caplog.records if r.name == "sweep"]
    assert sum(m.startswith("Training s-") for m in started) == 1


class StopAfterTwoSteps(train.GracefulExit):
    """As if SIGTERM arrived during the second step of the first run it is used in."""

    calls = 0

    def should_stop(self, device="cpu") -> bool:
        StopAfterTwoSteps.calls += 1
        if StopAfterTwoSteps.calls == 2:
            self.signum = 15
            return True
        return False


@pytest.mark.slow
def test_an_interrupted_sweep_continues_and_print_commands_then_collect_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys
) -> None:
    straight = sweep.main(sweep_args(tmp_path / "straight", **GRID))

    # Interrupted in its first run (after saving), then continued with the same command.
    argv = sweep_args(tmp_path / "stopped", **GRID)
    StopAfterTwoSteps.calls = 0
    with monkeypatch.context() as patch:
        patch.setattr(train, "GracefulExit", StopAfterTwoSteps)
        with pytest.raises(StoppedBySignal, match="run the same command again"):
            sweep.main(argv)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        resumed = sweep.main(argv)
    assert "Continuing s-lr0.03: " in caplog.text
    assert "Resumed from" in caplog.text
    assert "at step 2" in caplog.text
    for key in ("grid", "final"):
        for a, b in zip(resumed[key], straight[key], strict=True):
            figures = ("dev_accuracy", "dev_loss", "test_accuracy", "test_loss", "status", "run")
            assert {k: a[k] for k in figures} == {k: b[k] for k in figures}

    # A job array: print the commands, run them anywhere, print again, run, then collect.
    argv = sweep_args(tmp_path / "array", **GRID)
    for phase in ("grid", "final"):
        capsys.readouterr()
        assert sweep.main([*argv, "--print_commands"]) is None
        commands = capsys.readouterr().out.splitlines()
        assert len(commands) == 2, phase
        for command in commands:
            words = shlex.split(command)
            assert words[1] == "train.py"  # run by this interpreter, as typed in this folder
            assert os.path.abspath(shutil.which(words[0])) == os.path.abspath(sys.executable)
            train.main(words[2:])
    capsys.readouterr()
    assert sweep.main([*argv, "--print_commands"]) is None
    assert capsys.readouterr().out == ""  # nothing left to run
    collected = sweep.main([*argv, "--collect"])
    assert sweep.markdown(collected) == sweep.markdown(straight)


@pytest.mark.slow
def test_under_torchrun_every_process_runs_the_sweep_in_one_process_group(tmp_path: Path) -> None:
    """Two processes, three runs: each an ordinary 2-process train.py run (one process group
    serves them all: re-created, it could read the last one's rendezvous keys)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        *("-m", "torch.distributed.run", "--nproc_per_node", "2"),
        *("--master_addr", "127.0.0.1", "--master_port", str(port)),
        str(REPO / "sweep.py"),
        *sweep_args(tmp_path, learning_rates=[0.03, 0.3], seeds=1),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("= 2 process(es)") == 3
    summary = json.loads((tmp_path / "out" / "s_sweep.json").read_text())
    assert [run["status"] for run in summary["grid"] + summary["final"]] == ["finished"] * 3
    assert proc.stdout.count("## Sweep s:") == 1  # the first process alone reports


@pytest.mark.slow
def test_a_sweep_logged_to_a_file_has_plain_short_lines(tmp_path: Path) -> None:
    """`sweep.py ... > log 2>&1` (a cluster job): no progress bar redraws, no endless line."""
    log = tmp_path / "log.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    argv = sweep_args(tmp_path, learning_rates=[0.03, 0.3], seeds=1, log_every=2)
    with log.open("w") as handle:
        proc = subprocess.run(
            [sys.executable, "sweep.py", *argv],
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text
    # Only the logged train.py commands, as long as their flags (here long temporary paths),
    # may be longer than a line of progress.
    long = [line for line in text.splitlines() if len(line) > 300]
    assert all(f"{os.path.relpath(sys.executable)} train.py --" in line for line in long)
    assert text.count("train: Step 4/4: loss ") == 3  # each run's progress, as plain lines
    assert f"Training s-lr0.03: {os.path.relpath(sys.executable)} train.py " in text
