"""export.py: every format round-trips, checked by its own reader (safetensors, timm, ORT)."""

from __future__ import annotations

import errno
import json
import os
import re
import sys

import numpy as np
import pytest
import torch
from torch import nn

import export
from models import configs
from models.configs import ResNetConfig, get_config
from models.modeling import VisionTransformer
from tests.helpers import expect_user_error, fake_checkpoint
from utils.infra.loading import assign_weights, load_model, read_state_dict

CLASSES = ["cat", "dog", "bird"]
HYBRID = get_config("testing").replace(
    name="testing-hybrid", hidden_size=32, num_heads=4, patch_size=(1, 1), resnet=ResNetConfig((1,))
)


@pytest.fixture
def hybrid(monkeypatch: pytest.MonkeyPatch) -> str:
    """A tiny hybrid, registered for the duration of a test (load_model reads the registry)."""
    monkeypatch.setitem(configs.CONFIGS, HYBRID.name, HYBRID)
    return HYBRID.name


@pytest.fixture(params=["testing", "hybrid"])
def name(request: pytest.FixtureRequest) -> str:
    """A plain ViT's and a hybrid's registry name, one per test."""
    return request.getfixturevalue("hybrid") if request.param == "hybrid" else request.param


def _model(config: str, img_size: int = 32, num_classes: int = 3) -> VisionTransformer:
    """A model with every weight random, the head too (a fresh head is all zeros)."""
    torch.manual_seed(0)
    model = VisionTransformer(config, img_size, num_classes).eval()
    nn.init.normal_(model.head.weight, std=0.5)
    nn.init.normal_(model.head.bias, std=0.5)
    return model


def _images(batch: int, img_size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))


def _assert_same_state(model: nn.Module, other: nn.Module) -> None:
    ours, theirs = model.state_dict(), other.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key


# --------------------------------------------------------------------------------------------
# npz and safetensors


def test_npz_is_the_official_layout_and_loads_back_bit_exact(
    best_checkpoint, name, one_thread
) -> None:
    model = _model(name)
    ckpt = best_checkpoint(model, class_names=CLASSES)
    export.main(["--checkpoint", str(ckpt), "--format", "npz"])
    path = ckpt.with_name("run_checkpoint.npz")
    with np.load(path, allow_pickle=False) as archive:
        exported = {k: archive[k].shape for k in archive.files}
    # Keys and shapes as an official file has them, written independently of the converter.
    official = fake_checkpoint(get_config(name), num_classes=3, img_size=32)
    assert exported == {k: v.shape for k, v in official.items()}
    loaded = load_model(path, name)
    assert loaded.img_size == (32, 32)
    _assert_same_state(model, loaded.model)


def test_safetensors_loads_bit_exact_with_its_description(best_checkpoint, one_thread) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = _model("testing")
    ckpt = best_checkpoint(model, dataset="imagefolder", class_names=CLASSES, accuracy=0.75)
    export.main(["--checkpoint", str(ckpt), "--format", "safetensors"])
    path = ckpt.with_name("run_checkpoint.safetensors")
    # The safetensors library's own reader: the tensors and JSON-string metadata.
    tensors = load_file(path)
    assert all(torch.equal(v, tensors[k]) for k, v in model.state_dict().items())
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt"
    assert json.loads(metadata["class_names"]) == CLASSES
    assert json.loads(metadata["img_size"]) == [32, 32]
    # Our loader takes model type, image size and classes from it, as from a sidecar.
    ckpt.with_suffix(".json").unlink()
    loaded = load_model(path)
    assert (loaded.model_type, loaded.img_size) == ("testing", (32, 32))
    assert (loaded.class_names, loaded.dataset, loaded.info) == (
        CLASSES,
        "imagefolder",
        {"step": 10, "accuracy": 0.75},
    )
    _assert_same_state(model, loaded.model)
    fresh = VisionTransformer("testing", 32, 3)
    assign_weights(fresh, read_state_dict(path), str(path))
    _assert_same_state(model, fresh)


