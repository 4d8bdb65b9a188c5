"""The memory plan: whether a training micro-batch or an evaluation batch fits the device, what
fits instead (the message names the flags and their figures), the evaluation batch when none is
given, and its measurements: live tensor bytes op by op, what this process may still allocate,
and each op's bytes as a line in the batch size."""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from utils.infra.dist_utils import unwrap
from utils.infra.errors import UserError

__all__ = [
    "BUDGET_SHARE",
    "CPU_EVAL_BATCH",
    "EVAL_BATCH_CAP",
    "PEAK_MARGIN",
    "LiveTensorBytes",
    "MemoryFit",
    "available_bytes",
    "check_evaluation_memory",
    "check_training_memory",
    "check_weights_memory",
    "evaluation_batch_size",
    "is_out_of_memory",
    "largest_planned_batch",
    "measure_memory",
    "memory_amount",
    "memory_options",
    "out_of_memory",
    "planned_evaluation_batch",
    "planned_need",
]

logger = logging.getLogger(__name__)

# The plan's margins, its one answer to "does it fit": a batch fits when its measured peak plus
# 5 % stays within 90 % of the memory left (headroom for what the probe does not measure).
BUDGET_SHARE = 0.9  # of the memory left
PEAK_MARGIN = 1.05  # on a measured peak
# --eval_batch_size left out: off CUDA, the original port's 64 per process; on CUDA, the largest
# batch that fits, but no more than this (larger batches evaluate no faster).
CPU_EVAL_BATCH = 64
EVAL_BATCH_CAP = 1024


def planned_need(fit: MemoryFit, batch: int) -> float:
    """The bytes the plan counts for a batch of `batch` images: its peak, plus the margin."""
    return PEAK_MARGIN * fit.need(batch)


def largest_planned_batch(fit: MemoryFit | None, budget: float) -> int:
    """The largest batch whose `planned_need` stays within `budget` (0: not even one image, or
    nothing could be measured)."""
    return 0 if fit is None else fit.largest_batch(budget / PEAK_MARGIN)


def check_training_memory(
    model: nn.Module,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    *,
    per_process: int,
    accumulation_steps: int,
    grad_checkpointing: bool,
) -> None:
    """Stop before the first step if one micro-batch cannot fit on `device`.

    Forward and backward passes of two and three images give every op's live memory as a line
    in the micro-batch size (`measure_memory`), hence the micro-batch's peak; that (plus 5 %) is
    compared with 90 % of the memory the device has left.
    When it does not fit, the message lists what fits: `--grad_checkpointing`, more
    accumulation, both. Draws nothing from the random generators a run (or its resume)
    depends on.

    Args:
        model: the bare model, on `device`, in training mode.
        autocast: makes the context the passes run in (the run's precision).
        per_process: images per process and optimizer step, in `accumulation_steps`
            micro-batches (`--gradient_accumulation_steps`).
        grad_checkpointing: `--grad_checkpointing`.
    """
    available = available_bytes(device)
    if available is None:
        return
    budget = BUDGET_SHARE * available
    fits = {grad_checkpointing: _probe_memory(model, device, budget, grad_checkpointing, autocast)}
    micro_batch = per_process // accumulation_steps
    current = fits[grad_checkpointing]
    need = None if current is None else planned_need(current, micro_batch)
    if need is not None and need <= budget:
        return
    if not grad_checkpointing:
        fits[True] = _probe_memory(model, device, budget, True, autocast)
    mode = " with --grad_checkpointing" if grad_checkpointing else ""
    size = _image_size(model)
    if need is None:
        problem = (
            f"Not even one image at {size} can be measured going forward and backward on "
            f"{device}{mode}"
        )
    else:
        problem = (
            f"A micro-batch of {micro_batch} images at {size} needs {memory_amount(need)} on "
            f"{device} for activations and gradients{mode}"
        )
    options = memory_options(
        fits,
        budget,
        per_process=per_process,
        accumulation_steps=accumulation_steps,
        grad_checkpointing=grad_checkpointing,
    )
    raise UserError(f"{problem}, but {memory_amount(available)} are available. {options}")


