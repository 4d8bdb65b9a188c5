"""The evaluation batch when `--eval_batch_size` is left out: on CUDA the largest the memory plan
fits beside the training state (at most 1024 and this process's share of the largest split),
64 without CUDA; an explicit value as given. Oracles: the live bytes of real inference passes
(`LiveTensorBytes`, or CUDA's allocator) against the budget, and the batches evaluation gets."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

import eval as eval_script
import train
from models.configs import get_config
from models.modeling import VisionTransformer
from tests.helpers import crash_at, expect_user_error, fake_checkpoint, tiny_args
from utils.data.loaders import build_eval_loader, resize_eval_batches
from utils.data.registry import DIGITS_TEST_SIZE
from utils.evals import classification
from utils.infra import memory
from utils.infra.file_io import save_npz
from utils.infra.memory import (
    BUDGET_SHARE,
    EVAL_BATCH_CAP,
    PEAK_MARGIN,
    LiveTensorBytes,
    evaluation_batch_size,
    planned_evaluation_batch,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def tiny_model() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer("testing", 32, num_classes=10).train()


def inference_peak(model: VisionTransformer, batch: int) -> int:
    """Live bytes at the peak of a real evaluation pass of `batch` images, its input included."""
    was = model.training
    with LiveTensorBytes() as tracker, torch.inference_mode():
        model.eval()(torch.zeros(batch, 3, 32, 32))
    model.train(was)
    return tracker.peak


@pytest.mark.parametrize("keep", [0, 300_000])
def test_the_planned_batch_is_the_largest_that_fits_the_budget(
    monkeypatch: pytest.MonkeyPatch, keep: int
) -> None:
    """With about 40 images' worth of memory left beside `keep` bytes, the chosen batch's real
    peak (plus the plan's margin) fits 90 % of what is left, and one more image's does not."""
    model = tiny_model()
    available = int(PEAK_MARGIN * inference_peak(model, 40) / BUDGET_SHARE) + 1000 + keep
    monkeypatch.setattr(memory, "available_bytes", lambda device: available)
    batch = planned_evaluation_batch(model, CPU, nullcontext, cap=10_000, keep=keep)
    budget = BUDGET_SHARE * (available - keep)
    assert PEAK_MARGIN * inference_peak(model, batch) <= budget
    assert PEAK_MARGIN * inference_peak(model, batch + 1) > budget
    assert batch == 40
    assert model.training  # left as it was
    assert all(p.grad is None for p in model.parameters())


def test_the_planned_batch_is_capped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Room for far more images: the batch is the split's share, or EVAL_BATCH_CAP."""
    caplog.set_level(logging.INFO, logger=memory.__name__)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**40)
    model = tiny_model()
    assert planned_evaluation_batch(model, CPU, nullcontext, cap=90) == 90
    assert "90 images per process (this process's share of the largest split" in caplog.text
    assert planned_evaluation_batch(model, CPU, nullcontext, cap=10**6) == EVAL_BATCH_CAP
    assert f"at most {EVAL_BATCH_CAP}; up to " in caplog.text


def test_not_even_one_image_is_one_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    model = tiny_model()
    available = int(inference_peak(model, 1) / BUDGET_SHARE)  # no room for the margin
    monkeypatch.setattr(memory, "available_bytes", lambda device: available)
    with pytest.raises(memory.UserError, match="Not even one image at 32x32 fits for evaluation"):
        planned_evaluation_batch(model, CPU, nullcontext, cap=100)


def test_without_cuda_the_default_is_64_and_an_explicit_value_is_used_as_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing is measured for either (a memory plan that would refuse both is not asked)."""
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1)
    model = tiny_model()
    assert evaluation_batch_size(None, model, CPU, nullcontext, cap=10_000) == 64
    assert evaluation_batch_size(7, model, CPU, nullcontext, cap=3) == 7


class _Indices(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> int:
        return index


def test_resized_batches_reach_workers_forked_before() -> None:
    """train.py forks the evaluation workers at set-up, then sets the batch size: every pass
    after that has the new size, each image once (what was prefetched at the old one is
    dropped)."""
    loader = build_eval_loader(_Indices(), 4, num_workers=1)
    loader.start_workers()
    resize_eval_batches(loader, 3)
    for _ in range(2):
        assert [batch.tolist() for batch in loader] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert (len(loader), loader.batch_size) == (4, 3)
    del loader


def evaluated_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the batches `evaluate` gets from its loader, in order."""
    sizes: list[int] = []
    real = classification.prepare_batch

    def recording(batch, device):
        images, labels = real(batch, device)
        sizes.append(len(labels))
        return images, labels

    monkeypatch.setattr(classification, "prepare_batch", recording)
    return sizes


