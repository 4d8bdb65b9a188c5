"""The model registry: official hyper-parameters and exact parameter counts."""

import dataclasses

import pytest
import torch

from models.configs import CONFIGS, get_config, model_names
from models.modeling import VisionTransformer

# Parameters with a 1000-class head at 224 (no pre_logits). ViT-B_16 and R50+ViT-B_16 are the
# official figures (REFERENCE.md §2); the plain ViTs also equal timm's published counts.
PARAM_COUNTS = {
    "testing": 36_952,
    "demo": 261_672,
    "ViT-Ti_16": 5_717_416,
    "ViT-S_16": 22_050_664,
    "ViT-S_32": 22_878_952,
    "ViT-B_16": 86_567_656,
    "ViT-B_32": 88_224_232,
    "ViT-B_8": 86_576_872,
    "ViT-L_16": 304_326_632,
    "ViT-L_32": 306_535_400,
    "ViT-H_14": 632_045_800,
    "R50+ViT-B_16": 98_659_112,
    "R26+ViT-B_32": 101_383_976,
    "R50+ViT-L_32": 328_994_856,
}

# (hidden, mlp, heads, layers, patch, dropout) from REFERENCE.md §2.
OFFICIAL = {
    "ViT-Ti_16": (192, 768, 3, 12, 16, 0.0),
    "ViT-S_16": (384, 1536, 6, 12, 16, 0.0),
    "ViT-S_32": (384, 1536, 6, 12, 32, 0.0),
    "ViT-B_16": (768, 3072, 12, 12, 16, 0.0),
    "ViT-B_32": (768, 3072, 12, 12, 32, 0.0),
    "ViT-B_8": (768, 3072, 12, 12, 8, 0.0),
    "ViT-L_16": (1024, 4096, 16, 24, 16, 0.1),
    "ViT-L_32": (1024, 4096, 16, 24, 32, 0.0),
    "ViT-H_14": (1280, 5120, 16, 32, 14, 0.1),
    "R50+ViT-B_16": (768, 3072, 12, 12, 1, 0.1),
    "R26+ViT-B_32": (768, 3072, 12, 12, 1, 0.0),
    "R50+ViT-L_32": (1024, 4096, 16, 24, 1, 0.1),
}

RESNETS = {"R50+ViT-B_16": (3, 4, 9), "R26+ViT-B_32": (2, 2, 2, 2), "R50+ViT-L_32": (3, 4, 6, 3)}


def test_every_config_has_a_parameter_count() -> None:
    assert set(PARAM_COUNTS) == set(CONFIGS), "add the new config to PARAM_COUNTS"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_count(name: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = VisionTransformer(CONFIGS[name], img_size=224, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_hyper_parameters(name: str) -> None:
    c = get_config(name)
    hidden, mlp, heads, layers, patch, dropout = OFFICIAL[name]
    assert (c.hidden_size, c.mlp_dim, c.num_heads, c.num_layers) == (hidden, mlp, heads, layers)
    assert c.patch_size == (patch, patch)
    assert c.dropout_rate == dropout
    assert c.attention_dropout_rate == 0.0
    assert c.classifier == "token"
    assert c.representation_size is None
    expected_resnet = RESNETS.get(name)
    assert (c.resnet.num_layers if c.resnet else None) == expected_resnet


def test_hybrid_spellings_and_choices() -> None:
    assert get_config("R50-ViT-B_16") is get_config("R50+ViT-B_16")
    assert "R50-ViT-B_16" in model_names()
    assert set(CONFIGS) <= set(model_names())


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(KeyError, match="ViT-B_16"):
        get_config("ViT-X_99")


def test_configs_are_frozen_and_validated() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_config("ViT-B_16").hidden_size = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="classifier"):
        get_config("testing").replace(classifier="mean")
    with pytest.raises(ValueError, match="divisible"):
        get_config("testing").replace(num_heads=3)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_stride_gives_the_patch_grid_of_the_model(name: str) -> None:
    config = get_config(name)
    with torch.device("meta"):  # shapes only: even ViT-H_14 costs nothing
        model = VisionTransformer(config, 4 * config.stride, num_classes=2)
    assert model.grid_size == (4, 4)
