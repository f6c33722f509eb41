"""The engine's batched lean decode step (infer/batch_rows.py) against the model's own forward."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.batch_rows import BatchDecoder
from nanoseek.model import ModelConfig, Transformer
from test_one_row import BASE, CONFIGS, full_forward_logprobs, model_for, record_steps

PROMPTS = [[3, 17, 5, 42, 8, 9, 11], [4, 5, 6], list(range(7, 40)) + [3], [3, 17, 5, 42, 8, 9, 11]]
LENGTHS = [20, 12, 25, 20]        # rows finish at different steps: the dense buffer is gathered again


def greedy(eng, prompts=PROMPTS, lengths=LENGTHS):
    calls = record_steps(eng.batch_rows)
    cs = eng.generate(prompts, [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0)
                                for n in lengths])
    return [c.token_ids for c in cs], [torch.tensor(c.logprobs) for c in cs], calls


def check_against_forward(m, toks, lps, prompts=PROMPTS):
    for p, t, lp in zip(prompts, toks, lps):
        full, ref = full_forward_logprobs(m, p, t)
        assert t == full.argmax(-1).tolist()
        assert (lp - ref).abs().max() < 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batch_decode_equals_the_model(name):
    m = model_for(name)
    eng = Engine(m, max_batch=8, max_seq_len=64, one_row=False)
    assert eng.batch_rows is not None
    toks, lps, calls = greedy(eng)
    # every decode step of more than one row took this path (one row alone: one_row's domain)
    assert len(calls) == sorted(LENGTHS)[-2] - 1 and all(calls)
    check_against_forward(m, toks, lps)
    ref = Engine(m, max_batch=8, max_seq_len=64, one_row=False, batch_rows=False)
    toks_m, lps_m, calls_m = greedy(ref)
    assert calls_m == [] and toks_m == toks
    assert max((a - b).abs().max().item() for a, b in zip(lps, lps_m)) < 1e-5
    # in-place weight updates (an optimizer step, a selection-bias update): the same engine repacks
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.3)
        if m.layers[1].ffn.gate.bias is not None:
            m.layers[1].ffn.gate.bias.add_(0.05)
    toks2, lps2, calls2 = greedy(eng)
    assert all(calls2)
    check_against_forward(m, toks2, lps2)
    assert toks2 != toks or max((a - b).abs().max().item() for a, b in zip(lps, lps2)) > 1e-3


def test_batch_decode_on_scattered_blocks_and_joining_rows():
    """Rows that join mid-run (max_batch below the request count), share a prompt's blocks and hold
    blocks scattered over the pool: the outputs equal the model path's."""
    m = model_for("v3")
    prompts = [PROMPTS[i % 4] for i in range(7)]
    lengths = [5 + 3 * i for i in range(7)]
    eng = Engine(m, max_batch=3, max_seq_len=64, block_size=4, one_row=False)
    toks, lps, calls = greedy(eng, prompts, lengths)
    assert sum(calls) > 10
    check_against_forward(m, toks, lps, prompts)


def test_batch_decode_seeded_sampling_reproducible():
    m = model_for("v3")
    ps = [SamplingParams(max_tokens=16, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2, 3, 1)]
    outs = []
    for batch_rows in (True, True, False):
        eng = Engine(m, max_batch=8, max_seq_len=64, one_row=False, batch_rows=batch_rows)
        outs.append([c.token_ids for c in eng.generate(PROMPTS, ps)])
    assert outs[0] == outs[1] == outs[2]
    assert outs[0][0] == outs[0][3] and outs[0][0] != outs[0][1]