def out_of_memory(
    model: nn.Module,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    *,
    failed: int,
    per_process: int,
    accumulation_steps: int,
    grad_checkpointing: bool,
) -> UserError:
    """The message for a micro-batch of `failed` images that ran out of memory: what fits,
    measured again now that the failed pass's memory (its gradients too) is free. The other
    arguments are `check_training_memory`'s."""
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    available = available_bytes(device)
    advice = (
        "Use more --gradient_accumulation_steps (the total batch stays the same), "
        "--grad_checkpointing, or a smaller --train_batch_size or --img_size."
    )
    if available is not None:
        budget = BUDGET_SHARE * available
        fits = {
            mode: _probe_memory(model, device, budget, mode, autocast) for mode in (False, True)
        }
        advice = memory_options(
            fits,
            budget,
            per_process=per_process,
            accumulation_steps=accumulation_steps,
            grad_checkpointing=grad_checkpointing,
            failed=failed,
        )
    with_ckpt = " with --grad_checkpointing" if grad_checkpointing else ""
    return UserError(
        f"{device} ran out of memory on a micro-batch of {failed} images{with_ckpt}. {advice}"
    )


def check_evaluation_memory(
    model: nn.Module,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    batch_size: int,
) -> None:
    """Stop before evaluating if one batch of `batch_size` images (`--eval_batch_size`) cannot
    fit on `device`: inference passes of two and three images give its peak (as the training
    plan does)."""
    available = available_bytes(device)
    if available is None:
        return
    budget = BUDGET_SHARE * available
    fit = _evaluation_fit(model, device, budget, autocast)
    most = largest_planned_batch(fit, budget)
    if most >= batch_size:
        return
    if most == 0:
        raise _no_image_fits(model, device, available)
    raise UserError(
        f"A batch of {batch_size} images at {_image_size(model)} needs "
        f"{memory_amount(planned_need(fit, batch_size))} on {device}, but "
        f"{memory_amount(available)} are available; use --eval_batch_size {most} or less."
    )


def evaluation_batch_size(
    requested: int | None,
    model: nn.Module,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    *,
    cap: int,
    keep: int = 0,
    check: bool = False,
) -> int:
    """The images per process and evaluation batch, logged with where the figure comes from:
    `requested` (`--eval_batch_size`) as given; left out, `planned_evaluation_batch` on CUDA
    and `CPU_EVAL_BATCH` elsewhere (the CPU's memory is not worth a measurement there).

    Args:
        model, autocast, cap, keep: `planned_evaluation_batch`'s.
        check: stop, as `check_evaluation_memory` does, if a batch that is not planned cannot
            fit.
    """
    if requested is None and device.type == "cuda":
        return planned_evaluation_batch(model, device, autocast, cap=cap, keep=keep)
    batch = CPU_EVAL_BATCH if requested is None else requested
    if check:
        check_evaluation_memory(model, device, autocast, batch)
    source = "--eval_batch_size" if requested is not None else "the default without CUDA"
    logger.info("Evaluation batch: %d images per process (%s).", batch, source)
    return batch


def planned_evaluation_batch(
    model: nn.Module,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    *,
    cap: int,
    keep: int = 0,
) -> int:
    """The largest evaluation batch whose `planned_need` fits beside what `device` holds now
    and `keep` bytes more, but at most `cap` and `EVAL_BATCH_CAP`; logged with what bounds it.

    Measured as `check_evaluation_memory` measures (`_evaluation_fit`).

    Args:
        model: the bare model, on `device`.
        autocast: makes the context evaluation runs in (the run's precision).
        cap: this process's share of the largest split it evaluates (a larger batch only
            allocates more).
        keep: bytes that are not allocated now but will be while evaluation runs (training keeps
            its gradients between steps).

    Raises:
        UserError: not even one image fits.
    """
    available = available_bytes(device)
    if available is None:
        logger.info(
            "Evaluation batch: %d images per process (the default: the memory left on %s "
            "cannot be told).",
            CPU_EVAL_BATCH,
            device,
        )
        return CPU_EVAL_BATCH
    left = max(available - keep, 0)
    budget = BUDGET_SHARE * left
    most = largest_planned_batch(_evaluation_fit(model, device, budget, autocast), budget)
    if most == 0:
        raise _no_image_fits(model, device, left)
    batch = min(most, max(cap, 1), EVAL_BATCH_CAP)
    if batch == most:
        bound = f"the largest that fits in the {memory_amount(left)} left"
    elif batch == cap:
        bound = f"this process's share of the largest split; up to {most} would fit"
    else:
        bound = f"at most {EVAL_BATCH_CAP}; up to {most} would fit"
    logger.info("Evaluation batch: %d images per process (%s).", batch, bound)
    return batch


def _evaluation_fit(
    model: nn.Module,
    device: torch.device,
    budget: float,
    autocast: Callable[[], AbstractContextManager],
) -> MemoryFit | None:
    """`measure_memory` of inference passes of two and three images in evaluation mode, drawing
    nothing from the random generators; `model` is left in the mode it was in."""
    was = model.training
    model.eval()
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            return measure_memory(model, device, budget, training=False, autocast=autocast)
    finally:
        model.train(was)


