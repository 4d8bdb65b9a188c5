"""bench.py: the command runs end to end on the `testing` config and its output has the promised
shape (never its speed); attention maps are not materialised unless asked for."""

from __future__ import annotations

import json
import statistics

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
    # Decoding alone, on the same files (8 for training, 2 for val); the GPU decoder only on CUDA.
    decode = folder["decode"]
    assert decode["images"] == 10
    assert decode["pil_img_s"] > 0
    assert decode["gpu"] == {"skipped": "CUDA only, skipped on cpu"}
    assert "JPEG decoding alone: PIL (1 thread)" in table


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_jpeg_decoding_agrees_with_pil(tmp_path) -> None:
    """torchvision's GPU decoder on real JPEGs: its rate, and pixels close to PIL's on average
    (the decoders round the inverse DCT and upsample colour differently)."""
    from tools.make_photo_folder import write_photo_folder

    write_photo_folder(tmp_path, 16)
    decode = bench.jpeg_decode_rates(str(tmp_path), torch.device("cuda"), rounds=1)
    assert decode["images"] == 18
    assert decode["gpu"]["img_s"] > 0
    assert decode["gpu"]["mean_abs_diff_from_pil"] < 2.0


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


def test_host_syncs_and_the_skipped_precision_rows(results: tuple[dict, dict, str]) -> None:
    _, written, table = results
    syncs = written["host_syncs_per_train_step"]
    assert syncs["ours"] == 0  # train.py's clipping and optimizer step never wait for the device
    assert isinstance(syncs["timm"], int)
    assert f"| host syncs per training step | 0 | {syncs['timm']} | - |" in table.splitlines()
    assert written["settings"]["tf32"] is False  # the CPU has no TF32
    assert written["precisions"] == {"skipped": "CUDA only, skipped on cpu"}
    assert "Precisions (fp32, fp32 + TF32, bf16, with MFU): CUDA only, skipped on cpu." in table


def test_host_syncs_counts_what_waits_for_the_device() -> None:
    x = torch.randn(8)

    def step() -> None:
        x.sum().item()  # 1
        if x.max() > 0:  # 2
            x.mul_(2)
        x.nonzero()  # 3: its size is known only on the host
        torch.tensor(0.9, dtype=torch.bfloat16).item()  # made on the host: waits for nothing
        torch.nn.functional.softmax(x, 0)

    assert bench.count_host_syncs(step) == 3


def _flops_per_image(config_name: str, img_size: int, device: str) -> tuple[float, float]:
    """bench's FLOP count of our model's inference and training step, per image (batch 2)."""
    with torch.device(device):
        model = bench.build_ours(get_config(config_name), img_size, num_classes=10)
    runner = bench.make_runner("ours", model, "bfloat16")
    images = torch.randn(2, 3, img_size, img_size, device=device)
    labels = torch.zeros(2, dtype=torch.long, device=device)
    model.eval()
    infer = bench.count_flops(lambda: bench.infer_step(runner, images, "fp32"))
    model.train()
    train = bench.count_flops(lambda: bench.update_step(runner, images, labels, "fp32"))
    return infer / 2, train / 2


def test_flops_count_attention_on_the_cpu() -> None:
    """The CPU's fused attention kernel counts as the meta device's unfused attention (two
    batched matrix products, which torch's counter knows) forward; backward it counts the
    recomputed scores too, as a fused kernel on CUDA is counted."""
    cpu_infer, cpu_train = _flops_per_image("testing", 32, "cpu")
    meta_infer, meta_train = _flops_per_image("testing", 32, "meta")
    assert cpu_infer == meta_infer
    assert meta_train < cpu_train < 1.01 * meta_train


def test_vit_b16_flops_at_224_are_the_known_figures() -> None:
    """About 32.9 GFLOP per image forward and 98.8 per training image, attention included."""
    infer, train = _flops_per_image("ViT-B_16", 224, "meta")
    assert infer / 1e9 == pytest.approx(32.9, rel=0.01)
    assert train / 1e9 == pytest.approx(98.8, rel=0.01)


