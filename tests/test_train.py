"""train.py end to end on tiny runs (CPU, offline): every dataset kind, checkpoints, TensorBoard.

Oracles are independent of the code under test: TensorBoard's own event reader, a strict
`load_state_dict` into a fresh model, an accuracy recomputed with a plain loop, the fake
official checkpoint's arrays, and hand-computed schedule values.
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

import train
from models import configs
from models.configs import get_config
from models.modeling import VisionTransformer
from tests.helpers import (
    fake_checkpoint,
    load_checkpoint,
    make_image_folder,
    make_photo_folder,
    scalars,
    serve_cifar,
    tiny_args,
)
from utils.data import loaders
from utils.data.loaders import DigitsDataset, build_transforms
from utils.infra import memory
from utils.infra.errors import USER_ERRORS
from utils.infra.file_io import safe_load
from utils.infra.loading import which_model
from utils.infra.train_state import last_state_path
from utils.recipe.amp import set_tf32
from utils.recipe.precision import resolve_precision
from utils.recipe.update_rule import applied_lr

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_digits_end_to_end(tmp_path: Path) -> None:
    summary = train.main(tiny_args(tmp_path, learning_rate=0.1))
    meta, state = load_checkpoint(tmp_path / "out", "tiny")
    assert meta["model_type"] == "testing"
    assert meta["img_size"] == [32, 32]
    assert meta["num_classes"] == 10
    assert meta["dataset"] == "digits"
    assert meta["class_names"] == [str(d) for d in range(10)]
    assert meta["step"] in (2, 4)
    assert meta["accuracy"] == summary.selected_test_accuracy

    # The checkpoint is a plain state dict that loads strictly into a fresh model ...
    model = VisionTransformer("testing", img_size=32, num_classes=10)
    model.load_state_dict(state, strict=True)
    model.eval()
    # ... and scores the saved accuracy, recomputed with a plain loop over the test set.
    test = DigitsDataset(train=False, transform=build_transforms(32, train=False))
    with torch.no_grad():
        images = torch.stack([test[i][0] for i in range(len(test))])
        predictions = model(images)[0].argmax(dim=1)
    accuracy = (predictions == torch.tensor(test.targets)).sum().item() / len(test)
    assert accuracy == pytest.approx(meta["accuracy"], abs=1e-9)

    series = scalars(tmp_path / "logs" / "tiny")
    assert [step for step, _ in series["train/loss"]] == [1, 2, 3, 4]
    assert all(np.isfinite(v) and v > 0 for _, v in series["train/loss"])
    for step, lr in series["train/lr"]:  # the rate applied by the step-th update, 1-based
        assert lr == pytest.approx(applied_lr(0.1, step, 4, 1, "cosine"), rel=1e-6)
    assert series["train/lr"][0][1] == 0.0  # warmup 1: the first update applies lr_fn(0) = 0
    assert [step for step, _ in series["test/accuracy"]] == [2, 4]
    assert [step for step, _ in series["test/loss"]] == [2, 4]
    assert "test/top5" not in series  # 10 classes
    best = max(v for _, v in series["test/accuracy"])
    assert best == pytest.approx(meta["accuracy"], abs=1e-6)


def test_final_evaluation_always_runs(tmp_path: Path) -> None:
    train.main(tiny_args(tmp_path, num_steps=3, eval_every=100))
    assert [s for s, _ in scalars(tmp_path / "logs" / "tiny")["test/accuracy"]] == [3]


def test_imagefolder_end_to_end(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "pics", classes=("ant", "bee", "cow"))
    argv = tiny_args(
        tmp_path, dataset="imagefolder", data_dir=tmp_path / "pics", train_batch_size=4
    )
    train.main(argv)
    meta, state = load_checkpoint(tmp_path / "out", "tiny")
    assert meta["class_names"] == ["ant", "bee", "cow"]
    assert meta["num_classes"] == 3
    assert state["head.weight"].shape == (3, 16)


class PerImageAugment(loaders.SeededAugment):
    """Image folders' training preprocessing as it was: each image finished in the worker."""

    def __getitems__(self, indices: list[int]) -> list:
        return default_collate([self[index] for index in indices])


