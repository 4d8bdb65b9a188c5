"""`--grad_checkpointing`: the encoder blocks run again in the backward pass instead of keeping
their activations. Oracles: the same model without it (gradients, a fine-tuning step, a resumed
run), the op-by-op count of live tensor bytes, and the memory plan driven with a small budget."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import train
from models.configs import ResNetConfig, get_config
from models.modeling import Block, VisionTransformer
from tests.helpers import expect_user_error, fake_checkpoint, free_port, script_error, tiny_args
from utils.infra import memory
from utils.infra.file_io import safe_load, save_npz
from utils.infra.memory import LiveTensorBytes, MemoryFit, measure_memory
from utils.infra.train_state import last_state_path

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")

# Dropout everywhere it exists (embeddings, attention probabilities, block and MLP outputs).
PLAIN = get_config("testing").replace(num_layers=3, attention_dropout_rate=0.1)
HYBRID = PLAIN.replace(
    hidden_size=32, mlp_dim=64, num_heads=4, patch_size=(1, 1), resnet=ResNetConfig((1, 1))
)


def gradients(model: VisionTransformer, images, labels, seed: int) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(images, labels).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def block_calls(model: VisionTransformer) -> list[int]:
    """Counts the calls of every encoder block (a forward pre-hook on each)."""
    calls = [0]
    for block in model.encoder.blocks:
        block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("config", [PLAIN, HYBRID], ids=["plain", "hybrid"])
def test_gradients_equal_with_dropout(config) -> None:
    torch.manual_seed(0)
    model = VisionTransformer(config, 32, num_classes=5).train()
    torch.nn.init.normal_(model.head.weight, std=0.1)  # a non-zero head: every gradient flows
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    calls = block_calls(model)
    plain = gradients(model, images, labels, seed=1)
    assert calls[0] == config.num_layers
    model.set_grad_checkpointing(True)
    checkpointed = gradients(model, images, labels, seed=1)
    assert calls[0] == 3 * config.num_layers  # each block ran again in the backward pass
    diffs = {name: (plain[name] - g).abs().max().item() for name, g in checkpointed.items()}
    assert max(diffs.values()) <= 1e-6, diffs
    # Control: other dropout masks give other gradients, so the masks were reproduced.
    other = gradients(model, images, labels, seed=2)
    assert max((plain[n] - g).abs().max().item() for n, g in other.items()) > 1e-4


def test_gradients_equal_under_bf16_autocast() -> None:
    """The recomputation runs under the autocast state of the forward pass."""
    torch.manual_seed(0)
    model = VisionTransformer(PLAIN, 32, num_classes=5).train()
    torch.nn.init.normal_(model.head.weight, std=0.1)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = gradients(model, images, labels, seed=1)
        model.set_grad_checkpointing(True)
        checkpointed = gradients(model, images, labels, seed=1)
    assert max((plain[n] - g).abs().max().item() for n, g in checkpointed.items()) <= 1e-6


def test_not_used_outside_training() -> None:
    """Evaluation (eval mode or no_grad) runs each block once; the outputs are unchanged."""
    torch.manual_seed(0)
    model = VisionTransformer(PLAIN, 32, num_classes=5).eval()
    images = torch.randn(2, 3, 32, 32)
    want = model(images)[0]
    model.set_grad_checkpointing(True)
    calls = block_calls(model)
    got = model(images)[0]
    got.sum().backward()
    assert calls[0] == PLAIN.num_layers
    assert torch.equal(want, got)


def test_peak_memory_of_a_training_step_is_lower() -> None:
    """Measured op by op (LiveTensorBytes): 8 blocks, 64 images of 64x64 (17 tokens)."""
    config = get_config("testing").replace(num_layers=8, patch_size=(16, 16))
    torch.manual_seed(0)
    model = VisionTransformer(config, 64, num_classes=5).train()
    peaks = {}
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad(set_to_none=True)
        with LiveTensorBytes() as tracker:
            images, labels = torch.randn(64, 3, 64, 64), torch.randint(0, 5, (64,))
            model(images, labels).backward()
        peaks[checkpointing] = tracker.peak
    assert peaks[True] < 0.5 * peaks[False], peaks
    # The memory plan's own probe measures the same difference.
    model.set_grad_checkpointing(False)
    without = measure_memory(model, torch.device("cpu"), budget=2**40)
    model.set_grad_checkpointing(True)
    with_it = measure_memory(model, torch.device("cpu"), budget=2**40)
    # ... and predicts each peak from passes of 2 and 3 images.
    assert without.need(64) == pytest.approx(peaks[False], rel=1e-3)
    assert with_it.need(64) == pytest.approx(peaks[True], rel=1e-3)


def last_weights(out: Path, name: str) -> dict[str, torch.Tensor]:
    return safe_load(last_state_path(out, name))["model"]


def test_fine_tuning_steps_give_the_same_weights(tmp_path: Path) -> None:
    """train.py fine-tuning an official-layout checkpoint, dropout on, with and without."""
    assert get_config("testing").dropout_rate > 0
    path = tmp_path / "pretrained.npz"
    save_npz(path, fake_checkpoint(get_config("testing"), num_classes=7, img_size=32))
    common = {"num_steps": 3, "eval_every": 0, "learning_rate": 0.1, "pretrained_dir": path}
    train.main(tiny_args(tmp_path, name="plain", **common))
    train.main(tiny_args(tmp_path, name="ckpt", grad_checkpointing=True, **common))
    a, b = last_weights(tmp_path / "out", "plain"), last_weights(tmp_path / "out", "ckpt")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6
    assert a["head.weight"].abs().max() > 0  # the steps did train (the head starts at zero)
    args = train.parse_args(tiny_args(tmp_path, name="ckpt", grad_checkpointing=True, **common))
    assert train.build_model(args, "testing", 7).encoder.grad_checkpointing  # the flag reaches it


def test_resumed_run_equals_uninterrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """6 steps with checkpointing == a crash at step 5 (saved at 4) + --resume, dropout on."""
    common = {"num_steps": 6, "eval_every": 0, "save_every": 4, "grad_checkpointing": True}
    train.main(tiny_args(tmp_path, name="straight", **common))
    real = train.train_step

    def crashing(args, trainer, batches, guard, number, info):
        if number == 5:
            raise RuntimeError("simulated crash")
        return real(args, trainer, batches, guard, number, info)

    with monkeypatch.context() as patch:
        patch.setattr(train, "train_step", crashing)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train.main(tiny_args(tmp_path, name="resumed", **common))
    train.main(tiny_args(tmp_path, name="resumed", resume=True, **common))
    out = tmp_path / "out"
    a, b = safe_load(last_state_path(out, "straight")), safe_load(last_state_path(out, "resumed"))
    assert a["step"] == b["step"] == 6
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key
    for index, buffers in a["optimizer"]["state"].items():
        theirs = b["optimizer"]["state"][index]["momentum_buffer"]
        assert torch.equal(buffers["momentum_buffer"], theirs), index


# The `demo` model (17 tokens at 32x32): activations outweigh the input images.
PLAN_RUN = {"model_type": "demo", "train_batch_size": 64, "num_steps": 1, "eval_every": 0}


@pytest.mark.slow
def test_data_parallel_with_checkpointing_equals_without(tmp_path: Path) -> None:
    """torchrun, 2 processes on gloo, dropout on, 2 accumulation steps: the same weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    flags = {"num_steps": 3, "eval_every": 0, "gradient_accumulation_steps": 2, "num_workers": 1}
    for name, extra in (("plain", {}), ("ckpt", {"grad_checkpointing": True})):
        cmd = [
            sys.executable,
            *("-m", "torch.distributed.run", "--nproc_per_node", "2"),
            *("--master_addr", "127.0.0.1", "--master_port", str(free_port())),
            "train.py",
            *tiny_args(tmp_path, name=name, **flags, **extra),
        ]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = last_weights(tmp_path / "out", "plain"), last_weights(tmp_path / "out", "ckpt")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def plan_message(tmp_path, monkeypatch, capsys, budget: int, **flags) -> str:
    monkeypatch.setattr(memory, "available_bytes", lambda device: budget)
    argv = tiny_args(tmp_path, **PLAN_RUN, **flags)
    return expect_user_error(train.main, argv, capsys)


