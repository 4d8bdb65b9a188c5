"""The official input preprocessing (`vit_jax/input_pipeline.py`, `get_data`'s `_pp`), in float32.

Test: the uint8 RGB image is resized to the model size (bilinear, half-pixel centres, no
antialiasing, aspect ratio not kept), then `(x - 127.5) / 127.5`. Train: a box sampled as
`tf.image.sample_distorted_bounding_box(area_range=(0.05, 1.0), min_object_covered=0)` does
(TF's default `aspect_ratio_range=(0.75, 1.33)`, `max_attempts=100`), the same resize of that
box, and a horizontal flip with probability 0.5. Pixels are never rounded back to uint8.

Images are decoded by `read_image`: 16-bit files (PNG, TIFF) are scaled to 8 bits rather than
clipped, and a file that cannot be decoded (truncated, not an image, larger than PIL's
decompression-bomb limit) raises `BadImageError` naming it.

Two implementations of the same function:

- per image (`Preprocess`): PIL image or uint8 array in, (3, H, W) out;
- per batch on the training device (`resize_batch`), from uint8 pixels and the bilinear taps of
  each image (where each output row and column reads, and with what weight), so that loader
  workers only decode or gather uint8 pixels and sample each crop box and flip
  (`sample_augment`): `crop_resize_batch` finishes same-sized images held in memory (CIFAR)
  from their boxes; `pack_crops` packs crops of any size (decoded files, test images) and
  their taps in the worker.

Both reproduce `F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=False)`
(what `tf.image.resize` computes) to ~1e-6, including where the bilinear taps are clamped at
the border of a crop box; `grid_sample` and `roi_align` are not exact there.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import logging
import multiprocessing
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from utils.infra.errors import UserError

__all__ = [
    "ASPECT_RATIO",
    "CROP_AREA",
    "IMAGE_EXTENSIONS",
    "MAX_ATTEMPTS",
    "BadImageError",
    "Preprocess",
    "ResizeCentralCrop",
    "UnreadableImages",
    "Walk",
    "crop_resize_batch",
    "find_images",
    "pack_crops",
    "read_image",
    "readable_images",
    "resize",
    "resize_batch",
    "sample_augment",
    "sample_crop",
    "to_rgb",
    "walk_files",
]

logger = logging.getLogger(__name__)

CROP_AREA = (0.05, 1.0)  # `area_range` in vit_jax's training preprocessing
ASPECT_RATIO = (0.75, 1.33)  # TF's default `aspect_ratio_range` (width / height)
MAX_ATTEMPTS = 100  # TF's default; after that the crop is the whole image

Box = tuple[int, int, int, int]  # top, left, height, width
_EPS = float(np.float32(1e-7))  # TF's kEps: a float constant used in double arithmetic
# Up to this source side, bilinear resizing as two matrix products beats the interpolation
# kernel on a CPU (their cost grows with the source side; measured with 224 and 384 outputs).
_MATMUL_MAX_SIDE = 64


def _try_crop(
    height: int, width: int, min_area: np.float32, max_area: np.float32, ratio: np.float32, rng
) -> Box | None:
    """One attempt of TF's `GenerateRandomCrop`, in its float32 arithmetic; None if it fails."""
    # The height (not the area) is uniform between the bounds the area range allows.
    crop_h = int(np.rint(np.sqrt(min_area / ratio)))
    max_h = int(np.rint(np.sqrt(max_area / ratio)))
    if np.rint(max_h * ratio) > width:
        # The largest height whose rounded width still fits (TF computes this in double).
        max_h = int((width + 0.5 - _EPS) / float(ratio))
        if np.rint(max_h * ratio) > width:
            max_h -= 1
    max_h = min(max_h, height)
    crop_h = min(crop_h, max_h)
    if crop_h < max_h:
        crop_h += int(rng.integers(max_h - crop_h + 1))
    crop_w = int(np.rint(crop_h * ratio))
    # Let rounding not fail the attempt: one pixel taller if too small, shorter if too large.
    area = np.float32(crop_w * crop_h)
    if area < min_area:
        crop_h += 1
        crop_w = int(np.rint(crop_h * ratio))
        area = np.float32(crop_w * crop_h)
    if area > max_area:
        crop_h -= 1
        crop_w = int(np.rint(crop_h * ratio))
        area = np.float32(crop_w * crop_h)
    if (
        area < min_area
        or area > max_area
        or crop_w > width
        or crop_h > height
        or crop_w <= 0
        or crop_h <= 0
    ):
        return None
    # Offsets are uniform in [0, side - crop - 1]: TF never draws the last position.
    top = int(rng.integers(height - crop_h)) if crop_h < height else 0
    left = int(rng.integers(width - crop_w)) if crop_w < width else 0
    return top, left, crop_h, crop_w


