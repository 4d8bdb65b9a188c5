"""Conversion between this project's state dicts and those of Hugging Face transformers and timm.

Pure functions on key names and tensors, no file I/O (`utils/infra/loading.py` reads the files).
Both libraries hold the same parameters as `models/modeling.py` for a plain ViT with the `token`
classifier; only the names differ, and Hugging Face stores query, key and value as three
Linear layers where we keep one fused `qkv`:

- transformers (`models/vit/modeling_vit.py`): `ViTForImageClassification` keys under `vit.`
  plus `classifier.*`; a bare `ViTModel` (the in21k hub files) without the prefix and with a
  `pooler` (Dense + tanh on the class token), which is the official `pre_logits` layer. Hub
  files name the block parts `encoder.layer.{i}.attention.attention.query`, ...; transformers
  5 names them `layers.{i}.attention.q_proj`, ... in memory: both are read.
- timm (`timm/models/vision_transformer.py`): `patch_embed.proj`, `blocks.{i}`, `norm`, `head`;
  the rest of each key is ours. timm before 0.6 kept `pre_logits.fc`.

Hugging Face's ViT defaults (exact GELU, LayerNorm eps 1e-12) differ from the official model's
(tanh GELU, eps 1e-6; `vit_jax/models_vit.py`): `hf_config` writes the official ones.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from models.configs import ViTConfig, find_config, get_config, is_size, is_whole, to_pair
from models.npz import CheckpointError, clean_state_dict

if TYPE_CHECKING:  # for annotations only: the command lines import this module before torch
    import torch

__all__ = [
    "HF_CONFIG_FIELDS",
    "TIMM_NAMES",
    "check_hf_config",
    "from_hf",
    "from_timm",
    "hf_config",
    "hf_config_model",
    "hf_preprocessor_config",
    "hf_refusal",
    "hf_state_dict",
    "state_dict_format",
    "timm_state_dict",
    "to_ours",
]

# --------------------------------------------------------------------------------------------
# timm

# Our registry name -> timm's model of the same architecture (`timm/models/vision_transformer.py`).
# The `_224` is only timm's default input size: `img_size=` overrides it.
TIMM_NAMES = {
    "ViT-Ti_16": "vit_tiny_patch16_224",
    "ViT-S_16": "vit_small_patch16_224",
    "ViT-S_32": "vit_small_patch32_224",
    "ViT-B_16": "vit_base_patch16_224",
    "ViT-B_32": "vit_base_patch32_224",
    "ViT-B_8": "vit_base_patch8_224",
    "ViT-L_16": "vit_large_patch16_224",
    "ViT-L_32": "vit_large_patch32_224",
    "ViT-H_14": "vit_huge_patch14_224",
}
# Key prefixes, ours -> timm's; the rest of each key (norm1, attn.qkv, mlp.fc1, head) is the same.
TIMM_PREFIXES = (
    ("embeddings.patch_embed.", "patch_embed.proj."),
    ("embeddings.", ""),  # cls_token, pos_embed
    ("encoder.blocks.", "blocks."),
    ("encoder.norm.", "norm."),
)
# timm features the official model does not have, by a key that shows them.
TIMM_EXTRAS = (
    (r"^fc_norm\.", "a LayerNorm after the token average (fc_norm) where the official gap model "
     "normalises before it"),
    (r"\.ls[12]\.", "LayerScale (ls1/ls2)"),
    (r"^reg_token$", "register tokens"),
    (r"^dist_token$|^head_dist\.", "a distillation token (DeiT)"),
    (r"^norm_pre\.", "a LayerNorm before the blocks (norm_pre)"),
    (r"\.attn\.(q|k)_norm\.", "query/key normalisation"),
    (r"^attn_pool\.", "attention pooling (MAP head)"),
)  # fmt: skip


def _renamed(key: str, pairs: Sequence[tuple[str, str]]) -> str:
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def timm_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict under timm's `VisionTransformer` key names (the tensors are the same)."""
    return {_renamed(k, TIMM_PREFIXES): v for k, v in clean_state_dict(state).items()}


