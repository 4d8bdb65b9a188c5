"""The ResNet stem of the hybrid ViT (R50+ViT-B_16 and friends).

Follows `vit_jax/models_resnet.py` (ViT paper, Section 3.1 "Hybrid Architecture"): a BiT-style
ResNet with weight-standardised convolutions, GroupNorm(32, eps=1e-6) everywhere, and TensorFlow
`SAME` padding. Despite the ResNetV2 name the units are post-activation bottlenecks, with the
stride on the 3x3 convolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.configs import ResNetConfig

__all__ = ["ResNetV2", "StdConv2d", "max_pool_same", "same_output_size", "same_padding"]

GN_GROUPS = 32
GN_EPS = 1e-6
WS_EPS = 1e-5


def same_output_size(size: int, stride: int) -> int:
    """Output length of a TensorFlow `SAME` convolution or pooling along one axis."""
    return math.ceil(size / stride)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TensorFlow `SAME`: the odd pixel goes after (bottom/right)."""
    total = max((same_output_size(size, stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom), value=value)
    return x


def _pool_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of `F.max_pool2d(..., ceil_mode=True)` (PyTorch's rule)."""
    out = math.ceil((size + 2 * padding - kernel) / stride) + 1
    return out - 1 if (out - 1) * stride >= size + padding else out


def max_pool_same(x: torch.Tensor, kernel: int = 3, stride: int = 2) -> torch.Tensor:
    """Max-pool with TensorFlow `SAME` padding (padded cells never win, as with -inf).

    `SAME` pads `before` cells in front and `before` or `before + 1` behind. PyTorch's own
    padding pads `before` on both sides and `ceil_mode` lets the last window run one cell past
    the end, both ignored by the max: the same windows, without copying the input into a padded
    tensor. Other cases fall back to an explicit -inf pad.
    """
    # Plain ints: max_pool2d's padding must be a constant, also in a traced (ONNX) graph.
    sizes = [int(size) for size in x.shape[-2:]]
    pads = [same_padding(size, kernel, stride) for size in sizes]
    fits = all(
        after - before in (0, 1)
        and before <= kernel // 2
        and _pool_output_size(size, kernel, stride, before) == same_output_size(size, stride)
        for size, (before, after) in zip(sizes, pads, strict=True)
    )
    if fits:
        return F.max_pool2d(x, kernel, stride, padding=[b for b, _ in pads], ceil_mode=True)
    return F.max_pool2d(_pad_same(x, kernel, stride, value=float("-inf")), kernel, stride)


class StdConv2d(nn.Conv2d):
    """Bias-free conv with weight standardisation and `SAME` padding.

    Each output filter is standardised over (in, kh, kw): `(w - mean) / (std + 1e-5)` with the
    biased std, as `vit_jax.models_resnet.StdConv` does (eps on the std, not the variance).
    `SAME` padding is symmetric for stride 1 and an odd kernel; the convolution pads itself
    then, without copying the input into a padded tensor.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        static = stride == 1 and kernel_size % 2 == 1
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2 if static else 0,
            bias=False,
        )
        self.pad_input = not static

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        std, mean = torch.std_mean(w, dim=(1, 2, 3), correction=0, keepdim=True)
        w = (w - mean) / (std + WS_EPS)
        if self.pad_input:
            x = _pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, w, None, self.stride, self.padding)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GN_GROUPS, channels, eps=GN_EPS)


class Bottleneck(nn.Module):
    """One unit: 1x1 -> 3x3 (stride) -> 1x1 (4x features), each with GroupNorm, plus shortcut."""

    def __init__(self, in_channels: int, features: int, stride: int):
        super().__init__()
        out_channels = 4 * features
        self.conv1 = StdConv2d(in_channels, features, 1)
        self.gn1 = _group_norm(features)
        self.conv2 = StdConv2d(features, features, 3, stride)
        self.gn2 = _group_norm(features)
        self.conv3 = StdConv2d(features, out_channels, 1)
        self.gn3 = _group_norm(out_channels)
        self.has_proj = in_channels != out_channels or stride != 1
        if self.has_proj:
            self.conv_proj = StdConv2d(in_channels, out_channels, 1, stride)
            self.gn_proj = _group_norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.gn_proj(self.conv_proj(x)) if self.has_proj else x
        # One layer per statement, so that each input is freed as soon as it is used up; ReLU
        # and the sum in place: GroupNorm's backward needs its input, not its output.
        y = self.conv1(x)
        y = F.relu(self.gn1(y), inplace=True)
        y = self.conv2(y)
        y = F.relu(self.gn2(y), inplace=True)
        y = self.conv3(y)
        y = self.gn3(y)
        return F.relu(y.add_(residual), inplace=True)


class Stage(nn.Module):
    """`block{b}` of the checkpoint: units `unit1..unitN`, the first one strided."""

    def __init__(self, in_channels: int, features: int, num_units: int, stride: int):
        super().__init__()
        self.units = nn.ModuleList(
            Bottleneck(in_channels if i == 0 else 4 * features, features, stride if i == 0 else 1)
            for i in range(num_units)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return x


class ResNetV2(nn.Module):
    """Root (7x7/2 conv, GN, ReLU, 3x3/2 max-pool) then stages; stride 4 * 2**(stages - 1)."""

    def __init__(self, config: ResNetConfig, in_channels: int = 3):
        super().__init__()
        width = 64 * config.width_factor
        self.conv_root = StdConv2d(in_channels, width, 7, stride=2)
        self.gn_root = _group_norm(width)
        self.stages = nn.ModuleList()
        channels = width
        for b, units in enumerate(config.num_layers):
            features = width * 2**b
            self.stages.append(Stage(channels, features, units, stride=1 if b == 0 else 2))
            channels = 4 * features
        self.out_channels = channels
        self.num_downsamples = 2 + max(len(config.num_layers) - 1, 0)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the feature map for an input of (height, width)."""
        for _ in range(self.num_downsamples):
            height, width = same_output_size(height, 2), same_output_size(width, 2)
        return height, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn_root(self.conv_root(x)), inplace=True)  # (B, C, H/2, W/2)
        x = max_pool_same(x)  # (B, C, H/4, W/4)
        for stage in self.stages:
            x = stage(x)
        return x
