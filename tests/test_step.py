"""train.py's optimizer step and the loop around it: no host sync between logs, the logged loss
is the mean of the steps since the last log, a divergence is found where the loop syncs and
stops the run as a check after every step would, and `--compile` makes the whole step one graph
that evaluation never recompiles and that computes the eager step's numbers."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import train
from models.modeling import VisionTransformer
from tests.helpers import (
    HostReads,
    after_its_event_files,
    crash_at,
    expect_user_error,
    scalars,
    tiny_args,
)
from utils.evals.classification import evaluate
from utils.infra.dist_utils import DistInfo
from utils.infra.file_io import atomic_save, safe_load, with_content_sha256
from utils.infra.train_state import last_state_path
from utils.recipe.update_rule import OPTIM_DTYPES

pytestmark = pytest.mark.usefixtures("one_thread")


def count_reads_per_step(monkeypatch: pytest.MonkeyPatch, reads: HostReads) -> None:
    """Attribute `reads` to the step train.py's loop is in: from the call of its step to the
    call of the next (its log, evaluation and save included)."""
    real = train.train_step

    def counted(args, trainer, batches, guard, number, info):
        reads.phase = number
        return real(args, trainer, batches, guard, number, info)

    monkeypatch.setattr(train, "train_step", counted)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_steps_between_logs_never_wait_for_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    """train.py's own loop, counted op by op: the steps that neither log, evaluate nor save read
    nothing back from the device; the others read the loss and the guard's counts there, or
    under fp16 (with the dynamic loss scale) the loss and the scaler's skipped steps."""
    if precision == "fp16":
        monkeypatch.setattr(train, "resolve_precision", lambda *flags: "fp16")  # as on CUDA
    reads = HostReads()
    count_reads_per_step(monkeypatch, reads)
    flags = {
        "num_steps": 9,
        "log_every": 4,
        "eval_every": 0,
        "save_every": 0,
        "gradient_accumulation_steps": 2,
        "num_workers": 1,  # the loader's own work happens in its worker, not counted here
    }
    with reads:
        summary = train.main(tiny_args(tmp_path, **flags))
    assert summary.step == 9
    quiet = [step for step in range(1, 10) if step not in (4, 8, 9)]
    assert {step: reads.counts[step] for step in quiet} == dict.fromkeys(quiet, 0)
    # The mean loss, and the scaler's count (the guard's counts: .tolist(), not counted here).
    logged = {"fp32": 1, "fp16": 2}[precision]
    assert reads.counts[4] == reads.counts[8] == logged
    assert [step for step, _ in scalars(tmp_path / "logs" / "tiny")["train/loss"]] == [4, 8, 9]


def test_the_logged_loss_is_the_mean_since_the_last_log(tmp_path: Path, no_dropout: str) -> None:
    """Logged every 3 steps (and at the last), the loss is the mean of the losses the same run
    logs step by step; the rate is the one of the step it is logged at."""
    flags = {"model_type": no_dropout, "num_steps": 7, "eval_every": 0, "learning_rate": 0.1}
    train.main(tiny_args(tmp_path, name="each", **flags))
    train.main(tiny_args(tmp_path, name="every3", log_every=3, **flags))
    each, every3 = scalars(tmp_path / "logs" / "each"), scalars(tmp_path / "logs" / "every3")
    losses = dict(each["train/loss"])
    want = [(3, (1, 2, 3)), (6, (4, 5, 6)), (7, (7,))]
    assert [step for step, _ in every3["train/loss"]] == [step for step, _ in want]
    for (step, got), (_, steps) in zip(every3["train/loss"], want, strict=True):
        assert got == pytest.approx(sum(losses[s] for s in steps) / len(steps), rel=1e-6), step
    assert every3["train/lr"] == [(s, lr) for s, lr in each["train/lr"] if s in (3, 6, 7)]


