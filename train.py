"""Fine-tune a Vision Transformer with the official recipe (`vit_jax/train.py`).

The update of vit_jax's train step: global gradient-norm clipping, then SGD with momentum 0.9
kept in bfloat16 (`--optim_dtype`), the learning rate counted as optax counts (the k-th update
applies `lr_fn(k - 1)`: 0 for the first, with warmup), linear warmup then cosine or linear decay
(`utils/recipe/optim.py`). Gradient accumulation that is exactly the big batch, mixed precision with
`torch.amp`, and `torchrun` data parallelism with sharded evaluation. Every flag of the original
PyTorch port keeps its name and default (but `--eval_batch_size`, which on CUDA is the largest
batch that fits unless given), so its commands run unchanged:

    python train.py --name cifar10-100_500 --dataset cifar10 --model_type ViT-B_16 \
        --pretrained_dir checkpoint/ViT-B_16.npz [--fp16 --fp16_opt_level O2]

Precision (`--precision`, or the Apex-era `--fp16 --fp16_opt_level`):

    fp32            O0, or no flag: plain float32.
    fp16            O1, O2 (and O3, which Apex ran as pure fp16 without fp32 master weights;
                    here it runs as O2): float16 autocast with fp32 weights and a loss scale,
                    dynamic for `--loss_scale 0`, fixed at `--loss_scale` otherwise. Without
                    CUDA it falls back to bfloat16 autocast on the CPU, with a warning.
    bf16            bfloat16 autocast, fp32 weights, no loss scaling.

On CUDA, float32 matrix products and convolutions run in TF32, as vit_jax's JAX computes them
on GPUs (`--tf32 off`: full float32, for bit-level comparisons); the CPU has no TF32.

Distributed: `torchrun --nproc_per_node N train.py ...` (NCCL on GPUs, gloo on CPU).
`--train_batch_size` is the total batch of one optimizer step over all processes and
accumulation steps.

Speed: on CUDA the whole training step (forward, backward, clipping, update) is compiled as one
graph (`--compile`; `--no_compile` runs it eagerly), and no step waits for the device: the loop
reads it back only every `--log_every` steps and where it evaluates or saves.

Resuming: besides the best `<output_dir>/<name>_checkpoint.bin`, the last training state goes to
`<output_dir>/<name>_last.pt` every `--save_every` steps, at the end, and when SIGINT, SIGTERM
or SIGUSR1 stops the run (after the current step; it exits 130, 143 or 138: a cluster job
requeues itself on 138, see tools/slurm/train.sbatch). The same command plus `--resume` (or
`--resume PATH`) continues exactly where it was saved, also after a `kill -9`. Every write is
atomic.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import random
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path

if __name__ == "__main__":  # Ctrl+C while the modules below load: exit 130, no traceback
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(128 + signum))

from models.configs import (
    AUGREG_DROPOUT,
    checked_img_size,
    get_config,
    is_augreg_filename,
    model_names,
)
from utils.data.registry import DATASETS, HOLDOUT_FRACTION, Columns, add_column_flags
from utils.infra.console import SafeStream, interactive, python_command
from utils.infra.description import PRECISIONS
from utils.infra.errors import LoaderError, StoppedBySignal, UserError, run_cli
from utils.infra.flags import (
    HelpFormatter,
    add_process_flags,
    add_tf32_flag,
    add_verbose,
    fraction,
    non_negative_float,
    non_negative_int,
    parse_first,
    positive_float,
    positive_int,
    random_seed,
)
from utils.recipe.precision import OPT_LEVELS, resolve_precision
from utils.recipe.update_rule import DECAY_TYPES, OPTIM_DTYPES, applied_lr

logger = logging.getLogger("train")

SELECTIONS = ("minival", "test", "final")  # what --select can make the checkpoint
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # The original port's flags.
    p.add_argument("--name", required=True, help="Name of this run (checkpoint and log names).")
    p.add_argument("--dataset", choices=DATASETS, default="cifar10")
    p.add_argument(
        "--model_type",
        choices=model_names(),
        default=None,
        help="Default: the model --pretrained_dir holds (its description, official or AugReg "
        "file name, or shapes), the saved state's on --resume, ViT-B_16 from scratch.",
    )
    p.add_argument(
        "--pretrained_dir",
        default="checkpoint/ViT-B_16.npz",
        help="Checkpoint to fine-tune from: an official .npz, or a model train.py or export.py "
        "wrote (.bin, _last.pt, .safetensors); 'none' trains from scratch.",
    )
    p.add_argument("--output_dir", default="output", help="Where the best checkpoint goes.")
    p.add_argument("--img_size", type=positive_int, default=224, help="Input resolution.")
    p.add_argument(
        "--train_batch_size",
        type=positive_int,
        default=512,
        help="Total batch per optimizer step, over all processes and accumulation steps.",
    )
    p.add_argument(
        "--eval_batch_size",
        type=positive_int,
        default=None,
        help="Per process. Default: auto: on CUDA the largest batch that fits beside the "
        "training state (the memory plan), at most 1024; 64 without CUDA.",
    )
    p.add_argument(
        "--eval_every",
        type=non_negative_int,
        default=100,
        help="Evaluate every N steps (0: only at the end).",
    )
    p.add_argument(
        "--learning_rate", type=positive_float, default=3e-2, help="Peak SGD learning rate."
    )
    p.add_argument("--weight_decay", type=non_negative_float, default=0.0)
    p.add_argument(
        "--num_steps", type=positive_int, default=10000, help="Optimizer steps in total."
    )
    p.add_argument("--decay_type", choices=DECAY_TYPES, default="cosine")
    p.add_argument("--warmup_steps", type=non_negative_int, default=500)
    p.add_argument(
        "--max_grad_norm", type=non_negative_float, default=1.0, help="0 turns clipping off."
    )
    p.add_argument(
        "--optim_dtype",
        choices=OPTIM_DTYPES,
        default="bfloat16",
        help="dtype of the SGD momentum: bfloat16 as vit_jax's train step (half the memory), or "
        "float32 (torch.optim.SGD's arithmetic).",
    )
    p.add_argument("--seed", type=random_seed, default=42)
    p.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    p.add_argument("--fp16", action="store_true", help="Alias of --precision fp16.")
    p.add_argument(
        "--fp16_opt_level",
        choices=OPT_LEVELS,
        default="O2",
        help="Apex opt level with --fp16: O0 = fp32; O1, O2, O3 = fp16 autocast.",
    )
    p.add_argument(
        "--loss_scale",
        type=non_negative_float,
        default=0,
        help="fp16 loss scale: 0 = dynamic, a positive value = that fixed scale.",
    )
    # New flags.
    p.add_argument(
        "--data_dir",
        default="./data",
        help="CIFAR download folder, or the image folder root (train/, val/ or test/), or a "
        "Hugging Face dataset (--dataset hf: saved with save_to_disk, or parquet files).",
    )
    add_column_flags(p)
    p.add_argument(
        "--holdout_fraction",
        type=fraction,
        default=HOLDOUT_FRACTION,
        help="Last fraction of the training split held out as minival, to select the best "
        "checkpoint on (the official train[:98%%]); 0 holds none out (see --select).",
    )
    p.add_argument(
        "--select",
        choices=SELECTIONS,
        default=None,
        help="What the checkpoint is: the step best on minival; the step best on the test set "
        "(optimistic: the test set chooses); or the final step, selected on nothing (the "
        "paper's final model). Default: minival when one is held out, else final.",
    )
    add_process_flags(p)  # --num_workers, and the original port's --local_rank
    p.add_argument(
        "--log_dir",
        default=None,
        help="Log folder (default logs/<name>): TensorBoard's event files and metrics.jsonl, "
        "every logged scalar as one JSON line.",
    )
    p.add_argument(
        "--wandb",
        action="store_true",
        help="Log the scalars to Weights & Biases too (needs the wandb package; project "
        "$WANDB_PROJECT, default vit-pytorch; WANDB_MODE=offline logs without an account).",
    )
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="Default fp32.")
    add_tf32_flag(p)
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the training step as one graph (forward, backward, clipping and the "
        "update; under torchrun, the model only). The default on CUDA; on a CPU compiling takes "
        "minutes.",
    )
    p.add_argument(
        "--no_compile",
        dest="compile",
        action="store_false",
        default=None,
        help="Run the training step eagerly (the default without CUDA).",
    )
    p.add_argument(
        "--grad_checkpointing",
        action="store_true",
        help="Recompute the encoder blocks' activations in the backward pass instead of keeping "
        "them: much less memory per image, one more forward pass of the blocks, the same "
        "gradients.",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="Continue a run: from PATH, or without a value from <output_dir>/<name>_last.pt.",
    )
    p.add_argument(
        "--save_every",
        type=non_negative_int,
        default=100,
        help="Save the last training state every N steps (0: only at the end or when stopped).",
    )
    p.add_argument(
        "--log_every",
        type=positive_int,
        default=10,
        help="Log the training loss (its mean over the steps since the last log) every N steps, "
        "and at every evaluation and save; without a terminal (a file, nohup, CI) also one plain "
        "line of progress, in place of the progress bar. Only these steps wait for the device; "
        "a stop signal reaches the other torchrun processes at them.",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="Start a new run under a --name that has files already, deleting them first "
        "(without it such a run is refused).",
    )
    p.add_argument(
        "--strict_images",
        action="store_true",
        help="Check every image of an image folder or a Hugging Face dataset at start-up and "
        "refuse unreadable ones (without it they are skipped with a warning).",
    )
    add_verbose(p)
    args = p.parse_args(argv)
    if args.log_dir is None:
        args.log_dir = os.path.join("logs", args.name)
    return args


if __name__ == "__main__":
    parse_first(parse_args)  # --help and a mistyped flag answer before torch loads

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from models.modeling import VisionTransformer
from utils.data.loaders import get_loader, prepare_batch, resize_eval_batches, unreadable_images
from utils.evals.classification import evaluate
from utils.infra.dist_utils import (
    DistInfo,
    all_reduce_sum,
    barrier,
    run_distributed,
)
from utils.infra.event_log import METRICS, EventLog
from utils.infra.file_io import read_sidecar, save_checkpoint, write_sidecar
from utils.infra.loading import pretrained_weights, which_model
from utils.infra.memory import (
    CPU_EVAL_BATCH,
    check_training_memory,
    evaluation_batch_size,
    is_out_of_memory,
    out_of_memory,
)
from utils.infra.run_files import RunLock, claim_run
from utils.infra.stopping import GracefulExit, NonFiniteGuard
from utils.infra.train_state import (
    TrainState,
    get_rng_state,
    last_state_path,
    load_training_state,
    resolve_resume,
    save_training_state,
    saved_model_type,
)
from utils.recipe.amp import LossScaler, autocast, make_scaler, set_tf32
from utils.recipe.optim import SGDMomentum, make_optimizer, make_scheduler

# --------------------------------------------------------------------------------------------
# Flags: the micro-batch they give, and the checks across them


def micro_batch_size(args: argparse.Namespace, world_size: int) -> int:
    """Images per process and forward pass: the total batch over processes and accumulation."""
    return args.train_batch_size // (world_size * args.gradient_accumulation_steps)


def check_args(args: argparse.Namespace, info: DistInfo) -> None:
    """Check what the flags' types cannot see alone (the total batch must divide evenly, --wandb
    needs wandb)."""
    if args.wandb and importlib.util.find_spec("wandb") is None:
        raise UserError(
            "--wandb logs to Weights & Biases, but the wandb package is not installed for this "
            f"Python: install it ({python_command('-m', 'pip', 'install', 'wandb')}) and log in "
            "(wandb login, or WANDB_MODE=offline), or leave out --wandb: every scalar is in "
            f"{Path(args.log_dir) / 'metrics.jsonl'} and TensorBoard's files anyway."
        )
    if args.model_type is not None:  # else _run checks it, once the file tells the model
        checked_img_size(get_config(args.model_type), args.img_size)
    per_step = info.world_size * args.gradient_accumulation_steps
    if args.train_batch_size % per_step:
        suggestion = max(per_step, args.train_batch_size // per_step * per_step)
        raise UserError(
            f"--train_batch_size {args.train_batch_size} is the total batch of one optimizer step "
            f"and must divide evenly over {info.world_size} process(es) x "
            f"{args.gradient_accumulation_steps} accumulation step(s) = {per_step}; use a "
            f"multiple of {per_step}, e.g. {suggestion}."
        )


# --------------------------------------------------------------------------------------------
# The model


def read_checkpoint(args: argparse.Namespace) -> tuple[dict[str, np.ndarray] | None, str]:
    """The weights of `--pretrained_dir` in the official layout (None for 'none'), and the model.

    An official `.npz`, or a model of ours (`.bin`, `_last.pt`, `.safetensors`) converted to that
    layout, so that fine-tuning it zeroes the head and resizes position embeddings alike. A
    missing official file names its download URL. The model is `--model_type`, else the one the
    file holds (`utils.infra.loading.which_model`), else ViT-B_16 (the original port's default) when
    training from scratch.
    """
    if args.pretrained_dir.lower() != "none":
        weights, model_type = pretrained_weights(args.pretrained_dir, args.model_type)
    else:
        weights, model_type = None, args.model_type or "ViT-B_16"
        logger.warning(
            "--pretrained_dir none: training %s from scratch (random initialisation). ViT needs "
            "pre-training to do well on small datasets; fine-tune an official checkpoint instead.",
            model_type,
        )
    return weights, model_type


def build_model(
    args: argparse.Namespace,
    model_type: str,
    num_classes: int,
    weights: dict[str, np.ndarray] | None = None,
) -> VisionTransformer:
    """The model, with official `weights` loaded (head zeroed, position embeddings resized).

    AugReg checkpoints are fine-tuned without dropout, as vit_jax's AugReg config does.
    """
    config = get_config(model_type)
    if is_augreg_filename(args.pretrained_dir) and config.dropout_rate != AUGREG_DROPOUT:
        config = config.replace(dropout_rate=AUGREG_DROPOUT)
        logger.info("AugReg checkpoint: fine-tuning with dropout %g.", AUGREG_DROPOUT)
    if weights is None:
        model = VisionTransformer(config, args.img_size, num_classes=num_classes, zero_head=True)
    else:
        model = VisionTransformer.from_pretrained(
            config, weights, args.img_size, num_classes=num_classes, zero_head=True
        )
        logger.info("Loaded %s (head re-initialised to zero).", args.pretrained_dir)
    model.set_grad_checkpointing(args.grad_checkpointing)
    params = sum(p.numel() for p in model.parameters())
    logger.info("%s: %.2fM parameters, %d classes.", config.name, params / 1e6, num_classes)
    return model


# --------------------------------------------------------------------------------------------
# One optimizer step


@dataclass
class Trainer:
    """The objects one optimizer step needs.

    Attributes:
        model: the bare model: what is saved, and what evaluation runs (so that it never
            recompiles the training step).
        net: the model to train: DDP-wrapped under torch.distributed, then compiled when the
            step cannot be compiled whole (`make_trainer`).
        optimizer: SGD with momentum 0.9 (bfloat16 or float32 momentum), its learning rate a
            tensor on the device that the schedule fills in place.
        scheduler: the official per-step schedule.
        scaler: the fp16 loss scaler, or None.
        precision: "fp32", "fp16" or "bf16".
        step: `optimizer_step`, or that function compiled as one graph.
    """

    model: VisionTransformer
    net: nn.Module
    optimizer: SGDMomentum
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: LossScaler | None
    precision: str
    step: Callable[..., torch.Tensor]


def make_trainer(args: argparse.Namespace, model: VisionTransformer, info: DistInfo) -> Trainer:
    """Move the model to the device; build optimizer, schedule, scaler, the DDP wrapper, and
    compile the step (`--compile`, by default on CUDA).

    The whole step compiles as one graph in a single process, fp16 loss scaling included
    (`LossScaler` keeps its state on the device). Under DDP, whose gradient hooks need the
    autograd engine's backward, only the model is compiled, after DDP wraps it (as DDP's
    documentation says), and the rest of the step runs eagerly.
    """
    precision = resolve_precision(
        args.precision, args.fp16, args.fp16_opt_level, args.loss_scale, info.device.type
    )
    model.to(info.device).train()
    check_training_memory(
        model,
        info.device,
        partial(autocast, precision, info.device),
        per_process=args.train_batch_size // info.world_size,
        accumulation_steps=args.gradient_accumulation_steps,
        grad_checkpointing=args.grad_checkpointing,
    )
    # The rate lives on the device: the schedule fills it in place, so no step reads it back.
    optimizer = make_optimizer(
        model.parameters(),
        args.learning_rate,
        args.optim_dtype,
        args.weight_decay,
        device=info.device,
    )
    optimizer.init_momentum()  # the state a compiled step sees from its first call
    scheduler = make_scheduler(optimizer, args.num_steps, args.warmup_steps, args.decay_type)
    scaler = make_scaler(precision, args.loss_scale, info.device)
    net = model
    if info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    trainer = Trainer(model, net, optimizer, scheduler, scaler, precision, optimizer_step)
    compiles = args.compile if args.compile is not None else info.device.type == "cuda"
    if compiles and info.distributed:
        trainer.net = torch.compile(net)
    elif compiles:
        trainer.step = compile_whole(optimizer_step)
    return trainer


def compile_whole(step: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`step` compiled as one graph, its backward passes included (`trace_autograd_ops` traces
    them as `torch.autograd.grad`), and the wrappers torch's compiler skips by default (the
    schedule's around `optimizer.step`) traced through."""
    compiled = torch.compile(step)

    def call(*args: object) -> torch.Tensor:
        with torch._dynamo.config.patch(trace_autograd_ops=True, dont_skip_tracing=True):
            return compiled(*args)

    return call


