"""Inference engine on the tiny model (fp32): outputs against full forwards, batching and continuous
batching against requests run alone, cancel / preemption bookkeeping, MTP speculation against plain
decoding, seeded sampling, stop handling, streaming, logprobs."""

import asyncio
import contextlib
import functools
import threading

import pytest
import torch
import torch.nn.functional as F

from nanoseek.infer import sampling as smp
from nanoseek.infer.engine import Engine, SamplingParams, _Detokenizer
from nanoseek.infer.kv_cache import PagedCache
from nanoseek.model import ModelConfig, Transformer

GREEDY = dict(temperature=0.0, ignore_eos=True)


def tiny(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(**kw))
    m.init_weights(0.1)            # peaked logits: argmax ties are out of float noise's reach
    return m.eval()


def prompts(*lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def full_forward_greedy(m, prompt, n, penalty=None):
    ids, out = list(prompt), []
    for _ in range(n):
        logits = m(torch.tensor([ids]))[0, -1][None]
        if penalty is not None:      # (repetition, frequency, presence) on the full-forward logits
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=512)[None]
            seen = torch.zeros(1, 512, dtype=torch.bool)
            seen[0, prompt] = True
            logits = smp.apply_penalties(logits, counts, seen, *(torch.tensor([v]) for v in penalty))
        t = int(logits.argmax())
        ids.append(t)
        out.append(t)
    return out


