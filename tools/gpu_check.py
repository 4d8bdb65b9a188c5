"""One prepared GPU check: the CUDA paths the CPU suite skips, bench.py against timm, and the
recipe's own loop (bf16, fp16, a SIGTERM and its resume, eval.py agreeing with the run).

    python tools/gpu_check.py              # on a CUDA machine: into $OUT, else ./gpu_check
    python tools/gpu_check.py --dry-run    # the same steps on a CPU with tiny sizes
    python tools/gpu_check.py --out DIR --budget 480

Every step is a subprocess with its own time limit, cut from what is left of `--budget`
(seconds, default 480), so a step that hangs costs its limit and the rest still run; a step with
under 10 s left is recorded as skipped. Writes three files into the output folder:
`gpu_check.json` (device, versions, every step's command, exit code, seconds and figures),
`gpu_check.md` (the same as a summary) and `gpu_check.log` (every step's output). Exits 0 when
every step passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parent.parent
# The original port's headline run: ViT-B_16 on CIFAR-10, 10,000 steps of 512 images at 224,
# 3 h 13 min on its README's hardware; the official recipe trains the same at 384.
HEADLINE_IMAGES = 10_000 * 512
ORIGINAL_PORT_SECONDS = 3 * 3600 + 13 * 60


def _argv(text: str) -> tuple[str, ...]:
    return tuple(shlex.split(text))


@dataclass(frozen=True)
class Plan:
    """The sizes of one mode: the real check on CUDA, or the dry run on a CPU."""

    device: str
    pytest_cuda: tuple[str, ...]  # the tests that skip without CUDA
    pytest_fast: tuple[str, ...]  # a short selection of the fast suite, CUDA visible
    bench: tuple[tuple[str, ...], ...]  # one bench.py argument list per image size
    train: tuple[str, ...]  # train.py flags shared by the bf16 and fp16 runs
    num_steps: int
    stop_after: int  # the fp16 run is stopped once its last state holds this many steps
    folder: tuple[str, ...]  # train.py flags of the image-folder run (bf16, like the first run)
    folder_images: int  # JPEGs in its training folder
    folder_steps: int


GPU = Plan(
    device="cuda",
    pytest_cuda=_argv("-m cuda tests"),
    pytest_fast=_argv(
        "-m 'not slow' tests/test_models.py tests/test_hybrid.py tests/test_optim.py "
        "tests/test_preprocessing.py tests/test_data.py"
    ),
    bench=tuple(
        _argv(
            f"--device cuda --dtype bf16 --model_type ViT-B_16 --img_size {size} --batch_size "
            f"{batch} --train_batch_size {batch} --warmup 2 --iters 5 --load_iters 0 "
            f"--data_images {images} --data_sizes 224 384"
        )
        for size, batch, images in ((224, 128, 1024), (384, 64, 0))
    ),
    train=_argv(
        "--dataset digits --model_type ViT-B_16 --pretrained_dir none --img_size 224 "
        "--train_batch_size 128 --learning_rate 0.03 --warmup_steps 30 --eval_every 100 "
        "--save_every 50 --num_workers 4"
    ),
    num_steps=300,
    stop_after=100,
    folder=_argv(
        "--dataset imagefolder --model_type ViT-B_16 --pretrained_dir none --img_size 224 "
        "--train_batch_size 128 --learning_rate 0.03 --warmup_steps 30 --holdout_fraction 0 "
        "--log_every 20 --save_every 0 --num_workers 8"
    ),
    folder_images=2048,
    folder_steps=300,
)

DRY_RUN = Plan(
    device="cpu",
    pytest_cuda=_argv("-m cuda tests"),  # all of them, collected as on the GPU machine
    pytest_fast=_argv("-m 'not slow' tests/test_stopping.py"),
    bench=(
        _argv(
            "--device cpu --dtype bf16 --model_type testing --img_size 32 --batch_size 2 "
            "--warmup 1 --iters 1 --infer_iters 1 --load_iters 0 --data_images 8 --data_sizes 32 "
            "--folder_images 8 --matmul_size 64"
        ),
    ),
    train=_argv(
        "--dataset digits --model_type demo --pretrained_dir none --img_size 32 "
        "--train_batch_size 32 --learning_rate 0.1 --warmup_steps 2 --eval_every 6 "
        "--save_every 2 --num_workers 1"
    ),
    num_steps=12,
    stop_after=4,
    folder=_argv(
        "--dataset imagefolder --model_type demo --pretrained_dir none --img_size 32 "
        "--train_batch_size 32 --learning_rate 0.1 --warmup_steps 1 --holdout_fraction 0 "
        "--log_every 2 --save_every 0 --num_workers 1"
    ),
    folder_images=40,
    folder_steps=8,
)


@dataclass
class Step:
    name: str
    command: list[str]
    status: str = "not run"  # passed, failed, timed out, skipped
    returncode: int | None = None
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class Check:
    """Runs the steps under one time budget; every output goes to one log file."""

    def __init__(self, out: Path, budget: float, scratch: Path):
        self.out, self.scratch = out, scratch
        self.deadline = time.monotonic() + budget
        self.log = (out / "gpu_check.log").open("w", encoding="utf-8")
        self.steps: list[Step] = []
        self.lines: list[tuple[float, str]] = []  # the last step's output, line by line, timed
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
        for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # one process, whatever the shell had
            self.env.pop(var, None)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def start(self, name: str, command: list[str]) -> tuple[Step, float | None]:
        """A new step and its time limit, or None when the budget is spent."""
        step = Step(name, command)
        self.steps.append(step)
        self.log.write(f"\n===== {name}: {shlex.join(command)}\n")
        self.log.flush()
        if self.left() < 10:
            step.status = "skipped"
            step.problems.append("the time budget was spent before this step")
            return step, None
        return step, self.left()

    def skip(self, name: str, command: list[str], reason: str) -> None:
        self.steps.append(Step(name, command, status="skipped", problems=[reason]))

    def popen(self, command: list[str]) -> subprocess.Popen:
        # A new session: a step that times out is killed with every process it started.
        return subprocess.Popen(
            command,
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,
        )

    def finish(self, step: Step, proc: subprocess.Popen, limit: float, began: float) -> str:
        """Wait for `proc` within `limit` seconds; returns its output (also logged). Each line's
        arrival time is kept in `self.lines` (`time.monotonic()`, line), for timed figures."""
        reader = TimedLines(proc.stdout)
        try:
            proc.wait(timeout=max(1.0, limit - (time.monotonic() - began)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            step.status = "timed out"
            step.problems.append(f"no exit within {limit:.0f} s")
        self.lines = reader.join()
        output = "".join(line for _, line in self.lines)
        step.returncode = proc.returncode
        step.seconds += time.monotonic() - began
        self.log.write(output)
        self.log.flush()
        return output

    def run(self, name: str, command: list[str], ok=(0,)) -> tuple[Step, str]:
        step, limit = self.start(name, command)
        if limit is None:
            return step, ""
        began = time.monotonic()
        output = self.finish(step, self.popen(command), limit, began)
        if step.status == "not run":
            step.status = "passed" if step.returncode in ok else "failed"
            if step.returncode not in ok:
                step.problems.append(f"exit code {step.returncode}")
        return step, output


class TimedLines:
    """Reads a stream's lines on a thread as they come, each with its arrival time."""

    def __init__(self, stream: TextIO):
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: TextIO) -> None:
        for line in stream:
            self.lines.append((time.monotonic(), line))

    def join(self, timeout: float = 30.0) -> list[tuple[float, str]]:
        """The lines read, once the stream has ended (or `timeout` seconds later)."""
        self.thread.join(timeout)
        return list(self.lines)


