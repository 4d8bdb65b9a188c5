"""See inside a Vision Transformer: attention rollout, raw attention maps, predictions, figures.

Attention rollout follows Abnar & Zuidema, "Quantifying Attention Flow in Transformers" (ACL
2020), as the original PyTorch port's notebook applied it to ViT: average the heads of every
layer, add the identity for the residual connection, re-normalise the rows, multiply the layers
together, and read the class token's row over the patch tokens. `gap` models have no class
token; for them every map is the mean over all token rows (the attention each patch receives
on average), and :func:`map_description` says so.

Used by `visualize.py`, `visualize_attention_map.ipynb` and `tools/make_figures.py`. The plotting
functions build `matplotlib.figure.Figure` objects directly (no pyplot), so they work under any
backend and never open a window.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

from models.modeling import VisionTransformer
from utils.data.loaders import DigitsDataset, build_transforms
from utils.data.preprocessing import BadImageError, read_image
from utils.infra.errors import UserError

__all__ = [
    "DEMO_CHECKPOINT",
    "AttentionMaps",
    "attention_rollout",
    "compute_attention_maps",
    "demo_checkpoint",
    "layer_attention",
    "map_description",
    "open_image",
    "overlay_map",
    "plot_attention",
    "plot_patches",
    "preprocess",
    "rollout_matrices",
    "sample_digit",
    "sample_image",
    "token_scores",
    "upsample_map",
]

logger = logging.getLogger(__name__)

# Where `make demo` leaves its model (train.py writes <output_dir>/<name>_checkpoint.bin).
DEMO_CHECKPOINT = "output/digits-demo_checkpoint.bin"
MIN_DISPLAY_SIZE = 128  # smaller images are enlarged in figures
# Perceptually uniform, so equal steps of attention look like equal steps of colour (jet does not).
ATTENTION_CMAP = "inferno"
MAP_LABEL = "attention (1 = the map's largest)"


def demo_checkpoint() -> str:
    """`DEMO_CHECKPOINT`, what a script without `--checkpoint` shows, once `make demo` made it."""
    if not os.path.isfile(DEMO_CHECKPOINT):
        raise UserError(
            f"The demo checkpoint {DEMO_CHECKPOINT} does not exist yet: run `make demo` first, "
            "or pass --checkpoint with an official .npz (see checkpoint/README.md) or a .bin "
            "that train.py saved."
        )
    return DEMO_CHECKPOINT


# --------------------------------------------------------------------------------------------
# Attention maps (pure tensor functions)


def rollout_matrices(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Joint attention through each layer, by attention rollout.

    Every layer's heads are averaged, the identity is added for the residual path and the
    rows are re-normalised to sum to 1; the result of layer `l` is the product
    `A_l @ A_{l-1} @ ... @ A_0`.

    Args:
        attentions: one (B, heads, N, N) probability tensor per layer, as `model(x)` returns
            with `vis=True`.

    Returns:
        (B, L, N, N): entry `[:, l]` is the rollout through layers 0..l (the last is the
        rollout of the whole model).
    """
    if not attentions:
        raise ValueError("no attention maps: run the model with vis=True")
    joint = None
    out = []
    for probs in attentions:
        mixed = probs.float().mean(dim=1)  # (B, N, N)
        mixed = mixed + torch.eye(mixed.shape[-1], dtype=mixed.dtype, device=mixed.device)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        joint = mixed if joint is None else mixed @ joint  # (B, N, N)
        out.append(joint)
    return torch.stack(out, dim=1)  # (B, L, N, N)