def optimizer_step(
    trainer: Trainer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    guard: NonFiniteGuard | None,
    max_grad_norm: float,
    world_size: int,
) -> torch.Tensor:
    """Forward and backward over this process's micro-batches, then the update, all on the
    device: nothing is read back (no host sync), so it compiles as one graph.

    The gradients of the micro-batches add up to the gradient of their mean loss, i.e. of the big
    batch; DDP synchronises only on the last one. Then: unscale (fp16), clip the global norm,
    step. Without a grad scaler, `guard` counts the loss averaged over all processes, and a
    non-finite one skips the update on every rank alike: it changes no parameter and no
    momentum (the fp16 scaler skips a step whose gradients overflowed the same way).

    Returns:
        The loss, averaged over micro-batches and processes.
    """
    net, optimizer, scaler = trainer.net, trainer.optimizer, trainer.scaler
    total = torch.zeros((), device=batches[0][1].device)
    for i, (images, labels) in enumerate(batches):
        last = i == len(batches) - 1
        with nullcontext() if last or world_size == 1 else net.no_sync():
            with autocast(trainer.precision, images.device):
                loss = net(images, labels)
            scaled = loss.float() / len(batches)
            (scaler.scale(scaled) if scaler else scaled).backward()
        total += loss.detach().float()
    loss = all_reduce_sum(total / len(batches)) / world_size
    skip = None if guard is None else guard.record(loss)
    if scaler:
        scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), max_grad_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        # The class's `step`, not the instance's: the schedule wraps the latter to note that it
        # ran, an attribute write that torch 2.11's compiler cannot trace (see `train_step`).
        type(optimizer).step(optimizer, skip=skip)
    return loss