def probe(grad_checkpointing: bool) -> MemoryFit:
    """The plan runs' measured memory."""
    torch.manual_seed(0)
    model = VisionTransformer("demo", 32, num_classes=10).train()
    model.set_grad_checkpointing(grad_checkpointing)
    return measure_memory(model, torch.device("cpu"), budget=2**40)


def test_the_memory_plan_proposes_checkpointing_when_it_fits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A budget between the micro-batch's need with and without checkpointing."""
    without, with_it = probe(False), probe(True)
    need, need_ckpt = without.need(64), with_it.need(64)
    assert need_ckpt < 0.5 * need
    budget = int(1.05 * (need + need_ckpt) / 2 / 0.9)
    err = plan_message(tmp_path, monkeypatch, capsys, budget)
    assert "--grad_checkpointing (micro-batches of 64 as now" in err
    steps = int(re.search(r"--gradient_accumulation_steps (\d+) \(micro", err).group(1))
    assert steps > 1
    largest = int(re.search(r"micro-batches of up to (\d+) images fit", err).group(1))
    assert largest >= 64
    assert largest == with_it.largest_batch(0.9 * budget / 1.05)
    # Both proposals fit the same budget: the runs train.
    for name, extra in (
        ("ckpt", ["--grad_checkpointing"]),
        ("accumulated", ["--gradient_accumulation_steps", str(steps)]),
    ):
        argv = tiny_args(tmp_path, name=name, **PLAN_RUN)
        assert train.main([*argv, *extra]).step == 1


