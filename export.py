"""Export a checkpoint to the formats other tools read: official .npz, safetensors, timm, ONNX.

    python3 export.py --checkpoint output/NAME_checkpoint.bin --format npz
    python3 export.py --checkpoint output/NAME_checkpoint.bin --format safetensors
    python3 export.py --checkpoint output/NAME_checkpoint.bin --format timm
    python3 export.py --checkpoint output/NAME_checkpoint.bin --format onnx --output model.onnx

`--checkpoint` takes anything eval.py takes (a train.py `.bin` with its `.json` sidecar, a
`_last.pt`, an official `.npz`, an exported `.safetensors`); model type, image size and class
names come from it, `--model_type`/`--img_size` override them. The output goes next to the
checkpoint unless `--output` says otherwise (`NAME_checkpoint.npz`, `.safetensors`,
`_timm.pth`, `.onnx`); an existing file is kept unless `--overwrite` is given. Formats:

- `npz`: the official vit_jax layout (`vit_jax/checkpoint.py` keys, Flax kernel layouts), as
  the downloads are; this project's loaders read it back bit-exactly.
- `safetensors`: the state dict, with model type, image size, class names, dataset and training
  facts stored in the file's metadata; eval.py, visualize.py and predict.py read it directly.
- `timm`: a state dict for `timm.create_model(<timm name>, ..., act_layer='gelu_tanh')`, loaded
  with strict=True (the call is printed). Official plain ViTs only: timm's hybrids standardise
  weights and normalise groups with other epsilons, and `testing`/`demo` are ours alone.
- `onnx`: the logits graph, input `images` (batch, 3, H, W), output `logits` (batch, classes),
  dynamic batch axis, opset 17 (TorchScript exporter); checked with onnxruntime after export.
  Needs `pip install onnx onnxruntime`.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.configs import ViTConfig, model_names
from models.npz import clean_state_dict, state_dict_to_npz
from utils.errors import UserError, run_cli
from utils.flags import HelpFormatter, add_verbose, log_level, positive_int

if TYPE_CHECKING:
    import torch
    from torch import nn

    from utils.loading import LoadedModel

# torch, and every module of ours that imports it, is imported inside the functions that use
# it, after the flags are parsed: `--help` and a mistyped flag answer at once.

# Output file name: the checkpoint's path with its suffix replaced by this.
SUFFIXES = {"npz": ".npz", "safetensors": ".safetensors", "timm": "_timm.pth", "onnx": ".onnx"}
ONNX_OPSET = 17  # LayerNormalization is a single ONNX op from opset 17 on
ONNX_MAX_BYTES = 2**31  # protobuf's limit for one .onnx file

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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="train.py's output/<name>_checkpoint.bin (or _last.pt), an official .npz, or a "
        ".safetensors.",
    )
    p.add_argument("--format", required=True, choices=tuple(SUFFIXES), help="What to write.")
    p.add_argument(
        "--output",
        default=None,
        help="File to write. Default: next to the checkpoint, e.g. NAME_checkpoint.npz, "
        "NAME_checkpoint_timm.pth.",
    )
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output file.")
    p.add_argument(
        "--model_type",
        choices=model_names(),
        default=None,
        help="Default: from the checkpoint's sidecar or its shapes.",
    )
    p.add_argument(
        "--img_size", type=positive_int, default=None, help="Default: the size it was trained at."
    )
    add_verbose(p)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Where the output goes


def output_path(checkpoint: str, fmt: str, output: str | None) -> Path:
    """`--output`, or the checkpoint's path with the format's suffix."""
    if output:
        return Path(output)
    path = Path(checkpoint)
    return path.with_name(path.stem + SUFFIXES[fmt])


def describe(loaded: LoadedModel) -> dict[str, Any]:
    """What a sidecar says about the model, from whatever the checkpoint told `load_model`."""
    return {
        "model_type": loaded.model_type,
        "img_size": list(loaded.img_size),
        "num_classes": loaded.model.num_classes,
        "dataset": loaded.dataset,
        "class_names": loaded.class_names,
        "precision": loaded.precision,
        **loaded.info,
    }


# --------------------------------------------------------------------------------------------
# timm


def timm_model_args(
    config: ViTConfig, img_size: tuple[int, int], num_classes: int
) -> tuple[str, dict[str, Any]]:
    """timm's model name and the `create_model` arguments that build exactly our model.

    Returns:
        (name, kwargs): `timm.create_model(name, **kwargs)` computes what `config` computes,
        tanh GELU and dropout rates included.

    Raises:
        UserError: timm has no model that computes this one exactly.
    """
    if config.resnet is not None:
        raise UserError(
            f"timm has no exact equivalent of {config.name}: its hybrids standardise weights as "
            "(w - mean) / sqrt(var + 1e-8) and use GroupNorm eps 1e-5, the official model "
            "(w - mean) / (std + 1e-5) and eps 1e-6; export --format npz, safetensors or onnx."
        )
    if config.name not in TIMM_NAMES or config.representation_size:
        raise UserError(
            f"timm has no {config.name} model (only the official plain ViTs: "
            f"{', '.join(TIMM_NAMES)}); export --format npz, safetensors or onnx instead."
        )
    height, width = img_size
    kwargs: dict[str, Any] = {
        "num_classes": num_classes,
        "img_size": height if height == width else (height, width),
        "act_layer": "gelu_tanh",  # Flax's nn.gelu; timm defaults to the exact GELU
    }
    if config.classifier == "gap":
        kwargs.update(class_token=False, global_pool="avg", fc_norm=False)
    if config.dropout_rate:
        kwargs.update(pos_drop_rate=config.dropout_rate, proj_drop_rate=config.dropout_rate)
    if config.attention_dropout_rate:
        kwargs["attn_drop_rate"] = config.attention_dropout_rate
    return TIMM_NAMES[config.name], kwargs


def timm_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict under timm's `VisionTransformer` key names (the tensors are the same)."""
    renamed = {}
    for key, value in clean_state_dict(state).items():
        for ours, theirs in TIMM_PREFIXES:
            if key.startswith(ours):
                key = theirs + key[len(ours) :]
                break
        renamed[key] = value
    return renamed