class PerImageResize(loaders.WithTransform):
    """Their test preprocessing as it was: each image resized in the worker."""

    def __getitems__(self, indices: list[int]) -> list | None:
        return loaders.skip_unreadable([self[index] for index in indices])


def test_imagefolder_trains_as_with_the_per_image_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Photos of many sizes, two workers across 3 epochs: the crops cut in the workers and
    resized on the device train to the weights and accuracies of the per-image path, to float
    tolerance (inputs within 1e-6 of each other; after 8 steps at a rate of 0.1 the weights
    differ by up to about 1e-5)."""
    make_photo_folder(tmp_path / "photos", n=8)
    flags = {
        "dataset": "imagefolder",
        "data_dir": tmp_path / "photos",
        "train_batch_size": 4,
        "holdout_fraction": 0.25,
        "learning_rate": 0.1,
        "num_steps": 8,
        "eval_every": 4,
    }
    train.main(tiny_args(tmp_path, "device", num_workers=2, **flags))
    with monkeypatch.context() as patch:
        patch.setattr(loaders, "DeviceAugment", PerImageAugment)
        patch.setattr(loaders, "DeviceResize", PerImageResize)
        train.main(tiny_args(tmp_path, "per_image", **flags))
    out = tmp_path / "out"
    (device_meta, device_best), (meta, best) = (
        load_checkpoint(out, n) for n in ("device", "per_image")
    )
    for key in ("step", "accuracy", "selected_by"):
        assert device_meta[key] == meta[key], key
    device_last, last = (
        safe_load(last_state_path(out, n))["model"] for n in ("device", "per_image")
    )
    for mine, theirs in ((device_best, best), (device_last, last)):
        for key, value in theirs.items():
            torch.testing.assert_close(mine[key], value, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_end_to_end_via_download(
    dataset: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with serve_cifar(dataset, monkeypatch, tmp_path):
        train.main(tiny_args(tmp_path, dataset=dataset, train_batch_size=4, num_steps=2))
    meta, _ = load_checkpoint(tmp_path / "out", "tiny")
    classes = 10 if dataset == "cifar10" else 100
    assert meta["num_classes"] == classes
    assert meta["dataset"] == dataset
    series = scalars(tmp_path / "logs" / "tiny")
    assert ("test/top5" in series) == (classes > 10)  # top-5 only with more than 10 classes


@pytest.mark.parametrize("dataset", ["digits", "imagefolder"])
def test_gradient_accumulation_is_the_big_batch(
    tmp_path: Path, no_dropout: str, dataset: str
) -> None:
    """1 x 8 and 2 x 4 (accumulation x micro-batch) give the same weights; 1 x 4 does not.

    The 16-image folder makes every run cross two epoch boundaries (2 steps per epoch).
    """
    common = {"model_type": no_dropout, "num_steps": 5, "eval_every": 0, "warmup_steps": 2}
    if dataset == "imagefolder":
        make_image_folder(tmp_path / "pics", classes=("a", "b"), n=8)
        common.update(dataset="imagefolder", data_dir=tmp_path / "pics", learning_rate=0.3)
    runs = {
        "big": {"train_batch_size": 8, "gradient_accumulation_steps": 1},
        "accumulated": {"train_batch_size": 8, "gradient_accumulation_steps": 2},
        "smaller": {"train_batch_size": 4, "gradient_accumulation_steps": 1},
    }
    states = {}
    for name, flags in runs.items():
        train.main(tiny_args(tmp_path, name=name, **common, **flags))
        states[name] = load_checkpoint(tmp_path / "out", name)[1]
    for key, value in states["big"].items():
        torch.testing.assert_close(states["accumulated"][key], value, atol=1e-6, rtol=0)
    differs = [
        not torch.allclose(states["smaller"][k], v, atol=1e-4) for k, v in states["big"].items()
    ]
    assert any(differs)
    # The logged loss is the mean over the micro-batches: the same as the big batch's loss.
    big = scalars(tmp_path / "logs" / "big")["train/loss"]
    accumulated = scalars(tmp_path / "logs" / "accumulated")["train/loss"]
    for (s1, v1), (s2, v2) in zip(big, accumulated, strict=True):
        assert s1 == s2
        assert v1 == pytest.approx(v2, abs=1e-5)


def test_pretrained_checkpoint_is_loaded(tmp_path: Path) -> None:
    config = get_config("testing")
    weights = fake_checkpoint(config, num_classes=21843 % 97, img_size=224)
    path = tmp_path / "testing.npz"
    np.savez(path, **weights)
    args = train.parse_args(tiny_args(tmp_path, pretrained_dir=path))
    weights, model_type = train.read_checkpoint(args)
    model = train.build_model(args, model_type, 10, weights)
    kernel = weights["embedding/kernel"]  # (16, 16, 3, D) HWIO
    torch.testing.assert_close(
        model.embeddings.patch_embed.weight, torch.from_numpy(kernel.transpose(3, 2, 0, 1))
    )
    assert model.embeddings.pos_embed.shape == (1, 1 + 2 * 2, config.hidden_size)  # 224 -> 32
    assert torch.count_nonzero(model.head.weight) == 0  # fine-tuning: head re-initialised
    assert torch.count_nonzero(model.head.bias) == 0


def test_missing_checkpoint_names_the_download_url(tmp_path: Path) -> None:
    argv = tiny_args(tmp_path, model_type="ViT-B_16", pretrained_dir=tmp_path / "ViT-B_16.npz")
    with pytest.raises(USER_ERRORS) as err:
        train.main(argv)
    assert "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz" in str(err.value)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"train_batch_size": 10, "gradient_accumulation_steps": 3}, "divide evenly"),
        ({"img_size": 40}, "not divisible by the 16x16 patches"),
        ({"dataset": "imagefolder", "data_dir": "/nonexistent/pics"}, "train/"),
    ],
)
def test_user_errors(tmp_path: Path, flags: dict, message: str) -> None:
    with pytest.raises(USER_ERRORS, match=message):
        train.main(tiny_args(tmp_path, **flags))


def test_cli_user_error_exits_2_without_traceback(tmp_path: Path) -> None:
    argv = tiny_args(tmp_path, train_batch_size=10, gradient_accumulation_steps=3)
    proc = subprocess.run(
        [sys.executable, "train.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --train_batch_size 10 is the total batch")
    assert "Traceback" not in proc.stderr


def test_original_flags_and_defaults() -> None:
    args = train.parse_args(["--name", "cifar10-100_500"])
    assert (args.dataset, args.model_type, args.pretrained_dir) == (
        "cifar10",
        None,  # the model of --pretrained_dir: ViT-B_16, as its name says
        "checkpoint/ViT-B_16.npz",
    )
    assert which_model(args.pretrained_dir, args.model_type) == "ViT-B_16"
    assert (args.output_dir, args.img_size, args.train_batch_size, args.eval_batch_size) == (
        "output",
        224,
        512,
        None,  # planned on CUDA, 64 without (utils.infra.memory.evaluation_batch_size)
    )
    assert (args.eval_every, args.learning_rate, args.weight_decay, args.num_steps) == (
        100,
        3e-2,
        0,
        10000,
    )
    assert (args.decay_type, args.warmup_steps, args.max_grad_norm, args.local_rank) == (
        "cosine",
        500,
        1.0,
        -1,
    )
    assert (args.seed, args.gradient_accumulation_steps, args.fp16) == (42, 1, False)
    assert (args.fp16_opt_level, args.loss_scale) == ("O2", 0)
    assert args.log_dir == os.path.join("logs", "cifar10-100_500")
    assert train.parse_args(["--name", "x", "--local-rank", "3"]).local_rank == 3
    assert train.parse_args(["--name", "x", "--local_rank", "2"]).local_rank == 2
    hybrid = train.parse_args(["--name", "x", "--model_type", "R50-ViT-B_16"])  # old spelling
    assert hybrid.model_type == "R50-ViT-B_16"


# --------------------------------------------------------------------------------------------
# Precision


@pytest.mark.parametrize(
    ("flags", "device", "want"),
    [
        ({}, "cuda", "fp32"),
        ({"fp16": True, "fp16_opt_level": "O0"}, "cuda", "fp32"),
        ({"fp16": True, "fp16_opt_level": "O1"}, "cuda", "fp16"),
        ({"fp16": True}, "cuda", "fp16"),  # O2 by default
        ({"fp16": True, "fp16_opt_level": "O3"}, "cuda", "fp16"),
        ({"precision": "bf16"}, "cuda", "bf16"),
        ({"fp16": True}, "cpu", "bf16"),  # no fp16 without CUDA
        ({"precision": "fp16"}, "cpu", "bf16"),
    ],
)
def test_precision_mapping(flags: dict, device: str, want: str, tmp_path: Path) -> None:
    args = train.parse_args(tiny_args(tmp_path, **flags))
    given = (args.precision, args.fp16, args.fp16_opt_level, args.loss_scale)
    assert resolve_precision(*given, device) == want


def test_conflicting_precision_flags(tmp_path: Path) -> None:
    args = train.parse_args(tiny_args(tmp_path, fp16=True, precision="bf16"))
    with pytest.raises(USER_ERRORS, match="only one"):
        resolve_precision(args.precision, args.fp16, args.fp16_opt_level, 0, "cuda")


def test_fp16_on_cpu_trains_in_bf16(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """--fp16 without CUDA: a warning, and the step's matrix products really run in bfloat16
    (seen by a hook on the model's layers during train.py's own step), without a grad scaler."""
    caplog.set_level(logging.INFO, logger="train")
    seen: set[torch.dtype] = set()
    original = train.make_trainer

    def make_trainer(args, model, info):
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
        return original(args, model, info)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "make_trainer", make_trainer)
        summary = train.main(tiny_args(tmp_path, fp16=True, num_steps=2, eval_every=0))
    assert any("bfloat16" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert any("bf16" in r.getMessage() for r in caplog.records if "Training" in r.getMessage())
    assert seen == {torch.bfloat16}
    meta, _ = load_checkpoint(tmp_path / "out", "tiny")
    assert meta["precision"] == "bf16"
    assert 0 <= summary.selected_test_accuracy <= 1


def test_loss_scalers() -> None:
    assert train.make_scaler("bf16", 0) is None
    assert train.make_scaler("fp32", 128) is None
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scaler = train.make_scaler("fp16", 128.0)  # static
    scaler.scale((weight * 2).sum()).backward()
    assert torch.equal(weight.grad, torch.full((3,), 256.0))
    scaler.unscale_(optimizer)
    assert torch.equal(weight.grad, torch.full((3,), 2.0))
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(weight.detach(), torch.full((3,), -1.0))
    weight.grad = torch.tensor([1.0, float("inf"), 0.0]) * 128
    scaler.unscale_(optimizer)
    scaler.step(optimizer)  # overflow: skipped
    assert torch.equal(weight.detach(), torch.full((3,), -1.0))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dynamic_scaler_on_cuda() -> None:
    """--loss_scale 0 on CUDA: the scale adapts, halving after an overflow whose step is skipped."""
    scaler = train.make_scaler("fp16", 0)
    weight = torch.nn.Parameter(torch.ones(3, device="cuda"))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scale = scaler.get_scale()
    scaler.scale((weight * float("inf")).sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(weight.detach(), torch.ones(3, device="cuda"))
    assert scaler.get_scale() == scale / 2


def test_set_tf32_sets_both_cuda_switches_and_leaves_the_cpu_alone(tf32_switches) -> None:
    cuda = torch.device("cuda")  # only a name: setting the switches needs no GPU
    for enabled in (True, False, True):
        assert set_tf32(enabled, cuda) is enabled
        assert torch.backends.cuda.matmul.allow_tf32 is enabled
        assert torch.backends.cudnn.allow_tf32 is enabled
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    assert set_tf32(True, torch.device("cpu")) is False  # the CPU has no TF32
    assert not torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.allow_tf32


def test_a_cpu_run_records_tf32_off_and_leaves_the_switches_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tf32_switches
) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    caplog.set_level(logging.INFO)
    train.main(tiny_args(tmp_path, num_steps=2, eval_every=0))  # --tf32 on, the default
    meta, _ = load_checkpoint(tmp_path / "out", "tiny")
    assert meta["tf32"] is False
    assert not torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.allow_tf32
    assert not [r for r in caplog.records if r.getMessage().startswith("TF32")]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tf32", ["on", "off"])
def test_a_cuda_run_computes_in_tf32_unless_told_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tf32_switches, tf32: str
) -> None:
    """--tf32 on (the default) or off: the switches train.py's step runs under, its log line,
    and the checkpoint's description."""
    caplog.set_level(logging.INFO)
    seen: list[tuple[bool, bool]] = []
    original = train.make_trainer

    def make_trainer(args, model, info):
        model.register_forward_hook(
            lambda *_: seen.append(
                (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            )
        )
        return original(args, model, info)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "make_trainer", make_trainer)
        train.main(tiny_args(tmp_path, num_steps=2, eval_every=0, tf32=tf32))
    enabled = tf32 == "on"
    assert seen
    assert set(seen) == {(enabled, enabled)}
    meta, _ = load_checkpoint(tmp_path / "out", "tiny")
    assert meta["tf32"] is enabled
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("TF32")]
    assert line.startswith(f"TF32: {tf32}")


