"""predict.py: batched predictions equal the model on each image alone; bad files are skipped."""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import predict
from models.modeling import VisionTransformer
from tests.helpers import expect_user_error, zoomed_pos_embed
from utils.data.loaders import build_transforms
from utils.evals.classification import top_k

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "bird", "fish"]
BAD = ("broken.jpg", "notes.jpg")


def _model(num_classes: int = len(CLASSES)) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer("testing", 32, num_classes).eval()
    nn.init.normal_(model.head.weight, std=1.0)  # a fresh head is zero: every class would tie
    return model


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Images of several sizes, modes and formats (one in a subfolder), a truncated JPEG, a
    text file named .jpg and a .txt file that is not picked up."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)

    def noise(height: int, width: int, channels: int) -> np.ndarray:
        shape = (height, width, channels) if channels > 1 else (height, width)
        return rng.integers(0, 256, shape, dtype=np.uint8)

    Image.fromarray(noise(30, 40, 3)).save(root / "a.png")
    Image.fromarray(noise(32, 32, 3)).save(root / "b.jpg", quality=95)
    Image.fromarray(noise(50, 20, 4), mode="RGBA").save(root / "d.png")
    Image.fromarray(noise(24, 24, 1), mode="L").save(root / "sub" / "c.png")
    Image.fromarray(noise(64, 64, 3)).save(root / "whole.jpg", quality=95)
    data = (root / "whole.jpg").read_bytes()
    (root / "whole.jpg").unlink()
    (root / "broken.jpg").write_bytes(data[: len(data) // 3])
    (root / "notes.jpg").write_text("not an image\n")
    (root / "readme.txt").write_text("skipped: not an image extension\n")
    return root


def _expected(model: VisionTransformer, path: Path, k: int) -> tuple[list[int], list[float]]:
    """Top-k of the model on one image alone, with eval.py's test-time preprocessing."""
    with Image.open(path) as image:
        x = build_transforms((32, 32), train=False)(image.convert("RGB"))
    with torch.no_grad():
        probs = model(x[None])[0][0].softmax(-1)
    values, indices = probs.topk(k)
    return indices.tolist(), values.tolist()


def _order(folder: Path) -> list[Path]:
    files = ["a.png", "b.jpg", "broken.jpg", "d.png", "notes.jpg", "sub/c.png"]
    return [folder / f for f in files]


def test_csv_equals_each_image_alone_and_lists_unreadable_files(
    best_checkpoint, folder, tmp_path, caplog, capsys, one_thread
) -> None:
    model = _model()
    ckpt = best_checkpoint(model, class_names=CLASSES)
    out = tmp_path / "preds.csv"
    argv = ["--checkpoint", str(ckpt), "--image", str(folder), "--output", str(out)]
    with caplog.at_level(logging.WARNING, logger="predict"):
        predict.main([*argv, "--top_k", "2", "--batch_size", "2", "--num_workers", "0"])
    assert "4 image(s)" in capsys.readouterr().out
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(r["path"]) for r in rows] == _order(folder)
    for row in rows:
        path = Path(row["path"])
        if path.name in BAD:
            assert row["label_1"] == ""
            assert row["error"]
            assert str(path) in caplog.text
            continue
        indices, probs = _expected(model, path, 2)
        assert [row["label_1"], row["label_2"]] == [CLASSES[i] for i in indices]
        got = [float(row["probability_1"]), float(row["probability_2"])]
        np.testing.assert_allclose(got, probs, atol=2e-6)
        assert row["error"] == ""
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert "truncated" in errors["broken.jpg"]
    assert "cannot identify image file" in errors["notes.jpg"]


def test_another_img_size_predicts_with_position_embeddings_resized_as_vit_jax(
    best_checkpoint, folder, caplog, one_thread
) -> None:
    model = _model()  # 32x32: a 2x2 grid
    ckpt = best_checkpoint(model, class_names=CLASSES)
    with caplog.at_level(logging.INFO):
        records = predict.main(
            ["--checkpoint", str(ckpt), "--image", str(folder / "a.png"), "--img_size", "48"]
        )
    assert "resized from a 2x2 to a 3x3 patch grid" in caplog.text
    state = model.state_dict()  # the oracle: the grid zoomed with scipy, as vit_jax does
    state["embeddings.pos_embed"] = zoomed_pos_embed(state["embeddings.pos_embed"], (2, 2), (3, 3))
    at_48 = VisionTransformer("testing", 48, len(CLASSES)).eval()
    at_48.load_state_dict(state)
    with Image.open(folder / "a.png") as image:
        x = build_transforms((48, 48), train=False)(image.convert("RGB"))
    with torch.no_grad():
        probs = at_48(x[None])[0][0].softmax(-1)
    values, indices = probs.topk(len(CLASSES))
    assert records[0]["labels"] == [CLASSES[i] for i in indices.tolist()]
    np.testing.assert_allclose(records[0]["probabilities"], values.tolist(), atol=2e-6)


def test_json_from_worker_processes_matches_too(
    best_checkpoint, folder, tmp_path, one_thread
) -> None:
    model = _model()
    ckpt = best_checkpoint(model, class_names=CLASSES)
    out = tmp_path / "out" / "preds.json"
    argv = ["--checkpoint", str(ckpt), "--image", str(folder), "--output", str(out)]
    predict.main([*argv, "--batch_size", "1", "--num_workers", "1"])  # bad files alone in a batch
    document = json.loads(out.read_text())
    records = document["predictions"]
    assert [Path(r["path"]) for r in records] == _order(folder)
    for record in records:
        path = Path(record["path"])
        if path.name in BAD:
            assert set(record) == {"path", "error"}
            continue
        indices, probs = _expected(model, path, len(CLASSES))  # top_k 5 > 4 classes: all 4
        assert record["labels"] == [CLASSES[i] for i in indices]
        np.testing.assert_allclose(record["probabilities"], probs, atol=2e-6)
        assert [round(p, 6) for p in record["probabilities"]] == record["probabilities"]


def test_table_without_output_and_globs_in_order(
    best_checkpoint, folder, capsys, one_thread
) -> None:
    model = _model()
    ckpt = best_checkpoint(model, class_names=CLASSES)
    capsys.readouterr()
    images = [str(folder / "*.png"), str(folder / "notes.jpg")]
    predict.main(["--checkpoint", str(ckpt), "--image", *images, "--top_k", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [
        str(folder / "a.png"),
        str(folder / "d.png"),
        str(folder / "notes.jpg"),
    ]
    (top,), _ = _expected(model, folder / "d.png", 1)
    assert lines[1].split()[1] == CLASSES[top]
    assert "unreadable: PIL cannot identify image file: not an image" in lines[2]


def test_1000_class_heads_show_imagenet_names(best_checkpoint, folder, capsys, one_thread) -> None:
    from torchvision.models import ViT_B_16_Weights

    model = _model(num_classes=1000)
    ckpt = best_checkpoint(model)  # the sidecar names no classes
    capsys.readouterr()
    predict.main(["--checkpoint", str(ckpt), "--image", str(folder / "a.png"), "--top_k", "1"])
    (top,), _ = _expected(model, folder / "a.png", 1)
    name = ViT_B_16_Weights.IMAGENET1K_V1.meta["categories"][top]
    assert f"{name} (" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--image", "{tmp}/missing.jpg"], "does not exist"),
        (["--image", "{tmp}/images/*.gif"], "matches no file"),
        (["--image", "{tmp}/empty"], "has no images"),
        (["--image", "{tmp}/images", "--output", "preds.txt"], "must end in .csv or .json"),
        (["--image", "{tmp}/images", "--output", "{tmp}/empty.csv"], "is a directory"),
        (["--image", "{tmp}/images", "--top_k", "0"], "at least 1"),
        (["--image", "{tmp}/images", "--img_size", "30"], "not divisible"),
        (["--image", "{tmp}/images", "--img_size", "0"], "--img_size: must be at least 1, got 0"),
        (["--image", "{tmp}/images", "--batch_size", "-1"], "--batch_size: must be at least 1"),
        (["--image", "{tmp}/images", "--num_workers", "-1"], "--num_workers: cannot be negative"),
    ],
)
def test_bad_input_is_one_message_and_exit_2(
    best_checkpoint, folder, tmp_path, capsys, argv, expected
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.csv").mkdir()
    ckpt = best_checkpoint(_model(), class_names=CLASSES)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    err = expect_user_error(predict.main, ["--checkpoint", str(ckpt), *argv], capsys)
    assert expected in err


def test_missing_checkpoint_is_one_message(folder, tmp_path, capsys) -> None:
    argv = ["--checkpoint", str(tmp_path / "none_checkpoint.bin"), "--image", str(folder)]
    assert "does not exist" in expect_user_error(predict.main, argv, capsys)


@pytest.mark.slow
def test_torchrun_splits_the_files_and_writes_one_output_in_order(
    best_checkpoint, folder, tmp_path, monkeypatch, one_thread
) -> None:
    ckpt = best_checkpoint(_model(), class_names=CLASSES)
    common = ["--checkpoint", str(ckpt), "--image", str(folder), "--num_workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    single, double = tmp_path / "one.json", tmp_path / "two.json"
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # one process: this one, on one thread
        monkeypatch.delenv(name, raising=False)
    predict.main([*common, "--output", str(single)])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher += ["--nproc_per_node", "2"]
    subprocess.run(
        [*launcher, str(REPO / "predict.py"), *common, "--output", str(double)],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    one = json.loads(single.read_text())["predictions"]
    two = json.loads(double.read_text())["predictions"]
    assert [r["path"] for r in two] == [str(p) for p in _order(folder)]
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        assert a.get("labels") == b.get("labels")
        assert a.get("error") == b.get("error")
        np.testing.assert_allclose(
            a.get("probabilities", []), b.get("probabilities", []), atol=1e-6
        )


def test_a_full_disk_keeps_the_previous_output_and_names_only_predicts_flags(
    best_checkpoint, folder, tmp_path, capsys, monkeypatch, one_thread
) -> None:
    ckpt = best_checkpoint(_model(), class_names=CLASSES)
    out = tmp_path / "preds.csv"
    out.write_text("the previous predictions\n")

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    argv = ["--checkpoint", str(ckpt), "--image", str(folder), "--output", str(out)]
    err = expect_user_error(predict.main, [*argv, "--num_workers", "0", "--overwrite"], capsys)
    monkeypatch.undo()
    assert f"No space left on the device while saving {out}" in err
    assert "or pass another --output, then run again." in err
    assert "--output_dir" not in err  # train.py's flags, which predict.py does not have
    assert "--resume" not in err
    assert out.read_text() == "the previous predictions\n"


def test_an_existing_output_is_kept_unless_overwrite(
    best_checkpoint, folder, tmp_path, capsys, one_thread
) -> None:
    ckpt = best_checkpoint(_model(), class_names=CLASSES)
    out = tmp_path / "preds.csv"
    out.write_text("my earlier predictions\n")
    argv = ["--checkpoint", str(ckpt), "--image", str(folder), "--output", str(out)]
    err = expect_user_error(predict.main, [*argv, "--num_workers", "0"], capsys)
    assert f"{out} already exists; pass --overwrite to replace it, or another --output." in err
    assert out.read_text() == "my earlier predictions\n"
    predict.main([*argv, "--num_workers", "0", "--overwrite"])
    assert out.read_text().startswith("path,label_1,probability_1")


def test_the_checkpoints_sidecar_is_never_an_output(
    best_checkpoint, folder, capsys, caplog, one_thread
) -> None:
    ckpt = best_checkpoint(_model(), class_names=CLASSES)
    sidecar = ckpt.with_suffix(".json")
    before = sidecar.read_text()
    argv = ["--checkpoint", str(ckpt), "--image", str(folder), "--output", str(sidecar)]
    err = expect_user_error(predict.main, [*argv, "--num_workers", "0", "--overwrite"], capsys)
    assert f"Cannot write {sidecar}: {sidecar} is read from there, and is never replaced" in err
    assert sidecar.read_text() == before
    with caplog.at_level(logging.WARNING):
        predict.main(["--checkpoint", str(ckpt), "--image", str(folder), "--num_workers", "0"])
    assert not [r for r in caplog.records if r.name == "utils.infra.loading"]  # still verified


def test_top_k():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert [label for label, _ in top_k(logits, 2)[0]] == ["1", "3"]
    names = ["a", "b", "c", "d"]
    preds = top_k(logits, 10, names)[0]
    assert [label for label, _ in preds] == ["b", "d", "c", "a"]
    assert sum(p for _, p in preds) == pytest.approx(1.0)


def test_a_split_held_in_memory_is_named_by_place(best_checkpoint, one_thread) -> None:
    """--dataset digits: every test image predicted, named by its place in the split, with the
    predictions the model gives the split's images (eval.py's preprocessing) in batches."""
    from utils.data.loaders import build_split

    model = _model(10)
    checkpoint = str(best_checkpoint(model))
    records = predict.main(
        ["--checkpoint", checkpoint, "--dataset", "digits", "--num_workers", "0", "--top_k", "1"]
    )
    split, _ = build_split("digits", "unused", train=False)
    assert [r["path"] for r in records] == [f"digits test #{i}" for i in range(len(split))]
    transform = build_transforms((32, 32), train=False)
    images = torch.stack([transform(split[i][0]) for i in range(len(split))])
    with torch.no_grad():
        best = model(images)[0].argmax(-1).tolist()
    assert [int(r["labels"][0]) for r in records] == best


def test_images_or_a_dataset_not_both(capsys) -> None:
    for argv in (
        ["--checkpoint", "c.bin"],
        ["--checkpoint", "c.bin", "--image", "a.jpg", "--dataset", "digits"],
    ):
        with pytest.raises(SystemExit) as info:
            predict.parse_args(argv)
        assert info.value.code == 2
        assert "--image" in capsys.readouterr().err
