"""Figure 7's numbers (utils/evals/analysis.py) against hand-computed oracles; analyze.py end to
end."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import cdist

import analyze
from models import configs
from models.configs import ResNetConfig, get_config
from models.modeling import VisionTransformer
from models.npz import state_dict_to_npz
from tests.helpers import (
    BIG_VISION,
    VIT_JAX,
    distinct_model,
    expect_user_error,
    fake_checkpoint,
    imports_torch,
    make_image_folder,
    run_script,
    script_error,
)
from utils.evals import analysis
from utils.evals.attention_maps import DEMO_CHECKPOINT
from utils.infra.file_io import save_npz, save_safetensors
from utils.infra.train_state import STATE_FORMAT

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------
# Position-embedding similarity


def test_position_similarity_of_known_vectors_on_a_non_square_grid():
    rows, cols = 2, 3
    angles = np.linspace(0.0, 2.5, rows * cols)
    norms = np.arange(1, rows * cols + 1)  # lengths differ: cosine ignores them
    patches = np.stack([np.cos(angles), np.sin(angles), np.zeros_like(angles)], axis=1)
    patches *= norms[:, None]
    cls = np.array([[5.0, -7.0, 3.0]])  # dropped: never compared
    pos = torch.tensor(np.concatenate([cls, patches])[None], dtype=torch.float32)
    sim = analysis.position_similarity(pos, (rows, cols), num_prefix_tokens=1)
    expected = np.cos(angles[:, None] - angles[None, :])
    np.testing.assert_allclose(sim, expected, atol=1e-6)
    with pytest.raises(ValueError, match="do not fit a 2x3 grid"):
        analysis.position_similarity(pos, (rows, cols), num_prefix_tokens=0)


def test_a_resized_embedding_keeps_its_grid_shape():
    """Position vectors that depend on the row only: after resizing 4x4 -> 6x8 every patch is
    still identical to the patches of its own row, in the orientation of the image."""
    config = get_config("testing")
    weights = fake_checkpoint(config, num_classes=5, img_size=64)  # 4x4 grid
    d = config.hidden_size
    rows = np.stack([np.eye(d)[r] + 0.05 for r in range(4)])  # (4, D), distinct per row
    grid = np.repeat(rows[:, None], 4, axis=1).reshape(16, d)
    weights["Transformer/posembed_input/pos_embedding"] = np.concatenate(
        [np.full((1, d), 9.0), grid]
    )[None].astype(np.float32)
    model = VisionTransformer.from_pretrained(config, weights, (96, 128), num_classes=5)
    assert model.grid_size == (6, 8)
    emb = model.embeddings
    sim = analysis.position_similarity(emb.pos_embed, model.grid_size, emb.num_prefix_tokens)
    assert sim.shape == (48, 48)
    tiles = sim.reshape(6, 8, 6, 8)
    for r in range(6):
        np.testing.assert_allclose(tiles[r, :, r, :], 1.0, atol=1e-5)  # own row: identical
    assert tiles[0, 0, 5, 0] < 0.2  # first and last rows: nearly orthogonal
    assert tiles[0, 0, 0, 7] > 0.999  # not transposed: a row runs along the columns


# --------------------------------------------------------------------------------------------
# Mean attention distance


def uniform_attention(tokens: int, batch: int = 1, heads: int = 1) -> torch.Tensor:
    return torch.full((batch, heads, tokens, tokens), 1.0 / tokens)


def test_uniform_attention_on_a_row_of_patches_has_the_closed_form():
    n, patch = 7, 16
    distances = analysis.patch_distances((1, n), (patch, patch))
    # Mean |i - j| over all pairs of n points: (n^2 - 1) / (3n). The class token takes 1/(n+1)
    # of every row and is left out without renormalising: the rest weighs n / (n + 1).
    out = analysis.attention_distances([uniform_attention(n + 1)], distances, 1)
    expected = patch * (n * n - 1) / (3 * n) * n / (n + 1)
    assert out.shape == (1, 1, 1)
    assert float(out) == pytest.approx(expected)


def test_uniform_attention_on_a_square_grid_matches_pairwise_distances():
    # 2x2: each query sees distances 0, 1, 1, sqrt(2) patches.
    out = analysis.attention_distances(
        [uniform_attention(4)], analysis.patch_distances((2, 2), (16, 16)), 0
    )
    assert float(out) == pytest.approx(16 * (2 + math.sqrt(2)) / 4)
    n, patch = 5, 8
    centres = np.array([(r, c) for r in range(n) for c in range(n)], dtype=float) * patch
    expected = cdist(centres, centres).mean()  # scipy's pairwise distances, every pair
    out = analysis.attention_distances(
        [uniform_attention(n * n, batch=2, heads=3)], analysis.patch_distances((n, n), (8, 8)), 0
    )
    np.testing.assert_allclose(out.numpy(), expected)


def test_identity_attention_has_zero_distance():
    eye = torch.eye(1 + 9).expand(2, 4, 10, 10)
    out = analysis.attention_distances([eye, eye], analysis.patch_distances((3, 3), (16, 16)), 1)
    assert out.shape == (2, 2, 4)
    assert torch.count_nonzero(out) == 0


def shifted_attention(rows: int, cols: int, dr: int, dc: int) -> torch.Tensor:
    """Every query patch looks `dr` rows down and `dc` columns right; at the edge, at itself."""
    probs = torch.zeros(1, 1, rows * cols, rows * cols)
    for r in range(rows):
        for c in range(cols):
            tr, tc = (r + dr, c + dc) if r + dr < rows and c + dc < cols else (r, c)
            probs[0, 0, r * cols + c, tr * cols + tc] = 1.0
    return probs


@pytest.mark.parametrize(("dr", "dc"), [(0, 2), (1, 0), (0, 1)])
def test_attention_k_patches_away_gives_k_patch_sizes_minus_the_edge(dr, dc):
    rows, cols, spacing = 3, 5, (16, 8)  # non-square pixels per patch: the axes must not swap
    out = analysis.attention_distances(
        [shifted_attention(rows, cols, dr, dc)], analysis.patch_distances((rows, cols), spacing), 0
    )
    # By hand: (rows - dr) * (cols - dc) of the rows*cols queries move, the others stay put.
    moved = (rows - dr) * (cols - dc) / (rows * cols)
    expected = math.hypot(dr * spacing[0], dc * spacing[1]) * moved
    assert float(out) == pytest.approx(expected)


def test_every_dot_of_the_distance_panel_lies_whole_inside_its_axes():
    """Heads of nearly equal distance (the demo model's) had their top dots cut in half by
    the upper edge; every dot fits inside the panel, for one checkpoint and for two."""
    near = np.array([[13.2, 14.1, 15.0], [14.7, 15.4, 15.8]])  # (layers, heads), pixels
    one = analysis.Analysis("a", "demo", (32, 32), (8, 8), (4, 4), 1, 128, near)
    two = analysis.Analysis("b", "demo", (32, 32), (8, 8), (4, 4), 1, 128, near * 0.5)
    for results in ([one], [one, two]):
        fig = analysis.plot_figure7(results)
        fig.canvas.draw()  # lays out the panels
        ax = next(ax for ax in fig.axes if ax.get_title() == "one dot per head")
        box = ax.get_window_extent()
        for dots in ax.collections:
            radius = math.sqrt(dots.get_sizes()[0]) / 2 * fig.dpi / 72  # points to pixels
            centres = ax.transData.transform(dots.get_offsets())
            assert (centres[:, 1] + radius <= box.y1).all(), len(results)
            assert (centres[:, 1] - radius >= box.y0).all(), len(results)


def test_one_image_at_a_time_equals_batches(one_thread):
    model = distinct_model("testing", img_size=48)
    images = torch.randn(6, 3, 48, 48)
    one, n_one = analysis.mean_attention_distance(model, (images[i : i + 1] for i in range(6)))
    many, n_many = analysis.mean_attention_distance(model, [images[:4], images[4:]])
    assert n_one == n_many == 6
    assert one.shape == (2, 2)  # testing: 2 layers, 2 heads
    np.testing.assert_allclose(one, many, rtol=1e-5)
    assert ((one > 0) & (one < 48 * math.sqrt(2))).all()
    assert model.training  # left as it was
    with pytest.raises(analysis.UserError, match="No images"):
        analysis.mean_attention_distance(model, [])


# --------------------------------------------------------------------------------------------
# Embedding filters


def test_principal_components_equal_numpy_svd_up_to_sign():
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((4, 3 * 5 * 5))
    weight = rng.standard_normal((40, 4)) * [5, 3, 2, 1] @ basis + 0.1 * rng.standard_normal(
        (40, 75)
    )
    weight = weight.reshape(40, 3, 5, 5).astype(np.float32)
    comps, ratio = analysis.embedding_components(torch.from_numpy(weight), k=6)
    assert comps.shape == (6, 3, 5, 5)
    flat = weight.reshape(40, -1).astype(np.float64)
    centred = flat - flat.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    got = comps.reshape(6, -1)
    np.testing.assert_allclose(np.abs(np.sum(got * vt[:6], axis=1)), 1.0, atol=1e-5)
    np.testing.assert_allclose(ratio, s[:6] ** 2 / np.sum(s**2), rtol=1e-5)
    # Independently: the variance of the data along each component, over the total variance.
    along = (centred @ got.T.astype(np.float64)).var(axis=0)
    np.testing.assert_allclose(ratio, along / centred.var(axis=0).sum(), rtol=1e-4)
    assert ratio.sum() <= 1.0 + 1e-6
    assert (np.diff(ratio) <= 1e-7).all()
    peaks = got[np.arange(6), np.abs(got).argmax(axis=1)]
    assert (peaks > 0).all()  # the deterministic sign
    comps, ratio = analysis.embedding_components(torch.from_numpy(weight[:5]), k=28)
    assert comps.shape[0] == 5  # at most D components


# --------------------------------------------------------------------------------------------
# analyze.py end to end


def fake_npz(path: Path, config="testing", img_size=32, seed=0) -> Path:
    save_npz(path, fake_checkpoint(get_config(config), num_classes=5, img_size=img_size, seed=seed))
    return path


def image_folder(root: Path, n: int = 3) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def analysis_json(out: Path, *argv: str) -> dict:
    """analyze.py run with `argv` and `--output_dir out`: the analysis.json it writes."""
    analyze.main([*argv, "--output_dir", str(out)])
    return read_json(out / "analysis.json")


def figure_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()
        return image.size


def test_fake_official_checkpoint_end_to_end(tmp_path, one_thread):
    npz = fake_npz(tmp_path / "tiny.npz", img_size=48)  # a 3x3 grid
    images = image_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    facts = analysis_json(
        out,
        "--checkpoint",
        str(npz),
        "--model_type",
        "testing",
        "--image",
        str(images),
        "--num_components",
        "5",
    )
    assert facts["model_type"] == "testing"
    assert facts["img_size"] == [48, 48]
    assert facts["patch_size"] == [16, 16]
    assert facts["grid"] == [3, 3]
    assert facts["num_images"] == 3
    assert np.array(facts["mean_attention_distance"]).shape == (2, 2)
    # The JSON's numbers against the .npz arrays themselves (official layout, numpy only).
    raw = np.load(npz)
    pos = raw["Transformer/posembed_input/pos_embedding"][0, 1:].astype(np.float64)
    unit = pos / np.linalg.norm(pos, axis=1, keepdims=True)
    np.testing.assert_allclose(facts["position_similarity"], unit @ unit.T, atol=1e-5)
    kernel = raw["embedding/kernel"].transpose(3, 2, 0, 1).reshape(16, -1)  # HWIO -> (D, CHW)
    _, s, vt = np.linalg.svd(kernel - kernel.mean(axis=0), full_matrices=False)
    comps = np.array(facts["embedding_components"])
    assert comps.shape == (5, 3, 16, 16)
    np.testing.assert_allclose(np.abs((comps.reshape(5, -1) * vt[:5]).sum(1)), 1.0, atol=1e-4)
    np.testing.assert_allclose(
        facts["explained_variance_ratio"], s[:5] ** 2 / (s**2).sum(), rtol=1e-4
    )
    width, height = figure_size(out / "figure7.png")
    assert width > 2.5 * height > 500
    for name in ("embedding_filters", "position_similarity", "attention_distance"):
        assert min(figure_size(out / f"{name}.png")) > 200


def test_image_folders_are_walked_and_an_unreadable_file_skipped_and_counted(
    tmp_path, caplog, one_thread
):
    npz = fake_npz(tmp_path / "tiny.npz")
    images = image_folder(tmp_path / "imgs", n=2)  # 0.png, 1.png
    (images / "00_bad.png").write_bytes(b"not a png")  # read first
    (images / "sub").mkdir()
    Image.new("RGB", (30, 20), (250, 40, 0)).save(images / "sub" / "2.png")
    base = ["--checkpoint", str(npz), "--model_type", "testing", "--panels", "distance"]
    with caplog.at_level("INFO"):
        facts = analysis_json(tmp_path / "all", *base, "--image", str(images))
    assert facts["num_images"] == 3  # the sub-folder's too; the bad file left out ...
    assert f"Skipping an unreadable image (1 so far): {images / '00_bad.png'}" in caplog.text
    assert "over 3 images" in caplog.text
    assert "fewer than --num_images 128: no more readable images" in caplog.text  # ... and said
    # The same numbers as the readable files named one by one.
    readable = [str(images / "0.png"), str(images / "1.png"), str(images / "sub" / "2.png")]
    alone = analysis_json(tmp_path / "alone", *base, "--image", *readable)
    assert alone["mean_attention_distance"] == facts["mean_attention_distance"]
    # --num_images counts readable images: the bad file takes no place among the first two.
    first_two = analysis_json(tmp_path / "two", *base, "--image", str(images), "--num_images", "2")
    expected = analysis_json(tmp_path / "2", *base, "--image", *readable[:2])
    assert first_two["num_images"] == 2
    assert first_two["mean_attention_distance"] == expected["mean_attention_distance"]


def test_a_test_split_with_an_unreadable_image_gives_the_next_readable_ones(tmp_path, caplog):
    with_bad, without = tmp_path / "with_bad", tmp_path / "without"
    for root in (with_bad, without):
        make_image_folder(root, classes=("cat", "dog", "eel"))  # 2 test images per class
    (with_bad / "val" / "cat" / "1.png").write_bytes(b"truncated")
    (without / "val" / "cat" / "1.png").unlink()
    with caplog.at_level("WARNING"):
        mine = torch.cat(
            list(analysis.dataset_batches("imagefolder", str(with_bad), (32, 32), 4, 3))
        )
    theirs = torch.cat(list(analysis.dataset_batches("imagefolder", str(without), (32, 32), 4, 3)))
    assert mine.shape == (4, 3, 32, 32)
    assert torch.equal(mine, theirs)
    assert f"{with_bad / 'val' / 'cat' / '1.png'}" in caplog.text


def test_demo_model_by_default_on_held_out_digits(tmp_path, monkeypatch, best_checkpoint):
    monkeypatch.chdir(tmp_path)
    path = best_checkpoint(
        distinct_model("demo", img_size=32, num_classes=10), name="digits-demo", dataset="digits"
    )
    assert path == tmp_path / DEMO_CHECKPOINT
    analyze.main(["--num_images", "12", "--format", "svg"])
    facts = read_json(tmp_path / "output/analysis/analysis.json")
    assert (facts["model_type"], facts["grid"], facts["num_images"]) == ("demo", [4, 4], 12)
    assert np.array(facts["mean_attention_distance"]).shape == (4, 4)  # layers x heads
    assert np.array(facts["embedding_components"]).shape == (28, 3, 8, 8)
    svg = (tmp_path / "output/analysis/figure7.svg").read_text()
    assert svg.lstrip().startswith("<?xml")
    assert "</svg>" in svg


def test_before_and_after_in_one_figure(tmp_path, best_checkpoint, one_thread):
    before = fake_npz(tmp_path / "ViT-start.npz", img_size=32)
    after = best_checkpoint(distinct_model("testing", img_size=32, seed=3), name="tuned")
    out = tmp_path / "out"
    args = [
        "--checkpoint",
        str(before),
        str(after),
        "--model_type",
        "testing",
        "--dataset",
        "digits",
        "--num_images",
        "5",
        "--output_dir",
        str(out),
    ]
    analyze.main(args)
    first = read_json(out / "analysis_ViT-start.json")
    second = read_json(out / "analysis_tuned_checkpoint.json")
    assert first["checkpoint"] == str(before)
    assert first["num_images"] == second["num_images"] == 5
    assert first["position_similarity"] != second["position_similarity"]
    single = tmp_path / "single"
    alone = analysis_json(
        single, "--checkpoint", str(after), "--dataset", "digits", "--num_images", "5"
    )
    np.testing.assert_allclose(
        alone["mean_attention_distance"], second["mean_attention_distance"], rtol=1e-5
    )
    width_two = figure_size(out / "figure7.png")[0]
    assert width_two > 1.3 * figure_size(single / "figure7.png")[0]  # side by side


def test_gap_and_hybrid_models(tmp_path, monkeypatch, one_thread):
    gap = get_config("testing").replace(name="testing-gap", classifier="gap")
    hybrid = get_config("testing").replace(
        name="testing-hybrid", patch_size=(1, 1), resnet=ResNetConfig((1, 1))
    )
    for config in (gap, hybrid):
        monkeypatch.setitem(configs.CONFIGS, config.name, config)
    npz = fake_npz(tmp_path / "gap.npz", gap.name)
    facts = analysis_json(tmp_path / "gap", "--checkpoint", str(npz), "--model_type", gap.name)
    assert facts["num_prefix_tokens"] == 0
    assert facts["class_token"] == "none (gap model)"
    assert facts["num_images"] == 2  # the two bundled photos
    assert np.array(facts["position_similarity"]).shape == (4, 4)

    npz = fake_npz(tmp_path / "hybrid.npz", hybrid.name)
    out = tmp_path / "hybrid"
    facts = analysis_json(out, "--checkpoint", str(npz), "--model_type", hybrid.name)
    assert facts["patch_size"] == [8, 8]  # root stride 4, one more stage: 8 pixels per token
    assert facts["grid"] == [4, 4]
    assert facts["embedding_components"] is None
    assert not (out / "embedding_filters.png").exists()
    assert (out / "figure7.png").is_file()


def test_random_weights_for_timing(tmp_path, one_thread):
    out = tmp_path / "out"
    facts = analysis_json(
        out,
        "--checkpoint",
        "none",
        "--model_type",
        "testing",
        "--img_size",
        "32",
        "64",
        "--panels",
        "distance",
        "--num_images",
        "1",
    )
    assert facts["checkpoint"] is None
    assert facts["grid"] == [2, 4]
    assert facts["position_similarity"] is None
    assert sorted(p.name for p in out.iterdir()) == [
        "analysis.json",
        "attention_distance.png",
        "figure7.png",
    ]


def test_bad_input_is_one_message_and_exit_2(tmp_path, monkeypatch, capsys):
    npz = fake_npz(tmp_path / "a.npz")
    bigger = fake_npz(tmp_path / "b.npz", img_size=64)
    empty = tmp_path / "empty"
    empty.mkdir()
    hybrid = get_config("testing").replace(
        name="testing-hybrid", patch_size=(1, 1), resnet=ResNetConfig((1,))
    )
    monkeypatch.setitem(configs.CONFIGS, hybrid.name, hybrid)
    hyb = fake_npz(tmp_path / "h.npz", hybrid.name)
    base = ["--model_type", "testing", "--output_dir", str(tmp_path / "out")]
    cases = {
        "has no images": ["--checkpoint", str(npz), "--image", str(empty), *base],
        "cannot be compared": ["--checkpoint", str(npz), str(bigger), *base],
        "needs --model_type": ["--checkpoint", "none", "--output_dir", str(tmp_path)],
        "one file or two": ["--checkpoint", "a", "b", "c"],
        "not a format": ["--format", "docx"],
        "both give images": ["--image", "x.png", "--dataset", "digits"],
        "does not exist": ["--checkpoint", str(tmp_path / "missing.npz"), *base],
    }
    for message, argv in cases.items():
        assert message in expect_user_error(analyze.main, argv, capsys)
    err = expect_user_error(
        analyze.main,
        ["--checkpoint", str(hyb), "--model_type", hybrid.name, "--panels", "filters"],
        capsys,
    )
    assert "hybrid" in err
    assert "ResNet features" in err
    (tmp_path / "file").write_text("")
    assert "is a file" in expect_user_error(
        analyze.main,
        ["--checkpoint", str(npz), *base[:2], "--output_dir", str(tmp_path / "file")],
        capsys,
    )
    # The same checkpoints at one --img_size compare fine.
    analyze.main(
        ["--checkpoint", str(npz), str(bigger), *base, "--img_size", "48", "--panels", "position"]
    )
    monkeypatch.chdir(tmp_path)
    assert "make demo" in expect_user_error(analyze.main, [], capsys)


@pytest.mark.slow
def test_help_answers_without_torch_and_a_missing_file_exits_2(tmp_path):
    result = run_script("analyze.py", "--help", importtime=True)
    assert result.returncode == 0
    assert not imports_torch(result)  # parsed before torch is imported
    err = script_error("analyze.py", "--checkpoint", str(tmp_path / "no.npz"))
    assert err.startswith("error: ")


@pytest.mark.slow
def test_make_figures_draws_figure7_of_a_digits_model(tmp_path, best_checkpoint):
    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "tools/make_figures.py")
    make_figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_figures)
    model = distinct_model("demo", img_size=32, num_classes=10)
    ckpt = best_checkpoint(model, name="digits-demo", dataset="digits")
    out = tmp_path / "img"
    make_figures.main(["--checkpoint", str(ckpt), "--output_dir", str(out)])
    width, height = figure_size(out / "figure7.png")
    assert width > 2.5 * height > 250
    assert (out / "figure7.png").stat().st_size < 300_000


def save_kind(kind: str, directory: Path, model: VisionTransformer) -> Path:
    """`model` saved as one of the checkpoint kinds load_model reads."""
    state = model.state_dict()
    if kind == "big_vision.npz":
        path = directory / "bv.npz"
        save_npz(path, state_dict_to_npz(state, model.config))
        arrays = dict(np.load(path))  # rename the blocks as big_vision does
        for old, new in zip(VIT_JAX, BIG_VISION, strict=True):
            arrays = {k.replace(f"/{old}/", f"/{new}/"): v for k, v in arrays.items()}
        save_npz(path, {f"params/{k}": v for k, v in arrays.items()})
    elif kind == ".safetensors":
        path = directory / "model.safetensors"
        save_safetensors(path, state, {"model_type": "testing", "img_size": [32, 32]})
    else:  # a training state, as train.py's _last.pt
        path = directory / "run_last.pt"
        torch.save({"format": STATE_FORMAT, "model_type": "testing", "model": state}, path)
    return path


@pytest.mark.parametrize("kind", ["big_vision.npz", ".safetensors", "_last.pt"])
def test_every_checkpoint_kind(tmp_path, kind):
    model = distinct_model("testing", img_size=32, seed=1)
    path = save_kind(kind, tmp_path, model)
    facts = analysis_json(
        tmp_path / "out",
        "--checkpoint",
        str(path),
        "--model_type",
        "testing",
        "--img_size",
        "32",
        "--panels",
        "position",
        "filters",
    )
    pos = model.embeddings.pos_embed.detach()[0, 1:].double().numpy()
    unit = pos / np.linalg.norm(pos, axis=1, keepdims=True)
    np.testing.assert_allclose(facts["position_similarity"], unit @ unit.T, atol=1e-5)
    assert np.array(facts["embedding_components"]).shape == (16, 3, 16, 16)


def test_a_diverged_checkpoint_is_one_message(tmp_path, capsys) -> None:
    """All-NaN weights (a run that diverged) used to fail inside the SVD of the filters."""
    weights = fake_checkpoint(get_config("testing"), num_classes=10, img_size=32)
    path = tmp_path / "diverged.npz"
    save_npz(path, {k: np.full_like(v, np.nan) for k, v in weights.items()})
    argv = ["--checkpoint", str(path), "--model_type", "testing", "--output_dir", str(tmp_path)]
    err = expect_user_error(analyze.main, [*argv, "--panels", "filters"], capsys)
    assert f"{path}: " in err
    assert "weight tensor(s) hold NaN or infinite values (first: embeddings." in err
    assert not list(tmp_path.glob("*.json"))


def test_no_output_replaces_an_image_it_reads(tmp_path, capsys, one_thread):
    npz = fake_npz(tmp_path / "tiny.npz")
    images = image_folder(tmp_path / "imgs", n=2)
    figure = images / "figure7.png"  # a photo of the user's, named as a figure
    Image.new("RGB", (30, 20), (250, 40, 0)).save(figure)
    kept = figure.read_bytes()
    argv = ["--checkpoint", str(npz), "--model_type", "testing", "--panels", "distance"]
    argv += ["--image", str(images), "--output_dir", str(images)]
    err = expect_user_error(analyze.main, argv, capsys)
    assert f"Cannot write {figure}: {figure} is read from there" in err
    assert figure.read_bytes() == kept
