"""Write a stand-in for an official checkpoint: random weights in the official `.npz` layout.

    python tools/make_standin_npz.py ViT-B_16                   # -> checkpoint/ViT-B_16.npz
    python tools/make_standin_npz.py ViT-B_16 --source imagenet21k+imagenet2012 --img_size 224
                                                                 # -> checkpoint/ViT-B_16-224.npz

Without internet there is no official file to try the commands with. The stand-in has the key
names, shapes and dtypes of the file `python -m utils.download` would fetch, under the same
name, so every command that takes one runs as typed; its weights are the model's random
initialisation (seeded), so its accuracies and figures mean nothing. `--source imagenet21k`
(the default) is shaped as a pre-training file: 21,843 classes and the Dense + tanh `pre_logits`
layer; `imagenet21k+imagenet2012` as an ImageNet-1k fine-tune: 1,000 classes, no `pre_logits`.
The arrays come from `models.npz.state_dict_to_npz`, the key table the loaders read with.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

from models.configs import get_config, model_names
from utils.infra.errors import run_cli
from utils.infra.flags import positive_int, setup_logging

logger = logging.getLogger("make_standin_npz")

# What an official file of each source holds besides the encoder: classes, a pre_logits layer.
SOURCES = {"imagenet21k": (21843, True), "imagenet21k+imagenet2012": (1000, False)}


def default_output(model_type: str, source: str, img_size: int) -> Path:
    """Where `python -m utils.download` puts the official file of that name."""
    if source == "imagenet21k":
        return Path("checkpoint") / f"{model_type}.npz"
    return Path("checkpoint") / f"{model_type}-{img_size}.npz"


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model_type", choices=model_names(), help="A registered model, e.g. ViT-B_16.")
    p.add_argument("--source", choices=sorted(SOURCES), default="imagenet21k")
    p.add_argument("--img_size", type=positive_int, default=224,
                   help="Image size the position embeddings are made for.")  # fmt: skip
    p.add_argument("--num_classes", type=positive_int, default=None,
                   help="Head size (default: the source's, 21843 or 1000).")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None,
                   help="The file (default: where the download would be).")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="Replace an existing file.")
    args = p.parse_args(argv)

    import torch

    from models.modeling import VisionTransformer
    from models.npz import state_dict_to_npz
    from utils.infra.file_io import check_output, save_npz

    classes, pre_logits = SOURCES[args.source]
    classes = args.num_classes or classes
    output = Path(args.output or default_output(args.model_type, args.source, args.img_size))
    check_output(output, overwrite=args.overwrite)  # a real download is never replaced unasked
    config = get_config(args.model_type)
    if pre_logits:
        config = replace(config, representation_size=config.hidden_size)
    torch.manual_seed(args.seed)
    model = VisionTransformer(config, args.img_size, classes)
    save_npz(output, state_dict_to_npz(model.state_dict(), config), flag="--output")
    logger.info(
        "wrote %s: a STAND-IN for the official %s file of %s (%d classes, %s pre_logits, "
        "%dx%d), random weights (seed %d)", output, args.source, args.model_type, classes,
        "with" if pre_logits else "no", args.img_size, args.img_size, args.seed,
    )  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
