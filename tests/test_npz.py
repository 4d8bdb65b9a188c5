"""Checkpoint conversion: every official layout loads, tensors land where they should, the
round trip is bit-exact, and every bad input gives one clear error."""

import io
import logging
import zipfile

import numpy as np
import pytest
import scipy.ndimage
import torch

from models.configs import ResNetConfig, get_config
from models.modeling import VisionTransformer
from models.npz import (
    CheckpointError,
    checkpoint_num_classes,
    compare_keys,
    guess_model_type,
    load_npz,
    npz_to_state_dict,
    resize_pos_embed,
    state_dict_to_npz,
)
from tests.helpers import BIG_VISION, fake_checkpoint
from utils.infra.file_io import save_npz

SMALL = get_config("testing").replace(hidden_size=24, mlp_dim=48, num_heads=3, num_layers=2)
HYBRID = SMALL.replace(patch_size=(1, 1), resnet=ResNetConfig((1, 2)))


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array))


def test_every_tensor_lands_where_it_should() -> None:
    w = fake_checkpoint(SMALL, 7, 32)
    model = VisionTransformer(SMALL, 32, 7)
    model.load_from(w)
    d, blk = SMALL.hidden_size, "Transformer/encoderblock_1"
    attn = model.encoder.blocks[1].attn
    q, k, v = attn.qkv.weight.detach().split(d)
    for ours, name in [(q, "query"), (k, "key"), (v, "value")]:
        # (D_in, heads, head_dim) -> y = x @ kernel, i.e. weight = kernel.reshape(D, D).T
        kernel = w[f"{blk}/MultiHeadDotProductAttention_1/{name}/kernel"].reshape(d, d)
        assert torch.equal(ours, _t(kernel.T))
    assert torch.equal(
        attn.qkv.bias.detach()[d : 2 * d],
        _t(w[f"{blk}/MultiHeadDotProductAttention_1/key/bias"].reshape(-1)),
    )
    out = w[f"{blk}/MultiHeadDotProductAttention_1/out/kernel"].reshape(d, d)
    assert torch.equal(attn.proj.weight.detach(), _t(out.T))
    fc2 = model.encoder.blocks[1].mlp.fc2.weight.detach()
    assert torch.equal(fc2, _t(w[f"{blk}/MlpBlock_3/Dense_1/kernel"].T))
    assert torch.equal(
        model.encoder.blocks[1].norm2.weight.detach(), _t(w[f"{blk}/LayerNorm_2/scale"])
    )
    conv = model.embeddings.patch_embed.weight.detach()  # (out, in, kh, kw)
    assert torch.equal(conv[5, 2, 3, 7], _t(w["embedding/kernel"][3, 7, 2, 5]))
    assert torch.equal(model.embeddings.cls_token.detach(), _t(w["cls"]))
    assert torch.equal(model.head.bias.detach(), _t(w["head/bias"]))


def test_hybrid_tensors_land_where_they_should_and_group_norm_shapes_both_load() -> None:
    for gn_4d in (True, False):
        w = fake_checkpoint(HYBRID, 4, 64, gn_shape_4d=gn_4d)
        model = VisionTransformer(HYBRID, 64, 4)
        model.load_from(w)
        unit = model.embeddings.backbone.stages[1].units[0]
        assert torch.equal(
            unit.conv2.weight.detach(), _t(w["block2/unit1/conv2/kernel"]).permute(3, 2, 0, 1)
        )
        assert torch.equal(
            unit.gn_proj.bias.detach(), _t(w["block2/unit1/gn_proj/bias"].reshape(-1))
        )
        root = model.embeddings.backbone.gn_root.weight.detach()
        assert torch.equal(root, _t(w["gn_root/scale"].reshape(-1)))


