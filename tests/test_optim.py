"""The update rule: official schedule values, optax's count, bfloat16 momentum, and resuming.

The oracle is optax itself, run under `jax.jit` on the CPU with vit_jax's chain
(`optax.clip_by_global_norm(1.0)`, then `optax.sgd(lr_fn, momentum=0.9, accumulator_dtype=...)`)
and a vit_jax-style `lr_fn` written here from the recipe. It runs in a separate, spawned
process (the `optax` fixture): jax starts threads, and the test process forks DataLoader workers
and subprocesses, which must never inherit them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import io
import itertools
import logging
import math
import multiprocessing
import os
import warnings

import numpy as np
import pytest
import torch

import train
from models.configs import get_config
from models.modeling import VisionTransformer
from tests.helpers import HostReads, tiny_args
from utils.infra.dist_utils import DistInfo
from utils.recipe.amp import LossScaler
from utils.recipe.optim import OptimizerStateError, SGDMomentum, make_optimizer, make_scheduler
from utils.recipe.update_rule import LINEAR_END, OPTIM_DTYPES, applied_lr, lr_multiplier

# total 10 steps, warmup 2: vit_jax's lr_fn(s) / base, hand-computed from its definition.
COSINE = {1: 0.5, 2: 1.0, 4: 0.5 * (1 + math.cos(math.pi / 4)), 6: 0.5, 10: 0.0}
LINEAR = {1: 0.5, 2: 1.0, 4: 0.75, 6: 0.5, 10: 0.0}
# vit_jax's linear decay ends at the absolute rate linear_end = 1e-5: with base 0.1,
# lr = warmup(s) * (1e-5 + (0.1 - 1e-5) * (1 - progress)).
LINEAR_OFFICIAL_BASE_0_1 = {1: 0.05, 2: 0.1, 4: 0.0750025, 6: 0.050005, 10: 1e-5}

# The oracle runs: 12 updates crossing a 3-step warmup and the decay to its end.
BASE, TOTAL, WARMUP = 0.1, 12, 3
SHAPES = [(4, 3), (5,), (2, 3, 2), (7,)]
# Gradient scales per update: the global norm of 36 N(0, 1) values is ~6, so scales >= 0.5 are
# clipped and the small ones are not.
SCALES = [0.05, 1.0, 0.1, 2.0, 0.5, 0.08, 3.0, 0.12, 1.0, 0.03, 0.6, 0.1]


# --------------------------------------------------------------------------------------------
# Schedule values


@pytest.mark.parametrize(("decay", "table"), [("cosine", COSINE), ("linear", LINEAR)])
def test_official_values(decay: str, table: dict[int, float]) -> None:
    for step, want in table.items():
        assert lr_multiplier(step, 10, 2, decay) == pytest.approx(want, abs=1e-12), step


def test_warmup_is_linear_from_zero() -> None:
    assert lr_multiplier(0, 1000, 500, "cosine") == 0.0  # optax's first update, count 0
    values = [lr_multiplier(s, 1000, 500, "cosine") for s in range(1, 501)]
    assert values[0] == pytest.approx(1 / 500)
    assert values[-1] == pytest.approx(1.0)
    assert all(b > a for a, b in itertools.pairwise(values))


def test_linear_decay_ends_at_the_given_fraction() -> None:
    assert lr_multiplier(10, 10, 2, "linear", linear_end=0.01) == pytest.approx(0.01)
    assert lr_multiplier(6, 10, 2, "linear", linear_end=0.01) == pytest.approx(0.505)
    assert lr_multiplier(1, 10, 2, "linear", linear_end=0.01) == pytest.approx(0.5)  # warmup


def test_no_warmup_and_past_the_end() -> None:
    assert lr_multiplier(0, 10, 0, "linear") == pytest.approx(1.0)
    assert lr_multiplier(1, 10, 0, "linear") == pytest.approx(0.9)
    assert lr_multiplier(11, 10, 0, "cosine") == 0.0


def test_unknown_decay() -> None:
    with pytest.raises(ValueError, match="decay_type"):
        lr_multiplier(1, 10, 2, "step")


@pytest.mark.parametrize(
    ("decay", "table"),
    [("cosine", {k: 0.1 * v for k, v in COSINE.items()}), ("linear", LINEAR_OFFICIAL_BASE_0_1)],
)
def test_scheduler_gives_lr_fn_k_minus_1_to_the_kth_update(
    decay: str, table: dict[int, float]
) -> None:
    """SGD without momentum: the k-th update moves a unit-gradient weight by lr_fn(k - 1).

    The rate read with `get_last_lr()` before the update is the one it applies (`applied_lr`).
    """
    weight = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = make_scheduler(optimizer, total_steps=10, warmup_steps=2, decay_type=decay)
    moved, read = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for k in range(1, 12):
            before = weight.item()
            read[k] = scheduler.get_last_lr()[0]
            weight.grad = torch.ones((), dtype=torch.float64)
            optimizer.step()
            scheduler.step()
            moved[k] = before - weight.item()
    assert moved[1] == 0.0  # lr_fn(0) = 0 with warmup
    for s, want in table.items():
        assert moved[s + 1] == pytest.approx(want, abs=1e-12), s
    for k in moved:
        assert read[k] == pytest.approx(moved[k], abs=1e-12)
        assert applied_lr(0.1, k, 10, 2, decay) == pytest.approx(moved[k], abs=1e-12)


# --------------------------------------------------------------------------------------------
# The optax oracle


def _jax_on_the_cpu() -> None:
    """The oracle is optax under jit on the CPU (XLA's CPU numerics for bfloat16), even where a
    GPU is visible to jax."""
    os.environ["JAX_PLATFORMS"] = "cpu"


@pytest.fixture(scope="module")
def optax():
    """`optax(fn, *args)` runs a function of this module in one spawned process, jax kept there."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        1, mp_context=context, initializer=_jax_on_the_cpu
    ) as pool:
        yield lambda fn, *args: pool.submit(fn, *args).result()


