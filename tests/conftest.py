"""Suite-wide guards."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Every model in the suite is tiny: a second OpenMP thread gains nothing on millisecond matmuls,
    and on a busy 2-core machine threads spin-waiting on each other make steps 10-30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _grad_mode_is_restored():
    """A command run in-process must not leave autograd switched off for the tests after it."""
    yield
    assert torch.is_grad_enabled(), "this test left torch.set_grad_enabled(False) behind"