@pytest.mark.parametrize(
    ("tf32", "line"),
    [
        (True, "- TF32: on (float32 matrix products and convolutions in TF32 on CUDA)"),
        (False, "- TF32: off (float32 matrix products and convolutions in full float32)"),
        (None, None),  # a checkpoint from before the field: the card says nothing
    ],
)
def test_tf32_goes_into_the_safetensors_description_and_the_model_card(
    best_checkpoint, one_thread, tf32, line
) -> None:
    from utils.infra.file_io import read_sidecar

    ckpt = best_checkpoint(_model("testing"), tf32=tf32)
    export.main(["--checkpoint", str(ckpt), "--format", "safetensors"])
    assert load_model(ckpt.with_name("run_checkpoint.safetensors")).tf32 is tf32
    loaded = load_model(ckpt)
    card = export.model_card(loaded, read_sidecar(ckpt), {}, (str(ckpt), "0" * 64), "Checked.")
    tf32_lines = [row for row in card.splitlines() if row.startswith("- TF32:")]
    assert tf32_lines == ([line] if line else [])
    assert card.index("- Training precision: fp32") < card.index(line or "## Results")


def test_the_model_card_rounds_figures_and_names_flags_left_at_their_default(
    best_checkpoint, one_thread
) -> None:
    from utils.infra.file_io import read_sidecar

    ckpt = best_checkpoint(_model("testing"), accuracy=0.9583333134651184)
    loaded = load_model(ckpt)
    flags = {"precision": None, "learning_rate": 0.03}
    card = export.model_card(loaded, read_sidecar(ckpt), flags, (str(ckpt), "0" * 64), "Checked.")
    assert "| `--precision` | not given (its default) |" in card
    assert "| `--learning_rate` | 0.03 |" in card
    assert "| accuracy | 0.958333 |" in card
    assert "null" not in card


def test_safetensors_that_is_not_one_is_a_clear_error(tmp_path, capsys) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    err = expect_user_error(export.main, ["--checkpoint", str(path), "--format", "npz"], capsys)
    assert "not a readable .safetensors file" in err


# --------------------------------------------------------------------------------------------
# timm


def test_timm_export_loads_strictly_and_computes_the_same_logits(
    best_checkpoint, capsys, one_thread
) -> None:
    timm = pytest.importorskip("timm")
    model = _model("ViT-Ti_16", num_classes=4)
    ckpt = best_checkpoint(model)
    capsys.readouterr()
    export.main(["--checkpoint", str(ckpt), "--format", "timm"])
    out = capsys.readouterr().out
    path = ckpt.with_name("run_checkpoint_timm.pth")
    # Build the model exactly as the printed line says.
    call = re.search(r"model = (timm\.create_model\(.*\))", out).group(1)
    assert "vit_tiny_patch16_224" in call
    theirs = eval(call, {"timm": timm}).eval()
    theirs.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = _images(3) * 2 - 1
    with torch.no_grad():
        expected = model(x)[0]
        torch.testing.assert_close(theirs(x), expected, atol=1e-5, rtol=0)
    assert expected.std() > 0.1  # the heads are not trivially zero


@pytest.mark.parametrize("name", sorted(export.TIMM_NAMES))
def test_timm_names_have_our_architectures(name) -> None:
    timm = pytest.importorskip("timm")
    timm_name, kwargs = export.timm_model_args(get_config(name), (64, 64), 7)
    with torch.device("meta"):
        ours = VisionTransformer(name, 64, 7)
        theirs = timm.create_model(timm_name, **kwargs)
    mapped = export.timm_state_dict(ours.state_dict())
    assert {k: v.shape for k, v in mapped.items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    assert theirs.blocks[0].mlp.act.__class__.__name__ == "GELUTanh"
    assert theirs.blocks[0].mlp.drop1.p == get_config(name).dropout_rate


def test_timm_refuses_models_it_cannot_compute_exactly(best_checkpoint, capsys, name) -> None:
    ckpt = best_checkpoint(_model(name))
    err = expect_user_error(export.main, ["--checkpoint", str(ckpt), "--format", "timm"], capsys)
    assert err.count("\n") == 1  # one line
    assert "--format npz" in err
    assert not ckpt.with_name("run_checkpoint_timm.pth").exists()


# --------------------------------------------------------------------------------------------
# ONNX


def test_onnx_runs_in_onnxruntime_with_any_batch_size(
    best_checkpoint, tmp_path, capsys, name, one_thread
) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _model(name)
    ckpt = best_checkpoint(model, class_names=CLASSES)
    path = tmp_path / "exported" / "model.onnx"
    capsys.readouterr()
    export.main(["--checkpoint", str(ckpt), "--format", "onnx", "--output", str(path)])
    assert f"opset {export.ONNX_OPSET}" in capsys.readouterr().out
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = _images(batch, seed=batch) * 2 - 1
        (logits,) = session.run(["logits"], {"images": x.numpy()})
        with torch.no_grad():
            expected = model(x)[0].numpy()
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    proto = onnx.load(str(path))
    assert {o.domain: o.version for o in proto.opset_import}[""] == export.ONNX_OPSET
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["class_names"]) == CLASSES
    assert (props["model_type"], json.loads(props["img_size"])) == (name, [32, 32])


