"""Model core: internal equivalences (clear vs absorbed MLA, cached decode vs full forward, grouped vs
loop MoE), config validation, RoPE/YaRN numbers from the papers, MTP wiring."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanoseek.infer.kv_cache import ContiguousCache
from nanoseek.model import ModelConfig, Transformer, preset
from nanoseek.model.layers import RMSNorm, RMSNormFunction, apply_rope, rope_inv_freq
from nanoseek.model.mla import BlockCausalAttention, causal_attention
from nanoseek.model.moe import Gate


def make(seed=0, std=0.1, **kw) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(**kw))
    m.init_weights(std)
    for mod in m.modules():
        if isinstance(mod, Gate) and mod.bias is not None:
            mod.bias.normal_(0, 0.05)
    return m.eval()


VARIANTS = {
    "v3": {},
    "no_q_lora": dict(q_lora_rank=None),
    "groups": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3),
    "yarn": dict(rope_scaling={"type": "yarn", "factor": 4.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                               "mscale_all_dim": 1.0, "original_max_position_embeddings": 512},
                 max_position_embeddings=2048),
    "v2": dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="group_limited_greedy",
               norm_topk_prob=False, routed_scaling_factor=1.0, num_nextn_predict_layers=0),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_absorbed_equals_clear(name):
    m = make(**VARIANTS[name])
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        clear, absorbed = m(ids, absorb=False), m(ids, absorb=True)
    assert (clear - absorbed).abs().max() < 1e-5


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cached_decode_equals_full_forward(name):
    m = make(**VARIANTS[name])
    ids = torch.randint(0, 512, (3, 14))
    with torch.no_grad():
        full = m(ids)
        cache = ContiguousCache(m.config, 3, 32)
        steps = [m(ids[:, :6], cache=cache)]            # prefill (clear path)
        steps += [m(ids[:, t:t + 1], cache=cache) for t in range(6, 14)]  # decode (absorbed path)
    assert (full - torch.cat(steps, 1)).abs().max() < 1e-5


def test_cache_rows_of_different_lengths():
    """Row 1 is prefilled with padding, then its length is cut back: later decode steps must only
    see its real tokens, and both rows must match their own full forwards."""
    m = make()
    a, b = torch.randint(0, 512, (12,)), torch.randint(0, 512, (8,))
    with torch.no_grad():
        cache = ContiguousCache(m.config, 2, 16)
        m(torch.stack([a[:9], torch.cat([b[:5], torch.zeros(4, dtype=torch.long)])]), cache=cache)
        cache.lengths = torch.tensor([9, 5])
        for t in range(3):
            out = m(torch.stack([a[9 + t:10 + t], b[5 + t:6 + t]]), cache=cache)
        assert (out[0, -1] - m(a[None])[0, -1]).abs().max() < 1e-5
        assert (out[1, -1] - m(b[None])[0, -1]).abs().max() < 1e-5


@pytest.mark.parametrize("qblock", [32, BlockCausalAttention.QBLOCK])
@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("T", [1, 37, 64, 200])
def test_block_causal_attention_equals_sdpa(T, keep, qblock, monkeypatch):
    # the CPU training path (explicit matmuls in blocks; the backward reuses the forward's probabilities
    # or recomputes them) against SDPA, with gradients; T = 200 is not a multiple of the block and its
    # heads split into unequal groups
    torch.manual_seed(0)
    B, H, qk, vd = 2, 3, 24, 16
    q, k, v = (torch.randn(B, T, H, d, dtype=torch.float64, requires_grad=True) for d in (qk, qk, vd))
    dout = torch.randn(B, T, H, vd, dtype=torch.float64)
    monkeypatch.setattr(BlockCausalAttention, "QBLOCK", qblock)
    monkeypatch.setattr(BlockCausalAttention, "BLOCK_BYTES", 2 * qblock * T * 8)   # two heads per block: 3 groups
    monkeypatch.setattr(BlockCausalAttention, "KEEP_BYTES", 2**30 if keep else 0)
    ours = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.3)
    grads = torch.autograd.grad(ours, (q, k, v), dout)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), F.pad(v, (0, qk - vd)).transpose(1, 2),
                                         is_causal=True, scale=0.3)[..., :vd].transpose(1, 2)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    assert (ours - ref).abs().max() < 1e-10
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() < 1e-10


@pytest.mark.parametrize("keep", [True, False])
def test_block_causal_attention_bf16_close_to_fp64(keep, monkeypatch):
    # the bf16 path (bf16 matmuls and scores, softmax normalised in fp32) against an fp64 reference on
    # the same bf16-rounded inputs: a few bf16 roundings off (SDPA's own bf16 kernel is ~2x closer, as
    # it keeps fp32 scores), forward and all three gradients; T = 200 splits into uneven blocks
    torch.manual_seed(0)
    B, H, T, qk, vd = 2, 3, 200, 24, 16
    q, k, v = (torch.randn(B, T, H, d).to(torch.bfloat16) for d in (qk, qk, vd))
    dout = torch.randn(B, T, H, vd).to(torch.bfloat16)

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        o = fn(*leaves)
        return (o, *torch.autograd.grad(o, leaves, dout.to(dtype)))

    ref = run(lambda q, k, v: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), F.pad(v, (0, qk - vd)).transpose(1, 2), is_causal=True,
        scale=0.3)[..., :vd].transpose(1, 2), torch.float64)
    monkeypatch.setattr(BlockCausalAttention, "QBLOCK", 64)                    # T = 200: 4 uneven blocks
    monkeypatch.setattr(BlockCausalAttention, "BLOCK_BYTES", 2 * 64 * T * 2)   # two heads per block
    monkeypatch.setattr(BlockCausalAttention, "KEEP_BYTES", 2**30 if keep else 0)
    ours = run(lambda q, k, v: causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.3),
               torch.bfloat16)
    for a, r in zip(ours, ref):
        assert a.dtype == torch.bfloat16
        assert (a.double() - r).norm() < 1.5e-2 * r.norm()          # measured 5-6e-3 (bf16 unit roundoff 2e-3)
        assert (a.double() - r).abs().max() < 3e-2 * r.abs().max()


def test_rmsnorm_function_bf16_input_and_output():
    # q_norm / kv_norm under autocast read a bf16 projection: computed in fp32, returned and
    # back-propagated in bf16, the weight's gradient in fp32
    torch.manual_seed(0)
    x = torch.randn(4, 7, 64).to(torch.bfloat16)
    w = 1 + 0.3 * torch.randn(64)
    g = torch.randn(4, 7, 64).to(torch.bfloat16)
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = RMSNormFunction.apply(xb, wb, 1e-6, torch.bfloat16)
    dx, dw = torch.autograd.grad(y, (xb, wb), g)
    assert y.dtype == dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    ref = wd * F.rms_norm(xd, (64,), eps=1e-6)
    rdx, rdw = torch.autograd.grad(ref, (xd, wd), g.double())
    for a, r in ((y, ref), (dx, rdx), (dw, rdw)):
        assert (a.double() - r).abs().max() < 1e-2 * r.abs().max()


def test_training_attention_path_equals_sdpa_path():
    # fp32 CPU forward without a mask takes the block path; an all-True causal mask forces SDPA
    m = make(**VARIANTS["v3"]).train()
    ids = torch.randint(0, 512, (2, 70))
    causal = torch.ones(70, 70, dtype=torch.bool).tril()[None].expand(2, 70, 70)
    outs = []
    for mask in (None, causal):
        m.zero_grad()
        x = m.embed(ids)
        cos, sin = m.rope(torch.arange(70)[None])
        y = m.layers[0].attn(x, cos, sin, mask=mask)
        y.square().sum().backward()
        outs.append((y, m.layers[0].attn.wq_a.weight.grad.clone(), m.layers[0].attn.wkv_a.weight.grad.clone()))
    for a, b in zip(*outs):
        assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item())


def test_rmsnorm_backward_equals_autograd(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(64, dtype=torch.float64)).requires_grad_()
    g = torch.randn(3, 5, 64, dtype=torch.float64)
    ours = RMSNormFunction.apply(x, w, 1e-6)
    ref = w * F.rms_norm(x, (64,), eps=1e-6)
    assert (ours - ref).abs().max() < 1e-12
    for a, b in zip(torch.autograd.grad(ours, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        assert (a - b).abs().max() < 1e-10
    norm = RMSNorm(64)
    norm.weight.data = w.detach().float()
    with torch.no_grad():
        plain = norm(x.float())
    xf = x.detach().float().requires_grad_()
    grads = []
    for small in (0, 1 << 16):      # the training path: RMSNormFunction, or autograd through F.rms_norm when small
        monkeypatch.setattr(RMSNorm, "SMALL", small)
        y = norm(xf)
        assert torch.equal(y, plain)                               # the same forward
        grads.append(torch.autograd.grad(y, (xf, norm.weight), g.float()))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_grouped_moe_equals_loop():
    m = make(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    ids = torch.randint(0, 512, (4, 32))
    fast = m(ids)
    slow = m(ids, moe_reference=True)
    assert (fast - slow).abs().max() < 1e-5
    # gradients agree too
    g1 = torch.autograd.grad(fast.square().mean(), m.layers[1].ffn.experts.w1)[0]
    g2 = torch.autograd.grad(m(ids, moe_reference=True).square().mean(), m.layers[1].ffn.experts.w1)[0]
    assert (g1 - g2).abs().max() < 1e-6
    # and under CPU bf16 autocast (expert matmuls in bf16, the residual stream fp32): one MoE layer on
    # one input routes alike and agrees to bf16 rounding; through the whole model a near-tie in a later
    # gate can route a token otherwise (1 token of 128 here on an AMX CPU), so there all tokens but a few
    ffn = m.layers[1].ffn
    x = torch.randn(128, ffn.gate.weight.shape[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (a, ra), (b, rb) = ffn(x), ffn(x, reference=True)
        fast, slow = m(ids), m(ids, moe_reference=True)
    assert torch.equal(ra.indices, rb.indices) and (a.float() - b.float()).abs().max() < 0.02 * b.abs().max()
    per_token = (fast.float() - slow.float()).abs().amax(-1)
    assert fast.dtype == torch.bfloat16 and (per_token < 0.02 * slow.abs().max()).float().mean() >= 0.97
    # and the bf16 backward of the one MoE layer (same routing) gives the reference's expert gradients
    w1 = ffn.experts.w1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g1 = torch.autograd.grad(ffn(x)[0].float().square().mean(), w1)[0]
        g2 = torch.autograd.grad(ffn(x, reference=True)[0].float().square().mean(), w1)[0]
    assert g1.dtype == torch.float32 and g2.abs().max() > 0
    assert (g1 - g2).abs().max() < 0.03 * g2.abs().max()


def test_bf16_model_runs_every_expert_path():
    """A model stored in bf16 (no autocast): grouped dispatch (a long prefill), the dense and the few-token
    paths all run in bf16 and agree with the fp32 model within bf16 rounding."""
    from nanoseek.model.moe import MoE
    m = make(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    moe = next(mod for mod in m.modules() if isinstance(mod, MoE))
    ref = m.float()
    x = torch.randn(300, 64)
    with torch.no_grad():
        want = {n: moe(x[:n])[0] for n in (300, 4, 1)}
        m16 = m.to(torch.bfloat16)
        moe16 = next(mod for mod in m16.modules() if isinstance(mod, MoE))
        for n in (300, 4, 1):                                     # grouped, dense, few
            y, _ = moe16(x[:n].bfloat16())
            assert y.dtype == torch.bfloat16
            # within bf16 rounding, except the odd token whose rounded input flips its expert choice
            bad = ((y.float() - want[n]).abs().amax(-1) > 0.05 * want[n].abs().max()).float().mean()
            assert bad <= 0.02
        logits = m16(torch.randint(0, 512, (2, 150)))             # the whole model, 300 tokens
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    del ref


def test_dense_moe_equals_loop():
    """Every expert on every token with zero weight off the chosen ones: the same outputs and the same
    gradients (experts, input, gate weights) as the loop over experts."""
    from nanoseek.model.moe import MoE
    m = make(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    moe = next(mod for mod in m.modules() if isinstance(mod, MoE))
    ex = moe.experts
    x = torch.randn(10, 64, requires_grad=True)
    outs, grads = [], []
    for fn in (ex.forward_dense, ex.forward_reference):
        r = moe.gate(x)
        y = fn(x, r)
        outs.append(y)
        grads.append(torch.autograd.grad(y.square().sum(), (x, ex.w1, ex.w2, ex.w3, moe.gate.weight)))
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item())
    # the dispatch rule: few tokens that keep every expert busy go dense, a long sequence is grouped
    r = moe.gate(x[:8].detach())
    E, inter, dim = ex.w1.shape
    assert 6 * 8 * E * inter * dim <= ex.DENSE_MAX_FLOPS < 6 * 1000 * E * inter * dim and 8 * 3 >= E
    calls = []
    ex.forward_dense, ex.forward_grouped = (lambda *a: calls.append("dense") or ex.forward_reference(*a),
                                            lambda *a: calls.append("grouped") or ex.forward_reference(*a))
    ex(x[:8].detach(), r)
    ex(torch.randn(1000, 64), moe.gate(torch.randn(1000, 64)))
    assert calls == ["dense", "grouped"]


def test_16bit_decode_batches_go_dense_under_their_own_limit():
    """bf16 weights, no autograd, CPU: rows whose dense product is under DENSE_DECODE_16BIT_MAX_FLOPS
    (above the general limit) run every expert at once; with autograd, or in fp32, the same rows are
    grouped. The dense bf16 output agrees with the grouped one within bf16 rounding."""
    from nanoseek.model.moe import MoE
    m = make(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    ex = next(mod for mod in m.modules() if isinstance(mod, MoE)).experts
    E, inter, dim = ex.w1.shape
    x = torch.randn(128, dim)
    flops = 6 * 128 * E * inter * dim
    assert ex.DENSE_MAX_FLOPS < flops <= ex.DENSE_DECODE_16BIT_MAX_FLOPS
    calls = []
    dense, grouped = ex.forward_dense, ex.forward_grouped
    ex.forward_dense = lambda *a: calls.append("dense") or dense(*a)
    ex.forward_grouped = lambda *a: calls.append("grouped") or grouped(*a)
    gate = next(mod for mod in m.modules() if isinstance(mod, MoE)).gate
    with torch.no_grad():
        r = gate(x)
        ex(x, r)                                                        # fp32: grouped
        m.to(torch.bfloat16)
        xb = x.bfloat16()
        y = ex(xb, r)                                                   # bf16 decode: dense
        ref = grouped(xb, r)
    ex(xb, r)                                                           # autograd on: grouped
    assert calls == ["grouped", "dense", "grouped"]
    assert y.dtype == ref.dtype and (y.float() - ref.float()).abs().max() < 0.02 * ref.float().abs().max()


def test_selection_bias_chooses_but_does_not_weight():
    torch.manual_seed(0)
    g = Gate(ModelConfig(n_group=1, topk_group=1))
    torch.nn.init.normal_(g.weight, 0, 0.5)
    x = torch.randn(64, 64)
    base = g(x)
    g.bias[3] = 10.0  # expert 3 now always chosen
    r = g(x)
    assert (r.indices == 3).any(dim=1).all()
    # its weight is its unbiased score (renormalized), never score + bias
    w3 = r.weights[r.indices == 3]
    assert (w3 <= g.route_scale + 1e-6).all()
    expected = base.scores.gather(1, r.indices)
    expected = expected / expected.sum(1, keepdim=True) * g.route_scale
    assert torch.allclose(r.weights, expected)


def test_group_limited_routing_masks_losing_groups():
    cfg = ModelConfig(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2)
    g = Gate(cfg)
    torch.nn.init.normal_(g.weight, 0, 1.0)
    r = g(torch.randn(256, 64))
    # sum-of-top-2 group scores: chosen experts all lie in the two best groups
    s = r.scores.view(256, 4, 2).topk(2, -1).values.sum(-1)
    best = s.topk(2, -1).indices
    groups = r.indices // 2
    assert all(set(groups[i].tolist()) <= set(best[i].tolist()) for i in range(256))


def test_mtp_outputs_and_order():
    m = make()
    ids = torch.randint(0, 512, (2, 10))
    out = m(ids, return_mtp=True, return_routing=True)
    assert out["logits"].shape == (2, 10, 512)
    assert [t.shape for t in out["mtp_logits"]] == [(2, 9, 512)]
    # [enorm(emb); hnorm(h)]: zeroing the first half of eh_proj removes the embedding's influence
    with torch.no_grad():
        m.mtp[0].eh_proj.weight[:, :64] = 0
    a = m(ids, return_mtp=True)["mtp_logits"][0]
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % 512  # changes only the embedding fed at the last MTP position
    b = m(ids2, return_mtp=True)["mtp_logits"][0]
    assert (a[:, -1] - b[:, -1]).abs().max() < 1e-6
    # while with the embedding half live, the same change moves the MTP output
    with torch.no_grad():
        m.mtp[0].eh_proj.weight[:, :64].normal_(0, 0.1)
    a, b = m(ids, return_mtp=True)["mtp_logits"][0], m(ids2, return_mtp=True)["mtp_logits"][0]
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-3


def test_rope_rotates_adjacent_pairs():
    x = torch.zeros(1, 1, 4)
    x[..., 0] = 1.0  # pair (0, 1)
    cos, sin = torch.tensor([[[math.cos(0.5), 1.0]]]), torch.tensor([[[math.sin(0.5), 0.0]]])
    y = apply_rope(x, cos, sin)
    assert torch.allclose(y[0, 0], torch.tensor([math.cos(0.5), math.sin(0.5), 0.0, 0.0]))


def test_yarn_matches_papers():
    cfg = preset("deepseek-v3")
    inv, att = rope_inv_freq(cfg)
    base = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    # pairs i <= 10 keep their frequency, i >= 23 are divided by the factor 40 (low=10, high=23)
    assert torch.allclose(inv[:11], base[:11]) and torch.allclose(inv[23:], base[23:] / 40)
    assert att == 1.0
    assert math.isclose(cfg.softmax_scale, 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel_tol=1e-9)
    assert math.isclose(cfg.softmax_scale, 0.13523, abs_tol=1e-4)


@pytest.mark.parametrize("kw, field", [
    (dict(n_routed_experts=10, n_group=4), "n_group"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(topk_group=3, n_group=2), "topk_group"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(topk_method="magic"), "topk_method"),
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(hidden_size=0), "hidden_size"),
    # kinds a hand-edited config.json can get wrong (they were tracebacks or silently another model)
    (dict(rms_norm_eps="x"), "rms_norm_eps: must be a number > 0"),
    (dict(rope_theta=-1.0), "rope_theta: must be a number > 0"),
    (dict(routed_scaling_factor="2"), "routed_scaling_factor"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings: must be true or false"),
    (dict(norm_topk_prob="no"), "norm_topk_prob"),
    (dict(n_group=2.0), "n_group: must be an integer"),
    (dict(aux_loss_alpha=float("nan")), "aux_loss_alpha: must be a number >= 0"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kw)


def test_config_reads_both_rope_shapes_and_v2():
    ds = {"model_type": "deepseek_v3", "rope_theta": 10000,
          "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                           "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}}
    hf5 = {"model_type": "deepseek_v3",
           "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000, "factor": 40, "beta_fast": 32,
                               "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                               "original_max_position_embeddings": 4096}}
    a, b = ModelConfig.from_dict(ds), ModelConfig.from_dict(hf5)
    assert a.rope_scaling == b.rope_scaling and a.softmax_scale == b.softmax_scale
    assert ModelConfig.from_dict({**hf5, "rope_scaling": None}).rope_scaling == a.rope_scaling   # null beside it
    v2 = ModelConfig.from_dict({"model_type": "deepseek_v2", "n_group": None, "topk_group": None,
                                "q_lora_rank": None})
    assert (v2.scoring_func, v2.topk_method, v2.use_selection_bias, v2.q_lora_rank) == ("softmax", "greedy", False, None)
    # the written config.json round-trips
    assert ModelConfig.from_dict(a.to_hf_dict()) == a
