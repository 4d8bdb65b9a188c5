"""Shared test helpers: fake official checkpoints, a fake CIFAR server, tiny training runs, CLIs.

Fake checkpoints follow the official `.npz` layout of `vit_jax` (and big_vision/AugReg naming
on request), written independently of the converter; values are random, so every tensor is
distinguishable. Test modules import from here, never from each other.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import http.server
import io
import json
import math
import os
import pickle
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision import datasets

from models.configs import ViTConfig, get_config
from models.modeling import VisionTransformer
from utils.data.loaders import prepare_batch
from utils.infra.errors import run_cli

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# Fake official checkpoints

VIT_JAX = ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
BIG_VISION = ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")


def official_grid(config: ViTConfig, img_size: int | tuple[int, int]) -> tuple[int, int]:
    """Patch grid by the official arithmetic: SAME stride-2 steps in the ResNet, then VALID."""
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    if config.resnet is not None:
        for _ in range(2 + max(len(config.resnet.num_layers) - 1, 0)):
            height, width = math.ceil(height / 2), math.ceil(width / 2)
    return height // config.patch_size[0], width // config.patch_size[1]


def zoomed_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """vit_jax's position-embedding resize written out with scipy: the class token kept, the
    (rows, cols, D) grid zoomed with `scipy.ndimage.zoom(order=1)`."""
    import scipy.ndimage

    cls, grid = pos_embed[0, :1].numpy(), pos_embed[0, 1:].numpy().reshape(*old_grid, -1)
    zoom = (new_grid[0] / old_grid[0], new_grid[1] / old_grid[1], 1)
    grid = scipy.ndimage.zoom(grid, zoom, order=1).reshape(-1, pos_embed.shape[-1])
    return torch.from_numpy(np.concatenate([cls, grid]))[None]


def fake_checkpoint(
    config: ViTConfig,
    num_classes: int = 10,
    img_size: int | tuple[int, int] = 224,
    seed: int = 0,
    block_names: tuple[str, str, str, str] = VIT_JAX,
    gn_shape_4d: bool = True,
    representation_size: int | None = None,
    prefix: str = "",
) -> dict[str, np.ndarray]:
    """Random arrays keyed and shaped exactly as an official checkpoint for `config`."""
    rng = np.random.default_rng(seed)
    d, heads, hd, mlp = config.hidden_size, config.num_heads, config.head_dim, config.mlp_dim

    def arr(*shape: int, scale: float = 0.1, offset: float = 0.0) -> np.ndarray:
        return (offset + scale * rng.standard_normal(shape)).astype(np.float32)

    w: dict[str, np.ndarray] = {}
    in_channels = 3
    if config.resnet is not None:
        width = 64 * config.resnet.width_factor

        def gn(name: str, channels: int) -> None:
            shape = (1, 1, 1, channels) if gn_shape_4d else (channels,)
            w[f"{name}/scale"] = arr(*shape, offset=1.0)
            w[f"{name}/bias"] = arr(*shape)

        w["conv_root/kernel"] = arr(7, 7, 3, width)
        gn("gn_root", width)
        in_channels = width
        for b, units in enumerate(config.resnet.num_layers, start=1):
            features = width * 2 ** (b - 1)
            for u in range(1, units + 1):
                unit = f"block{b}/unit{u}"
                unit_in = in_channels if u == 1 else 4 * features
                w[f"{unit}/conv1/kernel"] = arr(1, 1, unit_in, features)
                w[f"{unit}/conv2/kernel"] = arr(3, 3, features, features)
                w[f"{unit}/conv3/kernel"] = arr(1, 1, features, 4 * features)
                for n in (1, 2, 3):
                    gn(f"{unit}/gn{n}", 4 * features if n == 3 else features)
                if u == 1 and (b > 1 or unit_in != 4 * features):
                    w[f"{unit}/conv_proj/kernel"] = arr(1, 1, unit_in, 4 * features)
                    gn(f"{unit}/gn_proj", 4 * features)
            in_channels = 4 * features
    ph, pw = config.patch_size
    w["embedding/kernel"] = arr(ph, pw, in_channels, d)
    w["embedding/bias"] = arr(d)
    gh, gw = official_grid(config, img_size)
    prefix_tokens = 1 if config.classifier == "token" else 0
    if prefix_tokens:
        w["cls"] = arr(1, 1, d)
    w["Transformer/posembed_input/pos_embedding"] = arr(1, prefix_tokens + gh * gw, d)
    ln1, attn, ln2, mlp_name = block_names
    for i in range(config.num_layers):
        blk = f"Transformer/encoderblock_{i}"
        for ln in (ln1, ln2):
            w[f"{blk}/{ln}/scale"] = arr(d, offset=1.0)
            w[f"{blk}/{ln}/bias"] = arr(d)
        for part in ("query", "key", "value"):
            w[f"{blk}/{attn}/{part}/kernel"] = arr(d, heads, hd)
            w[f"{blk}/{attn}/{part}/bias"] = arr(heads, hd)
        w[f"{blk}/{attn}/out/kernel"] = arr(heads, hd, d)
        w[f"{blk}/{attn}/out/bias"] = arr(d)
        w[f"{blk}/{mlp_name}/Dense_0/kernel"] = arr(d, mlp)
        w[f"{blk}/{mlp_name}/Dense_0/bias"] = arr(mlp)
        w[f"{blk}/{mlp_name}/Dense_1/kernel"] = arr(mlp, d)
        w[f"{blk}/{mlp_name}/Dense_1/bias"] = arr(d)
    w["Transformer/encoder_norm/scale"] = arr(d, offset=1.0)
    w["Transformer/encoder_norm/bias"] = arr(d)
    head_in = d
    if representation_size:
        w["pre_logits/kernel"] = arr(d, representation_size)
        w["pre_logits/bias"] = arr(representation_size)
        head_in = representation_size
    w["head/kernel"] = arr(head_in, num_classes)
    w["head/bias"] = arr(num_classes)
    return {prefix + k: v for k, v in w.items()}


# --------------------------------------------------------------------------------------------
# A fake CIFAR in the official format, served over loopback HTTP; image folders

CIFAR_LAYOUT = {
    # dataset: (class, folder, train files, test files, meta file, meta key, label key, classes)
    "cifar10": (
        datasets.CIFAR10,
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "label_names",
        "labels",
        10,
    ),
    "cifar100": (
        datasets.CIFAR100,
        "cifar-100-python",
        ["train"],
        ["test"],
        "meta",
        "fine_label_names",
        "fine_labels",
        100,
    ),
}


def make_cifar_files(dataset: str, per_file: int = 8, seed: int = 0) -> dict[str, bytes]:
    """The pickled files of a tiny CIFAR (`per_file` images per batch file), keyed by name."""
    _, _, train_files, test_files, meta_file, meta_key, label_key, classes = CIFAR_LAYOUT[dataset]
    rng = np.random.default_rng(seed)
    files = {}
    for name in train_files + test_files:
        rows = rng.integers(0, 256, size=(per_file, 3 * 32 * 32), dtype=np.uint8)  # R, G, B planes
        labels = [int(x) for x in rng.integers(0, classes, size=per_file)]
        files[name] = pickle.dumps({"batch_label": name, "data": rows, label_key: labels})
    files[meta_file] = pickle.dumps({meta_key: [f"class_{i:03d}" for i in range(classes)]})
    return files


def make_cifar_archive(dataset: str, files: dict[str, bytes]) -> bytes:
    """The `.tar.gz` as published: every file under the dataset's folder."""
    folder = CIFAR_LAYOUT[dataset][1]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


