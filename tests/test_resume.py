"""train.py's last-state checkpoints: exact resume, crashes, kill -9, SIGTERM, divergence.

Oracles are independent of the code under test: an uninterrupted run with the same flags (every
weight compared with `torch.equal`), TensorBoard's own event reader, the bytes and mtime of the
best checkpoint, and real processes killed with real signals.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import train
from models.configs import get_config
from models.modeling import VisionTransformer
from tests.helpers import (
    after_its_event_files,
    crash_at,
    expect_user_error,
    fake_checkpoint,
    make_image_folder,
    scalars,
    start_train,
    tiny_args,
)
from utils.data.loaders import get_loader
from utils.infra import train_state
from utils.infra.file_io import atomic_save, safe_load, save_npz, sidecar_path, with_content_sha256
from utils.infra.train_state import last_state_path
from utils.recipe.update_rule import applied_lr

# Long enough that a poller sees a save and stops the process well before the end.
PROCESS_FLAGS = {
    "num_steps": 40,
    "save_every": 2,
    "eval_every": 0,
    "warmup_steps": 2,
    "learning_rate": 0.1,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def last_state(out: Path, name: str) -> dict:
    return safe_load(last_state_path(out, name))


def assert_same_training(out_a: Path, name_a: str, out_b: Path, name_b: str) -> None:
    """Same step, data position, weights, momentum buffers and schedule, bit for bit."""
    a, b = last_state(out_a, name_a), last_state(out_b, name_b)
    assert (a["step"], a["data_position"]) == (b["step"], b["data_position"])
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for index, buffers in a["optimizer"]["state"].items():
        mine, theirs = buffers["momentum_buffer"], b["optimizer"]["state"][index]["momentum_buffer"]
        assert mine.dtype == theirs.dtype == torch.bfloat16  # vit_jax's momentum, the default
        assert torch.equal(mine.view(torch.int16), theirs.view(torch.int16)), index  # the bytes
    assert a["best_accuracy"] == b["best_accuracy"]


def assert_same_best(out: Path, name_a: str, name_b: str) -> None:
    """The best checkpoints hold the same weights and describe the same step and accuracy."""
    meta_a = json.loads((out / f"{name_a}_checkpoint.json").read_text())
    meta_b = json.loads((out / f"{name_b}_checkpoint.json").read_text())
    assert (meta_a["step"], meta_a["accuracy"]) == (meta_b["step"], meta_b["accuracy"])
    assert meta_a["precision"] == meta_b["precision"] == "fp32"
    a = safe_load(out / f"{name_a}_checkpoint.bin")
    b = safe_load(out / f"{name_b}_checkpoint.bin")
    for key, value in a.items():
        assert torch.equal(b[key], value), key


# --------------------------------------------------------------------------------------------
# In process: a crash after a save, then --resume


def test_crash_then_resume_equals_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 steps straight == crash at step 7 (last save at 4) + --resume, with dropout on.

    12 images in batches of 4 make 3 steps per epoch: the save at step 4 lies mid-epoch
    (epoch 1, batch 1), and the resumed run crosses another epoch boundary. The crashed run had
    logged steps 5 and 6 and saved a best model at step 6 before dying.
    """
    assert get_config("testing").dropout_rate > 0  # so the RNG restore matters
    make_image_folder(tmp_path / "pics", classes=("a", "b", "c"), n=4)
    common = {
        "dataset": "imagefolder",
        "data_dir": tmp_path / "pics",
        "train_batch_size": 4,
        "num_steps": 8,
        "eval_every": 3,
        "save_every": 4,
        "learning_rate": 0.1,
    }
    straight = train.main(tiny_args(tmp_path, name="straight", **common))

    with monkeypatch.context() as patch:
        crash_at(patch, 7)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train.main(tiny_args(tmp_path, name="resumed", **common))
    saved = last_state(tmp_path / "out", "resumed")
    assert saved["step"] == 4
    assert saved["data_position"] == {"epoch": 1, "batches_in_epoch": 1}
    assert saved["args"]["name"] == "resumed"
    assert saved["model_type"] == "testing"

    after_its_event_files(tmp_path / "logs" / "resumed")
    resumed = train.main(tiny_args(tmp_path, name="resumed", resume=True, **common))
    out = tmp_path / "out"
    assert_same_training(out, "straight", out, "resumed")
    assert_same_best(out, "straight", "resumed")
    assert (resumed.selected_test_accuracy, resumed.selected_step) == (
        straight.selected_test_accuracy,
        straight.selected_step,
    )
    # TensorBoard: the events the crashed run logged after step 4 are replaced, not repeated.
    want = scalars(tmp_path / "logs" / "straight")
    got = scalars(tmp_path / "logs" / "resumed")
    assert [s for s, _ in got["train/loss"]] == list(range(1, 9))
    assert got["train/loss"] == want["train/loss"]
    assert got["train/lr"] == want["train/lr"]
    assert [s for s, _ in got["test/accuracy"]] == [3, 6, 8]

    # Control: without restoring the RNG state, dropout draws other masks and the run differs.
    with monkeypatch.context() as patch:
        crash_at(patch, 5)
        with pytest.raises(RuntimeError):
            train.main(tiny_args(tmp_path, name="norng", **common))
    with monkeypatch.context() as patch:
        patch.setattr(train_state, "set_rng_state", lambda state: None)
        train.main(tiny_args(tmp_path, name="norng", resume=True, **common))
    a, b = last_state(out, "straight")["model"], last_state(out, "norng")["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_resume_path_and_finished_run(tmp_path: Path) -> None:
    """`--resume PATH` under another --name; resuming a finished run trains no further."""
    train.main(tiny_args(tmp_path, name="first", num_steps=2, eval_every=0, save_every=0))
    path = last_state_path(tmp_path / "out", "first")
    assert safe_load(path)["step"] == 2  # saved at the end even with --save_every 0
    summary = train.main(tiny_args(tmp_path, name="second", num_steps=3, eval_every=0, resume=path))
    assert summary.step == 3
    assert last_state(tmp_path / "out", "second")["step"] == 3
    before = path.stat().st_mtime_ns
    again = train.main(tiny_args(tmp_path, name="first", num_steps=2, resume=True))
    assert again.step == 2
    assert path.stat().st_mtime_ns == before


def test_a_resume_takes_the_model_from_its_state(tmp_path: Path, caplog) -> None:
    """Without --model_type, a resume builds the model its state holds, even when the checkpoint
    it started from is gone (and its name tells nothing)."""
    path = tmp_path / "start.npz"
    save_npz(path, fake_checkpoint(get_config("testing"), num_classes=3, img_size=32))
    flags = {"pretrained_dir": path, "eval_every": 0, "save_every": 2}
    train.main(tiny_args(tmp_path, num_steps=2, **flags))  # testing: no shapes tell it
    path.unlink()
    last = last_state_path(tmp_path / "out", "tiny")
    with caplog.at_level(logging.INFO):
        summary = train.main(
            tiny_args(tmp_path, num_steps=3, resume=True, model_type=False, **flags)
        )
    assert summary.step == 3
    assert f"{last} holds a testing model (inferred from its description)" in caplog.text


# --------------------------------------------------------------------------------------------
# Real processes: kill -9 and SIGTERM


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of PROCESS_FLAGS run without interruption (name `straight`)."""
    root = tmp_path_factory.mktemp("straight")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(tiny_args(root, name="straight", **PROCESS_FLAGS))
    finally:
        torch.set_num_threads(threads)
    return root / "out"


def start_training(tmp_path: Path, name: str, **flags) -> tuple[subprocess.Popen, Path]:
    """train.py in a new process group; stdout and stderr go to `<name>.log`."""
    log = tmp_path / f"{name}.log"
    return start_train(tiny_args(tmp_path, name=name, **PROCESS_FLAGS, **flags), log), log


def wait_for_save(proc: subprocess.Popen, log: Path, path: Path, step: int) -> int:
    """Poll the last state until it holds at least `step` steps; returns the step seen."""
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"train.py ended early:\n{log.read_text()[-3000:]}"
            if path.exists():
                saved = safe_load(path)["step"]  # atomic writes: never a torn file
                if saved >= step:
                    return saved
            time.sleep(0.01)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.kill()
    proc.wait()
    pytest.fail(f"no save of step {step} within 180 s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(tmp_path: Path, uninterrupted: Path) -> None:
    out = tmp_path / "out"
    path = last_state_path(out, "killed")
    proc, log = start_training(tmp_path, "killed")
    wait_for_save(proc, log, path, 4)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    saved = safe_load(path)["step"]  # loads: the kill tore nothing
    assert 4 <= saved < PROCESS_FLAGS["num_steps"], "killed too late to test a resume"
    assert saved % PROCESS_FLAGS["save_every"] == 0
    after_its_event_files(tmp_path / "logs" / "killed")

    summary = train.main(tiny_args(tmp_path, name="killed", resume=True, **PROCESS_FLAGS))
    assert summary.step == PROCESS_FLAGS["num_steps"]
    assert_same_training(uninterrupted, "straight", out, "killed")
    want = scalars(uninterrupted.parent / "logs" / "straight")["train/loss"]
    got = scalars(tmp_path / "logs" / "killed")["train/loss"]
    # Each step logged once, whichever event file TensorBoard reads first (file names hold the
    # second and pid of their creation, so the two runs' files may sort either way).
    assert sorted(got) == want


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "workers"),
    [(signal.SIGTERM, 0), (signal.SIGINT, 1)],
    ids=["sigterm-to-process", "ctrl-c-to-group-with-worker"],
)
def test_signal_saves_and_exits_cleanly(
    tmp_path: Path, uninterrupted: Path, signum: int, workers: int
) -> None:
    """SIGTERM to train.py, or SIGINT to its whole process group with a loader worker (what
    Ctrl+C in a terminal does): it finishes the step, saves, says how to resume and exits with
    128 + the signal (143, 130), so that a scheduler or `make a && make b` sees it stopped."""
    out = tmp_path / "out"
    path = last_state_path(out, "stopped")
    proc, log = start_training(tmp_path, "stopped", num_workers=workers)
    wait_for_save(proc, log, path, 2)
    if workers:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    assert proc.wait(timeout=120) == 128 + signum, log.read_text()[-3000:]
    text = log.read_text()
    found = re.search(
        rf"Stopped by {signal.Signals(signum).name} at step (\d+); saved (\S+)\. Continue "
        r"with the same command plus --resume\.",
        text,
    )
    assert found, text[-3000:]
    stopped_at = int(found.group(1))
    assert Path(found.group(2)) == path
    assert safe_load(path)["step"] == stopped_at < PROCESS_FLAGS["num_steps"]
    assert f"Steps: {stopped_at} of {PROCESS_FLAGS['num_steps']} (stopped" in text
    assert "Traceback" not in text

    train.main(tiny_args(tmp_path, name="stopped", resume=True, **PROCESS_FLAGS))
    assert_same_training(uninterrupted, "straight", out, "stopped")


# --------------------------------------------------------------------------------------------
# Divergence and user errors


def test_non_finite_loss_stops_without_touching_the_best_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A run whose weights turn infinite (here: written so into its last state, then resumed)
    stops after 3 non-finite losses with exit 2; its evaluations on the way save nothing."""
    train.main(tiny_args(tmp_path, name="run", num_steps=2, eval_every=2))
    best = tmp_path / "out" / "run_checkpoint.bin"
    sidecar = sidecar_path(best)
    before = (best.read_bytes(), best.stat().st_mtime_ns, sidecar.read_text())
    path = last_state_path(tmp_path / "out", "run")
    state = safe_load(path)
    state["model"]["encoder.norm.weight"][0] = float("inf")
    atomic_save(with_content_sha256(state), path)

    argv = tiny_args(tmp_path, name="run", num_steps=20, eval_every=1, save_every=1, resume=True)
    err = expect_user_error(train.main, argv, capsys)
    found = re.search(r"error: Training diverged: the loss was (inf|nan) for 3 consecutive "
                      r"steps \(last: step (\d+)\)", err)  # fmt: skip
    assert found, err
    assert "The best checkpoint was not overwritten" in err
    assert (best.read_bytes(), best.stat().st_mtime_ns, sidecar.read_text()) == before
    # Nothing is saved for the failing step; the last state stays at the step before it.
    assert last_state(tmp_path / "out", "run")["step"] == int(found.group(2)) - 1


def test_resume_errors(tmp_path: Path, capsys: pytest.CaptureFixture, no_dropout: str) -> None:
    err = expect_user_error(train.main, tiny_args(tmp_path, name="run", resume=True), capsys)
    assert "Cannot resume:" in err
    assert "run_last.pt does not exist" in err

    train.main(tiny_args(tmp_path, name="run", num_steps=1, eval_every=0))
    err = expect_user_error(train.main, tiny_args(tmp_path, name="other", resume=True), capsys)
    assert "Saved states in" in err
    assert "run_last.pt" in err

    err = expect_user_error(
        train.main, tiny_args(tmp_path, name="run", resume=True, model_type=no_dropout), capsys
    )
    assert "trained with --model_type testing, not testing-nodrop" in err
    err = expect_user_error(
        train.main, tiny_args(tmp_path, name="run", resume=True, img_size=48), capsys
    )
    assert "trained at --img_size 32, not 48" in err

    best = tmp_path / "out" / "run_checkpoint.bin"
    err = expect_user_error(train.main, tiny_args(tmp_path, name="run", resume=best), capsys)
    assert "not a training state" in err


def test_resume_warns_about_changed_flags(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    train.main(tiny_args(tmp_path, name="run", num_steps=2, eval_every=0))
    caplog.clear()
    train.main(tiny_args(tmp_path, name="run", num_steps=3, eval_every=0, seed=7, resume=True))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("--num_steps 3, but the saved run used 2" in w for w in warnings)
    assert any("--seed 7, but the saved run used 42" in w for w in warnings)
    assert not any("--learning_rate" in w for w in warnings)


@pytest.mark.parametrize("changed", [{"num_steps": 12}, {"learning_rate": 0.05, "warmup_steps": 6}])
def test_a_resumed_schedule_follows_the_flags(tmp_path: Path, changed: dict) -> None:
    """Changed schedule flags give the schedule they define, continued from the saved step."""
    flags = {"num_steps": 8, "warmup_steps": 2, "learning_rate": 0.1, "eval_every": 0}
    train.main(tiny_args(tmp_path, name="run", **{**flags, "num_steps": 4}, save_every=4))
    flags.update(changed)
    train.main(tiny_args(tmp_path, name="run", resume=True, **flags))
    logged = dict(scalars(tmp_path / "logs" / "run")["train/lr"])
    assert sorted(logged) == list(range(1, flags["num_steps"] + 1))
    for step in range(5, flags["num_steps"] + 1):
        want = applied_lr(
            flags["learning_rate"], step, flags["num_steps"], flags["warmup_steps"], "cosine"
        )
        assert logged[step] == pytest.approx(want, rel=1e-6), step


def test_loader_workers_leave_ctrl_c_to_the_trainer(tmp_path: Path) -> None:
    """Ctrl+C reaches the workers too; a persistent test-loader worker must survive it, or the
    evaluation train.py finishes before saving fails with "worker exited unexpectedly"."""
    _, _, test_loader = get_loader(
        dataset="digits",
        data_dir=tmp_path,
        img_size=16,
        seed=0,
        micro_batch_size=8,
        eval_batch_size=120,
        num_workers=1,
    )
    assert sum(len(batch) for batch in test_loader) == 360
    worker = test_loader._iterator._workers[0]  # persistent: reused by the next pass
    os.kill(worker.pid, signal.SIGINT)
    os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert worker.is_alive()
    assert sum(len(batch) for batch in test_loader) == 360


def _as_written_before_bfloat16_momentum(path: Path, **sgd_options) -> None:
    """Swap the optimizer state of a last state for the torch.optim.SGD state older runs saved."""
    saved = safe_load(path)
    model = VisionTransformer("testing", 32, num_classes=10)
    model.load_state_dict(saved["model"])
    old = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, **sgd_options)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    old.step()
    saved["optimizer"] = old.state_dict()
    atomic_save(saved, path)


def test_resume_of_a_state_written_before_bfloat16_momentum(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    train.main(tiny_args(tmp_path, num_steps=2, eval_every=0))
    path = last_state_path(tmp_path / "out", "tiny")
    _as_written_before_bfloat16_momentum(path)
    with caplog.at_level(logging.WARNING):
        summary = train.main(tiny_args(tmp_path, num_steps=4, eval_every=0, resume=True))
    assert summary.step == 4
    assert "float32 momentum" in caplog.text  # continued with its momentum, and said so
    momentum = last_state(tmp_path / "out", "tiny")["optimizer"]["state"][0]["momentum_buffer"]
    assert momentum.dtype == torch.bfloat16

    # A state this optimizer cannot continue (Nesterov momentum): one message, exit code 2.
    _as_written_before_bfloat16_momentum(path, nesterov=True)
    err = expect_user_error(
        train.main, tiny_args(tmp_path, num_steps=6, eval_every=0, resume=True), capsys
    )
    assert "resum" in err.lower()


# --------------------------------------------------------------------------------------------
# What a resume must not change, and a log that cannot be written


@pytest.mark.parametrize("fraction", [0.1, 0.0])
def test_a_resume_with_another_split_is_refused(tmp_path: Path, capsys, fraction: float) -> None:
    train.main(tiny_args(tmp_path, num_steps=2, eval_every=2))
    saved = last_state_path(tmp_path / "out", "tiny").read_bytes()
    argv = tiny_args(tmp_path, num_steps=4, holdout_fraction=fraction, resume=True)
    err = expect_user_error(train.main, argv, capsys)
    assert "with --holdout_fraction 0.02 (1408 training / 29 minival images)" in err
    assert f"this command with --holdout_fraction {fraction} (" in err
    assert last_state_path(tmp_path / "out", "tiny").read_bytes() == saved


def test_a_resume_in_another_precision_is_warned_about(tmp_path: Path, caplog) -> None:
    train.main(tiny_args(tmp_path, num_steps=2, eval_every=0))
    with caplog.at_level(logging.WARNING):
        train.main(tiny_args(tmp_path, num_steps=3, eval_every=0, precision="bf16", resume=True))
    assert "Resuming in bf16, but the saved run trained in fp32" in caplog.text
    assert last_state(tmp_path / "out", "tiny")["precision"] == "bf16"


def test_a_resume_with_another_tf32_setting_is_warned_about(
    tmp_path: Path, caplog, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first run stands for one on a GPU, where --tf32 on takes effect (the CPU has no TF32).
    with monkeypatch.context() as gpu:
        gpu.setattr(train, "set_tf32", lambda on, device: on)
        train.main(tiny_args(tmp_path, num_steps=2, eval_every=0))
    assert last_state(tmp_path / "out", "tiny")["tf32"] is True
    with caplog.at_level(logging.WARNING):
        train.main(tiny_args(tmp_path, num_steps=3, eval_every=0, resume=True))
    assert (
        "Resuming with float32 matrix products in full float32, but the saved run computed "
        "them in TF32 (--tf32)" in caplog.text
    )
    assert last_state(tmp_path / "out", "tiny")["tf32"] is False
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train.main(tiny_args(tmp_path, num_steps=4, eval_every=0, resume=True))
    assert "--tf32" not in caplog.text


def _event_file_becomes_a_folder(log_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorBoard reopens its event file for every record: the next one fails (EISDIR)."""
    for events in log_dir.glob("events.out.tfevents.*"):
        for _ in range(100):  # its writer thread may re-create the file in between
            events.unlink(missing_ok=True)
            try:
                events.mkdir()
                break
            except FileExistsError:
                continue
        assert events.is_dir()


def _disk_fills_up(log_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What TensorBoard's writer meets on a full disk: ENOSPC from its next write."""
    from tensorboard.compat.tensorflow_stub.io import gfile

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gfile.LocalFileSystem, "append", full)


@pytest.mark.parametrize("fault", [_event_file_becomes_a_folder, _disk_fills_up])
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # its traceback
def test_a_log_that_cannot_be_written_stops_the_run_after_saving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, fault
) -> None:
    """The log fails from step 3 on. TensorBoard's thread reports it at the run's next call:
    in step 3 when it has already failed on step 2's records, else at step 4's evaluation flush,
    which waits for it."""
    log_dir = tmp_path / "logs" / "tiny"
    real = train.train_step

    def failing(args, trainer, batches, guard, number, info):
        if number == 3:
            fault(log_dir, monkeypatch)
        return real(args, trainer, batches, guard, number, info)

    monkeypatch.setattr(train, "train_step", failing)
    flags = {"num_steps": 10, "eval_every": 4, "save_every": 100}
    err = expect_user_error(train.cli, tiny_args(tmp_path, **flags), capsys)
    assert "Exception in thread" not in err  # nor from TensorBoard's writer thread
    assert f"TensorBoard could not write to --log_dir {log_dir} (" in err
    assert "continue with the same command plus --resume" in err
    saved = last_state(tmp_path / "out", "tiny")["step"]
    assert saved in (3, 4)  # saved on the output disk at the step that found it

    monkeypatch.undo()  # room again
    for folder in log_dir.glob("events.out.tfevents.*"):
        if folder.is_dir():
            folder.rmdir()
    summary = train.main(tiny_args(tmp_path, **flags, resume=True))
    assert summary.step == 10
    logged = [step for step, _ in scalars(log_dir)["train/loss"]]
    assert logged[-(10 - saved) :] == list(range(saved + 1, 11))