@pytest.mark.parametrize("prefix", ["params/", "opt/target/"])
def test_prefixes_and_big_vision_naming_give_the_same_model(prefix) -> None:
    plain = fake_checkpoint(SMALL, 5, 32, seed=3)
    renamed = fake_checkpoint(SMALL, 5, 32, seed=3, block_names=BIG_VISION, prefix=prefix)
    renamed["opt/state/momentum" if prefix == "opt/target/" else "step"] = np.zeros(3)  # outside
    a = npz_to_state_dict(plain, SMALL)
    b = npz_to_state_dict(renamed, SMALL)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_scanned_big_vision_blocks_are_split() -> None:
    plain = fake_checkpoint(SMALL, 5, 32, block_names=BIG_VISION)
    scanned = {k: v for k, v in plain.items() if "encoderblock_" not in k}
    suffixes = {k.split("/", 2)[2] for k in plain if "encoderblock_" in k}
    for suffix in suffixes:
        layers = [plain[f"Transformer/encoderblock_{i}/{suffix}"] for i in range(2)]
        scanned[f"Transformer/encoderblock/{suffix}"] = np.stack(layers)
    scanned["pos_embedding"] = scanned.pop("Transformer/posembed_input/pos_embedding")
    a, b = (
        npz_to_state_dict(plain, SMALL),
        npz_to_state_dict({"params/" + k: v for k, v in scanned.items()}, SMALL),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pre_logits_loaded_when_the_model_has_one_and_dropped_otherwise() -> None:
    w = fake_checkpoint(SMALL, 5, 32, representation_size=12)
    with_rep = VisionTransformer(SMALL.replace(representation_size=12), 32, 5)
    with_rep.load_from(w)
    assert torch.equal(with_rep.pre_logits.weight.detach(), _t(w["pre_logits/kernel"].T))
    without = VisionTransformer(SMALL, 32, 5, zero_head=True)
    without.load_from(w)  # the fine-tuning case: pre_logits dropped, head fresh
    assert without.pre_logits is None
    with pytest.raises(CheckpointError, match="Missing 2 key"):
        VisionTransformer(SMALL.replace(representation_size=12), 32, 5).load_from(
            fake_checkpoint(SMALL, 5, 32)
        )


def test_zero_head_keeps_the_head_at_zero_and_a_class_mismatch_says_so() -> None:
    w = fake_checkpoint(SMALL, 21, 32)
    model = VisionTransformer(SMALL, 32, 10, zero_head=True)
    model.load_from(w)
    assert not model.head.weight.any()
    assert not model.head.bias.any()
    assert torch.equal(model.encoder.norm.weight.detach(), _t(w["Transformer/encoder_norm/scale"]))
    with pytest.raises(CheckpointError, match=r"21 classes .* has 10.*zero_head=True"):
        VisionTransformer(SMALL, 32, 10).load_from(w)


def test_resize_pos_embed_matches_scipy_zoom_square_and_non_square() -> None:
    rng = np.random.default_rng(0)
    posemb = rng.standard_normal((1, 1 + 16, 6)).astype(np.float32)
    grid = posemb[0, 1:].reshape(4, 4, 6)
    for new in [(6, 6), (3, 5), (4, 4)]:
        out = resize_pos_embed(posemb, new)
        expected = scipy.ndimage.zoom(grid, (new[0] / 4, new[1] / 4, 1), order=1)
        assert out.shape == (1, 1 + new[0] * new[1], 6)
        np.testing.assert_array_equal(out[0, :1], posemb[0, :1])  # class token kept
        np.testing.assert_allclose(out[0, 1:].reshape(*new, 6), expected, rtol=1e-6)
    np.testing.assert_array_equal(resize_pos_embed(posemb, (4, 4)), posemb)
    gap = resize_pos_embed(posemb[:, 1:], (2, 8), num_prefix_tokens=0)
    assert gap.shape == (1, 16, 6)
    with pytest.raises(CheckpointError, match="old_grid"):
        resize_pos_embed(posemb[:, :13], (4, 4))


def test_load_from_resizes_to_a_new_image_size() -> None:
    w = fake_checkpoint(SMALL, 5, 32)  # 2x2 grid
    model = VisionTransformer(SMALL, (64, 48), 5)  # 4x3 grid
    model.load_from(w)
    expected = resize_pos_embed(w["Transformer/posembed_input/pos_embedding"], (4, 3))
    assert torch.equal(model.embeddings.pos_embed.detach(), _t(expected))


@pytest.mark.parametrize(
    ("config", "kw"),
    [
        (SMALL, {}),
        (SMALL.replace(classifier="gap"), {}),
        (HYBRID, {}),
        (SMALL.replace(representation_size=8), {"representation_size": 8}),
    ],
)
def test_round_trip_is_bit_exact(tmp_path, config, kw) -> None:
    official = fake_checkpoint(config, 6, 64, **kw)
    model = VisionTransformer(config, 64, 6)
    model.load_from(official)
    exported = state_dict_to_npz(model.state_dict(), config)
    assert exported.keys() == official.keys()
    for key, array in official.items():  # npz -> state dict -> npz
        assert exported[key].shape == array.shape, key
        np.testing.assert_array_equal(exported[key], array, err_msg=key)
    path = tmp_path / "exported.npz"
    save_npz(path, exported)
    reloaded = VisionTransformer(config, 64, 6)
    reloaded.load_from(load_npz(path))  # state dict -> npz file -> state dict
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_export_accepts_ddp_and_compiled_prefixes() -> None:
    model = VisionTransformer(SMALL, 32, 3)
    wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    plain = state_dict_to_npz(model.state_dict(), SMALL)
    assert all(np.array_equal(plain[k], v) for k, v in state_dict_to_npz(wrapped, SMALL).items())


def test_describing_a_checkpoint() -> None:
    assert guess_model_type(fake_checkpoint(get_config("ViT-Ti_16"), 3)) == "ViT-Ti_16"
    assert guess_model_type(fake_checkpoint(get_config("R26+ViT-B_32"), 3, 64)) == "R26+ViT-B_32"
    assert guess_model_type(fake_checkpoint(SMALL, 3, 32)) is None
    assert checkpoint_num_classes(fake_checkpoint(SMALL, 21, 32)) == 21


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error each (a CheckpointError: exit code 2 in the CLIs, via run_cli).


def test_missing_file_names_the_download_url(tmp_path) -> None:
    path = tmp_path / "ViT-B_16.npz"
    with pytest.raises(
        CheckpointError, match=r"storage\.googleapis\.com/vit_models/imagenet21k/ViT-B_16\.npz"
    ):
        load_npz(path, "ViT-B_16")
    with pytest.raises(CheckpointError, match=r"imagenet21k/R50\+ViT-B_16.npz"):
        load_npz(path, "R50-ViT-B_16")


def test_truncated_file_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "full.npz"
    save_npz(path, fake_checkpoint(SMALL, 3, 32))
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 30):
        truncated = tmp_path / f"cut{cut}.npz"
        truncated.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated or not an npz"):
            load_npz(truncated)