@contextmanager
def serve_cifar(
    dataset: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, per_file: int = 8
) -> Iterator[dict[str, bytes]]:
    """Serve a fake CIFAR archive on 127.0.0.1 and point torchvision's dataset class at it.

    The URL and every checksum torchvision checks are replaced by those of the fake files.

    Yields:
        The files in the archive; the served request paths are appended to `requests`.
    """
    cls, _, train_files, test_files, meta_file, meta_key, _, _ = CIFAR_LAYOUT[dataset]
    files = make_cifar_files(dataset, per_file)
    archive = make_cifar_archive(dataset, files)
    root = tmp_path / "www"
    root.mkdir()
    (root / cls.filename).write_bytes(archive)

    def md5(data: bytes) -> str:
        return hashlib.md5(data).hexdigest()

    handler = functools.partial(QuietHandler, directory=str(root))
    server = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        monkeypatch.setattr(cls, "url", f"http://127.0.0.1:{port}/{cls.filename}")
        monkeypatch.setattr(cls, "tgz_md5", md5(archive))
        monkeypatch.setattr(cls, "train_list", [[n, md5(files[n])] for n in train_files])
        monkeypatch.setattr(cls, "test_list", [[n, md5(files[n])] for n in test_files])
        monkeypatch.setattr(
            cls, "meta", {"filename": meta_file, "key": meta_key, "md5": md5(files[meta_file])}
        )
        QuietHandler.requests = []
        yield files
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class QuietServer(http.server.ThreadingHTTPServer):
    """Ignores clients that hang up early (torchvision's redirect probe reads no body)."""

    def handle_error(self, request, client_address) -> None:
        pass


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Static files, no request logging; records the paths of GET requests."""

    requests: ClassVar[list[str]] = []

    def log_message(self, format: str, *args) -> None:
        if self.command == "GET":
            QuietHandler.requests.append(self.path)


def decode_cifar_row(row: np.ndarray) -> np.ndarray:
    """One CIFAR row (R plane, G plane, B plane) -> (32, 32, 3) image."""
    return row.reshape(3, 32, 32).transpose(1, 2, 0)


def make_image_folder(root: Path, test_name: str = "val", classes=("cat", "dog"), n: int = 4):
    """`root/train/<class>/*.png` and `root/<test_name>/<class>/*.png`, class i has colour i."""
    for split, count in (("train", n), (test_name, 2)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                colour = (100 * c, 50 + 10 * i, 100)
                Image.new("RGB", (20, 12), colour).save(folder / f"{i}.png")


def make_photo_folder(root: Path, n: int = 6, seed: int = 0) -> None:
    """`root/{train,val}/{china,flower}/*`: n training and 3 validation images per class, cut
    from scikit-learn's two sample photos at random sizes (8 to 400 pixels a side, so some are
    over twice a 32-pixel model's side), JPEG and PNG alternately."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # (427, 640, 3) each
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", 3)):
        for label, name in enumerate(("china", "flower")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                height, width = (int(s) for s in rng.integers(8, 400, size=2))
                top, left = int(rng.integers(427 - height)), int(rng.integers(640 - width))
                image = Image.fromarray(photos[label][top : top + height, left : left + width])
                image.save(folder / f"{i}.{'jpg' if i % 2 else 'png'}")


def loader_args(dataset: str, data_dir: Path | str = "unused", **overrides) -> dict:
    """The parameters of `get_loader`, as train.py passes them (one process)."""
    args = {
        "dataset": dataset,
        "data_dir": str(data_dir),
        "img_size": 32,
        "seed": 0,
        "num_workers": 0,
        "micro_batch_size": 8,
        "eval_batch_size": 16,
        "holdout_fraction": 0.02,
    }
    args.update(overrides)
    return args


# --------------------------------------------------------------------------------------------
# Tiny models and training runs


def distinct_model(
    config: ViTConfig | str = "testing", img_size: int = 32, num_classes: int = 5, seed: int = 0
) -> VisionTransformer:
    """A small model with a random, non-zero head, so outputs differ between seeds."""
    torch.manual_seed(seed)
    model = VisionTransformer(config, img_size, num_classes)
    with torch.no_grad():
        model.head.weight.normal_()
    return model


def hf_model(
    name: str,
    img_size: tuple[int, int],
    num_labels: int = 3,
    official: bool = True,
    pooler: bool = False,
    seed: int = 0,
) -> torch.nn.Module:
    """A transformers ViT of a registry architecture, every parameter random."""
    transformers = pytest.importorskip("transformers")
    c = get_config(name)
    hf_config = transformers.ViTConfig(
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        intermediate_size=c.mlp_dim,
        patch_size=c.patch_size[0],
        image_size=list(img_size),
        num_labels=num_labels,
        hidden_act="gelu_pytorch_tanh" if official else "gelu",
        layer_norm_eps=1e-6 if official else 1e-12,
    )
    torch.manual_seed(seed)
    if pooler:
        model = transformers.ViTModel(hf_config, add_pooling_layer=True)
    else:
        model = transformers.ViTForImageClassification(hf_config)
    with torch.no_grad():  # its init leaves biases at zero and LayerNorms at 1: perturb all
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny_args(tmp_path: Path, name: str = "tiny", **flags) -> list[str]:
    """A few steps of the `testing` model on digits at 32x32; `flags` override the defaults."""
    base = {
        "name": name,
        "dataset": "digits",
        "model_type": "testing",
        "pretrained_dir": "none",
        "img_size": 32,
        "train_batch_size": 16,
        "eval_batch_size": 128,
        "num_steps": 4,
        "eval_every": 2,
        "warmup_steps": 1,
        "log_every": 1,  # every step in TensorBoard, as the tests compare them
        "num_workers": 0,
        "output_dir": tmp_path / "out",
        "log_dir": tmp_path / "logs" / name,
        "data_dir": tmp_path / "data",
    }
    base.update(flags)
    argv = []
    for key, value in base.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not False:
            argv += [f"--{key}", str(value)]
    return argv


def crash_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make train.py die with an exception during optimizer step `step`."""
    import train

    real = train.train_step

    def crashing(args, trainer, batches, guard, number, info):
        if number == step:
            raise RuntimeError(f"simulated crash at step {number}")
        return real(args, trainer, batches, guard, number, info)

    monkeypatch.setattr(train, "train_step", crashing)


def after_its_event_files(log_dir: Path) -> None:
    """Wait for the second after the one in which `log_dir`'s last event file was created.

    TensorBoard reads event files in name order, and a name holds the second it was created
    (events.out.tfevents.SECOND.HOST.PID.N, N counting up in each process): a run resumed in
    the same second and process could sort before the interrupted one (N = 10 before N = 9).
    A real restart is a new process, seconds later.
    """
    files = Path(log_dir).glob("events.out.tfevents.*")
    created = max((int(file.name.split(".")[3]) for file in files), default=0)
    time.sleep(max(0.0, created + 1 - time.time()))


def free_port() -> int:
    """A loopback port nobody listens on (for torchrun's rendezvous, or a refused connection)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_train(argv: Sequence[str], log: Path) -> subprocess.Popen:
    """train.py as a subprocess of one thread, not distributed, in a new session (so that a
    test can signal or find every process it starts); stdout and stderr go to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    with log.open("w") as handle:
        return subprocess.Popen(
            [sys.executable, "train.py", *argv],
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=handle,
            start_new_session=True,
        )


def run_script(
    *argv: str, importtime: bool = False, timeout: float = 120, **options: object
) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS...` in the repository, its output captured; with `importtime`,
    stderr also lists every module the script imported (see `imports_torch`). `options` go to
    `subprocess.run` (env, preexec_fn)."""
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run(
        [sys.executable, *flags, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        **options,
    )


def imports_torch(proc: subprocess.CompletedProcess) -> bool:
    """Whether a `run_script(..., importtime=True)` imported torch."""
    return "| torch\n" in proc.stderr


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in `log_dir`, read by TensorBoard's own event reader."""
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def load_checkpoint(out_dir: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    meta = json.loads((out_dir / f"{name}_checkpoint.json").read_text())
    state = torch.load(out_dir / f"{name}_checkpoint.bin", map_location="cpu", weights_only=True)
    return meta, state


class HostReads(TorchDispatchMode):
    """Count the ops that read a tensor's value back to the host, as `.item()`, `bool()`,
    `float()` and a Python `if` on a tensor do (on a GPU each waits for it), per `phase`: set
    `phase` to tell the counts of one part of a run from another's. (`.tolist()`, `.cpu()` and
    `.numpy()` of a CPU tensor dispatch nothing to count.)"""

    READS = (
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.item.default,
    )

    def __init__(self):
        super().__init__()
        self.phase: object = None
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.counts[self.phase] += 1
        return func(*args, **(kwargs or {}))


def damage(path: Path, nbytes: int = 2000) -> None:
    """Overwrite `nbytes` in the middle of the largest tensor a torch checkpoint (a zip) holds,
    as a disk or copy error would: the file still opens and unpickles."""
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    with open(path, "r+b") as handle:
        handle.seek(record.header_offset + 26)  # the local header's name and extra lengths
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
        start = record.header_offset + 30 + name_length + extra_length
        handle.seek(start + (record.file_size - nbytes) // 2)
        handle.write(bytes(range(256)) * (nbytes // 256) + bytes(nbytes % 256))


# --------------------------------------------------------------------------------------------
# Command-line entry points


def expect_user_error(
    main: Callable[[Sequence[str]], object], argv: Sequence[str], capsys: pytest.CaptureFixture
) -> str:
    """Run `main(argv)` as its script does; it must exit 2 with a message and no traceback.

    Returns:
        What it wrote to stderr.
    """
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: main(argv))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def script_error(*argv: str, **options: object) -> str:
    """`run_script` of a user mistake: it must exit 2 without a traceback. Returns its stderr."""
    proc = run_script(*argv, **options)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc.stderr


def set_epoch(loader: torch.utils.data.DataLoader, epoch: int) -> None:
    """Start `epoch` of a training loader as train.py does: its sampler's order and its
    dataset's augmentation."""
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)


def assert_same_batches(mine: Iterator, theirs: Iterator) -> None:
    """Two loaders give equal batches, each as the training device would get it."""
    for a, b in zip(mine, theirs, strict=True):
        for x, y in zip(prepare_batch(a, "cpu"), prepare_batch(b, "cpu"), strict=True):
            assert torch.equal(x, y)
