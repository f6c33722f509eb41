"""RL losses against values worked out by hand in the comments (ratios 1.5 / 0.5 with A = +-1)."""

import math

import pytest
import torch

from nanoseek.train.losses import (dynamic_sampling_mask, entropy_from_logits, group_advantages, k3_kl,
                                   overlong_filter_mask, policy_loss, token_logprobs)

L15, L05 = math.log(1.5), math.log(0.5)


def batch():
    """Two completions, T = 3. Sequence 0: A = +1, ratios [1.5, 0.5, 1.0]. Sequence 1: A = -1,
    ratios [1.5, 0.5, padding]; the padding holds -inf log-probs that must not leak NaN."""
    logp = torch.tensor([[L15, L05, 0.0], [L15, L05, -math.inf]], requires_grad=True)
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logp, old, adv, mask


# Token losses -min(r A, clip(r) A) with eps 0.2:
#   seq 0 (A=+1): r=1.5 -> clip 1.2 wins -> -1.2 (clipped); r=0.5 -> -0.5; r=1 -> -1.0   sum -2.7
#   seq 1 (A=-1): r=1.5 -> min(-1.5, -1.2) = -1.5 -> +1.5; r=0.5 -> min(-0.5, -0.8) -> +0.8 (clipped)  sum 2.3
def test_grpo_hand_values_and_grad():
    logp, old, adv, mask = batch()
    loss, st = policy_loss(logp, old, adv, mask, variant="grpo")
    assert loss.item() == pytest.approx((-2.7 / 3 + 2.3 / 2) / 2)      # per-sequence mean, then mean = 0.125
    assert st["clip_frac"].item() == pytest.approx(2 / 5)
    assert st["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.0 + 1.5 + 0.5) / 5)
    assert st["kl"].item() == 0.0
    loss.backward()
    # d/dlogp of -r A / |o| / B = -A r / 3 / 2; clipped tokens and padding get 0.
    expect = torch.tensor([[0.0, -0.5 / 6, -1.0 / 6], [1.5 / 4, 0.0, 0.0]])
    assert torch.allclose(logp.grad, expect, atol=1e-6)


def test_dapo_token_level_and_clip_higher():
    logp, old, adv, mask = batch()
    loss, _ = policy_loss(logp, old, adv, mask, variant="dapo", eps_low=0.2, eps_high=0.2)
    assert loss.item() == pytest.approx((-2.7 + 2.3) / 5)             # token sum / 5 tokens = -0.08
    # DAPO default eps_high 0.28: the first token of seq 0 is clipped at 1.28 instead of 1.2.
    loss, st = policy_loss(logp, old, adv, mask, variant="dapo")
    assert loss.item() == pytest.approx((-1.28 - 0.5 - 1.0 + 1.5 + 0.8) / 5)   # -0.096
    assert st["clip_frac"].item() == pytest.approx(2 / 5)


def test_dr_grpo_constant_normalizer():
    logp, old, adv, mask = batch()
    loss, _ = policy_loss(logp, old, adv, mask, variant="dr_grpo", max_len=4)
    assert loss.item() == pytest.approx((-2.7 + 2.3) / (2 * 4))       # sum / (B * max_len) = -0.05
    with pytest.raises(ValueError, match="dr_grpo needs max_len"):     # not the padded width T: it varies
        policy_loss(logp, old, adv, mask, variant="dr_grpo")


def test_gspo_sequence_ratio():
    # s_0 = exp(mean(log 1.5, log 0.5, 0)) = 0.75**(1/3) = 0.9086; s_1 = exp(mean(log 1.5, log 0.5)) = 0.75**0.5.
    # eps 3e-4/4e-4: seq 0 (A=+1) min(0.9086, 0.9997) = 0.9086 unclipped; seq 1 (A=-1) min(-0.8660, -0.9997)
    # = -0.9997, clipped.
    logp, old, adv, mask = batch()
    s0, s1 = 0.75 ** (1 / 3), 0.75 ** 0.5
    loss, st = policy_loss(logp, old, adv, mask, variant="gspo")
    assert loss.item() == pytest.approx((-s0 + (1 - 3e-4)) / 2)
    assert st["clip_frac"].item() == pytest.approx(0.5)
    assert st["ratio_mean"].item() == pytest.approx((s0 + s1) / 2)
    loss.backward()
    # d s_0 / d logp_t = s_0 / |o_0|; loss = -s_0 / 2 -> each valid token of seq 0 gets -s_0 / 6.
    expect = torch.tensor([[-s0 / 6] * 3, [0.0, 0.0, 0.0]])
    assert torch.allclose(logp.grad, expect, atol=1e-6)
    # a sequence with no valid token (overlong filtering masked it) adds 0, not -A (its s was exp(0) = 1)
    empty = torch.zeros_like(mask)
    empty[0] = mask[0]
    loss, st = policy_loss(logp.detach(), old, adv, empty, variant="gspo")
    assert loss.item() == pytest.approx(-s0 / 2) and st["ratio_mean"].item() == pytest.approx(s0)
    assert st["clip_frac"].item() == 0.0


def test_k3_kl_values():
    assert k3_kl(torch.tensor([-1.3, 0.0]), torch.tensor([-1.3, 0.0])).abs().max().item() == 0.0
    # logp = 0, ref = log 2: exp(log 2) - log 2 - 1 = 0.306853
    assert k3_kl(torch.tensor([0.0]), torch.tensor([math.log(2)])).item() == pytest.approx(2 - math.log(2) - 1)


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_kl_term(variant):
    logp, old, adv, mask = batch()
    base, _ = policy_loss(logp, old, adv, mask, variant=variant, max_len=4)
    same, st = policy_loss(logp, old, adv, mask, variant=variant, ref_logp=logp.detach().clone(), beta=1.0,
                           max_len=4)
    assert st["kl"].item() == 0.0 and same.item() == pytest.approx(base.item())
    # ref = logp + log 2 on every valid token: k3 = 0.306853 per token; beta 0.5.
    ref = logp.detach().clone() + math.log(2)
    with_kl, st = policy_loss(logp, old, adv, mask, variant=variant, ref_logp=ref, beta=0.5, max_len=4)
    k = 2 - math.log(2) - 1
    # Per-token constant: grpo/gspo/dapo average to k; dr_grpo sums 5 tokens over B * max_len = 8.
    added = k * 5 / 8 if variant == "dr_grpo" else k
    assert st["kl"].item() == pytest.approx(k)
    base, _ = policy_loss(logp, old, adv, mask, variant=variant, max_len=4)
    assert with_kl.item() == pytest.approx(base.item() + 0.5 * added, rel=1e-5)
    with_kl.backward()
    assert torch.isfinite(logp.grad).all()


def test_on_policy_ratio_one_is_reinforce():
    # old = logp (first step on fresh rollouts): ratio 1, nothing clipped, and DAPO's token-level loss
    # is -sum_i A_i |o_i| / sum_i |o_i| with gradient -A_i / 15 on every one of the 3 x 5 tokens
    logp = torch.randn(3, 5, requires_grad=True)
    mask = torch.ones(3, 5)
    adv = torch.tensor([1.0, 2.0, -1.0])
    loss, st = policy_loss(logp, logp.detach().clone(), adv, mask, variant="dapo")
    assert loss.item() == pytest.approx(-(1 + 2 - 1) * 5 / 15, abs=1e-6) and st["clip_frac"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(logp.grad, (-adv / 15)[:, None].expand(3, 5))


def test_group_advantages_hand_values():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
    a = group_advantages(r)
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    d = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(a[0], torch.tensor([d, -d, -d, d]))
    assert torch.equal(a[1], torch.zeros(4))                           # zero-std group -> 0
    # group 2: mean 0.75, std sqrt((3 * 0.5625 + 5.0625) / 3) = 1.5
    assert torch.allclose(a[2], torch.tensor([-0.75, -0.75, -0.75, 2.25]) / (1.5 + 1e-4))
    none = group_advantages(r, scale="none")                          # Dr. GRPO: centered only
    assert torch.allclose(none[2], torch.tensor([-0.75, -0.75, -0.75, 2.25]))
    assert torch.equal(group_advantages(torch.tensor([[1.0], [0.0]])), torch.zeros(2, 1))
    with pytest.raises(ValueError):
        group_advantages(r, scale="batch")
    # all-equal groups get exactly 0 whatever the value (the mean of G equal floats can round away
    # from them: 0.1 or 1.05 gave ~1e-4 .. 1e-3 before), and an empty batch of groups is fine
    for v in (0.1, 0.9, 1.05, 0.3):
        for G in range(2, 17):
            for scale in ("std", "none"):
                assert torch.equal(group_advantages(torch.full((2, G), v), scale), torch.zeros(2, G)), (v, G, scale)
    assert group_advantages(torch.zeros(0, 4)).shape == (0, 4)


def test_masks():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert dynamic_sampling_mask(r).tolist() == [False, True, False]
    assert overlong_filter_mask(torch.tensor([True, False])).tolist() == [False, True]


def test_entropy_and_token_logprobs():
    mask = torch.tensor([[1, 0]])
    logits = torch.stack([torch.zeros(4), torch.tensor([100.0, 0, 0, 0])]).unsqueeze(0)   # (1, 2, 4)
    assert entropy_from_logits(logits, mask).item() == pytest.approx(math.log(4))       # uniform
    assert entropy_from_logits(logits, torch.tensor([[0, 1]])).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(2, 3, 7)
    tgt = torch.randint(0, 7, (2, 3))
    ref = torch.log_softmax(logits, -1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, tgt), ref, atol=1e-6)


def test_bad_variant():
    logp, old, adv, mask = batch()
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, variant="ppo")
