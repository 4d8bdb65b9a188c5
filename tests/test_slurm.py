"""tools/slurm: the job scripts run here as Slurm would run them, without a scheduler.

`srun`, `scontrol` and `sbatch` are stand-ins on PATH that record their arguments (`srun` runs
its command, `sbatch` answers a job id); torchrun, train.py and sweep.py are real, on the digits
data at tiny settings, with the SLURM_* variables a job gets.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import free_port, tiny_args
from utils.infra.file_io import safe_load

REPO = Path(__file__).resolve().parents[1]
STAND_INS = {
    # srun's own options come first; the rest is the command it runs on each node
    "srun": 'while [[ $1 == -* ]]; do shift; done\nexec "$@"',
    "scontrol": 'if [[ $1 == show ]]; then echo 127.0.0.1; else echo "$*" >> "$SLURM_CALLS"; fi',
    "sbatch": 'echo "sbatch $*" >> "$SLURM_CALLS"\n'
    'echo $((1000 + $(grep -c ^sbatch "$SLURM_CALLS")))',
    "torchrun": f'exec {shlex.quote(sys.executable)} -m torch.distributed.run "$@"',
    "python3": f'exec {shlex.quote(sys.executable)} "$@"',
}


@pytest.fixture
def cluster(tmp_path: Path) -> dict[str, str]:
    """The environment of a job: the stand-ins first on PATH, their record in `calls.txt`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STAND_INS.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK"))}
    for var in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return {
        **env,
        "PATH": f"{bin_dir}:{env['PATH']}",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "SLURM_CALLS": str(tmp_path / "calls.txt"),
    }


def calls(env: dict[str, str]) -> list[str]:
    path = Path(env["SLURM_CALLS"])
    return path.read_text().splitlines() if path.exists() else []


def start_job(script: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("a") as handle:
        return subprocess.Popen(
            ["bash", f"tools/slurm/{script}", *argv],
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the job did not end within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_train_job_saves_at_the_warning_requeues_itself_and_continues(
    tmp_path: Path, cluster: dict[str, str]
) -> None:
    """Two torchrun processes; SIGUSR1 to the job script alone (`--signal=B:USR1@90`) reaches
    both through srun and torchrun: they save, the job requeues itself; its next start resumes
    and finishes, and asks for no more."""
    steps = 80
    argv = tiny_args(tmp_path, num_steps=steps, save_every=5, eval_every=0)
    env = {
        **cluster,
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "node1",
        "GPUS_PER_NODE": "2",
        "MASTER_PORT": str(free_port()),
    }
    log, last = tmp_path / "job.log", tmp_path / "out" / "tiny_last.pt"
    proc = start_job("train.sbatch", argv, env, log)
    deadline = time.monotonic() + 180
    while not (last.exists() and safe_load(last)["step"] >= 5):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)
    assert finish(proc, log) != 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "Stopped by SIGUSR1" in text
    stopped_at = safe_load(last)["step"]
    assert stopped_at < steps, "the run ended before the warning reached it"
    assert calls(env) == ["requeue 4242"]

    env["SLURM_RESTART_COUNT"] = "1"  # the requeued job: the same script, the same arguments
    proc = start_job("train.sbatch", argv, env, log)
    assert finish(proc, log) == 0, log.read_text()[-3000:]
    assert f"Resumed from {last}" in log.read_text()
    assert safe_load(last)["step"] == steps
    assert calls(env) == ["requeue 4242"]  # finished: not requeued again


def run_submitted(env: dict[str, str], log: Path) -> list[str]:
    """Run the jobs `sbatch` was asked for, in order, as Slurm would once each one's dependency
    is met (an array's tasks at once, each with its SLURM_ARRAY_* variables); returns their
    dependencies."""
    dependencies = []
    for number, call in enumerate(c for c in calls(env) if c.startswith("sbatch ")):
        words = shlex.split(call)[1:]
        at = next(i for i, w in enumerate(words) if not w.startswith("--"))  # the script
        options = dict(w[2:].split("=", 1) for w in words[:at] if "=" in w)
        script, argv = words[at], words[at + 1 :]
        dependencies.append(options.get("dependency", ""))
        job = str(1001 + number)
        first, last = map(int, options.get("array", "0-0").split("-"))
        tasks = []
        for task in range(first, last + 1):
            task_env = {**env, "SLURM_JOB_ID": job, "SLURM_ARRAY_JOB_ID": job}
            task_env["SLURM_ARRAY_TASK_ID"] = str(task)
            tasks.append(start_job(Path(script).name, argv, task_env, log))
        for proc in tasks:
            assert finish(proc, log) == 0, log.read_text()[-3000:]
    return dependencies


@pytest.mark.slow
def test_sweep_as_chained_job_arrays_runs_grid_then_final_runs_then_collects(
    tmp_path: Path, cluster: dict[str, str]
) -> None:
    """sweep.sh submits grid -> choice -> final runs -> summary, each after the one before;
    each array task runs its own line of the commands sweep.py printed."""
    argv = tiny_args(
        tmp_path,
        name="s",
        log_dir=tmp_path / "logs",
        num_steps=4,
        eval_every=0,
        eval_batch_size=360,
    )
    argv += ["--learning_rates", "0.03", "0.3", "--seeds", "2"]
    log = tmp_path / "jobs.log"
    proc = start_job("sweep.sh", argv, cluster, log)
    assert finish(proc, log) == 0, log.read_text()[-3000:]
    submitted = [c for c in calls(cluster) if c.startswith("sbatch ")]
    assert ["--array=0-1" in c for c in submitted] == [True, False, True, False]

    assert run_submitted(cluster, log) == ["", "afterok:1001", "afterok:1002", "afterok:1003"]
    plans = tmp_path / "out" / "s_slurm"
    assert len((plans / "grid.txt").read_text().splitlines()) == 2
    assert len((plans / "final.txt").read_text().splitlines()) == 2
    summary = json.loads((tmp_path / "out" / "s_sweep.json").read_text())
    assert [r["status"] for r in summary["grid"] + summary["final"]] == ["finished"] * 4
    assert [r["run"][-7:] for r in summary["final"]] == ["-seed42", "-seed43"]
    assert "## Sweep s:" in (plans / "summary.md").read_text()
    assert not [c for c in calls(cluster) if not c.startswith("sbatch ")]  # nothing requeued


def test_sweep_without_a_shared_output_dir_is_refused(cluster: dict[str, str]) -> None:
    proc = subprocess.run(
        ["bash", "tools/slurm/sweep.sh", "--name", "s", "--dataset", "digits"],
        cwd=REPO,
        env=cluster,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: pass --name and --output_dir")
    assert not calls(cluster)
