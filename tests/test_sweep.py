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
import textwrap
from pathlib import Path

import pytest
import torch

import sweep
import train
from tests.helpers import expect_user_error, free_port, make_image_folder, scalars, tiny_args
from utils.data.registry import DATASETS
from utils.infra.errors import StoppedBySignal
from utils.infra.file_io import save_checkpoint

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
        ({"seeds": 1001}, "--seeds: must be at most 1000, got 1001"),
        # the last final run's seed would be 2**32, which train.py refuses
        (
            {"seed": 2**32 - 1, "seeds": 2},
            "--seed 4294967295 with --seeds 2 gives the final runs seeds up to 4294967296",
        ),
        # the grid runs' names fit, the final runs' (s...-final-lr0.01-seed42) do not
        (
            {"name": "s" * 210},
            "--name is 210 bytes long, too long for the sweep's runs: the longest, "
            f"{'s' * 210}-final-lr0.01-seed42, adds 20 bytes",
        ),
    ],
)
def test_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture, flags: dict, message: str
) -> None:
    err = expect_user_error(sweep.main, sweep_args(tmp_path, **flags), capsys)
    assert message in err
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


@pytest.mark.parametrize("mode", [[], ["--print_commands"], ["--collect"]])
def test_an_output_dir_that_is_a_file_is_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture, mode: list[str]
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for output_dir, says in [
        (a_file, f"--output_dir {a_file} is a file, not a folder"),
        (a_file / "sub", f"--output_dir {a_file / 'sub'} cannot be created: {a_file} is a file"),
    ]:
        argv = [*sweep_args(tmp_path, output_dir=output_dir), *mode]
        assert says in expect_user_error(sweep.main, argv, capsys)
    assert a_file.read_text() == "x"


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


@pytest.mark.parametrize("damage", ['{"protocol": ["seed"]}', '{"protocol": "seed"}', "[]", "{"])
def test_a_damaged_summary_is_one_warning_and_written_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture, damage: str
) -> None:
    """The summary is not what a rerun trusts (the runs' records are): a damaged one is said
    once, and the plan written again."""
    json_path = tmp_path / "out" / "s_sweep.json"
    json_path.parent.mkdir()
    json_path.write_text(damage)
    with caplog.at_level(logging.WARNING):
        assert sweep.main([*sweep_args(tmp_path, learning_rates=[0.3]), "--print_commands"]) is None
    assert f"{json_path} is damaged (" in caplog.text
    assert capsys.readouterr().out.count(" train.py ") == 1  # the grid's one run
    assert json.loads(json_path.read_text())["protocol"]["num_steps"] == 4


