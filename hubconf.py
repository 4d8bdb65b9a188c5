"""torch.hub entries: the official ViT architectures, and any checkpoint this project reads.

    model = torch.hub.load("<owner>/ViT-pytorch", "vit_b16", weights="imagenet21k+imagenet2012")
    model = torch.hub.load("path/to/clone", "vit_b16", weights="ViT-B_16.npz", source="local")
    model = torch.hub.load("path/to/clone", "load", "output/run_checkpoint.bin", source="local")

One entry per official architecture of `models.configs`, named after it in lower case
(`ViT-B_16` -> `vit_b16`, `R50+ViT-B_16` -> `r50_vit_b16`, `ViT-B_16-gap-norep` ->
`vit_b16_gap_norep`). `weights` is a local file, a URL, or the name of an official folder
(`imagenet21k`, `imagenet21k+imagenet2012`, `augreg`, `sam`, `gsam`; True: the folder
`python -m utils.download` uses for the model); downloads go to `<torch.hub.get_dir()>/
checkpoints/vit`, verified, and are kept. `load(checkpoint)` is `utils.infra.loading.load_model`:
an official `.npz`, a train.py `.bin`, a `_last.pt`, a timm or transformers file or folder.
Every model comes back on the CPU, in eval mode.
"""

from __future__ import annotations

import os as _os
import re as _re
import urllib.parse as _urlparse
from pathlib import Path as _Path

import torch as _torch

# Imported names start with "_": torch.hub.list() lists every other callable here as an entry.
from models.configs import CONFIGS as _CONFIGS
from models.configs import get_config as _get_config
from models.modeling import VisionTransformer as _ViT
from models.npz import CheckpointError as _CheckpointError
from utils.infra import download as _dl
from utils.infra.errors import UserError as _UserError
from utils.infra.loading import load_model as _load_model
from utils.infra.loading import pretrained_weights as _pretrained_weights

dependencies = ["torch", "numpy"]

NOT_OFFICIAL = ("testing", "demo")


def load(
    checkpoint: str | _os.PathLike,
    model_type: str | None = None,
    img_size: int | tuple[int, int] | None = None,
) -> _ViT:
    """The model any checkpoint this project reads holds (official `.npz`, train.py `.bin`,
    `_last.pt`, timm or transformers file or folder), loaded strictly, in eval mode.

    Args:
        checkpoint: the file or folder.
        model_type: registry name (`ViT-B_16`); None: the file or its sidecar tells.
        img_size: input size; None: the size the checkpoint was made for.
    """
    return _load_model(checkpoint, model_type, img_size).model


def _hub_name(model_type: str) -> str:
    """The entry name of a registry name: `R50+ViT-B_16` -> `r50_vit_b16`."""
    name = _re.sub(r"_(\d+)", r"\1", model_type.lower())
    return _re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def _cache() -> _Path:
    return _Path(_torch.hub.get_dir()) / "checkpoints" / "vit"


def _from_url(url: str) -> _Path:
    """Download `url` once into the hub cache, as `<its folder>/<its file>`."""
    folder, _, name = _urlparse.urlsplit(url).path.rstrip("/").rpartition("/")
    dest = _cache() / (_Path(folder).name or "url") / name
    if not dest.is_file():
        _os.replace(_dl.download(url, dest), dest)
    return dest


def _build(
    model_type: str,
    path: str | _os.PathLike,
    num_classes: int | None,
    img_size: int | tuple[int, int] | None,
) -> _ViT:
    if num_classes is None:
        return _load_model(path, model_type, img_size).model
    # A start for fine-tuning, as train.py makes it: a new zero head, positions resized.
    arrays, _ = _pretrained_weights(path, model_type)
    config = _get_config(model_type)
    model = _ViT.from_pretrained(config, arrays, img_size or 224, num_classes, zero_head=True)
    return model.eval()


def _entry(model_type: str):
    def entry(
        weights: str | _os.PathLike | bool | None = None,
        *,
        num_classes: int | None = None,
        img_size: int | tuple[int, int] | None = None,
        base_url: str | None = None,
    ) -> _ViT:
        if weights is None or weights is False:
            model = _ViT(_get_config(model_type), img_size or 224, num_classes or 1000)
            return model.eval()
        if weights is True:
            weights = _dl.default_source(model_type)
        weights = _os.fspath(weights)
        if weights in _dl.SOURCES:  # downloaded and checked as `python -m utils.download` does
            cache = _os.fspath(_cache())
            weights = _dl.fetch_checkpoint(model_type, weights, cache, base_url)
        if _urlparse.urlsplit(_os.fspath(weights)).scheme not in ("http", "https"):
            return _build(model_type, weights, num_classes, img_size)
        path = _from_url(weights)
        try:
            return _build(model_type, path, num_classes, img_size)
        except (_CheckpointError, _UserError) as err:
            path.unlink()  # ours, in the cache: the next call downloads it again
            raise _UserError(
                f"{weights} is not a usable {model_type} checkpoint and was deleted: {err}"
            ) from None

    entry.__name__ = entry.__qualname__ = _hub_name(model_type)
    entry.__doc__ = f"""{model_type}, random or with official (or any compatible) weights.

    Args:
        weights: None (random initialisation); a local file; a URL (downloaded once into
            the hub cache); an official folder's name ({", ".join(_dl.SOURCES)}), or True for
            `{_dl.default_source(model_type)}`.
        num_classes: with weights, a new zero head of this many classes (the start of a
            fine-tune, as train.py makes it); without, the head size (default 1000).
        img_size: input size (default: the checkpoint's; 224 for a new model or head);
            position embeddings are resized to it.
        base_url: a mirror of the official bucket, for a folder name (default: the
            `VIT_BASE_URL` variable, else Google's bucket).
    """
    return entry


globals().update({_hub_name(name): _entry(name) for name in _CONFIGS if name not in NOT_OFFICIAL})