def train_step(
    args: argparse.Namespace,
    trainer: Trainer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    guard: NonFiniteGuard | None,
    step: int,
    info: DistInfo,
) -> torch.Tensor:
    """The `step`-th optimizer step over this process's accumulation micro-batches
    (`trainer.step`), then the schedule, which advances after a skipped update too. Nothing
    waits for the device. A micro-batch too big for the memory ends the run with advice.

    Returns:
        The loss, averaged over micro-batches and processes: a tensor on the device.
    """
    device = info.device
    batches = [prepare_batch(batch, device) for batch in batches]  # (CIFAR: augmented there)
    trainer.optimizer.zero_grad(set_to_none=True)
    if guard is not None:
        guard.at_step(step)
    failed = None
    try:
        loss = trainer.step(trainer, batches, guard, args.max_grad_norm, info.world_size)
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        failed = len(batches[0][1])
    if failed is not None:  # out of the handler: the failed pass's tensors are freed now
        batches = None
        raise out_of_memory(
            trainer.model,
            device,
            partial(autocast, trainer.precision, device),
            failed=failed,
            per_process=args.train_batch_size // info.world_size,
            accumulation_steps=args.gradient_accumulation_steps,
            grad_checkpointing=args.grad_checkpointing,
        )
    with warnings.catch_warnings():  # the schedule's check does not see `optimizer_step`'s update
        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"))
        trainer.scheduler.step()
    return loss


