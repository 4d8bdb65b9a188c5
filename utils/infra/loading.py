"""A ready model from any checkpoint file: the one entry point eval.py, visualize.py and the
notebook use.

`load_model` takes an official `.npz` (read by `models.npz`), a train.py `.bin` with its `.json`
sidecar, a `_last.pt` training state, a Hugging Face ViT folder (`config.json` and
`model.safetensors` or `pytorch_model.bin`: what `save_pretrained` writes, or a hub cache
snapshot) or a timm state dict (converted by `models.foreign`), builds the model it holds and
loads it strictly (at another image size than its own, with its position embeddings resized as
vit_jax resizes them); it returns the model with its model type, image size and class names. Every
misfit is named, key by key, with both shapes and the likely fix. `pretrained_weights` reads any
of these as official arrays, the starting point of a fine-tune.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.configs import (
    ViTConfig,
    checked_img_size,
    find_config,
    get_config,
    model_names,
    model_type_from_filename,
)
from models.foreign import TIMM_NAMES, check_hf_config, hf_config_model, to_ours
from models.modeling import VisionTransformer
from models.npz import (
    CheckpointError,
    checkpoint_num_classes,
    clean_state_dict,
    compare_keys,
    guess_model_type,
    load_npz,
    load_pretrained,
    misfit_message,
    resize_pos_embed,
    state_dict_to_npz,
)
from utils.infra.description import DESCRIPTION_SHA256, SAFETENSORS_SUFFIX, description_error
from utils.infra.dist_utils import unwrap
from utils.infra.errors import UserError
from utils.infra.file_io import (
    CONTENT_SHA256,
    load_safetensors,
    read_sidecar,
    safe_load,
    sidecar_path,
)
from utils.infra.memory import check_weights_memory
from utils.infra.train_state import STATE_FORMAT

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR100_CLASSES",
    "FOLDER_WEIGHTS",
    "LoadedModel",
    "assign_weights",
    "check_finite_weights",
    "class_names",
    "folder_weight_files",
    "guess_state_dict_model",
    "is_model_folder",
    "load_model",
    "native_img_size",
    "pretrained_weights",
    "read_folder",
    "read_state_dict",
    "read_weights",
    "trained_img_size",
    "which_model",
]

logger = logging.getLogger(__name__)


# Where a Hugging Face folder (transformers' or timm's `save_pretrained`) keeps its weights, in
# order of preference; a sharded one lists its files in the index.
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEX = "model.safetensors.index.json"
LAYOUTS = {"hf": "Hugging Face transformers", "timm": "timm"}
POS_EMBED = "embeddings.pos_embed"

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

# CIFAR-100 fine labels in index order (alphabetical, as the dataset's meta file lists them).
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar",
    "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile",
    "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster",
    "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman",
    "worm",
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# State dicts of ours


def guess_state_dict_model(state: Mapping[str, torch.Tensor]) -> str | None:
    """Registry name whose architecture matches a state dict of ours, or None."""
    try:
        hidden = int(state["encoder.norm.weight"].shape[0])
        patch = tuple(state["embeddings.patch_embed.weight"].shape[2:])
    except KeyError:
        return None
    layers = sum(1 for k in state if k.startswith("encoder.blocks.") and k.endswith("norm1.weight"))
    units = [
        re.match(r"embeddings\.backbone\.stages\.(\d+)\.units\.\d+\.conv1\.weight$", k)
        for k in state
    ]
    stages = [int(m.group(1)) for m in units if m]
    resnet = tuple(stages.count(b) for b in range(max(stages) + 1)) if stages else None
    if resnet is None and "embeddings.backbone.conv_root.weight" in state:
        resnet = ()  # a ResNet root without stages (R+ViT-Ti_16)
    classifier = "token" if "embeddings.cls_token" in state else "gap"
    return find_config(hidden, layers, patch, resnet, classifier=classifier)


def read_state_dict(path: str | os.PathLike, model_type: str | None = None) -> dict:
    """The model `state_dict` in a checkpoint: best `.bin`, last `.pt`, `.safetensors`, a timm or
    transformers state dict, or a Hugging Face folder; always under our key names.

    `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes are stripped.

    Args:
        path: a plain state dict, a training state (a dict with a "model" entry) or a folder.
        model_type: when given, a training state of another model is refused.

    Raises:
        CheckpointError: missing, corrupt or unsafe file; not a model checkpoint; another model.
    """
    if is_model_folder(path):
        return read_folder(path)[0]
    state, layout = to_ours(_read_tensors(path, model_type))
    if layout in LAYOUTS:
        logger.info(
            "%s is a %s state dict: converted to this project's names.", path, LAYOUTS[layout]
        )
    return state


def _read_tensors(path: str | os.PathLike, model_type: str | None = None) -> dict:
    """The tensors of one file, as they are named there."""
    if os.fspath(path).endswith(SAFETENSORS_SUFFIX):
        _warn_unverified(path)
        return clean_state_dict(load_safetensors(path))
    obj = safe_load(path)
    training_state = isinstance(obj, Mapping) and obj.get("format") == STATE_FORMAT
    if training_state:
        saved = obj.get("model_type")
        if model_type and saved and get_config(model_type).name != saved:
            raise CheckpointError(
                f"{path} holds a {saved} model, not {model_type}: pass --model_type {saved}."
            )
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"{path} is not a model checkpoint (expected a state_dict of tensors, found "
            f"{type(obj).__name__}). Pass the output/<name>_checkpoint.bin train.py wrote."
        )
    if not training_state:  # a state verifies itself
        _warn_unverified(path)
    return clean_state_dict(obj)


def _warn_unverified(path: str | os.PathLike) -> None:
    """Say what of a checkpoint no recorded hash verifies (`utils.infra.file_io` checks the
    hashes that are there): its weights, or the description that labels its predictions."""
    path = os.fspath(path)
    safetensors = path.endswith(SAFETENSORS_SUFFIX)
    where = f"{path}'s metadata" if safetensors else f"its sidecar {sidecar_path(path).name}"
    if not safetensors and not sidecar_path(path).is_file():
        unverified = (
            f"has no sidecar ({sidecar_path(path).name}), so its SHA-256, model type and class "
            "names could not be checked: damage to the file would go unnoticed"
        )
    elif not read_sidecar(path).get(CONTENT_SHA256 if safetensors else "sha256"):
        unverified = (
            f"is not verified: {where} records no SHA-256 of its weights, so damage to them "
            "would go unnoticed"
        )
    elif DESCRIPTION_SHA256 not in read_sidecar(path):
        unverified = (
            f"has a description that is not verified: {where} records no {DESCRIPTION_SHA256} "
            "(it was written before descriptions were hashed), so an edit to its class names, "
            "model type or image size would go unnoticed"
        )
    else:
        return
    logger.warning("%s %s.", path, unverified)


# --------------------------------------------------------------------------------------------
# Hugging Face folders (transformers' and timm's)


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder with a `config.json` (a Hugging Face model folder)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def folder_weight_files(path: str | os.PathLike) -> list[str]:
    """The weight files of a Hugging Face folder (several when it is sharded).

    Raises:
        CheckpointError: none there, or an unreadable shard index.
    """
    path = os.fspath(path)
    index = os.path.join(path, SHARD_INDEX)
    if os.path.isfile(index):
        try:
            weight_map = json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index} is not a readable shard index ({err}).") from None
        for name in names:  # a shard is a file of the folder, never one elsewhere
            if not isinstance(name, str) or name in ("", ".", "..") or re.search(r"[/\\]", name):
                raise CheckpointError(
                    f"{index}: the weight_map names the shard {name!r}, but a shard must be a "
                    "plain file name inside the folder. The index was damaged, edited or "
                    "written by another program: pass the folder save_pretrained wrote."
                )
        return [os.path.join(path, name) for name in names]
    for name in FOLDER_WEIGHTS:
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)]
    raise CheckpointError(
        f"{path} has a config.json but no {' or '.join(FOLDER_WEIGHTS)}: pass the whole folder "
        "save_pretrained wrote (or a hub snapshot whose weights were downloaded)."
    )


def read_folder(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A Hugging Face folder's weights (our key names) and what its `config.json` tells.

    transformers' `ViTForImageClassification`/`ViTModel` folders give the model type, image
    size and class names; timm's (`config.json` with an `architecture`) give the class names
    when they list them, and the model type is read from the shapes.

    Raises:
        CheckpointError: an unreadable config.json or weight file, or a model that is not an
            official-architecture ViT.
    """
    path = os.fspath(path)
    where = os.path.join(path, "config.json")
    try:
        config = json.loads(Path(where).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{where} is not a readable config.json ({err}).") from None
    config = check_hf_config(config, where)
    tensors: dict[str, torch.Tensor] = {}
    for file in folder_weight_files(path):
        tensors.update(_read_tensors(file))
    state, layout = to_ours(tensors)
    if "architecture" in config:  # timm's save_for_hf
        facts: dict[str, Any] = {}
        names = config.get("label_names")
        if isinstance(names, list) and names:
            facts["class_names"] = [str(n) for n in names]
        architecture = str(config["architecture"]).split(".")[0]
        known = {timm: ours for ours, timm in TIMM_NAMES.items()}.get(architecture)
        if known and guess_state_dict_model(state) == known:
            facts["model_type"] = known
        pretrained_cfg = config.get("pretrained_cfg") or {}
        size = pretrained_cfg.get("input_size")
        if isinstance(size, list) and len(size) == 3:
            facts["img_size"] = [int(size[1]), int(size[2])]
        mean = pretrained_cfg.get("mean")
        if mean is not None and [round(float(m), 4) for m in mean] != [0.5, 0.5, 0.5]:
            logger.warning(
                "%s was trained on pixels normalised with mean %s; this project feeds "
                "(x - 127.5) / 127.5 (mean and std 0.5), as the official models take.",
                path,
                mean,
            )
        how = f"timm {config['architecture']}"
    else:
        model_type, facts = hf_config_model(config, where)
        facts["model_type"] = model_type
        for note in facts.pop("notes"):
            logger.info("%s: %s, as the official model computes.", path, note)
        how = "Hugging Face transformers ViT"
    if layout == "unknown":
        raise CheckpointError(
            f"{path} holds no ViT weights this project knows ({len(tensors)} tensors, e.g. "
            f"{', '.join(sorted(tensors)[:3])})."
        )
    field = "pretrained_cfg.input_size" if "architecture" in config else "image_size"
    _check_folder_img_size(facts, state, where, field)
    logger.info("%s is a %s folder.", path, how)
    return state, facts


def _check_folder_img_size(
    facts: Mapping[str, Any], state: Mapping[str, torch.Tensor], where: str, field: str
) -> None:
    """Refuse a `config.json` image size the folder's position embeddings were not made for
    (transformers' ViT takes only that size too)."""
    pos = state.get("embeddings.pos_embed")
    name = facts.get("model_type") or guess_state_dict_model(state)
    if "img_size" not in facts or pos is None or pos.ndim != 3 or name is None:
        return  # nothing to compare; a strict load names what does not fit
    config = get_config(name)
    height, width = facts["img_size"]
    (ph, pw), cls = config.patch_size, int(config.classifier == "token")
    if (height // ph) * (width // pw) + cls == pos.shape[1]:
        return
    native = native_img_size(config, pos.shape[1])
    made_for = f", made for {native[0]}x{native[1]} images" if native else ""
    raise CheckpointError(
        f"{where}: the field {field!r} says {height}x{width}, but the position embeddings "
        f"hold {pos.shape[1]} tokens{made_for}. The file was damaged, edited or written by "
        "another program: pass the folder save_pretrained wrote."
    )


def read_weights(
    path: str | os.PathLike, model_type: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Any checkpoint but an `.npz` as a state dict of ours, and what is known about it (the
    sidecar, a `.safetensors` file's metadata, a Hugging Face folder's `config.json`)."""
    if is_model_folder(path):
        return read_folder(path)
    return read_state_dict(path, model_type), read_sidecar(path)


def _with_pre_logits(config: ViTConfig, state: Mapping[str, torch.Tensor]) -> ViTConfig:
    """`config` with the `pre_logits` layer a checkpoint holds (an in21k file's pooler)."""
    weight = state.get("pre_logits.weight")
    if weight is None or config.representation_size:
        return config
    return config.replace(representation_size=int(weight.shape[0]))


def _check_state_fits(model: nn.Module, state: Mapping[str, torch.Tensor], path: str) -> None:
    target = model.state_dict()
    missing, unused, mismatched = compare_keys(state, target)
    missing = sorted(missing)
    if not (missing or unused or mismatched):
        return
    config = getattr(model, "config", None)
    name = getattr(config, "name", type(model).__name__)
    wrong = {m.split(":")[0] for m in mismatched}
    ranks = [k for k in target if k in state and state[k].ndim != target[k].ndim]
    if ranks:
        otherwise = (
            f"{ranks[0]} has {state[ranks[0]].ndim} dimension(s) where this model's has "
            f"{target[ranks[0]].ndim}: the file is damaged or not a ViT checkpoint of this "
            "layout."
        )
    elif not (missing or unused) and wrong <= {"head.weight", "head.bias"}:
        classes = state["head.bias"].shape[0]
        otherwise = f"Its head has {classes} classes: use a dataset with {classes} classes."
    elif not (missing or unused) and wrong == {"embeddings.pos_embed"}:
        otherwise = "The image size differs: pass the --img_size the model was trained at."
    else:
        otherwise = "Check --model_type, --img_size and the class count against the checkpoint."
    guess = guess_state_dict_model(state)
    raise CheckpointError(misfit_message(path, name, guess, missing, unused, mismatched, otherwise))


def assign_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a state dict of ours strictly, explaining any misfit.

    Args:
        model: the model (DDP / torch.compile wrappers are looked through).
        state: from :func:`read_state_dict`.
        source: the file it came from, for the messages.

    Raises:
        CheckpointError: missing or unused keys, or shapes that differ (each named, both shapes).
    """
    bare = unwrap(model)
    _check_state_fits(bare, state, source)
    target = bare.state_dict()
    with torch.no_grad():
        bare.load_state_dict({k: v.to(target[k].dtype) for k, v in state.items()}, strict=True)


# --------------------------------------------------------------------------------------------
# A ready model


def class_names(
    num_classes: int, dataset: str | None = None, names: Sequence[str] | None = None
) -> list[str] | None:
    """Human-readable class names for a classifier head, or None when unknown.

    Args:
        num_classes: outputs of the head.
        dataset: the fine-tuning dataset when known ("cifar10", "cifar100", "digits",
            "imagenet2012", ...).
        names: explicit names (e.g. a train.py sidecar's `class_names`); used when their
            count matches.

    Returns:
        Names in class-index order: the given ones, CIFAR-10/100, digits "0".."9", or the
        ImageNet-1k categories torchvision ships (for any 1000-class head); None otherwise.
    """
    if names is not None and len(names) == num_classes:
        return [str(n) for n in names]
    key = (dataset or "").lower().replace("-", "").replace("_", "")
    if key == "cifar10" and num_classes == 10:
        return list(CIFAR10_CLASSES)
    if key == "cifar100" and num_classes == 100:
        return list(CIFAR100_CLASSES)
    if key in ("digits", "mnist") and num_classes == 10:
        return [str(d) for d in range(10)]
    if num_classes == 1000:
        from torchvision.models import ViT_B_16_Weights

        return list(ViT_B_16_Weights.IMAGENET1K_V1.meta["categories"])
    return None


@dataclasses.dataclass
class LoadedModel:
    """A model built from a checkpoint file, and what is known about it.

    Attributes:
        model: the `VisionTransformer`, on the CPU, in eval mode.
        model_type: registry name.
        img_size: (height, width) the model takes.
        source: the checkpoint path.
        dataset: the dataset it was fine-tuned on (sidecar), "imagenet2012" for a 1000-class
            official `.npz`, else None.
        class_names: the head's class names: train.py's sidecar, else the dataset's known
            names (CIFAR, digits, ImageNet-1k for 1000 classes), else None.
        precision: the precision it was trained in (sidecar), else None.
        tf32: whether its float32 matrix products ran in TF32 in training (sidecar), else None.
        info: training facts from the sidecar (step, accuracy).
    """

    model: VisionTransformer
    model_type: str
    img_size: tuple[int, int]
    source: str
    dataset: str | None = None
    class_names: list[str] | None = None
    precision: str | None = None
    tf32: bool | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def native_img_size(config: ViTConfig, pos_embed_tokens: int) -> tuple[int, int] | None:
    """The square input size a position embedding of `pos_embed_tokens` tokens was made for."""
    cells = pos_embed_tokens - (1 if config.classifier == "token" else 0)
    side = math.isqrt(max(cells, 0))
    if not side or side * side != cells:
        return None
    return side * config.stride, side * config.stride


def _grid_at(config: ViTConfig, img_size: int | Sequence[int]) -> tuple[int, int]:
    """The patch grid `config` has at `img_size` (hybrids round as their ResNet does)."""
    with torch.device("meta"):  # shapes only
        return VisionTransformer(config, img_size, num_classes=1).grid_size


def trained_img_size(
    config: ViTConfig, pos_embed_tokens: int, described: int | Sequence[int] | None = None
) -> tuple[int, int] | None:
    """The input size a position embedding of `pos_embed_tokens` tokens was made for: the
    `described` size (a sidecar's) when its patch grid has that many tokens, else the square one
    (:func:`native_img_size`)."""
    if described is not None:
        size = checked_img_size(config, described)
        rows, cols = _grid_at(config, size)
        if rows * cols + (1 if config.classifier == "token" else 0) == pos_embed_tokens:
            return size
    return native_img_size(config, pos_embed_tokens)


def _pos_embed_resized(
    weights: dict, model: VisionTransformer, made_for: tuple[int, int], path: str
) -> dict:
    """`weights` with their position embeddings resized from the grid of `made_for` to the
    model's, as vit_jax resizes them to fine-tune at a new size (`models.npz.resize_pos_embed`),
    said in one log line; as they are when the grids agree."""
    old_grid, new_grid = _grid_at(model.config, made_for), model.grid_size
    if old_grid == new_grid:
        return weights
    key = "Transformer/posembed_input/pos_embedding" if path.endswith(".npz") else POS_EMBED
    pos = weights[key]
    prefix = model.embeddings.num_prefix_tokens
    if isinstance(pos, torch.Tensor):
        array = resize_pos_embed(pos.float().numpy(), new_grid, prefix, old_grid)
        resized = torch.from_numpy(array).to(pos.dtype)
    else:
        resized = resize_pos_embed(pos, new_grid, prefix, old_grid)
    logger.info(
        "%s was trained at %dx%d and runs at %dx%d: its position embeddings are resized from a "
        "%dx%d to a %dx%d patch grid (bilinear, as vit_jax resizes them to fine-tune at a new "
        "size).",
        path, *made_for, *model.img_size, *old_grid, *new_grid,
    )  # fmt: skip
    return {**weights, key: resized}


def _named_model(path: str) -> str | None:
    """The model an official file name says, if any (no official file holds `testing`/`demo`)."""
    named = model_type_from_filename(path)
    return None if named in ("testing", "demo") else named


def which_model(
    path: str,
    given: str | None,
    described: str | None = None,
    shapes: Callable[[], str | None] = lambda: None,
) -> str:
    """Which model a checkpoint holds: the one answer for every script.

    `given` (`--model_type`) when there is one; else the model its description names (a
    sidecar, `.safetensors` metadata, a `config.json`); else its official or AugReg file name;
    else the registry model whose architecture its `shapes` match. How it was inferred is
    logged once.

    Raises:
        UserError: nothing tells.
    """
    if given:
        return given
    for how, model in (
        ("its description", lambda: described),
        ("its file name", lambda: _named_model(path)),
        ("its shapes", shapes),
    ):
        name = model()
        if name:
            logger.info("%s holds a %s model (inferred from %s).", path, name, how)
            return name
    raise UserError(
        f"Cannot tell which model {path} holds: pass --model_type (one of "
        f"{', '.join(model_names())})."
    )


def _read_checkpoint(path: str, model_type: str | None) -> tuple[dict, dict[str, Any], str]:
    """A checkpoint's weights as stored (official arrays for an `.npz`, else a state dict of
    ours), what its description says, and the model it holds (:func:`which_model`). A folder
    without a `config.json` is read as an `.npz`, whose message names the files inside."""
    if path.endswith(".npz") or (os.path.isdir(path) and not is_model_folder(path)):
        weights = load_npz(path, model_type)
        return weights, {}, which_model(path, model_type, shapes=partial(guess_model_type, weights))
    state, facts = read_weights(path, model_type)
    guess = partial(guess_state_dict_model, state)
    return state, facts, which_model(path, model_type, facts.get("model_type"), guess)


def _check_head_facts(sidecar: Mapping[str, Any], num_classes: int, path: str) -> None:
    """Refuse a description whose class count or names disagree with the weights' head."""
    source = path if path.endswith(SAFETENSORS_SUFFIX) else sidecar_path(path)
    wanted = f"{num_classes}, the classes of the checkpoint's head"
    if sidecar.get("num_classes") not in (None, num_classes):
        raise description_error(source, "num_classes", sidecar["num_classes"], wanted)
    names = sidecar.get("class_names")
    if names is not None and len(names) != num_classes:
        raise description_error(source, "class_names", names, f"a list of {wanted}")


def load_model(
    checkpoint: str | os.PathLike,
    model_type: str | None = None,
    img_size: int | tuple[int, int] | list[int] | None = None,
    keep_pre_logits: bool = False,
) -> LoadedModel:
    """Build the model a checkpoint holds and load it strictly, ready for inference.

    The one way to get a model from a file for inference (eval.py, visualize.py, the notebook).

    Args:
        checkpoint: an official `.npz`, a train.py `.bin` (its `.json` sidecar, when present,
            gives model type, image size, dataset, class names and precision), a `_last.pt`,
            a timm or transformers state dict, or a Hugging Face folder (its `config.json`
            gives model type, image size and class names).
        model_type: registry name; overrides the sidecar. None: :func:`which_model` tells.
        img_size: input size (int or (H, W)); overrides the sidecar. Defaults to the size the
            checkpoint's position embeddings were made for; at another size they are resized
            as vit_jax resizes them (bilinear on the patch grid), and a log line says so.
        keep_pre_logits: for features (few-shot evaluation): keep the Dense + tanh
            `pre_logits` layer of an `.npz` that has one (ImageNet-21k files), as big_vision
            does (by default an `.npz`'s is dropped, as the official fine-tuning drops it;
            other files keep theirs), and accept a file without a head (e.g. a transformers
            `ViTModel` folder): the model then gets a 1-class zero head.

    Raises:
        UserError: missing or unreadable file, unknown model, no classifier head, an image
            size that is unknown or not a multiple of the patch size, or weights that do not
            fit (each key named with both shapes).
    """
    path = os.fspath(checkpoint)
    weights, sidecar, model_type = _read_checkpoint(path, model_type)
    if path.endswith(".npz"):
        num_classes = checkpoint_num_classes(weights)
        pos = weights.get("Transformer/posembed_input/pos_embedding")
    else:
        num_classes = int(weights["head.bias"].shape[0]) if "head.bias" in weights else None
        pos = weights.get(POS_EMBED)
    config = get_config(model_type)
    if not path.endswith(".npz"):
        config = _with_pre_logits(config, weights)
    elif keep_pre_logits and "pre_logits/kernel" in weights and not config.representation_size:
        config = config.replace(representation_size=int(weights["pre_logits/kernel"].shape[-1]))
    headless = num_classes is None and keep_pre_logits
    if headless:
        num_classes = 1  # a zero head stands in: only the features are wanted
    if num_classes is None:
        raise UserError(
            f"{path} has no classifier head, so it cannot predict: fine-tune it with train.py "
            "first, or use an imagenet21k+imagenet2012 checkpoint."
        )
    _check_head_facts(sidecar, num_classes, path)
    made_for = None
    if pos is not None and pos.ndim == 3:  # other ranks: refused when loading
        made_for = trained_img_size(config, pos.shape[1], sidecar.get("img_size"))
    size = img_size or sidecar.get("img_size") or made_for
    if size is None:
        raise UserError(f"Cannot tell the image size {path} was made for: pass --img_size.")
    size = checked_img_size(config, size)
    with torch.device("meta"):  # shapes only: the memory plan asks before anything is allocated
        shapes = VisionTransformer(config, size, num_classes)
    check_weights_memory(shapes, torch.device("cpu"))
    model = VisionTransformer.empty(config, size, num_classes)  # every weight loaded
    if img_size is not None and made_for is not None:
        weights = _pos_embed_resized(weights, model, made_for, path)
    if path.endswith(".npz"):
        load_pretrained(model, weights, zero_head=headless)
    else:
        if headless:
            head = model.head
            weights = {**weights, "head.weight": head.weight.new_zeros(head.weight.shape)}
            weights["head.bias"] = head.bias.new_zeros(1)
        assign_weights(model, weights, path)
    dataset = sidecar.get("dataset") or ("imagenet2012" if num_classes == 1000 else None)
    return LoadedModel(
        model=model.eval(),
        model_type=config.name,
        img_size=model.img_size,
        source=path,
        dataset=dataset,
        class_names=class_names(num_classes, dataset, sidecar.get("class_names")),
        precision=sidecar.get("precision"),
        tf32=sidecar.get("tf32"),
        info={k: sidecar[k] for k in ("step", "accuracy") if k in sidecar},
    )


def check_finite_weights(loaded: LoadedModel) -> None:
    """Refuse a model whose weights are not all finite (a run that diverged, a damaged file),
    before its features or spectra fail inside the linear algebra.

    Raises:
        CheckpointError: naming the file and the first tensor that is not finite.
    """
    bad = [
        name
        for name, tensor in loaded.model.state_dict().items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if bad:
        raise CheckpointError(
            f"{loaded.source}: {len(bad)} weight tensor(s) hold NaN or infinite values (first: "
            f"{bad[0]}), so nothing it computes is a number: its training diverged or the file "
            "is damaged. Pass a checkpoint saved before the divergence (train.py's best one)."
        )


# --------------------------------------------------------------------------------------------
# Starting a fine-tune


def pretrained_weights(
    path: str | os.PathLike, model_type: str | None
) -> tuple[dict[str, Any], str]:
    """The weights to fine-tune from (`--pretrained_dir`), as official arrays, and their model.

    An official `.npz` is read as it is; a checkpoint of ours (a train.py `.bin`, a `_last.pt`,
    an exported `.safetensors`), a timm state dict or a Hugging Face folder is converted to the
    official layout (an in21k folder's pooler becomes `pre_logits`, dropped by a model without
    one, as the official fine-tuning does), so that
    `VisionTransformer.from_pretrained(..., zero_head=True)` starts from it exactly as from a
    download: the head at zero (any class count), position embeddings resized to the new image
    size.

    Args:
        path: the file.
        model_type: the model to fine-tune; None to take it from the file (:func:`which_model`).

    Returns:
        (the arrays, keyed as in an official `.npz`; the registry name of the model).

    Raises:
        CheckpointError: missing, damaged or unsafe file, a folder, or a model other than
            `model_type` (naming the one it holds).
        UserError: no `model_type`, and the checkpoint does not tell.
    """
    path = os.fspath(path)
    state, _, model_type = _read_checkpoint(path, model_type)
    if path.endswith(".npz"):
        return state, model_type  # official arrays already
    config = _with_pre_logits(get_config(model_type), state)
    with torch.device("meta"):  # shapes only
        reference = VisionTransformer(config, 2 * config.stride, num_classes=1).state_dict()
    # The head and the position embeddings may differ: they are replaced and resized.
    missing, unused, mismatched = compare_keys(
        state, reference, skip=lambda k: k.startswith("head.") or "pos_embed" in k
    )
    missing = sorted(missing)
    if missing or unused or mismatched:
        raise CheckpointError(
            misfit_message(
                path,
                config.name,
                guess_state_dict_model(state),
                missing,
                unused,
                mismatched,
                otherwise="Pass the --model_type it was trained as, or another --pretrained_dir.",
            )
        )
    return state_dict_to_npz(state, config), config.name