@functools.lru_cache(maxsize=1)
def trained_mtp_model() -> Transformer:
    """Tiny model trained ~1 s on a fixed cycle over tokens 10..59 (next = cycle successor), main
    head and MTP head, except that the MTP head learns a wrong answer for 10 of the 50 tokens: its
    drafts are then mostly right and sometimes wrong."""
    m = tiny(seed=3)
    cycle = torch.randperm(50, generator=torch.Generator().manual_seed(0)) + 10
    succ = torch.arange(512)
    succ[cycle] = cycle.roll(-1)
    wrong = torch.zeros(512, dtype=torch.bool)
    wrong[cycle[::5]] = True
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    m.train()
    for _ in range(20):
        x = cycle[torch.randint(0, 50, (8, 1), generator=g)].repeat(1, 12)
        for i in range(1, 12):
            x[:, i] = succ[x[:, i - 1]]
        out = m(x[:, :-1], return_mtp=True)
        mtp_labels = torch.where(wrong[x[:, 2:]], (x[:, 2:] + 1) % 512, x[:, 2:])
        loss = F.cross_entropy(out["logits"].flatten(0, 1), x[:, 1:].flatten()) + F.cross_entropy(
            out["mtp_logits"][0].flatten(0, 1), mtp_labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    m.cycle = cycle
    return m


# --- greedy exactness

def test_greedy_equals_full_forward_argmax():
    m = tiny()
    ps = prompts(5, 17, 1, 9)
    eng = Engine(m, max_batch=4, block_size=4)
    outs = eng.generate(ps, SamplingParams(max_tokens=10, **GREEDY))
    for p, c in zip(ps, outs):
        assert c.token_ids == full_forward_greedy(m, p, 10)
        assert c.finish_reason == "length" and c.prompt_ids == p
    assert eng.cache.num_free == eng.cache.num_blocks - 1          # everything handed back


def test_batch_equals_one_by_one_and_chunked_prefill():
    m = tiny()
    ps = prompts(3, 30, 11, 7, 22)
    params = [SamplingParams(max_tokens=8, **GREEDY), SamplingParams(max_tokens=8, temperature=0.9, seed=5),
              SamplingParams(max_tokens=8, top_k=20, seed=6), SamplingParams(max_tokens=8, top_p=0.8, seed=7),
              SamplingParams(max_tokens=8, min_p=0.1, temperature=1.3, seed=8)]
    alone = [Engine(m).generate([p], sp)[0].token_ids for p, sp in zip(ps, params)]
    # small prefill budget: the 30-token prompt goes in chunks, the others are padded together
    together = Engine(m, max_batch=8, block_size=4, max_prefill_tokens=12).generate(ps, params)
    assert [c.token_ids for c in together] == alone


def test_equal_length_rows_decode_unmasked_like_one_by_one():
    """Rows of one length decode without a mask (every row sees all its positions): same tokens as alone,
    and the same as full forwards."""
    m = tiny()
    ps = prompts(9, 9, 9, seed=4)
    sp = SamplingParams(max_tokens=8, **GREEDY)
    together = [c.token_ids for c in Engine(m, max_batch=4, block_size=4).generate(ps, sp)]
    assert together == [Engine(m).generate([p], sp)[0].token_ids for p in ps]
    assert together[0] == full_forward_greedy(m, ps[0], 8)


def test_decode_linear_equals_f_linear():
    """layers.linear (W x^T for a few rows at inference) equals F.linear for any leading shape, with
    bias, and keeps autograd's path when gradients are on."""
    from nanoseek.model.layers import linear, linears
    w, b, w2 = torch.randn(48, 32), torch.randn(48), torch.randn(20, 32)
    with torch.no_grad():
        for shape in [(32,), (1, 32), (1, 1, 32), (2, 1, 32), (1, 3, 32), (8, 32), (9, 32), (4, 5, 32)]:
            x = torch.randn(shape)
            for bias in (None, b):
                y = linear(x, w, bias)
                assert y.shape == F.linear(x, w, bias).shape
                assert torch.allclose(y, F.linear(x, w, bias), atol=1e-5)
            y1, y2 = linears(x, (w, w2), (b, None))
            assert torch.allclose(y1, F.linear(x, w, b), atol=1e-5) and torch.allclose(y2, F.linear(x, w2), atol=1e-5)
        x = torch.randn(3, 32)[:, ::1].t().contiguous().t()          # strided rows in
        assert torch.allclose(linear(x, w), F.linear(x, w), atol=1e-5)
    wg = w.clone().requires_grad_()
    linear(torch.randn(2, 32), wg).sum().backward()
    assert wg.grad is not None


@torch.no_grad()
def test_decode_fast_paths_equal_reference_paths():
    """The few-token expert path equals the loop over experts and grouped dispatch; the fp32 RMSNorm
    with the weight folded in gives the same bits as normalize-then-scale."""
    from nanoseek.model.moe import MoE
    m = tiny(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    moe = next(mod for mod in m.modules() if isinstance(mod, MoE))
    for n in (1, 2):
        x = torch.randn(n, 64)
        r = moe.gate(x)
        few = moe.experts.forward_few(x, r)
        assert torch.allclose(few, moe.experts.forward_reference(x, r), atol=1e-6)
        assert torch.allclose(few, moe.experts.forward_grouped(x, r), atol=1e-6)
    norm = m.layers[0].attn_norm
    norm.weight.normal_()
    x = torch.randn(3, 5, 64)
    assert torch.equal(norm(x), norm.weight * F.rms_norm(x, (64,), eps=norm.eps))


def test_shared_prompt_prefill_equals_one_by_one():
    """Identical prompts admitted together are prefilled once (full blocks shared, the last one copied):
    greedy and seeded outputs as when run alone, alongside unshared prompts, with chunked prefill and a
    prompt that fills its blocks exactly; every block back at the end."""
    m = tiny()
    a, b, c = prompts(10, 7, 8, seed=3)          # block_size 4: a ends mid-block, c fills two blocks
    ps = [a, b, a, c, a, c, b]
    sp = [SamplingParams(max_tokens=9, **GREEDY), SamplingParams(max_tokens=6, temperature=1.1, seed=1),
          SamplingParams(max_tokens=9, temperature=0.8, top_k=30, seed=2), SamplingParams(max_tokens=7, **GREEDY),
          SamplingParams(max_tokens=3, temperature=1.2, seed=3),                 # stops early
          SamplingParams(max_tokens=8, temperature=1.0, seed=4), SamplingParams(max_tokens=5, **GREEDY)]
    alone = [Engine(m).generate([p], s)[0].token_ids for p, s in zip(ps, sp)]
    for budget in (2048, 6):                     # 6: a is prefilled in chunks, its followers wait
        eng = Engine(m, max_batch=8, block_size=4, max_prefill_tokens=budget)
        assert [c.token_ids for c in eng.generate(ps, sp)] == alone
        assert eng.stats["shared_prefills"] == 4
        assert eng.stats["prefill_tokens"] == len(a) + len(b) + len(c)
        assert eng.cache.num_free == eng.cache.num_blocks - 1
    # the same seed on the same prompt gives the same tokens, shared or not
    twins = Engine(m, max_batch=4).generate([a, a], SamplingParams(max_tokens=8, temperature=1.0, seed=9))
    assert twins[0].token_ids == twins[1].token_ids


def test_shared_prompt_blocks_counted_and_freed_on_cancel():
    """Followers hold the leader's full blocks by reference: 4 requests on a 10-token prompt (block 4)
    use 3 + 3 x 1 blocks, not 12. A cancelled leader hands its followers on (the next one prefills);
    a cancelled follower gives back only its own blocks; the free count returns to the start."""
    m = tiny()
    p = prompts(10, seed=5)[0]
    sp = SamplingParams(max_tokens=12, **GREEDY)
    want = Engine(m).generate([p], sp)[0].token_ids
    eng = Engine(m, max_batch=4, block_size=4)
    free0 = eng.cache.num_free
    reqs = [eng.add_request(p, sp) for _ in range(4)]
    eng.step()                                   # prefill + first decode step (positions 10, 11: block 2)
    assert free0 - eng.cache.num_free == 3 + 3 and eng.stats["shared_prefills"] == 3
    reqs[1].cancel()
    for _ in range(3):
        eng.step()
    assert free0 - eng.cache.num_free == 3 + 2 + 3      # block 3 (positions 12..15) for each of 3
    reqs[0].cancel()                             # the shared blocks stay while others use them
    while eng.step():
        pass
    assert [r.result().token_ids for r in reqs[2:]] == [want, want]
    assert eng.cache.num_free == free0
    # the leader leaves halfway through a chunked prefill: the first follower prefills for the other
    eng = Engine(m, max_batch=4, block_size=4, max_prefill_tokens=4)
    reqs = [eng.add_request(p, sp) for _ in range(3)]
    eng.step()                                   # the leader's first 4 tokens
    assert not any(r.finished for r in reqs) and eng.stats["shared_prefills"] == 0
    reqs[0].cancel()
    while eng.step():
        pass
    assert [r.result().token_ids for r in reqs[1:]] == [want, want]
    assert eng.stats["shared_prefills"] == 1 and eng.stats["prefill_tokens"] == 4 + 10
    assert eng.cache.num_free == eng.cache.num_blocks - 1
    # the pool runs dry: preempted leaders and followers are recomputed from their tokens
    q = prompts(6, seed=7)[0]
    sp = SamplingParams(max_tokens=20, **GREEDY)
    want_p, want_q = (Engine(m).generate([x], sp)[0].token_ids for x in (p, q))
    eng = Engine(m, max_batch=5, block_size=4, num_blocks=15, max_prefill_tokens=8)
    outs = eng.generate([p, p, q, p, p], sp)
    assert eng.stats["preempted"] > 0 and eng.stats["shared_prefills"] >= 3
    assert [c.token_ids for c in outs] == [want_p, want_p, want_q, want_p, want_p]
    assert eng.cache.num_free == 14


def test_continuous_batching_join_and_leave():
    m = tiny()
    ps = prompts(6, 13, 4, 9, 2)
    sp = [SamplingParams(max_tokens=n, **GREEDY) for n in (12, 3, 9, 5, 7)]
    alone = [full_forward_greedy(m, p, s.max_tokens) for p, s in zip(ps, sp)]
    eng = Engine(m, max_batch=3, block_size=4)          # at most 3 running: the rest wait in the queue
    reqs = [eng.add_request(ps[0], sp[0])]
    for _ in range(4):
        eng.step()
    reqs += [eng.add_request(p, s) for p, s in zip(ps[1:3], sp[1:3])]
    eng.step()
    assert len(eng.running) == 3
    reqs += [eng.add_request(p, s) for p, s in zip(ps[3:], sp[3:])]
    eng.step()
    assert len(eng.waiting) == 2                         # queued, not crashed
    while eng.step():
        pass
    assert [r.result().token_ids for r in reqs] == alone


def test_cancel_frees_blocks():
    m = tiny()
    eng = Engine(m, max_batch=4, block_size=4)
    free0 = eng.cache.num_free
    a = eng.add_request(prompts(9)[0], SamplingParams(max_tokens=50, **GREEDY))
    b = eng.add_request(prompts(5)[0], SamplingParams(max_tokens=6, **GREEDY))
    for _ in range(3):
        eng.step()
    assert eng.cache.num_free < free0
    a.cancel()
    eng.step()
    assert a.result().finish_reason == "abort" and len(a.result().token_ids) < 50
    assert a not in [s.req for s in eng.running]
    while eng.step():
        pass
    assert b.result().finish_reason == "length"
    assert eng.cache.num_free == free0
    events = list(a)
    assert events[-1].finished and events[-1].finish_reason == "abort"


def decode_fails_once(eng: Engine, monkeypatch, error: Exception) -> list:
    """The engine's second decode step raises `error`; returns the call list (clear it to fail again)."""
    real, calls = eng._decode, []

    def broken_once(seqs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(seqs)

    monkeypatch.setattr(eng, "_decode", broken_once)
    return calls


def test_an_engine_error_fails_its_requests_and_the_engine_goes_on(monkeypatch, capsys):
    """A step that raises ends the requests in flight in that error (not in a normal-looking "abort" event),
    for iterators, result() and async streams alike; the background thread keeps serving."""
    import asyncio

    eng = Engine(tiny())
    calls = decode_fails_once(eng, monkeypatch, IndexError("boom"))
    p = prompts(5)[0]
    eng.start()
    try:
        req = eng.add_request(p, SamplingParams(max_tokens=8, **GREEDY))
        with pytest.raises(RuntimeError, match=r"failed in the engine \(IndexError: boom\)"):
            list(req)
        with pytest.raises(RuntimeError, match="failed in the engine"):
            req.result()
        calls.clear()

        async def stream():
            return [ev async for ev in eng.stream(p, SamplingParams(max_tokens=8, **GREEDY))]
        with pytest.raises(RuntimeError, match="boom"):
            asyncio.run(stream())
        assert "IndexError: boom" in capsys.readouterr().err        # the engine printed the traceback
        assert len(eng.add_request(p, SamplingParams(max_tokens=3, **GREEDY)).result().token_ids) == 3
    finally:
        eng.stop()


def test_preemption_when_blocks_run_out():
    m = tiny()
    ps = prompts(7, 12, 5, 9)
    sp = SamplingParams(max_tokens=20, **GREEDY)
    # 12 usable blocks of 4 tokens = 48 tokens for 4 requests that grow to ~30 tokens each
    want = [full_forward_greedy(m, p, 20) for p in ps]
    for spec in (False, True):
        eng = Engine(m, max_batch=4, block_size=4, num_blocks=13, speculative=spec, max_prefill_tokens=8)
        outs = eng.generate(ps, sp)
        assert eng.stats["preempted"] > 0
        assert [c.token_ids for c in outs] == want
        assert eng.cache.num_free == 12
    with pytest.raises(ValueError, match="KV cache"):
        eng.add_request(prompts(40)[0], SamplingParams(max_tokens=20))


def test_paged_cache_equals_contiguous_and_block_layout():
    m = tiny()
    cache = PagedCache(m.config, num_blocks=20, block_size=4, layers=3)
    assert cache.allocate(2) == [1, 2]                  # block 0 is reserved
    a, b = cache.allocate(3), cache.allocate(2)
    cache.release(a)
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        tables = [cache.allocate(3), b + cache.allocate(1)]   # row 1's blocks are not contiguous
        pos, mask = cache.bind(tables, [0, 0], [9, 6], 9)
        out = m(ids, cache=cache, positions=pos, mask=mask)
        ref0, ref1 = m(ids[:1]), m(ids[1:, :6])
    assert (out[0] - ref0[0]).abs().max() < 1e-5 and (out[1, :6] - ref1[0]).abs().max() < 1e-5


# --- speculative decoding

@pytest.mark.parametrize("trained", [False, True])
def test_speculative_greedy_equals_plain(trained):
    m = trained_mtp_model() if trained else tiny()
    ps = prompts(5, 12, 1)
    if trained:   # on the cycle (drafts mostly right) and off it (drafts wrong at first)
        ps = [m.cycle[:4].tolist(), m.cycle[20:31].tolist()] + ps
    sp = SamplingParams(max_tokens=16, **GREEDY)
    plain = [c.token_ids for c in Engine(m, max_batch=8).generate(ps, sp)]
    eng = Engine(m, max_batch=8, speculative=True, block_size=4)
    spec = eng.generate(ps, sp)
    assert [c.token_ids for c in spec] == plain
    st = eng.stats
    assert st["drafted"] > 0
    if trained:
        assert 0.5 * st["drafted"] < st["accepted"] < st["drafted"]   # mostly accepted, some rejected
        assert st["steps"] < sum(len(t) for t in plain) / len(ps)     # fewer steps than tokens
    else:
        assert st["accepted"] < 0.2 * st["drafted"]                    # random MTP: mostly rejected
    assert eng.cache.num_free == eng.cache.num_blocks - 1


@pytest.mark.parametrize("block_size", [4, 16])
def test_speculative_batch_1_lean_path_equals_the_model_path(block_size):
    """One sequence: the verify step and the MTP block run OneRowDecoder.verify / .mtp. Same tokens as
    plain greedy, and the same drafts (acceptance counts) as the model's forward, every step lean."""
    m = trained_mtp_model()
    sp = SamplingParams(max_tokens=24, **GREEDY)
    for prompt in (m.cycle[:4].tolist(), prompts(9)[0]):
        plain = Engine(m, max_batch=2).generate([prompt], sp)[0].token_ids
        runs = {}
        for one_row in (True, False):
            eng = Engine(m, max_batch=2, speculative=True, block_size=block_size, one_row=one_row)
            calls = []
            if one_row:
                eng.one_row.patience = 0
                verify, mtp = eng.one_row.verify, eng.one_row.mtp
                eng.one_row.verify = lambda *a: calls.append("v") or verify(*a)
                eng.one_row.mtp = lambda *a: calls.append("m") or mtp(*a)
            out = eng.generate([prompt], sp)[0].token_ids
            runs[one_row] = (out, dict(eng.stats), calls)
        (lean, st, calls), (model, st_m, _) = runs[True], runs[False]
        assert lean == model == plain
        assert (st["drafted"], st["accepted"]) == (st_m["drafted"], st_m["accepted"]) and st["drafted"] > 0
        assert calls.count("v") == st["steps"] and calls.count("m") > 0


@pytest.mark.parametrize("seeded", [True, False])
def test_speculative_sampling_matches_the_model_distribution(seeded):
    """Sampling with speculation: the token a verification step gives follows the model's distribution
    (counts over 400 requests against its softmax), for seeded requests (the plain draw, the draft kept
    when it is that token) and unseeded ones (accept with min(1, p/q), else resample the residual)."""
    m = trained_mtp_model()
    prompt = m.cycle[:3].tolist()
    sp = [SamplingParams(max_tokens=2, temperature=3.0, top_k=4, seed=s if seeded else None, ignore_eos=True)
          for s in range(400)]
    eng = Engine(m, max_batch=64, speculative=True)
    outs = eng.generate([prompt] * 400, sp)
    if seeded:
        again = Engine(m, max_batch=7, speculative=True).generate([prompt] * 5, sp[:5])
        assert [c.token_ids for c in again] == [c.token_ids for c in outs[:5]]
    assert 0 < eng.stats["accepted"] < eng.stats["drafted"]
    # the second token was produced by verification (accepted draft or residual resample): its
    # distribution given the first token is the model's, whatever the draft
    firsts = [c.token_ids[0] for c in outs]
    first = max(set(firsts), key=firsts.count)       # the most frequent first token
    with torch.no_grad():
        logits = m(torch.tensor([prompt + [first]]))[0, -1][None]
    p = smp.probabilities(smp.process_logits(logits, smp.batch_params([sp[0]])), torch.tensor([False]))[0]
    seconds = [c.token_ids[1] for c in outs if c.token_ids[0] == first]
    n = len(seconds)
    assert n > 100
    freq = torch.bincount(torch.tensor(seconds), minlength=512).float() / n
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-6).all()


def test_seeded_speculative_sampling_gives_the_plain_tokens_alone_batched_and_preempted():
    """A seeded request samples token k with its own uniform k, and the MTP drafts token k with that same
    uniform: with --speculative it gets the tokens plain decoding gives it, also when it shares its batch
    and when it is preempted and recomputed (the draft after a recompute is drawn again, not remembered)."""
    m = trained_mtp_model()
    ps = [m.cycle[:4].tolist(), m.cycle[20:31].tolist(), *prompts(5, 9)]
    sp = [SamplingParams(max_tokens=20, temperature=t, seed=100 + i, ignore_eos=True)
          for i, t in enumerate((0.7, 1.0, 1.3, 1.0))]
    plain = [Engine(m).generate([p], s)[0].token_ids for p, s in zip(ps, sp)]
    alone = Engine(m, speculative=True)
    assert [alone.generate([p], s)[0].token_ids for p, s in zip(ps, sp)] == plain
    assert 0 < alone.stats["accepted"] < alone.stats["drafted"]          # speculation worked, not always
    eng = Engine(m, max_batch=4, block_size=4, num_blocks=13, speculative=True, max_prefill_tokens=8)
    assert [c.token_ids for c in eng.generate(ps, sp)] == plain
    assert eng.stats["preempted"] > 0 and eng.stats["accepted"] > 0


# --- sampling through the engine

def test_sample_cdf_follows_the_distribution_and_never_draws_a_zero():
    """Inverse-CDF draws (one uniform per row) from unnormalized weights: frequencies within 5 sigma of
    p, zero-weight tokens (first, middle, last) never drawn, u -> 1 gives the last positive token."""
    w = torch.tensor([0.0, 2.0, 0.0, 5.0, 1e-3, 3.0, 0.0])
    p = w / w.sum()
    n = 200_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = smp.sample_cdf(w.expand(n, -1), u)
    freq = torch.bincount(draws, minlength=7).float() / n
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-6).all()
    assert freq[[0, 2, 6]].sum() == 0
    edge = smp.sample_cdf(w.expand(3, -1), torch.tensor([0.0, 1 - 2 ** -53, 0.5], dtype=torch.float64))
    assert edge.tolist()[:2] == [1, 5]


def test_seeded_sampling_reproducible_and_batch_independent():
    m = tiny()
    p = prompts(6)[0]
    sp = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.95, seed=1234, ignore_eos=True)
    alone = Engine(m).generate([p], sp)[0].token_ids
    others = prompts(3, 9, 14, seed=9)
    mixed = Engine(m, max_batch=4).generate(
        others[:2] + [p] + others[2:], [SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)] * 2
        + [sp] + [SamplingParams(max_tokens=5, **GREEDY)])
    assert mixed[2].token_ids == alone
    other_seed = Engine(m).generate([p], SamplingParams(max_tokens=12, temperature=1.5, top_p=0.95, seed=99,
                                                        ignore_eos=True))[0].token_ids
    assert other_seed != alone
    # past the 64 uniforms a seeded request draws at a time
    long = SamplingParams(max_tokens=70, temperature=1.0, seed=5, ignore_eos=True)
    alone = Engine(m).generate([p], long)[0].token_ids
    assert Engine(m, max_batch=3).generate([others[0], p], [sp, long])[1].token_ids == alone


