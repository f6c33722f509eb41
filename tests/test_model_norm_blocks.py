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
    monkeypatch.setattr(RMSNormFunction, "BLOCK_ELEMS", 2 * D)    # 2 rows per block: 5 x 7 = 35 rows -> 18 blocks
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_forward_in_row_blocks_is_the_whole_tensor_result(dtype, monkeypatch):
    # every row's numbers do not depend on the block it is computed in: bit for bit F.rms_norm
    torch.manual_seed(0)
    D = 64
    monkeypatch.setattr(RMSNormFunction, "BLOCK_ELEMS", 2 * D)
    x = (2 * torch.randn(5, 7, D)).to(dtype)
    w = 1 + 0.3 * torch.randn(D)
    want = F.rms_norm(x.float(), (D,), w, eps=1e-6)
    for out in (None, torch.bfloat16):
        y = RMSNormFunction.apply(x, w, 1e-6, out)
        assert y.shape == x.shape and y.dtype == (out or torch.float32)
        assert torch.equal(y, want if out is None else want.to(out))
