"""Conversion between Google's official `.npz` checkpoints and this project's state dicts.

Pure functions, one place. The key layout is that of `vit_jax` (`checkpoint.py`, `models_vit.py`,
`models_resnet.py`): Flax parameter paths joined with `/`, kernels stored HWIO / (in, out) /
(in, heads, head_dim). Newer big_vision/AugReg files name the block parts `LayerNorm_0`,
`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`, and some wrap everything under
`params/` or `opt/target/`; all of these load. Every problem is a `CheckpointError` that names
the keys and shapes involved and says what to do.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from models.configs import ALIASES, CONFIGS, ViTConfig, find_config

if TYPE_CHECKING:  # for annotations only
    import torch

# torch and scipy are imported where they are used: the command lines import `CheckpointError`
# before parsing their flags, and `--help` should not wait seconds for torch.

logger = logging.getLogger(__name__)

__all__ = [
    "BASE_URL",
    "CheckpointError",
    "check_npz_sizes",
    "checkpoint_num_classes",
    "checkpoint_url",
    "compare_keys",
    "guess_model_type",
    "load_npz",
    "load_pretrained",
    "misfit_message",
    "normalize_keys",
    "npz_to_state_dict",
    "resize_pos_embed",
    "state_dict_to_npz",
]

BASE_URL = "https://storage.googleapis.com/vit_models"
PREFIXES = ("opt/target/", "params/")
SCANNED_BLOCK = "Transformer/encoderblock/"
SHOWN_KEYS = 8  # keys of each kind a misfit message names; the debug log has them all

# Block part names: (pre-attention LN, attention, pre-MLP LN, MLP).
VIT_JAX_BLOCK = ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
BIG_VISION_BLOCK = ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why.

    Command-line entry points print its message and exit with code 2 (`utils.infra.errors.run_cli`).
    """


def checkpoint_url(model_type: str, source: str = "imagenet21k", base_url: str = BASE_URL) -> str:
    """Download address of an official checkpoint, e.g. `.../imagenet21k/ViT-B_16.npz`."""
    name = ALIASES.get(model_type, model_type)
    return f"{base_url.rstrip('/')}/{source}/{name}.npz"


# --------------------------------------------------------------------------------------------
# Reading files

# Deflate expands at most about 1032-fold (RFC 1951: a 258-byte match costs 2 bits at best).
DEFLATE_RATIO = 1032


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:,.1f} GiB" if nbytes >= 2**30 else f"{nbytes} bytes"


def check_npz_sizes(path: str | os.PathLike) -> None:
    """Refuse an `.npz` whose arrays declare more data than the file holds, reading only headers.

    `np.load` allocates what an array's `.npy` header declares before reading it, so a file of a
    few hundred bytes can ask for terabytes. Each member's stored size must fit in the file, its
    uncompressed size must be one its compression can produce, and its header's shape times
    item size must fit in that.

    Raises:
        CheckpointError: a member that is not a NumPy array, or declares more than it holds.
        zipfile.BadZipFile, OSError, EOFError: not a readable zip.
    """
    path = os.fspath(path)
    file_size = os.path.getsize(path)
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            key = info.filename.removesuffix(".npy")
            if info.compress_type == zipfile.ZIP_STORED:
                possible = info.compress_size
            elif info.compress_type == zipfile.ZIP_DEFLATED:
                possible = info.compress_size * DEFLATE_RATIO
            else:
                possible = -1
            if info.header_offset + info.compress_size > file_size or info.file_size > possible:
                raise CheckpointError(
                    f"{path} is not a readable .npz checkpoint: its member {info.filename!r} "
                    f"declares {_size(info.file_size)}, more than the {_size(file_size)} file "
                    "can hold (damaged, or compressed other than np.savez does). Delete it and "
                    "download it again."
                )
            with archive.open(info) as member:
                if member.read(6) != np.lib.format.MAGIC_PREFIX:
                    raise CheckpointError(
                        f"{path} is not a ViT checkpoint: its member {info.filename!r} is not a "
                        "NumPy array. Pass an official .npz (or one export.py wrote)."
                    )
                member.seek(0)
                try:
                    version = np.lib.format.read_magic(member)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read(member)
                except ValueError as err:
                    raise CheckpointError(
                        f"{path} is not a readable .npz checkpoint: the header of its array "
                        f"{key!r} is damaged ({err}). Delete it and download it again."
                    ) from None
                held = info.file_size - member.tell()
            if dtype.hasobject:
                continue  # pickled objects: load_npz refuses them before reading any
            declared = math.prod(shape) * dtype.itemsize
            if declared > held:
                raise CheckpointError(
                    f"{path} is not a readable .npz checkpoint: its array {key!r} declares "
                    f"shape {tuple(shape)} of {dtype} ({_size(declared)}), but the file holds "
                    f"{_size(held)} for it. It is damaged or not a checkpoint: delete it and "
                    "download it again."
                )


