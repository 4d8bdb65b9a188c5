"""Fine-tune a Vision Transformer with the official recipe (REFERENCE.md §3).

SGD with momentum 0.9, linear warmup then cosine or linear decay counted from step 1, global
gradient-norm clipping, gradient accumulation that is exactly the big batch, mixed precision with
`torch.amp`, and `torchrun` data parallelism with sharded evaluation. Every flag of the original
PyTorch port keeps its name and default, so its commands run unchanged:

    python3 train.py --name cifar10-100_500 --dataset cifar10 --model_type ViT-B_16 \
        --pretrained_dir checkpoint/ViT-B_16.npz [--fp16 --fp16_opt_level O2]

Precision (`--precision`, or the Apex-era `--fp16 --fp16_opt_level`):

    fp32            O0, or no flag: plain float32.
    fp16            O1, O2 (and O3, which Apex ran as pure fp16 without fp32 master weights;
                    here it runs as O2): float16 autocast with fp32 weights and a GradScaler,
                    dynamic for `--loss_scale 0`, fixed at `--loss_scale` otherwise. Without
                    CUDA it falls back to bfloat16 autocast on the CPU, with a warning.
    bf16            bfloat16 autocast, fp32 weights, no loss scaling.

Distributed: `torchrun --nproc_per_node N train.py ...` (NCCL on GPUs, gloo on CPU).
`--train_batch_size` is the total batch of one optimizer step over all processes and
accumulation steps.

Resuming: besides the best `<output_dir>/<name>_checkpoint.bin`, the last training state goes to
`<output_dir>/<name>_last.pt` every `--save_every` steps, at the end, and when SIGINT/SIGTERM
stops the run (after the current step). The same command plus `--resume` (or `--resume PATH`)
continues exactly where it was saved, also after a `kill -9`. Every write is atomic.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from models.checkpoint import clean_state_dict, load_npz
from models.configs import checked_img_size, get_config, model_names
from models.modeling import VisionTransformer
from utils import checkpoint_io as cio
from utils.data_utils import DATASETS, get_loader
from utils.dist_utils import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed
from utils.errors import UserError, run_cli
from utils.optim import DECAY_TYPES, make_scheduler

logger = logging.getLogger("train")

PRECISIONS = ("fp32", "fp16", "bf16")
OPT_LEVELS = ("O0", "O1", "O2", "O3")
AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
NON_FINITE_PATIENCE = 3  # consecutive NaN/inf losses (without a grad scaler) before giving up
# Flags whose change between a run and its resume makes it differ from an uninterrupted run.
RESUME_SENSITIVE = (
    "dataset",
    "train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "num_steps",
    "warmup_steps",
    "decay_type",
    "seed",
)


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The original port's flags (same names and defaults), plus the new ones."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # The original port's flags.
    p.add_argument("--name", required=True, help="Name of this run (checkpoint and log names).")
    p.add_argument("--dataset", choices=DATASETS, default="cifar10")
    p.add_argument("--model_type", choices=model_names(), default="ViT-B_16")
    p.add_argument(
        "--pretrained_dir",
        default="checkpoint/ViT-B_16.npz",
        help="Official .npz checkpoint to fine-tune from, or 'none' to train from scratch.",
    )
    p.add_argument("--output_dir", default="output", help="Where the best checkpoint goes.")
    p.add_argument("--img_size", type=int, default=224, help="Input resolution.")
    p.add_argument(
        "--train_batch_size",
        type=int,
        default=512,
        help="Total batch per optimizer step, over all processes and accumulation steps.",
    )
    p.add_argument("--eval_batch_size", type=int, default=64, help="Per process.")
    p.add_argument(
        "--eval_every", type=int, default=100, help="Evaluate every N steps (0: only at the end)."
    )
    p.add_argument("--learning_rate", type=float, default=3e-2, help="Peak SGD learning rate.")
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--num_steps", type=int, default=10000, help="Optimizer steps in total.")
    p.add_argument("--decay_type", choices=DECAY_TYPES, default="cosine")
    p.add_argument("--warmup_steps", type=int, default=500)
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="0 turns clipping off.")
    p.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=-1,
        help="Set by older launchers; torchrun sets LOCAL_RANK instead (both work).",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--fp16", action="store_true", help="Alias of --precision fp16.")
    p.add_argument(
        "--fp16_opt_level",
        choices=OPT_LEVELS,
        default="O2",
        help="Apex opt level with --fp16: O0 = fp32; O1, O2, O3 = fp16 autocast.",
    )
    p.add_argument(
        "--loss_scale",
        type=float,
        default=0,
        help="fp16 loss scale: 0 = dynamic, a positive value = that fixed scale.",
    )
    # New flags.
    p.add_argument(
        "--data_dir",
        default="./data",
        help="CIFAR download folder, or the image folder root (train/, val/ or test/).",
    )
    p.add_argument(
        "--num_workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="Data-loading worker processes per training process.",
    )
    p.add_argument("--log_dir", default=None, help="TensorBoard folder (default logs/<name>).")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="Default fp32.")
    p.add_argument("--compile", action="store_true", help="torch.compile the model.")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="Continue a run: from PATH, or without a value from <output_dir>/<name>_last.pt.",
    )
    p.add_argument(
        "--save_every",
        type=int,
        default=100,
        help="Save the last training state every N steps (0: only at the end or when stopped).",
    )
    args = p.parse_args(argv)
    if args.log_dir is None:
        args.log_dir = os.path.join("logs", args.name)
    return args


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
# Set-up


def setup_logging(info: DistInfo) -> None:
    """Log to stderr (INFO on rank 0, warnings only elsewhere), unless logging is set up."""
    logging.basicConfig(
        format=f"%(asctime)s %(levelname)s [rank {info.rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if info.is_main else logging.WARNING,
    )


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_args(args: argparse.Namespace, info: DistInfo) -> None:
    """Validate the flags; sets `args.micro_batch_size`, `rank`, `local_rank`, `world_size`."""
    checked_img_size(get_config(args.model_type), args.img_size)
    for flag in ("train_batch_size", "eval_batch_size", "num_steps", "gradient_accumulation_steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if args.warmup_steps < 0 or args.num_workers < 0 or args.save_every < 0:
        raise UserError("--warmup_steps, --num_workers and --save_every cannot be negative.")
    per_step = info.world_size * args.gradient_accumulation_steps
    if args.train_batch_size % per_step:
        suggestion = max(per_step, args.train_batch_size // per_step * per_step)
        raise UserError(
            f"--train_batch_size {args.train_batch_size} is the total batch of one optimizer step "
            f"and must divide evenly over {info.world_size} process(es) x "
            f"{args.gradient_accumulation_steps} accumulation step(s) = {per_step}; use a "
            f"multiple of {per_step}, e.g. {suggestion}."
        )
    args.micro_batch_size = args.train_batch_size // per_step
    args.rank, args.local_rank, args.world_size = info.rank, info.local_rank, info.world_size


def read_checkpoint(args: argparse.Namespace) -> dict[str, np.ndarray] | None:
    """The official `.npz` of `--pretrained_dir` (None for 'none'); a missing file names its URL."""
    if args.pretrained_dir.lower() == "none":
        logger.warning(
            "--pretrained_dir none: training %s from scratch (random initialisation). ViT needs "
            "pre-training to do well on small datasets; fine-tune an official checkpoint instead.",
            args.model_type,
        )
        return None
    return load_npz(args.pretrained_dir, args.model_type)


def build_model(
    args: argparse.Namespace, num_classes: int, weights: dict[str, np.ndarray] | None = None
) -> VisionTransformer:
    """The model, with official `weights` loaded (head zeroed, position embeddings resized)."""
    config = get_config(args.model_type)
    if weights is None:
        model = VisionTransformer(config, args.img_size, num_classes=num_classes, zero_head=True)
    else:
        model = VisionTransformer.from_pretrained(
            config, weights, args.img_size, num_classes=num_classes, zero_head=True
        )
        logger.info("Loaded %s (head re-initialised to zero).", args.pretrained_dir)
    params = sum(p.numel() for p in model.parameters())
    logger.info("%s: %.2fM parameters, %d classes.", config.name, params / 1e6, num_classes)
    return model


# --------------------------------------------------------------------------------------------
# Evaluation


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and/or torch.compile wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


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
    for images, labels in tqdm(test_loader, desc="Validating", disable=not progress, leave=False):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
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
# Saving


def best_checkpoint_path(args: argparse.Namespace) -> Path:
    """`<output_dir>/<name>_checkpoint.bin`, the best model (the original port's file)."""
    return Path(args.output_dir) / f"{args.name}_checkpoint.bin"


def save_best(
    args: argparse.Namespace,
    model: nn.Module,
    class_names: list[str],
    step: int,
    accuracy: float,
    precision: str,
) -> Path:
    """Write the best model (a plain state dict) and its `.json` sidecar, both atomically."""
    path = best_checkpoint_path(args)
    plain = unwrap(model)
    state = clean_state_dict({k: v.detach().cpu() for k, v in plain.state_dict().items()})
    cio.atomic_save(state, path)
    cio.write_sidecar(
        path,
        model_type=plain.config.name,
        img_size=list(plain.img_size),
        num_classes=plain.num_classes,
        dataset=args.dataset,
        class_names=class_names,
        step=step,
        accuracy=accuracy,
        precision=precision,
    )
    return path


# --------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainState:
    """Progress of a run; what the last-state checkpoint stores besides the training objects.

    Attributes:
        step: optimizer steps done (the schedule's next rate is lr(step + 1)).
        micro_step: micro-batches consumed by this process since it started.
        epoch: current pass over the training set (seeds the sampler and augmentation).
        batches_in_epoch: micro-batches of `epoch` consumed so far (a resume skips them).
        best_accuracy: best test accuracy so far (-1 before the first evaluation).
        best_step: step of `best_accuracy`.
    """

    step: int = 0
    micro_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_accuracy: float = -1.0
    best_step: int = 0


@dataclass
class Trainer:
    """The objects one optimizer step needs.

    Attributes:
        model: the bare model (what is saved).
        net: the model to train (compiled and/or DDP-wrapped).
        eval_net: the model to evaluate (compiled when asked, never DDP).
        optimizer: SGD with momentum 0.9.
        scheduler: the official per-step schedule.
        scaler: GradScaler (fp16) or None.
        precision: "fp32", "fp16" or "bf16".
    """

    model: VisionTransformer
    net: nn.Module
    eval_net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | StaticGradScaler | None
    precision: str


def micro_batches(
    loader: DataLoader, state: TrainState, skip: int = 0
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless micro-batches, epoch after epoch, reshuffled each epoch (`set_epoch`).

    Args:
        loader: the training loader (a `DistributedSampler`; the dataset may have `set_epoch`).
        state: `epoch` says where to start; `epoch`, `batches_in_epoch` and `micro_step` are
            kept up to date.
        skip: batches of the first epoch already consumed before a resume.
    """
    while True:
        loader.sampler.set_epoch(state.epoch)
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(state.epoch)
        state.batches_in_epoch = skip
        for batch in islice(loader, skip, None):
            state.micro_step += 1
            state.batches_in_epoch += 1
            yield batch
        skip = 0
        state.epoch += 1


def accumulate_gradients(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    scaler,
    precision: str,
    device: torch.device,
) -> torch.Tensor:
    """Forward and backward over `batches` (the accumulation micro-batches of this process).

    Gradients of all micro-batches add up to the gradient of their mean loss, i.e. of the big
    batch; DDP synchronises only on the last one.

    Returns:
        The mean loss over the micro-batches (detached).
    """
    total = torch.zeros((), device=device)
    for i, (images, labels) in enumerate(batches):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        last = i == len(batches) - 1
        sync = (
            nullcontext()
            if last or not isinstance(model, DistributedDataParallel)
            else model.no_sync()
        )
        with sync:
            with autocast(precision, device):
                loss = model(images, labels)
            scaled = loss.float() / len(batches)
            (scaler.scale(scaled) if scaler else scaled).backward()
        total += loss.detach().float()
    return total / len(batches)


def apply_update(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler, max_grad_norm: float
) -> None:
    """Unscale (fp16), clip the global gradient norm, and take the optimizer step."""
    if scaler:
        scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def wrap_model(
    model: nn.Module, args: argparse.Namespace, info: DistInfo
) -> tuple[nn.Module, nn.Module]:
    """torch.compile (with --compile), then DDP when there are several processes.

    Returns:
        (the model to train, the model to evaluate: compiled when asked, never DDP).
    """
    if args.compile:
        model = torch.compile(model)
    eval_model = model
    if info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    return model, eval_model


def make_trainer(args: argparse.Namespace, model: VisionTransformer, info: DistInfo) -> Trainer:
    """Move the model to the device and build optimizer, schedule, scaler and wrappers."""
    precision = resolve_precision(args, info.device)
    model.to(info.device).train()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.learning_rate, momentum=0.9, weight_decay=args.weight_decay
    )
    scheduler = make_scheduler(optimizer, args.num_steps, args.warmup_steps, args.decay_type)
    scaler = make_scaler(precision, args.loss_scale)
    net, eval_net = wrap_model(model, args, info)
    return Trainer(model, net, eval_net, optimizer, scheduler, scaler, precision)


def resume(args: argparse.Namespace, trainer: Trainer, path: Path, info: DistInfo) -> TrainState:
    """Restore a last-state checkpoint; call last before the loop (it restores the RNG)."""
    saved = cio.load_training_state(
        path,
        model=trainer.model,
        optimizer=trainer.optimizer,
        scheduler=trainer.scheduler,
        scaler=trainer.scaler,
        rank=info.rank,
    )
    for flag in RESUME_SENSITIVE:
        if info.is_main and flag in saved.args and saved.args[flag] != getattr(args, flag):
            logger.warning(
                "Resuming with --%s %s, but the saved run used %s: the result will differ from "
                "an uninterrupted run.",
                flag,
                getattr(args, flag),
                saved.args[flag],
            )
    logger.info(
        "Resumed from %s at step %d (epoch %d, batch %d; best accuracy %.4f).",
        path,
        saved.step,
        saved.epoch,
        saved.batches_in_epoch,
        saved.best_accuracy,
    )
    return TrainState(
        step=saved.step,
        epoch=saved.epoch,
        batches_in_epoch=saved.batches_in_epoch,
        best_accuracy=saved.best_accuracy,
        best_step=saved.best_step,
    )


def save_last_state(
    args: argparse.Namespace, trainer: Trainer, state: TrainState, info: DistInfo
) -> None:
    """Write `<output_dir>/<name>_last.pt` on rank 0, with every rank's RNG state; all wait."""
    rng = [cio.get_rng_state()]
    if info.distributed:
        rng = [None] * info.world_size
        dist.all_gather_object(rng, cio.get_rng_state())
    path = cio.last_state_path(args.output_dir, args.name)
    if info.is_main:
        cio.save_training_state(
            path,
            model=trainer.model,
            optimizer=trainer.optimizer,
            scheduler=trainer.scheduler,
            scaler=trainer.scaler,
            step=state.step,
            best_accuracy=state.best_accuracy,
            epoch=state.epoch,
            batches_in_epoch=state.batches_in_epoch,
            args=args,
            rng_states=rng,
            best_step=state.best_step,
        )
    barrier()


def save_if_due(
    args: argparse.Namespace,
    trainer: Trainer,
    state: TrainState,
    info: DistInfo,
    writer,
    stopping: bool,
) -> None:
    """Save the last state every `--save_every` steps, at the last step and when stopping."""
    periodic = args.save_every > 0 and state.step % args.save_every == 0
    if not (stopping or periodic or state.step == args.num_steps):
        return
    if writer is not None:
        writer.flush()  # TensorBoard is never behind the last state
    save_last_state(args, trainer, state, info)


def train_step(
    args: argparse.Namespace,
    trainer: Trainer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    guard: cio.NonFiniteGuard | None,
    step: int,
    info: DistInfo,
) -> torch.Tensor:
    """One optimizer step (the `step`-th); the update is skipped when the loss is not finite.

    Without a grad scaler, `guard` sees the loss averaged over all processes before anything is
    applied, so every rank skips alike and the run stops after a few non-finite losses in a row
    (`NonFiniteLossError`). The schedule advances either way, as the fp16 scaler's skips do.

    Returns:
        The loss, averaged over micro-batches and processes.
    """
    trainer.optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradients(
        trainer.net, batches, trainer.scaler, trainer.precision, info.device
    )
    loss = all_reduce_sum(loss) / info.world_size
    if guard is None or guard.check(loss, step):
        apply_update(trainer.net, trainer.optimizer, trainer.scaler, args.max_grad_norm)
    else:
        trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scheduler.step()
    return loss


def train(
    args: argparse.Namespace,
    model: VisionTransformer,
    train_loader: DataLoader,
    test_loader: DataLoader,
    info: DistInfo,
    resume_from: Path | None = None,
) -> dict[str, float]:
    """Run the schedule from the start or `resume_from`, evaluating and saving on the way.

    Evaluates every `--eval_every` steps and at the end (saving the best model), saves the last
    state every `--save_every` steps, at the end and when SIGINT/SIGTERM asks to stop.

    Raises:
        cio.NonFiniteLossError: the loss stayed NaN/inf (no grad scaler); nothing more is saved.
    """
    trainer = make_trainer(args, model, info)
    log_run(args, info, train_loader, test_loader, trainer.precision)
    state = resume(args, trainer, resume_from, info) if resume_from else TrainState()
    writer = make_writer(args, info, state.step)
    stream = micro_batches(train_loader, state, skip=state.batches_in_epoch)
    guard = None if trainer.scaler else cio.NonFiniteGuard(NON_FINITE_PATIENCE)
    first_step, stopped = state.step, False
    eval_time, start = 0.0, time.perf_counter()
    bar = tqdm(
        initial=state.step,
        total=args.num_steps,
        desc="Training",
        disable=not info.is_main,
        dynamic_ncols=True,
    )
    with logging_redirect_tqdm(), bar, writer or nullcontext(), cio.GracefulExit() as stop:
        while state.step < args.num_steps:
            batches = [next(stream) for _ in range(args.gradient_accumulation_steps)]
            lr = trainer.scheduler.get_last_lr()[0]  # the rate of this update, lr(step + 1)
            state.step += 1
            loss = train_step(args, trainer, batches, guard, state.step, info)
            log_step(writer, bar, state.step, loss, lr)
            last = state.step == args.num_steps
            if last or (args.eval_every > 0 and state.step % args.eval_every == 0):
                t0 = time.perf_counter()
                evaluate_and_save(args, trainer, test_loader, info, state, writer)
                eval_time += time.perf_counter() - t0
            stopped = stop.should_stop(info.device)  # every rank, every step, same point
            save_if_due(args, trainer, state, info, writer, stopped)
            if stopped:
                if info.is_main:
                    logger.warning(
                        "Stopped by %s at step %d; saved %s. Continue with the same command "
                        "plus --resume.",
                        stop.signal_name or "a signal to another process",
                        state.step,
                        cio.last_state_path(args.output_dir, args.name),
                    )
                break
    wall = time.perf_counter() - start
    images = (state.step - first_step) * args.train_batch_size
    return {
        "best_accuracy": state.best_accuracy,
        "best_step": state.best_step,
        "step": state.step,
        "stopped": stopped,
        "wall_time": wall,
        "images_per_second": images / max(wall - eval_time, 1e-9),
    }


def log_step(writer, bar: tqdm, step: int, loss: torch.Tensor, lr: float) -> None:
    """Training loss and rate to TensorBoard and the progress bar (rank 0 only)."""
    if writer is not None:
        loss_value = loss.item()
        writer.add_scalar("train/loss", loss_value, step)
        writer.add_scalar("train/lr", lr, step)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
    bar.update(1)


def make_writer(args: argparse.Namespace, info: DistInfo, step: int = 0):
    """TensorBoard writer under `--log_dir` on rank 0; None elsewhere.

    A resumed run (`step` > 0) continues the same log, dropping the events logged after `step`
    by the interrupted run (they are logged again).
    """
    if not info.is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter  # imports TensorBoard: only when training

    return SummaryWriter(log_dir=args.log_dir, purge_step=step + 1 if step else None)


def log_run(
    args: argparse.Namespace,
    info: DistInfo,
    train_loader: DataLoader,
    test_loader: DataLoader,
    precision: str,
) -> None:
    """Say what is about to run, including how the total batch splits up."""
    logger.info(
        "Training %s on %s (%d train / %d test images, %d classes) at %dx%d, %s, %d steps, "
        "total batch %d = %d process(es) x %d accumulation step(s) x %d per forward pass.",
        args.model_type,
        args.dataset,
        len(train_loader.dataset),
        len(test_loader.dataset),
        len(train_loader.dataset.classes),
        args.img_size,
        args.img_size,
        precision,
        args.num_steps,
        args.train_batch_size,
        info.world_size,
        args.gradient_accumulation_steps,
        args.micro_batch_size,
    )
    logger.info("TensorBoard logs: %s; best checkpoint: %s", args.log_dir, args.output_dir)


def evaluate_and_save(
    args: argparse.Namespace,
    trainer: Trainer,
    test_loader: DataLoader,
    info: DistInfo,
    state: TrainState,
    writer,
) -> None:
    """Evaluate on all ranks, log, and save the model on rank 0 when it is the best so far."""
    precision = trainer.precision
    result = evaluate(trainer.eval_net, test_loader, info.device, precision, progress=info.is_main)
    extra = f", top-5 {result['top5']:.4f}" if "top5" in result else ""
    logger.info(
        "Step %d: test loss %.4f, accuracy %.4f%s (%d images).",
        state.step,
        result["loss"],
        result["accuracy"],
        extra,
        result["count"],
    )
    if writer is not None:
        for key in ("loss", "accuracy", "top5"):
            if key in result:
                writer.add_scalar(f"test/{key}", result[key], state.step)
        writer.flush()
    if result["accuracy"] > state.best_accuracy:
        state.best_accuracy, state.best_step = result["accuracy"], state.step
        if info.is_main:
            class_names = list(test_loader.dataset.classes)
            path = save_best(
                args, trainer.model, class_names, state.step, result["accuracy"], precision
            )
            logger.info("Saved the best model so far to %s.", path)


# --------------------------------------------------------------------------------------------
# Entry point


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Parse flags, set up (distributed, data, model), train, print the summary."""
    args = parse_args(argv)
    info = init_distributed(args.local_rank)
    try:
        setup_logging(info)
        check_args(args, info)
        resume_from = (
            cio.resolve_resume(args.resume, args.output_dir, args.name) if args.resume else None
        )
        set_seed(args.seed)
        weights = None if resume_from else read_checkpoint(args)  # fail fast, before downloads
        train_loader, test_loader = get_loader(args)
        model = build_model(args, len(train_loader.dataset.classes), weights)
        del weights
        summary = train(args, model, train_loader, test_loader, info, resume_from)
    finally:
        cleanup()
    if info.is_main:
        print(
            f"Best accuracy: {summary['best_accuracy']:.4f} (step {summary['best_step']})\n"
            f"Steps: {summary['step']} of {args.num_steps}"
            f"{' (stopped; continue with --resume)' if summary['stopped'] else ''}\n"
            f"Training time: {summary['wall_time']:.1f} s "
            f"({summary['images_per_second']:.0f} images/s)\n"
            f"Checkpoint: {best_checkpoint_path(args)}\n"
            f"Last state: {cio.last_state_path(args.output_dir, args.name)}\n"
            f"TensorBoard: tensorboard --logdir {args.log_dir}"
        )
    return summary


if __name__ == "__main__":
    run_cli(main)