@pytest.mark.slow
def test_compile_trains(tmp_path: Path, no_dropout: str) -> None:
    """--compile trains what the eager model trains: the same weights after two steps and the
    same test accuracy, saved under the bare model's keys."""
    flags = {"model_type": no_dropout, "num_steps": 2, "eval_every": 0, "learning_rate": 0.1}
    compiled = train.main(tiny_args(tmp_path / "compiled", compile=True, **flags))
    eager = train.main(tiny_args(tmp_path / "eager", **flags))
    _, state = load_checkpoint(tmp_path / "compiled" / "out", "tiny")
    _, want = load_checkpoint(tmp_path / "eager" / "out", "tiny")
    assert state.keys() == want.keys()  # no "_orig_mod." prefixes
    for key, value in want.items():
        torch.testing.assert_close(state[key], value, atol=1e-5, rtol=1e-4, msg=key)
    assert compiled.selected_test_accuracy == pytest.approx(eager.selected_test_accuracy, abs=0.01)


def test_micro_batches_reshuffle_every_epoch_and_count_globally() -> None:
    """set_epoch reaches the sampler: each epoch is a new permutation; counters run on."""
    data = torch.utils.data.TensorDataset(torch.arange(12))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler, drop_last=True)
    state = train.TrainState()
    stream = train.micro_batches(loader, state)
    epochs = [[next(stream)[0].tolist() for _ in range(3)] for _ in range(3)]
    orders = [[i for batch in batches for i in batch] for batches in epochs]
    assert all(sorted(order) == list(range(12)) for order in orders)  # each epoch sees all
    assert orders[0] != orders[1] != orders[2]
    next(stream)
    assert (state.epoch, state.batches_in_epoch) == (3, 1)


