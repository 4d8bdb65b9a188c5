"""The paper's analysis figures: embedding filters, position similarity, attention distance.

Dosovitskiy et al. (ICLR 2021), Section 4.5, Figure 7 (and Appendix D.7, Figures 10 and 11); no
code for them was released. Three pure computations on a model's weights and attention maps:

- `embedding_components`: principal components of the patch-embedding filters (Fig. 7 left), the
  D filters of 3 x P x P centred over the D filters.
- `position_similarity`: the cosine similarity between the position embedding of every patch and
  every other patch, the class token left out (Fig. 7 centre, Fig. 10).
- `mean_attention_distance`: per layer and head, the attention-weighted mean distance in input
  pixels from a query patch's centre to every key patch's centre, averaged over query patches,
  then over images (Fig. 7 right, Fig. 11; the paper uses 128 images). The class token's row
  and column are left out without renormalising the rest of the row: a head that attends to the
  class token has a shorter distance, not a rescaled one. Sums are kept per batch, so memory does
  not grow with the number of images.

`analyze_model` runs all three on one model; the `plot_*` functions draw them, one checkpoint or
two side by side (before and after fine-tuning). Used by `analyze.py`, `tools/make_figures.py`
and `visualize_attention_map.ipynb`. Figures are built as `matplotlib.figure.Figure` objects
(no pyplot), so they never open a window.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure, SubFigure
from PIL import Image

from models.modeling import VisionTransformer
from utils.data.loaders import build_test_set
from utils.data.registry import Columns
from utils.infra.errors import UserError

__all__ = [
    "BUNDLED_PHOTOS",
    "Analysis",
    "analyze_model",
    "attention_distances",
    "bundled_batches",
    "dataset_batches",
    "embedding_components",
    "image_batches",
    "mean_attention_distance",
    "patch_distances",
    "plot_attention_distance",
    "plot_embedding_filters",
    "plot_figure7",
    "plot_position_similarity",
    "position_similarity",
    "token_spacing",
]

logger = logging.getLogger(__name__)

NUM_COMPONENTS = 28  # the paper shows the top 28 for ViT-L/32
BUNDLED_PHOTOS = ("china.jpg", "flower.jpg")  # scikit-learn's sample photos, offline

# --------------------------------------------------------------------------------------------
# Pure computations


def embedding_components(
    weight: torch.Tensor | np.ndarray, k: int = NUM_COMPONENTS
) -> tuple[np.ndarray, np.ndarray]:
    """Principal components of the patch-embedding filters.

    Each of the D output channels is one filter of C x P x P values; PCA runs over the D filters
    after subtracting their mean. Every component's sign is fixed so that its largest-magnitude
    entry is positive (PCA leaves it arbitrary).

    Args:
        weight: (D, C, Ph, Pw), the `Conv2d` kernel (`embeddings.patch_embed.weight`).
        k: components to return; at most min(D, C * Ph * Pw).

    Returns:
        (components (k, C, Ph, Pw) of unit norm, explained-variance ratio (k,) of each).
    """
    filters = torch.as_tensor(weight).detach().double().cpu()
    d, *shape = filters.shape
    flat = filters.reshape(d, -1)  # (D, C * Ph * Pw)
    centred = flat - flat.mean(dim=0, keepdim=True)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    k = min(k, vh.shape[0])
    variance = singular**2
    ratio = variance[:k] / variance.sum().clamp_min(1e-300)
    components = vh[:k]  # (k, C * Ph * Pw)
    peak = components.abs().argmax(dim=1, keepdim=True)
    components = components * components.gather(1, peak).sign()
    return components.reshape(k, *shape).float().numpy(), ratio.float().numpy()


def position_similarity(
    pos_embed: torch.Tensor | np.ndarray, grid: tuple[int, int], num_prefix_tokens: int
) -> np.ndarray:
    """Cosine similarity between the position embeddings of every pair of patches.

    Args:
        pos_embed: (1, N, D) or (N, D), prefix (class) tokens first.
        grid: (rows, cols) of patches, N = num_prefix_tokens + rows * cols.
        num_prefix_tokens: 1 (class token) or 0 (`gap` models).

    Returns:
        (rows * cols, rows * cols), patches in row-major order: entry [i, j] compares patch i with
        patch j. Row i reshaped to (rows, cols) is the tile of patch i in Figure 7.
    """
    pos = torch.as_tensor(pos_embed).detach().double().cpu()
    pos = pos.reshape(-1, pos.shape[-1])  # (N, D)
    rows, cols = grid
    if pos.shape[0] != num_prefix_tokens + rows * cols:
        raise ValueError(
            f"{pos.shape[0]} position embeddings do not fit a {rows}x{cols} grid with "
            f"{num_prefix_tokens} prefix token(s)"
        )
    patches = pos[num_prefix_tokens:]
    unit = patches / patches.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.T).float().numpy()


def token_spacing(model: VisionTransformer) -> tuple[int, int]:
    """Input pixels between the centres of neighbouring patch tokens, (vertical, horizontal).

    The patch size for a plain ViT; for a hybrid, the patch size in ResNet features times the
    ResNet's stride.
    """
    config = model.config
    resnet_stride = config.stride // config.patch_size[0]
    return config.patch_size[0] * resnet_stride, config.patch_size[1] * resnet_stride


def patch_distances(grid: tuple[int, int], spacing: tuple[float, float]) -> torch.Tensor:
    """(rows * cols, rows * cols) Euclidean distances, in pixels, between patch centres."""
    rows, cols = grid
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    centres = torch.stack([r.flatten() * spacing[0], c.flatten() * spacing[1]], dim=1)
    return torch.cdist(centres.double(), centres.double())  # (G, G)


def attention_distances(
    attentions: Sequence[torch.Tensor], distances: torch.Tensor, num_prefix_tokens: int
) -> torch.Tensor:
    """Each image's mean attention distance per layer and head.

    Args:
        attentions: one (B, heads, N, N) probability tensor per layer (rows are queries).
        distances: (G, G) pixel distances between patches (:func:`patch_distances`).
        num_prefix_tokens: the class token's row and column are left out, the rest of the row
            is not renormalised.

    Returns:
        (B, layers, heads) float64: for each query patch the attention-weighted mean distance to
        the key patches, averaged over the query patches.
    """
    p = num_prefix_tokens
    distances = distances.to(dtype=torch.float64, device=attentions[0].device)
    per_layer = []
    for probs in attentions:
        patches = probs[:, :, p:, p:].double()  # (B, heads, G, G)
        if patches.shape[-1] != distances.shape[0]:
            raise ValueError(
                f"attention over {patches.shape[-1]} patches, distances for {distances.shape[0]}"
            )
        per_layer.append(torch.einsum("bhqk,qk->bh", patches, distances) / distances.shape[0])
    return torch.stack(per_layer, dim=1).cpu()  # (B, L, heads)


@torch.no_grad()
def mean_attention_distance(
    model: VisionTransformer, batches: Iterable[torch.Tensor]
) -> tuple[np.ndarray, int]:
    """Mean attention distance of `model` over images, accumulated batch by batch.

    Args:
        model: any registered ViT or hybrid (run in eval mode).
        batches: (B, 3, H, W) preprocessed images at the model's input size.

    Returns:
        ((layers, heads) distances in pixels, averaged over every image; the number of images).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    distances = patch_distances(model.grid_size, token_spacing(model))
    prefix = model.embeddings.num_prefix_tokens
    total, count = None, 0
    try:
        for batch in batches:
            _, attentions = model.forward_features(batch.to(device), need_weights=True)
            per_image = attention_distances(attentions, distances, prefix)  # (B, L, heads)
            del attentions
            total = per_image.sum(dim=0) if total is None else total + per_image.sum(dim=0)
            count += per_image.shape[0]
    finally:
        model.train(was_training)
    if not count:
        raise UserError("No images to compute the mean attention distance over.")
    return (total / count).numpy(), count


