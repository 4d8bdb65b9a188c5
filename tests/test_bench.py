"""bench.py: the command runs end to end on the `testing` config and its output has the promised
shape (never its speed); attention maps are not materialised unless asked for."""

from __future__ import annotations

import json

import pytest
import torch

import bench
from models.configs import get_config

pytest.importorskip("timm")

FIGURES = {
    "infer_img_s",
    "train_img_s",
    "infer_img_s_best",
    "train_img_s_best",
    "infer_step_s",
    "train_step_s",
    "infer_gflop_per_img",
    "train_gflop_per_img",
    "infer_matmul_fraction",
    "train_matmul_fraction",
    "infer_peak_mem_mb",
    "train_peak_mem_mb",
    "saved_nxn_tensors_vis_false",
}
TIMES = {"infer_times_s", "train_times_s"}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, str]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = [
        "--model_type",
        "testing",
        "--img_size",
        "32",
        "--batch_size",
        "2",
        "--warmup",
        "1",
        "--iters",
        "2",
        "--load_iters",
        "1",
        "--data_images",
        "8",
        "--matmul_size",
        "64",
        "--device",
        "cpu",
        "--grad_checkpointing",
        "--folder_images",
        "8",
        "--out",
        str(out),
    ]
    returned = bench.main(argv)
    table = bench.format_table(returned)
    return returned, json.loads(out.read_text()), table


def test_json_has_every_figure(results: tuple[dict, dict, str]) -> None:
    returned, written, _ = results
    assert written == json.loads(json.dumps(returned))
    assert written["settings"]["model_type"] == "testing"
    eager = written["eager"]
    for name in ("ours", "timm"):
        assert set(eager[name]) == FIGURES | TIMES
        assert all(isinstance(eager[name][k], int | float) for k in FIGURES)
        assert all(eager[name][k] >= 0 for k in FIGURES)
        assert len(eager[name]["train_times_s"]) == 2  # one per timed round
        assert len(eager[name]["infer_times_s"]) == 6  # 3 x --iters by default
        assert eager[name]["train_img_s"] > 0
        assert eager[name]["saved_nxn_tensors_vis_false"] == 0
    assert set(eager["ratio_ours_over_timm"]) == {
        *bench.THROUGHPUTS,
        "infer_peak_mem_mb",
        "train_peak_mem_mb",
    }
    assert eager["matmul_gflop_s"] > 0
    load = written["checkpoint_load"]
    assert load["ours_s"] > 0
    assert load["timm_s"] > 0
    # Same architecture and tanh GELU: timm loads the same npz to the same function.
    assert load["max_abs_logit_diff"] < 1e-4
    data = written["data_pipeline"]
    assert set(data["sizes"]) == {"32", "224", "384"}  # --img_size, the defaults, the estimate's
    for row in data["sizes"].values():
        assert row["old_img_s"] > 0
        assert row["float_img_s"] > 0
        assert row["batched_cpu_img_s"] > 0
        assert row["batched_cuda_img_s"] is None
    assert data["gather_img_s"] > 0
    feed = data["workers_to_feed"]
    assert feed["basis"].startswith("estimate")  # no GPU: not this run's speed
    assert feed["float_path"] == pytest.approx(
        feed["train_img_s"] / data["sizes"]["384"]["float_img_s"]
    )
    assert "compiled" not in written


def test_image_folder_figures(results: tuple[dict, dict, str]) -> None:
    """Ours, ours before and timm's loader on the same JPEGs, and the workers each needs."""
    _, written, table = results
    folder = written["image_folder"]
    assert (folder["images"], folder["img_size"]) == (8, 224)
    for name in ("ours", "ours_before", "timm"):
        assert folder[f"{name}_img_s"] > 0
        assert folder["workers"][name] == pytest.approx(3000 / folder[f"{name}_img_s"])
    assert folder["ours_over_timm"] == pytest.approx(folder["ours_img_s"] / folder["timm_img_s"])
    assert any(line.startswith("Image folder, 427x437 JPEG") for line in table.splitlines())


def test_checkpointing_figures(results: tuple[dict, dict, str]) -> None:
    """Ours and timm's, with and without checkpointing, timed in the same rounds."""
    _, written, table = results
    ckpt = written["grad_checkpointing"]
    for name in ("ours", "timm"):
        for mode in ("with", "without"):
            figures = ckpt[name][mode]
            assert len(figures["train_times_s"]) == 2
            assert figures["train_img_s"] > 0
            assert figures["train_peak_mem_mb"] > 0
        ratios = ckpt[name]["ratio_with_over_without"]
        assert ratios["train_peak_mem_mb"] == pytest.approx(
            ckpt[name]["with"]["train_peak_mem_mb"] / ckpt[name]["without"]["train_peak_mem_mb"]
        )
    # 5 tokens, 2 blocks: the peak is the weights' and gradients' (the optimizer step), so no
    # lower with checkpointing; tests/test_grad_checkpointing.py measures a model where it is.
    assert ckpt["ours"]["ratio_with_over_without"]["train_peak_mem_mb"] <= 1
    assert any(
        row.startswith("| checkpointing / without: training peak memory |")
        for row in table.splitlines()
    )


def test_table_shape(results: tuple[dict, dict, str]) -> None:
    _, _, table = results
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert rows[0] == "| figure | ours | timm | ours/timm |"
    assert all(row.count("|") == 5 for row in rows)
    assert any(row.startswith("| training img/s (median) |") for row in rows)
    assert any(row.startswith("| npz -> ready model") for row in rows)


@pytest.mark.parametrize("vis", [False, True])
def test_attention_maps_kept_only_when_asked(vis: bool) -> None:
    config = get_config("testing")
    model = bench.build_ours(config, 32, num_classes=3, vis=vis).train()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    saved = bench.saved_attention_maps(model, bench.ours_loss, images, labels, tokens=5)
    # vis=True saves each layer's probabilities (softmax output, dropout mask, ...).
    assert (saved >= config.num_layers) if vis else (saved == 0)


def test_live_tensor_bytes_counts_new_storage_once() -> None:
    base = torch.zeros(1024)
    with bench.LiveTensorBytes() as tracker:
        a = torch.ones(256)  # 1 KiB, new
        view = a.view(16, 16)  # alias: not new
        a.add_(1)  # in place: not new
        b = base + 1  # 4 KiB, new
        del b  # freed: counts in the peak only
        c = torch.empty(512)  # 2 KiB, new
    assert tracker.peak == 1024 + 4096
    assert tracker.current == 1024 + 2048
    del view, c


def test_old_training_transform_shape_and_range() -> None:
    from PIL import Image

    image = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    out = bench.old_training_transform(48)(image)
    assert out.shape == (3, 48, 48)
    assert out.dtype == torch.float32
    assert out.min() >= -1.0
    assert out.max() <= 1.0