def _colour_folder(root: Path, swap_test: bool) -> None:
    """Dark images are class `a`, light ones `b` in train/; test/ swaps the labels when asked."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 20), ("test", 6)):
        for label, base in (("a", 40), ("b", 215)):
            folder = (
                root
                / split
                / (("b" if label == "a" else "a") if split == "test" and swap_test else label)
            )
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(base + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{label}{i}.png")


@pytest.mark.parametrize("holdout", [0.2, 0.0])
def test_best_checkpoint_is_selected_on_minival_not_test(tmp_path: Path, holdout: float) -> None:
    # The test labels are the opposite of the training ones: as the model learns, minival
    # accuracy rises and test accuracy falls. Selecting on minival must follow minival.
    _colour_folder(tmp_path / "data", swap_test=True)
    args = tiny_args(
        tmp_path,
        dataset="imagefolder",
        data_dir=tmp_path / "data",
        holdout_fraction=holdout,
        select="minival" if holdout else "test",  # with nothing held out the default is final
        num_steps=6,
        warmup_steps=3,
        eval_every=1,
        train_batch_size=8,
        learning_rate=0.1,
    )
    summary = train.main(args)
    logged = scalars(tmp_path / "logs" / "tiny")
    test = {step: round(value, 6) for step, value in logged["test/accuracy"]}  # float32 in logs
    meta, _ = load_checkpoint(tmp_path / "out", "tiny")
    assert meta["accuracy"] == summary.selected_test_accuracy
    assert round(meta["accuracy"], 6) == test[meta["step"]]
    assert meta["final_step"] == 6
    assert round(meta["final_test_accuracy"], 6) == test[6]
    if holdout:
        minival = {step: round(value, 6) for step, value in logged["minival/accuracy"]}
        assert meta["selected_by"] == "minival"
        assert meta["minival_accuracy"] == max(minival.values()) == 1.0
        loss = dict(logged["minival/loss"])  # ties of accuracy go to the lower loss
        assert meta["step"] == max(minival, key=lambda s: (minival[s], -loss[s]))
        assert test[meta["step"]] < max(test.values())  # the test set would have chosen otherwise
        assert round(meta["final_minival_accuracy"], 6) == minival[6]
    else:
        assert "minival/accuracy" not in logged
        assert meta["selected_by"] == "test"
        loss = dict(logged["test/loss"])
        assert meta["step"] == max(test, key=lambda s: (test[s], -loss[s]))


@pytest.mark.parametrize("holdout", [0.2, 0.0])
def test_select_final_keeps_the_last_step(
    tmp_path: Path, holdout: float, caplog: pytest.LogCaptureFixture
) -> None:
    """--select final (the default without minival): the checkpoint is the last step's model,
    written once, although minival (or test) was best earlier; its sidecar has the last
    evaluation's figures, losses included. No warning about selecting on the test set."""
    _colour_folder(tmp_path / "data", swap_test=True)
    flags = {"select": "final"} if holdout else {}
    args = tiny_args(
        tmp_path,
        dataset="imagefolder",
        data_dir=tmp_path / "data",
        holdout_fraction=holdout,
        num_steps=6,
        warmup_steps=3,
        eval_every=1,
        train_batch_size=8,
        learning_rate=0.1,
        **flags,
    )
    with caplog.at_level(logging.INFO, logger="train"):
        summary = train.main(args)
    assert "selected on the test set" not in caplog.text
    assert caplog.text.count("Saved the final model") == 1
    logged = scalars(tmp_path / "logs" / "tiny")
    meta, state = load_checkpoint(tmp_path / "out", "tiny")
    assert meta["selected_by"] == summary.selected_by == "final"
    assert meta["step"] == summary.selected_step == 6
    split = "minival" if holdout else "test"
    saved = {"accuracy": meta["minival_accuracy" if holdout else "accuracy"]}
    saved["loss"] = meta[f"{split}_loss"]
    for key, value in saved.items():
        assert value == pytest.approx(dict(logged[f"{split}/{key}"])[6], abs=1e-6)
    assert summary.selected_accuracy == saved["accuracy"]
    assert meta["accuracy"] == summary.final_test_accuracy == summary.selected_test_accuracy
    test = dict(logged["test/accuracy"])
    assert test[6] < max(test.values())  # the test set would have chosen an earlier step
    # The checkpoint is the model of the last training state, the step-6 model.
    last = safe_load(tmp_path / "out" / "tiny_last.pt")
    assert last["step"] == 6
    for key, value in last["model"].items():
        assert torch.equal(state[key], value), key