def _problem(seed: int = 0) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Initial float32 parameters and one list of gradients per update (norms in SCALES)."""
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [
        [(scale * rng.standard_normal(s)).astype(np.float32) for s in SHAPES] for scale in SCALES
    ]
    return init, grads


def _vit_jax_lr_fn(decay: str, schedule: tuple[float, int, int] = (BASE, TOTAL, WARMUP)):
    """vit_jax's schedule in jax.numpy: base * decay(p) * min(1, s / warmup)."""
    import jax.numpy as jnp

    base, total, warmup = schedule

    def lr_fn(s):
        p = jnp.clip((s - warmup) / (total - warmup), 0.0, 1.0)
        if decay == "cosine":
            lr = base * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
        else:
            lr = 1e-5 + (base - 1e-5) * (1.0 - p)
        return jnp.asarray(lr * jnp.minimum(1.0, s / warmup), dtype=jnp.float32)

    return lr_fn


def _vit_jax_lr_values(decay: str, steps: int) -> list[float]:
    """lr_fn(0), ..., lr_fn(steps - 1), as jax computes them."""
    lr_fn = _vit_jax_lr_fn(decay)
    return [float(lr_fn(s)) for s in range(steps)]


def _optax_run(init, grads, momentum_dtype: str, decay: str, clip: bool, schedule=None):
    """Parameters and stored trace after each update, from optax under jax.jit."""
    import jax
    import jax.numpy as jnp
    import optax

    lr_fn = _vit_jax_lr_fn(decay, *([schedule] if schedule else []))
    sgd = optax.sgd(lr_fn, momentum=0.9, accumulator_dtype=getattr(jnp, momentum_dtype))
    tx = optax.chain(optax.clip_by_global_norm(1.0), sgd) if clip else sgd

    @jax.jit
    def update(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    params = [jnp.asarray(p) for p in init]
    state = tx.init(params)
    history = []
    for g in grads:
        params, state = update(params, state, [jnp.asarray(x) for x in g])
        trace = optax.tree_utils.tree_get(state, "trace")
        assert all(t.dtype == getattr(jnp, momentum_dtype) for t in trace)
        history.append(([np.asarray(p) for p in params], [np.asarray(t) for t in trace]))
    return history


def _torch_run(init, grads, momentum_dtype: str, decay: str, clip: bool):
    """The same updates as train.py takes them: clip_grad_norm_, SGDMomentum, the scheduler."""
    params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in init]
    optimizer = make_optimizer(params, BASE, momentum_dtype)
    scheduler = make_scheduler(optimizer, TOTAL, WARMUP, decay)
    history = []
    for g in grads:
        for p, x in zip(params, g, strict=True):
            p.grad = torch.from_numpy(x.copy())
        if clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        traces = [optimizer.state[p]["momentum_buffer"].clone() for p in params]
        history.append(([p.detach().clone() for p in params], traces))
    return history


