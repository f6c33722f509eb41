"""Sampling pure functions: each filter on hand-made rows, penalties against hand-computed numbers,
the exponential race and the speculative-sampling rule against their target distributions."""

import math
from types import SimpleNamespace

import pytest
import torch

from nanoseek.infer import sampling as smp

INF = float("inf")


def params(**kw):
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                frequency_penalty=0.0, presence_penalty=0.0)
    return SimpleNamespace(**{**base, **kw})


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 3.0]])
    counts = torch.tensor([[2, 1, 0, 0, 0]])          # generated: token 0 twice, token 1 once
    prompt = torch.tensor([[False, False, True, False, False]])
    one, zero = torch.ones(1), torch.zeros(1)
    rep = smp.apply_penalties(logits, counts, prompt, torch.tensor([2.0]), zero, zero)
    # CTRL: seen positive logits divided, seen negative ones multiplied; unseen untouched
    assert rep.tolist() == [[1.0, -4.0, 0.5, 0.5, 3.0]]
    oa = smp.apply_penalties(logits, counts, prompt, one, torch.tensor([0.5]), torch.tensor([0.25]))
    # OpenAI: minus frequency * count minus presence * [count > 0], output tokens only (not token 2)
    assert oa.tolist() == [[2.0 - 1.0 - 0.25, -2.0 - 0.5 - 0.25, 1.0, 0.5, 3.0]]


def test_temperature_and_greedy_rows():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    p = smp.batch_params([params(temperature=0.5), params(temperature=0.0)])
    out = smp.process_logits(logits, p)
    assert torch.allclose(out[0], logits[0] / 0.5) and torch.equal(out[1], logits[1])
    probs = smp.probabilities(out, p.greedy)
    assert probs[1].tolist() == [0.0, 0.0, 1.0]                 # greedy row is one-hot at the argmax
    assert torch.allclose(probs[0], (logits[0] / 0.5).softmax(-1))


def test_top_k_per_row():
    logits = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.7]] * 3)
    out = smp.apply_top_k(logits, torch.tensor([2, 0, 1]))
    assert torch.isfinite(out).tolist() == [[False, False, False, True, True], [True] * 5,
                                            [False, False, False, True, False]]
    assert torch.equal(out[0, 3:], logits[0, 3:])


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].repeat(4, 1)
    out = smp.apply_top_p(logits, torch.tensor([0.7, 0.8, 0.81, 1.0]))
    kept = torch.isfinite(out).sum(-1).tolist()
    assert kept == [2, 2, 3, 4]
    # order does not matter: the same on a shuffled vocabulary
    perm = torch.tensor([2, 0, 3, 1])
    out2 = smp.apply_top_p(logits[:, perm], torch.tensor([0.7, 0.8, 0.81, 1.0]))
    assert torch.equal(torch.isfinite(out2), torch.isfinite(out)[:, perm])


def test_min_p_relative_to_top_token():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[None].repeat(2, 1)
    out = smp.apply_min_p(logits, torch.tensor([0.5, 0.2]))
    assert torch.isfinite(out).tolist() == [[True, True, False, False], [True, True, True, False]]


def test_process_order_and_flags():
    """temperature before top-p changes what top-p keeps; filters skip greedy rows."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 2)
    p = smp.batch_params([params(temperature=4.0, top_p=0.7), params(temperature=0.0, top_p=0.7)])
    out = smp.process_logits(logits, p)
    # at temperature 4 the probabilities are [0.35, 0.27, 0.21, 0.17]: 3 tokens to reach 0.7;
    # at temperature 1 ([0.64, 0.24, 0.09, 0.03]) it would be 2
    assert torch.isfinite(out[0]).sum() == 3
    assert torch.isfinite(out[1]).all()                         # greedy row untouched
    assert p.any_top_p and not p.any_top_k and not p.any_min_p and not p.all_greedy


@pytest.mark.parametrize("seed", [0, 1])
def test_speculative_rule_keeps_the_target_distribution(seed):
    g = torch.Generator().manual_seed(seed)
    V, n = 6, 200_000
    p = torch.rand(V, generator=g).pow(3)
    p /= p.sum()
    q = torch.rand(V, generator=g)
    q[0] = 0                                                    # a token the draft never proposes
    q /= q.sum()
    P, Q = p[None].expand(n, V), q[None].expand(n, V)
    draft = smp.sample_cdf(Q, torch.rand(n, generator=g, dtype=torch.float64))
    token, accepted = smp.speculative_accept(P, Q, draft, torch.rand(n, generator=g),
                                             torch.rand(n, generator=g, dtype=torch.float64))
    freq = torch.bincount(token, minlength=V).float() / n
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-6).all(), (freq, p)
    # acceptance probability is sum_i min(p_i, q_i)
    expected = torch.minimum(p, q).sum()
    assert abs(accepted.float().mean() - expected) < 5 * math.sqrt(expected * (1 - expected) / n)


def test_speculative_rule_greedy_is_argmax():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])        # one-hot targets (greedy rows)
    draft = torch.tensor([1, 0])
    q = torch.zeros(2, 3).scatter_(1, draft[:, None], 1.0)
    token, accepted = smp.speculative_accept(p, q, draft, torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    assert accepted.tolist() == [True, False] and token.tolist() == [1, 2]


def test_logprobs_and_top_n():
    logits = torch.randn(3, 10)
    chosen = torch.tensor([4, 0, 9])
    lp, top_v, top_i = smp.logprobs(logits, chosen, 3)
    ref = logits.log_softmax(-1)
    assert torch.allclose(lp, ref[torch.arange(3), chosen])
    assert torch.equal(top_i, ref.topk(3).indices) and torch.allclose(top_v, ref.topk(3).values)
    assert smp.logprobs(logits, chosen, 0)[1] is None
