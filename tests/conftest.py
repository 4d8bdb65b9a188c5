"""Shared fixtures."""

import pytest
import torch

from models import configs
from models.configs import get_config


@pytest.fixture
def one_thread():
    """Run on one intra-op thread, like the subprocesses the tests start (OMP_NUM_THREADS=1).

    Tiny models run fastest so on a busy shared CPU, and in-process and subprocess runs then do
    bit-identical arithmetic.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_dropout(monkeypatch: pytest.MonkeyPatch) -> str:
    """Register the `testing` model without dropout, so runs are comparable weight for weight."""
    name = "testing-nodrop"
    monkeypatch.setitem(
        configs.CONFIGS, name, get_config("testing").replace(name=name, dropout_rate=0.0)
    )
    return name


@pytest.fixture
def best_checkpoint(tmp_path):
    """Save a model as train.py's `save_best` does: a state-dict `.bin` and its `.json` sidecar
    (with the `.bin`'s SHA-256), or the `.bin` alone.

    Returns a function `(model, name="run", sidecar=True, **facts) -> Path`; `facts` (dataset,
    class_names, ...) go into the sidecar with the model type, image size and class count.
    """
    from utils.infra.file_io import atomic_save, save_checkpoint

    def save(model, name: str = "run", sidecar: bool = True, **facts):
        path = tmp_path / "output" / f"{name}_checkpoint.bin"
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if not sidecar:
            atomic_save(state, path)
            return path
        save_checkpoint(
            state,
            path,
            model_type=model.config.name,
            img_size=list(model.img_size),
            num_classes=model.num_classes,
            **{"step": 10, "accuracy": 0.5, "precision": "fp32", **facts},
        )
        return path

    return save


@pytest.fixture
def tf32_switches():
    """Put torch's TF32 switches back as they were after the test: they are process-wide, and
    `utils.recipe.amp.set_tf32` sets them."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
