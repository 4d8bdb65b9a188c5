"""Side-by-side benchmark of this project's ViT and timm's equivalent, in one run.

For a `--model_type`, image size, batch, precision and device it measures, interleaving the two
models step by step so that machine noise hits both alike:

- images/s of inference and of a full training step (forward, cross-entropy, backward, gradient
  clipping at 1.0, SGD momentum step, as `train.py` does it), and the ratio ours / timm; our
  model steps with vit_jax's update rule (`--optim_dtype` momentum), timm's with
  `torch.optim.SGD` (float32 momentum) as timm users train;
- the FLOPs of each (`torch.utils.flop_counter`, attention included on the CPU too:
  `ATTENTION_FLOPS`) and the fraction of the machine's matrix-multiply throughput reached, the
  latter measured with a large GEMM inside the same timing loop;
- the host syncs of one training step (`.item()`, `bool()`, `nonzero`, copies to the host:
  `HostSyncs`), counted on the CPU too;
- peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the peak bytes of live tensor
  storage (parameters, optimizer state, inputs, activations, gradients), tracked op by op;
- whether (N x N) attention probabilities are saved for backward when `vis=False`;
- the optimizer: momentum bytes and peak memory of one training step of our model with
  bfloat16 and with float32 momentum;
- optionally (`--compile`) the throughput of `torch.compile`d copies, timed in the same
  interleaved rounds, and their gain over eager;
- on CUDA, our model in fp32, fp32 with TF32 and bf16 autocast (eager, and compiled with
  `--compile`), in the same interleaved rounds, each with its MFU: FLOP/s over the bf16
  matrix-product rate measured in those rounds;
- optionally (`--grad_checkpointing`) training throughput and peak memory with and without
  activation checkpointing, ours (`set_grad_checkpointing`) and timm's own
  (`set_grad_checkpointing`), four models in the same interleaved rounds, and the ratios;
- checkpoint load time: official-layout `.npz` -> ready model, ours vs timm's loader;
- the data pipeline on CIFAR-sized (32 x 32) images at 224 and 384: images/s of one loader
  worker with the old PIL transforms and with the float preprocessing, of the batched device
  path and of the uint8 gathering that feeds it; and how many workers a GPU's training speed
  needs (this run's, on CUDA; otherwise an estimate, labelled so);
- image folders on real JPEGs (427 x 437 crops of scikit-learn's sample photos): training
  images/s of one loader worker at 224, ours (decode and uint8 crop; the resize runs on the
  device), ours before (the float preprocessing in the worker) and timm's loader doing the
  same work, and the workers each needs for 3,000 images/s.

Throughput is reported as the median over the rounds and as the best round (on a shared
machine noise only slows steps down). The results are printed as a Markdown table and written
as JSON (`--out`). Example::

    .venv/bin/python bench.py --model_type ViT-B_16 --img_size 224 --batch_size 8
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import glob
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from models.configs import ViTConfig, get_config, model_names
from models.modeling import VisionTransformer
from models.npz import load_npz, state_dict_to_npz
from tools.make_photo_folder import PHOTO_SIDES, write_photo_folder
from utils.data.loaders import (
    InMemoryAugment,
    SeededAugment,
    augment_rng,
    build_transforms,
    get_loader,
)
from utils.data.preprocessing import crop_resize_batch, read_image
from utils.infra.description import PRECISIONS
from utils.infra.file_io import save_npz
from utils.infra.flags import add_tf32_flag
from utils.infra.memory import LiveTensorBytes
from utils.recipe.amp import autocast, autocast_dtype, set_tf32
from utils.recipe.optim import make_optimizer
from utils.recipe.update_rule import OPTIM_DTYPES

logger = logging.getLogger("bench")

MB = 2**20
# Medians, and the best round: on a shared machine noise only ever slows a step down, so the
# fastest of several interleaved rounds is the steadier estimate of what the code costs.
THROUGHPUTS = ("infer_img_s", "train_img_s", "infer_img_s_best", "train_img_s_best")


# --------------------------------------------------------------------------------------------
# The two models


def build_ours(config: ViTConfig, img_size: int, num_classes: int, vis: bool = False) -> nn.Module:
    """This project's model."""
    return VisionTransformer(config, img_size, num_classes=num_classes, vis=vis)


def build_timm(config: ViTConfig, img_size: int, num_classes: int) -> nn.Module:
    """timm's VisionTransformer with the same architecture, tanh GELU and fused attention.

    Plain models are `timm.models.vision_transformer.VisionTransformer` (what
    `vit_base_patch16_224` builds); hybrids put timm's ResNetV2 (`vit_base_r50_s16_224`'s
    backbone: StdConv2dSame, GroupNorm, SAME stem) in a `HybridEmbed`. Dropout rates match ours
    (embeddings, attention output, MLP). timm has no `pre_logits` layer; registry configs have
    none either.
    """
    import timm.layers
    from timm.layers import HybridEmbed, StdConv2dSame
    from timm.models.resnetv2 import ResNetV2
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    timm.layers.set_fused_attn(True)
    kwargs: dict[str, Any] = {}
    if config.resnet is not None:
        backbone = ResNetV2(
            layers=config.resnet.num_layers,
            num_classes=0,
            global_pool="",
            preact=False,
            stem_type="same",
            conv_layer=functools.partial(StdConv2dSame, eps=1e-8),
            width_factor=config.resnet.width_factor,
        )
        kwargs["embed_layer"] = functools.partial(HybridEmbed, backbone=backbone)
    return TimmViT(
        img_size=img_size,
        patch_size=config.patch_size,
        num_classes=num_classes,
        global_pool="token" if config.classifier == "token" else "avg",
        class_token=config.classifier == "token",
        embed_dim=config.hidden_size,
        depth=config.num_layers,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_dim / config.hidden_size,
        pos_drop_rate=config.dropout_rate,
        proj_drop_rate=config.dropout_rate,
        attn_drop_rate=config.attention_dropout_rate,
        act_layer=functools.partial(nn.GELU, approximate="tanh"),
        **kwargs,
    )


def ours_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(images, labels)


def timm_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(images), labels)


