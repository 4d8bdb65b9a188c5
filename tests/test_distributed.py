"""Data parallelism: `torchrun --nproc_per_node 2` on gloo equals one process with the same batch.

The test launches this file under torchrun; run as a script, it registers the `testing` model
without dropout and calls `train.main` with its arguments (see the bottom of the file).
"""

from __future__ import annotations

import faulthandler
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import eval as eval_script
import train
from models import configs
from models.configs import get_config
from models.npz import CheckpointError
from tests.helpers import free_port
from utils.infra.dist_utils import init_distributed
from utils.infra.errors import run_cli

REPO = Path(__file__).resolve().parents[1]
NO_DROPOUT = "testing-nodrop"
WORKER_LIMIT = 150  # seconds; a run takes about 10


def no_dropout() -> configs.ViTConfig:
    return get_config("testing").replace(name=NO_DROPOUT, dropout_rate=0.0)


def run_args(tmp_path: Path, name: str, accumulation: int) -> list[str]:
    return [
        *("--name", name, "--dataset", "digits", "--model_type", NO_DROPOUT),
        *("--pretrained_dir", "none", "--img_size", "32", "--train_batch_size", "16"),
        *("--gradient_accumulation_steps", str(accumulation), "--num_steps", "4"),
        *("--warmup_steps", "1", "--eval_every", "2", "--eval_batch_size", "50"),
        *("--learning_rate", "0.1", "--num_workers", "1", "--seed", "3"),
        *("--holdout_fraction", "0"),  # every log line below is a test evaluation
        *("--output_dir", str(tmp_path / "out"), "--log_dir", str(tmp_path / "logs" / name)),
    ]


def load(tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    path = tmp_path / "out" / f"{name}_checkpoint.bin"
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        *("-m", "torch.distributed.run", "--nproc_per_node", "2"),
        *("--master_addr", "127.0.0.1", "--master_port", str(free_port())),
        str(Path(__file__).resolve()),
        *run_args(tmp_path, "ddp", accumulation=1),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=2 * WORKER_LIMIT
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    # One process, same total batch 16: 2 micro-batches of 8 instead of 2 processes x 8.
    monkeypatch.setitem(configs.CONFIGS, NO_DROPOUT, no_dropout())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train.main(run_args(tmp_path, "single", accumulation=2))
    finally:
        torch.set_num_threads(threads)

    ddp, one = load(tmp_path, "ddp"), load(tmp_path, "single")
    assert ddp.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], atol=1e-6, rtol=0)
    # Sharded evaluation: 180 images on each rank, every one of the 360 counted once, and the
    # same accuracy as one process.
    counts = re.findall(r"accuracy ([0-9.]+) \((\d+) images\)", proc.stderr)
    assert [int(n) for _, n in counts] == [360, 360]
    final = float(counts[-1][0])  # nothing held out: the checkpoint is the final step's
    assert final == pytest.approx(single.selected_test_accuracy, abs=1e-4)
    assert "total batch 16 = 2 process(es) x 1 accumulation step(s) x 8" in proc.stderr


def test_single_process_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed(-1)
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert init_distributed(-1).local_rank == 0


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' must be a whole number of at least 1"),
        ({"LOCAL_RANK": "1.5"}, "LOCAL_RANK='1.5'"),
        ({"LOCAL_RANK": "-2"}, "LOCAL_RANK='-2'"),
        ({"RANK": "first", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "RANK='first'"),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "RANK=2 must be below"),
    ],
)
def test_launcher_variables_that_are_not_ranks_are_one_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, env, named
) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: init_distributed(-1))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: The environment variable {named}")
    assert err.count("\n") == 1


def test_a_script_that_fails_still_leaves_the_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A one-process gloo group stands for torchrun's; eval.py joins it as a sweep's runs join
    # the sweep's, fails on a missing file, and must leave it (the next run creates its own).
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        with pytest.raises(CheckpointError, match="does not exist"):
            eval_script.main(["--checkpoint", str(tmp_path / "missing.bin")])
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":  # a torchrun worker
    # A worker stuck for minutes prints every thread's stack and exits, so that the test's
    # failure shows where it hung.
    faulthandler.dump_traceback_later(WORKER_LIMIT, exit=True)
    configs.CONFIGS[NO_DROPOUT] = no_dropout()
    train.main(sys.argv[1:])
