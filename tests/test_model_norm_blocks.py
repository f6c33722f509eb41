"""RMSNormFunction's backward over row blocks (several blocks, the last one partial) against autograd
through the plain formula in fp64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanoseek.model.layers import RMSNormFunction


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_backward_in_row_blocks(dtype, monkeypatch):
    torch.manual_seed(0)
    D = 64
    monkeypatch.setattr(RMSNormFunction, "BLOCK_ELEMS", 3 * D)    # 3 rows per block: 5 x 7 = 35 rows -> 12 blocks
    x = (2 * torch.randn(5, 7, D)).to(dtype)
    w = 1 + 0.3 * torch.randn(D)
    g = torch.randn(5, 7, D).to(dtype)
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    dx, dw = torch.autograd.grad(RMSNormFunction.apply(xb, wb, 1e-6, dtype), (xb, wb), g)
    assert dx.dtype == dtype and dw.dtype == torch.float32 and dx.shape == x.shape
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    rdx, rdw = torch.autograd.grad(wd * F.rms_norm(xd, (D,), eps=1e-6), (xd, wd), g.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, r in ((dx, rdx), (dw, rdw)):
        assert (a.double() - r).abs().max() < tol * r.abs().max()
