"""utils.infra.train_state: a saved state continues a run exactly; the wrong one is refused."""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from models.configs import get_config
from models.modeling import VisionTransformer
from models.npz import CheckpointError
from tests.helpers import damage, distinct_model, tiny_args
from utils.infra.dist_utils import DistInfo
from utils.infra.errors import UserError
from utils.infra.file_io import atomic_save, safe_load, with_content_sha256
from utils.infra.loading import read_state_dict
from utils.infra.train_state import (
    TrainState,
    get_rng_state,
    last_state_path,
    load_training_state,
    resolve_resume,
    save_training_state,
    set_rng_state,
)
from utils.recipe.amp import LossScaler
from utils.recipe.optim import make_optimizer, make_scheduler

TESTING = get_config("testing")


def _training_objects(seed: int, num_classes: int = 5):
    torch.manual_seed(seed)
    model = VisionTransformer(TESTING, 32, num_classes)  # dropout 0.1: draws from the torch RNG
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = make_scheduler(optimizer, total_steps=8, warmup_steps=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    return model, optimizer, scheduler, scaler


def _train_steps(model, optimizer, scheduler, steps: int) -> None:
    model.train()
    for _ in range(steps):
        # Data from all three RNGs, so each one must be restored for an exact resume.
        noise = np.random.standard_normal((4, 3, 32, 32)).astype(np.float32)
        x = torch.randn(4, 3, 32, 32) + torch.from_numpy(noise) * random.random()
        labels = torch.randint(0, 5, (4,))
        loss = model(x, labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_n_steps_equal_half_then_resume_half(tmp_path) -> None:
    _seed_all(0)
    straight = _training_objects(0)
    _seed_all(1)
    _train_steps(*straight[:3], steps=6)

    _seed_all(0)
    first = _training_objects(0)
    _seed_all(1)
    _train_steps(*first[:3], steps=3)
    path = last_state_path(tmp_path, "run")
    args = argparse.Namespace(name="run", output_dir=tmp_path, lr=0.1, milestones=(1, 2))
    save_training_state(
        path,
        model=first[0],
        optimizer=first[1],
        scaler=first[3],
        state=TrainState(step=3, best_accuracy=0.25, epoch=1, batches_in_epoch=7),
        args=args,
    )

    _seed_all(99)  # a new process: other seeds, fresh objects
    resumed = _training_objects(5)
    state = load_training_state(path, model=resumed[0], optimizer=resumed[1], scaler=resumed[3])
    # The schedule is rebuilt at the saved step, as train.py does.
    resumed = (*resumed[:2], make_scheduler(resumed[1], 8, 2, count=state.step), resumed[3])
    assert (state.step, state.best_accuracy, state.epoch, state.batches_in_epoch) == (
        3,
        0.25,
        1,
        7,
    )
    assert state.args == {
        "name": "run",
        "output_dir": str(tmp_path),
        "lr": 0.1,
        "milestones": [1, 2],
    }
    assert resumed[2].last_epoch == 3
    assert resumed[3].get_scale() == 256.0
    _train_steps(*resumed[:3], steps=3)
    for key, value in straight[0].state_dict().items():
        assert torch.equal(resumed[0].state_dict()[key], value), key


def test_state_of_a_wrapped_model_loads_into_a_bare_one(tmp_path) -> None:
    model, optimizer, _, _ = _training_objects(0)
    wrapped = torch.nn.Module()
    wrapped.module = model  # as DistributedDataParallel holds it
    path = tmp_path / "s.pt"
    save_training_state(
        path,
        model=wrapped,
        optimizer=optimizer,
        scaler=object(),  # a fixed-scale scaler has no state to save
        state=TrainState(step=1, best_accuracy=0.0, epoch=0, batches_in_epoch=1),
        args={},
    )
    assert all(not k.startswith("module.") for k in read_state_dict(path))
    load_training_state(path, model=_training_objects(1)[0])


def _loss_scaler(kind: str, init_scale: float) -> torch.amp.GradScaler | LossScaler:
    if kind == "torch":
        return torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=3)
    return LossScaler(init_scale, growth_interval=3, device="cpu")


def _scaled_steps(scaler: torch.amp.GradScaler | LossScaler, factors: list[float]) -> list[dict]:
    """fp16 steps of `scaler` on a weight of its own (a factor of inf overflows); its state
    after each."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = make_optimizer([weight], 0.1, "float32")
    states = []
    for factor in factors:
        scaler.scale((weight * factor).sum()).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        states.append(scaler.state_dict())
    return states


@pytest.mark.parametrize(("saved_by", "resumed_by"), [("torch", "ours"), ("ours", "torch")])
def test_a_dynamic_loss_scale_resumes_across_torchs_grad_scaler_and_ours(
    tmp_path: Path, saved_by: str, resumed_by: str
) -> None:
    """A training state saved with torch.amp.GradScaler (as train.py saved it before
    LossScaler) resumes into a LossScaler, and the reverse: from there the scale and its growth
    tracker go on as the saving scaler's own do, through a growth and an overflow."""
    model, optimizer, _, _ = _training_objects(0)
    saved = _loss_scaler(saved_by, 256.0)
    _scaled_steps(saved, [1.0, math.inf, 1.0, 1.0])
    assert saved.state_dict()["_growth_tracker"] == 2  # two clean steps since the overflow
    path = tmp_path / "s.pt"
    save_training_state(
        path,
        model=model,
        optimizer=optimizer,
        scaler=saved,
        state=TrainState(step=4, best_accuracy=0.0, epoch=0, batches_in_epoch=4),
        args={},
    )
    resumed = _loss_scaler(resumed_by, 2.0**16)
    load_training_state(path, model=model, scaler=resumed)
    assert resumed.state_dict() == saved.state_dict()
    factors = [1.0, 1.0, math.inf, 1.0]  # grows at the first, backs off at the third
    want = _scaled_steps(saved, factors)
    assert [state["scale"] for state in want] == [256.0, 256.0, 128.0, 128.0]
    assert _scaled_steps(resumed, factors) == want


def _save_state(path: Path, model: VisionTransformer) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_training_state(
        path,
        model=model,
        optimizer=optimizer,
        scaler=None,
        state=TrainState(step=2, best_accuracy=0.5, epoch=0, batches_in_epoch=2),
        args={"model_type": model.config.name},
    )


def test_resume_with_another_model_is_refused(tmp_path) -> None:
    path = tmp_path / "run_last.pt"
    _save_state(
        path, distinct_model(TESTING.replace(name="testing-wide", hidden_size=32, mlp_dim=64))
    )
    with pytest.raises(UserError, match="trained with --model_type testing-wide, not testing"):
        load_training_state(path, model=distinct_model())
    with pytest.raises(CheckpointError, match="holds a testing-wide model, not testing"):
        read_state_dict(path, model_type="testing")
    _save_state(path, distinct_model(img_size=48))
    with pytest.raises(UserError, match="trained at --img_size 48"):
        load_training_state(path, model=distinct_model(img_size=32))
    _save_state(path, distinct_model(num_classes=10))
    with pytest.raises(UserError, match="it has 10 classes, the model 5"):
        load_training_state(path, model=distinct_model(num_classes=5))


def test_a_damaged_state_is_refused_by_resume_and_by_the_loaders(tmp_path) -> None:
    path = tmp_path / "run_last.pt"
    _save_state(path, distinct_model())
    assert load_training_state(path, model=distinct_model(seed=1)).step == 2  # intact: loads
    damage(path)
    for load in (
        lambda: load_training_state(path, model=distinct_model()),
        lambda: read_state_dict(path),  # what eval.py, predict.py and export.py read
    ):
        with pytest.raises(CheckpointError, match=r"run_last\.pt is damaged"):
            load()


def test_resume_of_a_best_checkpoint_is_explained(tmp_path) -> None:
    path = tmp_path / "run_checkpoint.bin"
    torch.save(distinct_model().state_dict(), path)
    with pytest.raises(UserError, match="not a training state"):
        load_training_state(path, model=distinct_model())


def test_resolve_resume(tmp_path) -> None:
    with pytest.raises(UserError, match=r"Cannot resume: .*run_last\.pt does not exist"):
        resolve_resume("auto", tmp_path, "run")
    (tmp_path / "other_last.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"Saved states in .*: other_last\.pt"):
        resolve_resume("auto", tmp_path, "run")
    (tmp_path / "run_last.pt").write_bytes(b"")
    assert resolve_resume("auto", tmp_path, "run") == tmp_path / "run_last.pt"
    assert resolve_resume(str(tmp_path / "other_last.pt"), "x", "y").name == "other_last.pt"


def test_rng_state_round_trip_under_weights_only(tmp_path) -> None:
    _seed_all(3)
    path = tmp_path / "rng.pt"
    atomic_save(get_rng_state(), path)
    expected = (random.random(), np.random.standard_normal(3), torch.rand(3))
    _seed_all(4)
    set_rng_state(safe_load(path))
    got = (random.random(), np.random.standard_normal(3), torch.rand(3))
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2])


