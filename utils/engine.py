"""What the scripts share: precision (autocast, grad scalers), evaluation, unwrapping, logging.

`train.py` and `eval.py` both import this module and never each other, so evaluation during
training and `eval.py` are one code path and give the same numbers.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.dist_utils import all_reduce_sum
from utils.errors import UserError

__all__ = [
    "AUTOCAST_DTYPES",
    "LiveTensorBytes",
    "MemoryFit",
    "StaticGradScaler",
    "autocast",
    "autocast_dtype",
    "available_bytes",
    "evaluate",
    "is_out_of_memory",
    "make_scaler",
    "measure_memory",
    "memory_amount",
    "top_k",
    "unwrap",
]

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# Precision


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype `autocast` computes in for `precision` on `device` (None: fp32, no autocast)."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype == torch.float16 and device.type != "cuda":
        return torch.bfloat16  # the CPU has no fp16 autocast worth using
    return dtype


def autocast(precision: str, device: torch.device):
    """The autocast context for `precision` (a no-op for fp32)."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class StaticGradScaler:
    """A fixed loss scale (`--loss_scale S`), with GradScaler's interface.

    Gradients are unscaled before clipping; a step whose gradients overflowed is skipped with a
    warning (a fixed scale never adapts, so lower `--loss_scale` if this repeats).
    """

    def __init__(self, scale: float):
        self.scale_value = float(scale)
        self._finite = True

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch._foreach_div_(grads, self.scale_value)
        self._finite = bool(torch.stack([g.isfinite().all() for g in grads]).all())

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._finite:
            optimizer.step()
        else:
            logger.warning("fp16 gradients overflowed (scale %g): step skipped.", self.scale_value)

    def update(self) -> None:
        self._finite = True


def make_scaler(precision: str, loss_scale: float):
    """GradScaler for fp16 (dynamic when `loss_scale` is 0, fixed otherwise); None otherwise."""
    if precision != "fp16":
        return None
    if loss_scale > 0:
        return StaticGradScaler(loss_scale)
    return torch.amp.GradScaler("cuda")


# --------------------------------------------------------------------------------------------
# Models and evaluation


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel (`.module`) and torch.compile
    (`._orig_mod`) wrappers, however they are nested."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


@torch.no_grad()
def evaluate(
    model: nn.Module,
    test_loader: DataLoader,
    device: torch.device,
    precision: str = "fp32",
    progress: bool = False,
) -> dict[str, float]:
    """Test loss and accuracy over the whole test set, sharded over all ranks.

    Each rank evaluates its own shard (the loader's sampler); the sums are all-reduced, so every
    test image counts exactly once whatever the number of processes.

    Args:
        model: returns `(logits, attn)` from `model(images)`; may be wrapped by DDP/compile.
        test_loader: this rank's shard of the test set.
        device: where to compute.
        precision: "fp32", "fp16" or "bf16" (autocast).
        progress: show a tqdm bar.

    Returns:
        `loss` (mean cross-entropy), `accuracy` (top-1), `count` (images over all ranks),
        and `top5` when the model has more than 10 classes.
    """
    num_classes = unwrap(model).num_classes
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, count
    for batch in tqdm(test_loader, desc="Validating", disable=not progress, leave=False):
        if batch is None:  # every image of it was unreadable (`skip_unreadable`)
            continue
        images, labels = (t.to(device, non_blocking=True) for t in batch)
        with autocast(precision, device):
            logits = model(images)[0]  # (B, classes)
        logits = logits.float()
        top = logits.topk(min(5, num_classes), dim=1).indices  # (B, k)
        hits = top == labels[:, None]
        totals += torch.stack(
            [
                F.cross_entropy(logits, labels, reduction="sum").double(),
                hits[:, 0].sum().double(),
                hits.any(dim=1).sum().double(),
                torch.tensor(float(labels.numel()), dtype=torch.float64, device=device),
            ]
        )
    all_reduce_sum(totals)
    model.train(was_training)
    count = int(totals[3].item())
    if count == 0:
        raise UserError("The test set is empty; add images to the val/ or test/ folder.")
    result = {
        "loss": totals[0].item() / count,
        "accuracy": totals[1].item() / count,
        "count": count,
    }
    if num_classes > 10:
        result["top5"] = totals[2].item() / count
    return result