def token_scores(
    matrix: torch.Tensor, grid_size: tuple[int, int], num_prefix_tokens: int
) -> torch.Tensor:
    """Read a patch-grid map out of (..., N, N) token-to-token matrices.

    Args:
        matrix: (..., N, N), rows attend to columns.
        grid_size: (rows, cols) of patch tokens.
        num_prefix_tokens: 1 (class token first) or 0 (`gap` models).

    Returns:
        (..., rows, cols): the class token's row over the patch columns, or, without a class
        token, the mean over all rows (the attention each patch receives on average).
    """
    rows, cols = grid_size
    if matrix.shape[-1] != num_prefix_tokens + rows * cols:
        raise ValueError(
            f"{matrix.shape[-1]} tokens do not fit a {rows}x{cols} grid with "
            f"{num_prefix_tokens} prefix token(s)"
        )
    # Class token row over the patch columns, or the mean of all rows: (..., rows * cols).
    scores = matrix[..., 0, num_prefix_tokens:] if num_prefix_tokens else matrix.mean(dim=-2)
    return scores.reshape(*scores.shape[:-1], rows, cols)


def attention_rollout(
    attentions: Sequence[torch.Tensor],
    grid_size: tuple[int, int],
    num_prefix_tokens: int,
    per_layer: bool = False,
) -> torch.Tensor:
    """Attention rollout as a patch-grid map.

    Args:
        attentions: one (B, heads, N, N) tensor per layer.
        grid_size: (rows, cols) of patch tokens (`model.grid_size`).
        num_prefix_tokens: `model.embeddings.num_prefix_tokens`.
        per_layer: also return the rollout through every intermediate layer.

    Returns:
        (B, rows, cols), or (B, L, rows, cols) with `per_layer`.
    """
    joint = rollout_matrices(attentions)  # (B, L, N, N)
    maps = token_scores(joint, grid_size, num_prefix_tokens)  # (B, L, rows, cols)
    return maps if per_layer else maps[:, -1]


def layer_attention(
    attentions: Sequence[torch.Tensor],
    grid_size: tuple[int, int],
    num_prefix_tokens: int,
    layer: int | None = None,
    head: int | None = None,
) -> torch.Tensor:
    """The raw attention of one layer (or every layer) and one head (or the mean of heads).

    Args:
        attentions: one (B, heads, N, N) tensor per layer.
        grid_size: (rows, cols) of patch tokens.
        num_prefix_tokens: 1 or 0, see :func:`token_scores`.
        layer: layer index (negative counts from the end), or None for every layer.
        head: head index, or None for the mean over heads.

    Returns:
        (B, rows, cols) for one layer, (B, L, rows, cols) for all.
    """
    stacked = torch.stack([a.float() for a in attentions], dim=1)  # (B, L, heads, N, N)
    if layer is not None:
        if not -len(attentions) <= layer < len(attentions):
            raise IndexError(f"layer {layer} out of range for {len(attentions)} layers")
        stacked = stacked[:, layer]  # (B, heads, N, N)
    heads_dim = stacked.dim() - 3
    if head is None:
        stacked = stacked.mean(dim=heads_dim)
    else:
        if not -stacked.shape[heads_dim] <= head < stacked.shape[heads_dim]:
            raise IndexError(f"head {head} out of range for {stacked.shape[heads_dim]} heads")
        stacked = stacked.select(heads_dim, head)
    return token_scores(stacked, grid_size, num_prefix_tokens)


