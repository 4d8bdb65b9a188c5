"""Hugging Face `datasets` tables as a source (`--dataset hf --data_dir DIR`).

DIR holds a `DatasetDict` saved with `save_to_disk`, or parquet files named by split (as
`to_parquet` writes them, or as a Hub repository holds them), or one folder per split (see the
layouts in `DATASETS["hf"].layout`); the splits are `train` and `test` (`validation` when there
is no `test`). Saved datasets are memory-mapped where they are; parquet files are converted
once into the `datasets` cache (`HF_DATASETS_CACHE`), as `datasets.load_dataset` does.

A split is a column of images (an `Image` feature, or encoded image bytes) and a column of
integer labels, `image` and `label` unless `Columns` names others. The class names are the
label feature's `ClassLabel.names`; without a `ClassLabel`, the distinct label values, sorted,
written as strings ("0", "1", ...), and a label's class is its place among them. Images are
decoded by `read_image`, as an image folder's files are, then preprocessed by the same
path (`utils.data.loaders`); an unreadable one is skipped in the same way.

`datasets` is optional: it is imported only here, when a split is read.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import BinaryIO

from torch.utils.data import Dataset

from utils.data.preprocessing import BadImageError, UnreadableImages
from utils.data.registry import Columns, DatasetSpec
from utils.infra.errors import UserError

__all__ = ["HFImages", "read_hf"]

TEST_SPLITS = ("test", "validation")  # the first one present is the test split
UNLABELLED = -1  # what `datasets` stores for an image without a label (unlabelled test splits)


def read_hf(
    spec: DatasetSpec, data_dir: str, train: bool, download: bool, columns: Columns
) -> HFImages:
    """One split of the table in `data_dir`, untransformed (`utils.data.loaders.READERS`).

    Raises:
        UserError: `datasets` is not installed, `data_dir` is missing or in no layout this
            reads, the split or a column is missing, or the labels are not class indices.
    """
    hf = _datasets_package()
    root = Path(data_dir)
    names = ("train",) if train else TEST_SPLITS
    splits, layout = _find_splits(spec, root)
    name = next((n for n in names if n in splits), None)
    if name is None:
        wanted = "a train split" if train else "a test (or validation) split"
        held = ", ".join(sorted(splits))
        raise _layout_error(spec, f"{root} holds {layout} (splits: {held}), without {wanted}")
    source, where = splits[name], f"{root} ({name} split)"
    try:
        if isinstance(source, Path):  # a Dataset saved with save_to_disk
            table = hf.Dataset.load_from_disk(str(source))
            files = [Path(f["filename"]) for f in table.cache_files]
        else:
            table = hf.Dataset.from_parquet([str(f) for f in source], split=name)
            files = source
    except (OSError, ValueError, hf.exceptions.DatasetGenerationError) as err:
        raise UserError(f"{where} cannot be read: {err}") from None
    images, targets, classes = _images_and_labels(hf, table, columns, where)
    return HFImages(images, columns, targets, classes, where, files)


def _datasets_package():
    try:
        import datasets
    except ImportError:
        raise UserError(
            "--dataset hf reads with Hugging Face's `datasets` package, which is not installed: "
            "pip install datasets"
        ) from None
    return datasets


def _layout_error(spec: DatasetSpec, found: str) -> UserError:
    return UserError(
        f"--dataset hf needs --data_dir with train and test splits; {found}. Expected one of "
        f"these layouts:\n{spec.layout}"
    )


def _find_splits(spec: DatasetSpec, root: Path) -> tuple[dict[str, Path | list[Path]], str]:
    """The splits under `root` (a saved Dataset's folder, or parquet files), and the layout.

    Raises:
        UserError: `root` is missing, or holds none of the layouts (naming what it holds).
    """
    if not root.is_dir():
        raise _layout_error(spec, f"{root} {'is a file' if root.exists() else 'does not exist'}")
    if (root / "dataset_dict.json").is_file():
        try:
            names = json.loads((root / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"{root / 'dataset_dict.json'} cannot be read: {err!r}") from None
        return {n: root / n for n in names}, "a DatasetDict saved with save_to_disk"
    if (root / "state.json").is_file():
        raise _layout_error(
            spec,
            f"{root} holds one Dataset saved with save_to_disk, without splits (save a "
            "DatasetDict({'train': ..., 'test': ...}) instead)",
        )
    folders = [f for f in (root, root / "data") if f.is_dir()]  # data/: a Hub repository's
    entries = {f: sorted(e for e in f.iterdir() if not e.name.startswith(".")) for f in folders}
    for folder in folders:
        by_name: dict[str, list[Path]] = {}
        for path in entries[folder]:
            if path.is_file() and path.suffix == ".parquet":  # train-00000-of-00002.parquet
                by_name.setdefault(path.stem.split("-")[0], []).append(path)
        if by_name:
            return by_name, "parquet files named by split" + ("" if folder == root else " in data/")
    for folder in folders:
        by_folder: dict[str, Path | list[Path]] = {}
        for path in entries[folder]:
            if (path / "state.json").is_file():
                by_folder[path.name] = path
            elif path.is_dir() and any(path.glob("*.parquet")):
                by_folder[path.name] = sorted(path.glob("*.parquet"))
        if by_folder:
            return by_folder, "split folders" + ("" if folder == root else " in data/")
    held = sorted(e.name for e in root.iterdir())
    shown = ", ".join(held[:10]) + (", ..." if len(held) > 10 else "")
    raise _layout_error(
        spec, f"{root} holds {shown or 'nothing'}: no saved dataset, no parquet files"
    )


def _images_and_labels(hf, table, columns: Columns, where: str):
    """The table's image column (undecoded), the class of each row and the class names.

    Raises:
        UserError: a column is missing, holds no images or no integer labels, or a label is
            not a class.
    """
    for column, flag in ((columns.image, "image_column"), (columns.label, "label_column")):
        if column not in table.column_names:
            raise UserError(
                f"{where} has no column {column!r} (--{flag}); its columns are "
                f"{', '.join(table.column_names)}."
            )
    image = table.features[columns.image]
    if isinstance(image, hf.Image):
        table = table.cast_column(columns.image, hf.Image(decode=False))  # {bytes, path}
    elif not (isinstance(image, hf.Value) and image.dtype in ("binary", "large_binary")):
        raise UserError(
            f"{where}: column {columns.image!r} holds {image}, not images (an Image feature, or "
            "encoded image bytes); name the image column with --image_column."
        )
    label = table.features[columns.label]
    values = table.data.column(columns.label).to_pylist()
    if isinstance(label, hf.ClassLabel):
        classes = list(label.names)
    elif isinstance(label, hf.Value) and label.dtype.startswith(("int", "uint")):
        classes = None  # the distinct values, below
    else:
        raise UserError(
            f"{where}: column {columns.label!r} holds {label}, not integer labels; name the label "
            "column with --label_column, or make it a ClassLabel (e.g. "
            f"dataset.class_encode_column({columns.label!r}) for strings)."
        )
    unlabelled = [v for v in values if v is None or v < 0]
    if unlabelled:
        raise UserError(
            f"{where}: column {columns.label!r} has {len(unlabelled)} image(s) without a class "
            f"(label {unlabelled[0]}; {UNLABELLED} marks an image without a label, as in a test "
            "split published without labels); every image needs one."
        )
    if classes is None:
        distinct = sorted(set(values))
        classes = [str(v) for v in distinct]
        index = {v: i for i, v in enumerate(distinct)}
        values = [index[v] for v in values]
    elif values and max(values) >= len(classes):
        raise UserError(
            f"{where}: column {columns.label!r} has the label {max(values)}, but its ClassLabel "
            f"names {len(classes)} classes."
        )
    return table.select_columns([columns.image]), values, classes


class HFImages(UnreadableImages, Dataset):
    """One split of a `datasets` table: items are (PIL image, label), or (transform(image),
    label) once `transform` is set; an unreadable image gives None (`UnreadableImages`).

    Args:
        images: a table of one column, `columns.image`: undecoded images ({bytes, path}, or
            bytes).
        columns: the columns it was read from.
        targets: each row's class index.
        classes: the class names.
        root: what messages call the split (`DIR (train split)`).
        files: the files it is read from (the saved dataset's, or the parquet files).
    """

    def __init__(
        self,
        images,
        columns: Columns,
        targets: list[int],
        classes: list[str],
        root: str,
        files: list[Path],
    ):
        self.images = images
        self.columns = columns
        self.targets = targets
        self.classes = classes
        self.root = root
        self.files = files
        self.transform = None
        self.watch_images(len(targets))

    def __len__(self) -> int:
        return len(self.targets)

    def image_source(self, index: int) -> str | BinaryIO:
        cell = self.images[index][self.columns.image]
        data, path = (
            (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (cell, None)
        )
        if data:
            return io.BytesIO(data)
        if path:  # an Image feature may refer to a file instead of holding its bytes
            return path
        raise BadImageError(self.image_name(index), "the table holds no image there.")

    def image_name(self, index: int) -> str:
        return f"{self.root}, row {index}"

    def content(self, data_dir: str) -> list:
        """What identifies the split's images and labels: its files (path from `data_dir`,
        size, modification time) and its columns."""
        stats = [(f, f.stat()) for f in self.files]
        files = [[os.path.relpath(f, data_dir), s.st_size, s.st_mtime_ns] for f, s in stats]
        return [self.columns.image, self.columns.label, files]
