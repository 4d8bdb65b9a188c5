"""`--dataset hf`: Hugging Face `datasets` tables (saved with `save_to_disk`, or parquet files).

The oracle is the image folder: the same images written as PNG files in `train/<class>/` and
`test/<class>/` and as a table in the same order must give the same batches, the same trained
weights (bit for bit), the same evaluation and the same few-shot accuracies. Tables are built
here, offline, with `datasets` itself.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import analyze
import eval as eval_script
import fewshot as fewshot_script
import predict
import sweep
import train
from models.modeling import VisionTransformer
from tests.helpers import (
    assert_same_batches,
    distinct_model,
    expect_user_error,
    load_checkpoint,
    loader_args,
    set_epoch,
    tiny_args,
)
from utils.data.loaders import (
    READERS,
    WithTransform,
    build_split,
    build_transforms,
    get_loader,
    prepare_batch,
    skip_unreadable,
)
from utils.data.registry import DATASETS, Columns
from utils.evals.analysis import dataset_batches
from utils.infra.errors import UserError
from utils.infra.file_io import safe_load
from utils.infra.train_state import last_state_path

hf = pytest.importorskip("datasets")

CLASSES = ("ant", "bee", "cow")
LAYOUTS = ("save_to_disk", "parquet", "hub", "split_folders", "saved_split_folders")


@pytest.fixture(autouse=True)
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parquet files are converted into the `datasets` cache: keep it inside the test."""
    monkeypatch.setattr(hf.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def pictures(per_class: int, seed: int) -> list[tuple[Image.Image, int]]:
    """Random RGB images of various sizes, class by class (an image folder's order)."""
    rng = np.random.default_rng(seed)
    return [
        (Image.fromarray(rng.integers(0, 256, (10 + 3 * i, 14 + 2 * c, 3), dtype=np.uint8)), c)
        for c in range(len(CLASSES))
        for i in range(per_class)
    ]


def table(items: list[tuple[Image.Image, int]], image: str = "image", label: str = "label"):
    features = hf.Features({image: hf.Image(), label: hf.ClassLabel(names=list(CLASSES))})
    columns = {image: [im for im, _ in items], label: [y for _, y in items]}
    return hf.Dataset.from_dict(columns, features=features)


def write_folder(root: Path, splits: dict[str, list[tuple[Image.Image, int]]]) -> None:
    """`root/<split>/<class>/<i>.png` (fewer than 10 images per class: names sort as numbers)."""
    for split, items in splits.items():
        for image, label in items:
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{len(list(folder.iterdir()))}.png")


def write_table(root: Path, splits: dict, layout: str = "save_to_disk") -> Path:
    """The splits (name -> `datasets.Dataset`) in one of the layouts --dataset hf reads."""
    root.mkdir(parents=True)
    if layout == "save_to_disk":
        hf.DatasetDict(splits).save_to_disk(str(root))
    for name, split in splits.items():
        if layout == "parquet":
            split.to_parquet(str(root / f"{name}-00000-of-00001.parquet"))
        elif layout == "hub":
            (root / "data").mkdir(exist_ok=True)
            split.to_parquet(str(root / "data" / f"{name}-00000-of-00001.parquet"))
        elif layout == "split_folders":
            (root / name).mkdir()
            split.to_parquet(str(root / name / "0000.parquet"))
        elif layout == "saved_split_folders":
            split.save_to_disk(str(root / name))
    return root


@pytest.fixture
def same_images(tmp_path: Path) -> tuple[Path, Path]:
    """The same images as an image folder and as a saved DatasetDict: (folder, table)."""
    splits = {"train": pictures(4, seed=0), "test": pictures(2, seed=1)}
    write_folder(tmp_path / "pics", splits)
    tables = {name: table(items) for name, items in splits.items()}
    return tmp_path / "pics", write_table(tmp_path / "table", tables)


# Batches of 3, held out: the last image of each class's 4 (image folders sort by class).
SMALL = {"micro_batch_size": 3, "eval_batch_size": 4, "holdout_fraction": 0.25}


def pixels(dataset, index: int) -> np.ndarray:
    return np.asarray(dataset[index][0])


# --------------------------------------------------------------------------------------------
# Reading


def test_registry_entry() -> None:
    spec = DATASETS["hf"]
    assert spec.reader in READERS
    assert (spec.in_memory, spec.published) == (False, False)  # per image, the user's files
    assert (spec.holdout_by_class, spec.flip, spec.crop_area) == (True, True, None)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_the_same_splits(tmp_path: Path, layout: str) -> None:
    train_items, test_items = pictures(2, seed=0), pictures(1, seed=1)
    splits = {"train": table(train_items), "test": table(test_items)}
    root = write_table(tmp_path / "t", splits, layout)
    for items, train_split in ((train_items, True), (test_items, False)):
        split, classes = build_split("hf", str(root), train_split)
        assert classes == list(CLASSES)
        assert split.targets == [label for _, label in items]
        for i, (image, _) in enumerate(items):
            np.testing.assert_array_equal(pixels(split, i), np.asarray(image))


def test_validation_stands_in_for_a_missing_test_split(tmp_path: Path) -> None:
    items = pictures(1, seed=0)
    root = write_table(tmp_path / "t", {"train": table(items), "validation": table(items[:2])})
    split, _ = build_split("hf", str(root), train=False)
    assert len(split) == 2


def test_labels_without_class_names_are_their_sorted_values(tmp_path: Path) -> None:
    images = [im for im, _ in pictures(1, seed=0)]
    features = hf.Features({"img": hf.Image(), "y": hf.Value("int64")})
    split = hf.Dataset.from_dict({"img": images, "y": [7, 3, 7]}, features=features)
    root = write_table(tmp_path / "t", {"train": split, "test": split}, "parquet")
    dataset, classes = build_split("hf", str(root), True, columns=Columns("img", "y"))
    assert classes == ["3", "7"]
    assert dataset.targets == [1, 0, 1]
    np.testing.assert_array_equal(pixels(dataset, 1), np.asarray(images[1]))


def test_encoded_bytes_without_an_image_feature(tmp_path: Path) -> None:
    """A table of PNG bytes (e.g. parquet written without the `datasets` features)."""
    items = pictures(1, seed=0)
    encoded = []
    for image, _ in items:
        image.save(tmp_path / "a.png")
        encoded.append((tmp_path / "a.png").read_bytes())
    features = hf.Features({"image": hf.Value("binary"), "label": hf.Value("int32")})
    split = hf.Dataset.from_dict(
        {"image": encoded, "label": [y for _, y in items]}, features=features
    )
    root = write_table(tmp_path / "t", {"train": split, "test": split})
    dataset, classes = build_split("hf", str(root), True)
    assert classes == ["0", "1", "2"]
    np.testing.assert_array_equal(pixels(dataset, 2), np.asarray(items[2][0]))


def test_batches_equal_the_image_folders(same_images: tuple[Path, Path]) -> None:
    """Training batches (crops and flips), minival (the end of each class) and test images."""
    folder, table_dir = same_images
    loaders = [
        get_loader(**loader_args(name, root, **SMALL))
        for name, root in (("imagefolder", folder), ("hf", table_dir))
    ]
    (f_train, f_minival, f_test), (t_train, t_minival, t_test) = loaders
    assert t_train.dataset.classes == list(CLASSES)
    assert (len(t_train.dataset), len(t_minival.dataset), len(t_test.dataset)) == (9, 3, 6)
    for epoch in (0, 1):
        for loader in (f_train, t_train):
            set_epoch(loader, epoch)
        assert_same_batches(t_train, f_train)
    for mine, theirs in ((t_minival, f_minival), (t_test, f_test)):
        for a, b in zip(mine, theirs, strict=True):
            a, b = prepare_batch(a, "cpu"), prepare_batch(b, "cpu")
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------------------------
# The scripts


def test_training_equals_the_image_folder_also_resumed_and_with_workers(
    same_images: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread
) -> None:
    """The same weights, bit for bit: an image folder; the table saved with save_to_disk,
    crashed at step 3 (last save at step 2) and resumed; the table as parquet files read by
    two loader workers."""
    folder, table_dir = same_images
    parquet = write_table(
        tmp_path / "parquet",
        {name: hf.load_from_disk(str(table_dir / name)) for name in ("train", "test")},
        "parquet",
    )
    common = {
        "train_batch_size": 3,
        "holdout_fraction": 0.25,
        "learning_rate": 0.1,
        "num_steps": 4,
        "eval_every": 2,
        "save_every": 2,
    }
    train.main(tiny_args(tmp_path, "folder", dataset="imagefolder", data_dir=folder, **common))
    real, calls = train.train_step, []

    def crash_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("crash")
        return real(*args, **kwargs)

    table_run = tiny_args(tmp_path, "table", dataset="hf", data_dir=table_dir, **common)
    with monkeypatch.context() as patch:
        patch.setattr(train, "train_step", crash_at_step_3)
        with pytest.raises(RuntimeError, match="crash"):
            train.main(table_run)
    train.main([*table_run, "--resume"])
    train.main(
        tiny_args(tmp_path, "parquet", dataset="hf", data_dir=parquet, num_workers=2, **common)
    )

    out = tmp_path / "out"
    folder_meta, folder_best = load_checkpoint(out, "folder")
    folder_last = safe_load(last_state_path(out, "folder"))["model"]
    assert folder_meta["class_names"] == list(CLASSES)
    for name in ("table", "parquet"):
        meta, best = load_checkpoint(out, name)
        assert meta["dataset"] == "hf"
        for key in ("class_names", "step", "accuracy", "selected_by"):
            assert meta[key] == folder_meta[key], (name, key)
        last = safe_load(last_state_path(out, name))["model"]
        for mine, theirs in ((best, folder_best), (last, folder_last)):
            assert mine.keys() == theirs.keys()
            for key, value in theirs.items():
                assert torch.equal(mine[key], value), (name, key)


def test_eval_and_fewshot_equal_the_image_folders(
    same_images: tuple[Path, Path], tmp_path: Path, best_checkpoint, one_thread
) -> None:
    folder, table_dir = same_images
    model = distinct_model("testing", img_size=32, num_classes=len(CLASSES))
    checkpoint = str(best_checkpoint(model, dataset="hf", class_names=list(CLASSES)))
    workers = ("--num_workers", "0")
    on_table = eval_script.main(
        [*workers, "--checkpoint", checkpoint, "--data_dir", str(table_dir)]
    )
    on_folder = eval_script.main(
        [*workers, "--checkpoint", checkpoint, "--dataset=imagefolder", "--data_dir", str(folder)]
    )
    assert (on_table["dataset"], on_table["count"]) == ("hf", 6)
    assert (on_table["loss"], on_table["accuracy"]) == (on_folder["loss"], on_folder["accuracy"])

    few = [*workers, "--checkpoint", checkpoint, "--shots", "1", "2", "--seeds", "2"]
    cache = tmp_path / "cache"
    table_few = fewshot_script.main(
        [*few, "--dataset", "hf", "--data_dir", str(table_dir), "--cache_dir", str(cache)]
    )
    folder_few = fewshot_script.main([*few, "--dataset", "imagefolder", "--data_dir", str(folder)])
    assert table_few["class_names"] == list(CLASSES)
    assert [e["results"] for e in table_few["evaluations"]] == [
        e["results"] for e in folder_few["evaluations"]
    ]
    assert len(list(cache.glob("hf-*.npz"))) == 2  # the table's splits, keyed by their files

    # analyze.py's images from the test split: the image folder's.
    for mine, theirs in zip(
        dataset_batches("hf", str(table_dir), (32, 32), 5, 2),
        dataset_batches("imagefolder", str(folder), (32, 32), 5, 2),
        strict=True,
    ):
        assert torch.equal(mine, theirs)


def test_every_script_takes_it() -> None:
    table_flags = ["--dataset", "hf", "--image_column", "img", "--label_column", "y"]
    args = train.parse_args(["--name", "x", *table_flags])
    assert (args.dataset, args.image_column, args.label_column) == ("hf", "img", "y")
    assert eval_script.parse_args(["--checkpoint", "c.bin", *table_flags]).dataset == "hf"
    assert fewshot_script.parse_args(["--checkpoint", "c.bin", *table_flags]).label_column == "y"
    assert analyze.parse_args(table_flags).image_column == "img"
    assert set(sweep.PRESETS) == set(DATASETS)


# --------------------------------------------------------------------------------------------
# Unreadable images, workers


def with_a_damaged_image(tmp_path: Path) -> Path:
    """Train and test splits of 6 images; training row 4 holds bytes that are no image."""
    items = pictures(2, seed=0)
    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=list(CLASSES))})
    rows = {"image": [image for image, _ in items], "label": [y for _, y in items]}
    rows["image"][4] = {"bytes": b"not an image", "path": None}
    split = hf.Dataset.from_dict(rows, features=features)
    return write_table(tmp_path / "t", {"train": split, "test": table(items)})


