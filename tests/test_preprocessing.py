"""vit_jax's preprocessing: the float resize, TF's crop sampler, and the batched device path.

Oracles: `F.interpolate` (what `tf.image.resize` computes), a plain re-statement of TF's
`sample_distorted_bounding_box` box sampler written here from its description, and the per-image
path for the batched one. torchvision's `RandomResizedCrop` shows the sampler tests have power.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import ks_2samp
from torchvision import transforms

from utils.data.loaders import build_transforms
from utils.data.preprocessing import (
    Preprocess,
    crop_resize_batch,
    find_images,
    pack_crops,
    readable_images,
    resize,
    resize_batch,
    sample_augment,
    sample_crop,
    to_rgb,
)
from utils.infra.errors import UserError


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random uint8 RGB pixels: neighbours differ by up to 255, the worst case for resizing."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def reference(pixels: np.ndarray, size: tuple[int, int], flip: bool = False) -> torch.Tensor:
    """vit_jax: float32 bilinear resize (half-pixel centres, no antialias), flip, normalise."""
    x = torch.from_numpy(pixels).permute(2, 0, 1).float()[None]
    out = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=False)[0]
    return ((out.flip(-1) if flip else out) - 127.5) / 127.5


# --------------------------------------------------------------------------------------------
# Test-time preprocessing: a plain float resize


@pytest.mark.parametrize(
    ("height", "width", "size"),
    [
        (32, 32, (224, 224)),  # CIFAR, upscaled
        (32, 32, (384, 384)),
        (8, 8, (32, 32)),  # digits
        (375, 500, (224, 224)),  # a photo, shrunk (and squashed: aspect not kept)
        (500, 375, (384, 384)),
        (60, 200, (224, 160)),  # non-square output
    ],
)
def test_test_transform_is_float_bilinear(height: int, width: int, size: tuple[int, int]) -> None:
    pixels = noise(height, width)
    out = build_transforms(size, train=False)(Image.fromarray(pixels))
    assert out.shape == (3, *size)
    assert out.dtype == torch.float32
    assert out.is_contiguous()
    torch.testing.assert_close(out, reference(pixels, size), atol=1e-5, rtol=0)


def test_test_transform_is_not_torchvision_resize() -> None:
    """torchvision's Resize antialiases a shrunk photo and rounds to uint8: far from vit_jax."""
    pixels = noise(375, 500)
    old = transforms.Compose(
        [
            transforms.Resize((224, 224)),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )(Image.fromarray(pixels))
    assert (old - reference(pixels, (224, 224))).abs().max() > 0.1


def test_grey_images_become_rgb() -> None:
    grey = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    out = build_transforms(16, train=False)(Image.fromarray(grey))
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    torch.testing.assert_close(out, reference(rgb, (16, 16)), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("height", "width"), [(32, 32), (20, 50), (100, 70)])
@pytest.mark.parametrize("flip", [False, True])
def test_resize_equals_interpolate(height: int, width: int, flip: bool) -> None:
    """Both of `resize`'s ways (matrix products for small sources, the kernel for large ones)."""
    x = torch.from_numpy(noise(height, width)).permute(2, 0, 1).float()
    for size in ((384, 384), (224, 96), (height, width)):
        want = F.interpolate(x[None], size, mode="bilinear", align_corners=False)[0]
        got = resize(x, size, flip)
        # In pixel units [0, 255]: 1e-5 after normalisation is 1.3e-3 here.
        torch.testing.assert_close(got, want.flip(-1) if flip else want, atol=1.3e-3, rtol=0)


# --------------------------------------------------------------------------------------------
# Training: TF's crop sampler


def reference_box(height: int, width: int, rnd: random.Random) -> tuple[int, int, int, int]:
    """`sample_distorted_bounding_box(area_range=(0.05, 1), aspect_ratio_range=(0.75, 1.33),
    max_attempts=100, min_object_covered=0)`, written from its description, in float64."""
    lo, hi = 0.05 * height * width, 1.0 * height * width
    for _ in range(100):
        r = rnd.uniform(0.75, 1.33)
        h, h_max = round(math.sqrt(lo / r)), round(math.sqrt(hi / r))  # half to even
        if round(h_max * r) > width:
            h_max = int((width + 0.5 - 1e-7) / r)
            if round(h_max * r) > width:
                h_max -= 1
        h_max = min(h_max, height)
        h = min(h, h_max)
        if h < h_max:
            h += rnd.randint(0, h_max - h)
        w = round(h * r)
        if w * h < lo:
            h += 1
            w = round(h * r)
        if w * h > hi:
            h -= 1
            w = round(h * r)
        if not lo <= w * h <= hi or w > width or h > height or w <= 0 or h <= 0:
            continue
        top = rnd.randint(0, height - h - 1) if h < height else 0
        left = rnd.randint(0, width - w - 1) if w < width else 0
        return top, left, h, w
    return 0, 0, height, width


def torchvision_box(height: int, width: int) -> tuple[int, int, int, int]:
    return transforms.RandomResizedCrop.get_params(
        torch.empty(3, height, width), scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3)
    )


