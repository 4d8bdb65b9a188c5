"""`make demo`, the README's first command, and the README's other commands, as typed.

In a copy of the repository's files (a fresh clone, as the README's reader has), runs the exact
`train.py` command of the Makefile's `demo` recipe and checks that its run reaches 0.95 test
accuracy on digits, the printed accuracy against the saved checkpoint re-scored with a plain
loop; then every other command of the README that runs offline, in the README's order, with
`python` the interpreter running the tests (the README says to use the environment's). The
commands that read nothing the demo writes (the download list, the stand-in checkpoint and its
fine-tune) run while the demo trains, on the core its one thread leaves free.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.modeling import VisionTransformer
from utils.data.loaders import DigitsDataset, build_transforms
from utils.evals.attention_maps import sample_image

REPO = Path(__file__).resolve().parents[1]


def demo_command() -> str:
    """The shell command of the Makefile's `demo` recipe, joined across continuation lines."""
    text = (REPO / "Makefile").read_text()
    match = re.search(r"^demo:.*\n((?:\t.*\n?)+)", text, flags=re.MULTILINE)
    assert match, "the Makefile has no demo target"
    recipe = match.group(1).replace("\\\n", " ")
    lines = [line.strip() for line in recipe.splitlines() if "train.py" in line]
    assert len(lines) == 1, recipe
    # A fresh output folder here: the demo starts a new run (no --resume).
    return lines[0].replace("$(PY)", shlex.quote(sys.executable)).replace("$(DEMO_RESUME)", "")


@pytest.mark.slow
def test_demo_reaches_95_percent_then_the_readme_runs_as_typed(tmp_path: Path) -> None:
    clone = fresh_clone(tmp_path / "clone")
    command = demo_command()
    assert "--dataset digits" in command
    sample_image("china.jpg").save(clone / "cat.jpg")  # the reader's own images
    (clone / "photos").mkdir()
    sample_image("flower.jpg").save(clone / "photos" / "flower.png")
    commands = [
        line for line in readme_commands() if not line.startswith("make demo") and not skipped(line)
    ]
    ran = {}  # the script each command ran, by its place in the README
    out, err = tmp_path / "demo.out", tmp_path / "demo.err"  # files: a full pipe would stall it
    with out.open("w") as stdout, err.open("w") as stderr:
        demo = subprocess.Popen(
            ["bash", "-c", command],
            cwd=clone,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,  # killed with its children if the test fails before it ends
        )
    try:
        for i, line in enumerate(commands):
            if apart_from_the_demo(line):
                ran[i] = run_typed(line, clone, threads=1)  # the demo holds the other core
        demo.wait(timeout=900)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    proc = subprocess.CompletedProcess(command, demo.returncode, out.read_text(), err.read_text())
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = re.search(
        r"Best checkpoint: step \d+ by minival .*; test accuracy ([0-9.]+)", proc.stdout
    )
    accuracy = float(best.group(1))
    seconds = float(re.search(r"Training time: ([0-9.]+) s", proc.stdout).group(1))
    assert accuracy >= 0.95, f"demo accuracy {accuracy} after {seconds:.0f} s"
    hint = re.search(r"TensorBoard: (\S+) -m tensorboard.main --logdir (\S+)", proc.stdout)
    shown = hint.group(1)  # the interpreter that ran it, as typed in the clone's folder
    found = clone / shown if "/" in shown else Path(shutil.which(shown))
    assert found.resolve() == Path(sys.executable).resolve()
    assert (clone / hint.group(2)).resolve() == (clone / "logs" / "digits-demo").resolve()
    checkpoint = clone / re.search(r"Checkpoint: (\S+)", proc.stdout).group(1)

    # Independent re-scoring of the saved model.
    meta = json.loads(Path(checkpoint).with_suffix(".json").read_text())
    model = VisionTransformer(meta["model_type"], meta["img_size"], meta["num_classes"])
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    model.eval()
    test = DigitsDataset(train=False, transform=build_transforms(meta["img_size"], train=False))
    images = torch.stack([test[i][0] for i in range(len(test))])
    with torch.no_grad():
        predictions = model(images)[0].argmax(dim=1)
    rescored = (predictions == torch.tensor(test.targets)).sum().item() / len(test)
    assert rescored == pytest.approx(accuracy, abs=1e-4)
    assert rescored >= 0.95

    # The README's other commands, as typed, after `make demo`.
    for i, line in enumerate(commands):
        if i not in ran:
            ran[i] = run_typed(line, clone)
    assert [ran[i] for i in range(len(commands))] == [
        "eval.py",
        "predict.py",
        "visualize.py",
        "fewshot.py",
        "-m",  # utils.download --list
        "export.py",
        "tools/make_standin_npz.py",
        "train.py",  # on the stand-in
    ]
    assert (clone / "output" / "preds.csv").read_text().count("\n") == 3  # header, 2 images
    assert (clone / "output" / "digits-demo_checkpoint.onnx").is_file()


# What of the README cannot run offline on a CPU in a test, and where it is tested instead.
NOT_HERE = {
    "make test": "the suite itself",
    "make tensorboard": "a server that runs until stopped (tests/test_make.py)",
    "make notebook": "needs Jupyter's server, not a requirement (tests/test_make.py)",
    "utils.download ViT-B_16": "a download (tests/test_download.py, on 127.0.0.1)",
    "utils.download B_16": "a download (tests/test_download.py, on 127.0.0.1)",
    "--dataset cifar10": "CIFAR is a download",
    "sweep.py": "11 minutes on digits (tests/test_sweep.py runs it small)",
    "ViT-B_16-224.npz": "an official fine-tuned checkpoint, a download",
    "bench.py": "minutes of ViT-B_16 on a CPU (tests/test_bench.py runs it small)",
    "sbatch": "a Slurm scheduler (tests/test_slurm.py, with stand-ins)",
    "tools/slurm/": "a Slurm scheduler (tests/test_slurm.py, with stand-ins)",
}


def skipped(line: str) -> bool:
    return any(part in line for part in NOT_HERE)


# The README's commands that read nothing `make demo` writes (output/digits-demo_*, logs/).
APART_FROM_THE_DEMO = (
    "python -m utils.download --list",
    "python tools/make_standin_npz.py ",
    "python train.py --name standin ",
)


def apart_from_the_demo(line: str) -> bool:
    return line.startswith(APART_FROM_THE_DEMO)


def run_typed(line: str, clone: Path, threads: int | None = None) -> str:
    """One README command as typed in `clone`, `python` the interpreter running the tests (with
    `threads`, on that many intra-op threads); it must succeed. Returns its script's name."""
    typed = re.sub(r"(^|\s)python ", rf"\1{shlex.quote(sys.executable)} ", line)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    step = subprocess.run(
        ["bash", "-c", typed], cwd=clone, env=env, capture_output=True, text=True, timeout=600
    )
    assert step.returncode == 0, f"{line}\n{step.stderr[-3000:]}"
    return line.split()[1]


def readme_commands() -> list[str]:
    """The command lines of the README's bash blocks: continuation lines joined, comments off."""
    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(" ".join(line.split()))
    return lines


def fresh_clone(folder: Path) -> Path:
    """The files git tracks, copied to `folder`: what a clone has (no output/, logs/, data)."""
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in filter(None, tracked):
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    return folder