def test_penalties_match_reference():
    m = tiny()
    p = prompts(8)[0]
    pen = (1.8, 0.5, 0.7)
    got = Engine(m).generate([p], SamplingParams(max_tokens=12, repetition_penalty=pen[0], frequency_penalty=pen[1],
                                                 presence_penalty=pen[2], **GREEDY))[0].token_ids
    assert got == full_forward_greedy(m, p, 12, penalty=pen)
    assert got != full_forward_greedy(m, p, 12)


def test_logprobs_equal_full_forward_log_softmax():
    m = tiny()
    p = prompts(7)[0]
    for spec in (False, True):
        c = Engine(m, speculative=spec).generate([p], SamplingParams(max_tokens=6, logprobs=3, **GREEDY))[0]
        with torch.no_grad():
            ref = m(torch.tensor([p + c.token_ids]))[0, len(p) - 1:-1].log_softmax(-1)   # (6, V)
        want = ref[torch.arange(6), torch.tensor(c.token_ids)]
        assert torch.allclose(torch.tensor(c.logprobs), want, atol=1e-5)
    eng = Engine(m)
    events = list(eng.add_request(p, SamplingParams(max_tokens=3, logprobs=2, **GREEDY)))
    tops = [t for ev in events for t in ev.top_logprobs]
    assert len(tops) == 3 and all(len(t) == 2 for t in tops)
    top = ref[0].topk(2)
    assert [i for i, _ in tops[0]] == top.indices.tolist()                 # by token id, most likely first
    assert [v for _, v in tops[0]] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_each_row_keeps_its_own_number_of_top_logprobs_and_extreme_values_are_safe():
    """Batched with a request asking for 20, one asking for 1 gets 1 (the batch computes the largest number
    and each row keeps its own); values that underflow fp32 neither crash the engine nor sample garbage."""
    m = tiny()
    eng = Engine(m)
    ps = prompts(5, 7, 6)
    reqs = [eng.add_request(p, sp) for p, sp in zip(ps, [SamplingParams(max_tokens=4, logprobs=1, **GREEDY),
                                                         SamplingParams(max_tokens=4, logprobs=20, **GREEDY),
                                                         SamplingParams(max_tokens=4, top_p=1e-46, seed=1)])]
    few, many, odd = ([ev for ev in r] for r in reqs)          # one batch: all three were queued first
    assert [len(t) for ev in few for t in ev.top_logprobs] == [1] * 4
    assert [len(t) for ev in many for t in ev.top_logprobs] == [20] * 4
    greedy = eng.generate([ps[2]], SamplingParams(max_tokens=4, **GREEDY))[0]
    assert [t for ev in odd for t in ev.token_ids] == greedy.token_ids   # a top_p that is 0 in fp32: the top token
    assert SamplingParams(temperature=1e-39).temperature == 0.0      # below 1e-5: greedy
    assert eng.generate([ps[2]], SamplingParams(max_tokens=4, temperature=1e-300, seed=3))[0].token_ids == \
        greedy.token_ids
    for bad in (dict(top_k=2**63), dict(repetition_penalty=1e-45)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad).validate()