class GpuUtilisation:
    """The GPU's utilisation (%) as nvidia-smi samples it every 200 ms while the block runs, each
    sample with its time; no samples where nvidia-smi is missing (the dry run)."""

    def __enter__(self) -> GpuUtilisation:
        self.proc, self.reader = None, None
        smi = shutil.which("nvidia-smi")
        if smi:
            device = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
            query = ["--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
            self.proc = subprocess.Popen(
                [smi, *query, "-lms", "200", "-i", device],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self.reader = TimedLines(self.proc.stdout)
        return self

    def __exit__(self, *exc: object) -> None:
        self.samples: list[tuple[float, float]] = []
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for when, line in self.reader.join(10):
            with contextlib.suppress(ValueError):
                self.samples.append((when, float(line)))

    def median(self, start: float, end: float) -> float | None:
        """The median of the samples taken between `start` and `end`."""
        inside = [value for when, value in self.samples if start <= when <= end]
        return statistics.median(inside) if inside else None


PROGRESS = re.compile(r"Step (\d+)/(\d+): .*?, ([0-9.]+) images/s")


def steady_rate(lines: list[tuple[float, str]]) -> tuple[float | None, float, float]:
    """train.py's training rate once warm: the median of the rates its progress lines report in
    the second half of the run (each the rate since the line before, evaluation left out),
    and the times of the first and last of those lines."""
    found = [(when, PROGRESS.search(line)) for when, line in lines]
    late = [
        (when, float(m.group(3)))
        for when, m in found
        if m and 2 * int(m.group(1)) > int(m.group(2))
    ]
    if not late:
        return None, 0.0, 0.0
    return statistics.median(rate for _, rate in late), late[0][0], late[-1][0]


def pytest_counts(output: str) -> dict:
    """The counts of pytest's closing line ("3 passed, 2 skipped in 4.1s")."""
    closing = re.compile(r"\d+ (passed|skipped|failed)")
    lines = [line for line in output.splitlines() if closing.search(line)]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", lines[-1])} if lines else {}


def bench_figures(path: Path) -> dict:
    results = json.loads(path.read_text())
    eager = results["eager"]
    figures = {
        "settings": results["settings"],
        "gpu": results["machine"].get("gpu"),
        "matmul_gflop_s": eager.get("matmul_gflop_s"),
    }
    for key in (
        "train_img_s",
        "infer_img_s",
        "train_peak_mem_mb",
        "infer_peak_mem_mb",
        "train_matmul_fraction",
    ):
        ours, timm = eager["ours"].get(key), eager["timm"].get(key)
        figures[key] = {"ours": ours, "timm": timm, "ours_over_timm": _ratio(ours, timm)}
    for section in (
        "grad_checkpointing",
        "data_pipeline",
        "precisions",
        "host_syncs_per_train_step",
    ):
        if section in results:
            figures[section] = results[section]
    return figures


def _ratio(a, b) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def train_summary(output: str) -> dict:
    """The figures train.py prints at the end of a run."""
    figures: dict = {}
    if m := re.search(r"^Steps: (\d+) of (\d+)", output, re.MULTILINE):
        figures["step"], figures["num_steps"] = int(m.group(1)), int(m.group(2))
    if m := re.search(r"^Best checkpoint: .*test accuracy ([0-9]+\.[0-9]+)", output, re.MULTILINE):
        figures["test_accuracy"] = float(m.group(1))
    if m := re.search(r"Training time: ([0-9.]+) s \(([0-9.]+) images/s\)", output):
        figures["train_seconds"], figures["train_img_s"] = float(m.group(1)), float(m.group(2))
    return figures


def last_state_step(path: Path) -> int | None:
    from utils.infra.file_io import safe_load  # the loader train.py's states are written for

    if not path.exists():
        return None
    return int(safe_load(path)["step"])


def train_runs(check: Check, plan: Plan, python: str) -> None:
    out, logs = check.scratch / "runs", check.scratch / "logs"
    common = [*plan.train, "--output_dir", str(out), "--num_steps", str(plan.num_steps)]

    def command(name: str, precision: str, *extra: str) -> list[str]:
        logdir = str(logs / name)
        return [
            *(python, "train.py", "--name", name, "--precision", precision),
            *(*common, "--log_dir", logdir, *extra),
        ]

    # bf16: a whole run, then eval.py on its best checkpoint must give the run's test accuracy.
    step, output = check.run("train bf16", command("check-bf16", "bf16"))
    step.figures = train_summary(output)
    step.figures["steady_img_s"] = steady_rate(check.lines)[0]
    checkpoint = out / "check-bf16_checkpoint.bin"
    evaluate = [python, "eval.py", "--checkpoint", str(checkpoint), "--precision", "bf16"]
    if step.status != "passed":
        check.skip("eval.py agrees with the run", evaluate, "the bf16 run did not pass")
    else:
        if step.figures.get("step") != plan.num_steps:
            step.status = "failed"
            step.problems.append(f"ended at step {step.figures.get('step')}")
        evaluation, text = check.run("eval.py agrees with the run", evaluate)
        m = re.search(r"Top-1 accuracy: ([0-9.]+)", text)
        evaluation.figures = {"eval_accuracy": float(m.group(1)) if m else None}
        sidecar = checkpoint.with_suffix(".json")
        want = json.loads(sidecar.read_text())["accuracy"] if sidecar.exists() else None
        evaluation.figures["run_accuracy"] = want
        if m is None or want is None or abs(float(m.group(1)) - want) > 1e-4:
            evaluation.status = "failed"
            evaluation.problems.append(f"eval.py gives {m and m.group(1)}, the run {want}")

    # fp16 (dynamic loss scale): stopped by SIGTERM once a last state is saved, then resumed.
    name = "check-fp16"
    step, limit = check.start("train fp16, SIGTERM", command(name, "fp16"))
    if limit is not None:
        began = time.monotonic()
        proc = check.popen(step.command)
        state = out / f"{name}_last.pt"
        while proc.poll() is None and time.monotonic() - began < limit:
            saved = last_state_step(state)
            if saved is not None and saved >= plan.stop_after:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        check.finish(step, proc, limit, began)
        step.figures = {"stopped_at": last_state_step(state)}
        expected = 128 + signal.SIGTERM
        if step.status == "not run":
            step.status = "passed" if step.returncode == expected else "failed"
            if step.returncode != expected:
                step.problems.append(f"exit code {step.returncode}, not {expected}")
        stopped = step.figures["stopped_at"]
        if stopped is None or stopped >= plan.num_steps:
            step.status = "failed"
            step.problems.append("not stopped before the end of the run")
    step, output = check.run("train fp16, --resume", command(name, "fp16", "--resume"))
    step.figures = train_summary(output)
    if step.status == "passed" and step.figures.get("step") != plan.num_steps:
        step.status = "failed"
        step.problems.append(f"the resumed run ended at step {step.figures.get('step')}")


def image_folder_run(check: Check, plan: Plan, python: str) -> None:
    """Train on an image folder of real JPEGs with the plan's workers, as the first bf16 run
    trained on digits held in memory (the same model, size, batch and precision): once warm,
    the two rates agree when the workers keep up, and the GPU stays busy (nvidia-smi's
    utilisation over the same steps)."""
    photos = check.scratch / "photos"
    make = [python, "tools/make_photo_folder.py", str(photos), "--images", str(plan.folder_images)]
    step, _ = check.run("image folder: JPEGs", make)
    command = [
        *(python, "train.py", "--name", "check-folder", "--precision", "bf16", *plan.folder),
        *("--data_dir", str(photos), "--num_steps", str(plan.folder_steps)),
        *("--output_dir", str(check.scratch / "runs")),
        *("--log_dir", str(check.scratch / "logs" / "check-folder")),
    ]
    if step.status != "passed":
        check.skip("train image folder", command, "no image folder was written")
        return
    with GpuUtilisation() as gpu:
        step, output = check.run("train image folder", command)
    rate, start, end = steady_rate(check.lines)
    in_memory = next(
        (s.figures.get("steady_img_s") for s in check.steps if s.name == "train bf16"), None
    )
    step.figures = {
        **train_summary(output),
        "workers": int(_flag(plan.folder, "--num_workers")),
        "steady_img_s": rate,
        "in_memory_steady_img_s": in_memory,
        "over_in_memory": _ratio(rate, in_memory),
        "gpu_util_pct": gpu.median(start, end),
    }
    if step.status == "passed" and rate is None:
        step.status = "failed"
        step.problems.append("no progress line in the second half of the run")


def versions(plan: Plan) -> dict:
    import torch

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": "cpu (dry run)",
    }
    if plan.device == "cuda":
        info["device"] = torch.cuda.get_device_name(0)
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def _flag(argv: tuple[str, ...], name: str) -> str:
    return argv[argv.index(name) + 1]


def projections(steps: list[Step], plan: Plan) -> dict:
    """Wall time of the headline run (10,000 x 512 images) at the measured training rates."""
    rates = {}
    for step in steps:
        if step.name.startswith("bench") and "train_img_s" in step.figures:
            s = step.figures["settings"]
            basis = (
                f"bench.py, ours, {s['model_type']} @ {s['img_size']}, {s['dtype']}: the "
                "training step alone (no data loading, evaluation or saving)"
            )
            rates[basis] = step.figures["train_img_s"]["ours"]
        if step.name == "train bf16" and "train_img_s" in step.figures:
            model, size = _flag(plan.train, "--model_type"), _flag(plan.train, "--img_size")
            basis = (
                f"train.py's loop, {model} @ {size}, bf16: its summary's images/s (data "
                "loading, last-state saves and compiling included, evaluation left out)"
            )
            rates[basis] = step.figures["train_img_s"]
    return {
        basis: {
            "train_img_s": rate,
            "hours": HEADLINE_IMAGES / rate / 3600,
            "original_port_over_this": ORIGINAL_PORT_SECONDS / (HEADLINE_IMAGES / rate),
        }
        for basis, rate in rates.items()
        if rate
    }


def summary_markdown(report: dict) -> str:
    lines = [
        f"# GPU check: {report['versions']['device']}",
        "",
        f"torch {report['versions']['torch']}, CUDA {report['versions']['cuda']}; "
        f"{report['passed']} of {len(report['steps'])} steps passed in "
        f"{report['seconds']:.0f} s (budget {report['budget_s']:.0f} s).",
        "",
        "| step | status | s | figures | command |",
        "|---|---|---|---|---|",
    ]
    for step in report["steps"]:
        shown = {k: v for k, v in step["figures"].items() if k not in ("settings", "data_pipeline")}
        note = "; ".join(step["problems"])
        lines.append(
            f"| {step['name']} | {step['status']}{': ' + note if note else ''} "
            f"| {step['seconds']:.0f} | `{json.dumps(shown, default=str)}` "
            f"| `{shlex.join(step['command'])}` |"
        )
    if report["projections"]:
        lines += ["", "Projected wall time of 10,000 steps x 512 images:"]
        for basis, p in report["projections"].items():
            lines.append(
                f"- {basis}: {p['train_img_s']:.0f} img/s -> {p['hours']:.2f} h "
                f"(3 h 13 min / this = {p['original_port_over_this']:.2f})"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same steps on a CPU, tiny sizes")
    p.add_argument(
        "--out",
        default=os.environ.get("OUT") or "gpu_check",
        help="output folder (default: $OUT, else ./gpu_check)",
    )
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    sys.path.insert(0, str(REPO))
    import torch

    plan = DRY_RUN if args.dry_run else GPU
    if plan.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check.py: no CUDA GPU is visible. Run it on a CUDA machine, or pass --dry-run.",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        check = Check(out, args.budget, Path(scratch))
        pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        for name, selection in (
            ("pytest: CUDA tests", plan.pytest_cuda),
            ("pytest: fast selection", plan.pytest_fast),
        ):
            step, output = check.run(name, [*pytest, *selection])
            step.figures = pytest_counts(output)
        help_text = subprocess.run(
            [python, "bench.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
        ).stdout
        extra = ["--grad_checkpointing"] if "--grad_checkpointing" in help_text else []
        for bench_args in plan.bench:
            size = bench_args[bench_args.index("--img_size") + 1]
            result = Path(scratch) / f"bench_{size}.json"
            step, _ = check.run(
                f"bench {size}", [python, "bench.py", *bench_args, *extra, "--out", str(result)]
            )
            if step.status == "passed":
                step.figures = bench_figures(result)
        train_runs(check, plan, python)
        image_folder_run(check, plan, python)
        check.log.close()
    report = {
        "versions": versions(plan),
        "dry_run": args.dry_run,
        "budget_s": args.budget,
        "seconds": time.monotonic() - began,
        "passed": sum(step.status == "passed" for step in check.steps),
        "steps": [vars(step) for step in check.steps],
        "projections": projections(check.steps, plan),
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(summary_markdown(report))
    print(summary_markdown(report))
    return 0 if report["passed"] == len(check.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