# --------------------------------------------------------------------------------------------
# Memory


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storage created inside the mode, and their peak.

    Every aten op's outputs are inspected; a storage that is new (not one of the op's inputs,
    so views and in-place results are not counted twice) is added and removed again when it is
    freed. This is the CPU counterpart of `torch.cuda.max_memory_allocated` minus what existed
    before entering (add that yourself). With `trace`, the live bytes after every op are
    appended to it.
    """

    def __init__(self, trace: list[int] | None = None) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self.trace = trace
        self._live: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._live.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._live:
                continue
            self._live.add(key)
            self.current += nbytes
            weakref.finalize(storage, self._free, key, nbytes)
        self.peak = max(self.peak, self.current)
        if self.trace is not None:
            self.trace.append(self.current)
        return out


def available_bytes(device: torch.device) -> int | None:
    """Memory this process can still take on `device`, or None where that cannot be told.

    CUDA: free device memory plus what PyTorch's allocator holds unused. CPU (Linux):
    `MemAvailable`, shared by the processes of this node (`LOCAL_WORLD_SIZE`), and no more than
    the address-space and data-segment limits (`ulimit -v`, `ulimit -d`) leave this process.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    available //= max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    headroom = _rlimit_headroom()
    return available if headroom is None else min(available, headroom)


def _rlimit_headroom() -> int | None:
    """Bytes the soft RLIMIT_AS / RLIMIT_DATA still allow this process (None: no limit)."""
    import resource

    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
    except OSError:
        return None
    headroom = None
    for limit, field in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft, _ = resource.getrlimit(limit)
        if soft == resource.RLIM_INFINITY or field not in fields:
            continue
        left = max(soft - int(fields[field].split()[0]) * 1024, 0)
        headroom = left if headroom is None else min(headroom, left)
    return headroom


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed: CUDA's out-of-memory error, or the CPU
    allocator's "can't allocate memory" (no memory left, or `ulimit -v`)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


@dataclass(frozen=True)
class MemoryFit:
    """Live bytes of a training forward and backward pass, op by op, as lines in the
    micro-batch size: after op t, `fixed[t] + batch * per_image[t]` (gradients and weight casts
    are fixed, activations grow with the batch). The peak is the largest over the ops."""

    fixed: torch.Tensor  # float64 (ops,)
    per_image: torch.Tensor  # float64 (ops,)

    def need(self, batch: int) -> float:
        """Peak bytes of a micro-batch of `batch` images."""
        return (self.fixed + batch * self.per_image).max().item()

    def largest_batch(self, budget: float) -> int:
        """The largest micro-batch whose peak stays within `budget` (0: not even one image)."""
        if self.need(1) > budget:
            return 0
        grows = self.per_image > 0
        if not grows.any():
            return 2**31
        return int(((budget - self.fixed[grows]) / self.per_image[grows]).floor().min().item())


