"""hubconf.py through `torch.hub.load(<clone>, ..., source="local")`: one entry per official
architecture, weights from a local official file or a URL (a loopback server), and `load` for a
train.py checkpoint."""

from __future__ import annotations

import functools
import importlib.util
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from models.configs import CONFIGS, get_config
from models.npz import CheckpointError
from tests.helpers import QuietHandler, QuietServer, fake_checkpoint, tiny_args
from utils.infra.errors import UserError
from utils.infra.file_io import save_npz

REPO = Path(__file__).resolve().parents[1]
TI16 = "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0"

pytestmark = pytest.mark.usefixtures("one_thread")


def hub(entry: str, *args, **kwargs):
    return torch.hub.load(str(REPO), entry, *args, source="local", trust_repo=True, **kwargs)


@pytest.fixture(scope="module")
def ti16_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """A ViT-Ti_16 checkpoint in the official layout, 10 classes at 64 px."""
    arrays = fake_checkpoint(get_config("ViT-Ti_16"), num_classes=10, img_size=64)
    path = tmp_path_factory.mktemp("www") / "augreg" / f"{TI16}.npz"
    path.parent.mkdir()
    save_npz(path, arrays)
    return path, arrays


@pytest.fixture
def served(ti16_file) -> Iterator[str]:
    """The folder above the checkpoint's, on 127.0.0.1; yields its URL."""
    handler = functools.partial(QuietHandler, directory=str(ti16_file[0].parents[1]))
    server = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    QuietHandler.requests = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def assert_holds(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """The model holds the official arrays (converted as the official layout says)."""
    assert torch.equal(model.embeddings.cls_token, torch.from_numpy(arrays["cls"]))
    assert torch.equal(model.head.weight, torch.from_numpy(arrays["head/kernel"]).T)
    kernel = arrays["embedding/kernel"].transpose(3, 2, 0, 1)  # HWIO -> OIHW
    assert torch.equal(model.embeddings.patch_embed.weight, torch.from_numpy(kernel))


def test_every_official_architecture_has_an_entry_named_after_it() -> None:
    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = sorted(
        name for name in dir(hubconf) if callable(getattr(hubconf, name)) and name[0] != "_"
    )
    official = [name for name in CONFIGS if name not in ("testing", "demo")]
    assert len(entries) == len(official) + 1  # and `load`
    with torch.device("meta"):  # the architecture alone: no memory, no time
        for name in official:
            entry = hubconf._hub_name(name)
            model = getattr(hubconf, entry)()
            assert model.config == CONFIGS[name], entry
    names = {hubconf._hub_name(n): n for n in official}
    assert names["vit_b16"] == "ViT-B_16"
    assert names["r50_vit_b16"] == "R50+ViT-B_16"
    assert names["vit_b16_gap_norep"] == "ViT-B_16-gap-norep"
    assert "load" in entries


def test_weights_from_a_local_official_file(ti16_file) -> None:
    path, arrays = ti16_file
    model = hub("vit_ti16", weights=path)
    assert (model.img_size, model.num_classes, model.training) == ((64, 64), 10, False)
    assert_holds(model, arrays)
    # A fine-tune's start: a new zero head, position embeddings resized to the new size.
    start = hub("vit_ti16", weights=path, num_classes=3, img_size=96)
    assert start.num_classes == 3
    assert not start.head.weight.any()
    assert start.embeddings.pos_embed.shape[1] == 1 + (96 // 16) ** 2
    assert torch.equal(start.embeddings.cls_token, torch.from_numpy(arrays["cls"]))


def test_weights_from_a_url_are_downloaded_once(
    ti16_file, served: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = f"{served}/augreg/{TI16}.npz"
    for _ in range(2):
        assert_holds(hub("vit_ti16", weights=url), ti16_file[1])
    assert QuietHandler.requests == [f"/augreg/{TI16}.npz"]  # the second came from the cache
    assert (tmp_path / "torch" / "hub" / "checkpoints" / "vit" / "augreg" / f"{TI16}.npz").is_file()


def test_a_file_of_another_architecture_is_refused_and_deleted(
    served: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match="not a usable ViT-B_16 checkpoint and was deleted"):
        hub("vit_b16", weights=f"{served}/augreg/{TI16}.npz")
    assert not list((tmp_path / "torch").rglob("*.npz*"))
    with pytest.raises(UserError, match=r"does not exist \(HTTP 404\)"):
        hub("vit_ti16", weights=f"{served}/augreg/missing.npz")
    with pytest.raises(CheckpointError, match=r"missing\.npz does not exist"):
        hub("vit_ti16", weights=tmp_path / "missing.npz")


def test_load_reads_a_train_py_checkpoint(tmp_path: Path) -> None:
    train.main(tiny_args(tmp_path, eval_every=4))
    model = hub("load", tmp_path / "out" / "tiny_checkpoint.bin")
    saved = torch.load(tmp_path / "out" / "tiny_checkpoint.bin", weights_only=True)
    saved = {k.removeprefix("module."): v for k, v in saved.items()}
    assert (model.config.name, model.img_size, model.num_classes) == ("testing", (32, 32), 10)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