def ours_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images)[0]


def timm_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images)


# name -> (build, loss_fn, logits_fn)
MODELS = {
    "ours": (build_ours, ours_loss, ours_logits),
    "timm": (build_timm, timm_loss, timm_logits),
}


@dataclass
class Runner:
    """One model under test, with the closures the benchmark times."""

    name: str
    model: nn.Module
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    logits_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    infer_times: list[float] = field(default_factory=list)
    train_times: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Steps and timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def update_step(runner: Runner, images: torch.Tensor, labels: torch.Tensor, precision: str) -> None:
    """Forward, loss, backward, global-norm clipping at 1.0, the optimizer's step: the work of
    one train.py update without accumulation, loss scaling or the non-finite guard, the same
    for our model and timm's (mixed precision as train.py's `autocast`)."""
    with autocast(precision, images.device):
        loss = runner.loss_fn(runner.model, images, labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(runner.model.parameters(), 1.0)
    runner.optimizer.step()
    runner.optimizer.zero_grad(set_to_none=True)


def infer_step(runner: Runner, images: torch.Tensor, precision: str) -> None:
    with torch.inference_mode(), autocast(precision, images.device):
        runner.logits_fn(runner.model, images)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def matmul_flops_per_s(size: int, precision: str, device: torch.device) -> Callable[[], float]:
    """A closure timing one (size x size) @ (size x size) GEMM in the dtype autocast computes in
    for `precision`; returns FLOP/s."""
    dtype = autocast_dtype(precision, device) or torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)

    def run() -> float:
        return 2 * size**3 / _timed(lambda: torch.mm(a, b), device)

    return run


def interleaved(
    runners: list[Runner],
    step: Callable[[Runner], None],
    times_attr: str,
    warmup: int,
    iters: int,
    device: torch.device,
    gemm: Callable[[], float],
    gemm_rates: list[float],
) -> None:
    """Warm up, then time `iters` rounds; each round runs every model once, then a GEMM.

    The order of the models alternates between rounds so neither always runs first.
    """
    for runner in runners:
        for _ in range(warmup):
            step(runner)
    for i in range(iters):
        order = runners if i % 2 == 0 else runners[::-1]
        for runner in order:
            getattr(runner, times_attr).append(_timed(lambda r=runner: step(r), device))
        gemm_rates.append(gemm())


# --------------------------------------------------------------------------------------------
# Memory


def _storage_bytes(tensors: Iterator[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _resident_tensors(runner: Runner, images: torch.Tensor) -> Iterator[torch.Tensor]:
    yield images
    yield from runner.model.parameters()
    yield from runner.model.buffers()
    for state in runner.optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def peak_memory(runner: Runner, step: Callable[[Runner], None], images: torch.Tensor) -> int:
    """Peak bytes of live tensors during `step(runner)`, parameters and optimizer state included."""
    device = images.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(runner)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    resident = _storage_bytes(_resident_tensors(runner, images))
    with LiveTensorBytes() as tracker:
        step(runner)
    return resident + tracker.peak


def saved_attention_maps(
    model: nn.Module, loss_fn: Callable, images: torch.Tensor, labels: torch.Tensor, tokens: int
) -> int:
    """How many (..., N, N) tensors autograd saves for backward in one training forward."""
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        if t.dim() >= 3 and t.shape[-1] == t.shape[-2] == tokens:
            count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model, images, labels)
    del loss
    return count


# torch's FLOP counter has formulas for the CUDA attention kernels, but not (in torch 2.14) for
# the CPU's fused one, so on the CPU attention counted for nothing (ViT-B_16 at 224: 31.6 GFLOP
# forward instead of 32.9). These are its CUDA formulas: two matrix products forward, five
# backward (the scores are recomputed, as a fused kernel does).
ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(
            query, key, value
        )
    ),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad, query, key, value, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(
            grad, query, key, value
        )
    ),
}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of `fn()`: matrix products, convolutions and attention (`ATTENTION_FLOPS`)."""
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


class HostSyncs(TorchDispatchMode):
    """Counts the operations that make the host wait for the device: a tensor's value read on
    the host (`.item()`, `bool()`, an `if` on a tensor: `aten._local_scalar_dense`), `nonzero`
    (its output size), and copies from a device to the host.

    The count is the same on the CPU, where nothing waits: what a GPU would wait for. A scalar
    the host made from a Python number (`torch.tensor(0.9)`) is on the host already; reading it
    back waits for nothing and is not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._host_made: dict[int, torch.Tensor] = {}  # kept alive, so their ids stay theirs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = func.overloadpacket
        if op is torch.ops.aten.lift_fresh:
            self._host_made[id(out)] = out
        elif op is torch.ops.aten._local_scalar_dense:
            self.count += id(args[0]) not in self._host_made
        elif op is torch.ops.aten.nonzero:
            self.count += 1
        elif op is torch.ops.aten._to_copy:
            self.count += args[0].device.type != "cpu" and out.device.type == "cpu"
        elif op is torch.ops.aten.copy_:
            self.count += args[0].device.type == "cpu" and args[1].device.type != "cpu"
        return out


def count_host_syncs(fn: Callable[[], Any]) -> int:
    """How many times `fn()` makes the host wait for the device (`HostSyncs`)."""
    with HostSyncs() as syncs:
        fn()
    return syncs.count


# --------------------------------------------------------------------------------------------
# Checkpoint loading