# --------------------------------------------------------------------------------------------
# One model's numbers


@dataclass
class Analysis:
    """The numbers behind Figure 7 for one model (what `analysis.json` holds).

    Attributes:
        label: what figures call it (e.g. the checkpoint's file name).
        model_type: registry name.
        img_size: (height, width) of the input.
        patch_size: input pixels between neighbouring patch centres (the patch size, or a
            hybrid's stride), (vertical, horizontal).
        grid: (rows, cols) of patch tokens.
        num_prefix_tokens: 1 with a class token, 0 for `gap` models.
        num_images: images the distance was averaged over (0 when not computed).
        mean_attention_distance: (layers, heads) pixels, or None.
        position_similarity: (G, G), or None.
        embedding_components: (k, 3, P, P), or None (hybrids embed ResNet features, not RGB).
        explained_variance_ratio: (k,), or None.
    """

    label: str
    model_type: str
    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    grid: tuple[int, int]
    num_prefix_tokens: int
    num_images: int = 0
    mean_attention_distance: np.ndarray | None = None
    position_similarity: np.ndarray | None = None
    embedding_components: np.ndarray | None = None
    explained_variance_ratio: np.ndarray | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain lists and numbers; None for a panel that was not computed."""

        def listed(a: np.ndarray | None) -> list | None:
            return None if a is None else np.asarray(a, dtype=np.float64).tolist()

        return {
            "label": self.label,
            "model_type": self.model_type,
            "img_size": list(self.img_size),
            "patch_size": list(self.patch_size),
            "grid": list(self.grid),
            "num_prefix_tokens": self.num_prefix_tokens,
            "class_token": (
                "left out of the distance (its row and column), rows not renormalised"
                if self.num_prefix_tokens
                else "none (gap model)"
            ),
            "num_images": self.num_images,
            "mean_attention_distance": listed(self.mean_attention_distance),
            "position_similarity": listed(self.position_similarity),
            "embedding_components": listed(self.embedding_components),
            "explained_variance_ratio": listed(self.explained_variance_ratio),
        }


def embeds_rgb(model: VisionTransformer) -> bool:
    """Whether the patch embedding sees image pixels (plain ViT), not ResNet features (hybrid)."""
    return model.embeddings.backbone is None


def analyze_model(
    model: VisionTransformer,
    label: str,
    batches: Iterable[torch.Tensor] | None,
    num_components: int = NUM_COMPONENTS,
    panels: Sequence[str] = ("filters", "position", "distance"),
) -> Analysis:
    """Compute the requested panels of Figure 7 for one model.

    Args:
        label: the model's name in figures.
        batches: preprocessed images for the attention distance (needed for "distance").
        num_components: principal components of the embedding filters.
        panels: any of "filters", "position", "distance". "filters" is skipped (with a log
            line) for hybrids, whose patch embedding sees ResNet features.
    """
    emb = model.embeddings
    result = Analysis(
        label=label,
        model_type=model.config.name,
        img_size=tuple(model.img_size),
        patch_size=token_spacing(model),
        grid=tuple(model.grid_size),
        num_prefix_tokens=emb.num_prefix_tokens,
    )
    if "filters" in panels:
        if embeds_rgb(model):
            comps, ratio = embedding_components(emb.patch_embed.weight, num_components)
            result.embedding_components, result.explained_variance_ratio = comps, ratio
        else:
            logger.info(
                "%s: a hybrid embeds ResNet features, not RGB patches: no embedding filters.",
                label,
            )
    if "position" in panels:
        result.position_similarity = position_similarity(
            emb.pos_embed, model.grid_size, emb.num_prefix_tokens
        )
    if "distance" in panels:
        if batches is None:
            raise ValueError("the attention distance needs images (batches)")
        result.mean_attention_distance, result.num_images = mean_attention_distance(model, batches)
    return result


# --------------------------------------------------------------------------------------------
# Images for the attention distance


def image_batches(
    images: Iterable[Image.Image], img_size: tuple[int, int], batch_size: int
) -> Iterator[torch.Tensor]:
    """Preprocessed (B, 3, H, W) batches of images, taken from `images` one batch at a time (so
    that files are read as they are needed: see `utils.data.preprocessing.readable_images`)."""
    from utils.evals import attention_maps as am

    images = iter(images)
    while chunk := list(itertools.islice(images, batch_size)):
        yield am.preprocess(chunk, img_size)


def dataset_batches(
    dataset: str,
    data_dir: str,
    img_size: tuple[int, int],
    num_images: int,
    batch_size: int,
    columns: Columns | None = None,
) -> Iterator[torch.Tensor]:
    """The first `num_images` readable images of a dataset's test split, preprocessed, in
    batches (`columns`: a table's, see `build_test_set`). An unreadable image is skipped and
    named in a warning, as training skips one."""
    test_set, _ = build_test_set(dataset, data_dir, img_size, columns=columns)
    if len(test_set) < num_images:
        logger.info(
            "the %s test split has %d images, fewer than %d", dataset, len(test_set), num_images
        )
    items = (test_set[i] for i in range(len(test_set)))
    readable = itertools.islice((item[0] for item in items if item is not None), num_images)
    while chunk := list(itertools.islice(readable, batch_size)):
        yield torch.stack(chunk)


def bundled_batches(
    dataset: str | None, num_images: int, batch_size: int
) -> tuple[Callable[[tuple[int, int]], Iterator[torch.Tensor]], str]:
    """Images that need no download: held-out digits for a digits model, else sample photos.

    Returns:
        (a function img_size -> batches, a description for the log).
    """
    if dataset == "digits":
        described = f"{num_images} held-out digits (scikit-learn)"
        return lambda size: dataset_batches("digits", "", size, num_images, batch_size), described
    from utils.evals import attention_maps as am

    photos = [am.sample_image(name) for name in BUNDLED_PHOTOS][:num_images]
    described = f"{len(photos)} scikit-learn sample photos (the paper averages 128 images)"
    return lambda size: image_batches(photos, size, batch_size), described


# --------------------------------------------------------------------------------------------
# Figures

Canvas = Figure | SubFigure


def _mosaic(tiles: np.ndarray, cols: int, gap: int = 1, fill: float = np.nan) -> np.ndarray:
    """(n, h, w[, 3]) tiles -> one image of `cols` tiles per row, `gap` pixels of `fill` between."""
    n, h, w = tiles.shape[:3]
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, *tiles.shape[3:]), fill)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile
    return out


def _canvas(fig: Canvas | None, width: float, height: float) -> Canvas:
    return fig if fig is not None else Figure(figsize=(width, height), layout="constrained")


def plot_embedding_filters(
    results: Sequence[Analysis], fig: Canvas | None = None, cols: int = 7
) -> Canvas:
    """Fig. 7 left: the top principal components as RGB tiles, each scaled to [0, 1] for display.

    One panel per result (side by side); results without filters (hybrids) are left out.
    """
    shown = [r for r in results if r.embedding_components is not None]
    if not shown:
        raise ValueError("no embedding filters to draw (hybrids embed ResNet features)")
    fig = _canvas(fig, 3.6 * len(shown), 3.4)
    for ax, result in zip(np.atleast_1d(fig.subplots(1, len(shown))), shown, strict=True):
        comps = result.embedding_components.transpose(0, 2, 3, 1)  # (k, P, P, 3)
        low = comps.min(axis=(1, 2, 3), keepdims=True)
        high = comps.max(axis=(1, 2, 3), keepdims=True)
        tiles = (comps - low) / np.maximum(high - low, 1e-12)
        ax.imshow(_mosaic(tiles, min(cols, len(tiles)), gap=1, fill=1.0), interpolation="nearest")
        ax.set_axis_off()
        explained = float(np.sum(result.explained_variance_ratio))
        ax.set_title(
            f"{result.label}\ntop {len(tiles)} components of the RGB embedding filters\n"
            f"({explained:.0%} of their variance)",
            fontsize=8,
        )
    return fig


def plot_position_similarity(results: Sequence[Analysis], fig: Canvas | None = None) -> Canvas:
    """Fig. 7 centre: tile (i, j) shows patch (i, j)'s cosine similarity to every patch."""
    shown = [r for r in results if r.position_similarity is not None]
    if not shown:
        raise ValueError("no position similarity to draw")
    fig = _canvas(fig, 3.8 * len(shown), 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(shown)))
    for ax, result in zip(axes, shown, strict=True):
        rows, cols = result.grid
        tiles = result.position_similarity.reshape(rows * cols, rows, cols)
        gap = max(1, round(max(rows, cols) / 8))
        image = ax.imshow(
            _mosaic(tiles, cols, gap=gap), cmap="viridis", vmin=-1, vmax=1, interpolation="nearest"
        )
        ax.set_xticks([(c + 0.5) * (cols + gap) - gap / 2 - 0.5 for c in range(cols)])
        ax.set_xticklabels([str(c + 1) for c in range(cols)], fontsize=6)
        ax.set_yticks([(r + 0.5) * (rows + gap) - gap / 2 - 0.5 for r in range(rows)])
        ax.set_yticklabels([str(r + 1) for r in range(rows)], fontsize=6)
        ax.set_xlabel("input patch column", fontsize=8)
        ax.set_ylabel("input patch row", fontsize=8)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(f"{result.label}\nposition embedding similarity", fontsize=8)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="cosine similarity")
    return fig