def test_the_memory_plan_with_checkpointing_needs_accumulation_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A budget smaller than 64 images with checkpointing: it proposes both together."""
    budget = int(probe(True).need(40) * 1.05 / 0.9)
    err = plan_message(tmp_path, monkeypatch, capsys, budget, grad_checkpointing=True)
    assert "with --grad_checkpointing" in err
    match = re.search(
        r"--grad_checkpointing --gradient_accumulation_steps 2 \(micro-batches of 32", err
    )
    assert match, err
    assert "micro-batches of up to 40 images fit" in err or "up to 39 images" in err


def test_the_largest_batch_the_plan_names_is_the_largest_its_margins_fit() -> None:
    """The options and the need check give one answer: a peak of max(1000 + 10 b, 400 + 30 b)
    bytes for b images plus 5 % fits 1700 bytes up to b = 40 (1680), not at 41 (1711.5)."""
    fit = MemoryFit(
        torch.tensor([1000.0, 400.0], dtype=torch.float64),
        torch.tensor([10.0, 30.0], dtype=torch.float64),
    )
    assert memory.largest_planned_batch(fit, 1700) == 40
    assert memory.planned_need(fit, 40) <= 1700 < memory.planned_need(fit, 41)
    options = memory.memory_options(
        {True: fit}, 1700, per_process=64, accumulation_steps=1, grad_checkpointing=True
    )
    assert "--grad_checkpointing --gradient_accumulation_steps 2 (micro-batches of 32" in options
    assert "micro-batches of up to 40 images fit" in options


def test_an_image_size_whose_probe_cannot_be_allocated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The probe's input alone exceeds the memory: nothing is allocated, one message."""
    err = plan_message(tmp_path, monkeypatch, capsys, 2**20, img_size=4096)
    assert "Not even one image at 4096x4096" in err
    assert "smaller --img_size" in err