def box_statistics(boxes: list[tuple[int, int, int, int]]) -> dict[str, np.ndarray]:
    top, left, h, w = np.asarray(boxes).T
    return {"height": h, "width": w, "area": h * w, "top": top, "left": left}


SAMPLES = 4000


@pytest.mark.parametrize(("height", "width"), [(32, 32), (60, 200)])
def test_crop_sampler_matches_tf_distribution(height: int, width: int) -> None:
    """Two-sample KS tests on height, width, area and offsets: ours ~ reference, and the same
    tests tell torchvision's RandomResizedCrop apart (they have power)."""
    rng = np.random.default_rng(1)
    ours = box_statistics([sample_crop(height, width, rng) for _ in range(SAMPLES)])
    rnd = random.Random(2)
    ref = box_statistics([reference_box(height, width, rnd) for _ in range(SAMPLES)])
    torch.manual_seed(3)
    tv = box_statistics([torchvision_box(height, width) for _ in range(SAMPLES)])
    for name in ours:
        assert ks_2samp(ours[name], ref[name]).pvalue > 1e-3, name
    assert min(ks_2samp(tv[name], ref[name]).pvalue for name in ref) < 1e-6


def test_crop_sampler_facts() -> None:
    """Facts of TF's sampler, checked against TF's own samples: the median crop of a 32x32
    image keeps a third of it (uniform-area sampling would keep half); boxes stay inside, and
    the last offset is never drawn; the aspect ratio stays within (0.75, 1.33) up to rounding."""
    rng = np.random.default_rng(0)
    boxes = np.asarray([sample_crop(32, 32, rng) for _ in range(SAMPLES)])
    top, left, h, w = boxes.T
    assert 0.30 < np.median(h * w) / 1024 < 0.36
    assert (h * w >= 0.05 * 1024).all()
    assert ((top >= 0) & (left >= 0)).all()
    assert (top[h < 32] + h[h < 32] <= 31).all()
    assert (left[w < 32] + w[w < 32] <= 31).all()
    assert (top == 0).any()
    assert ((top + h == 31) & (h < 32)).any()
    ratio = w / h
    assert ((ratio > 0.75 - 1 / h) & (ratio < 1.33 + 1 / h)).all()


def test_crop_sampler_falls_back_to_the_whole_image() -> None:
    # A 1 x 100 strip has no box with aspect ratio near 1 and 5% of its area.
    rng = np.random.default_rng(0)
    assert {sample_crop(1, 100, rng) for _ in range(20)} == {(0, 0, 1, 100)}


def test_smaller_area_range() -> None:
    rng = np.random.default_rng(0)
    boxes = np.asarray([sample_crop(8, 8, rng, area_range=(0.3, 1.0)) for _ in range(500)])
    assert (boxes[:, 2] * boxes[:, 3] >= 0.3 * 64).all()


