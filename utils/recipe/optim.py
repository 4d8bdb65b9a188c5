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
import math
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
    (set from its `lr` when missing, as a float: a tensor `lr` is then filled in place with
    each rate, which reads nothing back from the device).

    Args:
        count: updates already done: a resumed run continues this schedule from there.
    """
    if decay_type not in DECAY_TYPES:
        raise ValueError(f"decay_type must be one of {DECAY_TYPES}, got {decay_type!r}")

    def schedule(base_lr: float) -> Callable[[int], float]:
        end = linear_end_fraction(base_lr)
        return lambda count: lr_multiplier(count, total_steps, warmup_steps, decay_type, end)

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", float(group["lr"]))
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

    Nothing in a step reads a tensor on the host, so `torch.compile` traces it whole and a GPU
    never waits: the learning rate may be a 0-d tensor on the parameters' device (a scheduler
    fills it in place; a compiled step then reads each update's rate without recompiling), and
    an update to skip (non-finite gradients) is decided on the device, by `step`'s `skip` or by
    a `torch.amp.GradScaler`'s ``found_inf`` (``_step_supports_amp_scaling``: the scaler hands
    it over instead of reading it on the host). A skipped update changes no parameter and no
    momentum.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (a scheduler sets it per update): a float, or a 0-d tensor on the
            parameters' device. Saved states hold it as a float either way.
        momentum: the trace's decay (vit_jax: 0.9).
        momentum_dtype: storage of the trace: ``torch.bfloat16`` (vit_jax's
            ``accumulator_dtype='bfloat16'``) or ``torch.float32`` (torch.optim.SGD); the names
            in `OPTIM_DTYPES` are accepted too.
        weight_decay: L2 penalty added to the gradient before the momentum.
    """

    _step_supports_amp_scaling = True  # a GradScaler's found_inf is read here, on the device

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor,
        momentum: float = 0.9,
        momentum_dtype: torch.dtype | str = torch.bfloat16,
        weight_decay: float = 0.0,
    ):
        if float(lr) < 0:
            raise ValueError(f"lr must be >= 0, got {float(lr)}")
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
    def step(
        self, closure: Callable[[], Any] | None = None, *, skip: torch.Tensor | None = None
    ) -> Any:
        """One update of every parameter that has a gradient; returns `closure()` if given.

        Args:
            skip: a boolean tensor: where True, the update changes nothing. A GradScaler's
                ``found_inf`` (non-finite gradients) skips it too, and its ``grad_scale``, when
                the gradients were not unscaled yet, divides them.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)  # set by GradScaler.step for this call
        if found_inf is not None:
            skip = found_inf != 0 if skip is None else skip | (found_inf != 0)
        grad_scale = getattr(self, "grad_scale", None)
        for group in self.param_groups:
            trace_dtype = getattr(torch, group["momentum_dtype"])
            buckets: dict[tuple, tuple[list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SGDMomentum does not support sparse gradients")
                trace = self._momentum(p, trace_dtype)
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
                    skip=skip,
                    grad_scale=grad_scale,
                )
        return loss

    def init_momentum(self) -> None:
        """Give every parameter that requires a gradient its momentum now (zeros, as its first
        update would): a compiled step then finds the same state at every call, and compiles
        once instead of again at the second update."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._momentum(p, getattr(torch, group["momentum_dtype"]))

    def _momentum(self, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The momentum of `p`, made on first use: zeros, as optax.trace starts."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(
                p, dtype=dtype, memory_format=torch.preserve_format
            )
        return state["momentum_buffer"]

    def state_dict(self) -> dict[str, Any]:
        """The state, with a tensor learning rate written as a float (a host sync), so that a
        saved state is the same on every device and loads anywhere."""
        state = super().state_dict()
        for group in state["param_groups"]:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = group["lr"].item()
        return state

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
        rates = [group["lr"] for group in self.param_groups]
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
        for group, rate in zip(self.param_groups, rates, strict=True):
            if isinstance(rate, torch.Tensor):  # keep this optimizer's tensor, with the saved rate
                group["lr"] = rate.fill_(float(group["lr"]))
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
    lr: float | torch.Tensor,
    momentum: float,
    weight_decay: float,
    skip: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """`SGDMomentum`'s update of tensors on one device with one param and one trace dtype."""
    compute = torch.promote_types(params[0].dtype, torch.float32)
    # A Python float times a bfloat16 array stays bfloat16 in JAX: 0.9 -> 0.8984375.
    decay = _stored_as(momentum, traces[0].dtype)
    for part in _chunks(params):
        p, g, t = params[part], grads[part], traces[part]
        if grad_scale is not None:
            g = torch._foreach_div(g, grad_scale)
        if weight_decay != 0:
            g = torch._foreach_add(g, p, alpha=weight_decay)  # as torch.optim.SGD
        # In place when the trace is stored in the compute dtype and kept; else an exact copy.
        in_place = skip is None and t[0].dtype == compute
        new = t if in_place else [x.to(compute, copy=True) for x in t]
        torch._foreach_mul_(new, decay)  # exact: bfloat16 x bfloat16 fits in float32
        torch._foreach_add_(new, g)
        if skip is None:
            if isinstance(lr, torch.Tensor):
                torch._foreach_sub_(p, torch._foreach_mul(new, lr))
            else:
                torch._foreach_add_(p, new, alpha=-lr)
            if not in_place:
                torch._foreach_copy_(t, new)  # rounds to nearest even
        else:  # chosen on the device: a skipped update keeps every parameter and trace
            if isinstance(lr, torch.Tensor):
                moved = torch._foreach_sub(p, torch._foreach_mul(new, lr))
            else:
                moved = torch._foreach_add(p, new, alpha=-lr)
            for param, after, trace, trace_after in zip(p, moved, t, new, strict=True):
                param.copy_(torch.where(skip, param, after))
                trace.copy_(torch.where(skip, trace, trace_after))  # rounds to nearest even
            del moved
        del new, g  # free this chunk's temporaries before the next chunk makes its own


def _stored_as(value: float, dtype: torch.dtype) -> float:
    """`value` as ``torch.tensor(value, dtype=dtype)`` stores it (rounded to float32, then to
    `dtype`, each to nearest even), computed in Python so that a compiled step needs no
    ``.item()``."""
    for eps in (torch.finfo(torch.float32).eps, torch.finfo(dtype).eps):
        if value and math.isfinite(value):
            mantissa, exponent = math.frexp(value)  # value = mantissa * 2**exponent
            steps = 2 / eps  # representable mantissas in [0.5, 1), as whole numbers
            value = math.ldexp(round(mantissa * steps) / steps, exponent)  # ties to even
    return value


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
    device: torch.device | str | None = None,
) -> SGDMomentum:
    """vit_jax's optimizer: SGD with momentum 0.9 stored in `momentum_dtype` (`OPTIM_DTYPES`).

    With `device`, the rate is a 0-d tensor there that `make_scheduler` fills in place (a
    compiled step reads each update's rate without recompiling), and each group's `initial_lr`,
    the schedule's base, is `lr` itself, not its float32 rounding.
    """
    rate = lr if device is None else torch.tensor(lr, device=device)
    optimizer = SGDMomentum(
        params, lr=rate, momentum=0.9, momentum_dtype=momentum_dtype, weight_decay=weight_decay
    )
    if device is not None:
        for group in optimizer.param_groups:
            group["initial_lr"] = lr
    return optimizer