def checkpoint_load_times(
    config: ViTConfig, img_size: int, num_classes: int, iters: int
) -> dict[str, Any]:
    """Seconds from an official-layout `.npz` on disk to a ready model (build + read + load).

    The file is written from a randomly initialised model of ours in a temporary directory.
    Both loaders read the same file; their logits on one input are compared afterwards.
    """
    from timm.models.vision_transformer import _load_weights

    def ours() -> nn.Module:
        model = VisionTransformer.from_pretrained(config, load_npz(path), img_size, num_classes)
        return model.eval()

    def theirs() -> nn.Module:
        model = build_timm(config, img_size, num_classes)
        _load_weights(model, path)
        return model.eval()

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{config.name}.npz")
        source = build_ours(config, img_size, num_classes)
        nn.init.normal_(source.head.weight, std=0.02)  # a non-zero head, so outputs differ
        save_npz(path, state_dict_to_npz(source.state_dict(), config))
        del source
        file_mb = os.path.getsize(path) / MB
        times: dict[str, list[float]] = {"ours": [], "timm": []}
        for i in range(iters):
            for name, fn in (("ours", ours), ("timm", theirs))[:: 1 if i % 2 == 0 else -1]:
                start = time.perf_counter()
                model = fn()
                times[name].append(time.perf_counter() - start)
                del model
        ours_model, timm_model = ours(), theirs()
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        diff = (ours_model(x)[0] - timm_model(x)).abs().max().item()
    ours_s, timm_s = statistics.median(times["ours"]), statistics.median(times["timm"])
    return {
        "file_mb": file_mb,
        "ours_s": ours_s,
        "timm_s": timm_s,
        "ratio_ours_over_timm": ours_s / timm_s,
        "ours_best_s": min(times["ours"]),
        "timm_best_s": min(times["timm"]),
        "max_abs_logit_diff": diff,
    }


# --------------------------------------------------------------------------------------------
# Data pipeline

DEVICE_BATCH = 64  # images per call of the batched device path
# Used when no GPU training speed is measured in the run: ViT-B_16 fine-tuning at 384 on one
# H100, roughly; an estimate, labelled as such in the output.
ESTIMATED_GPU_TRAIN = {"img_s": 2500.0, "img_size": 384, "basis": "estimate: ViT-B_16 @ 384, H100"}


def old_training_transform(size: int) -> Callable:
    """The training transform this project used before it reproduced vit_jax's pipeline (the
    old path, kept here only for the side-by-side speed ratio): torchvision's RandomResizedCrop
    on a PIL image (uint8, antialiased), flip, ToTensor, Normalize."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(0.05, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        ]
    )


def _per_worker_rates(
    paths: dict[str, Callable[[int], Any]], num_images: int, rounds: int
) -> dict[str, float]:
    """Images/s of each per-image path on one thread (as in a loader worker), best round.

    The paths run in alternating order, round after round, so noise hits them alike.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times: dict[str, list[float]] = {name: [] for name in paths}
        for fn in paths.values():
            for i in range(min(8, num_images)):
                fn(i)
        for r in range(rounds):
            for name, fn in list(paths.items())[:: 1 if r % 2 == 0 else -1]:
                start = time.perf_counter()
                for i in range(num_images):
                    fn(i)
                times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {name: num_images / min(t) for name, t in times.items()}


def data_pipeline_rates(
    sizes: list[int], num_images: int, device: torch.device, rounds: int = 3
) -> dict[str, Any]:
    """Speed of the training input pipeline on CIFAR-sized (32 x 32) images, per output size.

    - `old_img_s`, `float_img_s`: one worker (one thread) running the per-image path, the old
      PIL transform vs the float one of `utils.data.preprocessing` (seeded per image as in
      training);
    - `batched_<device>_img_s`: the batched device path (`crop_resize_batch`, in batches of
      `DEVICE_BATCH`), given the crop boxes and flips;
    - `gather_img_s`: one worker producing those batches for an in-memory dataset
      (`InMemoryAugment`: uint8 gather plus box sampling; no resizing, so any size).
    """
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(num_images, 32, 32, 3), dtype=np.uint8)
    pil_images = [Image.fromarray(p) for p in pixels]
    in_memory = InMemoryAugment(pixels, np.zeros(num_images, np.int64), ["x"], (32, 32), seed=0)
    chunks = [
        list(range(start, min(start + DEVICE_BATCH, num_images)))
        for start in range(0, num_images, DEVICE_BATCH)
    ]
    batches = [in_memory.__getitems__(chunk) for chunk in chunks]
    gather = _per_worker_rates(
        {"gather": lambda i: in_memory.__getitems__(chunks[i])}, len(chunks), rounds
    )["gather"] * (num_images / len(chunks))
    result: dict[str, Any] = {
        "images": num_images,
        "source": "32x32 RGB",
        "gather_img_s": gather,
        "sizes": {},
    }
    devices = [torch.device("cpu")] + ([device] if device.type == "cuda" else [])
    for size in sizes:
        old, new = old_training_transform(size), build_transforms(size, train=True)
        rates = _per_worker_rates(
            {
                "old": lambda i, old=old: old(pil_images[i]),
                "float": lambda i, new=new: new(pil_images[i], augment_rng(0, 0, i)),
            },
            num_images,
            rounds,
        )
        row: dict[str, Any] = {
            "old_img_s": rates["old"],
            "float_img_s": rates["float"],
            "float_over_old": rates["float"] / rates["old"],
        }
        for dev in devices:
            on_device = [(b.images.to(dev), b.boxes.to(dev), b.flips.to(dev)) for b in batches]

            def run_all(on_device=on_device, size=size) -> None:
                for images, boxes, flips in on_device:
                    crop_resize_batch(images, boxes, flips, (size, size))

            run_all()
            seconds = min(_timed(run_all, dev) for _ in range(rounds))
            row[f"batched_{dev.type}_img_s"] = num_images / seconds
        row.setdefault("batched_cuda_img_s", None)  # no GPU in this run
        result["sizes"][str(size)] = row
    return result


def workers_to_feed(data: dict[str, Any], train_img_s: float, img_size: int, basis: str) -> dict:
    """Loader workers each path needs to keep up with `train_img_s` at `img_size`."""
    row = data["sizes"][str(img_size)]
    return {
        "train_img_s": train_img_s,
        "img_size": img_size,
        "basis": basis,
        "old_path": train_img_s / row["old_img_s"],
        "float_path": train_img_s / row["float_img_s"],
        "device_path": train_img_s / data["gather_img_s"],
    }


# --------------------------------------------------------------------------------------------
# Image folders

FOLDER_SIZE = 224  # output side of the image-folder figures
FOLDER_TARGET_IMG_S = 3000.0  # training images/s the workers are counted for