def sample_crop(
    height: int,
    width: int,
    rng: np.random.Generator,
    area_range: tuple[float, float] = CROP_AREA,
    aspect_ratio_range: tuple[float, float] = ASPECT_RATIO,
    max_attempts: int = MAX_ATTEMPTS,
) -> Box:
    """A crop box of an image, distributed as `tf.image.sample_distorted_bounding_box` samples it.

    With no bounding boxes and `min_object_covered=0`, as vit_jax calls it: each attempt draws
    an aspect ratio uniformly from `aspect_ratio_range`, then a height uniformly among those
    whose area fits `area_range` (a fraction of the image), then the offsets; after
    `max_attempts` failed attempts the box is the whole image. This follows TF's
    `GenerateRandomCrop` step by step, including its float32 rounding (half to even). Returns
    (top, left, crop_height, crop_width).
    """
    f32 = np.float32
    # TF: `float relative_area * int width * int height`, in float32.
    min_area = f32(area_range[0]) * f32(width) * f32(height)
    max_area = f32(area_range[1]) * f32(width) * f32(height)
    low, high = f32(aspect_ratio_range[0]), f32(aspect_ratio_range[1])
    for _ in range(max_attempts):
        ratio = rng.random(dtype=np.float32) * (high - low) + low
        box = _try_crop(height, width, min_area, max_area, ratio, rng)
        if box is not None:
            return box
    return 0, 0, height, width


def sample_augment(
    height: int,
    width: int,
    rng: np.random.Generator,
    area_range: tuple[float, float] = CROP_AREA,
    flip: bool = True,
) -> tuple[Box, bool]:
    """The random choices of one training image: its crop box, then whether to mirror it."""
    box = sample_crop(height, width, rng, area_range)
    return box, bool(flip and rng.random() < 0.5)


