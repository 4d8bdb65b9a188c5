"""Classification evaluation: test loss and top-1/top-5 accuracy over every test image, sharded
over all ranks, and the top-k classes of a batch.

`train.py` and `eval.py` both call `evaluate`, so evaluation during training and `eval.py` are
one code path and give the same numbers.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.data.loaders import prepare_batch
from utils.infra.console import SafeStream, interactive
from utils.infra.dist_utils import all_reduce_sum, unwrap
from utils.infra.errors import UserError
from utils.recipe.amp import autocast

__all__ = ["evaluate", "top_k"]


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
        progress: show a tqdm bar (on a terminal only).

    Returns:
        `loss` (mean cross-entropy), `accuracy` (top-1), `count` (images over all ranks),
        and `top5` when the model has more than 10 classes.
    """
    num_classes = unwrap(model).num_classes
    was_training = model.training
    model.eval()
    # Sums on the device, read back once at the end: loss, top-1, top-5 and the image count
    # (known on the host, added there).
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    count = 0
    bar = SafeStream(sys.stderr)  # a console that cannot be written never ends a run
    show = progress and interactive()  # without a terminal, redraws would pile up in the log
    for batch in tqdm(test_loader, desc="Validating", disable=not show, leave=False, file=bar):
        if batch is None:  # every image of it was unreadable (`skip_unreadable`)
            continue
        images, labels = prepare_batch(batch, device)  # (test images resized on the device)
        with autocast(precision, device):
            logits = model(images)[0]  # (B, classes)
        logits = logits.float()
        top = logits.topk(min(5, num_classes), dim=1).indices  # (B, k)
        hits = top == labels[:, None]
        totals[:3] += torch.stack(
            [
                F.cross_entropy(logits, labels, reduction="sum").double(),
                hits[:, 0].sum().double(),
                hits.any(dim=1).sum().double(),
            ]
        )
        count += len(labels)
    totals[3].fill_(count)
    all_reduce_sum(totals)
    model.train(was_training)
    loss, top1, top5, count = totals.tolist()
    count = int(count)
    if count == 0:
        raise UserError("The test set is empty; add images to the val/ or test/ folder.")
    result = {"loss": loss / count, "accuracy": top1 / count, "count": count}
    if num_classes > 10:
        result["top5"] = top5 / count
    return result


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