def test_train_evaluates_in_batches_as_given_then_64_on_resume_without_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`--eval_batch_size 48`, stopped after step 1; resumed without the flag (so its record
    and saved flags differ there): it goes on, evaluating in batches of 64, warning of no
    difference from an uninterrupted run."""
    caplog.set_level(logging.INFO)
    sizes = evaluated_batches(monkeypatch)
    argv = tiny_args(tmp_path, num_steps=2, eval_every=1, save_every=1, eval_batch_size=False)
    with pytest.MonkeyPatch.context() as patch:
        crash_at(patch, 2)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train.main([*argv, "--eval_batch_size", "48"])
    assert "Evaluation batch: 48 images per process (--eval_batch_size)." in caplog.text
    assert sizes[0] == max(sizes) == 48
    sizes.clear()
    caplog.clear()
    assert train.main([*argv, "--resume"]).step == 2
    assert "Evaluation batch: 64 images per process (the default without CUDA)." in caplog.text
    assert sizes[0] == max(sizes) == 64
    assert sum(sizes) > DIGITS_TEST_SIZE  # test, then minival
    assert "Resumed from" in caplog.text
    assert not [r for r in caplog.records if r.getMessage().startswith("Resuming with")]


@pytest.mark.parametrize(("flag", "batch"), [(None, 64), ("7", 7)])
def test_eval_evaluates_in_batches_of_64_without_cuda_or_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str | None, batch: int
) -> None:
    path = tmp_path / "model.npz"
    save_npz(path, fake_checkpoint(get_config("testing"), num_classes=10, img_size=32))
    sizes = evaluated_batches(monkeypatch)
    argv = [f"--checkpoint={path}", "--model_type=testing", "--dataset=digits"]
    argv += [f"--data_dir={tmp_path / 'data'}", "--num_workers=0"]
    result = eval_script.main(argv + ([f"--eval_batch_size={flag}"] if flag else []))
    assert result["count"] == sum(sizes) == DIGITS_TEST_SIZE
    assert sizes[0] == max(sizes) == batch


def test_eval_refuses_a_default_batch_that_cannot_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Without CUDA the default is not planned but checked, as an explicit value is."""
    path = tmp_path / "model.npz"
    save_npz(path, fake_checkpoint(get_config("testing"), num_classes=10, img_size=32))
    available = int(PEAK_MARGIN * inference_peak(tiny_model(), 20) / BUDGET_SHARE) + 1000
    monkeypatch.setattr(memory, "available_bytes", lambda device: available)
    argv = [f"--checkpoint={path}", "--model_type=testing", "--dataset=digits"]
    err = expect_user_error(eval_script.main, [*argv, f"--data_dir={tmp_path / 'data'}"], capsys)
    assert "A batch of 64 images at 32x32 needs" in err
    assert "use --eval_batch_size 20 or less" in err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_batch_is_planned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """train.py without the flag: the tiny model fits any batch, so it evaluates the test split
    (360 images) in one batch. Then the plan against a small budget: the allocator's real peak
    for the chosen batch (plus the margin) fits 90 % of it, and it is not far below."""
    caplog.set_level(logging.INFO)
    sizes = evaluated_batches(monkeypatch)
    train.main(tiny_args(tmp_path, num_steps=1, eval_every=0, eval_batch_size=False))
    assert sizes[0] == DIGITS_TEST_SIZE
    assert f"{DIGITS_TEST_SIZE} images per process (this process's share" in caplog.text

    model = tiny_model().to("cuda")
    cuda_inference_peak(model, 2)  # cuBLAS's workspace, allocated once, is not the batch's
    available = int(cuda_inference_peak(model, 200) / BUDGET_SHARE)
    monkeypatch.setattr(memory, "available_bytes", lambda device: available)
    batch = planned_evaluation_batch(model, torch.device("cuda"), nullcontext, cap=10_000)
    assert 100 <= batch < 200  # the margin: not all 200
    assert PEAK_MARGIN * cuda_inference_peak(model, batch) <= BUDGET_SHARE * available


def cuda_inference_peak(model: VisionTransformer, batch: int) -> int:
    """What CUDA's allocator holds at the peak of a real evaluation pass of `batch` images,
    beyond what it held before (the input included)."""
    was = model.training
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        model.eval()(torch.zeros(batch, 3, 32, 32, device="cuda"))
    torch.cuda.synchronize()
    model.train(was)
    return torch.cuda.max_memory_allocated() - before