def from_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ViT state dict under our key names (the tensors are the same).

    Raises:
        CheckpointError: the model has a part the official ViT does not (LayerScale, register
            or distillation tokens, ...), so no model here computes it.
    """
    state = clean_state_dict(state)
    for pattern, what in TIMM_EXTRAS:
        found = sorted(k for k in state if re.search(pattern, k))
        if found:
            raise CheckpointError(
                f"This timm model has {what} ({found[0]}), which the official ViT does not: it "
                "cannot be loaded here. Pass a plain ViT (vit_*_patch*_224 and its .augreg_* "
                "weights)."
            )
    back = [(theirs, ours) for ours, theirs in TIMM_PREFIXES if theirs]
    back.append(("pre_logits.fc.", "pre_logits."))
    renamed = {}
    for key, value in state.items():
        if key in ("cls_token", "pos_embed"):
            key = f"embeddings.{key}"
        renamed[_renamed(key, back)] = value
    return renamed


# --------------------------------------------------------------------------------------------
# Hugging Face transformers

HF_PREFIX = "vit."  # ViTForImageClassification's backbone; a bare ViTModel has none
HF_HEAD = "classifier."
# (ours, hub name) per block part, under `encoder.blocks.{i}.` / `encoder.layer.{i}.`.
HF_BLOCK = (
    ("norm1.", "layernorm_before."),
    ("attn.proj.", "attention.output.dense."),
    ("norm2.", "layernorm_after."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
)
HF_QKV = ("attention.attention.query.", "attention.attention.key.", "attention.attention.value.")
# transformers 5's in-memory names (`layers.{i}.`), hub name -> new name.
HF_V5_BLOCK = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)
HF_TOP = (
    ("embeddings.patch_embed.", "embeddings.patch_embeddings.projection."),
    ("embeddings.pos_embed", "embeddings.position_embeddings"),
    ("embeddings.cls_token", "embeddings.cls_token"),
    ("encoder.norm.", "layernorm."),
    ("pre_logits.", "pooler.dense."),
)
# Activations transformers calls GELU (`activations.py`): the exact one and tanh approximations.
HF_GELUS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_python")
HF_GELU_TANH = "gelu_pytorch_tanh"  # Flax's nn.gelu
LN_EPS = 1e-6  # vit_jax/models_vit.py: nn.LayerNorm(epsilon=1e-6)


def hf_refusal(config: ViTConfig) -> str | None:
    """Why `ViTForImageClassification` cannot hold `config` exactly, or None when it can."""
    instead = "export --format npz, safetensors or onnx instead"
    if config.resnet is not None:
        return (
            f"Hugging Face's ViTForImageClassification has no ResNet stem, so it cannot hold "
            f"{config.name} (a hybrid); {instead}."
        )
    if config.classifier != "token":
        return (
            f"Hugging Face's ViTForImageClassification classifies the class token, and "
            f"{config.name} averages all tokens (the gap classifier, no class token); "
            "export --format timm, npz, safetensors or onnx instead."
        )
    if config.representation_size:
        return (
            f"This {config.name} keeps a pre_logits layer (Dense + tanh before the head), which "
            "Hugging Face's ViTForImageClassification does not have; fine-tune it first "
            f"(train.py drops pre_logits, as the official code does), or {instead}."
        )
    return None


def hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict as `ViTForImageClassification` saves it (hub key names, q/k/v split).

    The tensors are ours (q/k/v copied out of `qkv`: safetensors stores no shared memory);
    nothing is rescaled or transposed (both are PyTorch Linear layers).
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    for key, value in clean_state_dict(state).items():
        block = re.match(r"encoder\.blocks\.(\d+)\.(.+)$", key)
        if key.startswith("head."):
            out[HF_HEAD + key[len("head.") :]] = value
        elif block and block[2].startswith("attn.qkv."):
            kind = block[2][len("attn.qkv.") :]
            for name, part in zip(HF_QKV, torch.chunk(value, 3), strict=True):
                out[f"{HF_PREFIX}encoder.layer.{block[1]}.{name}{kind}"] = part.clone()
        elif block:
            out[f"{HF_PREFIX}encoder.layer.{block[1]}.{_renamed(block[2], HF_BLOCK)}"] = value
        else:
            out[HF_PREFIX + _renamed(key, HF_TOP)] = value
    return out


def from_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ViT state dict (ViTForImageClassification or ViTModel, hub or transformers
    5 names) under our key names, query, key and value fused into `qkv`.

    The pooler becomes `pre_logits`; unknown keys are kept as they are, so that a strict load
    names them.
    """
    import torch

    hub_block = [(theirs, ours) for ours, theirs in HF_BLOCK]
    v5_to_hub = [(new, old) for old, new in HF_V5_BLOCK]
    top = [(theirs, ours) for ours, theirs in HF_TOP]
    parts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in clean_state_dict(state).items():
        key = key.removeprefix(HF_PREFIX)
        block = re.match(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)$", key)
        if key.startswith(HF_HEAD):
            out["head." + key[len(HF_HEAD) :]] = value
        elif block:
            rest = _renamed(block[2], v5_to_hub) if key.startswith("layers.") else block[2]
            qkv = [rest.startswith(name) for name in HF_QKV]
            if any(qkv):
                kind = rest.split(".")[-1]
                parts.setdefault((block[1], kind), {})[qkv.index(True)] = value
            else:
                out[f"encoder.blocks.{block[1]}.{_renamed(rest, hub_block)}"] = value
        else:
            out[_renamed(key, top)] = value
    for (layer, kind), qkv in parts.items():
        if len(qkv) != 3:
            missing = [HF_QKV[i] + kind for i in range(3) if i not in qkv]
            raise CheckpointError(
                f"The Hugging Face checkpoint's layer {layer} lacks {', '.join(missing)}: the "
                "file is damaged or not a ViT checkpoint."
            )
        shapes = [tuple(qkv[i].shape) for i in range(3)]
        if len(set(shapes)) != 1:
            raise CheckpointError(
                f"The Hugging Face checkpoint's layer {layer} has query, key and value {kind}s "
                f"of shapes {', '.join(map(str, shapes))}: they must be alike. The file is "
                "damaged or not a ViT checkpoint."
            )
        out[f"encoder.blocks.{layer}.attn.qkv.{kind}"] = torch.cat([qkv[0], qkv[1], qkv[2]])
    return out


