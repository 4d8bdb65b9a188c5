"""Model registry: the official ViT and hybrid configurations.

Mirrors the model configs of Google's `vit_jax/configs/models.py` (ViT paper, Table 1 and
Appendix; hybrid details in Section 3.1; the small, `gap` and R+ViT models of the AugReg and GSAM
releases). Every entry is a frozen dataclass keyed by the name the official checkpoints use
(`ViT-B_16`, `R50+ViT-B_16`, ...). The CLI takes its choices from :data:`CONFIGS` and
:data:`ALIASES`, never from a second list. The official file names also say which model a file
holds: :func:`model_type_from_filename` reads them.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ALIASES",
    "AUGREG_DROPOUT",
    "AUGREG_MODELS",
    "CHECKPOINT_FOLDERS",
    "CONFIGS",
    "ConfigError",
    "ResNetConfig",
    "ViTConfig",
    "augreg_name",
    "checked_img_size",
    "find_config",
    "get_config",
    "is_augreg_filename",
    "is_size",
    "is_whole",
    "model_names",
    "model_type_from_filename",
    "to_pair",
]


class ConfigError(ValueError):
    """A setting the model cannot take (e.g. an image size); the message says what to use.

    Command-line entry points print its message and exit with code 2 (`utils.infra.errors.run_cli`).
    """


@dataclass(frozen=True)
class ResNetConfig:
    """The BiT-style ResNet stem of a hybrid model.

    Attributes:
        num_layers: units per stage, e.g. (3, 4, 9) for R50 as used by ViT. Empty means the
            root block (conv + max-pool, stride 4) only.
        width_factor: multiplies every stage width (64, 128, 256, ...).
    """

    num_layers: tuple[int, ...]
    width_factor: int = 1


@dataclass(frozen=True)
class ViTConfig:
    """Hyper-parameters of one Vision Transformer.

    Attributes:
        name: registry key.
        patch_size: (height, width) of a patch, in pixels of the ViT input (for hybrids: in
            cells of the ResNet feature map).
        hidden_size: token width D.
        mlp_dim: hidden width of the MLP block.
        num_heads: attention heads.
        num_layers: encoder blocks.
        dropout_rate: dropout on embeddings, attention output and MLP.
        attention_dropout_rate: dropout on the attention probabilities.
        classifier: "token" (class token) or "gap" (mean of all tokens).
        representation_size: width of the Dense + tanh `pre_logits` layer, or None for none.
        resnet: the hybrid stem, or None for a plain ViT.
    """

    name: str
    patch_size: tuple[int, int]
    hidden_size: int
    mlp_dim: int
    num_heads: int
    num_layers: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    classifier: str = "token"
    representation_size: int | None = None
    resnet: ResNetConfig | None = None

    def __post_init__(self) -> None:
        if self.classifier not in ("token", "gap"):
            raise ValueError(f"classifier must be 'token' or 'gap', got {self.classifier!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def stride(self) -> int:
        """Input pixels per patch token along each axis: the patch, times the ResNet's stride.

        The ResNet root (conv + max-pool) divides by 4 and every stage after the first by 2.
        """
        stride = self.patch_size[0]
        if self.resnet is not None:
            stride *= 4 * 2 ** max(len(self.resnet.num_layers) - 1, 0)
        return stride

    def replace(self, **changes) -> ViTConfig:
        """A copy with some fields changed (the registry entries themselves are frozen)."""
        return dataclasses.replace(self, **changes)


def _vit(name: str, patch: int, hidden: int, mlp: int, heads: int, layers: int, **kw) -> ViTConfig:
    return ViTConfig(name, (patch, patch), hidden, mlp, heads, layers, **kw)


def _build_registry() -> dict[str, ViTConfig]:
    ti16 = _vit("ViT-Ti_16", 16, 192, 768, 3, 12)
    s16 = _vit("ViT-S_16", 16, 384, 1536, 6, 12)
    s32 = s16.replace(name="ViT-S_32", patch_size=(32, 32))
    b16 = _vit("ViT-B_16", 16, 768, 3072, 12, 12)
    b32 = b16.replace(name="ViT-B_32", patch_size=(32, 32))
    l16 = _vit("ViT-L_16", 16, 1024, 4096, 16, 24, dropout_rate=0.1)
    configs = [
        # Not official. Tiny but non-degenerate (several heads and layers, dropout on): tests.
        _vit("testing", 16, 16, 32, 2, 2, dropout_rate=0.1),
        # Not official. A small ViT that `make demo` trains from scratch on 8x8 digits
        # upscaled to 32x32 (a 4x4 grid of 8x8 patches) on a CPU in a few minutes.
        _vit("demo", 8, 64, 128, 4, 4),
        ti16,
        s16,
        s32,
        b16,
        b32,
        b16.replace(name="ViT-B_8", patch_size=(8, 8)),
        l16,
        l16.replace(name="ViT-L_32", patch_size=(32, 32), dropout_rate=0.0),
        _vit("ViT-H_14", 14, 1280, 5120, 16, 32, dropout_rate=0.1),
        # Mean of all tokens, no class token and no pre_logits: the GSAM checkpoints.
        *(c.replace(name=f"{c.name}-gap-norep", classifier="gap") for c in (s16, b16, s32, b32)),
        # Hybrids: the ResNet does the downsampling, so the ViT "patch" is one feature cell.
        # The root alone has stride 4: R+ViT-Ti_16 then takes 8x8 patches of its 64 channels.
        ti16.replace(name="R+ViT-Ti_16", patch_size=(8, 8), resnet=ResNetConfig(())),
        b16.replace(
            name="R50+ViT-B_16",
            patch_size=(1, 1),
            dropout_rate=0.1,
            resnet=ResNetConfig((3, 4, 9)),
        ),
        b32.replace(name="R26+ViT-B_32", patch_size=(1, 1), resnet=ResNetConfig((2, 2, 2, 2))),
        # vit_jax builds it from the S_16 config: (2, 2, 2, 2) stages give the stride 32.
        s16.replace(name="R26+ViT-S_32", patch_size=(1, 1), resnet=ResNetConfig((2, 2, 2, 2))),
        l16.replace(
            name="R50+ViT-L_32",
            patch_size=(1, 1),
            resnet=ResNetConfig((3, 4, 6, 3)),
        ),
    ]
    return {c.name: c for c in configs}


CONFIGS: dict[str, ViTConfig] = _build_registry()

# Models without AugReg checkpoints; vit_jax/configs/models.py leaves them out of its AugReg table.
_NO_AUGREG = ("testing", "demo", "ViT-L_32", "ViT-H_14", "R50+ViT-B_16")


def augreg_name(model: str) -> str:
    """The AugReg spelling of a registry name, as AugReg file names begin.

    `ViT-` removed and `+` -> `_` (vit_jax/configs/models.py): `ViT-B_16` -> `B_16`,
    `R+ViT-Ti_16` -> `R_Ti_16`.
    """
    return model.replace("ViT-", "").replace("+", "_")


# AugReg spelling -> registry name, for the models that have AugReg checkpoints.
AUGREG_MODELS: dict[str, str] = {
    augreg_name(name): name
    for name, c in CONFIGS.items()
    if name not in _NO_AUGREG and c.classifier == "token"
}

# Other spellings users type: the original PyTorch port wrote the hybrid with a dash; AugReg
# file names and vit_jax's `configs/augreg.py` use `B_16`, `R26_S_32`, ...
ALIASES: dict[str, str] = {"R50-ViT-B_16": "R50+ViT-B_16", **AUGREG_MODELS}

# vit_jax/configs/augreg.py fine-tunes AugReg checkpoints without dropout ("No AugReg during
# fine-tuning"), whatever rate the model's config has.
AUGREG_DROPOUT = 0.0


def model_names() -> list[str]:
    """Every accepted model name (registry keys, then aliases), for CLI `choices`."""
    return [*CONFIGS, *ALIASES]


def get_config(name: str) -> ViTConfig:
    """The registered config called `name` (aliases accepted).

    Raises:
        ConfigError: with the list of known names when `name` is not registered.
    """
    key = ALIASES.get(name, name)
    if key not in CONFIGS:
        raise ConfigError(
            f"unknown model type {name!r}; choose one of: {', '.join(model_names())}"
        )
    return CONFIGS[key]


def to_pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An image size given as an int (square) or (height, width), as (height, width)."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def is_whole(value: Any, least: int) -> bool:
    """Whether `value` is a whole number (not a bool, not a float) of at least `least`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def is_size(value: Any) -> bool:
    """Whether `value` is an image or patch size as a file may state it: a positive whole
    number, or a [height, width] pair of them."""
    return is_whole(value, 1) or (
        isinstance(value, list) and len(value) == 2 and all(is_whole(v, 1) for v in value)
    )