def test_an_unreadable_image_is_skipped_or_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = with_a_damaged_image(tmp_path)
    with pytest.raises(UserError, match=r"1 of the 6 images in .*\(train split\) cannot be read"):
        get_loader(**loader_args("hf", root, **SMALL, strict_images=True))
    train_loader = get_loader(**loader_args("hf", root, micro_batch_size=3, holdout_fraction=0))[0]
    with caplog.at_level(logging.WARNING):
        labels = torch.cat([prepare_batch(b, "cpu")[1] for b in train_loader])
    assert len(labels) == 6  # the next readable image took its place
    assert "Skipping an unreadable image (1 so far)" in caplog.text
    assert "(train split), row 4: PIL cannot identify image file" in caplog.text


def test_predict_on_a_table_equals_the_same_images_as_files(
    same_images: tuple[Path, Path], best_checkpoint, one_thread
) -> None:
    """predict.py --dataset hf: the table's test rows get the predictions the same images get
    as an image folder (--dataset imagefolder) and as files (--image), in the same order."""
    folder, table_root = same_images
    torch.manual_seed(0)
    model = VisionTransformer("testing", 16, len(CLASSES)).eval()
    torch.nn.init.normal_(model.head.weight, std=1.0)  # a fresh head is zero: classes would tie
    checkpoint = str(best_checkpoint(model, class_names=list(CLASSES)))
    common = ["--checkpoint", checkpoint, "--top_k", "3", "--num_workers", "0"]
    rows = predict.main([*common, "--dataset", "hf", "--data_dir", str(table_root)])
    in_folder = predict.main([*common, "--dataset", "imagefolder", "--data_dir", str(folder)])
    files = predict.main([*common, "--image", str(folder / "test")])
    assert len(rows) == 6
    assert [r["path"] for r in rows] == [f"{table_root} (test split), row {i}" for i in range(6)]
    assert [r["path"] for r in in_folder] == [r["path"] for r in files]
    for row, other, file in zip(rows, in_folder, files, strict=True):
        assert row["labels"] == other["labels"] == file["labels"]
        assert row["probabilities"] == other["probabilities"] == file["probabilities"]


