"""Export a checkpoint to the formats other tools read: official .npz, safetensors, timm,
Hugging Face, ONNX.

    python export.py --checkpoint output/NAME_checkpoint.bin --format npz
    python export.py --checkpoint output/NAME_checkpoint.bin --format safetensors
    python export.py --checkpoint output/NAME_checkpoint.bin --format timm
    python export.py --checkpoint output/NAME_checkpoint.bin --format hf
    python export.py --checkpoint output/NAME_checkpoint.bin --format onnx --output model.onnx

`--checkpoint` takes anything eval.py takes (a train.py `.bin` with its `.json` sidecar, a
`_last.pt`, an official `.npz`, an exported `.safetensors`, a Hugging Face folder, a timm state
dict); model type, image size and class names come from it, `--model_type`/`--img_size`
override them. The output goes next to the checkpoint unless `--output` says otherwise
(`NAME_checkpoint.npz`, `.safetensors`, `_timm.pth`, `_hf/`, `.onnx`). An existing output is kept
unless `--overwrite` is given, and even then only a regular file, or a folder an earlier `hf`
export wrote, is replaced; never the checkpoint or its sidecar. Formats:

- `npz`: the official vit_jax layout (`vit_jax/checkpoint.py` keys, Flax kernel layouts), as
  the downloads are; this project's loaders read it back bit-exactly.
- `safetensors`: the state dict, with model type, image size, class names, dataset and training
  facts stored in the file's metadata; eval.py, visualize.py and predict.py read it directly.
- `timm`: a state dict for `timm.create_model(<timm name>, ..., act_layer='gelu_tanh')`, loaded
  with strict=True (the call is printed). Official plain ViTs only: timm's hybrids standardise
  weights and normalise groups with other epsilons, and `testing`/`demo` are ours alone.
- `hf`: a folder `transformers.ViTForImageClassification.from_pretrained` loads with no
  missing or unexpected keys: `config.json` with the official numerics (tanh GELU, LayerNorm
  eps 1e-6), `model.safetensors`, `preprocessor_config.json` for `ViTImageProcessor` and a
  model card (`README.md`). Checked with transformers itself when it is installed. Plain ViTs
  with the class token and no `pre_logits` only (what ViTForImageClassification computes).
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
import os
import shutil
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # Ctrl+C while the modules below load: exit 130, no traceback
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(128 + signum))

import numpy as np

from models.configs import ViTConfig
from models.foreign import (
    TIMM_NAMES,
    hf_config,
    hf_preprocessor_config,
    hf_refusal,
    hf_state_dict,
    timm_state_dict,
)
from models.npz import CheckpointError, clean_state_dict, state_dict_to_npz
from utils.infra.errors import UserError, run_cli
from utils.infra.flags import (
    HelpFormatter,
    add_model_flags,
    add_verbose,
    parse_first,
    setup_logging,
)

logger = logging.getLogger(__name__)

# Output file name: the checkpoint's path with its suffix replaced by this.
SUFFIXES = {
    "npz": ".npz",
    "safetensors": ".safetensors",
    "timm": "_timm.pth",
    "onnx": ".onnx",
    "hf": "_hf",  # a folder
}
# What `--output` may end in, per file format (the hf folder takes any name).
OUTPUT_SUFFIXES = {
    "npz": (".npz",),
    "safetensors": (".safetensors",),
    "timm": (".pth", ".pt"),
    "onnx": (".onnx",),
}
# What an hf export's folder holds, and the line of its model card that says who wrote it: an
# existing folder is replaced (`--overwrite`) only when it holds these files and no others.
HF_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")
HF_CARD_MARK = "exported by ViT-pytorch's `export.py --format hf`"
ONNX_OPSET = 17  # LayerNormalization is a single ONNX op from opset 17 on
ONNX_MAX_BYTES = 2**31  # protobuf's limit for one .onnx file
NO_ONNX = "--format onnx needs the onnx and onnxruntime packages: pip install onnx onnxruntime"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="train.py's output/<name>_checkpoint.bin (or _last.pt), an official .npz, a "
        ".safetensors, a Hugging Face folder or a timm state dict.",
    )
    p.add_argument("--format", required=True, choices=tuple(SUFFIXES), help="What to write.")
    p.add_argument(
        "--output",
        default=None,
        help="File (for --format hf: folder) to write. Default: next to the checkpoint, e.g. "
        "NAME_checkpoint.npz, NAME_checkpoint_timm.pth, NAME_checkpoint_hf.",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an existing output: a regular file, or a folder an earlier --format hf "
        "export wrote. Never the checkpoint or its sidecar.",
    )
    add_model_flags(p)
    add_verbose(p)
    args = p.parse_args(argv)
    suffixes = OUTPUT_SUFFIXES.get(args.format, ())
    wrong = args.output and not args.output.lower().endswith(suffixes)
    if suffixes and wrong and not os.path.isdir(args.output):  # a folder: check_output says
        p.error(
            f"--format {args.format} writes a {' or '.join(suffixes)} file, but --output "
            f"{args.output} ends otherwise; pass a name ending in {suffixes[0]}."
        )
    return args


if __name__ == "__main__":
    parse_first(parse_args)  # --help and a mistyped flag answer before torch loads

import torch
from PIL import Image
from torch import nn

from utils.data.loaders import build_transforms
from utils.infra.atomic import file_sha256
from utils.infra.file_io import (
    check_output,
    checkpoint_files,
    read_sidecar,
    safe_load,
    save_npz,
    save_safetensors,
    write_output,
    writing,
)
from utils.infra.loading import LoadedModel, folder_weight_files, is_model_folder, load_model

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
        "tf32": loaded.tf32,
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


def check_against_timm(name: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    """Compare keys and shapes with timm's own model when timm is installed (built on `meta`)."""
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
# Hugging Face