def checked_img_size(
    config: ViTConfig, img_size: int | tuple[int, int] | list[int]
) -> tuple[int, int]:
    """`img_size` as (height, width), refused unless a plain ViT sees whole patches.

    Raises:
        ConfigError: a side is not positive, or not a multiple of the patch size (hybrids take
            any size).
    """
    height, width = to_pair(img_size)
    ph, pw = config.patch_size
    if height < 1 or width < 1:
        raise ConfigError(f"--img_size must be positive, got {img_size}.")
    if config.resnet is None and (height % ph or width % pw):
        shown = height if height == width else f"{height}x{width}"
        raise ConfigError(
            f"--img_size {shown} is not divisible by the {ph}x{pw} patches of {config.name}; "
            f"use a multiple of {ph}, e.g. {max(ph, height // ph * ph)}."
        )
    return height, width


def find_config(
    hidden_size: int,
    num_layers: int,
    patch_size: tuple[int, int],
    resnet_layers: tuple[int, ...] | None,
    exclude: tuple[str, ...] = (),
    classifier: str | None = None,
) -> str | None:
    """The registry name of the architecture with these shapes (from a checkpoint), or None.

    `classifier` ("token" when the checkpoint has a class token, else "gap") tells `ViT-S_16`
    from `ViT-S_16-gap-norep`; None takes the first match.
    """
    wanted = (hidden_size, num_layers, tuple(patch_size), resnet_layers)
    for name, c in CONFIGS.items():
        resnet = c.resnet.num_layers if c.resnet is not None else None
        if (
            name not in exclude
            and (c.hidden_size, c.num_layers, c.patch_size, resnet) == wanted
            and classifier in (None, c.classifier)
        ):
            return name
    return None


