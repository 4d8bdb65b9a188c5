"""utils.loading: a model from any checkpoint file, every misfit explained."""

from __future__ import annotations

import json

import pytest
import torch

from models.configs import get_config
from models.modeling import VisionTransformer
from models.npz import CheckpointError, state_dict_to_npz
from tests.helpers import distinct_model
from utils.errors import USER_ERRORS
from utils.file_io import save_npz
from utils.loading import (
    assign_weights,
    class_names,
    guess_state_dict_model,
    load_model,
    read_state_dict,
)

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