def hf_config(
    config: ViTConfig,
    img_size: int | tuple[int, int],
    class_names: Sequence[str] | None,
    num_classes: int,
) -> dict[str, Any]:
    """`config.json` for `ViTForImageClassification`, with the official numerics."""
    height, width = to_pair(img_size)
    names = list(class_names) if class_names else [f"LABEL_{i}" for i in range(num_classes)]
    patch = (
        config.patch_size[0]
        if config.patch_size[0] == config.patch_size[1]
        else list(config.patch_size)
    )
    return {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.mlp_dim,
        "hidden_act": HF_GELU_TANH,
        "layer_norm_eps": LN_EPS,
        "hidden_dropout_prob": config.dropout_rate,
        "attention_probs_dropout_prob": config.attention_dropout_rate,
        "initializer_range": 0.02,
        "image_size": height if height == width else [height, width],
        "patch_size": patch,
        "num_channels": 3,
        "qkv_bias": True,
        "encoder_stride": config.patch_size[0],
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
        "torch_dtype": "float32",
    }


def hf_preprocessor_config(img_size: int | tuple[int, int]) -> dict[str, Any]:
    """`preprocessor_config.json` for `ViTImageProcessor`: resize to the full image size, then
    x / 255, then (x - 0.5) / 0.5, which is vit_jax's (x - 127.5) / 127.5."""
    height, width = to_pair(img_size)
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": height, "width": width},
        "resample": 2,  # PIL bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


def _is_number(value: Any, positive: bool = False) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > 0 or not positive)
    )


def _is_labels(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in value.items()
    )


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_triple(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and len(value) == 3 and all(map(test, value))


_WHOLE = (lambda v: is_whole(v, 1), "a whole number of at least 1")
_SIZE = (is_size, "a positive whole number or a [height, width] pair of them")
# The fields of a `config.json` this project reads (transformers' ViT config, and timm's
# `save_for_hf`), each with the test of its value and what it must be; others are not read.
HF_CONFIG_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model_type": (_is_text, "a model type, e.g. vit"),
    "hidden_size": _WHOLE,
    "num_hidden_layers": _WHOLE,
    "num_attention_heads": _WHOLE,
    "intermediate_size": _WHOLE,
    "patch_size": _SIZE,
    "image_size": _SIZE,
    "num_channels": _WHOLE,
    "qkv_bias": (lambda v: isinstance(v, bool), "true or false"),
    "hidden_act": (_is_text, "an activation name, e.g. gelu_pytorch_tanh"),
    "layer_norm_eps": (lambda v: _is_number(v, positive=True), "a positive number, e.g. 1e-06"),
    "id2label": (_is_labels, 'an object of class names by index, e.g. {"0": "cat"}'),
    "architecture": (_is_text, "a timm model name, e.g. vit_base_patch16_224"),
    "label_names": (
        lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
        "a list of class names (strings)",
    ),
    "pretrained_cfg": (lambda v: isinstance(v, dict), "an object of timm's settings"),
    "pretrained_cfg.input_size": (
        _is_triple(lambda v: is_whole(v, 1)),
        "[channels, height, width], three positive whole numbers",
    ),
    "pretrained_cfg.mean": (_is_triple(_is_number), "three numbers, one per channel"),
}