def load_npz(path: str | os.PathLike, model_type: str | None = None) -> dict[str, np.ndarray]:
    """Read an `.npz` checkpoint fully into memory, safely (`allow_pickle=False`).

    Args:
        path: the file.
        model_type: used to name the download URL when the file is missing.

    Returns:
        Arrays keyed by vit_jax Flax path (see `normalize_keys`).

    Raises:
        CheckpointError: missing, truncated, not an `.npz`, or holding pickled objects.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        inside = sorted(name for name in os.listdir(path) if name.endswith(".npz"))
        hint = (
            f"It holds {', '.join(inside[:5])}{' ...' if len(inside) > 5 else ''}: pass one of "
            f"them, e.g. {os.path.join(path, inside[0])}."
            if inside
            else "It holds no .npz file: pass the path of the checkpoint file itself."
        )
        raise CheckpointError(f"{path} is a folder, not a checkpoint file. {hint}")
    if not os.path.isfile(path):
        if model_type and ALIASES.get(model_type, model_type) in CONFIGS:
            url = checkpoint_url(model_type)
            hint = f"Download it with: wget {url} -O {path}"
        else:
            hint = (
                f"Official checkpoints are listed under {BASE_URL}/ "
                "(e.g. imagenet21k/ViT-B_16.npz)."
            )
        raise CheckpointError(f"Checkpoint file {path} does not exist. {hint}")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip, or an empty zip
        what = (
            "an HTML page (a failed download?)" if magic.lstrip().startswith(b"<") else "not a zip"
        )
        raise CheckpointError(
            f"{path} is not a readable .npz checkpoint: the file is {what}. "
            "Delete it and download the checkpoint again."
        )
    try:
        check_npz_sizes(path)
        with np.load(path, allow_pickle=False) as archive:
            weights = {key: archive[key] for key in archive.files}
    except CheckpointError:
        raise
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise CheckpointError(
                f"{path} stores pickled Python objects, which could run code when loaded and are "
                "never loaded here. Official checkpoints hold plain arrays only: re-download the "
                "file or re-save it with numpy.savez and plain arrays."
            ) from None
        raise CheckpointError(f"{path} is not a readable .npz checkpoint ({err}).") from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as err:
        raise CheckpointError(
            f"{path} is not a readable .npz checkpoint: it is truncated or not an npz file "
            f"({type(err).__name__}: {err}). Delete it and download it again."
        ) from None
    if not weights:
        raise CheckpointError(f"{path} holds no arrays; download the checkpoint again.")
    for key, array in weights.items():
        if array.dtype.kind not in "biuf":  # e.g. text ("<U5"): no weight is ever stored so
            raise CheckpointError(
                f"{path} is not a ViT checkpoint: its array {key!r} holds {array.dtype} values, "
                "not numbers. Pass an official .npz (or one export.py wrote)."
            )
    return normalize_keys(weights)


def normalize_keys(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Bring the layouts of newer exports to the vit_jax one.

    Drops a `params/` or `opt/target/` wrapper (and anything outside it, e.g. optimizer
    state), moves big_vision's top-level `pos_embedding` to its vit_jax path, and splits
    scanned blocks (`Transformer/encoderblock/...` stacked over a leading layer axis) into
    `Transformer/encoderblock_{i}/...`.
    """
    for prefix in PREFIXES:
        if any(key.startswith(prefix) for key in weights):
            weights = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
            break
    normalized: dict[str, np.ndarray] = {}
    for key, value in weights.items():
        if key == "pos_embedding":
            normalized["Transformer/posembed_input/pos_embedding"] = value
        elif key.startswith(SCANNED_BLOCK):
            rest = key[len(SCANNED_BLOCK) :]
            for i, layer in enumerate(value):
                normalized[f"Transformer/encoderblock_{i}/{rest}"] = layer
        else:
            normalized[key] = value
    return normalized