def jpeg_decode_rates(root: str, device: torch.device, rounds: int = 3) -> dict[str, Any]:
    """Decoding alone, the work left in a loader worker, on the JPEGs under `root`: images/s of
    PIL (as our workers decode, one image at a time), and on CUDA of torchvision's batched GPU
    decoder (nvJPEG) from bytes already read, with how far its pixels are from PIL's, on average
    and at most (the two decoders round the inverse DCT differently). Best round."""
    from torchvision.io import ImageReadMode, decode_jpeg

    paths = sorted(glob.glob(os.path.join(root, "**", "*.jpg"), recursive=True))
    pil: list = []  # the last round's images

    def pil_decode() -> None:
        pil[:] = [read_image(path) for path in paths]

    best = min(_timed(pil_decode, torch.device("cpu")) for _ in range(rounds))
    figures: dict[str, Any] = {"images": len(paths), "pil_img_s": len(paths) / best}
    if device.type != "cuda":
        figures["gpu"] = {"skipped": f"CUDA only, skipped on {device.type}"}
        return figures
    data = [
        torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8) for path in paths
    ]
    gpu: list = []

    def gpu_decode() -> None:
        gpu[:] = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    gpu_decode()  # the decoder's set-up, untimed
    best = min(_timed(gpu_decode, device) for _ in range(rounds))
    diffs = torch.cat(
        [
            (ours.permute(1, 2, 0).cpu().int() - torch.from_numpy(np.array(theirs)).int())
            .abs()
            .flatten()
            for ours, theirs in zip(gpu, pil, strict=True)
        ]
    ).double()
    figures["gpu"] = {
        "img_s": len(paths) / best,
        "max_abs_diff_from_pil": int(diffs.max()),
        "mean_abs_diff_from_pil": float(diffs.mean()),
    }
    figures["gpu_over_pil"] = figures["gpu"]["img_s"] / figures["pil_img_s"]
    return figures


def image_folder_rates(num_images: int, device: torch.device, rounds: int = 3) -> dict[str, Any]:
    """Training images/s of one loader worker (one thread, as torch runs its workers) on an
    image folder of real JPEGs at `FOLDER_SIZE`: each loader's whole per-batch job, read from
    disk to the batch it hands over, in batches of `DEVICE_BATCH` (at most `num_images`), best
    round.

    - `ours`: train.py's loader (`get_loader`): decode, the box and flip, the uint8 crop, the
      packed batch; the resize, flip and scaling then run on the training device;
    - `ours_before`: the same images, seeds and sampler through the per-image path
      (`SeededAugment`: the float crop, resize and scaling in the worker), collated;
    - `timm`: timm's `create_dataset` + `create_loader` with the same work (decode,
      RandomResizedCrop of 5-100 % of the area with a bilinear resize, flip, no colour jitter),
      its workers' part: the uint8 batch its prefetcher normalises on the device.

    And `decode`: `jpeg_decode_rates` on the same files (on `device`'s GPU decoder too).
    """
    from timm.data import create_dataset, create_loader
    from torch.utils.data import DataLoader

    batch = min(DEVICE_BATCH, num_images)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as root:
            write_photo_folder(root, num_images)
            ours = get_loader(
                "imagefolder",
                root,
                FOLDER_SIZE,
                seed=0,
                micro_batch_size=batch,
                eval_batch_size=batch,
                num_workers=0,
                holdout_fraction=0.0,
            )[0]
            batched = ours.dataset
            per_image = SeededAugment(batched.base, batched.transform, batched.seed)
            before = DataLoader(per_image, batch_size=batch, sampler=ours.sampler, drop_last=True)
            timm = create_loader(
                create_dataset("", root=root, split="train", is_training=True),
                FOLDER_SIZE,
                batch,
                is_training=True,
                scale=(0.05, 1.0),
                hflip=0.5,
                color_jitter=None,
                interpolation="bilinear",
                num_workers=0,
                persistent_workers=False,
                device=torch.device("cpu"),
            ).loader  # the workers' part (the prefetcher then normalises on the device)
            loaders = {"ours": ours, "ours_before": before, "timm": timm}
            times: dict[str, list[float]] = {name: [] for name in loaders}
            counts = {name: len(loader) * batch for name, loader in loaders.items()}
            for r in range(rounds + 1):  # the first round warms the file cache, untimed
                for name, loader in list(loaders.items())[:: 1 if r % 2 == 0 else -1]:
                    start = time.perf_counter()
                    for _ in loader:
                        pass
                    if r:
                        times[name].append(time.perf_counter() - start)
            decode = jpeg_decode_rates(root, device, rounds)
    finally:
        torch.set_num_threads(threads)
    rates = {f"{name}_img_s": counts[name] / min(t) for name, t in times.items()}
    return {
        "images": num_images,
        "source": f"{PHOTO_SIDES[0]}x{PHOTO_SIDES[1]} JPEG (sklearn sample photos)",
        "img_size": FOLDER_SIZE,
        **rates,
        "ours_over_timm": rates["ours_img_s"] / rates["timm_img_s"],
        "ours_over_before": rates["ours_img_s"] / rates["ours_before_img_s"],
        "workers_for": FOLDER_TARGET_IMG_S,
        "workers": {name: FOLDER_TARGET_IMG_S / rates[f"{name}_img_s"] for name in loaders},
        "decode": decode,
    }


