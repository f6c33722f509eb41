"""The training dispatch of the routed experts (Experts._grouped_train: padded expert slices, fused
w1|w3) against the plain loop over experts, in fp32 and under bf16 autocast, with gradients."""

from __future__ import annotations

import pytest
import torch

from nanoseek.model import ModelConfig
from nanoseek.model.moe import Experts, MoE


def test_padded_row_counts():
    for c in range(0, 3000):
        p = Experts._padded(c)
        assert c <= p <= c + max(7, c // 8)                      # at most an eighth more (8 rows for small c)
        assert p % 8 == 0
    # few distinct counts per octave: the point of the padding (matmul kernels built per shape)
    assert len({Experts._padded(c) for c in range(512, 1024)}) <= 16


@pytest.mark.parametrize("autocast", [False, True])
def test_grouped_train_equals_loop(autocast):
    torch.manual_seed(0)
    cfg = ModelConfig(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    x = torch.randn(300, cfg.hidden_size)        # ~75 slots per expert: most slices need padding rows
    leaves = (moe.experts.w1, moe.experts.w2, moe.experts.w3, moe.gate.weight)
    results = []
    for reference in (False, True):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            r = moe.gate(xi)
            y = (moe.experts.forward_reference if reference else moe.experts)(xi, r)
        assert y.dtype == torch.float32                           # summed in fp32 either way
        grads = torch.autograd.grad(y.float().square().sum(), (xi, *leaves))
        results.append((y.detach(), grads))
    (y, g), (y_ref, g_ref) = results
    counts = torch.bincount(moe.gate(x).indices.flatten(), minlength=16).tolist()
    if autocast:
        assert any(Experts._padded(c) != c for c in counts)       # the padding was exercised
    tol = 2e-2 if autocast else 1e-5
    assert (y - y_ref).abs().max() <= tol * y_ref.abs().max()
    for a, b in zip(g, g_ref):
        assert a.dtype == b.dtype
        assert (a - b).abs().max() <= tol * b.abs().max()


def test_router_runs_in_fp32_under_bf16_autocast():
    """Gate logits and scores in fp32 (DeepSeek's and HF's rule): autocast ran F.linear in bf16 despite the
    fp32 inputs, which flipped the experts of ~1% of tokens."""
    from nanoseek.model import Transformer
    torch.manual_seed(0)
    m = Transformer(ModelConfig())
    m.init_weights()
    gate = next(b.ffn.gate for b in m.layers if isinstance(b.ffn, MoE))
    x = torch.randn(4096, m.config.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = gate(x)
    ref = gate(x)
    assert r.weights.dtype == torch.float32
    assert torch.equal(r.weights, ref.weights) and torch.equal(r.indices, ref.indices) and r.scores.dtype == torch.float32