@pytest.mark.parametrize(("height", "width", "size"), [(32, 32, (96, 96)), (40, 90, (64, 48))])
def test_train_transform_is_crop_resize_flip(
    height: int, width: int, size: tuple[int, int]
) -> None:
    """The training transform slices the box `sample_augment` draws from the same generator,
    resizes it like the test transform and mirrors it when drawn so."""
    pixels = noise(height, width)
    transform = build_transforms(size, train=True)
    flips = set()
    for seed in range(12):
        (top, left, h, w), flip = sample_augment(height, width, np.random.default_rng(seed))
        flips.add(flip)
        got = transform(Image.fromarray(pixels), np.random.default_rng(seed))
        want = reference(pixels[top : top + h, left : left + w], size, flip)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert flips == {False, True}


def test_no_flip_option() -> None:
    rng = np.random.default_rng(0)
    assert not any(sample_augment(32, 32, rng, flip=False)[1] for _ in range(50))
    assert Preprocess((8, 8), train=True, flip=False).flip is False


# --------------------------------------------------------------------------------------------
# The batched device path


def edge_boxes(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """Boxes that touch every border, a whole image, one pixel, one row, one column."""
    return [
        (0, 0, height, width),
        (height - 5, width - 7, 5, 7),
        (0, width - 3, 4, 3),
        (height - 1, 0, 1, 1),
        (3, 2, 1, width - 2),
        (1, 4, height - 1, 1),
        (2, 3, height // 2, width // 3),
    ]


@pytest.mark.parametrize(("height", "width", "size"), [(32, 32, (224, 224)), (24, 40, (50, 30))])
def test_batched_path_equals_slice_then_resize(
    height: int, width: int, size: tuple[int, int]
) -> None:
    """Taps clamped at the box borders exactly as slicing first clamps them."""
    boxes = edge_boxes(height, width)
    flips = [i % 2 == 1 for i in range(len(boxes))]
    pixels = np.stack([noise(height, width, seed) for seed in range(len(boxes))])
    out = crop_resize_batch(
        torch.from_numpy(pixels), torch.tensor(boxes), torch.tensor(flips), size
    )
    assert out.shape == (len(boxes), 3, *size)
    for image, (top, left, h, w), flip, got in zip(pixels, boxes, flips, out, strict=True):
        want = reference(image[top : top + h, left : left + w], size, flip)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(224, 224), (384, 384)])
def test_batched_path_equals_per_image_path(size: tuple[int, int]) -> None:
    """Given the same boxes and flips (drawn from the same generators), the device path and
    `Preprocess` produce the same tensors."""
    pixels = np.stack([noise(32, 32, seed) for seed in range(8)])
    transform = Preprocess(size, train=True)
    choices = [sample_augment(32, 32, np.random.default_rng(seed)) for seed in range(8)]
    out = crop_resize_batch(
        torch.from_numpy(pixels),
        torch.tensor([box for box, _ in choices]),
        torch.tensor([flip for _, flip in choices]),
        size,
    )
    for seed, image in enumerate(pixels):
        want = transform(image, np.random.default_rng(seed))
        torch.testing.assert_close(out[seed], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(32, 32), (48, 40)])
def test_packed_crops_of_any_size_equal_slice_then_resize(size: tuple[int, int]) -> None:
    """Crops of other sizes in one batch, up to far taller and wider than twice the output
    (then only the lines the taps read travel): each equals its own resize, and a crop
    never takes more than twice the output side in either direction."""
    sides = [(7, 9), (1, 1), (120, 30), (20, 150), (300, 250), (2 * size[0] + 1, 2 * size[1])]
    crops = [noise(h, w, seed) for seed, (h, w) in enumerate(sides)]
    flips = [i % 2 == 0 for i in range(len(crops))]
    pixels, *taps = pack_crops(crops, flips, size)
    assert pixels.dtype == torch.uint8
    assert pixels.shape[1] <= 2 * size[1]
    assert len(pixels) == sum(min(h, 2 * size[0]) for h, _ in sides)
    out = resize_batch(pixels, *taps)
    assert out.shape == (len(crops), 3, *size)
    for crop, flip, got in zip(crops, flips, out, strict=True):
        torch.testing.assert_close(got, reference(crop, size, flip), atol=1e-5, rtol=0)


