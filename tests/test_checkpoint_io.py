"""utils.checkpoint_io: atomic writes, safe loads, exact resume, signals, divergence guard."""

from __future__ import annotations

import argparse
import errno
import itertools
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import CheckpointError, save_npz, state_dict_to_npz
from models.configs import get_config
from models.modeling import VisionTransformer
from utils import atomic_io
from utils import checkpoint_io as cio
from utils.errors import UserError
from utils.optim import make_scheduler

ROOT = Path(__file__).resolve().parents[1]
TESTING = get_config("testing")


# --------------------------------------------------------------------------------------------
# Atomic writes


class _FullDisk:
    """A file that accepts `limit` bytes, then fails like a full disk."""

    def __init__(self, path: str, limit: int):
        self.handle = open(path, "wb")  # noqa: SIM115 - closed in __exit__
        self.limit = limit

    def write(self, data) -> int:
        if self.handle.tell() + len(data) > self.limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def test_atomic_save_round_trip_leaves_no_temp_file(tmp_path) -> None:
    path = tmp_path / "sub" / "x.pt"
    cio.atomic_save({"w": torch.arange(5)}, path)
    assert torch.equal(cio.safe_load(path)["w"], torch.arange(5))
    assert os.listdir(path.parent) == ["x.pt"]


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where) -> None:
    path = tmp_path / "run_last.pt"
    cio.atomic_save({"w": torch.zeros(10)}, path)
    if where == "write":
        monkeypatch.setattr(atomic_io, "_open_temp", lambda p: _FullDisk(p, limit=2000))
    else:

        def fsync(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(cio.os, "fsync", fsync)
    with pytest.raises(UserError, match="No space left") as info:
        cio.atomic_save({"w": torch.ones(100_000)}, path)
    message = str(info.value)
    assert str(path) in message
    assert "previous file there is unchanged" in message
    assert "--output_dir" in message
    monkeypatch.undo()
    assert torch.equal(cio.safe_load(path)["w"], torch.zeros(10))
    assert os.listdir(tmp_path) == ["run_last.pt"]


def test_other_write_errors_propagate_and_keep_the_previous_file(tmp_path) -> None:
    path = tmp_path / "x.pt"
    cio.atomic_write_text(path, "old")
    with pytest.raises(AttributeError):
        cio.atomic_save({"f": lambda: 0}, path)  # a lambda cannot be pickled
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.pt"]


@pytest.mark.slow
def test_kill_9_during_saves_never_leaves_a_torn_file(tmp_path) -> None:
    path = tmp_path / "state.pt"
    child = textwrap.dedent(
        f"""
        import sys, torch
        from utils.checkpoint_io import atomic_save
        i = 0
        while True:
            atomic_save({{"i": i, "w": torch.full((1_000_000,), float(i))}}, {str(path)!r})
            print(i, flush=True)
            i += 1
        """
    )
    for delay in (0.07, 0.31):
        proc = subprocess.Popen(
            [sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "0"  # one complete save exists
        time.sleep(delay)  # then kill at some instant of a later save
        proc.kill()
        proc.wait()
        proc.stdout.close()
        state = cio.safe_load(path)
        assert torch.equal(state["w"], torch.full((1_000_000,), float(state["i"])))


def test_text_sidecar(tmp_path) -> None:
    ckpt = tmp_path / "run_checkpoint.bin"
    assert cio.read_sidecar(ckpt) == {}
    cio.write_sidecar(ckpt, model_type="testing", img_size=32, class_names=["a", "b"])
    assert cio.sidecar_path(ckpt) == tmp_path / "run_checkpoint.json"
    assert cio.read_sidecar(ckpt)["class_names"] == ["a", "b"]
    cio.sidecar_path(ckpt).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        cio.read_sidecar(ckpt)


# --------------------------------------------------------------------------------------------
# Safe loading


class _Exploit:
    """Unpickling this would create a file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_safe_load_refuses_pickled_code(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(1), "x": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match=r"\(getattr, .*could run code, so it is refused"):
        cio.safe_load(path)
    assert not marker.exists()
    torch.save({"args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError, match=r"\(argparse\.Namespace, e\.g\. a whole model"):
        cio.safe_load(path)


def test_safe_load_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"missing\.bin does not exist"):
        cio.safe_load(tmp_path / "missing.bin")
    with pytest.raises(CheckpointError, match="is a directory"):
        cio.safe_load(tmp_path)
    good = tmp_path / "good.bin"
    torch.save({"w": torch.zeros(1000)}, good)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good.read_bytes()[:1500])
    with pytest.raises(CheckpointError, match="truncated, corrupt or another kind"):
        cio.safe_load(truncated)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world" * 10)
    with pytest.raises(CheckpointError, match="truncated, corrupt or another kind"):
        cio.safe_load(junk)
    npz = tmp_path / "weights.bin"
    np.savez(npz.open("wb"), a=np.zeros(3))
    with pytest.raises(CheckpointError, match=r"NumPy \.npz checkpoint"):
        cio.safe_load(npz)


# --------------------------------------------------------------------------------------------
# Model weights


def _model(config=TESTING, img_size=32, num_classes=5, seed=0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(config, img_size, num_classes)
    with torch.no_grad():
        model.head.weight.normal_()  # a non-zero head, so outputs differ between models
    return model


def test_bin_with_wrapper_prefixes_loads(tmp_path) -> None:
    source, target = _model(seed=0), _model(seed=1)
    path = tmp_path / "run_checkpoint.bin"
    torch.save({f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}, path)
    cio.load_weights_into(target, path)
    x = torch.randn(2, 3, 32, 32)
    source.eval(), target.eval()
    with torch.no_grad():
        assert torch.equal(source(x)[0], target(x)[0])


def test_npz_with_head_loads(tmp_path) -> None:
    source, target = _model(seed=0), _model(seed=1)
    path = tmp_path / "official.npz"
    save_npz(path, state_dict_to_npz(source.state_dict(), TESTING))
    cio.load_weights_into(target, path)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)


def test_checkpoint_of_another_model_names_keys_and_shapes(tmp_path) -> None:
    other = TESTING.replace(hidden_size=32, mlp_dim=64)
    path = tmp_path / "other.bin"
    torch.save(_model(other).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        cio.load_weights_into(_model(), path)
    message = str(info.value)
    assert "does not fit model testing" in message
    assert "embeddings.cls_token: checkpoint (1, 1, 32) vs model (1, 1, 16)" in message
    assert "Check --model_type" in message


def test_other_class_count_and_image_size_are_explained(tmp_path) -> None:
    path = tmp_path / "ten.bin"
    torch.save(_model(num_classes=10).state_dict(), path)
    with pytest.raises(
        CheckpointError, match=r"head\.weight: checkpoint .* Its head has 10 classes"
    ):
        cio.load_weights_into(_model(num_classes=5), path)
    torch.save(_model(img_size=48).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"pos_embed.*--img_size"):
        cio.load_weights_into(_model(img_size=32), path)


def test_load_model_weights_rejects_non_state_dicts(tmp_path) -> None:
    path = tmp_path / "list.bin"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        cio.load_model_weights(path)


# --------------------------------------------------------------------------------------------
# Training state and exact resume


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
    path = cio.last_state_path(tmp_path, "run")
    args = argparse.Namespace(name="run", output_dir=tmp_path, lr=0.1, milestones=(1, 2))
    cio.save_training_state(
        path,
        model=first[0],
        optimizer=first[1],
        scheduler=first[2],
        scaler=first[3],
        step=3,
        best_accuracy=0.25,
        epoch=1,
        batches_in_epoch=7,
        args=args,
    )

    _seed_all(99)  # a new process: other seeds, fresh objects
    resumed = _training_objects(5)
    state = cio.load_training_state(
        path, model=resumed[0], optimizer=resumed[1], scheduler=resumed[2], scaler=resumed[3]
    )
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
    cio.save_training_state(
        path,
        model=wrapped,
        optimizer=optimizer,
        scheduler=None,
        scaler=object(),  # a fixed-scale scaler has no state to save
        step=1,
        best_accuracy=0.0,
        epoch=0,
        batches_in_epoch=1,
        args={},
    )
    assert all(not k.startswith("module.") for k in cio.load_model_weights(path))
    cio.load_training_state(path, model=_training_objects(1)[0], restore_rng=False)


def _save_state(path: Path, model: VisionTransformer) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cio.save_training_state(
        path,
        model=model,
        optimizer=optimizer,
        scheduler=None,
        scaler=None,
        step=2,
        best_accuracy=0.5,
        epoch=0,
        batches_in_epoch=2,
        args={"model_type": model.config.name},
    )


def test_resume_with_another_model_is_refused(tmp_path) -> None:
    path = tmp_path / "run_last.pt"
    _save_state(path, _model(TESTING.replace(name="testing-wide", hidden_size=32, mlp_dim=64)))
    with pytest.raises(UserError, match="trained with --model_type testing-wide, not testing"):
        cio.load_training_state(path, model=_model())
    with pytest.raises(CheckpointError, match="holds a testing-wide model, not testing"):
        cio.load_model_weights(path, model_type="testing")
    _save_state(path, _model(img_size=48))
    with pytest.raises(UserError, match="trained at --img_size 48"):
        cio.load_training_state(path, model=_model(img_size=32))
    _save_state(path, _model(num_classes=10))
    with pytest.raises(UserError, match="it has 10 classes, the model 5"):
        cio.load_training_state(path, model=_model(num_classes=5))


def test_resume_of_a_best_checkpoint_is_explained(tmp_path) -> None:
    path = tmp_path / "run_checkpoint.bin"
    torch.save(_model().state_dict(), path)
    with pytest.raises(UserError, match="not a training state"):
        cio.load_training_state(path, model=_model())


def test_resolve_resume(tmp_path) -> None:
    with pytest.raises(UserError, match=r"Cannot resume: .*run_last\.pt does not exist"):
        cio.resolve_resume("auto", tmp_path, "run")
    (tmp_path / "other_last.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"Saved states in .*: other_last\.pt"):
        cio.resolve_resume("auto", tmp_path, "run")
    (tmp_path / "run_last.pt").write_bytes(b"")
    assert cio.resolve_resume("auto", tmp_path, "run") == tmp_path / "run_last.pt"
    assert cio.resolve_resume(str(tmp_path / "other_last.pt"), "x", "y").name == "other_last.pt"


def test_rng_state_round_trip_under_weights_only(tmp_path) -> None:
    _seed_all(3)
    path = tmp_path / "rng.pt"
    cio.atomic_save(cio.get_rng_state(), path)
    expected = (random.random(), np.random.standard_normal(3), torch.rand(3))
    _seed_all(4)
    cio.set_rng_state(cio.safe_load(path))
    got = (random.random(), np.random.standard_normal(3), torch.rand(3))
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2])


# --------------------------------------------------------------------------------------------
# Stopping


def test_graceful_exit_turns_signals_into_a_flag() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    with cio.GracefulExit() as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested
        assert stop.signal_name == "SIGTERM"
        assert stop.should_stop()
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl+C stops at once
            stop._handle(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_non_finite_guard() -> None:
    guard = cio.NonFiniteGuard(patience=3)
    assert guard.check(torch.tensor(1.0), step=1)
    assert not guard.check(float("nan"), step=2)
    assert not guard.check(torch.tensor(float("inf")), step=3)
    assert guard.check(0.5, step=4)  # a finite loss resets the count
    assert not guard.check(float("nan"), step=5)
    assert not guard.check(float("nan"), step=6)
    with pytest.raises(cio.NonFiniteLossError, match=r"3 consecutive steps.*not overwritten"):
        guard.check(float("nan"), step=7)
    assert issubclass(cio.NonFiniteLossError, UserError)


# --------------------------------------------------------------------------------------------
# The resume contract with real loaders: the order of epoch e comes from (seed, e), the saved
# position is (epoch, batches consumed in it), augmentation is seeded per image, and the loader
# has its own generator (iter(loader) then draws nothing from the global torch RNG).


def _digits_loader(generator: torch.Generator | None):
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    from utils.data_utils import DigitsDataset, SeededAugment, build_transforms

    base = Subset(DigitsDataset(train=True), range(16))
    data = SeededAugment(base, build_transforms(32, train=True, flip=False), seed=7)
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=7)
    return DataLoader(data, batch_size=8, sampler=sampler, drop_last=True, generator=generator)


def _run(loader, objects, position: tuple[int, int], stop_at: int, step: int) -> tuple:
    """The loop train.py follows: returns (step, epoch, batches_in_epoch) when it stops."""
    model, optimizer, scheduler = objects[:3]
    epoch, skip = position
    model.train()
    while True:
        loader.sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        consumed = skip
        for images, labels in itertools.islice(loader, skip, None):
            consumed += 1
            loss = model(images, labels)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == stop_at:
                return step, epoch, consumed
        epoch, skip = epoch + 1, 0


@pytest.mark.slow
def test_resume_mid_epoch_with_real_loader(tmp_path) -> None:
    # 16 images, 8 per batch: 2 batches per epoch. Stop after 3 steps = epoch 1, batch 1.
    _seed_all(0)
    straight = _training_objects(0, 10)
    _run(_digits_loader(torch.Generator()), straight, (0, 0), stop_at=5, step=0)

    _seed_all(0)
    first = _training_objects(0, 10)
    step, epoch, consumed = _run(_digits_loader(torch.Generator()), first, (0, 0), 3, 0)
    assert (step, epoch, consumed) == (3, 1, 1)
    path = tmp_path / "run_last.pt"
    cio.save_training_state(
        path,
        model=first[0],
        optimizer=first[1],
        scheduler=first[2],
        scaler=None,
        step=step,
        best_accuracy=0.0,
        epoch=epoch,
        batches_in_epoch=consumed,
        args={},
    )

    _seed_all(123)
    resumed = _training_objects(9, 10)
    loader = _digits_loader(torch.Generator())
    state = cio.load_training_state(
        path, model=resumed[0], optimizer=resumed[1], scheduler=resumed[2]
    )
    _run(loader, resumed, (state.epoch, state.batches_in_epoch), stop_at=5, step=state.step)
    for key, value in straight[0].state_dict().items():
        assert torch.equal(resumed[0].state_dict()[key], value), key


def test_a_save_removes_temp_files_of_writers_that_died(tmp_path) -> None:
    path = tmp_path / "run_last.pt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs, like a writer killed with -9 mid-save
    orphan = tmp_path / f"run_last.pt.tmp{dead.pid}"
    orphan.write_bytes(b"half a checkpoint")
    alive = tmp_path / f"run_last.pt.tmp{os.getppid()}"  # a writer still at work: kept
    alive.write_bytes(b"in progress")
    other = tmp_path / "other.pt.tmp1"  # another file's temp: not ours to judge
    other.write_bytes(b"x")
    cio.atomic_save({"step": 1}, path)
    assert not orphan.exists()
    assert alive.exists()
    assert other.exists()
    assert cio.safe_load(path) == {"step": 1}