# train.py flags a model card lists, when the run's `_last.pt` still holds them.
RECIPE_FLAGS = (
    "pretrained_dir",
    "dataset",
    "img_size",
    "num_steps",
    "warmup_steps",
    "decay_type",
    "learning_rate",
    "weight_decay",
    "train_batch_size",
    "gradient_accumulation_steps",
    "max_grad_norm",
    "optim_dtype",
    "precision",
    "tf32",
    "holdout_fraction",
    "seed",
)
CHECK_IMAGES = 3  # random images each check runs (logits; pipeline top-1)


def recipe(checkpoint: str) -> dict[str, Any]:
    """The training flags of the run that wrote `checkpoint`, from its `_last.pt` ({} if gone)."""
    path = Path(checkpoint)
    last = path if path.name.endswith("_last.pt") else None
    if path.name.endswith("_checkpoint.bin"):
        last = path.with_name(path.name.removesuffix("_checkpoint.bin") + "_last.pt")
    if last is None or not last.is_file():
        return {}
    try:
        saved = safe_load(last)
    except CheckpointError as err:
        logger.warning("The model card has no recipe: %s", err)
        return {}
    flags = saved.get("args") if isinstance(saved, dict) else None
    return {k: flags[k] for k in RECIPE_FLAGS if isinstance(flags, dict) and k in flags}


def _cell(value: Any) -> str:
    """A table cell: numbers to 6 significant digits (accuracies are float32 sums: 0.9583333),
    a flag left at its default (None) said so."""
    if value is None:
        text = "not given (its default)"
    elif isinstance(value, float):
        text = f"{value:.6g}"
    else:
        text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|")


