"""utils.infra.loading: a model from any checkpoint file, every misfit explained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.configs import get_config
from models.modeling import VisionTransformer
from models.npz import CheckpointError, state_dict_to_npz
from tests.helpers import damage, distinct_model, zoomed_pos_embed
from utils.infra.errors import USER_ERRORS
from utils.infra.file_io import save_checkpoint, save_npz, save_safetensors
from utils.infra.loading import (
    assign_weights,
    class_names,
    guess_state_dict_model,
    load_model,
    pretrained_weights,
    read_state_dict,
    which_model,
)
from utils.infra.train_state import TrainState, save_training_state

TESTING = get_config("testing")


def test_bin_with_wrapper_prefixes_loads(tmp_path) -> None:
    source, target = distinct_model(seed=0), distinct_model(seed=1)
    path = tmp_path / "run_checkpoint.bin"
    torch.save({f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}, path)
    assign_weights(target, read_state_dict(path), str(path))
    loaded = load_model(path, "testing", 32).model
    x = torch.randn(2, 3, 32, 32)
    source.eval(), target.eval()
    with torch.no_grad():
        assert torch.equal(source(x)[0], target(x)[0])
        assert torch.equal(source(x)[0], loaded(x)[0])


def test_npz_with_head_loads(tmp_path) -> None:
    source = distinct_model(seed=0)
    path = tmp_path / "official.npz"
    save_npz(path, state_dict_to_npz(source.state_dict(), TESTING))
    target = load_model(path, "testing").model
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)


def test_checkpoint_of_another_model_names_keys_and_shapes(tmp_path) -> None:
    other = TESTING.replace(hidden_size=32, mlp_dim=64)
    path = tmp_path / "other.bin"
    torch.save(distinct_model(other).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        assign_weights(distinct_model(), read_state_dict(path), str(path))
    message = str(info.value)
    assert "does not fit model testing" in message
    assert "embeddings.cls_token: checkpoint (1, 1, 32) vs model (1, 1, 16)" in message
    assert "Check --model_type" in message


def test_other_class_count_and_image_size_are_explained(tmp_path) -> None:
    path = tmp_path / "ten.bin"
    torch.save(distinct_model(num_classes=10).state_dict(), path)
    with pytest.raises(
        CheckpointError, match=r"head\.weight: checkpoint .* Its head has 10 classes"
    ):
        assign_weights(distinct_model(num_classes=5), read_state_dict(path), str(path))
    torch.save(distinct_model(img_size=48).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"pos_embed.*--img_size"):
        assign_weights(distinct_model(img_size=32), read_state_dict(path), str(path))


def test_load_model_weights_rejects_non_state_dicts(tmp_path) -> None:
    path = tmp_path / "list.bin"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        read_state_dict(path)


def test_class_names():
    assert class_names(10, "cifar10")[3] == "cat"
    assert class_names(100, "cifar100")[:2] == ["apple", "aquarium_fish"]
    assert class_names(10, "digits") == [str(d) for d in range(10)]
    assert class_names(1000)[0] == "tench"
    assert class_names(7) is None
    assert class_names(2, names=["cat", "dog"]) == ["cat", "dog"]


def test_load_model_from_bin_with_sidecar_and_from_npz(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer("testing", (32, 48), num_classes=10)
    torch.nn.init.normal_(model.head.weight)
    bin_path = tmp_path / "demo_checkpoint.bin"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, bin_path)
    sidecar = {"model_type": "testing", "img_size": [32, 48], "dataset": "digits"}
    (tmp_path / "demo_checkpoint.json").write_text(json.dumps(sidecar))
    loaded = load_model(bin_path)
    assert loaded.model_type == "testing"
    assert loaded.img_size == (32, 48)
    assert loaded.class_names == [str(d) for d in range(10)]
    x = torch.randn(1, 3, 32, 48)
    model.eval()
    torch.testing.assert_close(loaded.model(x)[0], model(x)[0])

    npz_path = tmp_path / "testing.npz"
    save_npz(npz_path, state_dict_to_npz(model.state_dict(), model.config))
    with pytest.raises(USER_ERRORS, match="model_type"):
        load_model(npz_path)  # `testing` is never guessed
    loaded = load_model(npz_path, model_type="testing", img_size=(32, 48))
    assert loaded.class_names is None
    torch.testing.assert_close(loaded.model(x)[0], model(x)[0])


def test_load_model_errors(tmp_path):
    with pytest.raises(USER_ERRORS, match="does not exist"):
        load_model(tmp_path / "nothing.bin")
    model = VisionTransformer("testing", 32, num_classes=10)
    path = tmp_path / "x_checkpoint.bin"
    torch.save(model.state_dict(), path)
    assert load_model(path).model_type == "testing"  # no sidecar, no flag: from the shapes
    odd = VisionTransformer(get_config("testing").replace(hidden_size=24), 32, num_classes=10)
    torch.save(odd.state_dict(), path)
    with pytest.raises(USER_ERRORS, match="pass --model_type"):
        load_model(path)  # an architecture the registry does not have
    with pytest.raises(USER_ERRORS):
        load_model(path, model_type="ViT-Ti_16", img_size=32)  # another architecture


def test_npz_with_1000_classes_gets_imagenet_names_and_its_native_size(tmp_path):
    model = VisionTransformer("testing", 48, num_classes=1000)
    path = tmp_path / "in1k.npz"
    save_npz(path, state_dict_to_npz(model.state_dict(), model.config))
    loaded = load_model(path, model_type="testing")
    assert loaded.img_size == (48, 48)  # 3x3 grid of 16-pixel patches in the position embedding
    assert loaded.class_names[:2] == ["tench", "goldfish"]
    assert loaded.dataset == "imagenet2012"
    assert load_model(path, model_type="testing", img_size=64).img_size == (64, 64)


@pytest.mark.parametrize(
    "name", ["ViT-S_16", "ViT-S_16-gap-norep", "R+ViT-Ti_16", "R26+ViT-S_32", "R50+ViT-B_16"]
)
def test_state_dicts_of_ours_are_recognised_by_their_shapes(name: str) -> None:
    with torch.device("meta"):  # shapes are all a guess needs
        model = VisionTransformer(name, 64, num_classes=3)
    assert guess_state_dict_model(model.state_dict()) == name


def test_a_damaged_best_checkpoint_is_refused_before_it_is_evaluated(tmp_path) -> None:
    model = distinct_model()
    path = tmp_path / "run_checkpoint.bin"
    digest = save_checkpoint(
        model.state_dict(), path, model_type="testing", img_size=[32, 32], num_classes=5
    )
    assert load_model(path).model_type == "testing"
    damage(path)  # 2,000 bytes of a weight: it would load and evaluate, wrongly
    with pytest.raises(CheckpointError, match=f"is damaged: .* recorded {digest}"):
        load_model(path)


def _fine_tuned(tmp_path, kind: str, model: VisionTransformer):
    """`model` saved the ways this project saves models: best `.bin`, `_last.pt`, `.safetensors`."""
    if kind == "bin":
        path = tmp_path / "run_checkpoint.bin"
        save_checkpoint(model.state_dict(), path, model_type=model.config.name)
    elif kind == "last":
        path = tmp_path / "run_last.pt"
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        save_training_state(
            path, model=model, optimizer=optimizer, scaler=None,
            state=TrainState(step=3), args={},
        )  # fmt: skip
    else:
        path = tmp_path / "run.safetensors"
        save_safetensors(path, model.state_dict(), {"model_type": model.config.name})
    return path


@pytest.mark.parametrize("kind", ["bin", "last", "safetensors"])
def test_a_model_of_ours_starts_another_fine_tune_as_an_official_file_would(tmp_path, kind):
    tuned = distinct_model(img_size=32, num_classes=5)  # 10 classes, 32 px fine-tune ...
    path = _fine_tuned(tmp_path, kind, tuned)
    weights, model_type = pretrained_weights(path, "testing")
    assert model_type == "testing"
    # ... starts a 3-class fine-tune at 48 px: head at zero, position embeddings resized, as
    # the same model's official .npz would.
    official = tmp_path / "official.npz"
    save_npz(official, state_dict_to_npz(tuned.state_dict(), TESTING))
    expected = VisionTransformer.from_pretrained(
        TESTING, pretrained_weights(official, "testing")[0], 48, 3, zero_head=True
    )
    model = VisionTransformer.from_pretrained(TESTING, weights, 48, 3, zero_head=True)
    for name, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert not model.head.weight.any()
    assert model.state_dict()["embeddings.pos_embed"].shape[1] == 1 + 3 * 3
    block = "encoder.blocks.0.mlp.fc1.weight"
    assert torch.equal(model.state_dict()[block], tuned.state_dict()[block])
    again, model_type = pretrained_weights(path, None)  # the type from the sidecar or shapes
    assert (again.keys(), model_type) == (weights.keys(), "testing")


def test_pretrained_weights_of_another_model_or_a_folder_say_what_to_pass(tmp_path) -> None:
    other = distinct_model(TESTING.replace(name="testing-wide", hidden_size=32, mlp_dim=64))
    path = tmp_path / "wide_checkpoint.bin"
    save_checkpoint(other.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"does not fit model testing.*cls_token"):
        pretrained_weights(path, "testing")
    save_checkpoint(distinct_model(get_config("ViT-Ti_16")).state_dict(), path)
    with pytest.raises(CheckpointError, match="pass --model_type ViT-Ti_16"):
        pretrained_weights(path, "testing")
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    save_npz(folder / "ViT-B_16.npz", {"a": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError) as info:
        pretrained_weights(folder, "ViT-B_16")
    message = str(info.value)
    assert f"{folder} is a folder, not a checkpoint file" in message
    assert str(folder / "ViT-B_16.npz") in message
    assert "wget" not in message
    assert "Download" not in message


@pytest.mark.parametrize(
    ("key", "bad", "named"),
    [
        ("embedding/kernel", np.array(["not", "a", "weight"]), "'embedding/kernel'"),
        ("embedding/kernel", np.zeros((16, 16), np.float32), "'embedding/kernel'"),
        ("Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel", np.zeros(3, np.float32),
         "'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'"),
        ("head/bias", np.float32(1.0), "'head/bias'"),
        ("Transformer/posembed_input/pos_embedding", np.zeros(5, np.float32),
         "'Transformer/posembed_input/pos_embedding'"),
    ],
)  # fmt: skip
def test_an_npz_with_text_or_wrong_rank_arrays_names_the_key(tmp_path, capsys, key, bad, named):
    arrays = state_dict_to_npz(distinct_model().state_dict(), TESTING)
    arrays[key] = bad
    path = tmp_path / "odd.npz"
    save_npz(path, arrays)
    with pytest.raises(CheckpointError, match=named):
        load_model(path, "testing", 32)


def test_which_model_asks_the_flag_then_the_description_then_the_name_then_the_shapes(
    caplog,
) -> None:
    calls = []

    def shapes() -> str:
        calls.append(1)
        return "ViT-S_16"

    name = "imagenet21k_ViT-B_16.npz"
    with caplog.at_level("INFO"):
        assert which_model(name, "ViT-L_16", "ViT-Ti_16", shapes) == "ViT-L_16"
        assert not caplog.text
        assert which_model(name, None, "ViT-Ti_16", shapes) == "ViT-Ti_16"
        assert which_model(name, None, None, shapes) == "ViT-B_16"
        assert not calls  # the shapes are looked at only when nothing else tells
        assert which_model("mine.npz", None, None, shapes) == "ViT-S_16"
        assert which_model("testing.npz", None, None, shapes) == "ViT-S_16"  # not an official name
    assert calls == [1, 1]
    assert "imagenet21k_ViT-B_16.npz holds a ViT-Ti_16 model (inferred from its description)" in (
        caplog.text
    )
    assert "holds a ViT-B_16 model (inferred from its file name)" in caplog.text
    assert "mine.npz holds a ViT-S_16 model (inferred from its shapes)" in caplog.text
    with pytest.raises(USER_ERRORS, match=r"Cannot tell which model mine\.npz holds: pass --model"):
        which_model("mine.npz", None, None, lambda: None)


def test_model_type_comes_from_an_official_or_augreg_file_name(tmp_path, caplog) -> None:
    # ViT-Ti_16 and R+ViT-Ti_16 share the transformer; only the name or the ResNet tells them apart.
    model = VisionTransformer("ViT-Ti_16", 32, num_classes=4)
    name = "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--cifar10-steps_2k.npz"
    path = tmp_path / name
    save_npz(path, state_dict_to_npz(model.state_dict(), model.config))
    with caplog.at_level("INFO"):
        loaded = load_model(path)
    assert loaded.model_type == "ViT-Ti_16"
    assert "inferred from its file name" in caplog.text


# --------------------------------------------------------------------------------------------
# Descriptions (a sidecar, a .safetensors file's metadata): every field checked

GOOD_SHA = "0" * 64

# (field, a value of the wrong type, a value of the right type that is wrong) for each field.
BAD_FIELDS = [
    ("model_type", 16, "ViT-Z_99"),
    ("img_size", "32", 0),
    ("img_size", [32, "48"], [32, 48, 64]),
    ("num_classes", "5", 0),
    ("dataset", 10, " "),
    ("class_names", "abcde", [1, 2, 3, 4, 5]),
    ("precision", 16, "fp8"),
    ("tf32", "on", 1),  # a JSON true or false (or null), not text or a number
    ("step", "ten", -1),
    ("step", 2.5, True),
    ("final_step", "ten", -3),
    ("accuracy", "high", 1.5),
    ("minival_accuracy", [0.5], -0.1),
    ("final_test_accuracy", {"x": 1}, float("nan")),
    ("selected_by", 1, ""),
    ("sha256", 123, "ab" * 31),
    ("previous_sha256", 123, "G" * 64),
]


def _bad_cases() -> list:
    return [
        pytest.param(field, value, id=f"{field}-{kind}")
        for field, *values in BAD_FIELDS
        for kind, value in zip(("type", "value"), values, strict=True)
    ]


def _described_bin(tmp_path, field, value):
    """A good `.bin` whose sidecar has `field` set to `value` (its hash kept right unless the
    field is the hash)."""
    model = distinct_model(num_classes=5)
    path = tmp_path / "run_checkpoint.bin"
    save_checkpoint(
        model.state_dict(),
        path,
        model_type="testing",
        img_size=[32, 32],
        num_classes=5,
        dataset="digits",
        class_names=list("abcde"),
        precision="fp32",
        step=3,
        accuracy=0.5,
    )
    sidecar = path.with_suffix(".json")
    info = json.loads(sidecar.read_text())
    info[field] = value
    sidecar.write_text(json.dumps(info))
    return path, sidecar


@pytest.mark.parametrize(("field", "value"), _bad_cases())
def test_each_sidecar_field_of_a_wrong_type_or_value_is_one_message(tmp_path, field, value):
    path, sidecar = _described_bin(tmp_path, field, value)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert message.startswith(f"{sidecar}: the field {field!r} is ")
    assert "but it must be" in message


@pytest.mark.parametrize(("field", "value"), _bad_cases())
def test_each_safetensors_field_of_a_wrong_type_or_value_is_one_message(tmp_path, field, value):
    path = tmp_path / "model.safetensors"
    info = {"model_type": "testing", "img_size": [32, 32], "num_classes": 5, field: value}
    save_safetensors(path, distinct_model(num_classes=5).state_dict(), info)
    with pytest.raises(CheckpointError) as raised:
        load_model(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: the field {field!r} is ")
    assert "export it again" in message


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_classes", 4), ("class_names", list("abcd"))],  # the head has 5 classes
)
def test_a_description_that_disagrees_with_the_head_is_refused(tmp_path, field, value):
    path, sidecar = _described_bin(tmp_path, field, value)
    info = json.loads(sidecar.read_text())  # the sidecar agrees with itself, not the head
    if field == "num_classes":
        info["class_names"] = list("abcd")
    else:
        del info["num_classes"]
    del info["description_sha256"]  # as a sidecar written before descriptions were hashed
    sidecar.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="the classes of the checkpoint's head") as raised:
        load_model(path)
    assert str(raised.value).startswith(f"{sidecar}: the field {field!r}")


def test_a_sidecar_that_is_not_an_object_is_one_message(tmp_path):
    path, sidecar = _described_bin(tmp_path, "step", 3)
    sidecar.write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError, match="must be a JSON object"):
        load_model(path)


def test_a_good_description_of_every_field_loads(tmp_path):
    path, _ = _described_bin(tmp_path, "minival_accuracy", None)  # null: not measured
    loaded = load_model(path)
    assert loaded.class_names == list("abcde")
    assert loaded.info == {"step": 3, "accuracy": 0.5}


@pytest.mark.parametrize("tf32", [True, False, None])
def test_whether_training_ran_in_tf32_comes_back_from_the_sidecar(tmp_path, tf32):
    path, _ = _described_bin(tmp_path, "tf32", tf32)
    assert load_model(path).tf32 is tf32


# --------------------------------------------------------------------------------------------
# Messages that say what is wrong


def test_a_wrong_rank_head_is_called_a_wrong_shape_not_a_class_count(tmp_path):
    arrays = state_dict_to_npz(distinct_model(num_classes=5).state_dict(), TESTING)
    arrays["head/kernel"] = arrays["head/kernel"][..., None]  # (hidden, classes, 1)
    path = tmp_path / "odd.npz"
    save_npz(path, arrays)
    with pytest.raises(CheckpointError) as info:
        load_model(path, "testing", 32)
    message = str(info.value)
    assert "'head/kernel' (16, 5, 1)" in message
    assert "not a ViT checkpoint of this layout" in message
    assert "zero_head" not in message  # no Python argument for a command-line user
    assert "classes but the model" not in message


def test_a_wrong_rank_tensor_in_a_bin_is_called_so(tmp_path):
    state = distinct_model(num_classes=5).state_dict()
    state["head.weight"] = state["head.weight"][..., None]  # (classes, hidden, 1)
    path = tmp_path / "odd.bin"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path, "testing", 32)
    message = str(info.value)
    assert "head.weight has 3 dimension(s) where this model's has 2" in message
    assert "use a dataset with" not in message


def test_a_bin_without_its_sidecar_loads_with_a_warning(tmp_path, caplog):
    path = tmp_path / "run_checkpoint.bin"
    torch.save(distinct_model(num_classes=5).state_dict(), path)
    with caplog.at_level("WARNING", logger="utils.infra.loading"):
        load_model(path)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1
    assert "has no sidecar (run_checkpoint.json)" in warned[0]
    assert "SHA-256, model type and class names could not be checked" in warned[0]
    caplog.clear()
    _described_bin(tmp_path, "step", 3)  # with one: no warning
    with caplog.at_level("WARNING", logger="utils.infra.loading"):
        load_model(path)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


# --------------------------------------------------------------------------------------------
# What the hashes cover, and what is said when there are none


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_class_names_edited_in_a_sidecar_are_refused_until_its_hash_is_deleted(
    tmp_path, caplog
) -> None:
    path, sidecar = _described_bin(tmp_path, "step", 3)
    info = json.loads(sidecar.read_text())
    info["class_names"] = list("edcba")  # the same weights, relabelled
    sidecar.write_text(json.dumps(info))
    with pytest.raises(CheckpointError) as raised:
        load_model(path)
    assert str(raised.value).startswith(f"{sidecar} was edited or damaged after it was written")
    assert "delete its description_sha256 line" in str(raised.value)
    del info["description_sha256"]  # relabelled on purpose
    sidecar.write_text(json.dumps(info))
    with caplog.at_level("WARNING", logger="utils.infra.loading"):
        assert load_model(path).class_names == list("edcba")
    (warned,) = _warnings(caplog)
    assert "records no description_sha256" in warned
    assert "an edit to its class names, model type or image size would go unnoticed" in warned


@pytest.mark.parametrize("sidecar", [{}, {"model_type": "testing", "num_classes": 5}])
def test_a_sidecar_without_a_sha256_says_the_weights_are_not_verified(
    tmp_path, caplog, sidecar
) -> None:
    path = tmp_path / "run_checkpoint.bin"
    state = distinct_model(num_classes=5).state_dict()
    torch.save(state, path)
    damage(path, nbytes=64)  # inside the tensors: it still loads
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    with caplog.at_level("WARNING", logger="utils.infra.loading"):
        load_model(path, "testing")
    (warned,) = _warnings(caplog)
    assert f"{path} is not verified: its sidecar run_checkpoint.json records no SHA-256" in warned


def test_an_exported_safetensors_verifies_its_tensors_and_its_class_names(tmp_path, caplog) -> None:
    import safetensors.torch

    path = tmp_path / "model.safetensors"
    state = distinct_model(num_classes=5).state_dict()
    info = {"model_type": "testing", "img_size": [32, 32], "num_classes": 5}
    save_safetensors(path, state, {**info, "class_names": list("abcde")})
    with caplog.at_level("WARNING", logger="utils.infra.loading"):
        assert load_model(path).class_names == list("abcde")
    assert not _warnings(caplog)
    with safetensors.safe_open(path, "pt") as handle:
        metadata = handle.metadata()

    relabelled = {**metadata, "class_names": json.dumps(list("edcba"))}
    safetensors.torch.save_file(state, path, metadata=relabelled)
    with pytest.raises(CheckpointError, match="was edited or damaged after it was written"):
        load_model(path)

    changed = {**state, "head.bias": state["head.bias"] + 1}
    safetensors.torch.save_file(changed, path, metadata=metadata)
    with pytest.raises(CheckpointError, match="is damaged: its tensors no longer match"):
        load_model(path)

    safetensors.torch.save_file(state, path, metadata={k: json.dumps(v) for k, v in info.items()})
    with caplog.at_level("WARNING", logger="utils.infra.loading"):
        load_model(path)  # another writer's file: no hashes
    (warned,) = _warnings(caplog)
    assert "model.safetensors's metadata records no SHA-256 of its weights" in warned


def test_a_bin_at_another_size_gets_position_embeddings_resized_as_vit_jax(tmp_path, caplog):
    tuned = distinct_model(img_size=(32, 48))  # a 2x3 grid: the sidecar tells its shape
    path = tmp_path / "run_checkpoint.bin"
    save_checkpoint(tuned.state_dict(), path, model_type="testing", img_size=[32, 48])
    with caplog.at_level("INFO", logger="utils.infra.loading"):
        loaded = load_model(path, img_size=(64, 48))  # a 4x3 grid
    assert loaded.img_size == (64, 48)
    assert "trained at 32x48 and runs at 64x48" in caplog.text
    assert "resized from a 2x3 to a 4x3 patch grid" in caplog.text
    state = loaded.model.state_dict()
    expected = zoomed_pos_embed(tuned.state_dict()["embeddings.pos_embed"], (2, 3), (4, 3))
    torch.testing.assert_close(state["embeddings.pos_embed"], expected, rtol=0, atol=1e-6)
    for key, value in tuned.state_dict().items():
        if key != "embeddings.pos_embed":
            assert torch.equal(state[key], value), key
    caplog.clear()
    with caplog.at_level("INFO", logger="utils.infra.loading"):
        load_model(path, img_size=(32, 48))  # its own size: nothing to resize, nothing said
    assert "resized" not in caplog.text


def test_an_npz_at_another_size_is_resized_the_same_way_and_said(tmp_path, caplog):
    model = distinct_model(img_size=48)  # 3x3
    path = tmp_path / "official.npz"
    save_npz(path, state_dict_to_npz(model.state_dict(), TESTING))
    with caplog.at_level("INFO", logger="utils.infra.loading"):
        loaded = load_model(path, model_type="testing", img_size=80)  # 5x5
    assert "resized from a 3x3 to a 5x5 patch grid" in caplog.text
    expected = zoomed_pos_embed(model.state_dict()["embeddings.pos_embed"], (3, 3), (5, 5))
    torch.testing.assert_close(
        loaded.model.state_dict()["embeddings.pos_embed"], expected, rtol=0, atol=1e-6
    )