def test_batch_decode_falls_back():
    m = model_for("v3")
    eng = Engine(m, max_batch=8, max_seq_len=64, one_row=False)
    # a forward hook: the model's forward runs (this path calls no module)
    hits = []
    handle = m.layers[1].ffn.register_forward_pre_hook(lambda mod, args: hits.append(1))
    toks, lps, calls = greedy(eng)
    handle.remove()
    assert not any(calls) and len(hits) == max(LENGTHS)
    check_against_forward(m, toks, lps)
    # a batch whose dense MoE product would be too costly, and a buffer over its budget
    eng.batch_rows.max_rows = lambda: 3
    toks2, _, calls = greedy(eng)                # 4 rows for 11 steps, then 3 rows for 8 steps
    assert toks2 == toks and calls == [False] * 11 + [True] * 8
    eng = Engine(m, max_batch=8, max_seq_len=64, one_row=False)
    eng.batch_rows.MAX_BUFFER_BYTES = 1000
    toks3, _, calls = greedy(eng)
    assert toks3 == toks and not any(calls)


def test_batch_decode_support_rules():
    m = model_for("v3")
    assert BatchDecoder.supports(m, torch.float32)
    assert not BatchDecoder.supports(m, torch.bfloat16)
    assert Engine(m, max_batch=2, max_seq_len=32, batch_rows=False).batch_rows is None
    assert Engine(model_for("v3", torch.bfloat16), max_batch=2, max_seq_len=32).batch_rows is None
    biased = Transformer(ModelConfig(**{**BASE, "attention_bias": True}))
    assert not BatchDecoder.supports(biased, torch.float32)


def test_copy_blocks_equals_copy_block_one_by_one():
    from nanoseek.infer.kv_cache import PagedCache
    cfg = ModelConfig(**BASE)
    a, b = PagedCache(cfg, 12, 4), PagedCache(cfg, 12, 4)
    torch.manual_seed(0)
    kv, pe = torch.randn(a.kv.shape), torch.randn(a.pe.shape)
    for c in (a, b):
        c.kv.copy_(kv)
        c.pe.copy_(pe)
    src, dst = [3, 3, 3, 7], [5, 6, 9, 2]
    for s, d in zip(src, dst):
        a.copy_block(s, d)
    b.copy_blocks(src, dst)
    assert torch.equal(a.kv, b.kv) and torch.equal(a.pe, b.pe)
    assert torch.equal(b.kv[:, 5 * 4:6 * 4], b.kv[:, 3 * 4:4 * 4]) and not torch.equal(b.kv[:, :4], b.kv[:, 12:16])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lean_prefill_equals_the_model_prefill(name):
    """Fresh prompts of different lengths (padded) and a shared one: the lean prefill's logits and the
    latents it writes into the paged cache equal the model's clear-path prefill's."""
    m = model_for(name)
    engines = [Engine(m, max_batch=8, max_seq_len=64, block_size=4, one_row=False, batch_rows=br)
               for br in (True, False)]
    lean = []
    step = engines[0].batch_rows.prefill
    engines[0].batch_rows.prefill = lambda *a: lean.append(step(*a)) or lean[-1]
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=5)
    outs = [e.generate(PROMPTS, sp) for e in engines]
    assert len(lean) == 1 and lean[0] is not None and lean[0].shape == (3, 1, m.config.vocab_size)
    for a, b in zip(*outs):
        assert a.token_ids == b.token_ids and abs(a.logprobs[0] - b.logprobs[0]) < 1e-5
    bs = 4
    for t in ("kv", "pe"):     # block 0 takes the padding's writes
        x, y = getattr(engines[0].cache, t)[:, bs:], getattr(engines[1].cache, t)[:, bs:]
        assert x.abs().sum() > 0 and (x - y).abs().max() < 1e-5
    # a prompt continued after a cached part (chunked prefill) takes the model's path
    e = Engine(m, max_batch=8, max_seq_len=64, one_row=False, max_prefill_tokens=8)
    calls = []
    step2 = e.batch_rows.prefill
    e.batch_rows.prefill = lambda *a: calls.append(1) or step2(*a)
    c = e.generate([PROMPTS[2]], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))[0]
    assert len(calls) == 1
    full, _ = full_forward_logprobs(m, PROMPTS[2], c.token_ids)
    assert c.token_ids == full.argmax(-1).tolist()