@pytest.mark.slow
def test_vit_b16_flops_at_224_on_the_cpu_are_the_known_figures(one_thread) -> None:
    infer, train = _flops_per_image("ViT-B_16", 224, "cpu")
    assert infer / 1e9 == pytest.approx(32.9, rel=0.01)
    assert train / 1e9 == pytest.approx(98.8, rel=0.01)


def test_precision_rows_time_every_setting_with_its_mfu() -> None:
    """run() adds these rows on CUDA only; on a CPU they run the same way (TF32 switches nothing
    here, so fp32 and fp32 + TF32 are the same arithmetic)."""
    args = bench.parse_args(
        ["--model_type", "testing", "--img_size", "32", "--batch_size", "2", "--iters", "2"]
    )
    args.warmup = 0
    gflop = {"infer": 1e-4, "train": 3e-4}
    figures = bench.precision_figures(
        args, get_config("testing"), torch.device("cpu"), gflop, matmul_size=64
    )
    assert figures["bf16_matmul_tflop_s"] > 0
    assert set(figures["rows"]) == set(bench.PRECISION_ROWS)
    peak = figures["bf16_matmul_tflop_s"] * 1e12
    for row in figures["rows"].values():
        assert len(row["train_times_s"]) == 2
        assert len(row["infer_times_s"]) == 6
        achieved = gflop["train"] * 1e9 * 2 / statistics.median(row["train_times_s"])
        assert row["train_mfu"] == pytest.approx(achieved / peak, rel=0.02)  # times rounded
    lines = bench._precision_lines(figures)
    assert lines[1].startswith("Precisions (ours; MFU: FLOP/s over the bf16 matrix product's")
    assert [line.split(":")[0] for line in lines[2:]] == ["- fp32", "- fp32 + TF32", "- bf16"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_reports_every_precision_eager_and_compiled(tmp_path, tf32_switches) -> None:
    argv = [
        *("--model_type", "testing", "--img_size", "32", "--batch_size", "2", "--iters", "2"),
        *("--load_iters", "0", "--data_images", "0", "--matmul_size", "1024"),
        *("--device", "cuda", "--compile", "--out", str(tmp_path / "bench.json")),
    ]
    written = bench.main(argv)
    assert written["settings"]["tf32"] is True  # --tf32 on, the default
    rows = written["precisions"]["rows"]
    assert list(rows) == [name + tag for name in bench.PRECISION_ROWS for tag in ("", ", compiled")]
    assert all(row["train_mfu"] > 0 and row["infer_mfu"] > 0 for row in rows.values())
    assert written["precisions"]["bf16_matmul_tflop_s"] > 0
    assert written["host_syncs_per_train_step"]["ours"] == 0
    # The rows switched TF32 off and on; the run's own setting is back.
    assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32


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


def test_the_photo_folder_tool_writes_real_jpegs_and_never_into_an_existing_folder(
    tmp_path, capsys
) -> None:
    from PIL import Image

    from tools import make_photo_folder

    root = tmp_path / "photos"
    assert make_photo_folder.main([str(root), "--images", "3", "--val", "1"]) == 0
    train = sorted(
        p.relative_to(root / "train").as_posix() for p in (root / "train").rglob("*.jpg")
    )
    assert train == ["china/00000.jpg", "china/00002.jpg", "flower/00001.jpg"]
    assert len(list((root / "val").rglob("*.jpg"))) == 1
    with Image.open(root / "train" / "china" / "00000.jpg") as image:
        assert (image.format, image.size) == ("JPEG", (437, 427))
    before = sorted(root.rglob("*"))
    assert make_photo_folder.main([str(root), "--images", "5"]) == 2
    assert "exists; name a new folder" in capsys.readouterr().err
    assert sorted(root.rglob("*")) == before
