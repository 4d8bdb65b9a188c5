"""The Vision Transformer (Dosovitskiy et al., ICLR 2021), as Google's official model computes it.

Follows `vit_jax/models_vit.py` (paper Section 3.1, Eq. 1-4): pre-norm encoder blocks with
LayerNorm eps 1e-6, tanh-approximated GELU (Flax's `nn.gelu`), dropout where Flax puts it,
`token` or `gap` classifier and an optional Dense + tanh `pre_logits` layer. Keeps the public
API of the original PyTorch port: `VisionTransformer(config, img_size, num_classes, zero_head,
vis)`, `model(x) -> (logits, attn_weights)`, `model(x, labels) -> loss`, `model.load_from(npz)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.configs import CONFIGS, ConfigError, ViTConfig, get_config, to_pair
from models.modeling_resnet import ResNetV2
from models.npz import load_pretrained

__all__ = ["CONFIGS", "VisionTransformer"]

LN_EPS = 1e-6


class Attention(nn.Module):
    """Multi-head self-attention with a fused path and an explicit one that returns the maps."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.attn_dropout = config.attention_dropout_rate
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, x: torch.Tensor, need_weights: bool = False, num_outputs: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend; with `num_outputs`, only the first that many tokens are queries (outputs)."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim)
        # Unbinding the "3" axis (not a permuted copy) lets the backward pass stack the three
        # gradients straight into the (B, N, 3, heads, head_dim) layout of `qkv`: one copy less.
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (B, heads, N, head_dim)
        if num_outputs is not None:
            q = q[:, :, :num_outputs]  # (B, heads, Q, head_dim)
        dropout = self.attn_dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, heads, Q, N)
            probs = scores.softmax(dim=-1)
            out = F.dropout(probs, dropout, self.training) @ v  # (B, heads, Q, head_dim)
        else:
            probs = None
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(batch, -1, dim)  # (B, Q, D)
        return self.proj(out), probs