def test_onnx_without_the_packages_says_how_to_get_them(
    best_checkpoint, capsys, monkeypatch
) -> None:
    ckpt = best_checkpoint(_model("testing"))
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    err = expect_user_error(export.main, ["--checkpoint", str(ckpt), "--format", "onnx"], capsys)
    assert "pip install onnx onnxruntime" in err
    assert not ckpt.with_suffix(".onnx").exists()


# --------------------------------------------------------------------------------------------
# Bad input


def test_no_sidecar_and_an_unknown_architecture_asks_for_model_type(
    best_checkpoint, capsys, monkeypatch
) -> None:
    odd = get_config("testing").replace(name="unregistered", hidden_size=24, num_heads=3)
    monkeypatch.setitem(configs.CONFIGS, odd.name, odd)
    ckpt = best_checkpoint(_model(odd.name), sidecar=False)
    monkeypatch.delitem(configs.CONFIGS, odd.name)
    err = expect_user_error(export.main, ["--checkpoint", str(ckpt), "--format", "npz"], capsys)
    assert "--model_type" in err


def test_existing_output_is_kept_unless_overwrite(best_checkpoint, capsys, one_thread) -> None:
    ckpt = best_checkpoint(_model("testing"))
    target = ckpt.with_suffix(".npz")
    target.write_bytes(b"keep me")
    argv = ["--checkpoint", str(ckpt), "--format", "npz"]
    err = expect_user_error(export.main, argv, capsys)
    assert "--overwrite" in err
    assert target.read_bytes() == b"keep me"
    export.main([*argv, "--overwrite"])
    assert load_model(target, "testing").model_type == "testing"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--format", "tflite"], "invalid choice"),
        (["--format", "npz", "--output", "{tmp}/a_file/model.npz"], "not a writable folder"),
        (["--format", "npz", "--output", "{tmp}"], "is a directory"),
        (["--format", "npz", "--img_size", "30"], "not divisible"),
        (["--format", "npz", "--img_size", "0"], "argument --img_size: must be at least 1, got 0"),
        (["--format", "npz", "--img_size", "-32"], "argument --img_size: must be at least 1"),
    ],
)
def test_bad_input_is_one_message_and_exit_2(
    best_checkpoint, tmp_path, capsys, argv, expected
) -> None:
    ckpt = best_checkpoint(_model("testing"))
    (tmp_path / "a_file").write_text("a file, not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    err = expect_user_error(export.main, ["--checkpoint", str(ckpt), *argv], capsys)
    assert expected in err
    assert not ckpt.with_suffix(".npz").exists()


def test_missing_checkpoint_is_one_message(tmp_path, capsys) -> None:
    missing = tmp_path / "nothing_checkpoint.bin"
    err = expect_user_error(
        export.main, ["--checkpoint", str(missing), "--format", "safetensors"], capsys
    )
    assert "does not exist" in err


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "timm"])
def test_a_full_disk_keeps_the_previous_export_and_names_only_exports_flags(
    best_checkpoint, capsys, monkeypatch, one_thread, fmt
) -> None:
    ckpt = best_checkpoint(_model("ViT-Ti_16" if fmt == "timm" else "testing"))
    argv = ["--checkpoint", str(ckpt), "--format", fmt, "--overwrite"]
    target = ckpt.with_name(ckpt.stem + export.SUFFIXES[fmt])
    target.write_bytes(b"the previous export")

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    err = expect_user_error(export.main, argv, capsys)
    monkeypatch.undo()
    assert f"No space left on the device while saving {target}" in err
    assert "or pass another --output, then run again." in err
    assert "--output_dir" not in err  # train.py's flags, which export.py does not have
    assert "--resume" not in err
    assert target.read_bytes() == b"the previous export"