def test_predict_names_an_unreadable_row_and_goes_on(
    tmp_path: Path, best_checkpoint, capsys
) -> None:
    root = with_a_damaged_image(tmp_path)
    model = VisionTransformer("testing", 16, len(CLASSES)).eval()
    checkpoint = str(best_checkpoint(model))
    argv = ["--checkpoint", checkpoint, "--dataset", "hf", "--data_dir", str(root)]
    records = predict.main([*argv, "--split", "train", "--num_workers", "1"])
    assert [("error" in r) for r in records] == [False] * 4 + [True] + [False]
    assert records[4]["path"] == f"{root} (train split), row 4"
    assert "PIL cannot identify image file" in records[4]["error"]
    err = expect_user_error(
        predict.main, [*argv[:2], "--dataset", "hf", "--data_dir", "none"], capsys
    )
    assert "does not exist" in err


@pytest.mark.slow  # ~8 s: a spawned worker imports torch
def test_a_spawned_worker_pickles_the_split_and_shares_what_it_cannot_read(
    tmp_path: Path,
) -> None:
    """Start methods other than fork (the default from Python 3.14 is forkserver) pickle the
    dataset; an unreadable image the worker meets is seen by this process."""
    split, classes = build_split("hf", str(with_a_damaged_image(tmp_path)), train=True)
    loader = torch.utils.data.DataLoader(
        WithTransform(split, build_transforms(16, train=False), classes),
        batch_size=3,
        num_workers=1,
        multiprocessing_context="spawn",
        collate_fn=skip_unreadable,
    )
    labels = torch.cat([labels for _, labels in loader]).tolist()
    assert labels == [0, 0, 1, 1, 2]  # row 4 left out
    assert split.unreadable() == [f"{tmp_path / 't'} (train split), row 4"]