def _source_taps(
    in_sizes: torch.Tensor, out_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear taps of `F.interpolate(align_corners=False)` for inputs of `in_sizes` pixels.

    For output pixel i: source position s = max(0, (in / out) * (i + 0.5) - 0.5), taps
    floor(s) and min(floor(s) + 1, in - 1), the second weighted s - floor(s). The scale is a
    float32 quotient and s is rounded to float32 once, as PyTorch's kernels compute it with a
    fused multiply-add (two roundings would move large images' weights by up to 1e-4).

    Args:
        in_sizes: (B,) int64 input lengths.
        out_size: output length.

    Returns:
        (B, out_size) first tap, second tap (int64, from 0) and the second tap's weight (float32).
    """
    scale = in_sizes.to(torch.float32)[:, None] / out_size  # (B, 1)
    centres = torch.arange(out_size, device=in_sizes.device, dtype=torch.float64) + 0.5
    src = (scale.double() * centres - 0.5).float().clamp_(min=0.0)  # (B, out)
    first = src.long()
    weight = src - first
    second = torch.minimum(first + 1, in_sizes[:, None] - 1)
    return first, second, weight


@functools.lru_cache(maxsize=512)
def _resize_matrix(in_size: int, out_size: int, flip: bool) -> torch.Tensor:
    """(out_size, in_size) matrix M: M @ x resizes the columns of x (mirrored if `flip`).

    Cached (sources are small, see `resize`); the returned tensor is shared, never modify it.
    """
    first, second, weight = (t[0].numpy() for t in _source_taps(torch.tensor([in_size]), out_size))
    matrix = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)[::-1] if flip else np.arange(out_size)
    matrix[rows, first] = 1.0 - weight
    matrix[rows, second] += weight  # the same tap twice at the border: weights sum to 1
    return torch.from_numpy(matrix)


def resize(image: torch.Tensor, size: tuple[int, int], flip: bool = False) -> torch.Tensor:
    """Bilinear resize of a float (C, h, w) image to (C, *size), optionally mirrored.

    Computes `F.interpolate(image[None], size, mode="bilinear", align_corners=False,
    antialias=False)[0]` (then `.flip(-1)`). A source of at most `_MATMUL_MAX_SIDE` pixels a
    side is resized as two small matrix products instead: 2-5x faster on one CPU thread (the
    products cost grows with the source side, the kernel's does not), and mirroring is free.

    Returns:
        A contiguous (C, *size) tensor.
    """
    height, width = image.shape[-2:]
    if max(height, width) <= _MATMUL_MAX_SIDE:
        return (
            _resize_matrix(height, size[0], False) @ image @ _resize_matrix(width, size[1], flip).T
        )
    out = F.interpolate(image[None], size, mode="bilinear", align_corners=False, antialias=False)
    return (out[0].flip(-1) if flip else out[0]).contiguous()


def _normalize_(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 255] -> [-1, 1] in place, as vit_jax does: `(x - 127.5) / 127.5`."""
    return pixels.sub_(127.5).div_(127.5)


# --------------------------------------------------------------------------------------------
# Decoding


class BadImageError(ValueError):
    """An image file that cannot be decoded: `path: reason` (both kept as attributes)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": 16-bit files in older Pillow
# JPEGs are checked at 1/8 scale (`draft`): decoding every block finds a truncated file 5-10x
# faster than full size.
CHECK_SIZE = (64, 64)


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image of any PIL image.

    16-bit grey images (mode `I;16*`, or `I` as older Pillow opens 16-bit PNGs) are scaled by
    255/65535 (0 -> 0, 65535 -> 255); `convert("RGB")` would clip them, turning all but the
    darkest 0.4 % of the range white. Other modes convert as PIL converts them.
    """
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.float64).clip(0, 65535)
        grey = np.rint(values * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class Walk:
    """What `walk_files` found under a folder, and what it left out (paths as strings)."""

    files: list[Path] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    linked_folders: list[str] = field(default_factory=list)
    broken_links: list[str] = field(default_factory=list)

    def report(self, root: str | os.PathLike, shown: int = 3) -> None:
        """One log line with what was left out under `root`, if anything."""
        parts = []
        for what, paths in (
            ("hidden entries", self.hidden),
            ("links to folders (not followed)", self.linked_folders),
            ("broken links", self.broken_links),
        ):
            if paths:
                more = ", ..." if len(paths) > shown else ""
                parts.append(f"{len(paths)} {what} ({', '.join(paths[:shown])}{more})")
        if parts:
            logger.warning("Left out of %s: %s.", root, "; ".join(parts))


def walk_files(root: str | os.PathLike, extensions: Sequence[str], recursive: bool = True) -> Walk:
    """The files under `root` whose names end in `extensions` (any case), and its folders, sorted.

    The rules of every folder walk here (image folders for training, folders given to
    predict.py, visualize.py and analyze.py): names starting with "." (`.ipynb_checkpoints`,
    `.DS_Store`) are left out, files and folders alike; a link to a file counts as that file
    (links cannot form a loop, and folders of links into one collection are a common way to
    build a split); a link to a folder is never followed, wherever it points: inside the tree it
    would count its images twice, under two labels or endlessly (a loop), outside it the tree is
    no longer the data set the folder shows. Left-out entries are listed in the result
    (`Walk.report`).
    """
    walk = Walk()
    suffixes = tuple(e.lower() for e in extensions)
    pending = [Path(root)]
    while pending:
        folder = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                path = Path(entry.path)
                if entry.name.startswith("."):
                    walk.hidden.append(str(path))
                elif entry.is_dir(follow_symlinks=False):
                    walk.folders.append(path)
                    if recursive:
                        pending.append(path)
                elif entry.is_symlink() and entry.is_dir():
                    walk.linked_folders.append(str(path))
                elif entry.is_symlink() and not path.exists():
                    walk.broken_links.append(str(path))
                elif entry.is_file() and entry.name.lower().endswith(suffixes):
                    walk.files.append(path)
    walk.files.sort()
    walk.folders.sort()
    for paths in (walk.hidden, walk.linked_folders, walk.broken_links):
        paths.sort()
    return walk


def find_images(patterns: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files, folders (their images, sorted) and glob patterns to files, in order.

    The one rule of every script that takes images (predict.py, visualize.py, analyze.py): a
    file named explicitly is taken whatever its extension (if it is no image, reading it says
    so); folders are searched for `IMAGE_EXTENSIONS` with their sub-folders, by the rules of
    `walk_files` that train.py's image folders follow (hidden entries and links to folders left
    out, and said so). `readable_images` reads the files, skipping and naming an unreadable one.

    Raises:
        UserError: a path that does not exist, a pattern that matches nothing, a folder without
            images.
    """

    def images_in(folder: Path) -> list[Path]:
        walk = walk_files(folder, IMAGE_EXTENSIONS)
        walk.report(folder)
        return walk.files

    found: list[Path] = []
    for pattern in map(str, patterns):
        path = Path(pattern)
        if path.is_dir():
            images = images_in(path)
            if not images:
                raise UserError(
                    f"Folder {path} has no images (looked for {', '.join(IMAGE_EXTENSIONS)})."
                )
            found.extend(images)
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(pattern):
            matches = [Path(m) for m in sorted(glob.glob(pattern, recursive=True))]
            files = [m for m in matches if m.is_file()]
            files += [image for m in matches if m.is_dir() for image in images_in(m)]
            if not files:
                raise UserError(f"{pattern} matches no file.")
            found.extend(files)
        else:
            raise UserError(f"Image {path} does not exist.")
    return found


def read_image(
    path: str | os.PathLike | BinaryIO, check_only: bool = False, name: str | None = None
) -> Image.Image | None:
    """Decode an image file to 8-bit RGB (see `to_rgb`), fully, so that damage shows here.

    Args:
        path: a file, or an open binary file (such as the encoded bytes of a table's cell).
        check_only: only check that it decodes (JPEGs at 1/8 scale, faster); returns None.
        name: what messages call the image; default: `path`.

    Raises:
        BadImageError: not an image, truncated or damaged, or more pixels than PIL's
            decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`; decoding it would take
            minutes and gigabytes); the message names the file.
    """
    name = path if name is None else name
    try:
        with warnings.catch_warnings(), _opened(path) as file:
            # PIL only warns up to twice its limit, then decodes for minutes: refuse at once.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(file)
            if check_only:
                image.draft("RGB", CHECK_SIZE)
                image.load()
                return None
            # Decoded in full: the pixels outlive the file (PIL does not own it, so closing it
            # frees nothing), and an RGB image needs no copy.
            image.load()
            return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        pixels = f"{int(found.group(1)):,}" if found else "too many"
        raise BadImageError(
            name,
            f"it has {pixels} pixels, more than the {Image.MAX_IMAGE_PIXELS:,} PIL decodes (a "
            "guard against decompression bombs). Shrink it, e.g. to 4096 pixels a side.",
        ) from None
    except UnidentifiedImageError:
        raise BadImageError(
            name, "PIL cannot identify image file: not an image, or a format PIL does not read."
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # PIL's decoders raise these
        raise BadImageError(name, f"truncated or damaged ({err}).") from None


def readable_images(paths: Iterable[str | os.PathLike]) -> Iterator[tuple[int, Image.Image]]:
    """(index in `paths`, 8-bit RGB image) for each file that decodes (`read_image`), read one at
    a time; an unreadable one is skipped and named in a warning, as training skips one."""
    skipped = 0
    for index, path in enumerate(paths):
        try:
            image = read_image(path)
        except BadImageError as err:
            skipped += 1
            logger.warning("Skipping an unreadable image (%d so far): %s", skipped, err)
            continue
        yield index, image


def _opened(path: str | os.PathLike | BinaryIO) -> contextlib.AbstractContextManager[BinaryIO]:
    """A file to read `path` from, closed after; an open file as it is."""
    if isinstance(path, (str, os.PathLike)):
        return open(path, "rb")
    return contextlib.nullcontext(path)


class UnreadableImages:
    """A dataset whose images are decoded one by one (`read_image`), where an unreadable one
    (truncated, not an image, a decompression bomb) is skipped, not fatal.

    An unreadable image is recorded in shared memory by whichever process meets it (a loader
    worker, or this one) and named in a warning once, by the training process: workers only
    record it, and the loaders of `utils.data.loaders.get_loader` call
    :meth:`report_unreadable` after each batch. :meth:`unreadable` lists them.

    A subclass calls :meth:`watch_images` with its length, defines :meth:`image_source` and
    :meth:`image_name`, and has `targets` (each image's class) and `transform` (None, or
    applied to each image): items are (image, class), or None for an unreadable image.
    """

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Image.Image, int] | None:
        image = self.decode_or_skip(index)
        if image is None:
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def watch_images(self, count: int) -> None:
        self._bad = multiprocessing.RawArray("b", count)  # 1: unreadable
        self._named: set[int] = set()  # named in this process's log

    def image_source(self, index: int) -> str | os.PathLike | BinaryIO:
        """What `read_image` decodes for image `index`: a file, or an open binary file.

        Raises:
            BadImageError: there is nothing to decode.
        """
        raise NotImplementedError

    def image_name(self, index: int) -> str:
        """What messages call image `index` (its file, or its place in a table)."""
        raise NotImplementedError

    def decode(self, index: int, check_only: bool = False) -> Image.Image | None:
        """Image `index` as 8-bit RGB (`read_image`, with `check_only` as there).

        Raises:
            BadImageError: it cannot be read.
        """
        return read_image(self.image_source(index), check_only, self.image_name(index))

    def decode_or_skip(self, index: int) -> Image.Image | None:
        """Image `index` as 8-bit RGB, or None, recorded, if it cannot be read."""
        try:
            return self.decode(index)
        except BadImageError:
            self._bad[index] = 1
            if torch.utils.data.get_worker_info() is None:
                self.report_unreadable()
            return None

    def report_unreadable(self) -> None:
        """Name in a warning, once, each image found unreadable since the last call (by any
        process of this run's loaders)."""
        for index in np.flatnonzero(np.frombuffer(self._bad, dtype=np.int8)):
            if index in self._named:
                continue
            self._named.add(int(index))
            try:  # the worker that found it keeps its reason: find it again, once
                self.decode(int(index))
                reason = f"{self.image_name(int(index))}: cannot be read"
            except BadImageError as err:
                reason = str(err)
            logger.warning("Skipping an unreadable image (%d so far): %s", len(self._named), reason)

    def unreadable(self) -> list[str]:
        """The images found unreadable so far, by any process of this run's loaders."""
        bad = np.flatnonzero(np.frombuffer(self._bad, dtype=np.int8))
        return [self.image_name(int(index)) for index in bad]


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB pixels of a PIL image or array."""
    if isinstance(image, Image.Image):
        image = np.asarray(to_rgb(image))
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"Expected uint8 RGB pixels (H, W, 3), got {image.dtype} {image.shape}.")
    return image


class Preprocess:
    """One image -> float32 tensor (3, H, W) in [-1, 1]: vit_jax's test or training preprocessing.

    Args:
        size: output (height, width).
        train: sample a crop box (and a flip) per call; otherwise resize the whole image.
        flip: mirror half of the training images.
        area_range: area fraction range of the training crop.
    """

    def __init__(
        self,
        size: tuple[int, int],
        train: bool,
        flip: bool = True,
        area_range: tuple[float, float] = CROP_AREA,
    ):
        self.size = tuple(size)
        self.train = train
        self.flip = flip
        self.area_range = tuple(area_range)

    def __call__(
        self, image: Image.Image | np.ndarray, rng: np.random.Generator | None = None
    ) -> torch.Tensor:
        """Preprocess `image` (PIL image or uint8 (H, W, 3) array).

        Args:
            rng: random source of the training crop and flip (see `sample_augment`); a fresh
                one from OS entropy when None, so loader workers never share a stream.
        """
        pixels, flipped = self.crop(image, rng)
        source = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)  # (3, h, w)
        # Normalising commutes with resizing (the weights sum to 1): do it on the smaller one.
        small_source = pixels.shape[0] * pixels.shape[1] < self.size[0] * self.size[1]
        if small_source:
            _normalize_(source)
        out = resize(source, self.size, flipped)
        return out if small_source else _normalize_(out)

    def crop(
        self, image: Image.Image | np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, bool]:
        """The random choices of one call, before any arithmetic: the uint8 (h, w, 3) pixels it
        resizes (in training the box `sample_augment` draws from `rng`, a view when `image` is
        an array; otherwise the whole image) and whether it mirrors them.

        The batched path (`pack_crops`, then `resize_batch`) finishes what this returns.
        """
        if not self.train:
            return _pixels(image), False
        rng = rng if rng is not None else np.random.default_rng()
        is_pil = isinstance(image, Image.Image)
        height, width = image.size[::-1] if is_pil else image.shape[:2]
        (top, left, crop_h, crop_w), flipped = sample_augment(
            height, width, rng, self.area_range, self.flip
        )
        if is_pil:  # only the box becomes an array (conversions to RGB act per pixel)
            return _pixels(image.crop((left, top, left + crop_w, top + crop_h))), flipped
        return _pixels(image)[top : top + crop_h, left : left + crop_w], flipped

    def __repr__(self) -> str:
        kind = f"train, area {self.area_range}, flip {self.flip}" if self.train else "test"
        return f"Preprocess(size={self.size}, {kind})"


def _tf_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Taps and weights of TF's bilinear `ResizeBilinear` with half-pixel centres, in its
    float32 arithmetic (`tensorflow/core/kernels/image/resize_bilinear_op.cc`)."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    source = (np.arange(out_size, dtype=f32) + f32(0.5)) * scale - f32(0.5)
    floor = np.floor(source)
    lower = np.maximum(floor, 0).astype(np.int64)
    upper = np.minimum(np.ceil(source), in_size - 1).astype(np.int64)
    return lower, upper, source - floor


class ResizeCentralCrop:
    """big_vision's `resize(R)|central_crop(C)|value_range(-1, 1)`: its few-shot evaluation's.

    The square resize to R is `tf.image.resize` (bilinear, half-pixel centres, no
    antialiasing), computed as TF's kernel does (`top + (bottom - top) * y_lerp` of the two
    row interpolations): big_vision's `resize` op casts the result back to uint8 (clip, then
    truncate), and that truncation would turn the last-bit differences of another formula
    (`resize` above) into whole uint8 steps, e.g. 255 into 254 on a white area. Then the centre
    C is cut out at offset `(R - C) // 2` and `x / 255 * 2 - 1` maps it to [-1, 1]
    (`big_vision/pp/ops_image.py`, `ops_general.py`).

    Args:
        resize_size: (height, width) R.
        crop_size: (height, width) C, at most R.
    """

    def __init__(self, resize_size: tuple[int, int], crop_size: tuple[int, int]):
        if crop_size[0] > resize_size[0] or crop_size[1] > resize_size[1]:
            raise UserError(
                f"A {crop_size[0]}x{crop_size[1]} crop does not fit in a "
                f"{resize_size[0]}x{resize_size[1]} resize; resize to at least the crop size."
            )
        self.resize_size = tuple(resize_size)
        self.size = tuple(crop_size)

    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(_pixels(image).astype(np.float32)).permute(2, 0, 1)  # (3, h, w)
        (y0, y1, y_lerp), (x0, x1, x_lerp) = (
            map(torch.from_numpy, _tf_taps(n, r))
            for n, r in zip(pixels.shape[1:], self.resize_size, strict=True)
        )
        top, bottom = pixels[:, y0], pixels[:, y1]  # (3, R_h, w)
        top = top[:, :, x0] + (top[:, :, x1] - top[:, :, x0]) * x_lerp
        bottom = bottom[:, :, x0] + (bottom[:, :, x1] - bottom[:, :, x0]) * x_lerp
        resized = (top + (bottom - top) * y_lerp[:, None]).clamp_(0.0, 255.0).trunc_()
        row = (self.resize_size[0] - self.size[0]) // 2
        col = (self.resize_size[1] - self.size[1]) // 2
        crop = resized[:, row : row + self.size[0], col : col + self.size[1]]
        return (crop / 255.0 * 2.0 - 1.0).contiguous()

    def __repr__(self) -> str:
        return f"ResizeCentralCrop(resize={self.resize_size}, crop={self.size})"


def crop_resize_batch(
    images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Crop, resize, mirror and normalise a batch on its device, as `Preprocess` does per image.

    Each output row and column reads its two bilinear taps inside its own image's box (the
    taps are clamped to the box, as slicing first and then resizing clamps them), gathered
    directly from the uncropped images (`resize_batch`).

    Args:
        images: (B, H, W, 3) uint8, any device.
        boxes: (B, 4) int64 (top, left, height, width), from `sample_augment`.
        flips: (B,) bool, mirror these images.
        size: output (height, width).

    Returns:
        (B, 3, *size) float32 in [-1, 1], on the images' device.
    """
    device = images.device
    batch, height, width = images.shape[:3]
    boxes = boxes.to(device=device, dtype=torch.int64)
    flips = flips.to(device=device, dtype=torch.bool)
    rows, row_weights = _taps(boxes[:, 2], size[0])
    cols, col_weights = _mirror(*_taps(boxes[:, 3], size[1]), flips)
    first_row = torch.arange(batch, device=device) * height + boxes[:, 0]  # of each box
    rows = rows + first_row[:, None, None]
    cols = cols + boxes[:, None, 1:2]
    return resize_batch(
        images.reshape(batch * height, width, 3), rows, row_weights, cols, col_weights
    )


def resize_batch(
    pixels: torch.Tensor,
    rows: torch.Tensor,
    row_weights: torch.Tensor,
    cols: torch.Tensor,
    col_weights: torch.Tensor,
) -> torch.Tensor:
    """Bilinear resize of a batch of uint8 images by their taps, then `(x - 127.5) / 127.5`, on
    the pixels' device.

    Rows first, then columns, in float32, as the per-image path's two matrix products: each
    output row interpolates its two source rows (gathered as uint8), then each output column
    its two columns of that.

    Args:
        pixels: (N, W, 3) uint8, the pixel rows of all images of the batch, stacked (e.g. a
            (B, H, W, 3) batch reshaped to (B * H, W, 3); `pack_crops`).
        rows: (B, 2, out_h) int64, the first and second row of `pixels` each output row of
            each image reads.
        row_weights: (B, out_h) float32, the second row's weight.
        cols, col_weights: the same for columns, (B, 2, out_w) and (B, out_w).

    Returns:
        (B, 3, out_h, out_w) float32 in [-1, 1].
    """
    device = pixels.device
    rows, cols = rows.to(device), cols.to(device)
    batch, out_h, out_w = rows.shape[0], rows.shape[2], cols.shape[2]
    top, bottom = (
        _normalize_(pixels[rows[:, i]].permute(0, 3, 1, 2).contiguous().float())  # (B, 3, out_h, W)
        for i in (0, 1)
    )
    by_rows = torch.lerp(top, bottom, row_weights.to(device)[:, None, :, None])
    shape = (batch, 3, out_h, out_w)
    left, right = (by_rows.gather(3, cols[:, i, None, None, :].expand(shape)) for i in (0, 1))
    return torch.lerp(left, right, col_weights.to(device)[:, None, None, :])


def pack_crops(
    crops: Sequence[np.ndarray], flips: Sequence[bool], size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 crops of any sizes -> what `resize_batch` resizes to `size`, mirroring `flips`.

    In a loader worker: the crops' rows are stacked, one crop after the other, in one uint8
    tensor as wide as the widest crop (zeros right of the narrower ones), and each crop's taps
    are computed as `crop_resize_batch` computes them for a box of the crop's size. A crop
    side longer than twice the output side is cut down to the lines its taps read, first taps
    then second taps (a resize without antialiasing reads nothing else): the result is the
    same, and a crop takes at most (2 out_h) x (2 out_w) pixels, the bytes of its float32
    output, whatever the size of the image.

    Args:
        crops: (h, w, 3) uint8 arrays (views are fine).
        flips: mirror these crops.
        size: output (height, width).

    Returns:
        pixels (N, W, 3) uint8, rows (B, 2, out_h), row_weights (B, out_h), cols (B, 2, out_w),
        col_weights (B, out_w): the arguments of `resize_batch`.
    """
    out_h, out_w = size
    rows, row_weights = _taps(torch.tensor([c.shape[0] for c in crops]), out_h)
    cols, col_weights = _taps(torch.tensor([c.shape[1] for c in crops]), out_w)
    kept = []
    for b, crop in enumerate(crops):
        if crop.shape[0] > 2 * out_h:
            crop = crop[rows[b].flatten().numpy()]  # (2 out_h, w, 3)
            rows[b] = torch.arange(2 * out_h).view(2, out_h)
        if crop.shape[1] > 2 * out_w:
            crop = crop[:, cols[b].flatten().numpy()]  # (h, 2 out_w, 3)
            cols[b] = torch.arange(2 * out_w).view(2, out_w)
        kept.append(crop)
    cols, col_weights = _mirror(cols, col_weights, torch.tensor(flips, dtype=torch.bool))
    heights = torch.tensor([crop.shape[0] for crop in kept])
    starts = torch.cumsum(heights, 0) - heights  # each crop's first row
    pixels = _zeros((int(heights.sum()), max(crop.shape[1] for crop in kept), 3))
    stacked = pixels.numpy()
    for start, crop in zip(starts.tolist(), kept, strict=True):
        stacked[start : start + crop.shape[0], : crop.shape[1]] = crop
    return pixels, rows + starts[:, None, None], row_weights, cols, col_weights


def _taps(in_sizes: torch.Tensor, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_source_taps` as (B, 2, out_size) first and second taps, and the second's weights."""
    first, second, weight = _source_taps(in_sizes, out_size)
    return torch.stack([first, second], dim=1), weight


def _mirror(
    cols: torch.Tensor, weights: torch.Tensor, flips: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column taps of mirrored images (`flips`) in reverse order."""
    return (
        torch.where(flips[:, None, None], cols.flip(-1), cols),
        torch.where(flips[:, None], weights.flip(-1), weights),
    )


def _zeros(shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 tensor of zeros. In a loader worker it is new shared memory (which reads as
    zeros), where a batch travels to the training process without another copy, as torch's
    own collate allocates it."""
    if torch.utils.data.get_worker_info() is None:
        return torch.zeros(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
