"""The engine's one-row decode step (infer/one_row.py) against the model's own full forward."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.one_row import OneRowDecoder
from nanoseek.model import ModelConfig, Transformer
from nanoseek.model import layers

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
            first_k_dense_replace=1, n_shared_experts=1)
CONFIGS = {
    "v3": {},
    "no q_lora, yarn, no shared expert": dict(q_lora_rank=None, n_shared_experts=0, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}),
    "v2 softmax": dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="group_limited_greedy",
                       norm_topk_prob=False, routed_scaling_factor=1.0),
}


def model_for(name: str, dtype=torch.float32) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**{**BASE, **CONFIGS[name]}))
    m.init_weights(0.1)
    if m.layers[1].ffn.gate.bias is not None:
        m.layers[1].ffn.gate.bias.normal_(0, 0.1)
    return m.eval().to(dtype)


def record_steps(decoder) -> list[bool]:
    """Wrap decoder.step (when there is a decoder): the list records, per call, whether it took the step."""
    calls: list[bool] = []
    if decoder is not None:
        step = decoder.step

        def counted(*a):
            out = step(*a)
            calls.append(out is not None)
            return out
        decoder.step = counted
    return calls


def greedy_with_logprobs(m, prompt, n, one_row=True, patience=0):
    eng = Engine(m, max_batch=2, max_seq_len=64, one_row=one_row)
    if eng.one_row is not None:
        eng.one_row.patience = patience
    calls = record_steps(eng.one_row)
    c = eng.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0))[0]
    return c.token_ids, torch.tensor(c.logprobs), sum(calls)


def full_forward_logprobs(m, prompt, tokens):
    with torch.no_grad():
        logits = m(torch.tensor([prompt + tokens]))[0].float()                     # (L, V)
    lp = F.log_softmax(logits[len(prompt) - 1:-1], dim=-1)                          # predicts tokens
    return lp, lp.gather(1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_row_decode_equals_the_full_forward(name):
    m = model_for(name)
    prompt = [3, 17, 5, 42, 8, 9, 11]
    tokens, lps, calls = greedy_with_logprobs(m, prompt, 20)
    assert calls == 19                          # every decode step after the prefill's token took this path
    full, ref = full_forward_logprobs(m, prompt, tokens)
    assert tokens == full.argmax(-1).tolist()
    assert (lps - ref).abs().max() < 1e-4
    # and it follows an in-place weight update (an optimizer step): its packed copies are rebuilt
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.3)
    tokens2, lps2, _ = greedy_with_logprobs(m, prompt, 20)
    full2, ref2 = full_forward_logprobs(m, prompt, tokens2)
    assert tokens2 == full2.argmax(-1).tolist() and (lps2 - ref2).abs().max() < 1e-4
    assert tokens2 != tokens or (lps2 - lps).abs().max() > 1e-3


@pytest.mark.skipif(not layers._FP16_GEMV, reason="torch built without FBGEMM's fp16 GEMV")
def test_one_row_decode_of_bf16_weights():
    """bf16 weights, fp32 activations (the model path rounds to bf16 between ops): against the fp32 full
    forward of the same bf16 weights it is at least as close as the model's own bf16 path."""
    m = model_for("v3", torch.bfloat16)
    ref_model = model_for("v3", torch.bfloat16).float()
    prompt = [3, 17, 5, 42, 8, 9, 11]
    tokens, lps, calls = greedy_with_logprobs(m, prompt, 16)
    tokens_m, lps_m, calls_m = greedy_with_logprobs(m, prompt, 16, one_row=False)
    assert calls == 15 and calls_m == 0
    _, ref = full_forward_logprobs(ref_model, prompt, tokens)
    _, ref_m = full_forward_logprobs(ref_model, prompt, tokens_m)
    err, err_m = (lps - ref).abs().max().item(), (lps_m - ref_m).abs().max().item()
    assert err < 0.05 and err <= err_m + 1e-3       # (the prefill ran the model path: bf16 latents)


def test_bf16_packs_wait_for_the_weights_to_hold_still():
    """After a weight change the one-row path waits `patience` steps (the model's forward runs) before
    it packs the new weights: an RL loop's short single-row tails never pay for a repack."""
    m = model_for("v3", torch.bfloat16)
    assert Engine(m, max_batch=2, max_seq_len=64).one_row.patience > 0
    prompt = [3, 17, 5, 42, 8, 9, 11]
    tokens, _, used = greedy_with_logprobs(m, prompt, 16, patience=10)
    assert used == 15 - 10
    tokens_m, _, _ = greedy_with_logprobs(m, prompt, 16, one_row=False)
    assert tokens[:3] == tokens_m[:3]