# --------------------------------------------------------------------------------------------
# What --overwrite may replace


def test_overwrite_never_replaces_the_checkpoint_it_reads(tmp_path, capsys) -> None:
    checkpoint = tmp_path / "model.npz"
    np.savez(checkpoint, **fake_checkpoint(get_config("testing"), 3, 32))
    before = checkpoint.read_bytes()
    argv = ["--checkpoint", str(checkpoint), "--format", "npz", "--model_type", "testing"]
    err = expect_user_error(export.main, [*argv, "--overwrite"], capsys)  # the default output
    assert f"Cannot write {checkpoint}: {checkpoint} is read from there" in err
    err = expect_user_error(
        export.main, [*argv, "--output", str(checkpoint), "--overwrite"], capsys
    )
    assert "is read from there" in err
    assert checkpoint.read_bytes() == before


def test_a_suffix_that_is_not_the_formats_is_one_message(best_checkpoint, capsys) -> None:
    ckpt = best_checkpoint(_model("testing"))
    before = ckpt.read_bytes()
    argv = ["--checkpoint", str(ckpt), "--format", "npz", "--output", str(ckpt), "--overwrite"]
    err = expect_user_error(export.main, argv, capsys)
    assert f"--format npz writes a .npz file, but --output {ckpt} ends otherwise" in err
    assert ckpt.read_bytes() == before


def test_overwrite_never_replaces_a_device_or_pipe(best_checkpoint, tmp_path, capsys) -> None:
    ckpt = best_checkpoint(_model("testing"))
    pipe = tmp_path / "pipe.npz"
    os.mkfifo(pipe)
    argv = ["--checkpoint", str(ckpt), "--format", "npz", "--output", str(pipe), "--overwrite"]
    err = expect_user_error(export.main, argv, capsys)
    assert "it is a device, pipe or socket, not a regular file" in err
    assert pipe.is_fifo()


def test_overwrite_replaces_an_earlier_hf_export_but_no_other_folder(
    best_checkpoint, tmp_path, capsys, one_thread
) -> None:
    ckpt = best_checkpoint(_model("testing"), class_names=CLASSES)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    (mine / "notes.txt").write_text("my own notes")
    argv = ["--checkpoint", str(ckpt), "--format", "hf", "--overwrite", "--output"]
    err = expect_user_error(export.main, [*argv, str(mine)], capsys)
    assert "it is a folder holding other files than an earlier export wrote" in err
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "notes.txt"]
    assert (mine / "notes.txt").read_text() == "my own notes"

    earlier = tmp_path / "earlier_hf"
    export.main([*argv, str(earlier)])
    (earlier / "config.json").write_text("{}")  # replaced by the next export
    export.main([*argv, str(earlier)])
    assert load_model(earlier).class_names == CLASSES
    # ... and an export never replaces the folder it reads.
    err = expect_user_error(
        export.main, ["--checkpoint", str(earlier), *argv[2:], str(earlier)], capsys
    )
    assert "is read from there" in err


def test_a_full_disk_in_an_hf_export_names_only_exports_flags(
    best_checkpoint, capsys, monkeypatch, one_thread
) -> None:
    ckpt = best_checkpoint(_model("testing"))

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    err = expect_user_error(export.main, ["--checkpoint", str(ckpt), "--format", "hf"], capsys)
    monkeypatch.undo()
    assert "No space left on the device" in err
    assert "or pass another --output, then run again." in err
    assert "--output_dir" not in err
    assert "--resume" not in err
    assert not ckpt.with_name("run_checkpoint_hf").exists()