# --- stops, text, streaming

class ByteTokenizer:
    """Byte-level stand-in: ids 0..255 are bytes (partial UTF-8 decodes to U+FFFD, as byte-level BPE
    does), 256 is eos, the rest decode to nothing."""
    eos_id = 256

    def decode(self, ids, skip_special=False):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def letters_model():
    """Tiny model whose head can only favour lowercase ASCII letters: readable text for stop tests."""
    m = tiny()
    with torch.no_grad():
        keep = torch.zeros(512, dtype=torch.bool)
        keep[ord("a"):ord("z") + 1] = True
        m.head.weight[~keep] = 0
    return m


def test_stop_strings_tokens_eos_and_max_tokens():
    m = letters_model()
    tok = ByteTokenizer()
    p = [ord(c) for c in "hello"]
    free = Engine(m, tok).generate([p], SamplingParams(max_tokens=24, **GREEDY))[0]
    assert free.finish_reason == "length" and free.text == bytes(free.token_ids).decode()
    stop = free.text[7:9]
    cut = free.text.find(stop)
    eng = Engine(m, tok)
    events = list(eng.add_request(p, SamplingParams(max_tokens=24, stop=["zzzz", stop], **GREEDY)))
    c = eng.generate([p], SamplingParams(max_tokens=24, stop=[stop], **GREEDY))[0]
    assert c.finish_reason == "stop" and c.text == free.text[:cut]
    assert "".join(ev.text for ev in events) == c.text and events[-1].finish_reason == "stop"
    assert all(stop not in ev.text for ev in events)
    # a stop token ends the request: its id is in token_ids, its text is not in the output
    t = free.token_ids[5]
    k = free.token_ids.index(t)
    c = Engine(m, tok).generate([p], SamplingParams(max_tokens=24, stop_token_ids=[t], **GREEDY))[0]
    assert c.token_ids == free.token_ids[:k + 1] and c.text == free.text[:k] and c.finish_reason == "stop"
    # eos the same way, unless ignore_eos
    eos_model = letters_model()
    with torch.no_grad():
        eos_model.head.weight[256] = eos_model.head.weight[free.token_ids[3]] * 1.01
    c = Engine(eos_model, tok).generate([p], SamplingParams(max_tokens=24, temperature=0))[0]
    assert c.token_ids[-1] == 256 and c.finish_reason == "stop" and c.text == free.text[:len(c.token_ids) - 1]


