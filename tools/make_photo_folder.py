"""An image folder of real JPEGs for measuring loaders: `ROOT/{train,val}/<photo>/*.jpg`, random
427 x 437 crops of scikit-learn's two sample photos (china, flower), saved at quality 90.

    python tools/make_photo_folder.py DIR --images 2048

bench.py's image-folder row and the GPU check's image-folder run read such a folder (JPEG
decoding is the work a loader worker is left with, so the images must be real photos).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

PHOTO_SIDES = (427, 437)  # height, width of the crops (the sample photos are 427 x 640)


def write_photo_folder(
    root: str | os.PathLike, num_images: int, seed: int = 0, val: int = 2
) -> None:
    """`num_images` training JPEGs and `val` validation ones under `root`, the classes taking
    turns; the same `seed` gives the same files."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    rng = np.random.default_rng(seed)
    height, width = PHOTO_SIDES
    for split, count in (("train", num_images), ("val", val)):
        for i in range(count):
            label = i % len(photos.images)
            photo = photos.images[label]
            top = int(rng.integers(photo.shape[0] - height + 1))
            left = int(rng.integers(photo.shape[1] - width + 1))
            name = os.path.splitext(os.path.basename(photos.filenames[label]))[0]
            folder = Path(root, split, name)
            folder.mkdir(parents=True, exist_ok=True)
            crop = photo[top : top + height, left : left + width]
            Image.fromarray(crop).save(folder / f"{i:05d}.jpg", quality=90)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="the folder to write (it must not exist yet)")
    p.add_argument("--images", type=int, default=256, help="training images (default 256)")
    p.add_argument("--val", type=int, default=2, help="validation images (default 2)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.images < 1 or args.val < 1:
        p.error("--images and --val must be at least 1")
    if os.path.lexists(args.root):
        print(f"make_photo_folder.py: {args.root} exists; name a new folder.", file=sys.stderr)
        return 2
    write_photo_folder(args.root, args.images, args.seed, args.val)
    print(f"Wrote {args.images} training and {args.val} validation JPEGs under {args.root}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
