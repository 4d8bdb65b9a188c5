"""The ViT computes what Google's official model computes (`vit_jax/models_vit.py`)."""

import functools
import math

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import _load_weights as timm_load_npz
from torch import nn

from models.configs import get_config
from models.modeling import LN_EPS, Mlp, VisionTransformer
from tests.helpers import BIG_VISION, fake_checkpoint
from utils.infra.file_io import save_npz

SMALL = get_config("testing").replace(hidden_size=32, mlp_dim=64, num_heads=4, num_layers=3)


def _timm_vit(config, img_size, num_classes, **kw) -> nn.Module:
    """timm's ViT configured as the official model (tanh GELU, eps 1e-6, norm before pooling)."""
    gap = config.classifier == "gap"
    return timm.models.vision_transformer.VisionTransformer(
        img_size=img_size,
        patch_size=config.patch_size[0],
        embed_dim=config.hidden_size,
        depth=config.num_layers,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_dim / config.hidden_size,
        num_classes=num_classes,
        class_token=not gap,
        global_pool="avg" if gap else "token",
        fc_norm=False,
        act_layer=functools.partial(nn.GELU, approximate="tanh"),
        **kw,
    ).eval()


def _ours_and_timm(tmp_path, config, img_size=32, num_classes=7, **fake_kw):
    weights = fake_checkpoint(config, num_classes, img_size, **fake_kw)
    path = tmp_path / "fake.npz"
    save_npz(path, weights)
    ours = VisionTransformer(config, img_size, num_classes).eval()
    ours.load_from(np.load(path))
    theirs = _timm_vit(config, img_size, num_classes)
    timm_load_npz(theirs, str(path))
    return ours, theirs, weights


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_logits_match_timms_own_npz_loader(tmp_path, classifier) -> None:
    config = SMALL.replace(classifier=classifier)
    ours, theirs, _ = _ours_and_timm(tmp_path, config)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, maps = ours(x)
        expected = theirs(x)
    assert maps == []
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert logits.abs().max() > 0.1  # a real signal, not two zero heads agreeing


def test_big_vision_naming_matches_timm(tmp_path) -> None:
    # big_vision files: other block names, a `params/` wrapper, top-level `pos_embedding`.
    weights = fake_checkpoint(SMALL, 7, 32, block_names=BIG_VISION)
    weights["pos_embedding"] = weights.pop("Transformer/posembed_input/pos_embedding")
    path = tmp_path / "big_vision.npz"
    save_npz(path, {f"params/{k}": v for k, v in weights.items()})
    ours = VisionTransformer(SMALL, 32, 7).eval()
    ours.load_from(np.load(path))
    theirs = _timm_vit(SMALL, 32, 7)
    timm_load_npz(theirs, str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], theirs(x), atol=1e-5, rtol=0)


def test_pre_logits_is_dense_then_tanh(tmp_path) -> None:
    config = SMALL.replace(representation_size=24)
    weights = fake_checkpoint(config, 5, 32, representation_size=24)
    ours = VisionTransformer(config, 32, 5).eval()
    ours.load_from(weights)
    # timm has no representation layer: take its pooled features and apply the npz arrays.
    theirs = _timm_vit(SMALL, 32, 5)
    path = tmp_path / "no_pre_logits.npz"
    save_npz(path, {k: v for k, v in weights.items() if not k.startswith(("pre_logits", "head"))})
    timm_load_npz(theirs, str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = theirs.forward_head(theirs.forward_features(x), pre_logits=True).numpy()
        logits = ours(x)[0].numpy()
    rep = np.tanh(pooled @ weights["pre_logits/kernel"] + weights["pre_logits/bias"])
    expected = rep @ weights["head/kernel"] + weights["head/bias"]
    np.testing.assert_allclose(logits, expected, atol=1e-5)


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_fused_and_explicit_attention_agree(classifier) -> None:
    torch.manual_seed(0)
    model = VisionTransformer(SMALL.replace(classifier=classifier), (48, 32), 10).eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        fused, none = model(x)
        model.vis = True
        explicit, maps = model(x)
    assert none == []
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    tokens = 3 * 2 + (classifier == "token")
    assert len(maps) == SMALL.num_layers
    for probs in maps:
        assert probs.shape == (2, SMALL.num_heads, tokens, tokens)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, SMALL.num_heads, tokens))