# --------------------------------------------------------------------------------------------
# Mistakes: one message, exit code 2


def refused(tmp_path: Path, capsys: pytest.CaptureFixture, data_dir: Path, **flags) -> str:
    argv = tiny_args(tmp_path, dataset="hf", data_dir=data_dir, **flags)
    return expect_user_error(train.main, argv, capsys)


def test_missing_folder_and_unknown_layouts(tmp_path: Path, capsys) -> None:
    err = refused(tmp_path, capsys, tmp_path / "missing")
    assert "does not exist" in err
    assert "dataset_dict.json" in err  # the layouts are shown
    (tmp_path / "pics" / "train" / "cat").mkdir(parents=True)  # an image folder
    assert "holds train: no saved dataset, no parquet files" in refused(
        tmp_path, capsys, tmp_path / "pics"
    )
    split = table(pictures(1, seed=0))
    split.save_to_disk(str(tmp_path / "one"))
    assert "one Dataset saved with save_to_disk, without splits" in refused(
        tmp_path, capsys, tmp_path / "one"
    )
    write_table(tmp_path / "named", {"images": split}, "parquet")
    assert "parquet files named by split (splits: images), without a train split" in refused(
        tmp_path, capsys, tmp_path / "named"
    )
    write_table(tmp_path / "no_test", {"train": split})
    assert "(splits: train), without a test (or validation) split" in refused(
        tmp_path, capsys, tmp_path / "no_test"
    )


