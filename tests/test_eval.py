"""eval.py: same accuracy as train.py logged, official .npz files, clear errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import eval as eval_script
import train
from models.configs import get_config
from models.modeling import VisionTransformer
from models.npz import state_dict_to_npz
from tests.helpers import expect_user_error, script_error, zoomed_pos_embed
from utils.data.loaders import DigitsDataset, build_transforms
from utils.infra.file_io import save_npz

ROOT = Path(__file__).resolve().parents[1]
TESTING = get_config("testing")


def _random_model(num_classes: int = 10, img_size: int = 32) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(TESTING, img_size, num_classes)
    with torch.no_grad():
        model.head.weight.normal_()  # a real prediction, not an all-zero head
        model.head.bias.normal_()
    return model.eval()


def _npz(tmp_path: Path, num_classes: int = 10) -> Path:
    path = tmp_path / f"official_{num_classes}.npz"
    model = _random_model(num_classes)
    save_npz(path, state_dict_to_npz(model.state_dict(), TESTING))
    return path


@pytest.mark.slow
def test_accuracy_equals_what_train_logged(tmp_path, capsys) -> None:
    summary = train.main(
        [
            "--name=tiny",
            "--dataset=digits",
            "--model_type=testing",
            "--img_size=32",
            "--pretrained_dir=none",
            "--num_steps=8",
            "--warmup_steps=2",
            "--eval_every=4",
            "--train_batch_size=32",
            "--eval_batch_size=50",
            "--learning_rate=0.1",
            "--num_workers=0",
            f"--output_dir={tmp_path}",
            f"--log_dir={tmp_path / 'logs'}",
        ]
    )
    checkpoint = tmp_path / "tiny_checkpoint.bin"
    logged = json.loads((tmp_path / "tiny_checkpoint.json").read_text())["accuracy"]
    assert logged == summary.selected_test_accuracy
    capsys.readouterr()
    # Everything from the sidecar, and a different batch size: the same accuracy.
    result = eval_script.main([f"--checkpoint={checkpoint}", "--num_workers=0"])
    assert result["accuracy"] == logged
    assert result["count"] == 360
    out = capsys.readouterr().out
    assert f"Top-1 accuracy: {logged:.4f}" in out
    assert "Loss: " in out
    assert "images/s" in out
    explicit = eval_script.main(
        [
            f"--checkpoint={checkpoint}",
            "--model_type=testing",
            "--dataset=digits",
            "--img_size=32",
            "--eval_batch_size=7",
            "--num_workers=0",
        ]
    )
    assert explicit["accuracy"] == logged
    assert explicit["loss"] == pytest.approx(result["loss"], rel=1e-6)


def _expected(model: VisionTransformer) -> tuple[float, float]:
    """Accuracy and loss on the digits test split, computed here without eval.py."""
    test_set = DigitsDataset(train=False, transform=build_transforms(model.img_size, train=False))
    images = torch.stack([test_set[i][0] for i in range(len(test_set))])
    labels = torch.tensor(test_set.targets)
    with torch.no_grad():
        logits = model(images)[0]
    accuracy = (logits.argmax(1) == labels).double().mean().item()
    return accuracy, F.cross_entropy(logits, labels).item()


def test_official_npz_with_head(tmp_path, capsys) -> None:
    path = _npz(tmp_path)
    # Classes from the head, image size from the position embeddings.
    result = eval_script.main(
        [f"--checkpoint={path}", "--model_type=testing", "--dataset=digits", "--num_workers=0"]
    )
    accuracy, loss = _expected(_random_model())
    assert result["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert 0.0 < accuracy < 1.0
    assert "Top-1 accuracy" in capsys.readouterr().out


def test_another_size_than_the_checkpoints_resizes_position_embeddings_as_vit_jax(
    tmp_path, capsys, caplog
) -> None:
    trained = _random_model()  # 32x32: a 2x2 grid
    path = tmp_path / "run_checkpoint.bin"
    torch.save(trained.state_dict(), path)
    sidecar = {"model_type": "testing", "img_size": [32, 32], "dataset": "digits"}
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    with caplog.at_level("INFO"):
        result = eval_script.main([f"--checkpoint={path}", "--img_size", "48", "64"])
    assert "resized from a 2x2 to a 3x4 patch grid" in caplog.text
    # The oracle: the same weights at 48x64, the grid zoomed bilinearly (vit_jax's resize).
    state = trained.state_dict()
    state["embeddings.pos_embed"] = zoomed_pos_embed(state["embeddings.pos_embed"], (2, 2), (3, 4))
    at_48x64 = VisionTransformer(TESTING, (48, 64), 10)
    at_48x64.load_state_dict(state)
    accuracy, loss = _expected(at_48x64.eval())
    assert result["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert "Top-1 accuracy" in capsys.readouterr().out


def test_a_checkpoint_trained_at_a_non_square_size_evaluates_at_it(tmp_path) -> None:
    torch.manual_seed(0)
    model = VisionTransformer(TESTING, (32, 48), 10).eval()
    with torch.no_grad():
        model.head.weight.normal_()  # a real prediction, not an all-zero head
    path = tmp_path / "wide_checkpoint.bin"
    torch.save(model.state_dict(), path)
    sidecar = {"model_type": "testing", "img_size": [32, 48], "dataset": "digits"}
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    result = eval_script.main([f"--checkpoint={path}", "--num_workers=0"])
    accuracy, loss = _expected(model)
    assert result["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)


def test_imagefolder_with_only_a_val_split(tmp_path) -> None:
    from PIL import Image

    root = tmp_path / "imagenet_val"
    for c in range(10):
        (root / "val" / f"n{c:08d}").mkdir(parents=True)
        Image.new("RGB", (40, 30), (25 * c, 0, 255 - 25 * c)).save(root / "val" / f"n{c:08d}/a.png")
    result = eval_script.main(
        [
            f"--checkpoint={_npz(tmp_path)}",
            "--model_type=testing",
            "--dataset=imagefolder",
            f"--data_dir={root}",
            "--num_workers=0",
        ]
    )
    assert result["count"] == 10


@pytest.mark.slow
def test_under_torchrun_equals_one_process(tmp_path) -> None:
    path = _npz(tmp_path)
    argv = [f"--checkpoint={path}", "--model_type=testing", "--dataset=digits", "--num_workers=0"]
    single = eval_script.main(argv)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "eval.py", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Dataset: digits test split, 360 images" in result.stdout
    assert f"Top-1 accuracy: {single['accuracy']:.4f}" in result.stdout
    assert result.stdout.count("Top-1 accuracy") == 1  # printed by rank 0 only


# --------------------------------------------------------------------------------------------
# Bad input: one message naming problem and fix, exit code 2, no traceback.


def test_unknown_model_and_dataset_list_choices(tmp_path, capsys) -> None:
    err = expect_user_error(
        eval_script.main, ["--checkpoint=x.bin", "--model_type=ViT-Z_99"], capsys
    )
    assert "invalid choice: 'ViT-Z_99'" in err
    assert "ViT-B_16" in err
    err = expect_user_error(eval_script.main, ["--checkpoint=x.bin", "--dataset=mnist"], capsys)
    assert "invalid choice: 'mnist'" in err
    assert "cifar10" in err


def test_img_size_not_divisible_by_patch(tmp_path, capsys) -> None:
    err = expect_user_error(
        eval_script.main,
        [f"--checkpoint={_npz(tmp_path)}", "--model_type=testing", "--img_size=40"],
        capsys,
    )
    assert "--img_size 40 is not divisible by the 16x16 patches of testing" in err


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--img_size", "0", "argument --img_size: must be at least 1, got 0"),
        ("--img_size", "-224", "argument --img_size: must be at least 1, got -224"),
        ("--eval_batch_size", "0", "argument --eval_batch_size: must be at least 1, got 0"),
        ("--num_workers", "-1", "argument --num_workers: cannot be negative, got -1"),
        ("--img_size", "big", "argument --img_size: expected a whole number, got 'big'"),
    ],
)
def test_bad_numbers_are_one_line_and_exit_2(tmp_path, capsys, flag, value, expected) -> None:
    argv = ["--checkpoint", str(tmp_path / "x.bin"), flag, value]
    assert expected in expect_user_error(eval_script.main, argv, capsys)


def test_missing_and_corrupt_checkpoints(tmp_path, capsys) -> None:
    err = expect_user_error(eval_script.main, [f"--checkpoint={tmp_path / 'nope.bin'}"], capsys)
    assert "nope.bin does not exist" in err
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\0" * 100)
    err = expect_user_error(eval_script.main, [f"--checkpoint={junk}"], capsys)
    assert "not a readable PyTorch checkpoint" in err
    err = expect_user_error(eval_script.main, [f"--checkpoint={tmp_path / 'nope.npz'}"], capsys)
    assert "nope.npz does not exist" in err


def test_checkpoint_of_another_model(tmp_path, capsys) -> None:
    path = tmp_path / "run_checkpoint.bin"
    torch.save(_random_model().state_dict(), path)
    err = expect_user_error(
        eval_script.main,
        [f"--checkpoint={path}", "--model_type=ViT-Ti_16", "--img_size=32"],
        capsys,
    )
    assert "does not fit model ViT-Ti_16" in err
    assert "vs model" in err
    assert "It looks like a testing checkpoint: pass --model_type testing" in err


def test_class_count_differs_from_dataset(tmp_path, capsys) -> None:
    path = _npz(tmp_path, num_classes=7)
    err = expect_user_error(
        eval_script.main,
        [f"--checkpoint={path}", "--model_type=testing", "--dataset=digits"],
        capsys,
    )
    assert "predicts 7 classes but the digits test set has 10" in err


def test_missing_dataset_and_wrong_layout(tmp_path, capsys) -> None:
    path = _npz(tmp_path)
    err = expect_user_error(
        eval_script.main, [f"--checkpoint={path}", "--model_type=testing"], capsys
    )
    assert "Pass --dataset" in err
    err = expect_user_error(
        eval_script.main,
        [
            f"--checkpoint={path}",
            "--model_type=testing",
            "--dataset=imagefolder",
            f"--data_dir={tmp_path / 'missing'}",
        ],
        capsys,
    )
    assert "needs --data_dir with a val/ (or test/) folder" in err
    assert "<class_a>/" in err


def test_real_process_exits_2_without_traceback(tmp_path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"garbage")
    err = script_error("eval.py", f"--checkpoint={junk}")
    assert err.startswith("error: ")
    assert "junk.bin is not a readable PyTorch checkpoint" in err


def test_verbose_lists_every_key_of_a_checkpoint_that_does_not_fit(tmp_path) -> None:
    deeper = VisionTransformer(get_config("testing").replace(num_layers=4), 32, num_classes=10)
    path = tmp_path / "deeper.bin"
    torch.save(deeper.state_dict(), path)
    argv = [f"--checkpoint={path}", "--model_type=testing", "--img_size=32", "--dataset=digits"]

    def run(*extra: str) -> str:
        return script_error("eval.py", *argv, *extra)

    err = run()
    assert "more; --verbose lists them" in err
    assert "encoder.blocks.3.mlp.fc2.bias" not in err  # the first keys only
    assert "encoder.blocks.3.mlp.fc2.bias" in run("--verbose")  # every key, at DEBUG level


@pytest.mark.parametrize(
    ("field", "value"),
    [("model_type", ["testing"]), ("img_size", -32), ("precision", "fp64"), ("step", "last")],
)
def test_a_sidecar_field_of_a_wrong_type_or_value_is_one_message(
    tmp_path, capsys, field, value
) -> None:
    path = tmp_path / "run_checkpoint.bin"
    torch.save(_random_model().state_dict(), path)
    sidecar = {"model_type": "testing", "img_size": [32, 32], "dataset": "digits", field: value}
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    err = expect_user_error(eval_script.main, [f"--checkpoint={path}"], capsys)
    assert err.startswith(f"error: {path.with_suffix('.json')}: the field {field!r} is ")
    assert err.count("\n") == 1