def test_forward_with_labels_returns_cross_entropy() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(SMALL, 32, 6).eval()
    nn.init.normal_(model.head.weight)
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 5, 2, 2])
    with torch.no_grad():
        loss = model(x, labels)
        logits, _ = model(x)
    expected = -torch.log_softmax(logits, -1)[torch.arange(4), labels].mean()
    torch.testing.assert_close(loss, expected)


def test_mlp_uses_tanh_gelu() -> None:
    torch.manual_seed(0)
    mlp = Mlp(SMALL).eval()
    x = torch.randn(5, SMALL.hidden_size)
    h = (x @ mlp.fc1.weight.T + mlp.fc1.bias).double()
    tanh_gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    expected = tanh_gelu.float() @ mlp.fc2.weight.T + mlp.fc2.bias
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=1e-5)
        exact = nn.functional.gelu(h.float()) @ mlp.fc2.weight.T + mlp.fc2.bias
    assert not torch.allclose(mlp(x), exact, atol=1e-6)  # the exact GELU would be wrong


def test_layernorm_eps_and_dropout_placement() -> None:
    config = SMALL.replace(dropout_rate=0.3, attention_dropout_rate=0.7)
    model = VisionTransformer(config, 32, 10)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * config.num_layers + 1
    assert all(m.eps == LN_EPS == 1e-6 for m in norms)
    # Every Dropout module (embeddings, after attention, in the MLP) uses dropout_rate; the
    # attention probabilities alone use attention_dropout_rate.
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.3}
    assert all(block.attn.attn_dropout == 0.7 for block in model.encoder.blocks)


def test_attention_dropout_acts_on_probabilities_only_in_training() -> None:
    torch.manual_seed(0)
    config = SMALL.replace(dropout_rate=0.0, attention_dropout_rate=0.5)
    model = VisionTransformer(config, 32, 4)
    nn.init.normal_(model.head.weight)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert not torch.allclose(model(x)[0], model(x)[0])
    model.eval()
    torch.testing.assert_close(model(x)[0], model(x)[0])


@pytest.mark.parametrize(
    ("img_size", "grid"), [(224, (14, 14)), ((160, 96), (10, 6)), (40, (2, 2))]
)
def test_token_count_follows_image_size(img_size, grid) -> None:
    model = VisionTransformer(get_config("testing"), img_size, 3)
    assert model.grid_size == grid
    assert model.embeddings.pos_embed.shape == (1, grid[0] * grid[1] + 1, 16)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    logits, _ = model(torch.randn(1, 3, h, w))
    assert logits.shape == (1, 3)


def test_gap_model_has_no_class_token() -> None:
    model = VisionTransformer(SMALL.replace(classifier="gap"), 32, 3)
    assert model.embeddings.cls_token is None
    assert model.embeddings.pos_embed.shape == (1, 4, SMALL.hidden_size)
    assert "embeddings.cls_token" not in model.state_dict()


def test_image_smaller_than_a_patch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        VisionTransformer(get_config("testing"), 8, 3)


def test_zero_head_model_starts_at_zero() -> None:
    model = VisionTransformer(SMALL, 32, 10, zero_head=True)
    assert not model.head.weight.any()
    assert not model.head.bias.any()


def test_class_token_shortcut_matches_full_encoder() -> None:
    torch.manual_seed(0)
    model = VisionTransformer("testing", 32, num_classes=3).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, _ = model.encoder(model.embeddings(x))  # every token through every block
        expected = model.head(tokens[:, 0])
        logits, maps = model(x)  # the last block computes the class token only
    assert maps == []
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-6)