def plot_attention_distance(results: Sequence[Analysis], fig: Canvas | None = None) -> Canvas:
    """Fig. 7 right: one dot per (layer, head); several results in different colours."""
    shown = [r for r in results if r.mean_attention_distance is not None]
    if not shown:
        raise ValueError("no attention distance to draw")
    fig = _canvas(fig, 4.2, 3.6)
    ax = fig.subplots()
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    width = 0.25 if len(shown) > 1 else 0.0
    for i, result in enumerate(shown):
        dist = np.asarray(result.mean_attention_distance)  # (L, heads)
        layers, heads = dist.shape
        offset = (i - (len(shown) - 1) / 2) * width
        x = np.repeat(np.arange(1, layers + 1), heads) + offset
        ax.scatter(x, dist.reshape(-1), s=12, color=colours[i % len(colours)], alpha=0.8,
                   label=f"{result.label} ({result.num_images} images)")  # fmt: skip
    ax.set_xlabel("network depth (layer)", fontsize=8)
    ax.set_ylabel("mean attention distance (pixels)", fontsize=8)
    ax.set_xticks(range(1, max(len(r.mean_attention_distance) for r in shown) + 1))
    # From 0, with room above the highest dot (autoscaling leaves 5 % of the dots' own spread,
    # less than a dot's radius when the heads are close: the top dots were cut in half).
    highest = max(float(np.max(r.mean_attention_distance)) for r in shown)
    ax.set_ylim(0, 1.08 * highest if highest > 0 else 1.0)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("one dot per head", fontsize=8)
    return fig


def plot_figure7(results: Sequence[Analysis], title: str | None = None) -> Figure:
    """The three panels in one figure, as the paper's Figure 7 (panels with no data left out)."""
    n = len(results)
    panels, ratios = [], []  # each panel that has data, and its width
    for draw, data, width in (
        (plot_embedding_filters, "embedding_components", 3.4 * n),
        (plot_position_similarity, "position_similarity", 3.6 * n + 0.6),
        (plot_attention_distance, "mean_attention_distance", 4.2),
    ):
        if any(getattr(r, data) is not None for r in results):
            panels.append(draw)
            ratios.append(width)
    if not panels:
        raise ValueError("nothing to draw")
    fig = Figure(figsize=(sum(ratios), 3.8), layout="constrained")
    for sub, draw in zip(
        np.atleast_1d(fig.subfigures(1, len(panels), width_ratios=ratios)), panels, strict=True
    ):
        draw(results, sub)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
