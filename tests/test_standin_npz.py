"""tools/make_standin_npz.py: a stand-in official checkpoint the project's own loaders take as
the download it stands in for (key names and shapes checked against the hand-written official
layout of tests/helpers.py)."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from models.configs import get_config
from models.modeling import VisionTransformer
from models.npz import load_npz
from tests.helpers import expect_user_error, fake_checkpoint
from utils.infra.loading import load_model, pretrained_weights

ROOT = Path(__file__).resolve().parents[1]


def make_standin_npz():
    spec = importlib.util.spec_from_file_location("standin", ROOT / "tools/make_standin_npz.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_a_pre_training_standin_has_the_official_keys_and_loads_as_the_download(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoint").mkdir()
    make_standin_npz()(["ViT-Ti_16", "--img_size", "32"])
    path = tmp_path / "checkpoint" / "ViT-Ti_16.npz"  # where utils.download puts ViT-Ti_16
    arrays = load_npz(path, "ViT-Ti_16")
    official = fake_checkpoint(
        get_config("ViT-Ti_16"), num_classes=21843, img_size=32, representation_size=192
    )
    assert {k: v.shape for k, v in arrays.items()} == {k: v.shape for k, v in official.items()}
    assert all(a.dtype == np.float32 for a in arrays.values())

    # For inference its model comes from the file name, the head and position embeddings.
    loaded = load_model(path)
    assert (loaded.model_type, loaded.img_size) == ("ViT-Ti_16", (32, 32))
    assert loaded.model.head.out_features == 21843
    torch.manual_seed(0)  # the tool's default seed: the weights are that initialisation
    with_pre_logits = replace(get_config("ViT-Ti_16"), representation_size=192)
    expected = VisionTransformer(with_pre_logits, 32, 21843)
    for name, tensor in expected.state_dict().items():
        if not name.startswith("pre_logits"):  # inference drops it, as for a download
            torch.testing.assert_close(loaded.model.state_dict()[name], tensor, rtol=0, atol=0)
    # As the start of a fine-tune: pre_logits kept in the arrays (the fine-tune drops it).
    weights, model_type = pretrained_weights(path, None)
    assert model_type == "ViT-Ti_16"
    np.testing.assert_array_equal(
        weights["pre_logits/kernel"], expected.pre_logits.weight.detach().numpy().T
    )


def test_a_fine_tuned_standin_and_an_existing_file(tmp_path, capsys):
    out = tmp_path / "ViT-Ti_16-224.npz"
    main = make_standin_npz()
    main(["ViT-Ti_16", "--source", "imagenet21k+imagenet2012", "--output", str(out)])
    loaded = load_model(out)
    assert (loaded.model_type, loaded.img_size) == ("ViT-Ti_16", (224, 224))
    assert loaded.model.head.out_features == 1000
    assert loaded.class_names[0] == "tench"  # ImageNet-1k names for a 1000-class head
    assert not any(key.startswith("pre_logits") for key in np.load(out).files)
    before = out.read_bytes()
    err = expect_user_error(main, ["ViT-Ti_16", "--output", str(out)], capsys)
    assert "--overwrite" in err
    assert out.read_bytes() == before
    main(["ViT-Ti_16", "--output", str(out), "--overwrite", "--seed", "1"])
    assert out.read_bytes() != before


@pytest.mark.parametrize("model_type", ["R+ViT-Ti_16", "ViT-S_16-gap-norep"])
def test_hybrid_and_gap_standins_load_strictly(tmp_path, model_type):
    out = tmp_path / "standin.npz"
    make_standin_npz()([model_type, "--img_size", "64", "--num_classes", "5", "--output", str(out)])
    loaded = load_model(out, model_type)
    assert loaded.model.head.out_features == 5
    assert loaded.img_size == (64, 64)
