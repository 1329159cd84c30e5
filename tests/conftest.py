"""Fixtures every test module gets."""
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are small: one thread avoids thread-pool contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def rank0(monkeypatch):
    """Writers check RANK: a test runs as rank 0 unless it sets RANK itself."""
    monkeypatch.delenv("RANK", raising=False)
