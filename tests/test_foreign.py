"""Hugging Face and timm checkpoints in and out; the libraries' own models are the oracles.

transformers' `ViTForImageClassification`/`ViTModel` and `timm.create_model` build the models,
save them with their own writers (`save_pretrained`, `save_for_hf`, `torch.save`), and compute
the logits the files must give here, and the logits of what export.py writes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from PIL import Image

import export
import predict
import train
from models import configs
from models.configs import ResNetConfig, get_config
from models.foreign import (
    from_hf,
    from_timm,
    hf_config,
    hf_config_model,
    hf_state_dict,
    state_dict_format,
    timm_state_dict,
)
from models.modeling import VisionTransformer
from tests.helpers import (
    distinct_model,
    expect_user_error,
    fake_checkpoint,
    hf_model,
    load_checkpoint,
    scalars,
    tiny_args,
)
from utils.infra.loading import load_model, pretrained_weights, read_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["cat", "dog", "bird"]
# (model, image size): square and not; `testing` and `demo` are as tiny as the registry has.
SHAPES = [("testing", (32, 32)), ("testing", (32, 48)), ("demo", (24, 40))]


def _images(img_size: tuple[int, int], batch: int = 3, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *img_size, generator=generator) * 2 - 1


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)[0]


def _same_state(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key


def _timm_model(name: str, img_size: tuple[int, int], num_classes: int = 3, **kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    size = img_size[0] if img_size[0] == img_size[1] else img_size
    model = timm.create_model(
        name, num_classes=num_classes, img_size=size, act_layer="gelu_tanh", **kwargs
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


# --------------------------------------------------------------------------------------------
# Round trips of the key conversions


@pytest.mark.parametrize(("name", "img_size"), SHAPES)
def test_ours_to_hf_and_timm_and_back_is_bit_exact(name, img_size) -> None:
    state = distinct_model(name, img_size, 3).state_dict()
    hf = hf_state_dict(state)
    assert state_dict_format(hf) == "hf"
    _same_state(state, from_hf(hf))
    timm_state = timm_state_dict(state)
    assert state_dict_format(timm_state) == "timm"
    _same_state(state, from_timm(timm_state))


PLAIN = [
    pytest.param(n, marks=[pytest.mark.slow] if c.num_layers > 12 else [])  # L and H: seconds
    for n, c in configs.CONFIGS.items()
    if c.resnet is None and c.classifier == "token"
]


@pytest.mark.parametrize("name", PLAIN)
def test_every_plain_vit_has_its_transformers_twin(name) -> None:
    transformers = pytest.importorskip("transformers")
    config = get_config(name)
    hf = hf_config(config, (64, 96), None, 7)
    assert hf_config_model(hf, "config.json")[0] == name  # and back to the same registry entry
    with torch.device("meta"):
        ours = VisionTransformer(name, (64, 96), 7)
        theirs = transformers.ViTForImageClassification(transformers.ViTConfig(**hf))
    # transformers 5 names the parts otherwise in memory than on the hub: both read back.
    assert {k: v.shape for k, v in from_hf(theirs.state_dict()).items()} == {
        k: v.shape for k, v in ours.state_dict().items()
    }


# --------------------------------------------------------------------------------------------
# Out: export.py --format hf, run by transformers


# (model, image size, source): an `.npz` gives no non-square size (it has no sidecar).
HF_EXPORTS = [
    *((name, size, "bin") for name, size in SHAPES),
    ("testing", (32, 32), "npz_with_pre_logits"),
    ("demo", (24, 24), "npz_with_pre_logits"),
]


@pytest.mark.parametrize(("name", "img_size", "source"), HF_EXPORTS)
def test_hf_export_gives_our_logits_in_transformers(
    best_checkpoint, tmp_path, capsys, name, img_size, source
) -> None:
    transformers = pytest.importorskip("transformers")
    if source == "bin":
        model = distinct_model(name, img_size, 3)
        checkpoint = best_checkpoint(model, class_names=CLASSES)
    else:  # an in21k-style file: pre_logits on the way in, dropped as the official code does
        config = get_config(name)
        weights = fake_checkpoint(config, 3, img_size, representation_size=config.hidden_size)
        checkpoint = tmp_path / f"{name}.npz"
        np.savez(checkpoint, **weights)
    model = load_model(checkpoint, name).model
    out = tmp_path / "hf"
    argv = ["--checkpoint", str(checkpoint), "--format", "hf", "--output", str(out)]
    export.main([*argv, "--model_type", name])  # no .npz is taken for `testing` unasked
    assert "no missing or unexpected keys" in capsys.readouterr().out
    theirs, info = transformers.ViTForImageClassification.from_pretrained(
        out, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    x = _images(img_size)
    with torch.no_grad():
        logits = theirs.eval()(pixel_values=x).logits
    torch.testing.assert_close(logits, _logits(model, x), atol=1e-5, rtol=0)
    assert logits.std() > 0.1
    assert (theirs.config.hidden_act, theirs.config.layer_norm_eps) == ("gelu_pytorch_tanh", 1e-6)
    # ViTImageProcessor's preprocessing is vit_jax's at the model's own size.
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    pixels = np.random.default_rng(0).integers(0, 256, (*img_size, 3), dtype=np.uint8)
    theirs_in = processor(Image.fromarray(pixels), return_tensors="pt")["pixel_values"][0]
    ours_in = torch.from_numpy((pixels.astype(np.float32) - 127.5) / 127.5).permute(2, 0, 1)
    torch.testing.assert_close(theirs_in, ours_in, atol=1e-6, rtol=0)
    # ... and comes back bit-exact, with its names.
    loaded = load_model(out)
    assert (loaded.model_type, loaded.img_size) == (name, img_size)
    _same_state(model.state_dict(), loaded.model.state_dict())
    if source == "bin":
        assert loaded.class_names == CLASSES
        assert theirs.config.id2label == dict(enumerate(CLASSES))


def test_hf_model_card_says_what_the_sidecar_knows(best_checkpoint, tmp_path) -> None:
    from utils.infra.atomic import file_sha256

    model = distinct_model("testing", 32, 3)
    checkpoint = best_checkpoint(
        model, dataset="imagefolder", class_names=CLASSES, minival_accuracy=0.625,
        selected_by="minival",
    )  # fmt: skip
    export.main(["--checkpoint", str(checkpoint), "--format", "hf"])
    card = (checkpoint.with_name("run_checkpoint_hf") / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-classification")
    assert file_sha256(checkpoint) in card
    assert "| 10 | minival accuracy | 0.625 | 0.5 |" in card
    assert "datasets:\n- imagefolder" in card


@pytest.mark.parametrize("kind", ["hybrid", "gap", "pre_logits"])
def test_hf_export_refuses_what_transformers_cannot_hold(
    best_checkpoint, monkeypatch, capsys, kind
) -> None:
    base = get_config("testing")
    config = {
        "hybrid": base.replace(
            name="t-hybrid", hidden_size=32, num_heads=4, patch_size=(1, 1),
            resnet=ResNetConfig((1,)),
        ),
        "gap": base.replace(name="t-gap", classifier="gap"),
        "pre_logits": base.replace(representation_size=16),
    }[kind]  # fmt: skip
    monkeypatch.setitem(configs.CONFIGS, config.name, config)
    checkpoint = best_checkpoint(distinct_model(config, 32, 3))
    err = expect_user_error(
        export.main, ["--checkpoint", str(checkpoint), "--format", "hf"], capsys
    )
    assert err.count("\n") == 1
    assert {"hybrid": "ResNet stem", "gap": "gap classifier", "pre_logits": "pre_logits"}[
        kind
    ] in err
    assert not checkpoint.with_name("run_checkpoint_hf").exists()


def test_hf_export_keeps_an_existing_folder_unless_overwrite(best_checkpoint, capsys) -> None:
    checkpoint = best_checkpoint(distinct_model("testing", 32, 3))
    folder = checkpoint.with_name("run_checkpoint_hf")
    argv = ["--checkpoint", str(checkpoint), "--format", "hf"]
    export.main(argv)
    (folder / "config.json").write_text("{}")
    assert "--overwrite" in expect_user_error(export.main, argv, capsys)
    assert (folder / "config.json").read_text() == "{}"
    export.main([*argv, "--overwrite"])  # an earlier export's folder, so it is replaced
    assert (folder / "config.json").read_text() != "{}"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "preprocessor_config.json",
    ]  # fmt: skip
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no leftovers


def test_hf_export_without_transformers_says_it_was_not_checked(
    best_checkpoint, monkeypatch, capsys
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    checkpoint = best_checkpoint(distinct_model("testing", 32, 3))
    export.main(["--checkpoint", str(checkpoint), "--format", "hf"])
    assert "transformers is not installed here" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Out: export.py --format timm, run by timm


@pytest.mark.parametrize(
    ("img_size", "source"),
    [((32, 32), "bin"), ((32, 48), "bin"), ((32, 32), "npz_with_pre_logits")],
)
def test_timm_export_gives_our_logits_in_timm(best_checkpoint, tmp_path, img_size, source) -> None:
    timm = pytest.importorskip("timm")
    config = get_config("ViT-Ti_16")
    if source == "bin":
        checkpoint = best_checkpoint(distinct_model(config, img_size, 3))
    else:
        checkpoint = tmp_path / "ViT-Ti_16.npz"
        np.savez(checkpoint, **fake_checkpoint(config, 3, img_size, representation_size=192))
    model = load_model(checkpoint, config.name).model
    out = tmp_path / "timm.pth"
    export.main(["--checkpoint", str(checkpoint), "--format", "timm", "--output", str(out)])
    name, kwargs = export.timm_model_args(config, img_size, 3)
    theirs = timm.create_model(name, **kwargs).eval()
    theirs.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = _images(img_size)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), _logits(model, x), atol=1e-5, rtol=0)
    back = load_model(out, img_size=img_size).model  # a bare state dict: non-square is unknown
    _same_state(model.state_dict(), back.state_dict())


# --------------------------------------------------------------------------------------------
# In: what transformers and timm saved themselves


@pytest.mark.parametrize("shards", [False, True])
@pytest.mark.parametrize(("name", "img_size"), SHAPES)
def test_a_folder_transformers_saved_gives_its_logits(tmp_path, name, img_size, shards) -> None:
    theirs = hf_model(name, img_size, num_labels=4)
    folder = tmp_path / "hf"
    theirs.save_pretrained(folder, **({"max_shard_size": "20KB"} if shards else {}))
    assert (folder / "model.safetensors.index.json").exists() == shards
    loaded = load_model(folder)
    assert (loaded.model_type, loaded.img_size) == (name, img_size)
    assert loaded.class_names is None  # LABEL_0 ... are no names
    x = _images(img_size)
    with torch.no_grad():
        expected = theirs(pixel_values=x).logits
    torch.testing.assert_close(_logits(loaded.model, x), expected, atol=1e-5, rtol=0)


def test_an_in21k_folder_maps_its_pooler_to_pre_logits(tmp_path) -> None:
    theirs = hf_model("testing", (32, 32), pooler=True)
    folder = tmp_path / "in21k"
    theirs.save_pretrained(folder)
    state = read_state_dict(folder)
    assert {"pre_logits.weight", "pre_logits.bias"} <= state.keys()
    model = VisionTransformer.empty(get_config("testing").replace(representation_size=16), 32, 1)
    state.update({"head.weight": torch.zeros(1, 16), "head.bias": torch.zeros(1)})  # it has none
    model.load_state_dict(state, strict=True)
    x = _images((32, 32))
    with torch.no_grad():
        pooled = model.eval().forward_features(x)[0]
        torch.testing.assert_close(pooled, theirs(pixel_values=x).pooler_output, atol=1e-5, rtol=0)
    # As the start of a fine-tune: official arrays, pre_logits included, round-trip exactly.
    weights, model_type = pretrained_weights(folder, None)
    assert model_type == "testing"
    np.testing.assert_array_equal(
        weights["pre_logits/kernel"], theirs.pooler.dense.weight.detach().numpy().T
    )
    fine_tuned = VisionTransformer.from_pretrained("testing", weights, 32, 5, zero_head=True)
    assert fine_tuned.pre_logits is None  # dropped, as the official fine-tuning does


def test_hf_numerics_of_a_folder_are_named_when_they_differ(tmp_path, caplog) -> None:
    theirs = hf_model("testing", (32, 32), official=False)
    theirs.save_pretrained(tmp_path / "hf")
    with caplog.at_level(logging.INFO, logger="utils.infra.loading"):
        loaded = load_model(tmp_path / "hf")
    assert "computed here with tanh GELU" in caplog.text
    assert "LayerNorm eps 1e-12" in caplog.text
    _same_state(from_hf(theirs.state_dict()), loaded.model.state_dict())


@pytest.mark.parametrize("how", ["torch.save", "safetensors", "save_for_hf"])
@pytest.mark.parametrize("img_size", [(32, 32), (32, 48)])
def test_a_model_timm_saved_gives_its_logits(tmp_path, img_size, how) -> None:
    theirs = _timm_model("vit_tiny_patch16_224", img_size)
    if how == "torch.save":
        path = tmp_path / "vit.pth"
        torch.save(theirs.state_dict(), path)
    elif how == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "vit.safetensors"
        save_file(theirs.state_dict(), path)
    else:
        from timm.models import save_for_hf

        path = tmp_path / "timm-folder"
        save_for_hf(theirs, str(path))
    # A folder's config.json tells the input size; a bare state dict tells a square one only.
    loaded = load_model(path, img_size=None if how == "save_for_hf" else img_size)
    assert (loaded.model_type, loaded.img_size) == ("ViT-Ti_16", img_size)
    x = _images(img_size)
    with torch.no_grad():
        torch.testing.assert_close(_logits(loaded.model, x), theirs(x), atol=1e-5, rtol=0)


def test_timm_parts_the_official_vit_lacks_are_one_message(tmp_path, capsys) -> None:
    theirs = _timm_model("vit_tiny_patch16_224", (32, 32), init_values=1e-5)  # LayerScale
    torch.save(theirs.state_dict(), tmp_path / "ls.pth")
    argv = ["--checkpoint", str(tmp_path / "ls.pth"), "--format", "npz"]
    err = expect_user_error(export.main, argv, capsys)
    assert "LayerScale" in err
    assert err.count("\n") == 1


def test_a_folder_of_another_model_or_with_code_is_refused(tmp_path, capsys) -> None:
    theirs = hf_model("testing", (32, 32))
    theirs.save_pretrained(tmp_path / "deit")
    config = (tmp_path / "deit" / "config.json").read_text()
    (tmp_path / "deit" / "config.json").write_text(config.replace('"vit"', '"deit"'))
    argv = ["--checkpoint", str(tmp_path / "deit"), "--format", "npz"]
    assert "'deit' model, not a ViT" in expect_user_error(export.main, argv, capsys)

    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    (unsafe / "config.json").write_text(config)
    # A Python object (not a tensor) in the weights: unpickling it would import code.
    torch.save({"x": PurePosixPath("payload")}, unsafe / "pytorch_model.bin")
    argv = ["--checkpoint", str(unsafe), "--format", "npz"]
    assert "could run" in expect_user_error(export.main, argv, capsys)


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        # Position embeddings of 62500 x 62500 patches: 250 GB allocated before this check.
        ("image_size", 1000000, "'image_size' says 1000000x1000000, but the position "
         "embeddings hold 5 tokens, made for 32x32 images"),
        ("layer_norm_eps", "abc", "'layer_norm_eps' is 'abc', but it must be a positive number"),
        ("hidden_size", 16.5, "'hidden_size' is 16.5, but it must be a whole number"),
        ("patch_size", [16], "'patch_size' is [16], but it must be a positive whole number or"),
        ("id2label", ["cat"], "'id2label' is ['cat'], but it must be an object of class names"),
    ],
)  # fmt: skip
def test_a_config_json_field_that_is_wrong_is_one_message(
    tmp_path, capsys, field, value, said
) -> None:
    hf_model("testing", (32, 32)).save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    argv = ["--checkpoint", str(tmp_path / "hf"), "--format", "npz"]
    err = expect_user_error(export.main, argv, capsys)
    assert f"{path}: the field {said}" in err
    assert "pass the folder save_pretrained wrote" in err


def test_a_query_of_another_shape_is_one_message(tmp_path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    hf_model("testing", (32, 32)).save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(weights)
    state["vit.encoder.layer.1.attention.attention.query.weight"] = torch.zeros(16, 8)
    save_file(state, weights)
    argv = ["--checkpoint", str(tmp_path / "hf"), "--format", "npz"]
    err = expect_user_error(export.main, argv, capsys)
    assert "layer 1 has query, key and value weights of shapes (16, 8), (16, 16), (16, 16)" in err


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_a_shard_outside_the_folder_is_refused(tmp_path, capsys, where) -> None:
    folder = tmp_path / "hf"
    hf_model("testing", (32, 32)).save_pretrained(folder, max_shard_size="20KB")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    # The named file exists and holds the right tensors: only its place is wrong.
    (tmp_path / shard).write_bytes((folder / shard).read_bytes())
    elsewhere = f"../{shard}" if where == "parent" else str(tmp_path / shard)
    index["weight_map"] = {
        key: elsewhere if name == shard else name for key, name in index["weight_map"].items()
    }
    index_path.write_text(json.dumps(index))
    argv = ["--checkpoint", str(folder), "--format", "npz"]
    err = expect_user_error(export.main, argv, capsys)
    assert f"the weight_map names the shard {elsewhere!r}, but a shard must be a plain" in err


def test_predict_takes_a_hugging_face_folder(tmp_path) -> None:
    theirs = hf_model("testing", (32, 32))
    theirs.config.id2label = dict(enumerate(["cat", "dog", "bird"]))
    theirs.save_pretrained(tmp_path / "hf")
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        image
    )
    (record,) = predict.main(["--checkpoint", str(tmp_path / "hf"), "--image", str(image)])
    pixels = (np.asarray(Image.open(image), dtype=np.float32) - 127.5) / 127.5
    with torch.no_grad():
        logits = theirs(pixel_values=torch.from_numpy(pixels).permute(2, 0, 1)[None]).logits
    assert record["labels"][0] == ["cat", "dog", "bird"][int(logits.argmax())]


# --------------------------------------------------------------------------------------------
# A fine-tune from a Hugging Face folder is one from the same weights as an .npz


def test_fine_tune_from_hf_folder_equals_fine_tune_from_npz(tmp_path: Path, capsys) -> None:
    theirs = hf_model("testing", (64, 64), num_labels=7)  # other classes and size: both change
    folder = tmp_path / "hf"
    theirs.save_pretrained(folder)
    npz = tmp_path / "weights.npz"
    export.main(["--checkpoint", str(folder), "--format", "npz", "--output", str(npz)])
    common = {"num_steps": 3, "eval_every": 1, "warmup_steps": 1}
    # The folder's model type is inferred; an .npz is never taken for `testing` unasked.
    for name, source, model_type in (("from_hf", folder, False), ("from_npz", npz, "testing")):
        argv = tiny_args(
            tmp_path, name=name, pretrained_dir=source, model_type=model_type, **common
        )
        train.main(argv)
    hf_meta, hf_state = load_checkpoint(tmp_path / "out", "from_hf")
    npz_meta, npz_state = load_checkpoint(tmp_path / "out", "from_npz")
    assert hf_meta["model_type"] == npz_meta["model_type"] == "testing"
    hf_losses = scalars(tmp_path / "logs" / "from_hf")["train/loss"]
    assert hf_losses == scalars(tmp_path / "logs" / "from_npz")["train/loss"]
    assert len(hf_losses) == 3
    assert hf_meta["step"] == npz_meta["step"]
    _same_state(hf_state, npz_state)
    # And it did start from those weights: the first block's MLP moved little from them.
    start = from_hf(theirs.state_dict())["encoder.blocks.0.mlp.fc1.weight"]
    assert (hf_state["encoder.blocks.0.mlp.fc1.weight"] - start).abs().max() < 0.1
    # Its export's model card lists the run's recipe, read from its `_last.pt`.
    export.main(
        ["--checkpoint", str(tmp_path / "out" / "from_hf_checkpoint.bin"), "--format", "hf"]
    )
    card = (tmp_path / "out" / "from_hf_checkpoint_hf" / "README.md").read_text()
    assert f"| `--pretrained_dir` | {folder} |" in card
    assert "| `--num_steps` | 3 |" in card
