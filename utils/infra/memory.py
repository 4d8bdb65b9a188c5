"""The memory plan's measurements: live tensor bytes op by op, what this process may still
allocate, and the micro-batch that fits a budget."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from utils.infra.dist_utils import unwrap

__all__ = [
    "LiveTensorBytes",
    "MemoryFit",
    "available_bytes",
    "is_out_of_memory",
    "measure_memory",
    "memory_amount",
]

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
    model: nn.Module,
    batch: int,
    device: torch.device,
    training: bool,
    autocast: Callable[[], AbstractContextManager],
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
            with autocast():
                loss = model(images, labels)
            loss.backward()
        else:
            with torch.inference_mode(), autocast():
                model(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return trace, torch.cuda.max_memory_allocated(device) - before
    return trace, tracker.peak


def measure_memory(
    model: nn.Module,
    device: torch.device,
    budget: float,
    training: bool = True,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> MemoryFit | None:
    """Measure the memory a batch needs, from passes of two and three images: training passes
    (forward and backward, as the model is set: `grad_checkpointing`), or inference passes.

    The same ops run for any batch of two or more (one image takes a few others); each op's
    live bytes are a line in the batch size, so two passes give every line and the peak of any
    micro-batch, op by op (not just the small passes' peak, which the gradients may dominate).
    On CUDA the lines are scaled by what the allocator used beyond the tensors themselves.
    When two images do not fit, one image is measured. The model is left without gradients.
    `autocast` makes the context the passes run in (the run's precision).

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
            return _pass_trace(model, batch, device, training, autocast)
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
