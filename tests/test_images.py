"""Images in a user's folder: 16-bit files convert to what they show; a file that cannot be read
is named and skipped, never fatal, or refused at start-up with `strict_images`."""

from __future__ import annotations

import logging
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.modeling import VisionTransformer
from tests.helpers import make_image_folder, set_epoch
from utils.data.loaders import ImageFolderFiles, build_transforms, get_loader, prepare_batch
from utils.data.preprocessing import BadImageError, find_images, read_image, to_rgb
from utils.evals.classification import evaluate
from utils.infra.errors import UserError


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares `width` x `height` RGB pixels and holds none: what PIL sees of a
    decompression bomb before decoding it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def _add_bad_files(folder: Path) -> list[Path]:
    """A truncated JPEG, a text file named .jpg and a 196-megapixel PNG, in `folder`."""
    rng = np.random.default_rng(0)
    good = folder / "good.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(good, quality=90)
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    good.unlink()
    text = folder / "notes.jpg"
    text.write_text("shopping list: milk, eggs")
    huge = folder / "huge.png"
    _png_header_only(huge, 14_000, 14_000)
    return [truncated, text, huge]


def _args(root: Path, **overrides) -> dict:
    args = {
        "dataset": "imagefolder",
        "data_dir": str(root),
        "img_size": 32,
        "seed": 0,
        "num_workers": 0,
        "micro_batch_size": 4,
        "eval_batch_size": 4,
        "holdout_fraction": 0.0,
    }
    return {**args, **overrides}


def test_a_16_bit_png_becomes_the_8_bit_image_it_shows(tmp_path) -> None:
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    path = tmp_path / "depth.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    expected = np.rint(ramp / 257.0).astype(np.uint8)  # 65535 / 257 = 255
    rgb = np.asarray(read_image(path))
    assert rgb.shape == (64, 64, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)
    assert (rgb == 255).mean() < 0.01  # `convert("RGB")` made 99.6 % of it white
    older = Image.fromarray(ramp.astype(np.int32))  # mode "I", as older Pillow opens it
    np.testing.assert_array_equal(np.asarray(to_rgb(older))[..., 0], expected)
    transform = build_transforms(32, train=False)  # a PIL image handed to the transform as is
    torch.testing.assert_close(
        transform(Image.open(path)), transform(np.repeat(expected[..., None], 3, axis=-1))
    )


def test_a_decompression_bomb_is_refused_at_once_naming_the_file(tmp_path) -> None:
    for side, pixels in ((14_000, "196,000,000"), (10_000, "100,000,000")):
        path = tmp_path / f"huge{side}.png"
        _png_header_only(path, side, side)
        start = time.perf_counter()
        with pytest.raises(BadImageError) as info:
            read_image(path)
        assert time.perf_counter() - start < 1.0  # no attempt to decode it
        assert str(info.value).startswith(f"{path}: it has {pixels} pixels, more than the")
        assert "decompression bombs" in str(info.value)


def test_bad_images_are_named_once_and_skipped_and_batches_keep_their_size(
    tmp_path, caplog
) -> None:
    root = tmp_path / "flowers"
    make_image_folder(root, n=6)
    bad = _add_bad_files(root / "train" / "cat")
    bad_val = _add_bad_files(root / "val" / "dog")
    with caplog.at_level(logging.WARNING):
        train_loader, _, test_loader = get_loader(**_args(root))
        epochs = []
        for epoch in range(2):
            set_epoch(train_loader, epoch)
            epochs.append([prepare_batch(batch, "cpu") for batch in train_loader])
    assert len(train_loader.dataset) == 12 + 3  # the bad files are still indices ...
    for batches in epochs:
        assert len(batches) == 15 // 4
        assert all(images.shape == (4, 3, 32, 32) for images, _ in batches)  # ... filled in
        assert all(torch.isfinite(images).all() for images, _ in batches)
    warnings = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    for path in bad:
        assert sum(str(path) in message for message in warnings) == 1, path  # once per run
    assert any("truncated or damaged" in message for message in warnings)
    assert any("PIL cannot identify image file" in message for message in warnings)
    files = train_loader.dataset.base.dataset
    assert sorted(files.unreadable()) == sorted(str(p) for p in bad)

    # Substitutes and crops depend on (seed, epoch, index) only: loader workers (which share
    # the record of bad files) and a resumed run see the same batches.
    again, _, _ = get_loader(**_args(root, num_workers=2))
    set_epoch(again, 1)
    batches = (prepare_batch(batch, "cpu") for batch in again)
    for (images, labels), (expected, expected_labels) in zip(batches, epochs[1], strict=True):
        torch.testing.assert_close(images, expected, rtol=0, atol=0)
        assert torch.equal(labels, expected_labels)

    # Evaluation leaves them out of the count.
    torch.manual_seed(0)
    model = VisionTransformer("testing", 32, num_classes=2)
    result = evaluate(model, test_loader, torch.device("cpu"))
    assert result["count"] == 4  # 2 + 2 readable validation images of the 4 + 3 files
    assert len(test_loader.dataset) == 4 + len(bad_val)