def _trace_bits(trace) -> np.ndarray:
    """The stored bytes of a trace (torch or numpy/ml_dtypes), as integers."""
    if isinstance(trace, torch.Tensor):
        ints = torch.int16 if trace.dtype == torch.bfloat16 else torch.int32
        return trace.view(ints).numpy().astype(np.int64)
    ints = np.int16 if trace.dtype.itemsize == 2 else np.int32
    return trace.view(ints).astype(np.int64)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_schedule_matches_vit_jax_lr_fn(optax, decay: str) -> None:
    end = LINEAR_END / BASE
    for s, want in enumerate(optax(_vit_jax_lr_values, decay, TOTAL + 2)):
        assert BASE * lr_multiplier(s, TOTAL, WARMUP, decay, end) == pytest.approx(want, rel=1e-6)
        assert applied_lr(BASE, s + 1, TOTAL, WARMUP, decay) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("momentum_dtype", OPTIM_DTYPES)
@pytest.mark.parametrize("decay", ["cosine", "linear"])
@pytest.mark.parametrize("clip", [False, True], ids=["no_clip", "clip"])
def test_updates_match_optax(optax, momentum_dtype: str, decay: str, clip: bool) -> None:
    """Parameters to 1e-6 after every update; a bfloat16 momentum byte for byte.

    In bfloat16 the trace's arithmetic is exact in both (0.8984375 times a bfloat16 value fits
    in float32) and does not depend on the learning rate, so its bytes agree without clipping.
    With clipping, torch's clip_grad_norm_ (which adds 1e-6 to the norm) and optax's give
    gradients a few float32 ulps apart: a trace value that close to a bfloat16 rounding tie
    could round the other way; with these inputs none does.
    """
    init, grads = _problem()
    norms = [math.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in g)) for g in grads]
    assert sum(n > 1 for n in norms) >= 4  # clipped
    assert sum(n < 1 for n in norms) >= 4  # not clipped
    ours = _torch_run(init, grads, momentum_dtype, decay, clip)
    oracle = optax(_optax_run, init, grads, momentum_dtype, decay, clip)
    worst = 0.0
    for k, ((params, traces), (want_params, want_traces)) in enumerate(
        zip(ours, oracle, strict=True), start=1
    ):
        for p, want in zip(params, want_params, strict=True):
            worst = max(worst, float(np.abs(p.numpy() - want).max()))
        for t, want in zip(traces, want_traces, strict=True):
            assert str(t.dtype) == f"torch.{momentum_dtype}"
            if momentum_dtype == "bfloat16":
                np.testing.assert_array_equal(_trace_bits(t), _trace_bits(want), f"update {k}")
            else:  # XLA fuses g + 0.9 * t into one fma; torch rounds the product first
                np.testing.assert_allclose(t.numpy(), want, 1e-6, 1e-7, err_msg=f"update {k}")
    assert worst <= 1e-6, worst
    # The updates moved the parameters far more than the tolerance.
    moved = [np.abs(p.numpy() - p0).max() for p, p0 in zip(ours[-1][0], init, strict=True)]
    assert max(moved) > 0.01


@pytest.mark.parametrize("momentum_dtype", OPTIM_DTYPES)
def test_first_update_with_warmup_fills_the_momentum_only(optax, momentum_dtype: str) -> None:
    init, grads = _problem()
    ((params, traces),) = _torch_run(init, grads[:1], momentum_dtype, "cosine", clip=True)
    ((want_params, want_traces),) = optax(
        _optax_run, init, grads[:1], momentum_dtype, "cosine", True
    )
    for p, p0, want in zip(params, init, want_params, strict=True):
        np.testing.assert_array_equal(p.numpy(), p0)  # lr_fn(0) = 0
        np.testing.assert_array_equal(want, p0)
    for t, g, want in zip(traces, grads[0], want_traces, strict=True):
        assert torch.count_nonzero(t) == t.numel()
        # norm < 1: not clipped, so the first trace is the gradient itself, rounded
        torch.testing.assert_close(t, torch.from_numpy(g).to(t.dtype), atol=0, rtol=0)
        np.testing.assert_array_equal(_trace_bits(t), _trace_bits(want))


