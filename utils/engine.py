"""What the scripts share: precision (autocast, grad scalers), evaluation, unwrapping, logging.

`train.py` and `eval.py` both import this module and never each other, so evaluation during
training and `eval.py` are one code path and give the same numbers.
"""

from __future__ import annotations

import argparse
import logging
import os
import weakref
from contextlib import nullcontext

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
    "StaticGradScaler",
    "autocast",
    "available_bytes",
    "evaluate",
    "make_scaler",
    "resolve_precision",
    "training_memory",
    "unwrap",
]

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# Precision


def resolve_precision(args: argparse.Namespace, device: torch.device) -> str:
    """The precision to run at, from `--precision` or `--fp16 --fp16_opt_level`."""
    precision = args.precision
    if args.fp16:
        from_fp16 = "fp32" if args.fp16_opt_level == "O0" else "fp16"
        if precision is not None and precision != from_fp16:
            raise UserError(
                f"--fp16 --fp16_opt_level {args.fp16_opt_level} means {from_fp16}, but "
                f"--precision {precision} was given too; pass only one of them."
            )
        if args.fp16_opt_level == "O3":
            logger.warning(
                "Apex O3 (pure fp16 without fp32 master weights) is not offered; running as "
                "O2: fp16 autocast with fp32 weights and loss scaling."
            )
        precision = from_fp16
    precision = precision or "fp32"
    if precision == "fp16" and device.type != "cuda":
        logger.warning("fp16 needs CUDA; running with bfloat16 autocast on the %s.", device.type)
        precision = "bf16"
    if args.loss_scale and precision != "fp16":
        logger.warning("--loss_scale %g is ignored: it applies to fp16 only.", args.loss_scale)
    return precision


def autocast(precision: str, device: torch.device):
    """The autocast context for `precision` (a no-op for fp32)."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return nullcontext()
    if dtype == torch.float16 and device.type != "cuda":
        dtype = torch.bfloat16  # the CPU has no fp16 autocast worth using
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
    before entering (add that yourself).
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
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
        return out


def available_bytes(device: torch.device) -> int | None:
    """Memory this process can still take on `device`, or None where that cannot be told.

    CUDA: free device memory plus what PyTorch's allocator holds unused. CPU (Linux):
    `MemAvailable`, shared by the processes of this node (`LOCAL_WORLD_SIZE`).
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
    return available // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


def training_memory(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: str
) -> tuple[int, int]:
    """Bytes one forward and backward pass allocates beyond what existed before it.

    Returns:
        (what the forward pass keeps for the backward pass, which grows linearly with the
        batch; the peak of forward and backward, gradients included). CUDA: the allocator's
        statistics; CPU: every new tensor storage, tracked op by op.
    """
    device = images.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with autocast(precision, device):
            loss = model(images, labels)
        kept = torch.cuda.memory_allocated(device) - before
        loss.backward()
        torch.cuda.synchronize(device)
        return kept, torch.cuda.max_memory_allocated(device) - before
    with LiveTensorBytes() as tracker:
        with autocast(precision, device):
            loss = model(images, labels)
        kept = tracker.current
        loss.backward()
    return kept, tracker.peak


# --------------------------------------------------------------------------------------------
# Logging
