"""linear_logprobs (the GRPO update's fused head + log-softmax) against F.linear + log_softmax."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.train.rl_forward import LinearLogprobs, linear_logprobs


def reference(h, w, t):
    lp = torch.log_softmax(F.linear(h, w).float(), dim=-1)
    return lp.gather(-1, t[..., None])[..., 0], -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("rows", [4, 300])            # one block, and several (ROWS = 256) with a ragged end
def test_logprobs_entropy_and_gradients_match_the_reference(rows):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, rows, 16, generator=g, requires_grad=True)
    w = (torch.randn(50, 16, generator=g) * 2).requires_grad_()   # peaked distributions too
    t = torch.randint(0, 50, (2, rows), generator=g)
    up = torch.randn(2, rows, generator=g)                         # a per-token upstream gradient
    logp, ent = linear_logprobs(h, w, t)
    assert logp.shape == ent.shape == t.shape and not ent.requires_grad
    (logp * up).sum().backward()
    dh, dw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref_lp, ref_ent = reference(h, w, t)
    (ref_lp * up).sum().backward()
    assert torch.allclose(logp, ref_lp, atol=1e-5)
    assert torch.allclose(ent, ref_ent.detach(), atol=1e-4)
    assert torch.allclose(dh, h.grad, atol=1e-4, rtol=1e-4) and torch.allclose(dw, w.grad, atol=1e-4, rtol=1e-4)


def test_under_bf16_autocast_the_matmuls_run_in_bf16_and_the_softmax_in_fp32():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(40, 32, generator=g, requires_grad=True)
    w = torch.randn(64, 32, generator=g, requires_grad=True)
    t = torch.randint(0, 64, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, ent = linear_logprobs(h, w, t)
        ref_lp, ref_ent = reference(h, w, t)           # F.linear in bf16 under autocast, softmax in fp32
    assert logp.dtype == torch.float32
    assert torch.allclose(logp, ref_lp, atol=1e-4) and torch.allclose(ent, ref_ent, atol=1e-3)
    logp.sum().backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32 and h.grad.abs().sum() > 0


def test_gradcheck_in_double():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (5,), generator=g)
    assert torch.autograd.gradcheck(lambda h, w: LinearLogprobs.apply(h, w, t)[0], (h, w))