# ---------------------------------------------------------------------------------------------
# File names

# Folders of the official bucket (`vit_models/<folder>/<file>.npz`). A local copy may carry its
# folder as a prefix (`sam_ViT-B_16.npz`), since several folders use the same file names.
CHECKPOINT_FOLDERS = ("imagenet21k", "imagenet21k+imagenet2012", "augreg", "sam", "gsam")
# The GSAM files are named like the plain model but hold its `gap` variant (big_vision's
# configs/proj/gsam: pool_type="gap", rep_size=False).
_GAP_FOLDER = "gsam"
# AugReg: `<model>-<pre-training data>-300ep-lr_...`, fine-tuned `...--<dataset>-steps_...`.
_AUGREG_FILE = re.compile(r"(?P<model>[A-Za-z0-9_]+)-(?:i1k|i21k|i21k_\d+)-")


def _split_filename(path: str | os.PathLike) -> tuple[str | None, str]:
    """(bucket folder or None, file stem) of a checkpoint path."""
    *parents, name = re.split(r"[\\/]", os.fspath(path))
    folder = parents[-1] if parents and parents[-1] in CHECKPOINT_FOLDERS else None
    stem = name.removesuffix(".npz")
    for prefix in sorted(CHECKPOINT_FOLDERS, key=len, reverse=True):
        if stem.startswith(f"{prefix}_"):
            return prefix, stem[len(prefix) + 1 :]
    return folder, stem


def is_augreg_filename(path: str | os.PathLike) -> bool:
    """Whether `path` names an AugReg checkpoint (`B_16-i21k-300ep-lr_0.001-...npz`).

    vit_jax fine-tunes those with dropout 0 (see `AUGREG_DROPOUT`).
    """
    match = _AUGREG_FILE.match(_split_filename(path)[1])
    return match is not None and match["model"] in AUGREG_MODELS


def model_type_from_filename(path: str | os.PathLike) -> str | None:
    """The registry name an official or AugReg checkpoint file name stands for, or None.

    Reads `ViT-B_16.npz`, `R50+ViT-B_16.npz` (or `R50-ViT-B_16.npz`), `ViT-B_16-224.npz`, a
    source folder as prefix or parent (`imagenet21k+imagenet2012_ViT-B_16.npz`,
    `gsam/ViT-B_16.npz`: the GSAM files hold `gap` models) and AugReg names
    (`B_16-i21k-300ep-...npz`, `R26_S_32-i21k-...--imagenet2012-...-res_384.npz`). Pure: the
    file need not exist.
    """
    folder, stem = _split_filename(path)
    augreg = _AUGREG_FILE.match(stem)
    if augreg:
        model = AUGREG_MODELS.get(augreg["model"])
    else:
        # Official names, optionally with the fine-tuning resolution (`ViT-B_16-224`).
        model = ALIASES.get(stem, stem)
        if model not in CONFIGS and re.fullmatch(r".+-\d+", stem):
            base = stem.rsplit("-", 1)[0]
            model = ALIASES.get(base, base)
    if model not in CONFIGS:
        return None
    if folder == _GAP_FOLDER and f"{model}-gap-norep" in CONFIGS:
        return f"{model}-gap-norep"
    return model
