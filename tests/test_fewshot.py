"""Few-shot linear evaluation: big_vision's sampling and solve, and fewshot.py end to end."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import Ridge

import fewshot as fewshot_script
from models.configs import get_config
from models.modeling import VisionTransformer
from tests.helpers import (
    distinct_model,
    expect_user_error,
    fake_checkpoint,
    hf_model,
    make_image_folder,
)
from utils.data.loaders import DigitsDataset, build_transforms
from utils.data.preprocessing import ResizeCentralCrop
from utils.evals.fewshot import (
    fewshot_accuracy,
    fewshot_evaluate,
    fewshot_indices,
    fit_ridge,
    short_classes,
)
from utils.infra.file_io import save_npz
from utils.infra.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
TESTING = get_config("testing")

# Class 0: 6 images, class 1: 2 (fewer than 5 shots), class 2: none, class 3: 7.
LABELS = np.array([3, 0, 1, 0, 3, 3, 0, 0, 3, 1, 0, 3, 3, 0, 3])


def plain_indices(labels, shots: int, seed: int, num_classes: int) -> list[int]:
    """The rule as the issue states it, written out without the module's helpers."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        members = np.array([i for i, y in enumerate(labels) if y == c], dtype=np.int64)
        rng.shuffle(members)  # what rng.permutation does to a copy
        chosen.extend(int(i) for i in members[:shots])
    return chosen


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_indices_equal_the_rule_index_by_index(seed) -> None:
    for shots in (1, 2, 5, 10):
        got = fewshot_indices(LABELS, shots, seed)
        assert got.tolist() == plain_indices(LABELS, shots, seed, 4)
        # Tensors work alike; an explicit class count above the labels' changes nothing here.
        assert fewshot_indices(torch.tensor(LABELS), shots, seed, num_classes=6).tolist() == (
            got.tolist()
        )
    five = fewshot_indices(LABELS, 5, seed)
    # Class-major: 5 of class 0, both of class 1, none of class 2, 5 of class 3.
    assert LABELS[five].tolist() == [0] * 5 + [1] * 2 + [3] * 5
    # The 1-shot subset is the first image of each class's 5-shot part.
    assert fewshot_indices(LABELS, 1, seed).tolist() == [five[0], five[5], five[7]]
    assert short_classes(LABELS, 5) == [(1, 2), (2, 0)]


