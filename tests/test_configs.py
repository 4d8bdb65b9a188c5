"""The model registry: official hyper-parameters, exact parameter counts, names and file names."""

import dataclasses
import functools

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import _load_weights as timm_load_npz
from torch import nn

from models.configs import (
    ALIASES,
    AUGREG_MODELS,
    CONFIGS,
    ConfigError,
    augreg_name,
    checked_img_size,
    find_config,
    get_config,
    is_augreg_filename,
    model_names,
    model_type_from_filename,
)
from models.modeling import VisionTransformer
from models.npz import guess_model_type
from tests.helpers import fake_checkpoint
from utils.infra.file_io import save_npz

# Parameters with a 1000-class head at 224 (no pre_logits): the figures of vit_jax's
# `models_test.py` (MODEL_SIZES) for every official model; `test_new_models_count_as_timm`
# checks the newer ones against timm's architectures as well.
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
    "ViT-S_16-gap-norep": 22_049_896,
    "ViT-B_16-gap-norep": 86_566_120,
    "ViT-S_32-gap-norep": 22_878_184,
    "ViT-B_32-gap-norep": 88_222_696,
    "R+ViT-Ti_16": 6_337_704,
    "R50+ViT-B_16": 98_659_112,
    "R26+ViT-B_32": 101_383_976,
    "R26+ViT-S_32": 36_431_912,
    "R50+ViT-L_32": 328_994_856,
}

# (hidden, mlp, heads, layers, patch, dropout) as vit_jax/configs/models.py defines them.
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
    "ViT-S_16-gap-norep": (384, 1536, 6, 12, 16, 0.0),
    "ViT-B_16-gap-norep": (768, 3072, 12, 12, 16, 0.0),
    "ViT-S_32-gap-norep": (384, 1536, 6, 12, 32, 0.0),
    "ViT-B_32-gap-norep": (768, 3072, 12, 12, 32, 0.0),
    "R+ViT-Ti_16": (192, 768, 3, 12, 8, 0.0),
    "R50+ViT-B_16": (768, 3072, 12, 12, 1, 0.1),
    "R26+ViT-B_32": (768, 3072, 12, 12, 1, 0.0),
    "R26+ViT-S_32": (384, 1536, 6, 12, 1, 0.0),
    "R50+ViT-L_32": (1024, 4096, 16, 24, 1, 0.1),
}

RESNETS = {
    "R+ViT-Ti_16": (),
    "R50+ViT-B_16": (3, 4, 9),
    "R26+ViT-B_32": (2, 2, 2, 2),
    "R26+ViT-S_32": (2, 2, 2, 2),
    "R50+ViT-L_32": (3, 4, 6, 3),
}

# timm's architecture for each newer model, configured as the official one (tanh GELU; `gap`:
# mean of all tokens after the final norm, no class token).
GAP = {"class_token": False, "global_pool": "avg", "fc_norm": False}
TIMM = {
    "R+ViT-Ti_16": ("vit_tiny_r_s16_p8_224", {}),
    "R26+ViT-S_32": ("vit_small_r26_s32_224", {}),
    "ViT-S_16-gap-norep": ("vit_small_patch16_224", GAP),
    "ViT-B_16-gap-norep": ("vit_base_patch16_224", GAP),
    "ViT-S_32-gap-norep": ("vit_small_patch32_224", GAP),
    "ViT-B_32-gap-norep": ("vit_base_patch32_224", GAP),
}


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
    assert c.classifier == ("gap" if name.endswith("-gap-norep") else "token")
    assert c.representation_size is None
    expected_resnet = RESNETS.get(name)
    assert (c.resnet.num_layers if c.resnet else None) == expected_resnet


def test_hybrid_spellings_and_choices() -> None:
    assert get_config("R50-ViT-B_16") is get_config("R50+ViT-B_16")
    assert "R50-ViT-B_16" in model_names()
    assert set(CONFIGS) <= set(model_names())


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="ViT-B_16"):
        get_config("ViT-X_99")


def test_configs_are_frozen_and_validated() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_config("ViT-B_16").hidden_size = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="classifier"):
        get_config("testing").replace(classifier="mean")
    with pytest.raises(ValueError, match="divisible"):
        get_config("testing").replace(num_heads=3)


@pytest.mark.parametrize("name", ["testing", "R50+ViT-B_16"])
@pytest.mark.parametrize("size", [0, -32, (32, 0)])
def test_an_image_size_that_is_not_positive_is_a_config_error(name: str, size) -> None:
    with pytest.raises(ConfigError, match="--img_size must be positive"):
        checked_img_size(get_config(name), size)


def test_an_image_smaller_than_one_patch_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="smaller than one 16x16 patch"):  # exit code 2
        VisionTransformer(get_config("testing"), 8, num_classes=2)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_stride_gives_the_patch_grid_of_the_model(name: str) -> None:
    config = get_config(name)
    with torch.device("meta"):  # shapes only: even ViT-H_14 costs nothing
        model = VisionTransformer(config, 4 * config.stride, num_classes=2)
    assert model.grid_size == (4, 4)


def _timm_model(name: str, **kw) -> nn.Module:
    timm_name, options = TIMM[name]
    return timm.create_model(timm_name, pretrained=False, **options, **kw)