# --------------------------------------------------------------------------------------------
# Evaluation and checkpoint selection


def selection(select: str | None, has_minival: bool) -> str:
    """What the checkpoint is selected by (`--select`): minival when one is held out, else the
    final step (the paper's final model); the test set only when asked, with a warning."""
    chosen = select or ("minival" if has_minival else "final")
    if chosen == "minival" and not has_minival:
        raise UserError(
            "--select minival needs a minival split, but --holdout_fraction holds none out; "
            f"raise --holdout_fraction ({HOLDOUT_FRACTION} officially), or use --select final."
        )
    if chosen == "test":
        logger.warning(
            "--select test: the best checkpoint is selected on the test set, so its test "
            "accuracy is an optimistic estimate (the original port did this)."
        )
    return chosen


def is_better(result: dict[str, float], best_accuracy: float, best_loss: float) -> bool:
    """The selection rule: a higher accuracy on the selection split, or as high with a lower loss
    (a small minival ties often). A result whose loss is not finite is never better; a finite
    loss, however large (1e30 after a learning rate of 1e30), is a measurement, and the accuracy
    decides as for any other (weights that overflow give non-finite training losses, which stop
    the run)."""
    if not math.isfinite(result["loss"]):
        return False
    return (result["accuracy"], -result["loss"]) > (best_accuracy, -best_loss)


def evaluate_splits(run: Run) -> dict[str, dict[str, float]]:
    """Every evaluation split (test, then minival), each on every rank's shard; logged."""
    trainer, info, step = run.trainer, run.info, run.state.step
    try:
        results = {
            split: evaluate(trainer.model, loader, info.device, trainer.precision, info.is_main)
            for split, loader in run.eval_loaders.items()
        }
    except LoaderError as failure:  # the step is done; its evaluation is lost
        raise stopped_by_loader(failure, run) from None
    for split, result in results.items():
        top5 = f", top-5 {result['top5']:.4f}" if "top5" in result else ""
        logger.info(
            "Step %d: %s loss %.4f, accuracy %.4f%s (%d images).",
            step,
            split,
            result["loss"],
            result["accuracy"],
            top5,
            result["count"],
        )
        if run.writer is not None:
            for key in ("loss", "accuracy", "top5"):
                if key in result:
                    run.writer.add_scalar(f"{split}/{key}", result[key], step)
    if run.writer is not None:
        run.writer.flush()
    run.final = {
        f"{split}_{key}": r[key] for split, r in results.items() for key in ("accuracy", "loss")
    }
    return results