# --------------------------------------------------------------------------------------------
# The key map: one table drives both directions.
#
# Each entry is (state-dict key, npz key(s), kind). Kinds:
#   conv   HWIO <-> OIHW          dense  (in, out) <-> (out, in)
#   qkv_w  3 x (D, heads, hd) <-> (3D, D)      qkv_b  3 x (heads, hd) <-> (3D,)
#   out_w  (heads, hd, D) <-> (D, D)           vec    (..., C) <-> (C,)
#   gn     (1, 1, 1, C) <-> (C,)               raw    unchanged


def _block_names(weights: Mapping[str, np.ndarray] | None) -> tuple[str, str, str, str]:
    if weights is not None and any("/MlpBlock_0/" in key for key in weights):
        return BIG_VISION_BLOCK
    return VIT_JAX_BLOCK


def _resnet_entries(config: ViTConfig) -> Iterator[tuple[str, str, str]]:
    root = "embeddings.backbone"
    yield f"{root}.conv_root.weight", "conv_root/kernel", "conv"
    yield f"{root}.gn_root.weight", "gn_root/scale", "gn"
    yield f"{root}.gn_root.bias", "gn_root/bias", "gn"
    in_channels = 64 * config.resnet.width_factor
    for b, units in enumerate(config.resnet.num_layers):
        features = 64 * config.resnet.width_factor * 2**b
        for u in range(units):
            ours, theirs = f"{root}.stages.{b}.units.{u}", f"block{b + 1}/unit{u + 1}"
            names = ["1", "2", "3"]
            if u == 0 and (b > 0 or in_channels != 4 * features):
                names.append("_proj")
            for n in names:
                yield f"{ours}.conv{n}.weight", f"{theirs}/conv{n}/kernel", "conv"
                yield f"{ours}.gn{n}.weight", f"{theirs}/gn{n}/scale", "gn"
                yield f"{ours}.gn{n}.bias", f"{theirs}/gn{n}/bias", "gn"
        in_channels = 4 * features


def _key_map(
    config: ViTConfig, block_names: tuple[str, str, str, str], include_head: bool = True
) -> list[tuple[str, str | tuple[str, ...], str]]:
    entries: list[tuple[str, str | tuple[str, ...], str]] = []
    if config.resnet is not None:
        entries.extend(_resnet_entries(config))
    entries += [
        ("embeddings.patch_embed.weight", "embedding/kernel", "conv"),
        ("embeddings.patch_embed.bias", "embedding/bias", "vec"),
        ("embeddings.pos_embed", "Transformer/posembed_input/pos_embedding", "raw"),
        ("encoder.norm.weight", "Transformer/encoder_norm/scale", "vec"),
        ("encoder.norm.bias", "Transformer/encoder_norm/bias", "vec"),
    ]
    if config.classifier == "token":
        entries.append(("embeddings.cls_token", "cls", "raw"))
    ln1, attn, ln2, mlp = block_names
    for i in range(config.num_layers):
        ours, theirs = f"encoder.blocks.{i}", f"Transformer/encoderblock_{i}"
        qkv = tuple(f"{theirs}/{attn}/{n}" for n in ("query", "key", "value"))
        entries += [
            (f"{ours}.norm1.weight", f"{theirs}/{ln1}/scale", "vec"),
            (f"{ours}.norm1.bias", f"{theirs}/{ln1}/bias", "vec"),
            (f"{ours}.attn.qkv.weight", tuple(f"{k}/kernel" for k in qkv), "qkv_w"),
            (f"{ours}.attn.qkv.bias", tuple(f"{k}/bias" for k in qkv), "qkv_b"),
            (f"{ours}.attn.proj.weight", f"{theirs}/{attn}/out/kernel", "out_w"),
            (f"{ours}.attn.proj.bias", f"{theirs}/{attn}/out/bias", "vec"),
            (f"{ours}.norm2.weight", f"{theirs}/{ln2}/scale", "vec"),
            (f"{ours}.norm2.bias", f"{theirs}/{ln2}/bias", "vec"),
            (f"{ours}.mlp.fc1.weight", f"{theirs}/{mlp}/Dense_0/kernel", "dense"),
            (f"{ours}.mlp.fc1.bias", f"{theirs}/{mlp}/Dense_0/bias", "vec"),
            (f"{ours}.mlp.fc2.weight", f"{theirs}/{mlp}/Dense_1/kernel", "dense"),
            (f"{ours}.mlp.fc2.bias", f"{theirs}/{mlp}/Dense_1/bias", "vec"),
        ]
    if config.representation_size:
        entries += [
            ("pre_logits.weight", "pre_logits/kernel", "dense"),
            ("pre_logits.bias", "pre_logits/bias", "vec"),
        ]
    if include_head:
        entries += [("head.weight", "head/kernel", "dense"), ("head.bias", "head/bias", "vec")]
    return entries