# --------------------------------------------------------------------------------------------
# The resume contract with the real loop


def _digits_loader(generator: torch.Generator | None):
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    from utils.data.loaders import DigitsDataset, SeededAugment, build_transforms

    base = Subset(DigitsDataset(train=True), range(16))
    data = SeededAugment(base, build_transforms(32, train=True, flip=False), seed=7)
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=7)
    return DataLoader(data, batch_size=8, sampler=sampler, drop_last=True, generator=generator)


def _trainer(seed: int, tmp_path: Path) -> train.Trainer:
    """train.py's own optimizer, schedule and wrappers around a fresh model (dropout 0.1)."""
    args = train.parse_args(tiny_args(tmp_path, num_steps=8, warmup_steps=2, learning_rate=0.1))
    torch.manual_seed(seed)
    return train.make_trainer(args, VisionTransformer(TESTING, 32, 10), DistInfo()), args


def _run(loader, trainer, args, state: TrainState, stop_at: int) -> None:
    """train.py's loop pieces: its micro-batch stream and its optimizer step, until `stop_at`."""
    stream = train.micro_batches(loader, state, skip=state.batches_in_epoch)
    while state.step < stop_at:
        state.step += 1
        train.train_step(args, trainer, [next(stream)], None, state.step, DistInfo())