def select(run: Run, results: dict[str, dict[str, float]]) -> None:
    """Keep the model as the best checkpoint when `is_better` says so on the selection split.
    A model whose loss is not finite on any split never replaces a checkpoint.

    With `--select final` nothing is compared: the last step's model is the checkpoint, whatever
    its loss (the paper's final model; its figures on minival, if held out, are what a
    learning-rate grid ranks)."""
    state = run.state
    finite = all(math.isfinite(r["loss"]) for r in results.values())
    if run.selected_by == "final":
        if state.step != run.args.num_steps:
            return
        chosen = results.get("minival", results["test"])
        if not finite:
            logger.warning(
                "Step %d: the evaluation loss is not finite; saved as the final model anyway "
                "(--select final).",
                state.step,
            )
    else:
        chosen = results[run.selected_by]
        if not finite:
            logger.warning(
                "Step %d: the evaluation loss is not finite; the model is not saved.", state.step
            )
            return
        if not is_better(chosen, state.best_accuracy, state.best_loss):
            return
    state.best_accuracy, state.best_loss = chosen["accuracy"], chosen["loss"]
    state.best_test_accuracy = results["test"]["accuracy"]
    state.best_step = state.step
    if run.info.is_main:
        facts = {"step": state.step, "selected_by": run.selected_by, **run.final}
        facts["accuracy"] = facts.pop("test_accuracy")
        save_best(run.best_path, run.args, run.trainer, run.class_names, run.tf32, facts)
        logger.info(
            "Saved the %s to %s.",
            "final model"
            if run.selected_by == "final"
            else f"best model so far (by {run.selected_by} accuracy)",
            run.best_path,
        )


# --------------------------------------------------------------------------------------------
# Saving


def save_best(
    path: Path,
    args: argparse.Namespace,
    trainer: Trainer,
    class_names: list[str],
    tf32: bool,
    facts: dict,
) -> None:
    """Write the best model (a plain state dict) and its `.json` sidecar, both atomically, the
    sidecar with the checkpoint's SHA-256 (verified whenever it is loaded).

    `tf32` says whether float32 matrix products ran in TF32; `facts` (step, accuracies) go into
    the sidecar too; `accuracy` is the test accuracy, what eval.py reports for the checkpoint.
    """
    model = trainer.model
    save_checkpoint(
        {k: v.detach().cpu() for k, v in model.state_dict().items()},
        path,
        model_type=model.config.name,
        img_size=list(model.img_size),
        num_classes=model.num_classes,
        dataset=args.dataset,
        class_names=class_names,
        precision=trainer.precision,
        tf32=tf32,
        **facts,
    )


def save_last_state(
    args: argparse.Namespace, trainer: Trainer, state: TrainState, info: DistInfo
) -> None:
    """Write `<output_dir>/<name>_last.pt` on rank 0, with every rank's RNG state; all wait."""
    rng = [get_rng_state()]
    if info.distributed:
        rng = [None] * info.world_size
        dist.all_gather_object(rng, get_rng_state())
    if info.is_main:
        save_training_state(
            last_state_path(args.output_dir, args.name),
            model=trainer.model,
            optimizer=trainer.optimizer,
            scaler=trainer.scaler,
            state=state,
            args=args,
            rng_states=rng,
        )
    barrier()


def stopped_by_loader(failure: LoaderError, run: Run) -> LoaderError:
    """Save the last state after a data-loader failure; the error to end the run with.

    Nothing is saved before the first step, nor under torch.distributed, where the other ranks
    are not at this point (the last periodic save stands), nor where the limit the workers met
    (file descriptors, say) keeps the state from being written.
    """
    if run.info.distributed or run.state.step == 0:
        return failure
    log_progress(run, None)  # a run that diverged since the last log stops here instead
    try:
        save_last_state(run.args, run.trainer, run.state, run.info)
    except (OSError, UserError) as err:
        return LoaderError(
            f"{failure} The last state could not be saved either ({err}); any state saved "
            "earlier is kept."
        )
    return LoaderError(
        f"{failure} Saved the last state at step {run.state.step}; continue with the same "
        "command plus --resume."
    )


# --------------------------------------------------------------------------------------------
# Set-up: what one run is made of


@dataclass
class Run:
    """The objects of one training run, built by `set_up`, advanced by `train`.

    Attributes:
        eval_loaders: the evaluation splits, "test" then "minival" (when one is held out).
        selected_by: what the checkpoint is selected by: "minival", "test" or "final" (the
            last step, `--select`).
        tf32: whether float32 matrix products and convolutions run in TF32 (CUDA, `--tf32`).
        final: the accuracies and losses of the latest evaluation, `{split}_accuracy` and
            `{split}_loss`.
        guard: counts non-finite losses on the device (None with a grad scaler, which skips
            overflowing steps itself).
        losses: the training losses since the last log.
        eval_time: seconds spent evaluating (left out of the images/s figure).
        last_log: the clock, step and `eval_time` at the last progress line (for its speed).
    """

    args: argparse.Namespace
    info: DistInfo
    trainer: Trainer
    state: TrainState
    train_loader: DataLoader
    eval_loaders: dict[str, DataLoader]
    selected_by: str
    class_names: list[str]
    writer: EventLog | None
    best_path: Path
    tf32: bool
    guard: NonFiniteGuard | None
    losses: LossSum
    final: dict[str, float] = field(default_factory=dict)
    eval_time: float = 0.0
    last_log: tuple[float, int, float] = (0.0, 0, 0.0)


def resume(
    args: argparse.Namespace,
    trainer: Trainer,
    path: str,
    info: DistInfo,
    split: dict,
    tf32: bool,
) -> TrainState:
    """The saved training state, restored into `trainer`; the schedule is the one of this
    command's flags, continued from the saved step (the saved run's rates unless
    --learning_rate, --num_steps, ... changed, which is warned about, as is another precision
    or TF32 setting). Another training / minival `split` is refused: minival would then hold
    images the model trained on."""
    state = load_training_state(
        path,
        model=trainer.model,
        optimizer=trainer.optimizer,
        scaler=trainer.scaler,
        rank=info.rank,
        split=split,
    )
    saved_precision, saved_tf32 = state.precision, state.tf32
    state.split, state.precision, state.tf32 = split, trainer.precision, tf32
    for group in trainer.optimizer.param_groups:
        group["initial_lr"] = args.learning_rate
    trainer.scheduler = make_scheduler(
        trainer.optimizer, args.num_steps, args.warmup_steps, args.decay_type, state.step
    )
    for flag in RESUME_SENSITIVE:
        saved = state.args.get(flag, getattr(args, flag))
        if info.is_main and saved != getattr(args, flag):
            logger.warning(
                "Resuming with --%s %s, but the saved run used %s: the result will differ from "
                "an uninterrupted run.",
                flag,
                getattr(args, flag),
                saved,
            )
    if info.is_main and saved_precision not in (None, trainer.precision):
        logger.warning(
            "Resuming in %s, but the saved run trained in %s: the result will differ from an "
            "uninterrupted run.",
            trainer.precision,
            saved_precision,
        )
    if info.is_main and saved_tf32 not in (None, tf32):
        logger.warning(
            "Resuming with float32 matrix products %s, but the saved run computed them %s "
            "(--tf32): the result will differ from an uninterrupted run.",
            *("in TF32" if on else "in full float32" for on in (tf32, saved_tf32)),
        )
    logger.info(
        "Resumed from %s at step %d (epoch %d, batch %d; best accuracy %.4f).",
        path,
        state.step,
        state.epoch,
        state.batches_in_epoch,
        state.best_accuracy,
    )
    return state