def test_a_resume_logs_what_an_uninterrupted_run_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every save closes the loss being averaged for the log, so a run that crashed after a save
    and was resumed logs the same means at the same steps, and ends with the same weights."""
    flags = {"num_steps": 8, "log_every": 3, "save_every": 4, "eval_every": 0}
    train.main(tiny_args(tmp_path, name="straight", **flags))
    with monkeypatch.context() as patch:
        crash_at(patch, 7)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train.main(tiny_args(tmp_path, name="resumed", **flags))
    after_its_event_files(tmp_path / "logs" / "resumed")
    train.main(tiny_args(tmp_path, name="resumed", resume=True, **flags))
    want = scalars(tmp_path / "logs" / "straight")["train/loss"]
    assert [step for step, _ in want] == [3, 4, 6, 8]
    assert scalars(tmp_path / "logs" / "resumed")["train/loss"] == want
    out = tmp_path / "out"
    a, b = safe_load(last_state_path(out, "straight")), safe_load(last_state_path(out, "resumed"))
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key


def test_a_divergence_read_at_a_later_log_stops_the_run_as_at_its_step(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """Non-finite losses from step 3 on, read every 4 steps: the save at step 4 warns about the
    two skipped updates, and the log at step 8 stops the run naming step 5, the third in a row,
    with the last state left at step 4, as a check after every step stops it."""
    train.main(tiny_args(tmp_path, num_steps=2, eval_every=0))
    path = last_state_path(tmp_path / "out", "tiny")
    state = safe_load(path)
    state["model"]["encoder.norm.weight"][0] = float("inf")
    atomic_save(with_content_sha256(state), path)

    flags = {"num_steps": 20, "eval_every": 0, "log_every": 4, "save_every": 4, "resume": True}
    with caplog.at_level(logging.WARNING):
        err = expect_user_error(train.main, tiny_args(tmp_path, **flags), capsys)
    found = re.search(r"Training diverged: the loss was (inf|nan) for 3 consecutive steps "
                      r"\(last: step 5\)", err)  # fmt: skip
    assert found, err
    assert "2 steps up to step 4 had a non-finite loss" in caplog.text
    assert safe_load(path)["step"] == 4


def test_compile_is_the_default_on_cuda_only(tmp_path: Path) -> None:
    info = DistInfo()  # the CPU
    for flags, compiled in (({}, False), ({"compile": True}, True), ({"no_compile": True}, False)):
        args = train.parse_args(tiny_args(tmp_path, **flags))
        trainer = train.make_trainer(args, VisionTransformer("testing", 32, 10), info)
        assert (trainer.step is not train.optimizer_step) == compiled, flags
    assert train.parse_args(tiny_args(tmp_path)).compile is None  # decided by the device


def _batches(steps: int, nan_at: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Two micro-batches per step; every image of step `nan_at` is NaN (its update is skipped)."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for step in range(1, steps + 1):
        micro = []
        for _ in range(2):
            images = 3 * torch.randn(4, 3, 32, 32, generator=generator)
            micro.append(
                (images * math.nan if step == nan_at else images, torch.randint(0, 10, (4,)))
            )
        out.append(micro)
    return out


def _model(name: str) -> VisionTransformer:
    """A seeded model with a non-zero head: every parameter gets a gradient."""
    torch.manual_seed(0)
    model = VisionTransformer(name, 32, num_classes=10)
    with torch.no_grad():
        model.head.weight.normal_()
    return model


@pytest.mark.slow
def test_the_compiled_fp16_step_with_a_dynamic_loss_scale_is_one_graph_that_equals_eager(
    tmp_path: Path, no_dropout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp16 with the dynamic loss scale (`--loss_scale 0`), as on CUDA (on the CPU its autocast
    computes in bfloat16): `make_trainer` compiles the whole step, the scaler included, as one
    graph with no break; no step reads anything back; after 3 steps, the second skipped for a
    NaN loss (the scale halved), parameters, momentum and scale are the eager step's, bit for
    bit. The graph runs on the `aot_eager` backend, op by op (so the reads are counted inside
    it), in seconds; inductor's code for such a step is the test below's concern (it runs the
    scaler's two kernels as they are, as fallbacks)."""
    monkeypatch.setattr(train, "resolve_precision", lambda *flags: "fp16")  # as on CUDA
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda step: real(step, backend="aot_eager"))
    flags = {
        "model_type": no_dropout,
        "train_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "optim_dtype": "float32",
    }
    info, steps = DistInfo(), _batches(3, nan_at=2)
    model = _model(no_dropout)
    runs = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        args = train.parse_args(tiny_args(tmp_path, compile=compiled, **flags))
        trainer = train.make_trainer(args, copy.deepcopy(model), info)
        assert (trainer.step is not train.optimizer_step) == compiled
        assert trainer.scaler.get_scale() == 2.0**16
        torch._dynamo.reset()
        counters.clear()
        reads = HostReads()
        for k, batches in enumerate(steps, start=1):
            counted = reads if k > 1 else contextlib.nullcontext()  # (the first compiles)
            with torch._dynamo.config.patch(error_on_recompile=k > 1), counted:
                train.train_step(args, trainer, batches, None, k, info)
        assert reads.counts[None] == 0, name
        if compiled:
            assert dict(counters["graph_break"]) == {}
            assert counters["stats"]["unique_graphs"] == 1
        assert trainer.scaler.get_scale() == 2.0**15
        runs[name] = trainer
    eager, compiled = runs["eager"], runs["compiled"]
    for p, q in zip(eager.model.parameters(), compiled.model.parameters(), strict=True):
        assert torch.equal(q, p)
        want = eager.optimizer.state[p]["momentum_buffer"]
        assert torch.equal(compiled.optimizer.state[q]["momentum_buffer"], want)
    moved = zip(model.parameters(), eager.model.parameters(), strict=True)
    assert not any(torch.equal(p, q) for p, q in moved)