def _to_torch(arrays: list[np.ndarray], kind: str) -> np.ndarray:
    if kind == "conv":
        return arrays[0].transpose(3, 2, 0, 1)
    if kind == "dense":
        return arrays[0].T
    if kind == "qkv_w":
        return np.concatenate([a.reshape(a.shape[0], -1).T for a in arrays])
    if kind == "qkv_b":
        return np.concatenate([a.reshape(-1) for a in arrays])
    if kind == "out_w":
        return arrays[0].reshape(-1, arrays[0].shape[-1]).T
    if kind in ("vec", "gn"):
        return arrays[0].reshape(-1)
    return arrays[0]


def _to_npz(tensor: np.ndarray, kind: str, config: ViTConfig) -> list[np.ndarray]:
    heads, head_dim = config.num_heads, config.head_dim
    if kind == "conv":
        return [tensor.transpose(2, 3, 1, 0)]
    if kind == "dense":
        return [tensor.T]
    if kind == "qkv_w":
        return [w.T.reshape(-1, heads, head_dim) for w in np.split(tensor, 3)]
    if kind == "qkv_b":
        return [b.reshape(heads, head_dim) for b in np.split(tensor, 3)]
    if kind == "out_w":
        return [tensor.T.reshape(heads, head_dim, -1)]
    if kind == "gn":
        return [tensor.reshape(1, 1, 1, -1)]
    return [tensor]


def _as_tuple(keys: str | tuple[str, ...]) -> tuple[str, ...]:
    return keys if isinstance(keys, tuple) else (keys,)


# Dimensions of the official arrays of each kind; GroupNorm's are stored as (1, 1, 1, C).
_RANKS = {
    "conv": (4,), "dense": (2,), "qkv_w": (3,), "qkv_b": (2,), "out_w": (3,), "raw": (3,),
    "vec": (1,), "gn": (1, 4),
}  # fmt: skip


def _convert(weights: Mapping[str, np.ndarray], keys: tuple[str, ...], kind: str) -> torch.Tensor:
    """One state-dict tensor from its official array(s), or a `CheckpointError` naming the key."""
    import torch

    arrays = [weights[k] for k in keys]
    for key, array in zip(keys, arrays, strict=True):
        ranks = _RANKS.get(kind)
        if array.dtype.kind not in "biuf" or (ranks and array.ndim not in ranks):
            wanted = f"{' or '.join(map(str, ranks))} dimension(s)" if ranks else "numbers"
            raise CheckpointError(
                f"The checkpoint's {key!r} is a {array.dtype} array of shape {array.shape}; an "
                f"official checkpoint has {wanted} there. The file is damaged or not a ViT "
                "checkpoint: download it again, or pass the file it was exported from."
            )
    try:
        return torch.from_numpy(np.ascontiguousarray(_to_torch(arrays, kind)))
    except ValueError as err:  # e.g. query, key and value kernels of different shapes
        shapes = ", ".join(f"{k} {a.shape}" for k, a in zip(keys, arrays, strict=True))
        raise CheckpointError(
            f"The checkpoint's arrays do not fit together ({shapes}: {err}); the file is "
            "damaged or not a ViT checkpoint."
        ) from None