def test_forward_hooks_are_never_skipped():
    """The one-row step calls no module: while a module has a forward hook, the model's forward runs."""
    m = model_for("v3")
    prompt = [3, 17, 5, 42, 8, 9, 11]
    hits = []
    handle = m.layers[1].ffn.register_forward_pre_hook(lambda mod, args: hits.append(1))
    tokens, _, used = greedy_with_logprobs(m, prompt, 6)
    assert used == 0 and len(hits) == 6                     # the prefill and 5 decode steps, all hooked
    handle.remove()
    tokens2, _, used2 = greedy_with_logprobs(m, prompt, 6)
    assert used2 == 5 and tokens2 == tokens


def test_one_row_support_rules():
    m = model_for("v3")
    assert OneRowDecoder.supports(m, torch.float32)
    assert not OneRowDecoder.supports(m, torch.bfloat16)             # attention computes in the cache's dtype
    assert Engine(m, max_batch=2, max_seq_len=32, one_row=False).one_row is None
    biased = Transformer(ModelConfig(**{**BASE, "attention_bias": True}))
    assert not OneRowDecoder.supports(biased, torch.float32)


ROUTINGS = {
    "v3 noaux_tc, sigmoid, bias": dict(),
    "v3, 8 groups keep 3, unnormalised": dict(n_routed_experts=32, n_group=8, topk_group=3, num_experts_per_tok=4,
                                              norm_topk_prob=False),
    "v2 group_limited_greedy, softmax": dict(scoring_func="softmax", topk_method="group_limited_greedy",
                                             norm_topk_prob=False, routed_scaling_factor=1.0),
    "greedy, softmax, normalised": dict(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1),
    "one group, sigmoid, no bias": dict(n_group=1, topk_group=1, topk_method="greedy"),
}


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_host_routing_equals_the_gate(name):
    """one_row._route (the gate's selection on the host, from the E logits) against moe.Gate.forward."""
    from nanoseek.infer.one_row import _route
    from nanoseek.model.moe import Gate
    torch.manual_seed(0)
    g = Gate(ModelConfig(**{**BASE, **ROUTINGS[name]}))
    torch.nn.init.normal_(g.weight, 0, 0.5)
    if g.bias is not None:
        g.bias.normal_(0, 0.3)
    route = (g.E, g.topk, g.n_group, g.topk_group, g.topk_method, g.scoring_func == "sigmoid",
             g.norm_topk_prob, g.route_scale, None if g.bias is None else g.bias.tolist())
    x = torch.randn(200, g.weight.shape[1])
    with torch.no_grad():
        r = g(x)
        logits = F.linear(x, g.weight)
    for n in range(x.shape[0]):
        got = _route(logits[n].tolist(), route)
        assert [e for e, _ in got] == r.indices[n].tolist()
        assert torch.allclose(torch.tensor([w for _, w in got], dtype=torch.float64), r.weights[n].double(),
                              rtol=1e-5, atol=1e-7)


def test_one_row_step_on_scattered_cache_blocks():
    """Blocks that are not consecutive: PagedCache.bind_one declines, the full bind's gather path runs, and
    the step still equals the full forward (as it does on consecutive blocks, read in place)."""
    from nanoseek.infer.kv_cache import PagedCache
    m = model_for("v3")
    prompt = torch.tensor([[3, 17, 5, 42, 8, 9, 11]])
    one = OneRowDecoder(m)
    one.patience = 0
    for table in ([1, 2, 3], [5, 2, 7]):
        cache = PagedCache(m.config, num_blocks=8, block_size=4)
        assert cache.bind_one(table, 7) == (table == [1, 2, 3])
        with torch.no_grad():
            pos, mask = cache.bind([table], [0], [7], 7)
            m(prompt, cache=cache, positions=pos, mask=mask)
            logits = []
            for t, tok in enumerate([21, 4, 30, 2]):             # positions 7 .. 10
                if not cache.bind_one(table, 7 + t):
                    cache.bind([table], [7 + t], [1], 1)
                logits.append(one.step(tok, 7 + t, cache))
            ref = m(torch.cat([prompt, torch.tensor([[21, 4, 30, 2]])], 1))[0, 7:]
        assert (torch.cat(logits) - ref).abs().max() < 1e-4


def test_a_query_without_a_non_rope_part_decodes_on_the_model_path():
    """qk_nope_head_dim = 0 (a valid config) has nothing to fold W_UK into: the lean one-row step does not take
    it (it crashed in its packing) and batch 1 decodes on the model's path, as the model's own greedy."""
    from nanoseek.infer.engine import Engine, SamplingParams
    from nanoseek.model import ModelConfig, Transformer
    torch.manual_seed(0)
    m = Transformer(ModelConfig(qk_nope_head_dim=0))
    m.init_weights()
    m.eval()
    eng = Engine(m)
    assert eng.one_row is None
    out = eng.generate([[5, 9, 3]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0].token_ids
    seq = [5, 9, 3]
    with torch.no_grad():
        for _ in range(4):
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[3:]