def model_card(
    loaded: LoadedModel,
    sidecar: dict[str, Any],
    flags: dict[str, Any],
    source: tuple[str, str],
    checked: str,
) -> str:
    """The folder's README.md in the hub's format: YAML front matter, then what is known."""
    model = loaded.model
    height, width = loaded.img_size
    dataset = loaded.dataset
    front = ["---", "library_name: transformers", "pipeline_tag: image-classification"]
    front += ["tags:", "- vision", "- image-classification", "- vit"]
    if dataset:
        front += ["datasets:", f"- {dataset}"]
    if "accuracy" in sidecar:
        front += ["metrics:", "- accuracy"]
    front.append("---")
    title = f"{loaded.model_type}" + (f" fine-tuned on {dataset}" if dataset else "")
    lines = [
        *front,
        "",
        f"# {title}, {height}x{width}",
        "",
        f"A Vision Transformer (Dosovitskiy et al., ICLR 2021) {HF_CARD_MARK}. It computes "
        "what Google's official model computes: tanh GELU "
        "(`hidden_act: gelu_pytorch_tanh`) and LayerNorm eps 1e-6, which `config.json` says "
        "(transformers' own defaults, exact GELU and eps 1e-12, differ).",
        "",
        "## Source",
        "",
        f"- Checkpoint: `{os.path.basename(source[0])}`, SHA-256 `{source[1]}`",
        f"- Model type: {loaded.model_type}; input {height}x{width}; {model.num_classes} classes",
    ]
    if dataset:
        lines.append(f"- Fine-tuning dataset: {dataset}")
    if loaded.precision:
        lines.append(f"- Training precision: {loaded.precision}")
    if loaded.tf32 is not None:
        lines.append(
            "- TF32: on (float32 matrix products and convolutions in TF32 on CUDA)"
            if loaded.tf32
            else "- TF32: off (float32 matrix products and convolutions in full float32)"
        )
    if "step" in sidecar:
        lines += [
            "",
            "## Results",
            "",
            "| selected step | selected by | minival accuracy | test accuracy |",
            "|---|---|---|---|",
            f"| {sidecar['step']} | {sidecar.get('selected_by', 'test')} accuracy | "
            f"{_cell(sidecar.get('minival_accuracy', 'not measured'))} | "
            f"{_cell(sidecar.get('accuracy', 'not measured'))} |",
            "",
            "Measured by train.py during fine-tuning: top-1 accuracy over every image of the test "
            "split and of the minival split (held out of the training images, never trained "
            "on), preprocessed as vit_jax does (float bilinear resize to the full input size, no "
            "crop, pixels (x - 127.5) / 127.5). The selected step is the evaluation with the "
            "best accuracy on the split named above. The numbers were not measured again on "
            f"this folder; {checked}",
        ]
    if flags:
        lines += ["", "## Recipe (train.py flags)", "", "| flag | value |", "|---|---|"]
        lines += [f"| `--{k}` | {_cell(v)} |" for k, v in flags.items()]
    if sidecar:
        lines += ["", "## Everything the checkpoint's sidecar records", ""]
        lines += ["| key | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in sorted(sidecar.items())]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        'classify = pipeline("image-classification", model="path/to/this/folder")',
        'print(classify("image.jpg"))',
        "```",
        "",
        f"`ViTImageProcessor` resizes to {height}x{width} with PIL (bilinear, antialiased when "
        "shrinking, rounded to uint8) and maps pixels to (x - 127.5) / 127.5. The official "
        "pipeline (and eval.py / predict.py) resizes in float without antialiasing, so on "
        "images of another size the two inputs differ slightly; at the model's own size they "
        "agree.",
        "",
    ]
    return "\n".join(lines)


def is_hf_export(folder: Path) -> bool:
    """Whether `folder` holds what an earlier `--format hf` export wrote, and nothing else."""
    names = {entry.name for entry in folder.iterdir()}
    card = folder / "README.md"
    return (
        names <= set(HF_FILES)
        and card.is_file()
        and HF_CARD_MARK in card.read_text(encoding="utf-8", errors="replace")
    )