# --------------------------------------------------------------------------------------------
# The benchmark


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _section(
    args: argparse.Namespace, runners: list[Runner], cost: dict[str, dict], gemm_rate: float
) -> dict[str, Any]:
    """Figures of one pair (ours, timm) of runners; FLOPs and memory come from `cost`."""
    result: dict[str, Any] = {}
    for r in runners:
        c = cost[r.name]
        infer_s, train_s = statistics.median(r.infer_times), statistics.median(r.train_times)
        result[r.name] = {
            "infer_img_s": args.batch_size / infer_s,
            "train_img_s": args.train_batch_size / train_s,
            "infer_img_s_best": args.batch_size / min(r.infer_times),
            "train_img_s_best": args.train_batch_size / min(r.train_times),
            "infer_step_s": infer_s,
            "train_step_s": train_s,
            "infer_gflop_per_img": c["infer_flops"] / args.batch_size / 1e9,
            "train_gflop_per_img": c["train_flops"] / args.train_batch_size / 1e9,
            "infer_matmul_fraction": c["infer_flops"] / infer_s / gemm_rate,
            "train_matmul_fraction": c["train_flops"] / train_s / gemm_rate,
            "infer_peak_mem_mb": c["infer_mem"] / MB,
            "train_peak_mem_mb": c["train_mem"] / MB,
            "saved_nxn_tensors_vis_false": c["nxn"],
            "infer_times_s": [round(t, 4) for t in r.infer_times],
            "train_times_s": [round(t, 4) for t in r.train_times],
        }
    a, b = result["ours"], result["timm"]
    result["ratio_ours_over_timm"] = {
        key: _ratio(a[key], b[key])
        for key in (*THROUGHPUTS, "infer_peak_mem_mb", "train_peak_mem_mb")
    }
    result["matmul_gflop_s"] = gemm_rate / 1e9
    return result


def make_runner(name: str, model: nn.Module, optim_dtype: str) -> Runner:
    """Ours: train.py's SGD with `optim_dtype` momentum; timm: torch.optim.SGD, float32."""
    if name == "ours":
        optimizer = make_optimizer(model.parameters(), 1e-3, optim_dtype)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    _, loss_fn, logits_fn = MODELS[name]
    return Runner(name, model, loss_fn, logits_fn, optimizer)


def training_batch(
    args: argparse.Namespace, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded training batch (images, labels) the memory figures are measured on."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.train_batch_size, 3, args.img_size, args.img_size, generator=gen)
    labels = torch.randint(0, args.num_classes, (args.train_batch_size,), generator=gen)
    return images.to(device), labels.to(device)


def optimizer_memory(args: argparse.Namespace, config: ViTConfig, device: torch.device) -> dict:
    """Momentum bytes and peak memory of one training step of our model, per momentum dtype."""
    images, labels = training_batch(args, device)
    train = functools.partial(update_step, images=images, labels=labels, precision=args.dtype)
    result: dict[str, Any] = {}
    for optim_dtype in OPTIM_DTYPES:
        torch.manual_seed(0)
        model = build_ours(config, args.img_size, args.num_classes).to(device).train()
        runner = make_runner("ours", model, optim_dtype)
        train(runner)  # creates the momentum
        momentum = (state["momentum_buffer"] for state in runner.optimizer.state.values())
        peak = peak_memory(runner, train, images)
        result[optim_dtype] = {
            "momentum_mb": _storage_bytes(momentum) / MB,
            "train_peak_mem_mb": peak / MB,
        }
    return result


def checkpointing_figures(
    args: argparse.Namespace, config: ViTConfig, device: torch.device, gemm: Callable[[], float]
) -> dict[str, Any]:
    """Training img/s and peak memory without and with activation checkpointing.

    Four models (ours and timm's, each with `set_grad_checkpointing` off and on) train in the
    same interleaved rounds. Ratios: with / without for each, and ours / timm with it.
    """
    images, labels = training_batch(args, device)
    runners = {}
    for name, (build, _, _) in MODELS.items():
        for checkpointing in (False, True):
            torch.manual_seed(0)
            model = build(config, args.img_size, args.num_classes).to(device).train()
            model.set_grad_checkpointing(checkpointing)
            runners[name, checkpointing] = make_runner(name, model, args.optim_dtype)
    train = functools.partial(update_step, images=images, labels=labels, precision=args.dtype)
    logger.info("checkpointing: %d warm-up + %d timed training rounds", args.warmup, args.iters)
    interleaved(
        list(runners.values()), train, "train_times", args.warmup, args.iters, device, gemm, []
    )
    result: dict[str, Any] = {}
    for (name, checkpointing), r in runners.items():
        peak = peak_memory(r, train, images)
        result.setdefault(name, {})["with" if checkpointing else "without"] = {
            "train_img_s": args.train_batch_size / statistics.median(r.train_times),
            "train_img_s_best": args.train_batch_size / min(r.train_times),
            "train_peak_mem_mb": peak / MB,
            "train_times_s": [round(t, 4) for t in r.train_times],
        }
    keys = ("train_img_s", "train_img_s_best", "train_peak_mem_mb")
    for name in MODELS:
        with_it, without = result[name]["with"], result[name]["without"]
        result[name]["ratio_with_over_without"] = {k: _ratio(with_it[k], without[k]) for k in keys}
    result["ratio_ours_over_timm_with"] = {
        k: _ratio(result["ours"]["with"][k], result["timm"]["with"][k]) for k in keys
    }
    return result


def measure_models(
    args: argparse.Namespace, config: ViTConfig, device: torch.device, gemm: Callable[[], float]
) -> dict[str, Any]:
    """Throughput, FLOPs and peak memory of ours vs timm: `eager`, and `compiled` if asked.

    With `--compile`, the compiled copies run in the same interleaved rounds as the eager
    models, so the compile gain is measured under the same machine noise.
    """
    torch.manual_seed(0)
    models = {
        name: build(config, args.img_size, args.num_classes).to(device)
        for name, (build, _, _) in MODELS.items()
    }
    eager_runners = [make_runner(name, model, args.optim_dtype) for name, model in models.items()]
    compiled_runners = [  # copies, which train their own weights
        make_runner(name, torch.compile(copy.deepcopy(model)), args.optim_dtype)
        for name, model in (models.items() if args.compile else ())
    ]
    runners = eager_runners + compiled_runners

    gen = torch.Generator().manual_seed(0)
    infer_x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen)
    train_x = torch.randn(args.train_batch_size, 3, args.img_size, args.img_size, generator=gen)
    train_y = torch.randint(0, args.num_classes, (args.train_batch_size,), generator=gen)
    infer_x, train_x, train_y = infer_x.to(device), train_x.to(device), train_y.to(device)

    infer = functools.partial(infer_step, images=infer_x, precision=args.dtype)
    train = functools.partial(update_step, images=train_x, labels=train_y, precision=args.dtype)

    for r in runners:
        r.model.eval()
    logger.info(
        "inference: %d warm-up + %d timed rounds of %d models",
        args.warmup,
        args.infer_iters,
        len(runners),
    )
    gemm_rates: list[float] = []
    interleaved(
        runners, infer, "infer_times", args.warmup, args.infer_iters, device, gemm, gemm_rates
    )
    for r in runners:
        r.model.train()
    logger.info("training: %d warm-up + %d timed rounds", args.warmup, args.iters)
    interleaved(runners, train, "train_times", args.warmup, args.iters, device, gemm, gemm_rates)
    gemm_rate = statistics.median(gemm_rates)

    # FLOPs, memory and saved tensors of the eager modules (compiled graphs hide their ops).
    tokens = models["ours"].embeddings.pos_embed.shape[1]
    cost: dict[str, dict] = {}
    for r in eager_runners:
        r.model.eval()
        cost[r.name] = {
            "infer_flops": count_flops(functools.partial(infer, r)),
            "infer_mem": peak_memory(r, infer, infer_x),
        }
        r.model.train()
        cost[r.name]["train_flops"] = count_flops(functools.partial(train, r))
        cost[r.name]["train_mem"] = peak_memory(r, train, train_x)
        cost[r.name]["nxn"] = saved_attention_maps(r.model, r.loss_fn, train_x, train_y, tokens)
        r.optimizer.zero_grad(set_to_none=True)
    results = {"eager": _section(args, eager_runners, cost, gemm_rate)}
    if compiled_runners:
        results["compiled"] = _section(args, compiled_runners, cost, gemm_rate)
    # One training step each, with the optimizer each trains with (ours: train.py's).
    results["host_syncs_per_train_step"] = {
        r.name: count_host_syncs(functools.partial(train, r)) for r in eager_runners
    }
    return results


