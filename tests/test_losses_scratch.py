"""Scratch buffers reused between calls (model.workspace) and the fused head + loss that uses them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.model.workspace import scratch
from nanoseek.train.losses import linear_cross_entropy


def test_scratch_reuses_and_grows():
    a = scratch("test-a", (4, 8), torch.float32, torch.device("cpu"))
    b = scratch("test-a", (2, 8), torch.float32, torch.device("cpu"))
    assert b.data_ptr() == a.data_ptr() and b.shape == (2, 8) and b.is_contiguous()
    c = scratch("test-b", (2, 8), torch.float32, torch.device("cpu"))
    assert c.data_ptr() != a.data_ptr()                            # another tag, other memory
    d = scratch("test-a", (64, 8), torch.float32, torch.device("cpu"))
    assert d.shape == (64, 8)                                      # grown
    e = scratch("test-a", (4, 8), torch.bfloat16, torch.device("cpu"))
    assert e.dtype == torch.bfloat16


def test_linear_cross_entropy_repeated_calls_of_other_sizes():
    # the logits-gradient and block buffers are shared by every call: calls of different row counts
    # in a row (main CE, then the shorter MTP depths, then the next step) must each be right
    torch.manual_seed(0)
    V, D = 300, 16
    w = torch.randn(V, D, requires_grad=True)
    for n in (700, 130, 700, 5):
        h = torch.randn(n, D, requires_grad=True)
        y = torch.randint(0, V, (n,))
        ours = linear_cross_entropy(h, w, y)
        g = torch.autograd.grad(ours, (h, w))
        ref = F.cross_entropy(F.linear(h, w), y)
        rg = torch.autograd.grad(ref, (h, w))
        assert (ours - ref).abs() < 1e-5
        for a, b in zip(g, rg):
            assert (a - b).abs().max() < 1e-5