def test_an_out_of_memory_step_proposes_what_fits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The device runs out of memory in the first step although the plan said it fits: the
    message is measured again and proposes checkpointing (the failed micro-batch excluded)."""
    real = Block.forward
    state = {"fail": True}

    def failing(self, *args, **kwargs):
        if state["fail"] and self.training and torch.is_grad_enabled():
            state["fail"] = False
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(train, "check_training_memory", lambda *a, **k: None)
    monkeypatch.setattr(Block, "forward", failing)
    err = plan_message(tmp_path, monkeypatch, capsys, 2**40)
    assert "ran out of memory on a micro-batch of 64 images" in err
    assert "--grad_checkpointing (micro-batches of 64 as now" in err
    assert "Traceback" not in err


# Runs a script under an address-space limit of what it has mapped after importing torch plus
# HEADROOM.
HEADROOM = 1536 * 2**20
LIMITED = """
import re, resource, runpy, sys
import torch  # mapped first: the limit leaves HEADROOM beyond what the run maps to start
size = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + {headroom}, resource.RLIM_INFINITY))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_limited(script: str, argv: list[str]) -> str:
    """The last line `script` writes to stderr; it must exit 2 without a traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    limited = ["-c", LIMITED.format(headroom=HEADROOM), script, *argv]
    return script_error(*limited, timeout=300, env=env).strip().splitlines()[-1]


@pytest.mark.slow
def test_an_address_space_limit_is_part_of_the_memory_plan(tmp_path: Path) -> None:
    """`ulimit -v`: the plan stops the run with one message (it used to pass, then the first
    step failed with a traceback from the allocator). The demo model's micro-batch of 512
    images at 224 needs about 4.6 GB."""
    argv = tiny_args(
        tmp_path, model_type="demo", img_size=224, train_batch_size=512, num_steps=1, eval_every=0
    )
    message = run_limited("train.py", argv)
    assert "A micro-batch of 512 images at 224x224 needs about 4." in message
    available = re.search(r"but about ([\d.]+) (GB|MB) are available", message)
    assert available.group(2) == "MB" or float(available.group(1)) < 1.5
    assert "--gradient_accumulation_steps" in message


@pytest.mark.slow
def test_an_image_size_whose_probe_cannot_be_allocated_in_a_process(tmp_path: Path) -> None:
    """One image at 16384x16384 is 3 GB: train.py's probe, and eval.py's batch, used to fail in
    the allocator with a traceback; now nothing that large is allocated."""
    argv = tiny_args(tmp_path, img_size=16384, train_batch_size=2, num_steps=1, eval_every=0)
    message = run_limited("train.py", argv)
    assert message.startswith("error: Not even one image at 16384x16384"), message
    assert "smaller --img_size" in message
    path = tmp_path / "model.npz"
    save_npz(path, fake_checkpoint(get_config("testing"), num_classes=10, img_size=32))
    argv = [f"--checkpoint={path}", "--model_type=testing", "--img_size=16384"]
    argv += ["--dataset=digits", f"--data_dir={tmp_path / 'data'}", "--num_workers=0"]
    message = run_limited("eval.py", argv)
    assert message.startswith("error: Not even one image at 16384x16384 fits for evaluation")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["eval.py", "predict.py"])
def test_weights_that_cannot_be_allocated_are_one_message(tmp_path: Path, script: str) -> None:
    """At 1000000x1000000 the position embeddings of the tiny `testing` model are 250 GB: the
    scripts used to allocate them before any memory check, a traceback from `empty()`."""
    path = tmp_path / "model.npz"
    save_npz(path, fake_checkpoint(get_config("testing"), num_classes=10, img_size=32))
    argv = [f"--checkpoint={path}", "--model_type=testing", "--img_size=1000000"]
    if script == "eval.py":
        argv += ["--dataset=digits", f"--data_dir={tmp_path / 'data'}", "--num_workers=0"]
    else:
        Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
        argv += [f"--image={tmp_path / 'x.png'}"]
    message = run_limited(script, argv)
    assert message.startswith("error: The weights of testing at 1000000x1000000 need about 2"), (
        message
    )
    assert "GB are available; use a smaller --img_size." in message