def set_up(
    args: argparse.Namespace,
    info: DistInfo,
    model_type: str,
    weights: dict[str, np.ndarray] | None,
    resume_from: str | None,
    claim: RunLock,
) -> Run:
    """Data, model, trainer, the resumed state (last: it restores the RNG state) and the
    TensorBoard writer of one run. Only then, every check passed, does --overwrite delete the
    earlier run's files, and the run's record (its flags) go to its log folder (`claim`)."""
    train_loader, minival_loader, test_loader = get_loader(
        args.dataset,
        args.data_dir,
        args.img_size,
        args.seed,
        micro_batch_size(args, info.world_size),
        args.eval_batch_size or CPU_EVAL_BATCH,  # until the model is on the device (below)
        args.num_workers,
        args.holdout_fraction,
        args.strict_images,
        info.rank,
        info.local_rank,
        info.world_size,
        Columns(args.image_column, args.label_column),
    )
    class_names = list(train_loader.dataset.classes)
    eval_loaders = {"test": test_loader}
    if minival_loader is not None:
        eval_loaders["minival"] = minival_loader
    for loader in (train_loader, *eval_loaders.values()):
        loader.start_workers()  # now, while no collective is in flight
    selected_by = selection(args.select, minival_loader is not None)
    split = {  # what a resume must not change (minival would hold trained-on images)
        "holdout_fraction": args.holdout_fraction,
        "train_images": len(train_loader.dataset),
        "minival_images": len(minival_loader.dataset) if minival_loader is not None else 0,
    }
    model = build_model(args, model_type, len(class_names), weights)
    if weights:
        weights.clear()  # the arrays are in the model now: free them before the memory probe
    tf32 = set_tf32(args.tf32 == "on", info.device)  # before the memory probe and compiling
    trainer = make_trainer(args, model, info)
    # On CUDA, planned beside the weights and momentum and the gradients kept between steps;
    # the loaders' workers, forked above, load whatever batches of indices they are handed.
    eval_batch = evaluation_batch_size(
        args.eval_batch_size,
        model,
        info.device,
        partial(autocast, trainer.precision, info.device),
        cap=max(len(loader.sampler) for loader in eval_loaders.values()),
        keep=sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
    )
    for loader in eval_loaders.values():
        resize_eval_batches(loader, eval_batch)
    logger.info(
        "Training %s on %s (%d train / %d minival / %d test images, %d classes) at %dx%d, %s, "
        "%d steps, total batch %d = %d process(es) x %d accumulation step(s) x %d per forward "
        "pass; the checkpoint is selected by %s.",
        model_type,
        args.dataset,
        split["train_images"],
        split["minival_images"],
        len(test_loader.dataset),
        len(class_names),
        args.img_size,
        args.img_size,
        trainer.precision,
        args.num_steps,
        args.train_batch_size,
        info.world_size,
        args.gradient_accumulation_steps,
        micro_batch_size(args, info.world_size),
        selected_by,
    )
    logger.info(
        "Logs (TensorBoard, metrics.jsonl): %s; best checkpoint: %s", args.log_dir, args.output_dir
    )
    if resume_from:
        state = resume(args, trainer, resume_from, info, split, tf32)
    else:
        state = TrainState(split=split, precision=trainer.precision, tf32=tf32)
    if state.step < args.num_steps:  # a finished run run again writes nothing
        claim.begin(vars(args))  # every check has passed: --overwrite deletes; it is recorded
    writer = None
    if info.is_main and state.step < args.num_steps:  # a finished run logs nothing more
        # A resumed run continues the same log, dropping what the interrupted run logged after
        # its last state (it is logged again).
        writer = EventLog(
            args.log_dir,
            purge_step=state.step + 1 if state.step else None,
            wandb={"name": args.name, "config": vars(args)} if args.wandb else None,
        )
    return Run(
        args=args,
        info=info,
        trainer=trainer,
        state=state,
        train_loader=train_loader,
        eval_loaders=eval_loaders,
        selected_by=selected_by,
        class_names=class_names,
        writer=writer,
        best_path=Path(args.output_dir) / f"{args.name}_checkpoint.bin",
        tf32=tf32,
        guard=None if trainer.scaler else NonFiniteGuard(NON_FINITE_PATIENCE, info.device),
        losses=LossSum(info.device),
    )


# --------------------------------------------------------------------------------------------
# The loop


