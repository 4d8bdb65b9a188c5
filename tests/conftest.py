"""Shared fixtures."""

import pytest
import torch


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
