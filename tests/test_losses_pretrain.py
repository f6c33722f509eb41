"""Pretraining losses against small cases computed by hand."""

import math
from contextlib import nullcontext

import torch

from nanoseek.train.losses import bias_update, cross_entropy, expert_counts, mtp_loss, sequence_balance_loss


def peaked(targets: torch.Tensor, V: int, margin: float) -> torch.Tensor:
    """Logits (..., V) with `margin` on the target and 0 elsewhere: CE = log(1 + (V-1) e^-margin)."""
    return torch.nn.functional.one_hot(targets, V).float() * margin


def test_cross_entropy_ignore_index_by_hand():
    V = 5
    labels = torch.tensor([[1, -100, 3, -100]])
    logits = torch.zeros(1, 4, V)
    logits[0, 0, 1] = 2.0          # position 0: peaked on its label
    logits[0, 1] = 100.0           # ignored positions may hold anything
    ce = cross_entropy(logits, labels)
    want = (math.log(1 + (V - 1) * math.exp(-2.0)) + math.log(V)) / 2
    assert abs(ce.item() - want) < 1e-6
    assert cross_entropy(logits, torch.full((1, 4), -100)).item() == 0.0   # all ignored: 0, not NaN


def test_cross_entropy_equals_torch_with_gradients():
    # the custom forward/backward against F.cross_entropy: values and gradients, ignored labels,
    # large logits (logsumexp must not overflow), rows not a multiple of the row block, bf16 logits
    torch.manual_seed(0)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        logits = (torch.randn(3, 101, 37, dtype=torch.float64) * 30).to(dtype).requires_grad_()
        labels = torch.randint(0, 37, (3, 101))
        labels[0, :5] = -100
        labels[2, 50:] = -100
        ours = cross_entropy(logits, labels)
        (g_ours,) = torch.autograd.grad(ours, logits)
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 37).double(), labels.reshape(-1), ignore_index=-100)
        (g_ref,) = torch.autograd.grad(ref, logits)
        assert abs(ours.item() - ref.item()) < 1e-5 * ref.item()      # computed in fp32 whatever the input
        assert g_ours.dtype == dtype
        assert (g_ours.double() - g_ref).abs().max() < (1e-7 if dtype != torch.bfloat16 else 1e-4)
        assert (g_ours.reshape(-1, 37)[labels.reshape(-1) == -100] == 0).all()


def test_mtp_loss_shifts_labels_by_depth():
    V, T, lam = 11, 6, 0.3
    tokens = torch.arange(T + 1)[None]              # distinct tokens 0..T
    y = tokens[:, 1:]                               # main targets: y[i] = token i+1
    m = 3.0
    # depth k at position i must predict token i+1+k = y[i+k]: depth 1 tokens 2.., depth 2 tokens 3..
    d1 = peaked(tokens[:, 2:], V, m)                # (1, T-1, V)
    d2 = peaked(tokens[:, 3:], V, m)                # (1, T-2, V)
    got = mtp_loss([d1, d2], y, lam)
    want = lam / 2 * 2 * math.log(1 + (V - 1) * math.exp(-m))
    assert abs(got.item() - want) < 1e-6
    # the same logits scored against the labels of another depth would be far worse: the shift matters
    for d, wrong_labels in ((d1, y[:, :-1]), (d2, y[:, 1:-1]), (d2, y[:, :-2])):
        assert cross_entropy(d, wrong_labels).item() > math.log(1 + (V - 1) * math.exp(-m)) + 1.0
    assert mtp_loss([], y, lam).item() == 0.0


def test_sequence_balance_loss_by_hand():
    alpha = 0.01
    # one sequence, T=2 tokens, E=4 experts, K=1
    s = torch.tensor([[0.5, 0.3, 0.1, 0.1],
                      [0.2, 0.2, 0.4, 0.2]])
    idx = torch.tensor([[0], [2]])
    # f = E/(K T) * counts = 2 * [1, 0, 1, 0]; P = column means of row-normalized s = [.35, .25, .25, .15]
    want = alpha * (2 * 0.35 + 2 * 0.25)
    assert abs(sequence_balance_loss(s, idx, 1, alpha).item() - want) < 1e-7
    # sigmoid scores do not sum to 1: the loss normalizes over all experts, so scaling a row changes nothing
    s2 = s.clone()
    s2[1] *= 1.7
    assert abs(sequence_balance_loss(s2, idx, 1, alpha).item() - want) < 1e-7
    # two sequences: the mean of the per-sequence losses (uniform scores, balanced routing gives alpha)
    s_b = torch.cat([s, torch.full((2, 4), 0.25)])
    idx_b = torch.cat([idx, torch.tensor([[1], [3]])])
    got = sequence_balance_loss(s_b, idx_b, 2, alpha).item()
    assert abs(got - (want + alpha * (2 * 0.25 + 2 * 0.25)) / 2) < 1e-7