def due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def micro_batches(
    loader: DataLoader, state: TrainState, skip: int = 0
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless micro-batches, epoch after epoch, reshuffled each epoch (`set_epoch`).

    Args:
        loader: the training loader (a `DistributedSampler`; the dataset may have `set_epoch`).
        state: `epoch` says where to start; `epoch` and `batches_in_epoch` are kept up to date.
        skip: batches of the first epoch already consumed before a resume.
    """
    while True:
        loader.sampler.set_epoch(state.epoch)
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(state.epoch)
        state.batches_in_epoch = skip
        for batch in islice(loader, skip, None):
            state.batches_in_epoch += 1
            yield batch
        skip = 0
        state.epoch += 1


def next_batches(run: Run, stream: Iterator[tuple[torch.Tensor, ...]]) -> list:
    """The micro-batches of the next step. A loader that fails (a worker died, hung or raised)
    ends the run, its last state saved as after the last step."""
    state = run.state
    position = (state.epoch, state.batches_in_epoch)
    try:
        return [next(stream) for _ in range(run.args.gradient_accumulation_steps)]
    except LoaderError as failure:
        state.epoch, state.batches_in_epoch = position
        raise stopped_by_loader(failure, run) from None


def train(run: Run) -> Summary:
    """The training loop: step, log, evaluate and select, save, stop; then the summary.

    The steps never wait for the device. The loop reads it back only where it logs (every
    `--log_every` steps), evaluates or saves: there the non-finite guard is checked, and under
    torch.distributed the ranks agree on a stop signal (a single process reads its own flag
    after every step)."""
    args, trainer, state, info = run.args, run.trainer, run.state, run.info
    stream = micro_batches(run.train_loader, state, skip=state.batches_in_epoch)
    bar = progress_bar(run)
    first_step, stopped, start = state.step, False, time.perf_counter()
    run.last_log = (start, state.step, 0.0)
    with (
        logging_redirect_tqdm() if bar else nullcontext(),  # log lines above the bar
        bar or nullcontext(),
        run.writer or nullcontext(),
        GracefulExit() as stop,
    ):
        while state.step < args.num_steps:
            batches = next_batches(run, stream)
            state.step += 1
            run.losses.add(train_step(args, trainer, batches, run.guard, state.step, info))
            last = state.step == args.num_steps
            evaluates = last or due(state.step, args.eval_every)
            saves = last or due(state.step, args.save_every)
            synced = evaluates or saves or due(state.step, args.log_every)  # reads the device
            if synced:
                log_progress(run, bar)
            if bar is not None:
                bar.update(1)
            if evaluates:
                began = time.perf_counter()
                select(run, evaluate_splits(run))
                run.eval_time += time.perf_counter() - began
            if run.writer is not None and run.writer.error is not None:  # e.g. a full log disk
                stop.requested, stop.signal_name = True, f"a failed write to {args.log_dir}"
            stopped = (synced or not info.distributed) and stop.should_stop(info.device)
            if stopped or saves:
                log_progress(run, bar)  # a stop between logs: its steps are checked first
                if run.writer is not None:
                    run.writer.flush()  # TensorBoard is never behind the last state
                save_last_state(args, trainer, state, info)
            if stopped:
                log_stop(run, stop)
                break
    if run.writer is not None:
        run.writer.check()  # a failed log write: one message, after the last state was saved
    wall = time.perf_counter() - start
    return report(run, stopped, stop.signum if stopped else None, wall, state.step - first_step)


def progress_bar(run: Run) -> tqdm | None:
    """The progress bar, on a terminal only (first process): elsewhere (a file, nohup, CI) its
    redraws would pile up into one endless line, and `log_progress` logs plain lines instead.
    A bar whose terminal cannot be written (a full disk behind it) goes quiet; the run goes on."""
    if not (run.info.is_main and interactive()):
        return None
    return tqdm(
        initial=run.state.step,
        total=run.args.num_steps,
        desc="Training",
        dynamic_ncols=True,
        file=SafeStream(sys.stderr),
    )


class LossSum:
    """The training losses of the steps since the last log, summed on the device: adding one
    reads nothing back."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach()
        self.steps += 1

    def pop_mean(self) -> float:
        """The mean loss of the steps added since the last call (a host sync); starts anew."""
        mean = self.total.item() / self.steps
        self.total.zero_()
        self.steps = 0
        return mean


def log_progress(run: Run, bar: tqdm | None) -> None:
    """Read back what the steps since the last log left on the device (a host sync): stop a run
    whose loss stayed non-finite (`NonFiniteLossError`), warn about skipped updates, and log
    the mean loss of those steps, with the rate of the last one, to the event log and `bar`;
    without a bar, as one plain line with the speed and the time left."""
    if not run.losses.steps:
        return
    if run.guard is not None:
        run.guard.report()
    if run.trainer.scaler is not None:
        run.trainer.scaler.report()
    loss, args, step = run.losses.pop_mean(), run.args, run.state.step
    if run.writer is not None:
        lr = applied_lr(
            args.learning_rate, step, args.num_steps, args.warmup_steps, args.decay_type
        )
        run.writer.add_scalar("train/loss", loss, step)
        run.writer.add_scalar("train/lr", lr, step)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        else:
            logger.info("%s", progress_line(run, loss, lr))


def progress_line(run: Run, loss: float, lr: float) -> str:
    """`Step 40/800: loss 0.5321, lr 9.87e-02, 1234 images/s, 2m 05s left`: the speed of the
    steps since the last line, evaluation time left out, and the time left at that speed."""
    now, step, eval_time = time.perf_counter(), run.state.step, run.eval_time
    then, then_step, then_eval_time = run.last_log
    run.last_log = (now, step, eval_time)
    seconds = max(now - then - (eval_time - then_eval_time), 1e-9)
    per_step = seconds / max(step - then_step, 1)
    left = duration_text(per_step * (run.args.num_steps - step))
    rate = rate_text(run.args.train_batch_size / per_step)
    return (
        f"Step {step}/{run.args.num_steps}: loss {loss:.4f}, lr {lr:.2e}, {rate} images/s, "
        f"{left} left"
    )


def rate_text(rate: float) -> str:
    """A rate with three significant digits and no exponent (`1234`, `56.7`, `0.0123`)."""
    if rate <= 0 or not math.isfinite(rate):
        return f"{rate:.0f}"
    return f"{rate:.{max(0, 2 - math.floor(math.log10(rate)))}f}"


def duration_text(seconds: float) -> str:
    """`42s`, `3m 05s`, `1h 02m`."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def log_stop(run: Run, stop: GracefulExit) -> None:
    if run.info.is_main:
        logger.warning(
            "Stopped by %s at step %d; saved %s. Continue with the same command plus --resume.",
            stop.signal_name or "a signal to another process",
            run.state.step,
            last_state_path(run.args.output_dir, run.args.name),
        )


# --------------------------------------------------------------------------------------------
# The report


@dataclass
class Summary:
    """How a run ended. `selected_*` describe the best checkpoint (the step chosen on
    `selected_by`), `final_*` the last evaluation; accuracies are None where none ran."""

    step: int
    stopped: bool
    signal: int | None
    selected_by: str
    selected_step: int  # 0: no evaluation ran, no checkpoint written
    selected_accuracy: float | None  # on the selection split
    selected_test_accuracy: float | None
    final_test_accuracy: float | None
    final_minival_accuracy: float | None
    wall_time: float
    images_per_second: float
    checkpoint: str | None  # None when no best checkpoint is in --output_dir
    unreadable_images: int  # skipped image-folder files, each named once in the log


def report(run: Run, stopped: bool, signum: int | None, wall: float, steps: int) -> Summary:
    """Log the selected and the final step (also into the checkpoint's sidecar); the summary."""
    state, final = run.state, run.final
    if final and state.best_step and not stopped and run.info.is_main:
        logger.info(
            "Selected step %d by %s %.4f; its test accuracy %.4f. Final step %d: %s.",
            state.best_step,
            "being the final step: accuracy"
            if run.selected_by == "final"
            else f"{run.selected_by} accuracy",
            state.best_accuracy,
            state.best_test_accuracy,
            state.step,
            ", ".join(f"{k} {v:.4f}" for k, v in final.items()),
        )
        if run.best_path.is_file():  # the sidecar also tells how the run ended
            facts = read_sidecar(run.best_path)
            facts.update({f"final_{k}": v for k, v in final.items()}, final_step=state.step)
            write_sidecar(run.best_path, **facts)
    evaluated = state.best_step > 0
    return Summary(
        step=state.step,
        stopped=stopped,
        signal=signum,
        selected_by=run.selected_by,
        selected_step=state.best_step,
        selected_accuracy=state.best_accuracy if evaluated else None,
        selected_test_accuracy=state.best_test_accuracy if evaluated else None,
        final_test_accuracy=final.get("test_accuracy"),
        final_minival_accuracy=final.get("minival_accuracy"),
        wall_time=wall,
        images_per_second=steps * run.args.train_batch_size / max(wall - run.eval_time, 1e-9),
        checkpoint=str(run.best_path) if run.best_path.is_file() else None,
        unreadable_images=unreadable_images(run.train_loader, *run.eval_loaders.values()),
    )


def print_summary(summary: Summary, args: argparse.Namespace) -> None:
    """The summary on stdout, naming only files that exist. A run that finished stays a success
    when stdout cannot take it (e.g. a full disk): the failure is logged."""
    evaluated = summary.selected_step > 0
    selected = "none (no evaluation ran)"
    if evaluated:
        by = (
            "(the final step, selected on nothing)"
            if summary.selected_by == "final"
            else f"by {summary.selected_by} accuracy {summary.selected_accuracy:.4f}"
        )
        selected = (
            f"step {summary.selected_step} {by}; test accuracy {summary.selected_test_accuracy:.4f}"
        )
    checkpoint = summary.checkpoint or "none written"
    if evaluated and summary.checkpoint is None:  # only the last state was copied here
        checkpoint = f"none in {args.output_dir} (the run that saved the resumed state wrote it)"
    last = last_state_path(args.output_dir, args.name)
    skipped = ""
    if not DATASETS[args.dataset].in_memory:
        named = " (named in the log)" if summary.unreadable_images else ""
        skipped = f"Unreadable images skipped: {summary.unreadable_images}{named}\n"
    trained = f"{summary.wall_time:.1f} s ({rate_text(summary.images_per_second)} images/s)"
    if summary.images_per_second == 0:  # no step ran in this command
        done = summary.step >= args.num_steps
        trained = "none (the run had finished already)" if done else "none (no step finished)"
    metrics = Path(args.log_dir) / METRICS
    try:
        print(
            f"Best checkpoint: {selected}\n"
            f"Steps: {summary.step} of {args.num_steps}"
            f"{' (stopped; continue with --resume)' if summary.stopped else ''}\n"
            f"Training time: {trained}\n"
            f"Checkpoint: {checkpoint}\n"
            f"{skipped}"
            f"Last state: {last if last.is_file() else 'none written'}\n"
            f"Metrics: {metrics if metrics.is_file() else 'none written'}\n"
            f"TensorBoard: {python_command('-m', 'tensorboard.main', '--logdir', args.log_dir)}",
            flush=True,
        )
    except OSError as err:  # the run itself has finished
        logger.error("Could not print the summary (%s); the run's files are saved.", err)


# --------------------------------------------------------------------------------------------
# Entry point


def main(argv: Sequence[str] | None = None) -> Summary:
    """Parse flags, set up, run the training loop, print the summary; returns the summary."""
    args = parse_args(argv)
    info, summary = run_distributed(partial(_run, args), args.verbose, args.local_rank)
    if info.is_main:
        print_summary(summary, args)
    return summary


def _run(args: argparse.Namespace, info: DistInfo) -> Summary:
    check_args(args, info)
    # The run's files are checked and locked before any work: a new run never replaces an
    # earlier run's files, and --overwrite deletes them only once every other check has passed.
    with claim_run(
        args.output_dir,
        args.log_dir,
        args.name,
        resume=args.resume is not None,
        overwrite=args.overwrite,
        is_main=info.is_main,
    ) as claim:
        resume_from = (
            resolve_resume(args.resume, args.output_dir, args.name) if args.resume else None
        )
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        if resume_from is None:  # read first to fail fast, before downloads
            weights, model_type = read_checkpoint(args)
        else:  # the saved state holds the weights, and says which model they are
            weights = None
            model_type = args.model_type or which_model(
                resume_from, None, saved_model_type(resume_from)
            )
        checked_img_size(get_config(model_type), args.img_size)
        return train(set_up(args, info, model_type, weights, resume_from, claim))


def cli(argv: Sequence[str] | None = None) -> None:
    """The command line: a run stopped by a signal exits with 128 + signal, after saving."""
    summary = main(argv)
    if summary.stopped:
        raise StoppedBySignal(summary.signal)


if __name__ == "__main__":
    run_cli(cli)
