"""visualize.py end to end on tiny checkpoints the tests make (.bin + sidecar, and .npz)."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import visualize
from models.modeling import VisionTransformer
from models.npz import state_dict_to_npz
from tests.helpers import expect_user_error, script_error
from utils.infra.errors import USER_ERRORS
from utils.infra.file_io import save_npz

ROOT = Path(__file__).resolve().parent.parent


def make_bin(directory: Path, names: list[str] | None = None, dataset: str = "cifar10") -> Path:
    """A `testing` model saved as train.py does: state dict + JSON sidecar."""
    torch.manual_seed(0)
    model = VisionTransformer("testing", (32, 48), num_classes=10)
    torch.nn.init.normal_(model.head.weight, std=2.0)
    path = directory / "tiny_checkpoint.bin"
    torch.save({f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, path)
    sidecar = {"model_type": "testing", "img_size": [32, 48], "num_classes": 10}
    sidecar.update(dataset=dataset, class_names=names, step=5, accuracy=0.1)
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


def test_bin_with_sidecar_prints_class_names_and_writes_figure(tmp_path, capsys):
    ckpt = make_bin(tmp_path, names=[f"class_{i}" for i in range(10)])
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 40), (220, 30, 30)).save(image)
    out = tmp_path / "figs" / "attention.png"
    visualize.main(["--checkpoint", str(ckpt), "--image", str(image), "--output", str(out)])
    printed = capsys.readouterr().out
    assert printed.startswith("red:")
    assert printed.count("class_") == 5
    assert "  1. " in printed
    assert "  5. " in printed
    assert out.stat().st_size > 1000


def test_cifar_names_from_the_dataset_when_the_sidecar_has_none(tmp_path, capsys):
    ckpt = make_bin(tmp_path, names=None, dataset="cifar10")
    out = tmp_path / "a.png"
    visualize.main(["--checkpoint", str(ckpt), "--output", str(out), "--top_k", "10"])
    printed = capsys.readouterr().out
    assert printed.startswith("china:")  # the bundled photo
    for name in ("airplane", "truck", "cat"):
        assert name in printed


def test_folder_and_several_images_write_one_figure_each(tmp_path, capsys):
    ckpt = make_bin(tmp_path)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, colour in enumerate([(0, 0, 255), (0, 255, 0)]):
        Image.new("RGB", (40, 40), colour).save(folder / f"im{i}.jpg")
    extra = tmp_path / "extra.png"
    Image.new("L", (30, 50), 128).save(extra)  # grey: converted to RGB
    out = tmp_path / "attn.png"
    visualize.main(
        ["--checkpoint", str(ckpt), "--image", str(folder), str(extra), "--output", str(out)]
    )
    assert sorted(p.name for p in tmp_path.glob("attn_*.png")) == [
        "attn_extra.png",
        "attn_im0.png",
        "attn_im1.png",
    ]
    assert capsys.readouterr().out.count(":\n") == 3


def test_sub_folders_are_walked_and_an_unreadable_file_is_skipped_and_named(
    tmp_path, capsys, caplog
):
    ckpt = make_bin(tmp_path)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 40), (0, 0, 255)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG truncated")
    Image.new("RGB", (40, 40), (0, 255, 0)).save(folder / "sub" / "c.png")
    out = tmp_path / "attn.png"
    with caplog.at_level("INFO"):
        visualize.main(["--checkpoint", str(ckpt), "--image", str(folder), "--output", str(out)])
    assert sorted(p.name for p in tmp_path.glob("attn_*.png")) == ["attn_a.png", "attn_c.png"]
    assert capsys.readouterr().out.count(":\n") == 2
    assert f"Skipping an unreadable image (1 so far): {folder / 'b.png'}: " in caplog.text
    assert "2 figure(s) for 3 image(s); 1 unreadable image(s) skipped" in caplog.text


def test_a_bin_at_another_size_runs_with_its_position_embeddings_resized(tmp_path, caplog):
    ckpt = make_bin(tmp_path)  # 32x48: a 2x3 grid
    out = tmp_path / "big.png"
    with caplog.at_level("INFO"):
        visualize.main(["--checkpoint", str(ckpt), "--img_size", "64", "--output", str(out)])
    assert "trained at 32x48 and runs at 64x64" in caplog.text
    assert "resized from a 2x3 to a 4x4 patch grid" in caplog.text
    assert out.is_file()


def test_no_readable_image_is_one_message(tmp_path, capsys):
    ckpt = make_bin(tmp_path)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    argv = ["--checkpoint", str(ckpt), "--image", str(bad), "--output", str(tmp_path / "x.png")]
    err = expect_user_error(visualize.main, argv, capsys)
    assert "None of the 1 image(s) could be read" in err
    assert not (tmp_path / "x.png").exists()


def test_npz_with_model_type_and_img_size_shows_indices(tmp_path, capsys):
    model = VisionTransformer("testing", 32, num_classes=7)
    npz = tmp_path / "tiny.npz"
    save_npz(npz, state_dict_to_npz(model.state_dict(), model.config))
    out = tmp_path / "x.png"
    args = ["--checkpoint", str(npz), "--model_type", "testing", "--img_size", "48", "32"]
    visualize.main([*args, "--output", str(out), "--layer_maps", "rollout"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    assert {line.split()[-1] for line in lines[1:]} <= {str(i) for i in range(7)}
    assert out.is_file()


def test_user_errors(tmp_path, monkeypatch):
    ckpt = make_bin(tmp_path)
    with pytest.raises(USER_ERRORS, match="does not exist"):
        visualize.main(["--checkpoint", str(ckpt), "--image", str(tmp_path / "nope.jpg")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(USER_ERRORS, match="no images"):
        visualize.main(["--checkpoint", str(ckpt), "--image", str(empty)])
    with pytest.raises(USER_ERRORS, match="does not exist"):
        visualize.main(["--checkpoint", str(tmp_path / "missing.bin")])
    with pytest.raises(USER_ERRORS, match="does not fit"):
        visualize.main(["--checkpoint", str(ckpt), "--model_type", "ViT-Ti_16"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(USER_ERRORS, match="make demo"):
        visualize.main([])


def test_command_line_exits_2_with_a_clear_message(tmp_path):
    err = script_error(str(ROOT / "visualize.py"), "--checkpoint", str(tmp_path / "no.npz"))
    assert "error: Checkpoint" in err


def test_make_figures_writes_small_pngs_atomically(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "tools/make_figures.py")
    make_figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_figures)
    ckpt = make_bin(tmp_path, dataset="digits")
    out = tmp_path / "img"
    make_figures.main(["--checkpoint", str(ckpt), "--output_dir", str(out)])
    for name in ("attention_map.png", "patches.png"):
        with Image.open(out / name) as image:
            assert image.width > 300
        assert (out / name).stat().st_size < 300_000
    with pytest.raises(USER_ERRORS, match="make demo"):
        make_figures.main(["--checkpoint", str(tmp_path / "none.bin")])
    # A full disk keeps the previous figures (each is written atomically).
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _full_disk(monkeypatch)
    argv = ["--checkpoint", str(ckpt), "--output_dir", str(out), "--dpi", "60"]
    err = expect_user_error(make_figures.main, argv, capsys)
    monkeypatch.undo()
    assert "No space left" in err
    assert "--output_dir" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_figures_go_to_the_output_folder_by_default(tmp_path, monkeypatch, capsys):
    (tmp_path / "run").mkdir()
    ckpt = make_bin(tmp_path / "run")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    visualize.main(["--checkpoint", str(ckpt)])
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*.png")) == [
        "output/attention/attention.png"
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dpi", "0"], "argument --dpi: must be at least 1, got 0"),
        (["--img_size", "0"], "argument --img_size: must be at least 1, got 0"),
        (["--img_size", "-32"], "argument --img_size: must be at least 1, got -32"),
        (["--img_size", "32", "32", "32"], "--img_size takes one value or two (HEIGHT WIDTH)"),
        (["--top_k", "0"], "argument --top_k: must be at least 1, got 0"),
        (["--output", "figure.xyz"], "--output figure.xyz: the file name must end in a figure"),
        (["--output", "figure"], "--output figure: the file name must end in a figure"),
    ],
)
def test_bad_flag_values_are_one_line_and_exit_2(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as info:
        visualize.main(["--checkpoint", str(tmp_path / "x.bin"), *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_an_output_that_cannot_be_written_is_one_message(tmp_path, capsys):
    ckpt = make_bin(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    err = expect_user_error(
        visualize.main,
        ["--checkpoint", str(ckpt), "--output", str(blocker / "fig.png")],
        capsys,
    )
    assert f"Cannot write {blocker / 'fig.png'}" in err


def _full_disk(monkeypatch) -> None:
    """Every fsync fails as on a full disk (a write that never fsyncs is not noticed)."""

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_keeps_the_previous_figure_and_names_the_scripts_own_flag(
    tmp_path, monkeypatch, capsys
):
    ckpt = make_bin(tmp_path)
    out = tmp_path / "figs" / "fig.png"
    argv = ["--checkpoint", str(ckpt), "--output", str(out)]
    visualize.main(argv)
    before = out.read_bytes()
    _full_disk(monkeypatch)
    err = expect_user_error(visualize.main, [*argv, "--dpi", "120"], capsys)
    monkeypatch.undo()
    assert f"No space left on the device while saving {out}" in err
    assert "previous file there is unchanged" in err
    assert "--output," in err
    assert "--output_dir" not in err
    assert "--resume" not in err
    assert out.read_bytes() == before
    assert os.listdir(out.parent) == ["fig.png"]  # no temporary file left


@pytest.mark.parametrize("limit", ["size", "memory"])
def test_a_dpi_whose_figure_cannot_be_drawn_is_one_message(tmp_path, monkeypatch, capsys, limit):
    from utils.infra import figures

    ckpt = make_bin(tmp_path)
    out = tmp_path / "fig.png"
    dpi = "100000"  # beyond the 2**16 pixels a side matplotlib's Agg draws
    if limit == "memory":
        dpi = "100"
        monkeypatch.setattr(figures, "available_bytes", lambda device: 10**6)
    err = expect_user_error(
        visualize.main, ["--checkpoint", str(ckpt), "--output", str(out), "--dpi", dpi], capsys
    )
    largest = int(err.split("Pass --dpi ")[1].split()[0])
    assert f"At --dpi {dpi} the figure would be" in err
    assert 1 <= largest < int(dpi)
    assert not out.exists()
    monkeypatch.undo()
    if limit == "memory":  # the figure it names does fit
        visualize.main(["--checkpoint", str(ckpt), "--output", str(out), "--dpi", str(largest)])
        assert out.stat().st_size > 0


def test_a_figure_never_replaces_the_image_it_reads(tmp_path, capsys):
    ckpt = make_bin(tmp_path)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 40), (220, 30, 30)).save(photo)
    kept = photo.read_bytes()  # (a checkpoint's suffixes are no figure's: refused by the flag)
    argv = ["--checkpoint", str(ckpt), "--image", str(photo), "--output", str(photo)]
    err = expect_user_error(visualize.main, argv, capsys)
    assert f"Cannot write {photo}: {photo} is read from there, and is never replaced" in err
    assert photo.read_bytes() == kept
    out = tmp_path / "figure.png"  # a figure of its own is redrawn in place
    for _ in range(2):
        visualize.main(["--checkpoint", str(ckpt), "--image", str(photo), "--output", str(out)])
    assert out.stat().st_size > 1000