def _pass_trace(
    model: nn.Module, batch: int, precision: str, device: torch.device, training: bool
) -> tuple[list[int], int]:
    """Live bytes after each op of one pass of `batch` zero images (training: forward and
    backward, gradients included; else a forward pass without autograd), beyond what existed
    before, and their peak: on CUDA the allocator's (which rounds and caches), on CPU the
    trace's."""
    size = unwrap(model).img_size
    trace: list[int] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with LiveTensorBytes(trace) as tracker:
        images = torch.zeros(batch, 3, *size, device=device)
        if training:
            labels = torch.zeros(batch, dtype=torch.long, device=device)
            with autocast(precision, device):
                loss = model(images, labels)
            loss.backward()
        else:
            with torch.inference_mode(), autocast(precision, device):
                model(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return trace, torch.cuda.max_memory_allocated(device) - before
    return trace, tracker.peak


def measure_memory(
    model: nn.Module, precision: str, device: torch.device, budget: float, training: bool = True
) -> MemoryFit | None:
    """Measure the memory a batch needs, from passes of two and three images: training passes
    (forward and backward, as the model is set: `grad_checkpointing`), or inference passes.

    The same ops run for any batch of two or more (one image takes a few others); each op's
    live bytes are a line in the batch size, so two passes give every line and the peak of any
    micro-batch, op by op (not just the small passes' peak, which the gradients may dominate).
    On CUDA the lines are scaled by what the allocator used beyond the tensors themselves.
    When two images do not fit, one image is measured. The model is left without gradients.

    Returns:
        None when not even the probe of one image can be allocated, or when its input alone
        exceeds `budget` (then nothing is allocated).
    """
    bare = unwrap(model)
    (height, width), (rows, cols) = bare.img_size, bare.grid_size
    # At least the float32 input and the tokens (2 bytes each, or more), kept for every block in
    # training: a probe that cannot fit is not run.
    kept = len(bare.encoder.blocks) if training else 1
    if 4 * 3 * height * width + 2 * rows * cols * bare.config.hidden_size * kept > budget:
        return None

    def measure(batch: int) -> tuple[list[int], int] | None:
        model.zero_grad(set_to_none=True)  # every pass allocates its gradients
        try:
            return _pass_trace(model, batch, precision, device, training)
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            return None
        finally:
            model.zero_grad(set_to_none=True)

    two = measure(2)
    if two is None or two[1] > budget:
        one = measure(1)
        if one is None:
            return None
        if two is None or one[1] > budget:  # what one image needs, all taken as per image
            return _fit_line((0, ([0], 0)), (1, one))
        return _fit_line((1, one), (2, two))
    three = measure(3)
    return (
        _fit_line((2, two), (3, three)) if three is not None else _fit_line((0, ([0], 0)), (2, two))
    )


def memory_amount(nbytes: float) -> str:
    """`nbytes` for a message: "about 1.5 GB", or MB below one GB."""
    if nbytes >= 2**30:
        return f"about {nbytes / 2**30:.1f} GB"
    return f"about {nbytes / 2**20:.1f} MB"


def _fit_line(
    a: tuple[int, tuple[list[int], int]], b: tuple[int, tuple[list[int], int]]
) -> MemoryFit:
    """The lines through two passes (batch, (trace, peak)): op by op where both ran the same
    ops, else through the two peaks."""
    (batch_a, (trace_a, peak_a)), (batch_b, (trace_b, peak_b)) = a, b
    if len(trace_a) != len(trace_b):
        trace_a, trace_b = [peak_a], [peak_b]
    low = torch.tensor(trace_a, dtype=torch.float64)
    high = torch.tensor(trace_b, dtype=torch.float64)
    scale = max(1.0, peak_b / max(max(trace_b), 1))  # the CUDA allocator's rounding and caching
    per_image = (high - low) * scale / (batch_b - batch_a)
    return MemoryFit(low * scale - batch_a * per_image, per_image)


# --------------------------------------------------------------------------------------------
# Logging


def top_k(
    logits: torch.Tensor, k: int = 5, names: Sequence[str] | None = None
) -> list[list[tuple[str, float]]]:
    """The `k` most probable classes of every image, as (label, probability) pairs.

    Labels are class names when `names` is given, else the class indices as strings.
    """
    probs = logits.float().softmax(dim=-1)  # (B, classes)
    values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [
        [
            (names[i] if names is not None else str(i), float(p))
            for p, i in zip(row_p.tolist(), row_i.tolist(), strict=True)
        ]
        for row_p, row_i in zip(values, indices, strict=True)
    ]
