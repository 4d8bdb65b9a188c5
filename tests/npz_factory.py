"""Fake checkpoints in the exact official `.npz` layout, written independently of the converter.

The key names and array shapes follow REFERENCE.md §1 (vit_jax layout; big_vision/AugReg
naming on request). Values are random, so every tensor is distinguishable.
"""

from __future__ import annotations

import math

import numpy as np

from models.configs import ViTConfig

VIT_JAX = ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
BIG_VISION = ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")


def official_grid(config: ViTConfig, img_size: int | tuple[int, int]) -> tuple[int, int]:
    """Patch grid by the official arithmetic: SAME stride-2 steps in the ResNet, then VALID."""
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    if config.resnet is not None:
        for _ in range(2 + max(len(config.resnet.num_layers) - 1, 0)):
            height, width = math.ceil(height / 2), math.ceil(width / 2)
    return height // config.patch_size[0], width // config.patch_size[1]


def fake_checkpoint(
    config: ViTConfig,
    num_classes: int = 10,
    img_size: int | tuple[int, int] = 224,
    seed: int = 0,
    block_names: tuple[str, str, str, str] = VIT_JAX,
    gn_shape_4d: bool = True,
    representation_size: int | None = None,
    prefix: str = "",
) -> dict[str, np.ndarray]:
    """Random arrays keyed and shaped exactly as an official checkpoint for `config`."""
    rng = np.random.default_rng(seed)
    d, heads, hd, mlp = config.hidden_size, config.num_heads, config.head_dim, config.mlp_dim

    def arr(*shape: int, scale: float = 0.1, offset: float = 0.0) -> np.ndarray:
        return (offset + scale * rng.standard_normal(shape)).astype(np.float32)

    w: dict[str, np.ndarray] = {}
    in_channels = 3
    if config.resnet is not None:
        width = 64 * config.resnet.width_factor

        def gn(name: str, channels: int) -> None:
            shape = (1, 1, 1, channels) if gn_shape_4d else (channels,)
            w[f"{name}/scale"] = arr(*shape, offset=1.0)
            w[f"{name}/bias"] = arr(*shape)

        w["conv_root/kernel"] = arr(7, 7, 3, width)
        gn("gn_root", width)
        in_channels = width
        for b, units in enumerate(config.resnet.num_layers, start=1):
            features = width * 2 ** (b - 1)
            for u in range(1, units + 1):
                unit = f"block{b}/unit{u}"
                unit_in = in_channels if u == 1 else 4 * features
                w[f"{unit}/conv1/kernel"] = arr(1, 1, unit_in, features)
                w[f"{unit}/conv2/kernel"] = arr(3, 3, features, features)
                w[f"{unit}/conv3/kernel"] = arr(1, 1, features, 4 * features)
                for n in (1, 2, 3):
                    gn(f"{unit}/gn{n}", 4 * features if n == 3 else features)
                if u == 1 and (b > 1 or unit_in != 4 * features):
                    w[f"{unit}/conv_proj/kernel"] = arr(1, 1, unit_in, 4 * features)
                    gn(f"{unit}/gn_proj", 4 * features)
            in_channels = 4 * features
    ph, pw = config.patch_size
    w["embedding/kernel"] = arr(ph, pw, in_channels, d)
    w["embedding/bias"] = arr(d)
    gh, gw = official_grid(config, img_size)
    prefix_tokens = 1 if config.classifier == "token" else 0
    if prefix_tokens:
        w["cls"] = arr(1, 1, d)
    w["Transformer/posembed_input/pos_embedding"] = arr(1, prefix_tokens + gh * gw, d)
    ln1, attn, ln2, mlp_name = block_names
    for i in range(config.num_layers):
        blk = f"Transformer/encoderblock_{i}"
        for ln in (ln1, ln2):
            w[f"{blk}/{ln}/scale"] = arr(d, offset=1.0)
            w[f"{blk}/{ln}/bias"] = arr(d)
        for part in ("query", "key", "value"):
            w[f"{blk}/{attn}/{part}/kernel"] = arr(d, heads, hd)
            w[f"{blk}/{attn}/{part}/bias"] = arr(heads, hd)
        w[f"{blk}/{attn}/out/kernel"] = arr(heads, hd, d)
        w[f"{blk}/{attn}/out/bias"] = arr(d)
        w[f"{blk}/{mlp_name}/Dense_0/kernel"] = arr(d, mlp)
        w[f"{blk}/{mlp_name}/Dense_0/bias"] = arr(mlp)
        w[f"{blk}/{mlp_name}/Dense_1/kernel"] = arr(mlp, d)
        w[f"{blk}/{mlp_name}/Dense_1/bias"] = arr(d)
    w["Transformer/encoder_norm/scale"] = arr(d, offset=1.0)
    w["Transformer/encoder_norm/bias"] = arr(d)
    head_in = d
    if representation_size:
        w["pre_logits/kernel"] = arr(d, representation_size)
        w["pre_logits/bias"] = arr(representation_size)
        head_in = representation_size
    w["head/kernel"] = arr(head_in, num_classes)
    w["head/bias"] = arr(num_classes)
    return {prefix + k: v for k, v in w.items()}