def test_bad_images_held_out_as_minival_are_left_out_of_its_count(tmp_path) -> None:
    root = tmp_path / "flowers"
    make_image_folder(root, n=6)
    bad = _add_bad_files(root / "train" / "cat")  # sorted last: the held-out end of the class
    _, minival_loader, _ = get_loader(**_args(root, holdout_fraction=0.3))
    held_out = [
        minival_loader.dataset.base.dataset.samples[i][0]
        for i in minival_loader.dataset.base.indices
    ]
    assert set(map(str, bad)) <= set(held_out)
    torch.manual_seed(0)
    result = evaluate(VisionTransformer("testing", 32, num_classes=2), minival_loader, "cpu")
    assert result["count"] == len(held_out) - len(bad)


def test_strict_images_refuses_at_start_up_listing_every_bad_file(tmp_path) -> None:
    root = tmp_path / "flowers"
    make_image_folder(root, n=6)
    assert get_loader(**_args(root, strict_images=True))[0] is not None  # all readable: fine
    bad = _add_bad_files(root / "train" / "cat")
    with pytest.raises(UserError) as info:
        get_loader(**_args(root, strict_images=True))
    message = str(info.value)
    assert "3 of the 15 images in" in message
    for path in bad:
        assert str(path) in message
    assert "truncated or damaged" in message
    assert "more than the" in message
    assert "cannot identify image file" in message
    assert "leave out --strict_images" in message


def test_hidden_entries_and_links_to_folders_are_left_out_and_counted(tmp_path, caplog) -> None:
    """A symlink loop would multiply images (under wrong labels), `.ipynb_checkpoints` would be
    a class: both are left out, with one warning; a link to a file counts as that file."""
    root = tmp_path / "flowers"
    make_image_folder(root, n=2)
    train_dir = root / "train"
    (train_dir / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(train_dir / ".ipynb_checkpoints" / "0.png")
    Image.new("RGB", (8, 8)).save(train_dir / "cat" / ".hidden.png")
    (train_dir / "cat" / "loop").symlink_to(train_dir)  # back into the tree: a cycle
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "far.png")
    (train_dir / "dog" / "out").symlink_to(outside)  # a folder out of the tree
    (train_dir / "dog" / "linked.png").symlink_to(outside / "far.png")  # a file: kept
    (train_dir / "dog" / "broken.png").symlink_to(tmp_path / "missing.png")
    want = sorted(
        [str(train_dir / c / f"{i}.png") for c in ("cat", "dog") for i in range(2)]
        + [str(train_dir / "dog" / "linked.png")]
    )
    with caplog.at_level(logging.WARNING):
        files = ImageFolderFiles(str(train_dir))
    assert files.classes == ["cat", "dog"]
    assert sorted(path for path, _ in files.samples) == want
    assert [t for p, t in files.samples if "linked" in p] == [1]
    lines = [r.getMessage() for r in caplog.records if "Left out of" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "2 hidden entries" in lines[0]
    assert ".ipynb_checkpoints" in lines[0]
    assert "2 links to folders (not followed)" in lines[0]
    assert "1 broken links" in lines[0]

    # predict.py and visualize.py walk folders by the same rules.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        found = find_images([train_dir])
    assert sorted(map(str, found)) == want
    assert sum("Left out of" in r.getMessage() for r in caplog.records) == 1
