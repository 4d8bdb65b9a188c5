"""tools/gpu_check.py: its CPU dry run goes through every step the GPU check runs (pytest, bench.py,
train.py in bf16 and fp16, a real SIGTERM and its resume, eval.py), and it reports what failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_check.py"
STEPS = [
    "pytest: CUDA tests",
    "pytest: fast selection",
    "bench 32",
    "train bf16",
    "eval.py agrees with the run",
    "train fp16, SIGTERM",
    "train fp16, --resume",
    "image folder: JPEGs",
    "train image folder",
]


def run_check(
    out: Path, *flags: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """tools/gpu_check.py, its steps (subprocesses that inherit `env`) on one intra-op thread:
    the dry run's models are tiny, and more threads collapse on a busy shared CPU."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"},
    )


# The GPU machine's Python has no Jupyter packages and can install none.
NOT_ON_THE_GPU_MACHINE = ("nbformat", "nbclient", "ipykernel")


def without_modules(folder: Path, names: tuple[str, ...]) -> dict[str, str]:
    """An environment in which importing any of `names` fails, as where they are not installed."""
    folder.mkdir()
    for name in names:
        (folder / f"{name}.py").write_text(
            f'raise ModuleNotFoundError("No module named {name!r}", name={name!r})\n'
        )
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


@pytest.mark.slow
def test_dry_run_passes_every_step(tmp_path: Path) -> None:
    """The dry run, where the Jupyter packages cannot be imported (as on the GPU machine)."""
    env = without_modules(tmp_path / "blocked", NOT_ON_THE_GPU_MACHINE)
    proc = run_check(tmp_path / "out", "--dry-run", env=env)
    tmp_path = tmp_path / "out"
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    failed = [row for row in rows if "| passed" not in row]  # the header and what did not pass
    assert proc.returncode == 0, "\n".join(failed) + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {step["name"]: step for step in report["steps"]}
    assert list(steps) == STEPS
    assert all(step["status"] == "passed" for step in steps.values()), steps
    assert report["versions"]["torch"] == torch.__version__

    # The CUDA tests were selected and skipped (no GPU here); the fast selection ran.
    assert steps["pytest: CUDA tests"]["figures"]["skipped"] >= 1
    assert steps["pytest: fast selection"]["figures"]["passed"] >= 1
    bench = steps["bench 32"]["figures"]
    assert bench["train_img_s"]["ours"] > 0
    assert bench["host_syncs_per_train_step"]["ours"] == 0
    assert bench["precisions"] == {"skipped": "CUDA only, skipped on cpu"}  # rows on the GPU
    assert bench["train_img_s"]["ours_over_timm"] == pytest.approx(
        bench["train_img_s"]["ours"] / bench["train_img_s"]["timm"]
    )
    # eval.py re-scores the bf16 run's best checkpoint to the run's own test accuracy.
    agree = steps["eval.py agrees with the run"]["figures"]
    assert agree["eval_accuracy"] == pytest.approx(agree["run_accuracy"], abs=1e-4)
    # The fp16 run was stopped by SIGTERM part-way (exit 143) and its resume reached the end.
    stopped = steps["train fp16, SIGTERM"]
    assert stopped["returncode"] == 143
    assert 4 <= stopped["figures"]["stopped_at"] < 12
    assert steps["train fp16, --resume"]["figures"]["step"] == 12
    assert steps["train bf16"]["figures"]["step"] == 12
    # The image-folder run: its rate once warm, beside the in-memory run's (no nvidia-smi here).
    folder = steps["train image folder"]["figures"]
    assert folder["step"] == 8
    assert folder["workers"] == 1
    assert folder["in_memory_steady_img_s"] == steps["train bf16"]["figures"]["steady_img_s"] > 0
    assert folder["over_in_memory"] == pytest.approx(
        folder["steady_img_s"] / folder["in_memory_steady_img_s"]
    )
    assert folder["gpu_util_pct"] is None
    # Each projection says what its rate includes; train.py's leaves evaluation out, as its
    # summary's images/s does.
    bases = list(report["projections"])
    assert len(bases) == 2
    assert any("evaluation left out" in basis for basis in bases)
    assert any("training step alone" in basis for basis in bases)

    summary = (tmp_path / "gpu_check.md").read_text()
    for name in STEPS:
        assert f"| {name} | passed" in summary
    log = (tmp_path / "gpu_check.log").read_text()
    for name in STEPS:  # every step's output is in the one log, under its command
        assert f"===== {name}: " in log
    assert "could not import 'nbformat'" in log  # the notebook's tests skipped, nothing failed


# A Python with the GPU machine's torch (2.11), e.g. a venv made as docs/development.md says.
GPU_IMAGE_PYTHON = os.environ.get("VIT_GPU_IMAGE_PYTHON")


@pytest.mark.slow
@pytest.mark.skipif(not GPU_IMAGE_PYTHON, reason="set VIT_GPU_IMAGE_PYTHON to a torch 2.11 Python")
def test_dry_run_under_the_gpu_machines_torch(tmp_path: Path) -> None:
    """The dry run under the GPU machine's torch: its compiler is older than ours, and once
    could not trace the compiled step that ours traced."""
    proc = subprocess.run(
        [GPU_IMAGE_PYTHON, str(SCRIPT), "--out", str(tmp_path), "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["versions"]["torch"].startswith("2.11"), report["versions"]
    failed = [s["name"] for s in report["steps"] if s["status"] != "passed"]
    assert not failed, (failed, proc.stdout[-3000:])
    assert proc.returncode == 0


def test_spent_budget_skips_steps_and_fails(tmp_path: Path) -> None:
    """A budget too small for any step: every step is recorded as skipped, and the exit code
    says the check did not pass (a check that ran nothing never reports success)."""
    proc = run_check(tmp_path, "--dry-run", "--budget", "1", timeout=120)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [step["status"] for step in report["steps"]] == ["skipped"] * len(STEPS)
    assert report["passed"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_without_a_gpu_it_says_so(tmp_path: Path) -> None:
    proc = run_check(tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA GPU is visible" in proc.stderr
    assert "--dry-run" in proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_gpu_utilisation_is_sampled_while_a_step_runs(tmp_path: Path, monkeypatch) -> None:
    """The sampler runs nvidia-smi (here a stand-in printing 10, 20, 30, ... every 50 ms, as
    `-lms` makes the real one) for as long as the block runs, and the median keeps to the
    window it is asked for."""
    from tools.gpu_check import GpuUtilisation

    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        f'echo "$@" > {tmp_path / "args"}\n'
        "i=1; while true; do echo $((i * 10)); i=$((i + 1)); sleep 0.05; done\n"
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with GpuUtilisation() as gpu:
        deadline = time.monotonic() + 10
        while len(gpu.reader.lines) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
    values = [value for _, value in gpu.samples]
    assert values[:6] == [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    assert "--query-gpu=utilization.gpu" in (tmp_path / "args").read_text()
    assert "-i 3" in (tmp_path / "args").read_text()
    times = [when for when, _ in gpu.samples]
    assert gpu.median(times[1], times[3]) == 30.0  # the 2nd to 4th samples
    assert gpu.median(times[-1] + 1, times[-1] + 2) is None
    assert gpu.proc.poll() is not None  # stopped with the block