def test_detokenizer_never_emits_half_a_character():
    tok = ByteTokenizer()
    text = "héllo → 世界!"
    d = _Detokenizer(tok, [])
    pieces = [d.step(b) for b in text.encode()]
    assert "".join(pieces) == text and all("\ufffd" not in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece) < len(text.encode())   # multi-byte chars came out whole


def test_generate_decodes_once_what_a_stream_decodes_token_by_token():
    """generate() (nobody reads the text before the end) decodes each output once when it finishes; a
    stream decodes token by token. Random bytes, invalid UTF-8 included, come out as the same text."""
    m, tok = tiny(), ByteTokenizer()
    ps = prompts(5, 9, 3, 7)
    sps = [SamplingParams(max_tokens=40, temperature=1.0, seed=s) for s in range(len(ps))]
    once = Engine(m, tok).generate(ps, sps)
    eng = Engine(m, tok)
    for p, sp, c in zip(ps, sps, once):
        events = list(eng.add_request(p, sp))
        assert [t for ev in events for t in ev.token_ids] == c.token_ids
        assert "".join(ev.text for ev in events) == c.text
        assert events[-1].finish_reason == c.finish_reason
    assert any("\ufffd" in c.text for c in once)      # the invalid-UTF-8 case was exercised


def test_stream_threads_and_async():
    m = tiny()
    ps = prompts(4, 8, 6)
    sp = SamplingParams(max_tokens=8, **GREEDY)
    want = [full_forward_greedy(m, p, 8) for p in ps]
    eng = Engine(m, max_batch=4)
    eng.start()
    try:
        got = {}

        def client(i):
            got[i] = [t for ev in eng.add_request(ps[i], sp) for t in ev.token_ids]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert [got[i] for i in range(3)] == want

        async def consume():
            events = [ev async for ev in eng.stream(ps[0], sp)]
            assert [t for ev in events for t in ev.token_ids] == want[0]
            assert events[-1].finished and events[-1].completion_tokens == 8 and events[-1].prompt_tokens == 4
            gen = eng.stream(ps[1], SamplingParams(max_tokens=400, **GREEDY))
            await gen.__anext__()
            await gen.aclose()                  # a client that goes away cancels its request
            for _ in range(200):
                if not eng.has_work():
                    break
                await asyncio.sleep(0.01)

        asyncio.run(consume())
        assert not eng.has_work() and eng.cache.num_free == eng.cache.num_blocks - 1
    finally:
        eng.stop()


