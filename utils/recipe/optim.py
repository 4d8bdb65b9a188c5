"""The update rule of the official fine-tuning recipe: learning-rate schedule and SGD momentum.

Follows `vit_jax/train.py` (`make_update_fn` and the optax chain it builds,
``optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(lr_fn, momentum=0.9,
accumulator_dtype='bfloat16'))``) and optax (`optax.clip_by_global_norm`, `optax.trace`,
`optax.scale_by_learning_rate`). Gradient clipping is `torch.nn.utils.clip_grad_norm_` in
train.py; this module holds the two other pieces:

- The schedule: `utils.recipe.update_rule` computes it, `make_scheduler` applies it.
- The momentum (`SGDMomentum`). ``optax.trace``: ``t_new = g + decay * t``, the update is
  ``-lr * t_new`` in float32, then ``t_new`` is stored in the accumulator dtype. vit_jax stores
  it in bfloat16, where the decay 0.9 itself becomes bfloat16 (0.8984375) and the product with
  the stored trace is exact in float32. With a float32 accumulator it is the update of
  ``torch.optim.SGD(momentum=0.9)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from utils.infra.errors import UserError
from utils.recipe.update_rule import (
    DECAY_TYPES,
    linear_end_fraction,
    lr_multiplier,
    momentum_dtype_name,
)

__all__ = [
    "OptimizerStateError",
    "SGDMomentum",
    "make_optimizer",
    "make_scheduler",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Learning-rate schedule


def make_scheduler(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int,
    decay_type: str = "cosine",
    count: int = 0,
) -> LambdaLR:
    """A `LambdaLR` that gives the official schedule with optax's count.

    Call `optimizer.step()` and then `scheduler.step()` once per update. LambdaLR's counter is
    the number of updates done, which is optax's count, so the rate in effect for the k-th update
    (k = 1, 2, ...) is ``base * lr_multiplier(k - 1, ...)`` (`applied_lr`), linear decay ending at
    the absolute rate `LINEAR_END` whatever the base. The base is each group's `initial_lr`
    (set from its `lr` when missing).

    Args:
        count: updates already done: a resumed run continues this schedule from there.
    """
    if decay_type not in DECAY_TYPES:
        raise ValueError(f"decay_type must be one of {DECAY_TYPES}, got {decay_type!r}")

    def schedule(base_lr: float) -> Callable[[int], float]:
        end = linear_end_fraction(base_lr)
        return lambda count: lr_multiplier(count, total_steps, warmup_steps, decay_type, end)

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    lambdas = [schedule(group["initial_lr"]) for group in optimizer.param_groups]
    return LambdaLR(optimizer, lambdas, last_epoch=count - 1)


# --------------------------------------------------------------------------------------------
# SGD with momentum


class OptimizerStateError(UserError, ValueError):
    """A saved optimizer state that `SGDMomentum` cannot continue (exit code 2 in the CLIs)."""


_CHUNK_NUMEL = 2**22  # elements updated per multi-tensor call: 16 MiB of float32 temporaries
# Keys of a torch.optim.SGD param group that mean nothing here (checked before being dropped).
_TORCH_SGD_ONLY = ("dampening", "nesterov", "maximize", "foreach", "differentiable", "fused")


class SGDMomentum(Optimizer):
    """SGD with momentum as optax's ``sgd(lr, momentum, accumulator_dtype)`` computes it.

    For each parameter with a gradient ``g`` (plus ``weight_decay * p`` when set, added before
    the momentum as `torch.optim.SGD` does; vit_jax uses none), as ``optax.trace`` then
    ``optax.scale_by_learning_rate``::

        t_new = g + decay * t     # t: the stored trace, zeros before the first update
        p = p - lr * t_new
        t = t_new rounded to momentum_dtype (round to nearest even)

    Everything is computed in float32 (float64 for float64 parameters); storing the trace is its
    only rounding. As in JAX, where a Python float times a bfloat16 array stays bfloat16, the
    decay is first rounded to the trace's dtype: 0.9 becomes 0.8984375 in bfloat16, and its
    product with a bfloat16 trace is exact in float32. With ``momentum_dtype=torch.float32`` and
    float32 parameters the operations are those of ``torch.optim.SGD(momentum=momentum)``
    (dampening 0, no nesterov), in the same order.

    Parameters without a gradient are skipped and get no state. The step reads only
    ``param.grad`` and `param_groups`, so it works under DDP, with a `torch.amp.GradScaler`
    (``unscale_`` then ``step``) and for a `torch.compile`d model. Tensors are updated with
    multi-tensor (``torch._foreach_*``) kernels, per device and dtype, a few million elements
    per call so that the float32 copies of a bfloat16 trace stay small. State per parameter:
    ``momentum_buffer``, stored in the momentum dtype.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (a scheduler sets it per update).
        momentum: the trace's decay (vit_jax: 0.9).
        momentum_dtype: storage of the trace: ``torch.bfloat16`` (vit_jax's
            ``accumulator_dtype='bfloat16'``) or ``torch.float32`` (torch.optim.SGD); the names
            in `OPTIM_DTYPES` are accepted too.
        weight_decay: L2 penalty added to the gradient before the momentum.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        momentum_dtype: torch.dtype | str = torch.bfloat16,
        weight_decay: float = 0.0,
    ):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            # A name, not a torch.dtype, so that the state dict holds plain Python values.
            "momentum_dtype": momentum_dtype_name(momentum_dtype),
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns `closure()` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            trace_dtype = getattr(torch, group["momentum_dtype"])
            buckets: dict[tuple, tuple[list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SGDMomentum does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:  # optax.trace starts from zeros
                    state["momentum_buffer"] = torch.zeros_like(
                        p, dtype=trace_dtype, memory_format=torch.preserve_format
                    )
                trace = state["momentum_buffer"]
                key = (p.device, p.dtype, trace.dtype)
                params, grads, traces = buckets.setdefault(key, ([], [], []))
                params.append(p)
                grads.append(p.grad)
                traces.append(trace)
            for params, grads, traces in buckets.values():
                _trace_update(
                    params,
                    grads,
                    traces,
                    lr=group["lr"],
                    momentum=group["momentum"],
                    weight_decay=group["weight_decay"],
                )
        return loss

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state of this class, or continue one of ``torch.optim.SGD`` with momentum.

        The momentum buffers are converted to the momentum dtype this optimizer was built with,
        which wins over the saved one (a change is logged). A ``torch.optim.SGD`` state (what
        train.py wrote before it used this optimizer: float32 momentum, and the k-th update at
        ``lr_fn(k)``) is continued: its float32 buffers are converted, never reset, and a
        warning says that from now on the k-th update uses ``lr_fn(k - 1)``, so one rate is
        applied twice and the rest of the schedule runs one update late.

        Raises:
            OptimizerStateError: the state is not plain SGD with momentum (e.g. nesterov,
                dampening, maximize, or another optimizer's state).
        """
        wanted = [group["momentum_dtype"] for group in self.param_groups]
        saved_groups = state_dict["param_groups"]
        if any("momentum_dtype" not in group for group in saved_groups):
            state_dict = {**state_dict, "param_groups": [_from_torch_sgd(g) for g in saved_groups]}
            logger.warning(
                "The optimizer state was written by torch.optim.SGD: float32 momentum, and its "
                "k-th update used lr_fn(k). Continuing it with %s momentum and optax's count "
                "(the k-th update uses lr_fn(k - 1)): the next rate is applied twice, then the "
                "schedule runs one update late.",
                " / ".join(sorted(set(wanted))),
            )
        super().load_state_dict(state_dict)  # casts floating-point state to the param dtype
        for group, name in zip(self.param_groups, wanted, strict=True):
            if group["momentum_dtype"] != name:
                logger.warning(
                    "The saved momentum is stored in %s; converted to this run's %s.",
                    group["momentum_dtype"],
                    name,
                )
            group["momentum_dtype"] = name
            dtype = getattr(torch, name)
            for p in group["params"]:
                state = self.state.get(p)
                if state and state.get("momentum_buffer") is not None:
                    state["momentum_buffer"] = state["momentum_buffer"].to(dtype)


def _from_torch_sgd(group: Mapping[str, Any]) -> dict[str, Any]:
    """A ``torch.optim.SGD`` param group as `SGDMomentum` stores it (its momentum: float32)."""
    plain = (("dampening", 0), ("nesterov", False), ("maximize", False))
    wrong = {key: group[key] for key, value in plain if group.get(key, value) != value}
    if not group.get("momentum"):
        wrong["momentum"] = group.get("momentum")
    if wrong:
        raise OptimizerStateError(
            "The saved optimizer state is not SGD with momentum as this optimizer computes it "
            f"(saved: {wrong}), so it cannot be continued. Start the run afresh instead of "
            "resuming it."
        )
    kept = {k: v for k, v in group.items() if k not in _TORCH_SGD_ONLY}
    return {**kept, "momentum_dtype": "float32"}


def _trace_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    traces: list[torch.Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """`SGDMomentum`'s update of tensors on one device with one param and one trace dtype."""
    compute = torch.promote_types(params[0].dtype, torch.float32)
    # A Python float times a bfloat16 array stays bfloat16 in JAX: 0.9 -> 0.8984375.
    decay = torch.tensor(momentum, dtype=traces[0].dtype).item()
    for part in _chunks(params):
        p, g, t = params[part], grads[part], traces[part]
        if weight_decay != 0:
            g = torch._foreach_add(g, p, alpha=weight_decay)  # as torch.optim.SGD
        # In place when the trace is stored in the compute dtype; else an exact upcast copy.
        new = t if t[0].dtype == compute else [x.to(compute) for x in t]
        torch._foreach_mul_(new, decay)  # exact: bfloat16 x bfloat16 fits in float32
        torch._foreach_add_(new, g)
        torch._foreach_add_(p, new, alpha=-lr)
        if new is not t:
            torch._foreach_copy_(t, new)  # rounds to nearest even
        del new, g  # free this chunk's temporaries before the next chunk makes its own


def _chunks(tensors: list[torch.Tensor]) -> Iterator[slice]:
    """Consecutive slices of `tensors` holding at most `_CHUNK_NUMEL` elements (or one tensor).

    The float32 copies of a bfloat16 trace exist one chunk at a time: without this bound they
    would add a float32 copy of every parameter to the step's peak memory, more than the
    bfloat16 trace saves.
    """
    start, numel = 0, 0
    for i, t in enumerate(tensors):
        if numel and numel + t.numel() > _CHUNK_NUMEL:
            yield slice(start, i)
            start, numel = i, 0
        numel += t.numel()
    yield slice(start, len(tensors))


def make_optimizer(
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    lr: float,
    momentum_dtype: str,
    weight_decay: float = 0.0,
) -> SGDMomentum:
    """vit_jax's optimizer: SGD with momentum 0.9 stored in `momentum_dtype` (`OPTIM_DTYPES`)."""
    return SGDMomentum(
        params, lr=lr, momentum=0.9, momentum_dtype=momentum_dtype, weight_decay=weight_decay
    )