@pytest.mark.parametrize("name", sorted(TIMM))
def test_new_models_count_as_timm(name: str) -> None:
    with torch.device("meta"):
        theirs = _timm_model(name, num_classes=1000)
    assert sum(p.numel() for p in theirs.parameters()) == PARAM_COUNTS[name]


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n.startswith("ViT-B") else n for n in sorted(TIMM)],
)
def test_new_models_load_official_layout_and_match_timm(tmp_path, name: str) -> None:
    config = get_config(name)
    img_size = 32 if config.patch_size == (16, 16) else 64  # a 2x2 grid: fast
    weights = fake_checkpoint(config, 7, img_size)
    path = tmp_path / "fake.npz"
    save_npz(path, weights)
    assert guess_model_type(weights) == name
    ours = VisionTransformer.from_pretrained(config, np.load(path), img_size, 7).eval()
    with torch.device("meta"):  # no random init: every tensor comes from the file
        theirs = _timm_model(
            name,
            img_size=img_size,
            num_classes=7,
            act_layer=functools.partial(nn.GELU, approximate="tanh"),
        ).eval()
    theirs.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in theirs.state_dict().values():
            tensor.fill_(float("nan"))  # what the file does not fill stays NaN
    timm_load_npz(theirs, str(path))
    assert not any(tensor.isnan().any() for tensor in theirs.state_dict().values())
    for module in theirs.modules():
        if isinstance(module, nn.GroupNorm):
            module.eps = 1e-6  # the official GroupNorm eps (timm: 1e-5)
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        logits, expected = ours(x)[0], theirs(x)
    assert logits.abs().max() > 0.5
    # timm standardises hybrid conv weights with sqrt(var + 1e-8), the official model with
    # std + 1e-5 (test_hybrid.py shows the outputs are identical once that is aligned): over
    # R26's 26 convolutions that leaves ~3e-4 relative. Plain ViTs agree to float rounding.
    tolerance = 2e-3 if config.resnet is not None else 1e-5
    torch.testing.assert_close(logits, expected, atol=tolerance, rtol=tolerance)


def test_gap_and_token_checkpoints_are_told_apart() -> None:
    for name in ("ViT-S_16", "ViT-S_16-gap-norep", "ViT-S_32", "ViT-S_32-gap-norep"):
        assert guess_model_type(fake_checkpoint(get_config(name), 3, 64)) == name
    # Shapes alone (no classifier given) still find the first, token model.
    assert find_config(384, 12, (16, 16), None) == "ViT-S_16"
    assert find_config(384, 12, (16, 16), None, classifier="gap") == "ViT-S_16-gap-norep"


def test_augreg_spellings_are_model_types() -> None:
    # vit_jax/configs/models.py: every ViT and hybrid except L_32, H_14 and R50+ViT-B_16 (and
    # the `gap` variants, whose spelling would contain the file-name separator `-`).
    assert set(AUGREG_MODELS) == {
        "Ti_16", "S_16", "S_32", "B_16", "B_32", "B_8", "L_16",
        "R_Ti_16", "R26_B_32", "R26_S_32", "R50_L_32",
    }  # fmt: skip
    assert get_config("R_Ti_16") is get_config("R+ViT-Ti_16")
    assert get_config("R26_S_32") is get_config("R26+ViT-S_32")
    assert get_config("R50_L_32") is get_config("R50+ViT-L_32")
    assert get_config("B_16") is get_config("ViT-B_16")
    assert set(AUGREG_MODELS) <= set(model_names())
    assert not set(ALIASES) & set(CONFIGS)  # an alias never hides a registry name
    for spelling, name in AUGREG_MODELS.items():
        assert augreg_name(name) == spelling


AUGREG_B16 = "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0"
AUGREG_R26_FT = (
    "R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0"
    "--imagenet2012-steps_20k-lr_0.01-res_384"
)


@pytest.mark.parametrize(
    ("path", "model", "augreg"),
    [
        ("ViT-B_16.npz", "ViT-B_16", False),
        ("checkpoint/R50+ViT-B_16.npz", "R50+ViT-B_16", False),
        ("R50-ViT-B_16.npz", "R50+ViT-B_16", False),
        ("ViT-B_16-224.npz", "ViT-B_16", False),
        ("imagenet21k+imagenet2012_ViT-B_16-224.npz", "ViT-B_16", False),
        ("imagenet21k+imagenet2012_ViT-L_32.npz", "ViT-L_32", False),
        ("ViT-S_16-gap-norep.npz", "ViT-S_16-gap-norep", False),
        ("sam_ViT-B_32.npz", "ViT-B_32", False),
        # GSAM files are named like the plain model but hold its `gap` variant.
        ("checkpoint/gsam_ViT-S_32.npz", "ViT-S_32-gap-norep", False),
        ("mirror/gsam/ViT-B_16.npz", "ViT-B_16-gap-norep", False),
        (f"{AUGREG_B16}.npz", "ViT-B_16", True),
        (f"checkpoint/{AUGREG_R26_FT}.npz", "R26+ViT-S_32", True),
        ("R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz", "R+ViT-Ti_16", True),
        ("L_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1.npz", "ViT-L_16", True),
        ("S_32-i21k_30-30ep-lr_0.001-aug_light0-wd_0.1-do_0.0-sd_0.0.npz", "ViT-S_32", True),
        (r"C:\\weights\\R+ViT-Ti_16.npz", "R+ViT-Ti_16", False),
        ("my_finetune.npz", None, False),
        ("ViT-B_99.npz", None, False),
        ("X_16-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0.npz", None, False),
        ("B_16.npz", "ViT-B_16", False),  # a model spelling, not an AugReg file
    ],
)
def test_model_type_from_filename(path: str, model: str | None, augreg: bool) -> None:
    assert model_type_from_filename(path) == model
    assert is_augreg_filename(path) is augreg