def upsample_map(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly upsample grid maps to an image size and scale each to a maximum of 1.

    Args:
        maps: (..., rows, cols), non-negative.
        size: (height, width) of the image.

    Returns:
        float32 array (..., height, width) in [0, 1].
    """
    lead = maps.shape[:-2]
    flat = maps.float().reshape(-1, 1, *maps.shape[-2:])  # (M, 1, rows, cols)
    up = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    peak = up.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return (up / peak).clamp(0, 1).reshape(*lead, *size).cpu().numpy()


def map_description(num_prefix_tokens: int) -> str:
    """What the maps show, for titles and captions."""
    if num_prefix_tokens:
        return "class token's attention to each patch"
    return "no class token (gap model): mean attention each patch receives over all tokens"


# --------------------------------------------------------------------------------------------
# Running a model


@dataclass
class AttentionMaps:
    """Everything one forward pass tells about a batch of images.

    Attributes:
        logits: (B, classes).
        rollout: (B, rows, cols) attention rollout of the whole model.
        layers: (B, L, rows, cols) per-layer maps (head-mean raw attention, or the rollout
            through each layer, see `layer_kind`).
        layer_kind: "raw" or "rollout".
        description: what the maps show (class token row, or the gap mean).
        attentions: the model's raw maps, one (B, heads, N, N) tensor per layer (for
            :func:`layer_attention` with a chosen layer and head).
    """

    logits: torch.Tensor
    rollout: torch.Tensor
    layers: torch.Tensor
    layer_kind: str
    description: str
    attentions: list[torch.Tensor]


@torch.no_grad()
def compute_attention_maps(
    model: VisionTransformer, images: torch.Tensor, layer_kind: str = "raw"
) -> AttentionMaps:
    """Run `model` in eval mode on preprocessed images and collect its attention maps.

    Args:
        images: (B, 3, H, W) preprocessed as for evaluation (see :func:`preprocess`).
        layer_kind: per-layer maps as "raw" head-mean attention of each layer, or the
            "rollout" through each layer (as the original notebook showed).
    """
    if layer_kind not in ("raw", "rollout"):
        raise ValueError(f"layer_kind must be 'raw' or 'rollout', got {layer_kind!r}")
    was_training = model.training
    model.eval()
    pooled, attentions = model.forward_features(images, need_weights=True)
    logits = model.head(pooled)  # (B, classes)
    model.train(was_training)
    grid, prefix = model.grid_size, model.embeddings.num_prefix_tokens
    per_layer_rollout = attention_rollout(attentions, grid, prefix, per_layer=True)
    raw = layer_kind == "raw"
    layers = layer_attention(attentions, grid, prefix) if raw else per_layer_rollout
    return AttentionMaps(
        logits=logits.float(),
        rollout=per_layer_rollout[:, -1],
        layers=layers,
        layer_kind=layer_kind,
        description=map_description(prefix),
        attentions=list(attentions),
    )


# --------------------------------------------------------------------------------------------
# Images


def sample_image(name: str = "china.jpg") -> Image.Image:
    """A real photo bundled with scikit-learn ("china.jpg" or "flower.jpg"); works offline."""
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image(name))


def sample_digit(index: int = 0) -> tuple[Image.Image, int]:
    """A held-out handwritten digit (8x8, RGB) from scikit-learn and its label."""
    return DigitsDataset(train=False)[index]


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, as training reads it (`utils.data.preprocessing.read_image`).

    Raises:
        UserError: the file is not an image PIL can read.
    """
    try:
        return read_image(path)
    except BadImageError as err:
        raise UserError(f"Cannot read image {err}") from None


def preprocess(images: Sequence[Image.Image], img_size: tuple[int, int]) -> torch.Tensor:
    """The evaluation transform training uses: resize to `img_size`, pixels to [-1, 1].

    Returns:
        (B, 3, H, W) float32.
    """
    transform = build_transforms(img_size, train=False)
    return torch.stack([transform(image.convert("RGB")) for image in images])


# --------------------------------------------------------------------------------------------
# Figures


