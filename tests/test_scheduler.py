"""The learning-rate schedule: official values (1-based warmup, cosine, linear) and step order."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from utils.scheduler import lr_multiplier, make_scheduler

# total 10 steps, warmup 2: hand-computed from the official definition (`vit_jax/utils.py`).
COSINE = {1: 0.5, 2: 1.0, 4: 0.5 * (1 + math.cos(math.pi / 4)), 6: 0.5, 10: 0.0}
LINEAR = {1: 0.5, 2: 1.0, 4: 0.75, 6: 0.5, 10: 0.0}
# vit_jax's linear decay ends at the absolute rate linear_end = 1e-5: with base 0.1,
# lr = warmup(s) * (1e-5 + (0.1 - 1e-5) * (1 - progress)).
LINEAR_OFFICIAL_BASE_0_1 = {1: 0.05, 2: 0.1, 4: 0.0750025, 6: 0.050005, 10: 1e-5}


@pytest.mark.parametrize(("decay", "table"), [("cosine", COSINE), ("linear", LINEAR)])
def test_official_values(decay: str, table: dict[int, float]) -> None:
    for step, want in table.items():
        assert lr_multiplier(step, 10, 2, decay) == pytest.approx(want, abs=1e-12), step


def test_warmup_is_linear_from_step_one() -> None:
    values = [lr_multiplier(s, 1000, 500, "cosine") for s in range(1, 501)]
    assert values[0] == pytest.approx(1 / 500)  # the first update is not at lr 0
    assert values[-1] == pytest.approx(1.0)
    assert all(b > a for a, b in itertools.pairwise(values))


def test_linear_decay_ends_at_the_given_fraction() -> None:
    assert lr_multiplier(10, 10, 2, "linear", linear_end=0.01) == pytest.approx(0.01)
    assert lr_multiplier(6, 10, 2, "linear", linear_end=0.01) == pytest.approx(0.505)
    assert lr_multiplier(1, 10, 2, "linear", linear_end=0.01) == pytest.approx(0.5)  # warmup


def test_no_warmup_and_past_the_end() -> None:
    assert lr_multiplier(1, 10, 0, "linear") == pytest.approx(0.9)
    assert lr_multiplier(11, 10, 0, "cosine") == 0.0


def test_unknown_decay() -> None:
    with pytest.raises(ValueError, match="decay_type"):
        lr_multiplier(1, 10, 2, "step")


@pytest.mark.parametrize(
    ("decay", "table"),
    [("cosine", {k: 0.1 * v for k, v in COSINE.items()}), ("linear", LINEAR_OFFICIAL_BASE_0_1)],
)
def test_scheduler_gives_lr_k_to_the_kth_update(decay: str, table: dict[int, float]) -> None:
    """SGD without momentum: the k-th update moves a unit-gradient weight by exactly lr(k)."""
    weight = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = make_scheduler(optimizer, total_steps=10, warmup_steps=2, decay_type=decay)
    moved = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for k in range(1, 11):
            before = weight.item()
            weight.grad = torch.ones((), dtype=torch.float64)
            optimizer.step()
            scheduler.step()
            moved[k] = before - weight.item()
    for k, want in table.items():
        assert moved[k] == pytest.approx(want, abs=1e-12), k
