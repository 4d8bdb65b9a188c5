"""Model registry: the official ViT and hybrid configurations.

Mirrors the model configs of Google's `vit_jax/configs/models.py` (ViT paper, Table 1 and
Appendix; hybrid details in Section 3.1). Every entry is a frozen dataclass keyed by the name
the official checkpoints use (`ViT-B_16`, `R50+ViT-B_16`, ...). The CLI takes its choices from
:data:`CONFIGS`, never from a second list.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = [
    "ALIASES",
    "CONFIGS",
    "ConfigError",
    "ResNetConfig",
    "ViTConfig",
    "checked_img_size",
    "find_config",
    "get_config",
    "model_names",
    "to_pair",
]


class ConfigError(ValueError):
    """A setting the model cannot take (e.g. an image size); the message says what to use.

    Command-line entry points print its message and exit with code 2 (`utils.errors.run_cli`).
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
    b16 = _vit("ViT-B_16", 16, 768, 3072, 12, 12)
    l16 = _vit("ViT-L_16", 16, 1024, 4096, 16, 24, dropout_rate=0.1)
    configs = [
        # Not official. Tiny but non-degenerate (several heads and layers, dropout on): tests.
        _vit("testing", 16, 16, 32, 2, 2, dropout_rate=0.1),
        # Not official. A small ViT that `make demo` trains from scratch on 8x8 digits
        # upscaled to 32x32 (a 4x4 grid of 8x8 patches) on a CPU in a few minutes.
        _vit("demo", 8, 64, 128, 4, 4),
        _vit("ViT-Ti_16", 16, 192, 768, 3, 12),
        _vit("ViT-S_16", 16, 384, 1536, 6, 12),
        _vit("ViT-S_32", 32, 384, 1536, 6, 12),
        b16,
        b16.replace(name="ViT-B_32", patch_size=(32, 32)),
        b16.replace(name="ViT-B_8", patch_size=(8, 8)),
        l16,
        l16.replace(name="ViT-L_32", patch_size=(32, 32), dropout_rate=0.0),
        _vit("ViT-H_14", 14, 1280, 5120, 16, 32, dropout_rate=0.1),
        # Hybrids: the ResNet does the downsampling, so the ViT "patch" is one feature cell.
        b16.replace(
            name="R50+ViT-B_16",
            patch_size=(1, 1),
            dropout_rate=0.1,
            resnet=ResNetConfig((3, 4, 9)),
        ),
        b16.replace(
            name="R26+ViT-B_32",
            patch_size=(1, 1),
            resnet=ResNetConfig((2, 2, 2, 2)),
        ),
        l16.replace(
            name="R50+ViT-L_32",
            patch_size=(1, 1),
            resnet=ResNetConfig((3, 4, 6, 3)),
        ),
    ]
    return {c.name: c for c in configs}


CONFIGS: dict[str, ViTConfig] = _build_registry()

# Other spellings users type: the original PyTorch port wrote the hybrid with a dash.
ALIASES: dict[str, str] = {"R50-ViT-B_16": "R50+ViT-B_16"}


def model_names() -> list[str]:
    """Every accepted model name (registry keys, then aliases), for CLI `choices`."""
    return [*CONFIGS, *ALIASES]


def get_config(name: str) -> ViTConfig:
    """The registered config called `name` (aliases accepted).

    Raises:
        KeyError: with the list of known names when `name` is not registered.
    """
    key = ALIASES.get(name, name)
    if key not in CONFIGS:
        raise KeyError(f"unknown model type {name!r}; choose one of: {', '.join(model_names())}")
    return CONFIGS[key]


def to_pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An image size given as an int (square) or (height, width), as (height, width)."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def checked_img_size(
    config: ViTConfig, img_size: int | tuple[int, int] | list[int]
) -> tuple[int, int]:
    """`img_size` as (height, width), refused unless a plain ViT sees whole patches.

    Raises:
        ConfigError: a side is not a multiple of the patch size (hybrids take any size).
    """
    height, width = to_pair(img_size)
    ph, pw = config.patch_size
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
) -> str | None:
    """The registry name of the architecture with these shapes (from a checkpoint), or None."""
    wanted = (hidden_size, num_layers, tuple(patch_size), resnet_layers)
    for name, c in CONFIGS.items():
        resnet = c.resnet.num_layers if c.resnet is not None else None
        if name not in exclude and (c.hidden_size, c.num_layers, c.patch_size, resnet) == wanted:
            return name
    return None