@pytest.mark.parametrize("momentum_dtype", OPTIM_DTYPES)
def test_updates_in_chunks_equal_one_call(
    momentum_dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Splitting the multi-tensor calls (to bound the float32 temporaries) changes no bit."""
    init, grads = _problem()
    whole = _torch_run(init, grads, momentum_dtype, "cosine", clip=True)
    monkeypatch.setattr("utils.recipe.optim._CHUNK_NUMEL", 13)  # SHAPES: 12 | 5 | 12 | 7 elements
    chunked = _torch_run(init, grads, momentum_dtype, "cosine", clip=True)
    for (params, traces), (want_params, want_traces) in zip(chunked, whole, strict=True):
        for a, b in zip(params + traces, want_params + want_traces, strict=True):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# float32 momentum is torch.optim.SGD


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_float32_momentum_is_torch_sgd(weight_decay: float) -> None:
    init, grads = _problem(seed=1)
    runs = {}
    for name in ("torch", "ours"):
        params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in init]
        if name == "torch":
            optimizer = torch.optim.SGD(params, lr=BASE, momentum=0.9, weight_decay=weight_decay)
        else:
            optimizer = make_optimizer(params, BASE, "float32", weight_decay=weight_decay)
        scheduler = make_scheduler(optimizer, TOTAL, WARMUP, "cosine")
        history = []
        for g in grads:
            for p, x in zip(params, g, strict=True):
                p.grad = torch.from_numpy(x.copy())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in params]
            history.append([p.detach().clone() for p in params] + buffers)
        runs[name] = history
    for k, (want, got) in enumerate(zip(runs["torch"], runs["ours"], strict=True), start=1):
        for a, b in zip(want, got, strict=True):
            assert b.dtype == torch.float32
            assert torch.equal(a, b), f"update {k}"


# --------------------------------------------------------------------------------------------
# Parameters, gradients and wrappers


def _mixed_params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float64]
    return [torch.nn.Parameter(torch.randn(3, 4, generator=gen).to(d)) for d in dtypes]


@pytest.mark.parametrize("momentum_dtype", OPTIM_DTYPES)
def test_mixed_dtypes_and_missing_gradients(momentum_dtype: str) -> None:
    """One optimizer over float32, float64 and bfloat16 parameters updates each dtype as an
    optimizer of that dtype alone does; parameters without a gradient are left alone."""
    together = _mixed_params()
    alone = _mixed_params()
    optimizer = make_optimizer(together, 0.1, momentum_dtype)
    by_dtype = {
        dtype: make_optimizer([p for p in alone if p.dtype == dtype], 0.1, momentum_dtype)
        for dtype in {p.dtype for p in alone}
    }
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for a, b in zip(together, alone, strict=True):
            g = torch.randn(a.shape, generator=gen).to(a.dtype)
            a.grad, b.grad = g.clone(), g.clone()
        together[3].grad = alone[3].grad = None  # e.g. an unused layer
        optimizer.step()
        for opt in by_dtype.values():
            opt.step()
    for a, b in zip(together, alone, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(together[3], _mixed_params()[3])  # never had a gradient
    assert together[3] not in optimizer.state
    for i in (0, 1, 2, 4):
        assert not torch.equal(together[i], _mixed_params()[i])
        assert optimizer.state[together[i]]["momentum_buffer"].dtype == getattr(
            torch, momentum_dtype
        )


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(8, 6, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)
    return torch.nn.functional.cross_entropy(model(x), y)


def test_grad_scaler_unscale_and_step() -> None:
    """GradScaler unscales through `param_groups`, steps, and skips a step with inf gradients."""
    plain, scaled = _tiny_model(), _tiny_model()
    opt_plain = make_optimizer(plain.parameters(), 0.1, "bfloat16")
    opt_scaled = make_optimizer(scaled.parameters(), 0.1, "bfloat16")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for step in range(3):
        _loss(plain, step).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)
        scaler.scale(_loss(scaled, step)).backward()
        scaler.unscale_(opt_scaled)
        torch.nn.utils.clip_grad_norm_(scaled.parameters(), 1.0)
        scaler.step(opt_scaled)
        scaler.update()
        opt_scaled.zero_grad(set_to_none=True)
    for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    before = [p.detach().clone() for p in scaled.parameters()]
    traces = [opt_scaled.state[p]["momentum_buffer"].clone() for p in scaled.parameters()]
    scaler.scale(_loss(scaled, 9) * math.inf).backward()
    scaler.unscale_(opt_scaled)
    scaler.step(opt_scaled)  # overflow: skipped
    scaler.update()
    assert scaler.get_scale() == 2.0**11
    for p, p0, t0 in zip(scaled.parameters(), before, traces, strict=True):
        assert torch.equal(p, p0)
        assert torch.equal(opt_scaled.state[p]["momentum_buffer"], t0)


@pytest.mark.parametrize("momentum_dtype", OPTIM_DTYPES)
def test_a_rate_and_a_skip_on_the_device(momentum_dtype: str) -> None:
    """A tensor learning rate and a `skip` decided on the device (train.py's step): nothing is
    read back; the updates are the float rate's (the momentum byte for byte: it does not
    depend on the rate); a skipped update, with NaN gradients, changes no parameter and no
    momentum."""
    init, grads = _problem()
    float_rate = _torch_run(init, grads, momentum_dtype, "cosine", clip=True)
    params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in init]
    optimizer = make_optimizer(params, BASE, momentum_dtype, device="cpu")  # as train.py's
    assert all(torch.is_tensor(group["lr"]) for group in optimizer.param_groups)
    scheduler = make_scheduler(optimizer, TOTAL, WARMUP, "cosine")
    reads = HostReads()
    for k, (g, (want_params, want_traces)) in enumerate(zip(grads, float_rate, strict=True)):
        for p, x in zip(params, g, strict=True):
            p.grad = torch.from_numpy(x.copy())
        with reads:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step(skip=torch.tensor(False))
            scheduler.step()
        for p, want in zip(params, want_params, strict=True):
            torch.testing.assert_close(p.detach(), want, atol=1e-6, rtol=0, msg=f"update {k}")
        for p, want in zip(params, want_traces, strict=True):
            assert torch.equal(optimizer.state[p]["momentum_buffer"], want), f"update {k}"
    assert reads.counts[None] == 0
    before = [p.detach().clone() for p in params]
    traces = [optimizer.state[p]["momentum_buffer"].clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, math.nan)
    optimizer.step(skip=torch.tensor(True))
    for p, p0, t0 in zip(params, before, traces, strict=True):
        assert torch.equal(p, p0)
        assert torch.equal(optimizer.state[p]["momentum_buffer"], t0)


def test_a_tensor_rate_is_saved_as_a_float_and_loaded_into_the_tensor() -> None:
    """Saved states hold plain floats whatever the device; loading one fills this optimizer's
    own rate tensor, which the schedule goes on filling."""
    rate = torch.tensor(0.5)
    optimizer = make_optimizer([torch.nn.Parameter(torch.ones(3))], rate, "bfloat16")
    saved = make_optimizer([torch.nn.Parameter(torch.ones(3))], 0.25, "bfloat16").state_dict()
    optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["lr"] is rate
    assert rate.item() == 0.25
    state = optimizer.state_dict()
    assert type(state["param_groups"][0]["lr"]) is float
    assert state["param_groups"][0]["lr"] == 0.25


@pytest.mark.parametrize("kind", ["fixed", "dynamic", "torch"])
def test_loss_scalers_skip_an_overflow_on_the_device(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The fixed and dynamic LossScaler and torch's GradScaler hand an overflow to SGDMomentum
    on the device: the steps read nothing back, and the overflowing one changes no parameter
    and no momentum (LossScaler counts it, and says so when asked)."""
    model = _tiny_model()
    optimizer = make_optimizer(model.parameters(), 0.1, "bfloat16")
    if kind == "torch":
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    else:
        scaler = LossScaler(2.0**12, dynamic=kind == "dynamic", device="cpu")
    reads = HostReads()

    def step(number: int, factor: float = 1.0) -> None:
        with reads:
            scaler.scale(_loss(model, number) * factor).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)

    step(0)
    step(1)
    before = [p.detach().clone() for p in model.parameters()]
    traces = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    step(2, math.inf)
    assert reads.counts[None] == 0
    for p, p0, t0 in zip(model.parameters(), before, traces, strict=True):
        assert torch.equal(p, p0)
        assert torch.equal(optimizer.state[p]["momentum_buffer"], t0)
    assert not torch.equal(before[0], _tiny_model()[0].weight)  # the other steps moved it
    if kind == "fixed":
        with caplog.at_level(logging.WARNING):
            scaler.report()
        assert "fp16 gradients overflowed (scale 4096): 1 step(s) skipped" in caplog.text
    elif kind == "dynamic":
        with caplog.at_level(logging.WARNING):
            assert scaler.report() == 1
        assert "fp16 gradients overflowed (scale 2048): 1 step(s) skipped" in caplog.text
        assert scaler.report() == 0  # counted once
    else:
        assert scaler.get_scale() == 2.0**11