# The precision rows (CUDA): name -> (autocast precision, TF32 for float32 products).
PRECISION_ROWS = {"fp32": ("fp32", False), "fp32 + TF32": ("fp32", True), "bf16": ("bf16", True)}


def precision_figures(
    args: argparse.Namespace,
    config: ViTConfig,
    device: torch.device,
    gflop_per_img: dict[str, float],
    matmul_size: int,
) -> dict[str, Any]:
    """Our model's images/s in each of `PRECISION_ROWS`, eager and (with --compile) compiled,
    all in the same interleaved rounds, and its MFU: the FLOP/s reached over the bfloat16
    matrix-product rate measured in those rounds (the median of a `matmul_size` GEMM's), the
    machine's peak as this run sees it. `gflop_per_img` ("infer", "train") is the eager model's
    count, the same in every precision. The TF32 switches are put back to `--tf32` at the end.
    """
    torch.manual_seed(0)
    model = build_ours(config, args.img_size, args.num_classes).to(device)
    settings: dict[str, tuple[str, bool]] = {}
    runners = []
    for name, setting in PRECISION_ROWS.items():
        for compiled in (False, True) if args.compile else (False,):
            copied = copy.deepcopy(model)  # each trains its own weights
            runner = make_runner(
                "ours", torch.compile(copied) if compiled else copied, args.optim_dtype
            )
            runner.name = f"{name}, compiled" if compiled else name
            settings[runner.name] = setting
            runners.append(runner)
    del model
    gen = torch.Generator().manual_seed(0)
    infer_x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen)
    train_x = torch.randn(args.train_batch_size, 3, args.img_size, args.img_size, generator=gen)
    train_y = torch.randint(0, args.num_classes, (args.train_batch_size,), generator=gen)
    infer_x, train_x, train_y = infer_x.to(device), train_x.to(device), train_y.to(device)

    def infer(runner: Runner) -> None:
        precision, tf32 = settings[runner.name]
        set_tf32(tf32, device, log=False)
        infer_step(runner, infer_x, precision)

    def train(runner: Runner) -> None:
        precision, tf32 = settings[runner.name]
        set_tf32(tf32, device, log=False)
        update_step(runner, train_x, train_y, precision)

    gemm = matmul_flops_per_s(matmul_size, "bf16", device)
    rates: list[float] = []
    logger.info("precisions: %d models, inference then training rounds", len(runners))
    try:
        for r in runners:
            r.model.eval()
        interleaved(
            runners, infer, "infer_times", args.warmup, args.infer_iters, device, gemm, rates
        )
        for r in runners:
            r.model.train()
        interleaved(runners, train, "train_times", args.warmup, args.iters, device, gemm, rates)
    finally:
        set_tf32(args.tf32 == "on", device, log=False)
    peak = statistics.median(rates)
    rows = {}
    for r in runners:
        infer_s, train_s = statistics.median(r.infer_times), statistics.median(r.train_times)
        rows[r.name] = {
            "infer_img_s": args.batch_size / infer_s,
            "train_img_s": args.train_batch_size / train_s,
            "infer_mfu": gflop_per_img["infer"] * 1e9 * args.batch_size / infer_s / peak,
            "train_mfu": gflop_per_img["train"] * 1e9 * args.train_batch_size / train_s / peak,
            "infer_times_s": [round(t, 4) for t in r.infer_times],
            "train_times_s": [round(t, 4) for t in r.train_times],
        }
    return {"bf16_matmul_tflop_s": peak / 1e12, "rows": rows}


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    with contextlib.suppress(ImportError):
        import timm

        info["timm"] = timm.__version__
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every measurement; returns the JSON-able results."""
    config = get_config(args.model_type)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    matmul_size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    tf32 = set_tf32(args.tf32 == "on", device)  # before the GEMM: fp32 runs at the TF32 rate
    gemm = matmul_flops_per_s(matmul_size, args.dtype, device)
    results: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.argv[0]) or "bench.py", *sys.argv[1:]]),
        "settings": {
            "model_type": config.name,
            "img_size": args.img_size,
            "batch_size": args.batch_size,
            "train_batch_size": args.train_batch_size,
            "num_classes": args.num_classes,
            "dtype": args.dtype,
            "tf32": tf32,
            "optim_dtype": args.optim_dtype,
            "device": str(device),
            "warmup": args.warmup,
            "iters": args.iters,
            "infer_iters": args.infer_iters,
            "matmul_size": matmul_size,
            "memory_measure": (
                "torch.cuda.max_memory_allocated"
                if device.type == "cuda"
                else "peak bytes of live tensor storage (dispatch-mode tracker)"
            ),
        },
        "machine": machine_info(device),
    }
    results.update(measure_models(args, config, device, gemm))
    if args.compile:
        results["compile_gain"] = {
            name: {
                key: _ratio(results["compiled"][name][key], results["eager"][name][key])
                for key in THROUGHPUTS
            }
            for name in MODELS
        }
    if device.type == "cuda":
        eager = results["eager"]["ours"]
        gflop = {"infer": eager["infer_gflop_per_img"], "train": eager["train_gflop_per_img"]}
        results["precisions"] = precision_figures(args, config, device, gflop, matmul_size)
    else:
        results["precisions"] = {"skipped": f"CUDA only, skipped on {device.type}"}
    if args.grad_checkpointing:
        results["grad_checkpointing"] = checkpointing_figures(args, config, device, gemm)
    logger.info("optimizer memory")
    results["optimizer"] = optimizer_memory(args, config, device)
    if args.load_iters:
        logger.info("checkpoint load time")
        results["checkpoint_load"] = checkpoint_load_times(
            config, args.img_size, args.num_classes, args.load_iters
        )
    if args.data_images:
        logger.info("data pipeline")
        sizes = sorted({*args.data_sizes, args.img_size, ESTIMATED_GPU_TRAIN["img_size"]})
        data = data_pipeline_rates(sizes, args.data_images, device)
        if device.type == "cuda":  # this run's own training speed
            rate, size = results["eager"]["ours"]["train_img_s"], args.img_size
            basis = f"measured: ours, {config.name} @ {size}, {results['machine']['gpu']}"
        else:
            rate, size, basis = (ESTIMATED_GPU_TRAIN[k] for k in ("img_s", "img_size", "basis"))
        data["workers_to_feed"] = workers_to_feed(data, rate, size, basis)
        results["data_pipeline"] = data
    if args.folder_images:
        logger.info("image folder")
        results["image_folder"] = image_folder_rates(args.folder_images, device)
    return results


# --------------------------------------------------------------------------------------------
# Output


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _precision_lines(precisions: dict[str, Any]) -> list[str]:
    if "skipped" in precisions:
        return ["", f"Precisions (fp32, fp32 + TF32, bf16, with MFU): {precisions['skipped']}."]
    lines = [
        "",
        f"Precisions (ours; MFU: FLOP/s over the bf16 matrix product's measured "
        f"{precisions['bf16_matmul_tflop_s']:.1f} TFLOP/s):",
    ]
    for name, row in precisions["rows"].items():
        lines.append(
            f"- {name}: training {row['train_img_s']:.1f} img/s (MFU {row['train_mfu']:.3f}), "
            f"inference {row['infer_img_s']:.1f} img/s (MFU {row['infer_mfu']:.3f})"
        )
    return lines


def format_table(results: dict[str, Any]) -> str:
    """The results as a Markdown table (one row per figure)."""
    s = results["settings"]
    lines = [
        f"{s['model_type']} @ {s['img_size']}, {s['dtype']}{' + TF32' if s['tf32'] else ''}, "
        f"{s['device']}, batch "
        f"{s['batch_size']} (inference) / {s['train_batch_size']} (training), "
        f"matmul {results['eager']['matmul_gflop_s']:.1f} GFLOP/s",
        "",
        "| figure | ours | timm | ours/timm |",
        "|---|---|---|---|",
    ]
    rows = [
        ("inference img/s (median)", "infer_img_s", 2),
        ("inference img/s (best round)", "infer_img_s_best", 2),
        ("training img/s (median)", "train_img_s", 2),
        ("training img/s (best round)", "train_img_s_best", 2),
        ("inference peak memory MB", "infer_peak_mem_mb", 1),
        ("training peak memory MB", "train_peak_mem_mb", 1),
        ("inference matmul fraction", "infer_matmul_fraction", 3),
        ("training matmul fraction", "train_matmul_fraction", 3),
        ("inference GFLOP/img", "infer_gflop_per_img", 2),
        ("training GFLOP/img", "train_gflop_per_img", 2),
        ("saved N x N tensors (vis=False)", "saved_nxn_tensors_vis_false", 0),
    ]
    for section in ("eager", "compiled"):
        if section not in results:
            continue
        data = results[section]
        tag = "" if section == "eager" else " (compiled)"
        for label, key, digits in rows if section == "eager" else rows[:4]:
            ours, timm_value = data["ours"][key], data["timm"][key]
            ratio = _ratio(ours, timm_value) if isinstance(ours, float) else None
            lines.append(
                f"| {label}{tag} | {_fmt(ours, digits)} | {_fmt(timm_value, digits)} "
                f"| {_fmt(ratio)} |"
            )
        if section == "eager":
            ours, theirs = (results["host_syncs_per_train_step"][n] for n in ("ours", "timm"))
            lines.append(f"| host syncs per training step | {ours} | {theirs} | - |")
    if "compile_gain" in results:
        gain = results["compile_gain"]
        for key, label in (
            ("infer_img_s", "inference, median"),
            ("infer_img_s_best", "inference, best"),
            ("train_img_s", "training, median"),
            ("train_img_s_best", "training, best"),
        ):
            lines.append(
                f"| compile gain, {label} | {_fmt(gain['ours'][key])}x "
                f"| {_fmt(gain['timm'][key])}x | - |"
            )
    if "grad_checkpointing" in results:
        ckpt = results["grad_checkpointing"]
        for key, label, digits in (
            ("train_img_s", "training img/s (median)", 2),
            ("train_img_s_best", "training img/s (best round)", 2),
            ("train_peak_mem_mb", "training peak memory MB", 1),
        ):
            ours, theirs = ckpt["ours"]["with"][key], ckpt["timm"]["with"][key]
            lines.append(
                f"| {label}, checkpointing | {_fmt(ours, digits)} | {_fmt(theirs, digits)} "
                f"| {_fmt(ckpt['ratio_ours_over_timm_with'][key])} |"
            )
        for key, label in (
            ("train_img_s", "training img/s (median)"),
            ("train_img_s_best", "training img/s (best round)"),
            ("train_peak_mem_mb", "training peak memory"),
        ):
            ours = ckpt["ours"]["ratio_with_over_without"][key]
            theirs = ckpt["timm"]["ratio_with_over_without"][key]
            lines.append(
                f"| checkpointing / without: {label} | {_fmt(ours)}x | {_fmt(theirs)}x | - |"
            )
    if "checkpoint_load" in results:
        load = results["checkpoint_load"]
        lines.append(
            f"| npz -> ready model s, median ({load['file_mb']:.0f} MB) | {_fmt(load['ours_s'])} "
            f"| {_fmt(load['timm_s'])} | {_fmt(load['ratio_ours_over_timm'])} |"
        )
        best = _ratio(load["ours_best_s"], load["timm_best_s"])
        lines.append(
            f"| npz -> ready model s, best | {_fmt(load['ours_best_s'])} "
            f"| {_fmt(load['timm_best_s'])} | {_fmt(best)} |"
        )
    optim = results["optimizer"]
    lines += [
        "",
        "Optimizer (ours, one training step): "
        + "; ".join(
            f"{name} momentum {optim[name]['momentum_mb']:.1f} MB, "
            f"peak {optim[name]['train_peak_mem_mb']:.1f} MB"
            for name in OPTIM_DTYPES
        )
        + ".",
    ]
    lines += _precision_lines(results["precisions"])
    if "data_pipeline" in results:
        data = results["data_pipeline"]
        lines += ["", f"Data pipeline, {data['source']} images, per loader worker (1 thread):"]
        for size, row in data["sizes"].items():
            lines.append(
                f"- {size}: old PIL path {row['old_img_s']:.0f} img/s, float path "
                f"{row['float_img_s']:.0f} img/s ({row['float_over_old']:.2f}x); batched device "
                f"path: CPU {_fmt(row['batched_cpu_img_s'], 0)} img/s, "
                f"CUDA {_fmt(row['batched_cuda_img_s'], 0)} img/s"
            )
        feed = data["workers_to_feed"]
        lines += [
            f"- in-memory datasets: a worker gathers uint8 batches and crop boxes at "
            f"{data['gather_img_s']:.0f} img/s",
            f"- workers to feed {feed['train_img_s']:.0f} training img/s @ {feed['img_size']} "
            f"({feed['basis']}): old path {feed['old_path']:.2f}, float path "
            f"{feed['float_path']:.2f}, device path {feed['device_path']:.2f}",
        ]
    if "image_folder" in results:
        folder = results["image_folder"]
        workers = folder["workers"]
        lines += [
            "",
            f"Image folder, {folder['source']}, training at {folder['img_size']}, per loader "
            f"worker (1 thread): ours {folder['ours_img_s']:.0f} img/s, ours before "
            f"{folder['ours_before_img_s']:.0f} img/s, timm's loader {folder['timm_img_s']:.0f} "
            f"img/s (ours/timm {folder['ours_over_timm']:.2f}, ours/before "
            f"{folder['ours_over_before']:.2f}); workers for {folder['workers_for']:.0f} img/s: "
            f"ours {workers['ours']:.1f}, before {workers['ours_before']:.1f}, timm "
            f"{workers['timm']:.1f}",
        ]
        decode, gpu = folder["decode"], folder["decode"]["gpu"]
        gpu_text = (
            f"GPU (torchvision, nvJPEG, batched) {gpu['img_s']:.0f} img/s, "
            f"{decode['gpu_over_pil']:.1f}x; its pixels differ from PIL's by "
            f"{gpu['mean_abs_diff_from_pil']:.2f} on average, "
            f"{gpu['max_abs_diff_from_pil']} at most"
            if "img_s" in gpu
            else f"GPU: {gpu['skipped']}"
        )
        lines.append(
            f"JPEG decoding alone: PIL (1 thread) {decode['pil_img_s']:.0f} img/s; {gpu_text}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_type", choices=model_names(), default="ViT-B_16")
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=8, help="inference batch")
    parser.add_argument(
        "--train_batch_size", type=int, default=None, help="training batch (default: --batch_size)"
    )
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument(
        "--dtype", choices=PRECISIONS, default="fp32", help="autocast precision, as train.py's"
    )
    add_tf32_flag(parser)
    parser.add_argument(
        "--optim_dtype",
        choices=OPTIM_DTYPES,
        default="bfloat16",
        help="momentum storage of our model's optimizer (timm's stays float32)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
    parser.add_argument(
        "--iters", type=int, default=5, help="timed training rounds (the median is reported)"
    )
    parser.add_argument(
        "--infer_iters", type=int, default=None, help="timed inference rounds (default: 3 x iters)"
    )
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument(
        "--grad_checkpointing",
        action="store_true",
        help="also measure training with activation checkpointing (ours and timm's)",
    )
    parser.add_argument(
        "--load_iters", type=int, default=2, help="checkpoint load repetitions (0: skip)"
    )
    parser.add_argument(
        "--data_images", type=int, default=256, help="images for the data pipeline (0: skip)"
    )
    parser.add_argument(
        "--data_sizes",
        type=int,
        nargs="+",
        default=[224, 384],
        help="output sizes of the data pipeline figures (--img_size is added)",
    )
    parser.add_argument(
        "--folder_images",
        type=int,
        default=256,
        help="JPEGs for the image-folder figures (0: skip)",
    )
    parser.add_argument(
        "--matmul_size", type=int, default=None, help="GEMM side (default 2048 CPU, 8192 CUDA)"
    )
    parser.add_argument("--out", default="bench_results.json", help="JSON output path")
    args = parser.parse_args(argv)
    if args.train_batch_size is None:
        args.train_batch_size = args.batch_size
    if args.infer_iters is None:
        args.infer_iters = 3 * args.iters
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    results = run(args)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)
    print(format_table(results))
    logger.info("results written to %s", args.out)
    return results


if __name__ == "__main__":
    main()