def write_folder(path: Path, fill: Callable[[Path], None], check: Callable[[Path], str]) -> str:
    """Fill a fresh folder beside `path`, check it, then move it into place.

    An earlier folder at `path` (`--overwrite`) is replaced only once the new one is complete
    and checked; a failure leaves it as it was. Returns what `check` says.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        said = check(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return said


def check_against_transformers(folder: Path, model: nn.Module, img_size: tuple[int, int]) -> str:
    """Load `folder` with transformers (when installed) and compare it with `model`.

    Its logits on random images must equal ours within 1e-4; `pipeline("image-classification")`
    is compared with predict.py's top-1 on random images at the model's size.

    Raises:
        UserError: transformers reports missing or unexpected keys, or its logits differ.
    """
    try:
        import transformers
    except ImportError:
        return "transformers is not installed here: the folder was not loaded by it."

    transformers.logging.disable_progress_bar()  # its weight-loading bars, between our lines
    theirs, info = transformers.ViTForImageClassification.from_pretrained(
        folder, output_loading_info=True
    )
    wrong = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if wrong:
        raise UserError(
            f"transformers {transformers.__version__} does not load the folder exactly "
            f"({wrong}); export --format npz or safetensors instead."
        )
    images = torch.randn(CHECK_IMAGES, 3, *img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = float(
            (theirs.eval()(pixel_values=images).logits - model(images)[0]).abs().max()
        )
    if not difference <= 1e-4:
        raise UserError(
            f"transformers {transformers.__version__} computes other logits from the exported "
            f"folder (max difference {difference:.2e} > 1e-4); export --format npz instead."
        )
    rng = np.random.default_rng(0)
    height, width = img_size
    photos = [
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for _ in range(CHECK_IMAGES)
    ]
    classify = transformers.pipeline("image-classification", model=str(folder), device="cpu")
    labels = [found[0]["label"] for found in classify(photos, top_k=1)]
    preprocess = build_transforms(img_size, train=False)
    with torch.no_grad():
        ours = model(torch.stack([preprocess(p) for p in photos]))[0].argmax(-1).tolist()
    names = theirs.config.id2label
    agree = sum(label == names[i] for label, i in zip(labels, ours, strict=True))
    return (
        f"transformers {transformers.__version__} loads it with no missing or unexpected keys; "
        f"its logits on {CHECK_IMAGES} random images equal ours within {difference:.1e} (max "
        f"|difference|), and pipeline('image-classification') gives predict.py's top-1 on "
        f"{agree}/{CHECK_IMAGES} random {height}x{width} images (at other sizes its PIL resize, "
        "antialiased and rounded to uint8, can differ from our float resize)."
    )


def export_hf(args: argparse.Namespace, loaded: LoadedModel, path: Path, what: str) -> list[str]:
    """Write the Hugging Face folder: config.json, model.safetensors, preprocessor config, card."""
    model = loaded.model
    refusal = hf_refusal(model.config)
    if refusal:
        raise UserError(refusal)
    state = hf_state_dict(model.state_dict())
    config = hf_config(model.config, loaded.img_size, loaded.class_names, model.num_classes)
    preprocessor = hf_preprocessor_config(loaded.img_size)
    sidecar = {} if os.path.isdir(args.checkpoint) else read_sidecar(args.checkpoint)
    # The file hashed: the checkpoint, or a folder's first weight file.
    weights = args.checkpoint
    if is_model_folder(weights):
        weights = folder_weight_files(weights)[0]
    source = weights, file_sha256(weights)

    def write_text(path: Path, text: str) -> None:
        write_output(path, lambda handle: handle.write(text.encode("utf-8")))

    def fill(folder: Path) -> None:
        for name, content in (("config.json", config), ("preprocessor_config.json", preprocessor)):
            write_text(folder / name, json.dumps(content, indent=2) + "\n")
        save_safetensors(folder / "model.safetensors", state, describe(loaded), flag="--output")

    def check(folder: Path) -> str:
        checked = check_against_transformers(folder, model, loaded.img_size)
        card = model_card(loaded, sidecar, recipe(args.checkpoint), source, checked)
        write_text(folder / "README.md", card)
        return checked

    with writing(path):
        checked = write_folder(path, fill, check)
    return [
        f"Wrote {path}/ ({what}): config.json, model.safetensors, preprocessor_config.json, "
        "README.md (model card).",
        checked,
        "Load it with:",
        "    from transformers import ViTForImageClassification, pipeline",
        f"    model = ViTForImageClassification.from_pretrained({str(path)!r})",
        f"    classify = pipeline('image-classification', model={str(path)!r})",
    ]


# --------------------------------------------------------------------------------------------
# ONNX


def onnx_bytes(model: nn.Module, img_size: tuple[int, int], info: dict[str, Any]) -> bytes:
    """The serialized ONNX model: logits graph, dynamic batch, `info` in its metadata_props.

    Raises:
        UserError: onnx is not installed, or the weights exceed the 2 GB of one ONNX file.
    """

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
        raise UserError(NO_ONNX) from None
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
    try:
        import onnxruntime
    except ImportError:
        raise UserError(NO_ONNX) from None
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
    path = output_path(args.checkpoint, args.format, args.output)
    check_output(
        path,
        overwrite=args.overwrite,
        folder=args.format == "hf",
        inputs=checkpoint_files(args.checkpoint),
        earlier=is_hf_export,
    )
    loaded = load_model(args.checkpoint, args.model_type, args.img_size)
    model = loaded.model
    height, width = loaded.img_size
    what = f"{loaded.model_type}, {height}x{width}, {model.num_classes} classes"
    if args.format == "hf":
        return export_hf(args, loaded, path, what)
    state = clean_state_dict(model.state_dict())
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
        call = ", ".join([repr(name), *(f"{k}={v!r}" for k, v in kwargs.items())])
        lines += [
            f"Wrote {path} ({what}): state dict for timm's {name}. {checked}",
            "Load it with:",
            "    import timm, torch",
            f"    model = timm.create_model({call})",
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
            f"(batch, 3, {height}, {width}) in [-1, 1], output "
            "'logits' (batch, classes), dynamic batch axis.",
            f"onnxruntime check on 3 random images: max |logit difference| {difference:.2e}.",
        ]
    return lines


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Parse flags, export, print what was written."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    lines = export(args)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    run_cli(main)