def test_not_an_npz_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "page.npz"
    path.write_text("<html>404 Not Found</html>")
    with pytest.raises(CheckpointError, match=r"not a readable \.npz.*HTML page"):
        load_npz(path)
    empty = tmp_path / "empty.npz"
    with zipfile.ZipFile(empty, "w"):
        pass
    with pytest.raises(CheckpointError, match="holds no arrays"):
        load_npz(empty)


def _npz_declaring(path, shape, data: bytes, compression: int = zipfile.ZIP_STORED) -> None:
    """An `.npz` with one float32 array whose header declares `shape` but holds `data`."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": shape}
    )
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("Transformer/encoder_norm/scale.npy", header.getvalue() + data)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_an_array_declaring_more_than_the_file_holds_is_refused_unread(
    tmp_path, compression
) -> None:
    # A few hundred bytes that ask numpy for 3.6 TiB.
    path = tmp_path / "huge.npz"
    _npz_declaring(path, (10**6, 10**6), bytes(16), compression)
    assert path.stat().st_size < 400
    with pytest.raises(CheckpointError) as info:
        load_npz(path)
    assert str(info.value) == (
        f"{path} is not a readable .npz checkpoint: its array 'Transformer/encoder_norm/scale' "
        "declares shape (1000000, 1000000) of float32 (3,725.3 GiB), but the file holds 16 bytes "
        "for it. It is damaged or not a checkpoint: delete it and download it again."
    )
    # One element short is refused too; the exact size loads, stored or compressed.
    _npz_declaring(path, (5,), bytes(16), compression)
    with pytest.raises(CheckpointError, match=r"declares shape \(5,\) of float32 \(20 bytes\)"):
        load_npz(path)
    _npz_declaring(path, (4,), np.arange(4, dtype="<f4").tobytes(), compression)
    np.testing.assert_array_equal(load_npz(path)["Transformer/encoder_norm/scale"], np.arange(4))


def test_a_member_that_is_not_an_array_is_refused(tmp_path) -> None:
    path = tmp_path / "mixed.npz"
    save_npz(path, {"cls": np.zeros((1, 1, 4), np.float32)})
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("notes.txt", b"not an array")
    with pytest.raises(CheckpointError, match=r"its member 'notes\.txt' is not a NumPy array"):
        load_npz(path)


def test_pickled_arrays_are_refused(tmp_path) -> None:
    path = tmp_path / "pickled.npz"
    np.savez(path, **{"embedding/kernel": np.array([{"evil": 1}], dtype=object)})
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_npz(path)


def test_checkpoint_of_another_model_is_summarised_and_every_key_is_debug_logged(caplog) -> None:
    deeper = fake_checkpoint(SMALL.replace(num_layers=3), 5, 32)
    with pytest.raises(CheckpointError) as err:
        npz_to_state_dict(deeper, SMALL)
    message = str(err.value)
    assert "Unused 16 key(s)" in message
    assert "Transformer/encoderblock_2/MlpBlock_3/Dense_0/kernel" in message
    assert "(and 8 more; --verbose lists them)" in message
    hybrid = fake_checkpoint(HYBRID, 5, 64)
    unused = sorted(k for k in hybrid if k.startswith(("block", "conv_root", "gn_root")))
    with caplog.at_level(logging.DEBUG, logger="models.npz"), pytest.raises(CheckpointError) as err:
        npz_to_state_dict(hybrid, SMALL)
    message = str(err.value)
    shown = ", ".join(unused[:8])
    assert (
        f"Unused {len(unused)} key(s): {shown} (and {len(unused) - 8} more; --verbose lists them)."
        in message
    )
    assert unused[-1] not in message  # one short paragraph, not every key ...
    assert len(message) < 600
    assert str(unused) in caplog.text  # ... which the debug log has, all of them
    with pytest.raises(CheckpointError, match=r"Missing .*block2/unit2/conv1/kernel"):
        npz_to_state_dict(
            fake_checkpoint(HYBRID.replace(resnet=ResNetConfig((1, 1))), 5, 64), HYBRID
        )


def test_shape_mismatch_names_the_key_and_both_shapes() -> None:
    wider = fake_checkpoint(SMALL.replace(mlp_dim=60), 5, 32)
    with pytest.raises(CheckpointError) as err:
        VisionTransformer(SMALL, 32, 5).load_from(wider)
    message = str(err.value)
    assert (
        "encoder.blocks.0.mlp.fc1.weight "
        "(from Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel)" in message
    )
    assert "checkpoint (60, 24) vs model (48, 24)" in message


def test_a_real_model_name_is_suggested() -> None:
    b16 = fake_checkpoint(get_config("ViT-B_16"), 3, 32)  # same depth as S_16, wider
    with pytest.raises(
        CheckpointError, match="looks like a ViT-B_16 checkpoint: pass --model_type ViT-B_16"
    ):
        VisionTransformer(get_config("ViT-S_16"), 32, 3).load_from(b16)


@pytest.mark.parametrize(("config", "zero_head"), [(SMALL, False), (HYBRID, True)])
def test_from_pretrained_equals_construct_then_load(config, zero_head) -> None:
    weights = fake_checkpoint(config, 6, 64)
    torch.manual_seed(0)
    expected = VisionTransformer(config, (64, 48), 6, zero_head=zero_head)
    expected.load_from(weights)
    model = VisionTransformer.from_pretrained(config, weights, (64, 48), 6, zero_head=zero_head)
    assert model.state_dict().keys() == expected.state_dict().keys()
    for name, tensor in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name  # no uninitialised leftovers
    assert all(p.device.type == "cpu" for p in model.parameters())
    with pytest.raises(CheckpointError, match="zero_head=True"):
        VisionTransformer.from_pretrained(SMALL, fake_checkpoint(SMALL, 21, 32), 32, 10)


def test_compare_keys_names_each_kind_of_misfit() -> None:
    """The one key comparison: missing keys in the model's order, unused ones sorted, shape
    mismatches labelled with both shapes; `None` compares a key alone, `skip` leaves keys out."""
    have = {"z": np.zeros(2), "b": np.zeros((3, 4)), "head": np.zeros(5), "x": np.zeros(1)}
    want = {"c": None, "b": torch.zeros(4, 3), "a": torch.zeros(1), "head": torch.zeros(6)}
    missing, unused, mismatched = compare_keys(have, want)
    assert (missing, unused) == (["c", "a"], ["x", "z"])
    assert mismatched == [
        "b: checkpoint (3, 4) vs model (4, 3)",
        "head: checkpoint (5,) vs model (6,)",
    ]
    missing, unused, mismatched = compare_keys(
        have, want, skip=lambda k: k in ("head", "z"), label=lambda k: f"<{k}>"
    )
    assert (missing, unused, mismatched) == (
        ["c", "a"],
        ["x"],
        ["<b>: checkpoint (3, 4) vs model (4, 3)"],
    )
    assert compare_keys({"b": np.zeros(3)}, {"b": None}) == ([], [], [])  # key only


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("Transformer/encoderblock_0/LayerNorm_0/scale", (1, 16)),  # flattened silently before
        ("Transformer/encoder_norm/bias", (4, 4)),
        ("embedding/bias", (1, 1, 16)),
    ],
)
def test_a_vector_of_another_rank_is_named(key, shape) -> None:
    weights = fake_checkpoint(get_config("testing"), num_classes=10, img_size=32)
    weights[key] = weights[key].reshape(shape)  # the same numbers, another rank
    with pytest.raises(CheckpointError) as info:
        VisionTransformer.from_pretrained("testing", weights, 32, num_classes=10)
    assert f"The checkpoint's {key!r} is a float32 array of shape {shape}" in str(info.value)
    assert "an official checkpoint has 1 dimension(s) there" in str(info.value)