def test_the_dynamic_loss_scaler_is_torchs_grad_scaler(caplog: pytest.LogCaptureFixture) -> None:
    """LossScaler and torch.amp.GradScaler (the oracle), each stepping its copy of a model with
    SGDMomentum through the same steps: clean ones, enough in a row for the scale to grow
    (growth_interval 3), and overflows (an inf loss, a loss whose scaled gradients exceed
    float32, one NaN gradient). After every step: the same scale and growth tracker (the same
    state dict) and bit for bit the same parameters and momentum; the overflows are the steps
    counted as skipped, and no step reads anything back."""
    faults = [None, None, None, None, "inf", None, "nan", None, None, None, None, "huge", None]
    runs = []
    for scaler in (
        LossScaler(2.0**10, growth_interval=3, device="cpu"),
        torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3),
    ):
        model = _tiny_model()
        runs.append((scaler, model, make_optimizer(model.parameters(), 0.1, "bfloat16")))
    (ours, model, optimizer), (oracle, oracle_model, oracle_optimizer) = runs
    reads, scales, skipped = HostReads(), [], 0
    for k, fault in enumerate(faults):
        for scaler, net, opt in runs:
            factor = {"inf": math.inf, "huge": 1e36}.get(fault, 1.0)
            with reads if scaler is ours else contextlib.nullcontext():
                scaler.scale(_loss(net, k) * factor).backward()
                if fault == "nan":
                    net[2].weight.grad[0, 0] = math.nan
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                scaler.step(opt)
                scaler.update()
            opt.zero_grad(set_to_none=True)
        assert ours.state_dict() == oracle.state_dict(), f"step {k}"
        scales.append(oracle.get_scale())
        for p, q in zip(model.parameters(), oracle_model.parameters(), strict=True):
            assert torch.equal(p, q), f"step {k}"
            want = oracle_optimizer.state[q]["momentum_buffer"]
            assert torch.equal(optimizer.state[p]["momentum_buffer"], want), f"step {k}"
        if k in (6, len(faults) - 1):
            with caplog.at_level(logging.WARNING):
                skipped += ours.report()
            assert skipped == sum(f is not None for f in faults[: k + 1]), f"step {k}"
    assert reads.counts[None] == 0
    # Grown after 3 clean steps in a row, halved at each overflow.
    assert scales == [2.0**e for e in (10, 10, 11, 11, 10, 10, 9, 9, 9, 10, 10, 9, 9)]
    assert f"overflowed (scale {scales[6]:g}): 2 step(s) skipped" in caplog.text  # the oracle's