def test_missing_column_and_labels_that_are_no_classes(tmp_path: Path, capsys) -> None:
    items = pictures(1, seed=0)
    root = write_table(tmp_path / "t", {"train": table(items), "test": table(items)})
    err = refused(tmp_path, capsys, root, label_column="y")
    assert "has no column 'y' (--label_column); its columns are image, label." in err
    err = refused(tmp_path, capsys, root, image_column="label")
    assert "column 'label' holds ClassLabel" in err
    assert "name the image column with --image_column" in err

    images = [im for im, _ in items]
    for labels, message in (
        (["ant", "bee", "cow"], "not integer labels"),
        ([0, -1, 2], "1 image(s) without a class (label -1"),
    ):
        split = hf.Dataset.from_dict({"image": images, "label": labels}).cast_column(
            "image", hf.Image()
        )
        root = write_table(tmp_path / str(labels[1]), {"train": split, "test": split}, "parquet")
        assert message in refused(tmp_path, capsys, root)


def test_without_the_datasets_package(
    same_images: tuple[Path, Path], tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    err = refused(tmp_path, capsys, same_images[1])
    assert "`datasets` package, which is not installed: pip install datasets" in err
    get_loader(**loader_args("imagefolder", same_images[0], **SMALL))  # the others never import it


def test_a_sweep_refuses_a_table_without_a_test_split(tmp_path: Path, capsys) -> None:
    write_table(tmp_path / "t", {"train": table(pictures(1, seed=0))})
    argv = tiny_args(tmp_path, "s", dataset="hf", data_dir=tmp_path / "t", eval_every=0)
    err = expect_user_error(sweep.main, argv, capsys)
    assert "needs a test split" in err
    assert "without a test (or validation) split" in err
    assert not (tmp_path / "out").exists()