def npz_to_state_dict(
    weights: Mapping[str, np.ndarray], config: ViTConfig, include_head: bool = True
) -> dict[str, torch.Tensor]:
    """Convert an official checkpoint to a state dict for `VisionTransformer(config)`.

    Args:
        weights: the arrays of an `.npz` (any layout `normalize_keys` accepts).
        config: the model the checkpoint is for.
        include_head: convert `head/*` (False when fine-tuning with a fresh head).

    Returns:
        Tensors keyed by state-dict name. `pre_logits` is dropped when `config` has no
        representation layer, as the official fine-tuning code does.

    Raises:
        CheckpointError: listing every missing and every unused key.
    """
    weights = normalize_keys(weights)
    entries = _key_map(config, _block_names(weights), include_head)
    used = {k: None for _, keys, _ in entries for k in _as_tuple(keys)}
    ignorable = ("head/",) if not include_head else ()
    if not config.representation_size:
        ignorable += ("pre_logits/",)
    missing, unused, _ = compare_keys(weights, used, skip=lambda k: k.startswith(ignorable))
    if missing or unused:
        raise CheckpointError(
            misfit_message(
                "The checkpoint",
                config.name,
                guess_model_type(weights),
                missing,
                unused,
                otherwise="Check --model_type against the checkpoint file name.",
            )
        )
    return {name: _convert(weights, _as_tuple(keys), kind) for name, keys, kind in entries}


def state_dict_to_npz(
    state_dict: Mapping[str, torch.Tensor], config: ViTConfig
) -> dict[str, np.ndarray]:
    """The reverse of `npz_to_state_dict`: arrays in the official vit_jax layout.

    Accepts state dicts saved from `DistributedDataParallel` (`module.`) or `torch.compile`
    (`_orig_mod.`) wrappers. The round trip is bit-exact.
    """
    state_dict = clean_state_dict(state_dict)
    include_head = "head.weight" in state_dict
    arrays: dict[str, np.ndarray] = {}
    for name, keys, kind in _key_map(config, VIT_JAX_BLOCK, include_head):
        if name not in state_dict:
            raise CheckpointError(
                f"the state dict has no {name!r}; it is not a {config.name} model "
                f"(it has {len(state_dict)} tensors, e.g. {sorted(state_dict)[:3]})."
            )
        tensor = state_dict[name].detach().cpu().numpy()
        for key, array in zip(_as_tuple(keys), _to_npz(tensor, kind, config), strict=True):
            arrays[key] = np.ascontiguousarray(array)
    return arrays


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes from keys."""
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key] = value
    return cleaned


# --------------------------------------------------------------------------------------------
# Describing a checkpoint


def checkpoint_num_classes(weights: Mapping[str, np.ndarray]) -> int | None:
    """Classes of the checkpoint's head, or None when it has no head."""
    bias = normalize_keys(weights).get("head/bias")
    if bias is not None and bias.ndim != 1:
        raise CheckpointError(
            f"The checkpoint's 'head/bias' has shape {bias.shape}, not (classes,): the file is "
            "damaged or not a ViT checkpoint."
        )
    return None if bias is None else int(bias.shape[0])