@pytest.mark.slow
def test_compiled_model() -> None:
    """A torch.compile'd model's parameters are the module's: the same updates as eager."""
    eager, compiled = _tiny_model(), _tiny_model()
    opt_eager = make_optimizer(eager.parameters(), 0.1, "bfloat16")
    net = torch.compile(compiled)
    opt_compiled = make_optimizer(net.parameters(), 0.1, "bfloat16")
    for step in range(2):
        for model, opt in ((eager, opt_eager), (net, opt_compiled)):
            _loss(model, step).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b, a0 in zip(
        eager.parameters(), compiled.parameters(), _tiny_model().parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        assert not torch.equal(a, a0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"momentum_dtype": "float16"}, "momentum_dtype"),
        ({"momentum": 1.0}, "momentum"),
        ({"lr": -1.0}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
    ],
)
def test_bad_hyper_parameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SGDMomentum([torch.nn.Parameter(torch.zeros(2))], **{"lr": 0.1, **kwargs})


# --------------------------------------------------------------------------------------------
# Saving and resuming


def _through_file(state: dict) -> dict:
    """A state dict after torch.save and a weights-only torch.load, as a resume reads it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        _loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("momentum_dtype", OPTIM_DTYPES)
def test_own_state_resumes_exactly(momentum_dtype: str) -> None:
    straight, first = _tiny_model(), _tiny_model()
    opt_straight = make_optimizer(straight.parameters(), 0.1, momentum_dtype)
    _train(straight, opt_straight, range(5))
    opt_first = make_optimizer(first.parameters(), 0.1, momentum_dtype)
    _train(first, opt_first, range(3))
    saved = _through_file({"model": first.state_dict(), "optimizer": opt_first.state_dict()})
    resumed = _tiny_model()
    resumed.load_state_dict(saved["model"])
    opt_resumed = make_optimizer(resumed.parameters(), 0.1, momentum_dtype)
    opt_resumed.load_state_dict(saved["optimizer"])
    for p in resumed.parameters():
        assert opt_resumed.state[p]["momentum_buffer"].dtype == getattr(torch, momentum_dtype)
    _train(resumed, opt_resumed, range(3, 5))
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_changed_momentum_dtype_is_converted(caplog: pytest.LogCaptureFixture) -> None:
    model = _tiny_model()
    bf16 = make_optimizer(model.parameters(), 0.1, "bfloat16")
    _train(model, bf16, range(2))
    fp32 = make_optimizer(model.parameters(), 0.1, "float32")
    with caplog.at_level(logging.WARNING, logger="utils.recipe.optim"):
        fp32.load_state_dict(_through_file(bf16.state_dict()))
    assert "converted to this run's float32" in caplog.text
    assert fp32.param_groups[0]["momentum_dtype"] == "float32"
    for p in model.parameters():
        got, want = fp32.state[p]["momentum_buffer"], bf16.state[p]["momentum_buffer"]
        assert got.dtype == torch.float32
        assert torch.equal(got, want.float())


@pytest.mark.parametrize("momentum_dtype", OPTIM_DTYPES)
def test_continues_a_torch_sgd_state(momentum_dtype: str, caplog: pytest.LogCaptureFixture) -> None:
    """A state of torch.optim.SGD(momentum=0.9), as runs before bfloat16 momentum saved it."""
    old_model = _tiny_model()
    old = torch.optim.SGD(old_model.parameters(), lr=0.05, momentum=0.9)
    _train(old_model, old, range(3))
    saved = _through_file(old.state_dict())
    model = _tiny_model()
    model.load_state_dict(old_model.state_dict())
    optimizer = make_optimizer(model.parameters(), 0.1, momentum_dtype)
    with caplog.at_level(logging.WARNING, logger="utils.recipe.optim"):
        optimizer.load_state_dict(saved)
    assert "torch.optim.SGD" in caplog.text
    assert "float32 momentum" in caplog.text
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"]) == (0.05, 0.9)  # the saved values, as torch does
    assert group["momentum_dtype"] == momentum_dtype
    assert not {"nesterov", "dampening"} & group.keys()
    dtype = getattr(torch, momentum_dtype)
    for p, q in zip(model.parameters(), old_model.parameters(), strict=True):
        buffer = optimizer.state[p]["momentum_buffer"]
        assert buffer.dtype == dtype
        assert torch.equal(buffer, old.state[q]["momentum_buffer"].to(dtype))  # not reset
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    traces = {
        name: optimizer.state[p]["momentum_buffer"].double() for name, p in model.named_parameters()
    }
    _train(model, optimizer, range(3, 4))
    _train(old_model, old, range(3, 4))
    if momentum_dtype == "float32":  # then exactly what torch.optim.SGD would have done
        for a, b in zip(model.parameters(), old_model.parameters(), strict=True):
            assert torch.equal(a, b)
        return
    # bfloat16: p - lr * (g + 0.8984375 * t), t the converted trace, in float64 here.
    reference = _tiny_model()
    reference.load_state_dict(before)
    _loss(reference, 3).backward()
    for name, p in model.named_parameters():
        grad = dict(reference.named_parameters())[name].grad.double()
        want = before[name].double() - 0.05 * (grad + 0.8984375 * traces[name])
        torch.testing.assert_close(p.double(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "old",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1),  # no momentum
        lambda ps: torch.optim.Adam(ps, lr=0.1),
    ],
    ids=["nesterov", "dampening", "no_momentum", "adam"],
)
def test_refuses_a_state_it_cannot_continue(old) -> None:
    model = _tiny_model()
    optimizer = old(model.parameters())
    _train(model, optimizer, range(1))
    ours = make_optimizer(model.parameters(), 0.1, "bfloat16")
    with pytest.raises(OptimizerStateError, match="Start the run afresh") as err:
        ours.load_state_dict(_through_file(optimizer.state_dict()))
    assert isinstance(err.value, ValueError)
    assert not ours.state  # nothing half-loaded


def test_bench_optimizer_section_measures_both_momentum_dtypes() -> None:
    """bench.py's optimizer section: float32 momentum holds the parameters' bytes, bfloat16 half."""
    import bench

    args = bench.parse_args(["--model_type", "testing", "--img_size", "32", "--batch_size", "2"])
    config = get_config("testing")
    found = bench.optimizer_memory(args, config, torch.device("cpu"))
    model = bench.build_ours(config, 32, args.num_classes)
    param_mb = sum(p.numel() * 4 for p in model.parameters()) / bench.MB
    assert found["float32"]["momentum_mb"] == pytest.approx(param_mb)
    assert found["bfloat16"]["momentum_mb"] == pytest.approx(param_mb / 2)
    for figures in found.values():  # parameters, gradients and momentum at least
        assert figures["train_peak_mem_mb"] > 2 * param_mb + figures["momentum_mb"]


@pytest.mark.parametrize("chunk", [2500, 10**9])
def test_bfloat16_step_allocates_one_chunk_of_float32_at_a_time(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step's temporaries (float32 copies of the trace) are bounded by the chunk size."""
    import bench

    monkeypatch.setattr("utils.recipe.optim._CHUNK_NUMEL", chunk)
    params = [torch.nn.Parameter(torch.randn(1000)) for _ in range(20)]
    optimizer = make_optimizer(params, 0.1, "bfloat16")
    for p in params:
        p.grad = torch.randn(1000)
    optimizer.step()  # creates the momentum
    with bench.LiveTensorBytes() as tracker:
        optimizer.step()
    expected = 4 * min(chunk // 1000, 20) * 1000  # float32 bytes of one chunk of whole tensors
    assert expected <= tracker.peak <= expected + 64


# --------------------------------------------------------------------------------------------
# train.py's own step against the oracle


@pytest.mark.parametrize("momentum_dtype", OPTIM_DTYPES)
def test_train_step_equals_optax(optax, tmp_path, no_dropout: str, momentum_dtype: str) -> None:
    """Two steps of train.py (accumulation 2, clipping active, 1 warmup step) against optax fed
    the big-batch gradients: the first update moves nothing and fills the momentum."""
    argv = tiny_args(
        tmp_path,
        model_type=no_dropout,
        train_batch_size=8,
        gradient_accumulation_steps=2,
        warmup_steps=1,
        num_steps=10,
        learning_rate=0.5,
        optim_dtype=momentum_dtype,
    )
    args, info = train.parse_args(argv), DistInfo()
    train.check_args(args, info)
    torch.manual_seed(0)
    model = VisionTransformer(no_dropout, 32, num_classes=10)
    with torch.no_grad():
        model.head.weight.normal_()  # a non-zero head: every parameter gets a gradient
    reference = copy.deepcopy(model)
    init = [p.detach().clone() for p in model.parameters()]
    trainer = train.make_trainer(args, model, info)
    generator = torch.Generator().manual_seed(1)
    steps = [
        [
            (3 * torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 10, (4,)))
            for _ in range(2)
        ]
        for _ in range(2)
    ]
    # The gradients of the big batch (8 images), at the initial parameters: the first update
    # applies lr_fn(0) = 0, so the second one sees the same parameters.
    grads = []
    for batches in steps:
        reference.zero_grad()
        images, labels = (torch.cat(parts) for parts in zip(*batches, strict=True))
        reference(images, labels).backward()
        grads.append([p.grad.numpy().copy() for p in reference.parameters()])
    assert all(math.sqrt(sum(float((g**2).sum()) for g in step)) > 1.0 for step in grads)

    history = []
    for k, batches in enumerate(steps, start=1):
        train.train_step(args, trainer, batches, None, k, info)
        params = [p.detach().clone() for p in model.parameters()]
        traces = [trainer.optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
        history.append((params, traces))
    oracle = optax(
        _optax_run,
        [p.numpy() for p in init],
        grads,
        momentum_dtype,
        "cosine",
        True,
        (0.5, 10, 1),
    )
    assert all(torch.equal(p, p0) for p, p0 in zip(history[0][0], init, strict=True))
    assert all(torch.count_nonzero(t) > 0 for t in history[0][1])
    worst, flips, compared = 0.0, 0, 0
    for (params, traces), (want_params, want_traces) in zip(history, oracle, strict=True):
        for p, want in zip(params, want_params, strict=True):
            worst = max(worst, float(np.abs(p.numpy() - want).max()))
        for t, want in zip(traces, want_traces, strict=True):
            assert str(t.dtype) == f"torch.{momentum_dtype}"
            ours, want = t.float().numpy(), want.astype(np.float32)
            if momentum_dtype == "float32":
                np.testing.assert_allclose(ours, want, 1e-5, 1e-6)
                continue
            # The micro-batch gradients sum to the big batch's only up to float32 rounding (the
            # CPU's matmul kernels decide which way), and a trace within that noise of a
            # bfloat16 rounding boundary may round either way: one bfloat16 step apart, rarely.
            off = ~np.isclose(ours, want, 1e-5, 1e-6)
            ulp = np.abs(want) * 2.0**-7
            assert (np.abs(ours - want)[off] <= ulp[off]).all()
            flips += int(off.sum())
            compared += off.size
    assert flips <= 1e-3 * compared, (flips, compared)
    assert worst <= 1e-6, worst
    moved = max(float((p - p0).abs().max()) for p, p0 in zip(history[1][0], init, strict=True))
    assert moved > 1e-3  # the second update moved the parameters far beyond the tolerance