def test_bad_requests_raise_value_error():
    m = tiny()
    eng = Engine(m, max_seq_len=32)
    with pytest.raises(ValueError, match="context window"):
        eng.add_request(list(range(40)), SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add_request(list(range(20)), SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="non-empty"):
        eng.add_request([], SamplingParams())
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        eng.add_request([1, 600], SamplingParams(max_tokens=2))
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_tokens=0), dict(min_p=2),
                dict(stop=[""]), dict(logprobs=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            eng.add_request([1, 2], SamplingParams(**bad))
    with pytest.raises(ValueError, match="tokenizer"):
        eng.add_request([1, 2], SamplingParams(max_tokens=2, stop=["x"]))
    with pytest.raises(ValueError, match="MTP"):
        Engine(tiny(num_nextn_predict_layers=0), speculative=True)
    assert not eng.has_work()


# --- CLI

@pytest.fixture
def model_dir(tmp_path):
    from nanoseek.tokenizer import Tokenizer
    tok = Tokenizer.train(["the quick brown fox jumps over the lazy dog %d\n" % i for i in range(300)], vocab_size=400)
    m = tiny()
    m.save_pretrained(tmp_path)
    tok.save(tmp_path)
    return tmp_path, m, tok


def test_generate_command_streams_the_engine_output(model_dir, capsys):
    from nanoseek.commands import generate
    d, m, tok = model_dir
    generate.main(["--model", str(d), "--prompt", "the quick", "--max-tokens", "12", "--temperature", "0",
                   "--ignore-eos", "--device", "cpu", "--stats"])
    out, err = capsys.readouterr()
    ids = tok.encode("the quick", add_bos=True)
    want = Engine(m, tok).generate([ids], SamplingParams(max_tokens=12, **GREEDY))[0].text
    assert out == "the quick" + want + "\n"
    assert "12 generated tokens" in err
    m.save_pretrained(d / "no_tokenizer")       # without tokenizer.json: token ids in, token ids out
    generate.main(["--model", str(d / "no_tokenizer"), "--prompt-ids", "5,9,11", "--max-tokens", "4",
                   "--temperature", "0", "--ignore-eos", "--speculative"])
    out = capsys.readouterr().out.split()
    assert [int(t) for t in out] == full_forward_greedy(m, [0, 5, 9, 11], 4)  # bos first
    with pytest.raises(SystemExit, match="not a model directory"):
        generate.main(["--model", str(d / "nope"), "--prompt", "x"])
    with pytest.raises(SystemExit, match="context window"):
        generate.main(["--model", str(d), "--prompt", "x", "--max-tokens", "5000"])


def test_chat_command_multi_turn(model_dir, capsys, monkeypatch):
    import io

    from nanoseek.commands import chat
    d, m, tok = model_dir
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nand again\n/exit\n"))
    chat.main(["--model", str(d), "--max-tokens", "6", "--temperature", "0", "--color", "always"])
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2
    assert chat.DIM in out and chat.RESET in out          # the generation starts inside <think>: dimmed
    # reasoning and answer split at the tags, even when a tag arrives in pieces
    s = chat.ThinkSplitter(thinking=True)
    pieces = s.feed("plan: add</th") + s.feed("ink>\n4") + s.feed("", final=True)
    assert pieces == [("think", "plan: add"), ("answer", "\n4")]
    monkeypatch.setattr("sys.stdin", io.StringIO(""))   # EOF quits, answering nothing
    chat.main(["--model", str(d), "--max-tokens", "2"])
    out = capsys.readouterr().out
    assert "nanoseek chat:" in out and "assistant> " not in out
    # a line that is not UTF-8 is asked again; a --max-tokens as large as the window keeps the history
    seen = []
    real = Engine.add_request
    def recording(self, ids, params=None):
        seen.append(ids)
        return real(self, ids, params)

    monkeypatch.setattr(Engine, "add_request", recording)
    monkeypatch.setattr("sys.stdin", io.StringIO("bad \udcff line\nhello there\nand again\n/exit\n"))
    chat.main(["--model", str(d), "--max-tokens", "4096", "--temperature", "0"])
    out = capsys.readouterr().out
    assert "not valid UTF-8" in out and out.count("assistant> ") == 2
    assert "hello there" in tok.decode(seen[1])       # turn 2's prompt still holds turn 1


def test_logits_at_selects_positions():
    m = tiny()
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        full = m(ids, return_hidden=True)
        at = torch.tensor([[8], [3]])
        some = m(ids, logits_at=at)
        lg, _, _ = m.mtp_step(full["hidden"], ids, logits_at=at)
        lg_full, _, _ = m.mtp_step(full["hidden"], ids)
    assert some.shape == (2, 1, 512)
    assert torch.allclose(some[:, 0], full["logits"][[0, 1], [8, 3]], atol=1e-6)
    assert torch.allclose(lg[:, 0], lg_full[[0, 1], [8, 3]], atol=1e-6)


def test_32_concurrent_streams_some_disconnect():
    m = tiny()
    ps = prompts(*[3 + i % 9 for i in range(32)], seed=4)
    sp = SamplingParams(max_tokens=10, **GREEDY)
    want = [c.token_ids for c in Engine(m, max_batch=32).generate(ps, sp)]
    eng = Engine(m, max_batch=8, block_size=4, num_blocks=40)     # fewer rows and blocks than clients
    try:
        async def client(i):
            got = []
            async with contextlib.aclosing(eng.stream(ps[i], sp)) as events:   # as a server closes it
                async for ev in events:
                    got += ev.token_ids
                    if i % 4 == 3 and len(got) >= 3:      # this client goes away
                        break
            return got

        async def main():
            return await asyncio.gather(*(client(i) for i in range(32)))

        got = asyncio.run(main())
        for _ in range(500):
            if not eng.has_work():
                break
            threading.Event().wait(0.01)
        for i in range(32):
            assert got[i] == (want[i][:len(got[i])] if i % 4 == 3 else want[i])
        assert not eng.has_work() and eng.cache.num_free == 39
    finally:
        eng.stop()


def test_a_one_token_prompt_prefilled_alone_writes_its_own_slot():
    """bind_one's fast path left the previous general bind's write slots in place, and the lean batched prefill
    of a lone one-token prompt wrote its latent there: into another request's cache (both answers went wrong)."""
    m = tiny()
    G = lambda n: SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)   # noqa: E731
    a, b = prompts(4, 3)
    ref_a = Engine(m).generate([a], G(12))[0].token_ids
    ref_c = Engine(m).generate([[7]], G(6))[0].token_ids
    eng = Engine(m, block_size=2, max_batch=4)
    assert eng.batch_rows is not None
    ra = eng.add_request(a, G(12))
    eng.step()
    rb = eng.add_request(b, G(20))
    eng.step()                                  # B takes the next blocks; A grows past them: not consecutive
    for _ in range(2):
        eng.step()
    rb.cancel()
    eng.step()                                  # A decodes alone through the general bind
    rc = eng.add_request([7], G(6))             # a one-token prompt, prefilled alone
    while eng.step():
        pass
    assert ra.result().token_ids == ref_a and rc.result().token_ids == ref_c
    assert eng.cache.num_free == eng.cache.num_blocks - 1


