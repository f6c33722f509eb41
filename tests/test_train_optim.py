"""Optimizer behaviour the rest of the package relies on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nanoseek.model.layers import derived
from nanoseek.train.optim import build_optimizer


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_step_invalidates_derived_weight_copies(name):
    # the decode path caches copies of weights (packed, split) keyed on the weight's version: an
    # optimizer step must make the next lookup recompute them (torch's fused AdamW alone does not
    # bump the version, and an engine sharing the model with its trainer decoded with stale weights)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    opt = build_optimizer(model, name, lr=0.1, weight_decay=0.0)
    w = model[1].weight
    before = derived((w,), "test-copy", lambda t: t.detach().clone())
    model(torch.randn(4, 8)).square().sum().backward()
    opt.step()
    assert not torch.equal(w.detach(), before)                    # the step changed the weight
    after = derived((w,), "test-copy", lambda t: t.detach().clone())
    assert torch.equal(after, w.detach())