@pytest.mark.slow
def test_resume_mid_epoch_with_real_loader(tmp_path) -> None:
    # 16 images, 8 per batch: 2 batches per epoch. Stop after 3 steps = epoch 1, batch 1.
    _seed_all(0)
    straight, args = _trainer(0, tmp_path)
    _run(_digits_loader(torch.Generator()), straight, args, TrainState(), stop_at=5)

    _seed_all(0)
    first, _ = _trainer(0, tmp_path)
    position = TrainState()
    _run(_digits_loader(torch.Generator()), first, args, position, stop_at=3)
    assert (position.step, position.epoch, position.batches_in_epoch) == (3, 1, 1)
    path = tmp_path / "run_last.pt"
    save_training_state(
        path,
        model=first.model,
        optimizer=first.optimizer,
        scaler=None,
        state=position,
        args=args,
    )

    _seed_all(123)
    resumed, _ = _trainer(9, tmp_path)
    loader = _digits_loader(torch.Generator())
    state = load_training_state(path, model=resumed.model, optimizer=resumed.optimizer)
    resumed.scheduler = make_scheduler(resumed.optimizer, 8, 2, count=state.step)
    _run(loader, resumed, args, state, stop_at=5)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_a_state_remembers_its_split_and_refuses_another(tmp_path) -> None:
    split = {"holdout_fraction": 0.02, "train_images": 98, "minival_images": 2}
    model, optimizer, _, _ = _training_objects(0)
    path = tmp_path / "s.pt"
    save_training_state(path, model=model, optimizer=optimizer, scaler=None,
                        state=TrainState(step=2, split=split, precision="bf16"),
                        args={"holdout_fraction": 0.02})  # fmt: skip
    state = load_training_state(path, model=_training_objects(1)[0], split=split)
    assert (state.split, state.precision) == (split, "bf16")
    for other in [{**split, "holdout_fraction": 0.1}, {**split, "train_images": 97}]:
        with pytest.raises(UserError) as info:
            load_training_state(path, model=_training_objects(1)[0], split=other)
        message = str(info.value)
        assert "--holdout_fraction 0.02 (98 training / 2 minival images)" in message
        assert f"this command with --holdout_fraction {other['holdout_fraction']} (" in message
    # A state written before the split was kept: its --holdout_fraction still decides.
    older = safe_load(path)
    del older["split"], older["precision"]
    atomic_save(with_content_sha256(older), path)
    state = load_training_state(path, model=_training_objects(1)[0], split=split)
    assert (state.split, state.precision) == ({}, None)
    with pytest.raises(
        UserError, match=r"split its training images with --holdout_fraction 0\.02, "
    ):
        load_training_state(path, model=_training_objects(1)[0], split={**split,
                            "holdout_fraction": 0.0})  # fmt: skip
