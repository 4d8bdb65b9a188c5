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