def guess_model_type(weights: Mapping[str, np.ndarray]) -> str | None:
    """The registry name whose architecture matches the checkpoint, or None."""
    weights = normalize_keys(weights)
    try:
        kernel = weights["embedding/kernel"]
        hidden = int(weights["Transformer/encoder_norm/scale"].shape[-1])
    except (KeyError, IndexError):  # IndexError: a 0-d array where a vector should be
        return None
    if kernel.ndim != 4:
        return None
    layers = sum(1 for k in weights if k.endswith("/Dense_0/kernel") and "encoderblock_" in k)
    hybrid = "conv_root/kernel" in weights
    stages = tuple(
        sum(1 for k in weights if k.startswith(f"block{b}/unit") and k.endswith("/conv1/kernel"))
        for b in range(1, 5)
    )
    stages = tuple(n for n in stages if n)
    # `testing` is ours alone: an .npz is never taken for it.
    return find_config(
        hidden,
        layers,
        kernel.shape[:2],
        stages if hybrid else None,
        exclude=("testing",),
        classifier="token" if "cls" in weights else "gap",
    )


def compare_keys(
    have: Mapping[str, Any],
    want: Mapping[str, Any],
    skip: Callable[[str], bool] = lambda key: False,
    label: Callable[[str], str] = lambda key: key,
) -> tuple[list[str], list[str], list[str]]:
    """How a checkpoint's keys fit a model's: the one comparison behind every misfit message.

    Args:
        have: the checkpoint's arrays or tensors by key.
        want: the model's, by key; a value of None compares the key alone, not its shape.
        skip: keys left out of all three lists (a head to be replaced, say).
        label: how a mismatched key is named (e.g. with the `.npz` keys it comes from).

    Returns:
        (missing, unused, mismatched): keys `want` has and `have` lacks, in `want`'s order;
        keys only `have` has, sorted; and "label: checkpoint (shape) vs model (shape)" for
        every shared key whose shapes differ, in `want`'s order.
    """
    missing = [k for k in want if not skip(k) and k not in have]
    unused = sorted(k for k in have if not skip(k) and k not in want)
    mismatched = [
        f"{label(k)}: checkpoint {tuple(have[k].shape)} vs model {tuple(want[k].shape)}"
        for k in want
        if not skip(k)
        and k in have
        and want[k] is not None
        and tuple(have[k].shape) != tuple(want[k].shape)
    ]
    return missing, unused, mismatched


def misfit_message(
    what: str,
    model_name: str,
    guess: str | None,
    missing: Sequence[str] = (),
    unused: Sequence[str] = (),
    mismatched: Sequence[str] = (),
    otherwise: str = "Check --model_type against the checkpoint.",
    shown: int = SHOWN_KEYS,
) -> str:
    """One paragraph on why a checkpoint does not fit a model: counts, the first `shown` keys
    of each kind, and the likely model type (`guess`, from its shapes) or else `otherwise`.

    Every key is logged at DEBUG level (`logging.getLogger("models.npz")`).
    """

    def first(items: Sequence[str], sep: str = ", ") -> str:
        more = (
            f" (and {len(items) - shown} more; --verbose lists them)" if len(items) > shown else ""
        )
        return sep.join(items[:shown]) + more

    parts = [f"{what} does not fit model {model_name}."]
    if missing:
        parts.append(f"Missing {len(missing)} key(s): {first(missing)}.")
    if unused:
        parts.append(f"Unused {len(unused)} key(s): {first(unused)}.")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es): {first(mismatched, '; ')}.")
    if guess and guess != model_name:
        parts.append(f"It looks like a {guess} checkpoint: pass --model_type {guess}.")
    else:
        parts.append(otherwise)
    for kind, items in (("missing", missing), ("unused", unused), ("mismatched", mismatched)):
        if items:
            logger.debug("%s does not fit %s: %s keys: %s", what, model_name, kind, list(items))
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Position embeddings