def check_hf_config(hf: Any, where: str) -> dict[str, Any]:
    """A parsed `config.json`, checked field by field (`HF_CONFIG_FIELDS`).

    Raises:
        CheckpointError: naming the file, the field, its value and what it must be.
    """
    if not isinstance(hf, dict):
        raise _config_error(where, "(the whole file)", hf, "a JSON object of fields")
    fields = dict(hf)
    if isinstance(hf.get("pretrained_cfg"), dict):
        fields.update({f"pretrained_cfg.{k}": v for k, v in hf["pretrained_cfg"].items()})
    for field, value in fields.items():
        test, wanted = HF_CONFIG_FIELDS.get(field, (None, ""))
        if test is not None and not test(value):
            raise _config_error(where, field, value, wanted)
    return hf


def _config_error(where: str, field: str, value: Any, wanted: str) -> CheckpointError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return CheckpointError(
        f"{where}: the field {field!r} is {shown}, but it must be {wanted}. The file was "
        "damaged, edited or written by another program: pass the folder save_pretrained wrote."
    )


def hf_config_model(hf: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """The registry model a transformers ViT `config.json` describes, and what else it tells.

    Args:
        hf: the parsed `config.json`, as `check_hf_config` passed it.
        where: the file, for the messages.

    Returns:
        (registry name, facts): facts has `img_size` ([H, W]), `class_names` when `id2label`
        holds real names, and `notes`: how its numerics differ from the official model's
        (which is what this project computes).

    Raises:
        CheckpointError: not a ViT, or one this project cannot compute (no qkv bias, other
            activation or channel count, an architecture the registry does not have).
    """
    kind = hf.get("model_type", "vit")
    if kind != "vit":
        raise CheckpointError(
            f"{where} describes a Hugging Face {kind!r} model, not a ViT ('vit'): only plain "
            "ViTs load here."
        )
    act = hf.get("hidden_act", "gelu")
    problems = []
    if not hf.get("qkv_bias", True):
        problems.append("no query/key/value bias (qkv_bias false)")
    if act not in HF_GELUS:
        problems.append(f"the activation {act!r}")
    if hf.get("num_channels", 3) != 3:
        problems.append(f"{hf['num_channels']} input channels")
    if problems:
        raise CheckpointError(
            f"{where} describes a ViT with {' and '.join(problems)}; the official ViT, the "
            "only one computed here, has a qkv bias, GELU and RGB input."
        )
    try:
        hidden, layers = int(hf["hidden_size"]), int(hf["num_hidden_layers"])
        heads, mlp = int(hf["num_attention_heads"]), int(hf["intermediate_size"])
        patch = to_pair(hf.get("patch_size", 16))
        img_size = to_pair(hf.get("image_size", 224))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{where} is not a usable ViT config.json ({type(err).__name__}: {err}); pass the "
            "folder save_pretrained wrote."
        ) from None
    name = find_config(hidden, layers, patch, None, classifier="token")
    config = get_config(name) if name else None
    if config is None or (config.num_heads, config.mlp_dim) != (heads, mlp):
        raise CheckpointError(
            f"{where} describes a ViT (hidden {hidden}, {layers} layers, {heads} heads, MLP "
            f"{mlp}, {patch[0]}x{patch[1]} patches) that is not in the registry; pass one of the "
            "official architectures (ViT-Ti/S/B/L/H)."
        )
    facts: dict[str, Any] = {"img_size": list(img_size), "notes": []}
    labels = hf.get("id2label") or {}
    try:
        names = [str(labels[k]) for k in sorted(labels, key=int)]
    except ValueError:
        names = []
    if names and names != [f"LABEL_{i}" for i in range(len(names))]:
        facts["class_names"] = names
    if act != HF_GELU_TANH:
        facts["notes"].append(f"its config says {act!r}; computed here with tanh GELU")
    eps = hf.get("layer_norm_eps", 1e-12)
    if eps != LN_EPS:
        facts["notes"].append(f"its config says LayerNorm eps {eps:g}; computed here with 1e-6")
    return name, facts


# --------------------------------------------------------------------------------------------
# Which layout is this?


def state_dict_format(state: Mapping[str, Any]) -> str:
    """'ours', 'hf' (transformers), 'timm', or 'unknown', from the key names alone."""
    keys = clean_state_dict(state).keys()
    if any(k.startswith("embeddings.patch_embed.") for k in keys):
        return "ours"
    if any("patch_embeddings.projection." in k for k in keys):
        return "hf"
    if any(k.startswith("patch_embed.proj.") for k in keys):
        return "timm"
    return "unknown"


def to_ours(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Any supported state dict under our key names, and the layout it came in."""
    layout = state_dict_format(state)
    if layout == "hf":
        return from_hf(state), layout
    if layout == "timm":
        return from_timm(state), layout
    return clean_state_dict(state), layout
