"""Attention rollout and raw attention maps against hand-computed values, on every model shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.configs import CONFIGS, ResNetConfig, get_config
from models.modeling import VisionTransformer
from utils.evals import attention_maps as am
from utils.infra.errors import UserError

# Two layers, two heads, three tokens. Every row of every head sums to 1.
LAYER_1 = [
    [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
    [[0, 1, 0], [0, 1, 0], [0, 0, 1]],
]
LAYER_2 = [
    [[0, 0, 1], [0, 1, 0], [0, 0, 1]],
    [[0, 1, 0], [1, 0, 0], [0, 0, 1]],
]
# By hand: head mean of layer 1 = [[.5, .5, 0], [0, 1, 0], [0, 0, 1]]; + I, rows / 2:
#   R1 = [[.75, .25, 0], [0, 1, 0], [0, 0, 1]]
# head mean of layer 2 = [[0, .5, .5], [.5, .5, 0], [0, 0, 1]]; + I, rows / 2:
#   R2 = [[.5, .25, .25], [.25, .75, 0], [0, 0, 1]]
# R2 @ R1 = [[.375, .375, .25], [.1875, .8125, 0], [0, 0, 1]]
R1 = [[0.75, 0.25, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
JOINT = [[0.375, 0.375, 0.25], [0.1875, 0.8125, 0.0], [0.0, 0.0, 1.0]]


def hand_example() -> list[torch.Tensor]:
    return [torch.tensor([layer], dtype=torch.float32) for layer in (LAYER_1, LAYER_2)]


def test_rollout_matrices_match_hand_computation():
    joint = am.rollout_matrices(hand_example())
    assert joint.shape == (1, 2, 3, 3)
    torch.testing.assert_close(joint[0, 0], torch.tensor(R1))
    torch.testing.assert_close(joint[0, 1], torch.tensor(JOINT))


def test_rollout_with_class_token_reads_its_row_over_the_patches():
    # Token 0 is the class token, tokens 1-2 a 1x2 patch grid.
    maps = am.attention_rollout(hand_example(), (1, 2), num_prefix_tokens=1)
    torch.testing.assert_close(maps, torch.tensor([[[0.375, 0.25]]]))
    per_layer = am.attention_rollout(hand_example(), (1, 2), 1, per_layer=True)
    torch.testing.assert_close(per_layer, torch.tensor([[[[0.25, 0.0]], [[0.375, 0.25]]]]))


def test_rollout_without_class_token_is_the_mean_over_rows():
    # gap: all three tokens are patches of a 1x3 grid; column means of JOINT.
    maps = am.attention_rollout(hand_example(), (1, 3), num_prefix_tokens=0)
    expected = torch.tensor([[[0.5625 / 3, 1.1875 / 3, 1.25 / 3]]])
    torch.testing.assert_close(maps, expected)
    assert "no class token" in am.map_description(0)
    assert "class token" in am.map_description(1)


def test_raw_layer_attention_by_layer_and_head():
    attn = hand_example()
    head_0 = am.layer_attention(attn, (1, 2), 1, layer=1, head=0)
    torch.testing.assert_close(head_0, torch.tensor([[[0.0, 1.0]]]))
    head_1 = am.layer_attention(attn, (1, 2), 1, layer=1, head=1)
    torch.testing.assert_close(head_1, torch.tensor([[[1.0, 0.0]]]))
    mean = am.layer_attention(attn, (1, 2), 1, layer=-1)
    torch.testing.assert_close(mean, torch.tensor([[[0.5, 0.5]]]))
    every = am.layer_attention(attn, (1, 2), 1)  # head mean of each layer
    torch.testing.assert_close(every, torch.tensor([[[[0.5, 0.0]], [[0.5, 0.5]]]]))
    with pytest.raises(IndexError):
        am.layer_attention(attn, (1, 2), 1, layer=2)
    with pytest.raises(IndexError):
        am.layer_attention(attn, (1, 2), 1, layer=0, head=2)


def numpy_rollout(attentions: list[np.ndarray]) -> np.ndarray:
    """An independent rollout: one image, explicit loops."""
    n = attentions[0].shape[-1]
    joint = np.eye(n)
    for layer in attentions:
        mixed = layer.mean(axis=0) + np.eye(n)
        mixed /= mixed.sum(axis=1, keepdims=True)
        joint = mixed @ joint
    return joint


@pytest.mark.parametrize(("prefix", "grid"), [(1, (2, 3)), (0, (3, 2))])
def test_rollout_matches_numpy_on_random_non_square_grids(prefix, grid):
    rng = np.random.default_rng(0)
    n = prefix + grid[0] * grid[1]
    layers = [rng.random((2, 4, n, n)) for _ in range(3)]  # (B, heads, N, N)
    layers = [a / a.sum(-1, keepdims=True) for a in layers]
    maps = am.attention_rollout([torch.from_numpy(a) for a in layers], grid, prefix)
    for b in range(2):
        joint = numpy_rollout([a[b] for a in layers])
        scores = joint[0, prefix:] if prefix else joint.mean(axis=0)
        np.testing.assert_allclose(maps[b].numpy(), scores.reshape(grid), rtol=1e-5)


def test_token_scores_rejects_a_wrong_grid():
    with pytest.raises(ValueError, match="do not fit"):
        am.token_scores(torch.rand(1, 5, 5), (2, 3), 1)


def test_upsample_map_scales_to_the_image_and_to_max_one():
    maps = torch.tensor([[[1.0, 3.0]], [[2.0, 2.0]]])  # (2, 1, 2)
    up = am.upsample_map(maps, (4, 6))
    assert up.shape == (2, 4, 6)
    assert up.max() == pytest.approx(1.0)
    assert up[0, :, 0].max() < up[0, :, -1].min()  # left patch weaker than the right
    np.testing.assert_allclose(up[1], 1.0)


def small(config_name: str):
    """A registered config, thinned (width, depth) but keeping its grid arithmetic."""
    config = get_config(config_name)
    return config.replace(
        hidden_size=2 * config.num_heads, mlp_dim=8, num_layers=2, representation_size=None
    )


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if CONFIGS[n].resnet is not None else n
        for n in sorted(CONFIGS)
    ],
)
def test_every_registered_model_gives_maps_on_its_grid(name):
    config = small(name)
    if name == "R50+ViT-B_16":
        size = (224, 224)  # the official 14x14 grid
    elif config.resnet is not None or config.patch_size[0] > 16:
        size = (64, 96)  # non-square
    else:
        size = (48, 80)
    model = VisionTransformer(config, size, num_classes=3)
    maps = am.compute_attention_maps(model, torch.randn(2, 3, *size))
    rows, cols = model.grid_size
    assert maps.rollout.shape == (2, rows, cols)
    assert maps.layers.shape == (2, 2, rows, cols)
    assert torch.isfinite(maps.rollout).all()
    assert model.vis is False  # restored
    if name == "R50+ViT-B_16":
        assert (rows, cols) == (14, 14)


def test_gap_model_and_rollout_per_layer():
    config = get_config("testing").replace(classifier="gap")
    model = VisionTransformer(config, (32, 48), num_classes=4)
    maps = am.compute_attention_maps(model, torch.randn(1, 3, 32, 48), layer_kind="rollout")
    assert maps.rollout.shape == (1, 2, 3)
    assert "no class token" in maps.description
    torch.testing.assert_close(maps.layers[:, -1], maps.rollout)
    # The gap map is a mean of probability rows: it sums to 1 over the patches.
    torch.testing.assert_close(maps.rollout.sum(), torch.tensor(1.0))


def test_small_hybrid_non_square():
    config = get_config("testing").replace(patch_size=(1, 1), resnet=ResNetConfig((1,)))
    model = VisionTransformer(config, (64, 96), num_classes=2)
    maps = am.compute_attention_maps(model, torch.randn(1, 3, 64, 96))
    assert maps.rollout.shape == (1, *model.grid_size) == (1, 16, 24)


def test_open_image_names_a_file_that_is_no_image(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="Cannot read image"):
        am.open_image(tmp_path / "notes.txt")


def test_preprocess_scales_pixels_to_minus_one_one():
    white = Image.new("RGB", (10, 20), (255, 255, 255))
    black = Image.new("RGB", (10, 20), (0, 0, 0))
    batch = am.preprocess([white, black], (16, 8))
    assert batch.shape == (2, 3, 16, 8)
    torch.testing.assert_close(batch[0], torch.ones(3, 16, 8))
    torch.testing.assert_close(batch[1], -torch.ones(3, 16, 8))


def test_plots_build_figures():
    """The panels show what they say: the image itself, the rollout and each layer's map laid
    over it at the image's size (their brightest spot where the map's largest patch is), and
    the patches panel holds the resized image's patches, separated by white gaps."""
    model = VisionTransformer("testing", (32, 48), num_classes=3)
    gen = np.random.default_rng(0)
    pixels = gen.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    maps = am.compute_attention_maps(model, am.preprocess([image], model.img_size))
    fig = am.plot_attention(image, maps, predictions=[("x", 0.5)], title="t")
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == {"image", "attention rollout", "layer 1", "layer 2"}
    shown = np.asarray(panels["image"].images[0].get_array())
    scale = shown.shape[0] // 40  # small images are enlarged by a whole factor, pixels kept
    np.testing.assert_array_equal(shown[::scale, ::scale], pixels)
    for title, grid in [("attention rollout", maps.rollout[0])] + [
        (f"layer {i + 1}", layer) for i, layer in enumerate(maps.layers[0])
    ]:
        base, overlay = panels[title].images
        np.testing.assert_array_equal(np.asarray(base.get_array()), shown)
        heat = np.asarray(overlay.get_array())
        assert heat.shape == shown.shape[:2]
        row, col = np.unravel_index(np.argmax(np.asarray(grid)), np.asarray(grid).shape)
        cell = heat[
            row * heat.shape[0] // grid.shape[0] : (row + 1) * heat.shape[0] // grid.shape[0],
            col * heat.shape[1] // grid.shape[1] : (col + 1) * heat.shape[1] // grid.shape[1],
        ]
        assert cell.max() == pytest.approx(heat.max(), rel=1e-3), title
        # One colour scale for every map, shown by a colour bar: 0 and 1 are its two ends.
        assert overlay.get_cmap().name == am.ATTENTION_CMAP
        assert (overlay.norm.vmin, overlay.norm.vmax) == (0.0, 1.0)
    bars = [ax for ax in fig.axes if ax.get_ylabel() == am.MAP_LABEL]
    assert len(bars) == 2  # beside the rollout, and beside the per-layer grid
    for bar in bars:
        assert bar.get_ylim() == (0.0, 1.0)

    fig = am.plot_patches(image, (32, 48), (16, 16))
    resized, cut = (np.asarray(ax.images[0].get_array()) for ax in fig.axes)
    np.testing.assert_array_equal(resized, np.asarray(image.resize((48, 32), Image.BILINEAR)))
    assert cut.shape == (2 * 16 + 2, 3 * 16 + 2 * 2, 3)
    np.testing.assert_array_equal(cut[18:34, 36:52], resized[16:32, 32:48])  # patch (1, 2)
    assert (cut[16:18] == 255).all()  # the gaps between rows ...
    assert (cut[:, 16:18] == 255).all()  # ... and columns
    assert "2x3 = 6 patches" in fig.axes[1].get_title()