def create_model_call(name: str, kwargs: dict[str, Any]) -> str:
    """The `timm.create_model(...)` line a user can paste."""
    args = ", ".join([repr(name), *(f"{k}={v!r}" for k, v in kwargs.items())])
    return f"timm.create_model({args})"


def check_against_timm(name: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    """Compare keys and shapes with timm's own model when timm is installed (built on `meta`)."""
    import torch

    try:
        import timm
    except ImportError:
        return "timm is not installed here: keys and shapes were not checked against it."
    with torch.device("meta"):
        reference = timm.create_model(name, **kwargs).state_dict()
    theirs = {k: tuple(v.shape) for k, v in reference.items()}
    ours = {k: tuple(v.shape) for k, v in state.items()}
    if theirs != ours:  # timm renamed something: say what, rather than write a useless file
        differ = sorted(set(theirs) ^ set(ours)) or [k for k in ours if ours[k] != theirs[k]]
        raise UserError(
            f"timm {timm.__version__}'s {name} does not take this state dict (first "
            f"differences: {', '.join(differ[:5])}); export --format npz or onnx instead."
        )
    return f"Checked against timm {timm.__version__}: every key and shape matches."


# --------------------------------------------------------------------------------------------
# ONNX


def onnx_bytes(model: nn.Module, img_size: tuple[int, int], info: dict[str, Any]) -> bytes:
    """The serialized ONNX model: logits graph, dynamic batch, `info` in its metadata_props.

    Raises:
        UserError: onnx is not installed, or the weights exceed the 2 GB of one ONNX file.
    """
    import torch

    class LogitsOnly(torch.nn.Module):
        """`model(images)` -> logits (our forward also returns the attention-map list)."""

        def __init__(self, model: nn.Module):
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.model(images)[0]

    try:
        import onnx
    except ImportError:
        raise UserError(
            "--format onnx needs the onnx and onnxruntime packages: pip install onnx onnxruntime"
        ) from None
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if size >= ONNX_MAX_BYTES:
        raise UserError(
            f"The model's weights take {size / 2**30:.2f} GiB, more than the 2 GiB one .onnx "
            "file can hold; export --format safetensors or npz instead."
        )
    # The TorchScript exporter, on purpose: it needs torch alone (the dynamo one, the default
    # from torch 2.9, needs onnxscript). torch 2.4 has no `dynamo` flag, only this exporter.
    has_flag = "dynamo" in inspect.signature(torch.onnx.export).parameters
    legacy = {"dynamo": False} if has_flag else {}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # of that exporter
        # Only the batch axis is dynamic: image sizes the tracer freezes are the graph's own.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            LogitsOnly(model).eval(),
            (torch.zeros(2, 3, *img_size),),
            buffer,
            **legacy,
            opset_version=ONNX_OPSET,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    info = {
        **info,
        "input": "images: float32 (batch, 3, H, W), RGB, resized to img_size, scaled to [-1, 1]",
    }
    for key, value in info.items():
        if value is not None:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    return proto.SerializeToString()


def onnx_max_difference(data: bytes, model: nn.Module, img_size: tuple[int, int]) -> float:
    """Largest |logit difference| between onnxruntime on `data` and `model`, on 3 random images.

    Raises:
        UserError: onnxruntime is not installed.
    """
    import torch

    try:
        import onnxruntime
    except ImportError:
        raise UserError(
            "--format onnx needs the onnx and onnxruntime packages: pip install onnx onnxruntime"
        ) from None
    images = torch.randn(3, 3, *img_size, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    (theirs,) = session.run(["logits"], {"images": images.numpy()})
    with torch.no_grad():
        ours = model(images)[0].numpy()
    return float(np.abs(theirs - ours).max())


# --------------------------------------------------------------------------------------------
# Entry point


def export(args: argparse.Namespace) -> list[str]:
    """Write the export; returns the lines to print."""
    import torch

    from utils.file_io import check_output, save_npz, save_safetensors, write_output
    from utils.loading import load_model

    path = output_path(args.checkpoint, args.format, args.output)
    check_output(path, overwrite=args.overwrite)
    loaded = load_model(args.checkpoint, args.model_type, args.img_size)
    model = loaded.model
    state = clean_state_dict(model.state_dict())
    what = f"{loaded.model_type}, {loaded.img_size[0]}x{loaded.img_size[1]}, "
    what += f"{model.num_classes} classes"
    lines = []
    if args.format == "npz":
        arrays = state_dict_to_npz(state, model.config)
        save_npz(path, arrays, flag="--output")
        lines.append(f"Wrote {path} ({what}): {len(arrays)} arrays in the official vit_jax layout.")
    elif args.format == "safetensors":
        save_safetensors(path, state, describe(loaded), flag="--output")
        lines.append(f"Wrote {path} ({what}): state dict, description in its metadata.")
    elif args.format == "timm":
        name, kwargs = timm_model_args(model.config, loaded.img_size, model.num_classes)
        timm_state = timm_state_dict(state)
        checked = check_against_timm(name, kwargs, timm_state)
        write_output(path, lambda handle: torch.save(timm_state, handle))
        lines += [
            f"Wrote {path} ({what}): state dict for timm's {name}. {checked}",
            "Load it with:",
            "    import timm, torch",
            f"    model = {create_model_call(name, kwargs)}",
            f"    model.load_state_dict(torch.load({str(path)!r}, weights_only=True))",
            "Preprocess as eval.py does (resize to the full image size, no crop; pixels to "
            "[-1, 1]), not with the centre crop timm's default data config describes.",
        ]
    else:
        info = describe(loaded)
        data = onnx_bytes(model, loaded.img_size, info)
        difference = onnx_max_difference(data, model, loaded.img_size)
        write_output(path, lambda handle: handle.write(data))
        lines += [
            f"Wrote {path} ({what}): ONNX opset {ONNX_OPSET}, input 'images' "
            f"(batch, 3, {loaded.img_size[0]}, {loaded.img_size[1]}) in [-1, 1], output "
            "'logits' (batch, classes), dynamic batch axis.",
            f"onnxruntime check on 3 random images: max |logit difference| {difference:.2e}.",
        ]
    return lines


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Parse flags, export, print what was written."""
    args = parse_args(argv)
    logging.basicConfig(level=log_level(args.verbose), format="%(levelname)s %(message)s")
    lines = export(args)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    run_cli(main)