def resize_pos_embed(
    pos_embed: np.ndarray,
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    old_grid: tuple[int, int] | None = None,
) -> np.ndarray:
    """Resample position embeddings to another patch grid, as the official code does.

    The prefix (class token) embeddings are kept; the grid part is reshaped to
    (rows, cols, D) and zoomed with `scipy.ndimage.zoom(order=1)` (bilinear).

    Args:
        pos_embed: (1, prefix + rows * cols, D).
        new_grid: target (rows, cols).
        num_prefix_tokens: 1 for `token` models, 0 for `gap`.
        old_grid: source (rows, cols); inferred as square when omitted.

    Returns:
        (1, prefix + new_rows * new_cols, D), same dtype.
    """
    import scipy.ndimage

    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[0, num_prefix_tokens:]
    if old_grid is None:
        side = round(np.sqrt(grid.shape[0]))
        if side * side != grid.shape[0]:
            raise CheckpointError(
                f"cannot resize position embeddings of {grid.shape[0]} grid tokens: not a square "
                "grid; pass old_grid=(rows, cols)."
            )
        old_grid = (side, side)
    grid = grid.reshape(old_grid[0], old_grid[1], -1)
    zoom = (new_grid[0] / old_grid[0], new_grid[1] / old_grid[1], 1)
    grid = scipy.ndimage.zoom(grid, zoom, order=1)
    grid = grid.reshape(1, new_grid[0] * new_grid[1], -1)
    return np.concatenate([prefix, grid], axis=1).astype(pos_embed.dtype)


# --------------------------------------------------------------------------------------------
# Loading into a model


def _check_head(weights: Mapping[str, np.ndarray], num_classes: int) -> None:
    """Refuse a head that is not a (hidden, classes) kernel and a (classes,) bias of
    `num_classes` classes, telling malformed arrays (a damaged file: no argument helps) from a
    head of another class count."""
    kernel, bias = weights["head/kernel"], weights.get("head/bias")
    if kernel.ndim != 2 or (
        bias is not None and (bias.ndim != 1 or bias.shape[0] != kernel.shape[-1])
    ):
        shapes = f"'head/kernel' {kernel.shape}" + (
            f", 'head/bias' {bias.shape}" if bias is not None else ""
        )
        raise CheckpointError(
            f"The checkpoint's head has the wrong shape ({shapes}); a ViT checkpoint of this "
            "layout has a (hidden, classes) kernel and a (classes,) bias. The file is damaged "
            "or not a ViT checkpoint of this layout."
        )
    if kernel.shape[-1] != num_classes:
        raise CheckpointError(
            f"The checkpoint's head has {kernel.shape[-1]} classes but the model has "
            f"{num_classes}. To fine-tune on {num_classes} classes, pass zero_head=True (the "
            "head then starts at zero and is not loaded)."
        )


def load_pretrained(
    model: torch.nn.Module, weights: Mapping[str, np.ndarray], zero_head: bool = False
) -> None:
    """Load an official checkpoint into `model` (strictly), as fine-tuning expects.

    `model` is a `models.modeling.VisionTransformer` (whose `load_from` calls this function).
    `zero_head=True` keeps the head at zero and ignores the checkpoint's head. Position
    embeddings are resized to the model's grid. Every shape mismatch is reported by key.
    """
    import torch

    weights = normalize_keys(weights)
    config = model.config
    if not zero_head and "head/kernel" in weights:
        _check_head(weights, model.num_classes)
    state = npz_to_state_dict(weights, config, include_head=not zero_head)
    target = model.state_dict()
    pos = state["embeddings.pos_embed"]
    want = target["embeddings.pos_embed"].shape
    if pos.shape != want and pos.shape[-1] == want[-1]:
        resized = resize_pos_embed(pos.numpy(), model.grid_size, model.embeddings.num_prefix_tokens)
        state["embeddings.pos_embed"] = torch.from_numpy(resized)
    if zero_head:
        state["head.weight"] = torch.zeros_like(target["head.weight"])
        state["head.bias"] = torch.zeros_like(target["head.bias"])
    npz_names = {name: keys for name, keys, _ in _key_map(config, _block_names(weights))}
    _, _, mismatches = compare_keys(
        state,
        {name: target[name] for name in state},
        label=lambda name: f"{name} (from {'+'.join(_as_tuple(npz_names.get(name, name)))})",
    )
    if mismatches:
        raise CheckpointError(
            misfit_message(
                "The checkpoint", config.name, guess_model_type(weights), mismatched=mismatches
            )
        )
    with torch.no_grad():
        model.load_state_dict({k: v.to(target[k].dtype) for k, v in state.items()}, strict=True)