def _no_image_fits(model: nn.Module, device: torch.device, available: float) -> UserError:
    return UserError(
        f"Not even one image at {_image_size(model)} fits for evaluation on {device} "
        f"({memory_amount(available)} available); evaluate at a smaller --img_size."
    )


def check_weights_memory(model: nn.Module, device: torch.device) -> None:
    """Stop before allocating a model's weights on `device` if they cannot fit: `model` holds
    only their shapes (built on the meta device), so nothing is allocated to ask. The position
    embeddings grow with the image size: an absurd `--img_size` is caught here."""
    available = available_bytes(device)
    need = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if available is None or need <= BUDGET_SHARE * available:
        return
    name = getattr(getattr(model, "config", None), "name", type(model).__name__)
    raise UserError(
        f"The weights of {name} at {_image_size(model)} need {memory_amount(need)} on {device}, "
        f"but {memory_amount(available)} are available; use a smaller --img_size."
    )


def memory_options(
    fits: dict[bool, MemoryFit | None],
    budget: float,
    *,
    per_process: int,
    accumulation_steps: int,
    grad_checkpointing: bool,
    failed: int | None = None,
) -> str:
    """What fits in `budget` bytes instead of this run's micro-batch, with the figures.

    `fits` holds the measured line without (False) and with (True) checkpointing. Options keep
    the total batch: checkpointing at this micro-batch, the fewest accumulation steps that fit
    without it, and the largest micro-batch that fits with it. A micro-batch of `failed`
    images ran out of memory as this run is set (whatever the measurement says).
    """
    micro_batch = per_process // accumulation_steps

    def largest(checkpointing: bool) -> int:
        most = largest_planned_batch(fits.get(checkpointing), budget)
        if failed is not None and checkpointing == grad_checkpointing:
            most = min(most, failed - 1)
        return most

    def fewest_steps(checkpointing: bool) -> int | None:
        """The fewest accumulation steps whose micro-batch fits (None: no micro-batch fits)."""
        most = largest(checkpointing)
        return next(
            (
                k
                for k in range(1, per_process + 1)
                if per_process % k == 0 and per_process // k <= most
            ),
            None,
        )

    options = []
    with_ckpt, without = fits.get(True), fits.get(False)
    if not grad_checkpointing and largest(True) >= micro_batch:
        need = planned_need(with_ckpt, micro_batch)
        options.append(
            f"--grad_checkpointing (micro-batches of {micro_batch} as now: {memory_amount(need)}; "
            "the blocks run forward twice, so each step is slower)"
        )
    steps = fewest_steps(False)
    if not grad_checkpointing and steps is not None and steps != accumulation_steps:
        micro = per_process // steps
        options.append(
            f"--gradient_accumulation_steps {steps} (micro-batches of {micro}: "
            f"{memory_amount(planned_need(without, micro))})"
        )
    steps_ckpt = fewest_steps(True)
    if steps_ckpt is not None and (grad_checkpointing or largest(True) < micro_batch):
        micro = per_process // steps_ckpt
        options.append(
            f"--grad_checkpointing --gradient_accumulation_steps {steps_ckpt} (micro-batches of "
            f"{micro}, the largest that fits with checkpointing: "
            f"{memory_amount(planned_need(with_ckpt, micro))})"
        )
    if not options:
        return (
            "Not even one image fits, with or without --grad_checkpointing: use a smaller "
            "--img_size (or a device with more memory)."
        )
    most = largest(True)
    return (
        "These fit, with the same total batch: "
        + "; or ".join(options)
        + (f". With --grad_checkpointing, micro-batches of up to {most} images fit" if most else "")
        + ". Or use a smaller --train_batch_size."
    )


def _probe_memory(
    model: nn.Module,
    device: torch.device,
    budget: float,
    grad_checkpointing: bool,
    autocast: Callable[[], AbstractContextManager],
) -> MemoryFit | None:
    """`measure_memory` of training passes with or without checkpointing (restored after),
    drawing nothing from the random generators."""
    was = model.encoder.grad_checkpointing
    model.set_grad_checkpointing(grad_checkpointing)
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            return measure_memory(model, device, budget, autocast=autocast)
    finally:
        model.set_grad_checkpointing(was)


def _image_size(model: nn.Module) -> str:
    """The model's input size for a message: "224x224"."""
    return "x".join(map(str, unwrap(model).img_size))


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