def test_balance_loss_gradient_lowers_the_overloaded_expert():
    logits = torch.zeros(8, 4, requires_grad=True)
    idx = torch.zeros(8, 1, dtype=torch.long)       # every token on expert 0
    sequence_balance_loss(logits.sigmoid(), idx, 2, 1.0).backward()
    assert (logits.grad[:, 0] > 0).all()             # descent lowers expert 0's score
    assert (logits.grad[:, 1:] < 0).all()


def test_bias_update_sign_rule():
    counts = expert_counts(torch.tensor([[0, 0], [0, 1], [2, 3], [0, 2], [3, 0]]), 4)
    assert counts.tolist() == [5.0, 1.0, 2.0, 2.0]   # mean 2.5
    delta = bias_update(counts, 1e-3)
    assert torch.allclose(delta, torch.tensor([-1e-3, 1e-3, 1e-3, 1e-3]))
    assert bias_update(torch.full((4,), 3.0), 1e-3).abs().sum() == 0   # balanced: nothing moves


def test_linear_cross_entropy_equals_head_then_cross_entropy():
    # the head fused with the loss, row block by row block, against F.linear + F.cross_entropy:
    # loss and gradients for h and the head, ignored labels, rows not a multiple of the block,
    # a label far below the best logit (p underflows: the logsumexp fallback), fp32 tight, bf16 autocast loose
    from nanoseek.train.losses import LinearCrossEntropy, linear_cross_entropy
    torch.manual_seed(0)
    F = torch.nn.functional
    N, D, V = 300, 16, 37
    h0 = torch.randn(3, N // 3, D, dtype=torch.float64)
    w0 = torch.randn(V, D, dtype=torch.float64)
    labels = torch.randint(0, V, (3, N // 3))
    labels[0, :5] = -100
    labels[2, 50:] = -100
    h0[1, 0] = w0[0] * -20 + w0[1] * 20              # label 0 of row (1, 0) trails the best logit by far
    labels[1, 0] = 0
    old_rows = LinearCrossEntropy.ROWS
    LinearCrossEntropy.ROWS = 64
    try:
        for dtype in (torch.float32, torch.bfloat16):
            h, w = h0.float().requires_grad_(), w0.float().requires_grad_()
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
            with ctx:
                ours = linear_cross_entropy(h, w, labels)
            gh, gw = torch.autograd.grad(ours, (h, w))
            hd, wd = h0.clone().requires_grad_(), w0.clone().requires_grad_()
            ref = F.cross_entropy(F.linear(hd, wd).reshape(-1, V), labels.reshape(-1), ignore_index=-100)
            rh, rw = torch.autograd.grad(ref, (hd, wd))
            assert torch.isfinite(ours) and gh.dtype == gw.dtype == torch.float32
            if dtype == torch.float32:
                assert abs(ours.item() - ref.item()) < 1e-5 * ref.item()
                assert (gh.double() - rh).abs().max() < 1e-6 and (gw.double() - rw).abs().max() < 1e-6
            else:   # matmuls in bf16: logits rounded, gradients rounded
                assert abs(ours.item() - ref.item()) < 2e-2 * ref.item()
                assert (gh.double() - rh).abs().max() < 2e-2 * rh.abs().max()
                assert (gw.double() - rw).abs().max() < 2e-2 * rw.abs().max()
            assert (gh.reshape(-1, D)[labels.reshape(-1) == -100] == 0).all()
        with torch.no_grad():                         # eval: the loss only, the same number
            assert abs(linear_cross_entropy(h0.float(), w0.float(), labels).item() - ref.item()) < 1e-5 * ref.item()
    finally:
        LinearCrossEntropy.ROWS = old_rows


def test_model_head_false_with_linear_cross_entropy_equals_logits_loss():
    from nanoseek.model import ModelConfig, Transformer
    from nanoseek.train.losses import linear_cross_entropy
    torch.manual_seed(0)
    m = Transformer(ModelConfig(num_nextn_predict_layers=1))
    m.init_weights(0.1)
    ids = torch.randint(0, m.config.vocab_size, (2, 24))
    out = m(ids, return_mtp=True)
    normed = m(ids, return_mtp=True, head=False)
    assert normed["logits"].shape == (2, 24, m.config.hidden_size)
    a = cross_entropy(out["logits"][:, :-1], ids[:, 1:])
    b = linear_cross_entropy(normed["logits"][:, :-1], m.head.weight, ids[:, 1:])
    assert abs(a.item() - b.item()) < 1e-5
    y = ids[:, 1:]
    a = mtp_loss([lg[:, :-1] for lg in out["mtp_logits"]], y, 0.3)
    b = mtp_loss([h[:, :-1] for h in normed["mtp_logits"]], y, 0.3, head_weight=m.head.weight)
    assert abs(a.item() - b.item()) < 1e-5