def test_a_final_checkpoint_without_a_record_of_its_settings_is_not_taken(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A sidecar that says "the final step" is not enough: nothing says which settings made it."""
    for run in ("s-lr0.3", "s-final-lr0.3-seed42"):
        facts = {"accuracy": 0.5, "test_loss": 1.0, "minival_accuracy": 0.5, "minival_loss": 1.0}
        path = tmp_path / "out" / f"{run}_checkpoint.bin"
        save_checkpoint({"w": torch.ones(1)}, path, step=4, selected_by="final", **facts)
    err = expect_user_error(sweep.main, sweep_args(tmp_path, learning_rates=[0.3]), capsys)
    assert "s-lr0.3 has files (" in err
    assert "but no record of the settings it was started with" in err
    assert not (tmp_path / "out" / "s_sweep.json").exists()  # nothing written back either


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
    assert "Continuing s-lr0.03 (grid run" in caplog.text
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
def test_runs_are_recognised_by_their_own_records_whatever_the_summary_says(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    """The summary deleted or truncated, a rerun with other settings finds the runs' own: refused
    before anything trains or is written. The same settings rebuild the same summary, also from
    runs that predate records (their last state's flags)."""
    one = {"learning_rates": [0.3], "seeds": 1}
    summary = sweep.main(sweep_args(tmp_path, **one))
    out = tmp_path / "out"
    json_path = out / "s_sweep.json"
    written = json_path.read_text()

    def files() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}

    for damage in ("delete", "truncate", "no records"):
        if damage == "truncate":
            json_path.write_text(written[:100])
        else:
            json_path.unlink()
        if damage == "no records":  # runs from before train.py recorded them
            records = sorted((tmp_path / "logs").rglob(".run.json"))
            assert len(records) == 2  # one per run
            for record in records:
                record.unlink()
        before = files()
        for other, says in [
            ({"img_size": 48}, "--img_size 48 (it has 32)"),
            ({"model_type": "demo"}, "--model_type demo (it has testing)"),
        ]:
            err = expect_user_error(sweep.main, sweep_args(tmp_path, **one, **other), capsys)
            assert f"s-lr0.3 was started with other settings than this sweep gives it: {says}" in (
                err
            )
            where = "s-lr0.3_last.pt" if damage == "no records" else "s-lr0.3/.run.json"
            assert f"{where}). It belongs to another sweep of this --name" in err
            assert files() == before  # nothing trained, nothing written back
        json_path.unlink(missing_ok=True)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert sweep.main(sweep_args(tmp_path, **one)) == summary
        assert json_path.read_text() == written
        assert "Training s-" not in caplog.text


# Run the sweep, killed (SIGKILL) at one moment of its first run or before its summary.
_KILLED_SWEEP = textwrap.dedent(
    """
    import os, signal, sys
    import sweep, train
    from utils.infra import run_files

    def killed_after(function):
        def call(*args, **kwargs):
            function(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        return call

    moment = sys.argv[1]
    if moment == "record":  # the run's record written, no event file yet
        run_files.write_record = killed_after(run_files.write_record)
    elif moment == "event file":  # its first event file written, nothing saved
        train.EventLog.__init__ = killed_after(train.EventLog.__init__)
    else:  # every run finished, the summary not yet written
        sweep.summarise = killed_after(lambda *args: None)
    sweep.run_cli(lambda: sweep.main(sys.argv[2:]))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["record", "event file", "summary"])
def test_a_sweep_killed_at_any_moment_continues_with_the_same_command(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture, moment: str
) -> None:
    argv = sweep_args(tmp_path, learning_rates=[0.3], seeds=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _KILLED_SWEEP, moment, *argv], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-3000:]
    log = tmp_path / "logs" / "s-lr0.3"
    events = sorted(log.glob("events.out.tfevents.*"))
    assert len(events) == (1 if moment != "record" else 0)
    if moment == "event file":  # another sweep's run, even one that never saved, is refused
        (tmp_path / "out" / "s_sweep.json").unlink()  # by its record, not by the summary
        err = expect_user_error(sweep.main, sweep_args(tmp_path, learning_rates=[0.3], img_size=48),
                                capsys)  # fmt: skip
        assert "s-lr0.3 was started with other settings than this sweep gives it" in err
    caplog.clear()
    with caplog.at_level(logging.INFO):
        summary = sweep.main(argv)
    assert [run["status"] for run in summary["grid"] + summary["final"]] == ["finished"] * 2
    started = [r.getMessage() for r in caplog.records if r.name == "sweep"]
    trained = [m.split(" (")[0] for m in started if m.split()[0] in ("Training", "Restarting")]
    expected = {
        "record": ["Training s-lr0.3", "Training s-final-lr0.3-seed42"],  # its record alone
        "event file": ["Restarting s-lr0.3", "Training s-final-lr0.3-seed42"],
        "summary": [],
    }
    assert trained == expected[moment]
    # The restarted run's log is its new one alone: the killed run's was its own to replace.
    assert [e for e in events if e.exists()] == ([] if moment == "event file" else events)
    assert len(list(log.glob("events.out.tfevents.*"))) == 1
    assert [step for step, _ in scalars(log)["minival/accuracy"]] == [4]


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
    assert max(map(len, text.splitlines())) <= 300
    assert text.count("train: Step 4/4: loss ") == 3  # each run's progress, as plain lines
    assert "Training s-lr0.03 (grid run, learning rate 0.03, seed 42)" in text