def plot_attention(
    image: Image.Image,
    maps: AttentionMaps,
    index: int = 0,
    predictions: Sequence[tuple[str, float]] | None = None,
    title: str | None = None,
) -> Figure:
    """One figure: the image, the rollout overlay, and a grid of per-layer maps.

    Args:
        image: the original image (maps are upsampled to its size).
        maps: from :func:`compute_attention_maps`.
        index: which image of the batch.
        predictions: (label, probability) pairs listed beside the image.
        title: figure title; the map description is added below it.
    """
    image = image.convert("RGB")
    if min(image.size) < MIN_DISPLAY_SIZE:  # e.g. 8x8 digits: enlarge, keeping the pixels sharp
        scale = math.ceil(MIN_DISPLAY_SIZE / min(image.size))
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    pixels = np.asarray(image)
    size = pixels.shape[:2]
    rollout = upsample_map(maps.rollout[index], size)  # (H, W)
    layers = upsample_map(maps.layers[index], size)  # (L, H, W)
    num_layers = layers.shape[0]
    cols = max(min(6, num_layers), 3)  # at most 6; at least as many as the top row
    layer_rows = math.ceil(num_layers / cols)
    width = max(cols * 1.8, 7.5)  # inches
    aspect = size[0] / size[1]
    top = width / 3 * aspect
    bottom = layer_rows * width / cols * aspect
    fig = Figure(figsize=(width, top + bottom + 1.0), layout="constrained")
    grid = fig.add_gridspec(2, 1, height_ratios=[top, bottom])
    head = grid[0].subgridspec(1, 3)
    ax = fig.add_subplot(head[0])
    ax.imshow(pixels)
    ax.set_title("image", fontsize=9)
    ax = fig.add_subplot(head[1])
    heat = overlay_map(ax, pixels, rollout)
    ax.set_title("attention rollout", fontsize=9)
    fig.colorbar(heat, ax=ax, shrink=0.9).set_label(MAP_LABEL, fontsize=7)
    ax = fig.add_subplot(head[2])
    ax.axis("off")
    if predictions:
        listed = "".join(f"\n{p:6.1%}  {label}" for label, p in predictions)
        ax.text(0, 0.95, "top predictions" + listed,
                va="top", ha="left", family="monospace", fontsize=8)  # fmt: skip
    for axis in fig.axes[:2]:
        axis.set_xticks([])
        axis.set_yticks([])
    body = grid[1].subgridspec(layer_rows, cols)
    label = "layer" if maps.layer_kind == "raw" else "rollout to layer"
    cells = []
    for i in range(layer_rows * cols):
        ax = fig.add_subplot(body[i // cols, i % cols])
        ax.axis("off")
        cells.append(ax)
        if i < num_layers:
            heat = overlay_map(ax, pixels, layers[i])
            ax.set_title(f"{label} {i + 1}", fontsize=8)
    fig.colorbar(heat, ax=cells, shrink=0.9).set_label(MAP_LABEL, fontsize=7)
    heading = f"{title}\n" if title else ""
    kind = "head-mean attention per layer" if maps.layer_kind == "raw" else "rollout per layer"
    fig.suptitle(f"{heading}{maps.description}; {kind}", fontsize=9)
    return fig


def overlay_map(ax, pixels: np.ndarray, heat: np.ndarray, alpha: float = 0.5):
    """Draw `pixels` with `heat` (in [0, 1], at the same size) laid over it; returns the heat's
    image, for a colour bar. Every map shares one colour scale: 0 to 1."""
    ax.imshow(pixels)
    return ax.imshow(heat, cmap=ATTENTION_CMAP, vmin=0.0, vmax=1.0, alpha=alpha)


def plot_patches(
    image: Image.Image, img_size: tuple[int, int], patch_size: tuple[int, int], gap: int = 2
) -> Figure:
    """The image resized as the model sees it, and the same image cut into its patches.

    Args:
        img_size: (height, width) the model takes.
        patch_size: (height, width) of one patch in input pixels.
        gap: white pixels between patches in the right panel.
    """
    height, width = img_size
    ph, pw = patch_size
    rows, cols = height // ph, width // pw
    resized = np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR))
    cut = np.full((rows * (ph + gap) - gap, cols * (pw + gap) - gap, 3), 255, dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            patch = resized[r * ph : (r + 1) * ph, c * pw : (c + 1) * pw]
            cut[r * (ph + gap) : r * (ph + gap) + ph, c * (pw + gap) : c * (pw + gap) + pw] = patch
    fig = Figure(figsize=(8, 4.3), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.imshow(resized)
    left.set_title(f"input, {height}x{width} pixels", fontsize=10)
    right.imshow(cut)
    right.set_title(f"{rows}x{cols} = {rows * cols} patches of {ph}x{pw} pixels", fontsize=10)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("How ViT sees an image: each patch becomes one token", fontsize=11)
    return fig
