"""linear_logprobs (the GRPO update's fused head + log-softmax) against F.linear + log_softmax."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.train.rl_forward import LinearLogprobs, _ticket, linear_logprobs


def reference(h, w, t):
    lp = torch.log_softmax(F.linear(h, w).float(), dim=-1)
    return lp.gather(-1, t[..., None])[..., 0], -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("keep", [True, False])        # the forward's probabilities kept, or recomputed
@pytest.mark.parametrize("rows", [4, 300])            # one block, and several (ROWS = 256) with a ragged end
def test_logprobs_entropy_and_gradients_match_the_reference(rows, keep, monkeypatch):
    monkeypatch.setattr(LinearLogprobs, "KEEP_MAX", LinearLogprobs.KEEP_MAX if keep else 0)
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


@pytest.mark.parametrize("keep", [True, False])
def test_gradcheck_in_double(keep):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (5,), generator=g)
    assert torch.autograd.gradcheck(lambda h, w: LinearLogprobs.apply(h, w, t, keep)[0], (h, w))


def test_two_forwards_before_their_backwards_each_get_their_own_gradients():
    """The kept probabilities live in one reused buffer: a second forward takes it over, and the first
    forward's backward must then recompute (not read the second's probabilities)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(30, 8, generator=g, requires_grad=True)
    hs = [torch.randn(20, 8, generator=g, requires_grad=True) for _ in range(2)]
    ts = [torch.randint(0, 30, (20,), generator=g) for _ in range(2)]
    outs = [linear_logprobs(h, w, t)[0] for h, t in zip(hs, ts)]
    for o in outs:                                     # the first forward's backward first: its buffer is stale
        o.sum().backward()
    got = [h.grad.clone() for h in hs] + [w.grad.clone()]
    for h in hs:
        h.grad = None
    w.grad = None
    for h, t in zip(hs, ts):
        reference(h, w, t)[0].sum().backward()
    for a, b in zip(got, [h.grad for h in hs] + [w.grad]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_a_forward_without_grad_leaves_the_kept_probabilities_alone():
    """Only a forward that will have a backward keeps its probabilities: a no-grad forward (an old
    log-probs pass) between a forward and its backward must not take the buffer."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(20, 8, generator=g, requires_grad=True)
    w = torch.randn(30, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 30, (20,), generator=g)
    ticket = _ticket()
    logp = linear_logprobs(h, w, t)[0]
    assert _ticket() == ticket + 1                    # this forward kept its probabilities
    with torch.no_grad():
        linear_logprobs(torch.randn(20, 8, generator=g), w, t)
    assert _ticket() == ticket + 1                    # the no-grad one did not
    logp.sum().backward()
    dh, dw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    reference(h, w, t)[0].sum().backward()
    assert torch.allclose(dh, h.grad, atol=1e-5) and torch.allclose(dw, w.grad, atol=1e-5)