class Mlp(nn.Module):
    """Dense(mlp_dim) -> tanh GELU -> Dropout -> Dense(hidden) -> Dropout."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.gelu(self.fc1(x), approximate="tanh"))
        return self.dropout(self.fc2(x))


class Block(nn.Module):
    """Pre-norm encoder block: x + Dropout(Attn(LN(x))), then x + MLP(LN(x))."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=LN_EPS)
        self.attn = Attention(config)
        # The official model uses dropout_rate here; the original port wrongly used the
        # attention dropout rate.
        self.dropout = nn.Dropout(config.dropout_rate)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=LN_EPS)
        self.mlp = Mlp(config)

    def forward(
        self, x: torch.Tensor, need_weights: bool = False, num_outputs: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, N, D) -> (B, N, D), or (B, num_outputs, D): the first tokens only."""
        attended, probs = self.attn(self.norm1(x), need_weights, num_outputs)
        if num_outputs is not None:
            x = x[:, :num_outputs]  # (B, num_outputs, D)
        x = x + self.dropout(attended)
        del attended  # free it before the MLP runs (nothing needs it for backward either)
        x = x + self.mlp(self.norm2(x))
        return x, probs


class Embeddings(nn.Module):
    """Image -> tokens: optional ResNet stem, patch conv, class token, position embeddings."""

    def __init__(self, config: ViTConfig, img_size: tuple[int, int], in_channels: int = 3):
        super().__init__()
        height, width = img_size
        if config.resnet is not None:
            self.backbone = ResNetV2(config.resnet, in_channels)
            in_channels = self.backbone.out_channels
            height, width = self.backbone.output_size(height, width)
        else:
            self.backbone = None
        patch_h, patch_w = config.patch_size
        if height < patch_h or width < patch_w:
            raise ConfigError(
                f"image size {img_size} gives a {height}x{width} input to the patch embedding, "
                f"smaller than one {patch_h}x{patch_w} patch of {config.name}"
            )
        self.grid_size = (height // patch_h, width // patch_w)
        self.num_prefix_tokens = 1 if config.classifier == "token" else 0
        num_tokens = self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens
        self.patch_embed = nn.Conv2d(
            in_channels, config.hidden_size, config.patch_size, stride=config.patch_size
        )
        if self.num_prefix_tokens:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        else:
            self.register_parameter("cls_token", None)
        self.pos_embed = nn.Parameter(torch.empty(1, num_tokens, config.hidden_size))
        nn.init.normal_(self.pos_embed, std=0.02)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone is not None:
            x = self.backbone(x)  # (B, C, H', W')
        x = self.patch_embed(x)  # (B, D, gh, gw)
        x = x.flatten(2).transpose(1, 2)  # (B, gh * gw, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N, D)
        return self.dropout(x + self.pos_embed)


class Encoder(nn.Module):
    """The encoder blocks followed by the final LayerNorm (`encoder_norm`).

    With `grad_checkpointing`, a training forward pass keeps only each block's input; the
    block runs again in the backward pass (as big_vision's `remat_policy`). The random state is
    restored for that second run, so dropout draws the same masks and the gradients are those
    of the plain pass; the cost is one more forward pass of the blocks.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=LN_EPS)
        self.grad_checkpointing = False

    def forward(
        self, x: torch.Tensor, need_weights: bool = False, num_outputs: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode (B, N, D) tokens.

        Args:
            x: the embedded tokens.
            need_weights: also return each block's attention probabilities.
            num_outputs: return only the first that many tokens. The last block then computes
                nothing else (its attention queries, projection and MLP for the other tokens
                feed no output). For the class token of ViT-B_16 at 224 that is 6% fewer
                FLOPs (35.1 -> 32.9 GFLOP per image).
        """
        maps = []
        last = len(self.blocks) - 1
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            outputs = num_outputs if i == last else None
            if recompute:
                x, probs = checkpoint(
                    block, x, need_weights, outputs, use_reentrant=False, preserve_rng_state=True
                )
            else:
                x, probs = block(x, need_weights, outputs)
            if need_weights:
                maps.append(probs)
        return self.norm(x), maps


class VisionTransformer(nn.Module):
    """ViT classifier with the original PyTorch port's interface.

    Args:
        config: a registry entry or its name (see `models.configs.CONFIGS`).
        img_size: input size, an int or (height, width).
        num_classes: classifier outputs.
        zero_head: start the head at zero and do not load it in `load_from` (fine-tuning).
        vis: return each layer's attention probabilities, (B, heads, N, N), from `forward`.
    """

    def __init__(
        self,
        config: ViTConfig | str,
        img_size: int | tuple[int, int] = 224,
        num_classes: int = 21843,
        zero_head: bool = False,
        vis: bool = False,
    ):
        super().__init__()
        self.config = get_config(config) if isinstance(config, str) else config
        self.img_size = to_pair(img_size)
        self.num_classes = num_classes
        self.zero_head = zero_head
        self.vis = vis
        self.embeddings = Embeddings(self.config, self.img_size)
        self.encoder = Encoder(self.config)
        width = self.config.hidden_size
        if self.config.representation_size:
            self.pre_logits = nn.Linear(width, self.config.representation_size)
            width = self.config.representation_size
        else:
            self.pre_logits = None
        self.head = nn.Linear(width, num_classes)
        self._init_weights()

    @classmethod
    def empty(cls, config: ViTConfig | str, *args, **kwargs) -> VisionTransformer:
        """A model whose parameters are allocated but not initialised, to load a checkpoint into.

        Takes the constructor's arguments. Skips the random initialisation (half the time of
        building and loading ViT-B_16), which a strict load overwrites anyway.
        """
        with torch.device("meta"):
            model = cls(config, *args, **kwargs)
        return model.to_empty(device="cpu")

    @classmethod
    def from_pretrained(
        cls, config: ViTConfig | str, weights: Mapping[str, np.ndarray], *args, **kwargs
    ) -> VisionTransformer:
        """Build a model and load an official checkpoint (`np.load(path)`) into it.

        Takes the constructor's arguments after `weights`; the same as constructing and calling
        `load_from`, without the random initialisation the checkpoint overwrites.
        """
        model = cls.empty(config, *args, **kwargs)
        model.load_from(weights)
        return model

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the encoder blocks in the backward pass instead of keeping their
        activations (timm's name for it): less memory, one more forward pass of the blocks, the
        same gradients."""
        self.encoder.grad_checkpointing = enable

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, cols) of patch tokens."""
        return self.embeddings.grid_size

    def _init_weights(self) -> None:
        # As vit_jax: Xavier-uniform dense kernels with tiny biases, LeCun-normal patch kernel.
        for module in self.encoder.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.normal_(module.bias, std=1e-6)
        conv = self.embeddings.patch_embed
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        nn.init.trunc_normal_(conv.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(conv.bias)
        if self.pre_logits is not None:
            nn.init.xavier_uniform_(self.pre_logits.weight)
            nn.init.zeros_(self.pre_logits.bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward_features(
        self, x: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image (B, 3, H, W) -> pooled representation (B, D') and attention maps."""
        # The `token` classifier reads the class token only: the last block computes just that
        # one, unless the (full) attention maps are wanted.
        only_cls = self.config.classifier == "token" and not need_weights
        tokens, maps = self.encoder(
            self.embeddings(x), need_weights, num_outputs=1 if only_cls else None
        )  # (B, N, D) or (B, 1, D)
        pooled = tokens[:, 0] if self.config.classifier == "token" else tokens.mean(dim=1)
        if self.pre_logits is not None:
            pooled = torch.tanh(self.pre_logits(pooled))
        return pooled, maps

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        """`(logits, attn_weights)`, or the mean cross-entropy loss when `labels` are given."""
        pooled, maps = self.forward_features(x, need_weights=self.vis)
        logits = self.head(pooled)  # (B, num_classes)
        if labels is not None:
            return F.cross_entropy(logits.view(-1, self.num_classes), labels.view(-1))
        return logits, maps

    def load_from(self, weights: Mapping[str, np.ndarray]) -> None:
        """Load an official checkpoint: the mapping `np.load(path)` returns.

        The head is kept at zero when `zero_head` is set; position embeddings are resized to
        this model's grid. Raises `models.npz.CheckpointError` on a mismatch.
        """
        load_pretrained(self, weights, zero_head=self.zero_head)