def test_select_minival_needs_a_minival(tmp_path: Path) -> None:
    argv = tiny_args(tmp_path, holdout_fraction=0, select="minival")
    with pytest.raises(USER_ERRORS, match="--select minival needs a minival split"):
        train.main(argv)


@pytest.mark.parametrize(
    ("file_name", "source"),
    [
        ("Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz", "its file name"),
        ("my_download.npz", "its shapes"),
    ],
)
def test_model_type_is_inferred_from_the_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, file_name: str, source: str
) -> None:
    path = tmp_path / file_name
    np.savez(path, **fake_checkpoint(get_config("ViT-Ti_16"), num_classes=5, img_size=32))
    argv = tiny_args(tmp_path, model_type=False, pretrained_dir=path, num_steps=1, eval_every=0)
    with caplog.at_level(logging.INFO):
        train.main(argv)
    meta, _ = load_checkpoint(tmp_path / "out", "tiny")
    assert meta["model_type"] == "ViT-Ti_16"
    assert f"{path} holds a ViT-Ti_16 model (inferred from {source})" in caplog.text


def test_augreg_checkpoints_are_fine_tuned_without_dropout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small stand-in for ViT-L_16, whose registry dropout is 0.1.
    monkeypatch.setitem(
        configs.CONFIGS,
        "ViT-L_16",
        get_config("testing").replace(name="ViT-L_16", dropout_rate=0.1),
    )
    augreg = "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1.npz"
    for pretrained, dropout in ((augreg, 0.0), ("ViT-L_16.npz", 0.1)):
        args = train.parse_args(tiny_args(tmp_path, model_type=False, pretrained_dir=pretrained))
        model_type = which_model(args.pretrained_dir, args.model_type)
        assert model_type == "ViT-L_16"
        assert train.build_model(args, model_type, 10).config.dropout_rate == dropout