def test_packed_views_of_an_image_equal_its_crops() -> None:
    """Crops given as views into a larger image (what a worker slices) pack their own pixels."""
    image = noise(90, 70)
    boxes = [(0, 0, 90, 70), (10, 5, 40, 60), (89, 69, 1, 1)]
    crops = [image[t : t + h, left : left + w] for t, left, h, w in boxes]
    out = resize_batch(*pack_crops(crops, [False, True, False], (24, 24)))
    for crop, flip, got in zip(crops, [False, True, False], out, strict=True):
        torch.testing.assert_close(got, reference(np.ascontiguousarray(crop), (24, 24), flip))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16"])
def test_a_training_crop_of_any_mode_is_the_box_of_its_rgb_pixels(mode: str) -> None:
    """`Preprocess.crop` cuts a PIL image's box before making it an array: the same pixels as
    converting the whole image to RGB, then slicing."""
    if mode == "I;16":
        image = Image.fromarray(np.arange(60 * 50, dtype=np.uint16).reshape(60, 50) * 20)
    else:
        image = Image.fromarray(noise(60, 50)).convert(mode)
    transform = Preprocess((16, 16), train=True)
    whole = np.asarray(to_rgb(image))
    for seed in range(5):
        crop, flip = transform.crop(image, np.random.default_rng(seed))
        (top, left, h, w), want_flip = sample_augment(60, 50, np.random.default_rng(seed))
        np.testing.assert_array_equal(crop, whole[top : top + h, left : left + w])
        assert flip == want_flip


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batched_path_on_cuda() -> None:
    pixels = torch.from_numpy(np.stack([noise(32, 32, seed) for seed in range(7)]))
    boxes, flips = torch.tensor(edge_boxes(32, 32)), torch.tensor([True, False] * 3 + [True])
    cpu = crop_resize_batch(pixels, boxes, flips, (384, 384))
    cuda = crop_resize_batch(pixels.cuda(), boxes, flips, (384, 384))
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-5, rtol=0)
    crops = [noise(h, w, seed) for seed, (h, w) in enumerate([(40, 900), (700, 30), (5, 5)])]
    packed = pack_crops(crops, [True, False, True], (224, 224))
    cpu = resize_batch(*packed)
    cuda = resize_batch(packed[0].cuda(), *packed[1:])
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-5, rtol=0)


def test_find_images_folders_globs_and_errors(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "c.png")
    assert [p.name for p in find_images([tmp_path])] == ["a.jpg", "b.png", "c.png"]
    assert [p.name for p in find_images([str(tmp_path / "*.png")])] == ["b.png"]
    with pytest.raises(UserError, match="does not exist"):
        find_images([tmp_path / "missing.jpg"])
    with pytest.raises(UserError, match="matches no file"):
        find_images([str(tmp_path / "*.gif")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        find_images([empty])


def test_readable_images_skips_and_names_an_unreadable_file(tmp_path: Path, caplog) -> None:
    Image.new("RGB", (8, 6), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not an image")
    Image.new("L", (5, 5), 7).save(tmp_path / "c.png")
    with caplog.at_level("WARNING"):
        read = list(readable_images(find_images([tmp_path])))
    assert [(i, im.mode, im.size) for i, im in read] == [(0, "RGB", (8, 6)), (2, "RGB", (5, 5))]
    assert np.asarray(read[0][1])[0, 0].tolist() == [200, 10, 10]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "Skipping an unreadable image (1 so far)" in warning
    assert f"{tmp_path / 'b.png'}: PIL cannot identify image file" in warning
