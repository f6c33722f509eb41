"""Suite-wide guards."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _grad_mode_is_restored():
    """A command run in-process must not leave autograd switched off for the tests after it."""
    yield
    assert torch.is_grad_enabled(), "this test left torch.set_grad_enabled(False) behind"