def test_a_diverged_model_is_never_saved_as_best(tmp_path: Path) -> None:
    weights = fake_checkpoint(get_config("testing"), num_classes=10, img_size=32)
    weights["embedding/kernel"][0, 0, 0, 0] = np.nan  # every output is NaN
    path = tmp_path / "nan.npz"
    np.savez(path, **weights)
    argv = tiny_args(tmp_path, model_type="testing", pretrained_dir=path, eval_every=1)
    with pytest.raises(USER_ERRORS, match="diverged"):
        train.main(argv)
    assert not (tmp_path / "out" / "tiny_checkpoint.bin").exists()


def test_a_micro_batch_too_big_for_the_memory_stops_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a forward and backward pass needs is measured; the device is given a small budget."""
    argv = tiny_args(tmp_path, train_batch_size=64, num_steps=1, eval_every=0)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 400 * 2**10)  # 400 KiB left
    with pytest.raises(USER_ERRORS, match=r"--gradient_accumulation_steps (\d+)") as info:
        train.main(argv)
    steps = int(re.search(r"--gradient_accumulation_steps (\d+)", str(info.value)).group(1))
    assert 1 < steps <= 64
    assert not (tmp_path / "out" / "tiny_last.pt").exists()  # stopped before any work
    # The suggestion fits the same budget, and the run then trains.
    summary = train.main([*argv, "--gradient_accumulation_steps", str(steps)])
    assert summary.step == 1


@pytest.mark.parametrize(
    ("result", "best", "better"),
    [
        ({"accuracy": 0.6, "loss": 9.0}, (0.5, 0.1), True),  # higher accuracy wins, any loss
        ({"accuracy": 0.4, "loss": 0.0}, (0.5, 0.1), False),
        ({"accuracy": 0.5, "loss": 0.05}, (0.5, 0.1), True),  # a tie goes to the lower loss
        ({"accuracy": 0.5, "loss": 0.1}, (0.5, 0.1), False),  # a full tie keeps the earlier
        ({"accuracy": 0.5, "loss": 0.2}, (0.5, 0.1), False),
        ({"accuracy": 0.0, "loss": 5.0}, (-1.0, math.inf), True),  # the first evaluation
        ({"accuracy": 1.0, "loss": math.nan}, (-1.0, math.inf), False),  # never a diverged model
        ({"accuracy": 1.0, "loss": math.inf}, (0.0, 1.0), False),
        ({"accuracy": 0.6, "loss": 1e30}, (0.5, 0.1), True),  # finite, however absurd: measured
        ({"accuracy": 0.5, "loss": 1e30}, (0.5, 0.1), False),
    ],
)
def test_is_better(result: dict, best: tuple[float, float], better: bool) -> None:
    assert train.is_better(result, *best) is better