@pytest.mark.slow
@pytest.mark.parametrize("momentum_dtype", OPTIM_DTYPES)
def test_the_compiled_step_is_one_graph_that_evaluation_leaves_alone_and_equals_eager(
    tmp_path: Path, no_dropout: str, momentum_dtype: str
) -> None:
    """--compile (inductor, on the CPU): forward, backward, clipping and the update are one
    graph with no break; an evaluation in between recompiles nothing; after 4 steps
    (accumulation 2, one skipped for a NaN loss) parameters and momentum are the eager step's
    to 1e-6 with float32 momentum; with bfloat16 momentum, as far as its rounding allows."""
    flags = {
        "model_type": no_dropout,
        "train_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "optim_dtype": momentum_dtype,
    }
    info, steps = DistInfo(), _batches(4, nan_at=3)
    model = _model(no_dropout)
    runs = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        args = train.parse_args(tiny_args(tmp_path, compile=compiled, **flags))
        trainer = train.make_trainer(args, copy.deepcopy(model), info)
        guard = train.NonFiniteGuard(3)
        torch._dynamo.reset()
        counters.clear()
        for k, batches in enumerate(steps, start=1):
            with torch._dynamo.config.patch(error_on_recompile=k > 1):
                train.train_step(args, trainer, batches, guard, k, info)
            if k == 2:
                images = torch.randn(6, 3, 32, 32)
                data = torch.utils.data.TensorDataset(images, torch.randint(0, 10, (6,)))
                evaluate(
                    trainer.model, torch.utils.data.DataLoader(data, batch_size=4), info.device
                )
        if compiled:
            assert dict(counters["graph_break"]) == {}
            assert counters["stats"]["unique_graphs"] == 1
        runs[name] = trainer
    eager, compiled = runs["eager"], runs["compiled"]
    pairs = list(zip(eager.model.parameters(), compiled.model.parameters(), strict=True))
    traces = [
        (
            eager.optimizer.state[p]["momentum_buffer"],
            compiled.optimizer.state[q]["momentum_buffer"],
        )
        for p, q in pairs
    ]
    assert all(a.dtype == b.dtype == getattr(torch, momentum_dtype) for a, b in traces)
    if momentum_dtype == "float32":
        for (p, q), (a, b) in zip(pairs, traces, strict=True):
            torch.testing.assert_close(q, p, atol=1e-6, rtol=0)
            torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    else:  # bfloat16 rounds values that float32 rounding put either side of a tie either way
        flips = sum(int((a != b).sum()) for a, b in traces)
        assert flips <= 0.01 * sum(a.numel() for a, _ in traces), flips
        for (p, q), (a, b) in zip(pairs, traces, strict=True):
            # A flip moves the next trace by a bfloat16 step of this one, and its parameter by
            # the rate times that (a few 1e-6 here).
            torch.testing.assert_close(q, p, atol=1e-5, rtol=0)
            step = 2.0**-7 * float(a.float().abs().max())
            torch.testing.assert_close(b.float(), a.float(), atol=step, rtol=0)
    moved = zip(model.parameters(), eager.model.parameters(), strict=True)
    assert not any(torch.equal(p, q) for p, q in moved)