def test_stop_with_streams_in_flight_fails_them_and_frees_their_blocks():
    """stop() ended the background thread and left stream() consumers waiting for events forever, their blocks
    held; a stop() racing a start() joined the new thread and hung, leaving two engine threads."""
    eng = Engine(tiny())

    async def main():
        async def consume():
            async for _ in eng.stream(prompts(5)[0], SamplingParams(max_tokens=300, ignore_eos=True)):
                pass
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        await asyncio.to_thread(eng.stop)
        with pytest.raises(RuntimeError, match="engine was stopped"):
            await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert eng.cache.num_free == eng.cache.num_blocks - 1 and not eng.has_work()
    for _ in range(10):
        e = Engine(tiny())
        e.start()
        e.add_request(prompts(5)[0], SamplingParams(max_tokens=5))
        stopper = threading.Thread(target=e.stop)
        stopper.start()
        e.start()
        stopper.join(5)
        assert not stopper.is_alive()
        e.stop()
    assert not [t for t in threading.enumerate() if t.name == "nanoseek-engine" and t.is_alive()]


def test_an_error_in_a_step_driven_by_the_caller_fails_the_requests_in_flight(monkeypatch):
    """Only the background loop aborted the requests of a failed step: a foreground generate() left them in
    the engine (blocks held, stepped again by the next call, failing it too)."""
    eng = Engine(tiny())
    decode_fails_once(eng, monkeypatch, RuntimeError("boom"))
    p = prompts(5)[0]
    with pytest.raises(RuntimeError, match="boom"):
        eng.generate([p, p], SamplingParams(max_tokens=6, ignore_eos=True))
    assert not eng.has_work() and eng.cache.num_free == eng.cache.num_blocks - 1
    out = eng.generate([p], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 3