def _blobs(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Separable-ish Gaussian features with one constant column (its std is 0: the 1e-5)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(0.0, 2.0, (classes, dim))
    x = centres[labels] + rng.normal(0.0, 1.0, (n, dim))
    x[:, 2] = 3.0
    return x.astype(np.float32), labels


def _padded(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return np.hstack([(x - mean) / std, np.full((len(x), 1), 100.0)])


@pytest.mark.parametrize(("shots", "branch"), [(1, "X X^T"), (12, "X^T X")])
def test_solve_equals_sklearn_ridge_and_a_float64_solve(shots, branch, monkeypatch) -> None:
    classes, dim = 3, 6  # 7 columns with the bias: 3 rows (1-shot) < 7 <= 36 rows (12-shot)
    train_x, train_y = _blobs(90, dim, classes, seed=1)
    test_x, test_y = _blobs(200, dim, classes, seed=2)
    subset = fewshot_indices(train_y, shots, seed=0)
    x, y = train_x[subset].astype(np.float64), train_y[subset]
    mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-5
    padded = _padded(x, mean, std)
    targets = 2.0 * np.eye(classes)[y] - 1.0

    sizes = []
    eigh = np.linalg.eigh
    monkeypatch.setattr(np.linalg, "eigh", lambda a: sizes.append(a.shape) or eigh(a))
    l2_regs = [1024.0, 3.0]
    ridge = fit_ridge(train_x[subset], y, classes, l2_regs)
    assert sizes == [(len(subset),) * 2 if branch == "X X^T" else (dim + 1,) * 2]  # once for both

    for l2, weights in zip(l2_regs, ridge.weights, strict=True):
        sk = Ridge(alpha=l2, fit_intercept=False, solver="cholesky").fit(padded, targets)
        exact = np.linalg.solve(padded.T @ padded + l2 * np.eye(dim + 1), padded.T @ targets)
        np.testing.assert_allclose(sk.coef_.T, exact, rtol=1e-8, atol=1e-10)
        scale = np.abs(exact).max()
        np.testing.assert_allclose(weights, exact, rtol=0, atol=2e-4 * scale)
        in64 = fit_ridge(train_x[subset], y, classes, [l2], dtype=np.float64).weights[0]
        np.testing.assert_allclose(in64, exact, rtol=1e-7, atol=1e-9 * scale)

        # The test split is standardised with the subset's statistics; accuracy is over all.
        scores = sk.predict(_padded(test_x, mean, std))
        error = np.abs(ridge.scores(test_x, l2_regs.index(l2)) - scores).max()
        top2 = np.sort(scores, axis=1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() > 10 * error  # no near-tie float32 could flip
        expected = float((scores.argmax(1) == test_y).mean())
        got = fewshot_accuracy(train_x, train_y, test_x, test_y, shots, 0, l2_reg=l2)
        assert got == expected
        assert 0.3 < expected < 1.0


def test_every_seed_shot_and_l2_is_reported_in_order() -> None:
    train_x, train_y = _blobs(60, 5, 3, seed=3)
    test_x, test_y = _blobs(30, 5, 3, seed=4)
    results = fewshot_evaluate(train_x, train_y, test_x, test_y, [1, 5], 2, [8.0, 1024.0])
    assert [(r.seed, r.shots, r.l2_reg) for r in results] == [
        (s, k, l2) for s in (0, 1) for k in (1, 5) for l2 in (8.0, 1024.0)
    ]
    for r in results:
        assert r.count == 30
        assert r.accuracy == fewshot_accuracy(
            train_x, train_y, test_x, test_y, r.shots, r.seed, r.l2_reg
        )


# --------------------------------------------------------------------------------------------
# The representation and the preprocessing


def test_an_i21k_npz_keeps_its_pre_logits(tmp_path) -> None:
    path = tmp_path / "i21k.npz"
    width = TESTING.hidden_size  # as in the official files: pre_logits as wide as the tokens
    weights = fake_checkpoint(TESTING, num_classes=21, img_size=32, representation_size=width)
    save_npz(path, weights)
    kept = load_model(path, "testing", keep_pre_logits=True).model
    dropped = load_model(path, "testing").model  # as fine-tuning: the pooled token
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = kept.forward_features(images)[0]
        pooled = dropped.forward_features(images)[0]
    assert features.shape == pooled.shape == (3, width)
    expected = np.tanh(pooled.numpy() @ weights["pre_logits/kernel"] + weights["pre_logits/bias"])
    np.testing.assert_allclose(features.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_a_headless_transformers_folder_gives_its_pooler_output(tmp_path, one_thread) -> None:
    theirs = hf_model("testing", (32, 32), pooler=True)  # no head, as an in21k folder
    folder = tmp_path / "vit-in21k"
    theirs.save_pretrained(folder)
    images = torch.randn(2, 3, 32, 32)
    ours = load_model(folder, keep_pre_logits=True).model
    with torch.no_grad():
        torch.testing.assert_close(
            ours.forward_features(images)[0],
            theirs(pixel_values=images).pooler_output,
            atol=1e-5,
            rtol=0,
        )
    document = fewshot_script.main(
        [f"--checkpoint={folder}", "--dataset=digits", "--shots=2", "--seeds=1", "--num_workers=0"]
    )
    (entry,) = document["evaluations"]
    assert entry["pre_logits"]
    assert entry["representation_width"] == TESTING.hidden_size
    assert entry["results"][0]["count"] == 360


def test_big_vision_preprocessing() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    out = ResizeCentralCrop((40, 48), (32, 32))(image)
    # tf.image.resize (bilinear, half-pixel, no antialias) = F.interpolate; uint8 by truncation.
    source = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    resized = F.interpolate(source, (40, 48), mode="bilinear", align_corners=False)[0]
    expected = resized.clamp(0, 255).trunc()[:, 4:36, 8:40] / 255 * 2 - 1
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    white = ResizeCentralCrop((256, 256), (224, 224))(np.full((8, 8, 3), 255, np.uint8))
    assert bool((white == 1.0).all())  # 255 stays 255 (a sum of weights below 1 would not)


# --------------------------------------------------------------------------------------------
# fewshot.py end to end


def _digits_features(model: VisionTransformer, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """forward_features of a digits split, embedded here in one batch, without fewshot.py."""
    split = DigitsDataset(train=train, transform=build_transforms(32, train=False))
    images = torch.stack([split[i][0] for i in range(len(split))])
    with torch.no_grad():
        return model.eval().forward_features(images)[0].numpy(), np.array(split.targets)


class CountForwards:
    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls = 0
        real = VisionTransformer.forward_features

        def counted(model, *args, **kwargs):
            self.calls += 1
            return real(model, *args, **kwargs)

        monkeypatch.setattr(VisionTransformer, "forward_features", counted)


def test_two_checkpoints_json_table_and_cache(
    tmp_path, best_checkpoint, monkeypatch, capsys, caplog, one_thread
) -> None:
    models = [distinct_model("testing", 32, 10, seed=s) for s in (0, 1)]
    paths = [
        best_checkpoint(m, name=n, dataset="digits") for m, n in zip(models, "ab", strict=True)
    ]
    output, cache = tmp_path / "fewshot.json", tmp_path / "cache"
    argv = [
        *("--checkpoint", *map(str, paths)),
        *("--dataset", "digits", "--shots", "1", "5", "--seeds", "2"),
        *("--l2_reg", "64", "1024", "--num_workers", "0", "--batch_size", "100"),
        *("--cache_dir", str(cache), "--output", str(output)),
    ]
    counter = CountForwards(monkeypatch)
    document = fewshot_script.main(argv)
    assert counter.calls == 2 * (15 + 4)  # 1,437 + 360 images in batches of 100, per model
    assert json.loads(output.read_text()) == document
    assert document["num_classes"] == 10
    assert document["seeds"] == [0, 1]
    evaluations = document["evaluations"]
    assert [(Path(e["checkpoint"]).name, e["l2_reg"]) for e in evaluations] == [
        ("a_checkpoint.bin", 64.0),
        ("a_checkpoint.bin", 1024.0),
        ("b_checkpoint.bin", 64.0),
        ("b_checkpoint.bin", 1024.0),
    ]
    for model, path, entries in zip(models, paths, (evaluations[:2], evaluations[2:]), strict=True):
        train, test = _digits_features(model, True), _digits_features(model, False)
        cached = sorted(cache.glob("digits-train-*.npz"))
        assert len(cached) == 2
        for e in entries:
            assert e["sha256"] == json.loads(path.with_suffix(".json").read_text())["sha256"]
            assert e["representation_width"] == TESTING.hidden_size
            assert not e["pre_logits"]
            assert (e["train_images"], e["test_images"]) == (1437, 360)
            assert [(r["shots"], r["seed"]) for r in e["results"]] == [
                (1, 0), (5, 0), (1, 1), (5, 1)
            ]  # fmt: skip
            for r in e["results"]:
                assert r["count"] == 360
                assert r["accuracy"] == r["correct"] / 360
                here = fewshot_accuracy(*train, *test, r["shots"], r["seed"], e["l2_reg"])
                assert abs(here - r["accuracy"]) <= 1 / 360  # batched vs one-batch float noise
            five = [r["accuracy"] for r in e["results"] if r["shots"] == 5]
            assert e["summary"][1] == {
                "shots": 5,
                "mean": pytest.approx(np.mean(five)),
                "std": pytest.approx(np.std(five)),
                "seeds": 2,
            }
    out = capsys.readouterr().out
    assert "a_checkpoint.bin" in out
    assert "b_checkpoint.bin" in out
    assert "l2_reg 64" in out
    assert "l2_reg 1024" in out
    a, b = evaluations[1]["summary"][1], evaluations[3]["summary"][1]
    block = out.split("l2_reg 1024")[1].splitlines()
    assert block[1].split() == ["shots", "a_checkpoint.bin", "b_checkpoint.bin"]
    assert block[3].split() == [
        "5",
        *(f"{100 * a['mean']:.2f}", "±", f"{100 * a['std']:.2f}"),
        *(f"{100 * b['mean']:.2f}", "±", f"{100 * b['std']:.2f}"),
    ]

    # Again, with another l2 and one more seed: no image embedded, the same numbers.
    counter.calls = 0
    again = fewshot_script.main([*argv[:-2], "--seeds", "3", "--l2_reg", "1024"])
    assert counter.calls == 0
    for first, second in zip((evaluations[1], evaluations[3]), again["evaluations"], strict=True):
        assert second["results"][:4] == first["results"]
        assert [r["seed"] for r in second["results"]] == [0, 0, 1, 1, 2, 2]

    # A damaged cache file is embedded again, with a warning, and gives the same numbers.
    for damaged in cache.glob("digits-test-*.npz"):
        damaged.write_bytes(b"not an npz")
    redone = fewshot_script.main([*argv[:-2], "--l2_reg", "1024"])
    assert counter.calls == 2 * 4
    assert [e["results"] for e in redone["evaluations"]] == [
        evaluations[1]["results"],
        evaluations[3]["results"],
    ]

    # So is an entry whose key is right but whose features or labels are not: the test split's
    # 360 features of one model NaN, of the other labels beyond the 10 classes.
    damage = (lambda f, y: (np.full_like(f, np.nan), y), lambda f, y: (f, y + 10))
    for damaged, change in zip(sorted(cache.glob("digits-test-*.npz")), damage, strict=True):
        with np.load(damaged) as data:
            features, labels = change(data["features"], data["labels"])
            save_npz(damaged, {"features": features, "labels": labels, "key": data["key"]})
    counter.calls = 0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        mended = fewshot_script.main([*argv[:-2], "--l2_reg", "1024"])
    assert counter.calls == 2 * 4
    assert [e["results"] for e in mended["evaluations"]] == [
        e["results"] for e in redone["evaluations"]
    ]
    warned = [r.getMessage() for r in caplog.records if "damaged feature cache" in r.getMessage()]
    assert len(warned) == 2
    assert any("(features that are not finite)" in w for w in warned)
    assert any("(labels from 10 to 19, not classes 0 to 9)" in w for w in warned)


def test_imagefolder_warns_about_short_classes(tmp_path, caplog, one_thread) -> None:
    root = tmp_path / "flowers"
    make_image_folder(root, test_name="test", classes=("cat", "dog", "owl"), n=3)
    (root / "train" / "owl" / "0.png").unlink()  # owl: 2 training images
    path = tmp_path / "official.npz"
    model = distinct_model("testing", 32, 7)
    from models.npz import state_dict_to_npz

    save_npz(path, state_dict_to_npz(model.state_dict(), TESTING))
    with caplog.at_level(logging.WARNING):
        document = fewshot_script.main(
            [
                *("--checkpoint", str(path), "--model_type", "testing"),
                *("--dataset", "imagefolder", "--data_dir", str(root), "--shots", "1", "3"),
                *("--num_workers", "0", "--preprocess", "big_vision"),
            ]
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "3-shot: 1 class(es) have fewer than 3 training images and contribute all they have "
        "(as big_vision does): owl (2)."
    ]
    (entry,) = document["evaluations"]
    assert (entry["train_images"], entry["test_images"]) == (8, 6)
    assert entry["preprocess"] == "big_vision resize 37x37 central_crop 32x32"


# --------------------------------------------------------------------------------------------
# Bad input: one message, exit 2


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--shots", "0"], "argument --shots: must be at least 1, got 0"),
        (["--l2_reg", "0"], "argument --l2_reg: must be above 0, got 0"),
        (["--seeds", "-1"], "argument --seeds: must be at least 1, got -1"),
        (["--seeds", "1001"], "argument --seeds: must be at most 1000, got 1001"),
        (["--output", "r.csv"], "--output must end in .json"),
        (["--resize_size", "256"], "--resize_size applies to --preprocess big_vision only"),
        (["--preprocess", "tf"], "argument --preprocess: invalid choice: 'tf'"),
    ],
)
def test_bad_flags(tmp_path, capsys, extra, expected) -> None:
    argv = ["--checkpoint", str(tmp_path / "x.bin"), "--dataset", "digits", *extra]
    assert expected in expect_user_error(fewshot_script.main, argv, capsys)


def test_bad_files_and_folders(tmp_path, capsys) -> None:
    err = expect_user_error(
        fewshot_script.main,
        ["--checkpoint", str(tmp_path / "nope.npz"), "--dataset", "digits"],
        capsys,
    )
    assert "nope.npz does not exist" in err
    only_val = tmp_path / "val_only"
    (only_val / "val" / "cat").mkdir(parents=True)
    path = tmp_path / "official.npz"
    save_npz(path, fake_checkpoint(TESTING, 10, 32))
    argv = [
        *("--checkpoint", str(path), "--model_type", "testing"),
        *("--dataset", "imagefolder", "--data_dir", str(only_val)),
    ]
    err = expect_user_error(fewshot_script.main, argv, capsys)
    assert "needs --data_dir with train/ and val/ (or test/) folders" in err
    small = [*argv[:4], "--dataset", "digits", "--preprocess", "big_vision", "--resize_size", "16"]
    err = expect_user_error(fewshot_script.main, small, capsys)
    assert "A 32x32 crop does not fit in a 16x16 resize" in err


def test_features_that_are_not_finite_have_no_fit() -> None:
    """NaN features used to end in numpy's LinAlgError from the eigendecomposition."""
    x, y = _blobs(40, 8, 4, seed=0)
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match="features must be finite"):
        fewshot_evaluate(x, y, x, y, shots=(5,), seeds=1)


def test_a_diverged_checkpoint_is_one_message(tmp_path, capsys) -> None:
    weights = fake_checkpoint(TESTING, 10, 32)
    path = tmp_path / "diverged.npz"
    save_npz(path, {k: np.full_like(v, np.nan) for k, v in weights.items()})
    argv = ["--checkpoint", str(path), "--model_type", "testing", "--dataset", "digits"]
    err = expect_user_error(fewshot_script.main, [*argv, "--num_workers", "0"], capsys)
    assert f"{path}: " in err
    assert "weight tensor(s) hold NaN or infinite values (first: embeddings." in err


def test_features_that_overflow_are_one_message(tmp_path, capsys) -> None:
    """Finite weights whose features are not: the final LayerNorm's scale overflows float32."""
    weights = fake_checkpoint(TESTING, 10, 32)
    weights["Transformer/encoder_norm/scale"] = np.full_like(
        weights["Transformer/encoder_norm/scale"], 3e38
    )
    path = tmp_path / "huge.npz"
    save_npz(path, weights)
    argv = ["--checkpoint", str(path), "--model_type", "testing", "--dataset", "digits"]
    argv += ["--num_workers", "0", "--cache_dir", str(tmp_path / "cache")]
    err = expect_user_error(fewshot_script.main, argv, capsys)
    assert f"{path}: its features of the digits train images are not finite" in err
    assert "pass another checkpoint" in err
    assert not list((tmp_path / "cache").glob("*.npz"))  # nothing cached


def test_an_existing_output_or_the_checkpoints_sidecar_is_never_replaced_unasked(
    tmp_path, capsys, best_checkpoint
) -> None:
    checkpoint = best_checkpoint(VisionTransformer("testing", 32, 10))
    sidecar = checkpoint.with_suffix(".json")
    before = sidecar.read_text()
    earlier = tmp_path / "fewshot.json"
    earlier.write_text("{}")
    argv = ["--checkpoint", str(checkpoint), "--dataset", "digits", "--output"]
    err = expect_user_error(fewshot_script.main, [*argv, str(earlier)], capsys)
    assert f"{earlier} already exists; pass --overwrite to replace it" in err
    err = expect_user_error(fewshot_script.main, [*argv, str(sidecar), "--overwrite"], capsys)
    assert f"Cannot write {sidecar}: {sidecar} is read from there" in err
    assert (earlier.read_text(), sidecar.read_text()) == ("{}", before)


@pytest.mark.slow
def test_under_torchrun_equals_one_process(
    tmp_path, best_checkpoint, monkeypatch, capsys, one_thread
) -> None:
    path = best_checkpoint(distinct_model("testing", 32, 10), dataset="digits")
    argv = [
        *("--checkpoint", str(path), "--dataset", "digits", "--num_workers", "1"),
        *("--shots", "1", "10", "--seeds", "2"),
    ]
    # One process: this one, on one thread, as the torchrun workers below.
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    capsys.readouterr()
    fewshot_script.main([*argv, "--output", str(tmp_path / "run0.json")])
    assert capsys.readouterr().out.count("Few-shot linear accuracy") == 1
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    result = subprocess.run(
        [*torchrun, "fewshot.py", *argv, "--output", str(tmp_path / "run1.json")],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Few-shot linear accuracy") == 1  # printed by rank 0 only
    outputs = [json.loads((tmp_path / f"run{i}.json").read_text()) for i in (0, 1)]
    (one,), (two,) = outputs[0]["evaluations"], outputs[1]["evaluations"]
    assert {k: v for k, v in one.items() if k not in ("results", "summary")} == {
        k: v for k, v in two.items() if k not in ("results", "summary")
    }
    assert [(r["shots"], r["seed"]) for r in one["results"]] == [
        (r["shots"], r["seed"]) for r in two["results"]
    ]
    for a, b in zip(one["results"], two["results"], strict=True):
        # Shards batch other images together: float noise may move one borderline image.
        assert abs(a["correct"] - b["correct"]) <= 1
