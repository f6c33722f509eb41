"""Decode-time fast paths: `layers.linear(s)` (fp32 transposed product, bf16 prepacked oneDNN weights),
the cache of derived weights behind them (invalidation, no stale entries, no leaks), and MLA's
absorbed path on those cached copies, each against the plain PyTorch computation."""

import gc

import pytest
import torch
import torch.nn.functional as F

from nanoseek.infer.kv_cache import ContiguousCache
from nanoseek.model import ModelConfig, Transformer
from nanoseek.model import layers

needs_onednn = pytest.mark.skipif(not layers._ONEDNN, reason="torch built without oneDNN (mkldnn) ops")


def bf16_error_bound(x, w, b=None):
    """How far plain F.linear in bf16 lands from the fp32 product: the fast path may differ from
    it by the same rounding (both accumulate in fp32 and round once), never by more than twice that."""
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    return ref, 2 * (F.linear(x, w, b).float() - ref).abs().max().item() + 1e-6


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 16, 64])
def test_bf16_linears_equal_f_linear(rows):
    torch.manual_seed(rows)
    w1, w2 = torch.randn(300, 64).bfloat16(), torch.randn(40, 64).bfloat16()
    bias = torch.randn(40).bfloat16()
    x = torch.randn(rows, 1, 64).bfloat16()
    with torch.inference_mode():
        a, c = layers.linears(x, (w1, w2), (None, bias))
        single = layers.linear(x, w2, bias)
    for got, w, b in ((a, w1, None), (c, w2, bias), (single, w2, bias)):
        ref, bound = bf16_error_bound(x, w, b)
        assert got.shape == (rows, 1, w.shape[0]) and got.dtype == torch.bfloat16
        assert (got.float() - ref).abs().max().item() <= bound


@needs_onednn
def test_bf16_linear_strided_input_and_expert_views():
    torch.manual_seed(0)
    stacked = torch.randn(4, 32, 64).bfloat16()         # like Experts.w1: select(0, e) views
    x = torch.randn(1, 1, 128).bfloat16()[..., ::2]     # a non-contiguous input
    with torch.inference_mode():
        for e in (2, 0, 3, 2):
            w = stacked.select(0, e)
            ref, bound = bf16_error_bound(x, w)
            assert (layers.linear(x, w).float() - ref).abs().max().item() <= bound


@pytest.mark.skipif(not (layers._FP16_GEMV and layers._ONEDNN), reason="needs FBGEMM and oneDNN")
def test_one_row_fp16_gemv_only_where_fp16_holds_the_weights():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 64).bfloat16()
    small = (torch.randn(32, 64) * 0.02).bfloat16()
    small[0, :4] = torch.tensor([1e-6, -3e-7, 5e-8, 2.0**-20])          # fp16 subnormals: rounded, by < 3e-8
    big = torch.randn(32, 64).bfloat16()
    big[3, 5] = 1e5                                                      # beyond fp16's range: not packed
    with torch.inference_mode():
        for w in (small, big):
            ref, bound = bf16_error_bound(x, w)
            assert (layers.linear(x, w).float() - ref).abs().max().item() <= bound
        assert layers.derived((small,), "fp16", layers._fp16_pack) is not None
        assert layers.derived((big,), "fp16", layers._fp16_pack) is None


@pytest.mark.parametrize("tall", [True, False])
def test_fp32_linear_equals_f_linear(tall, monkeypatch):
    monkeypatch.setattr(layers, "_TALL_FASTER", tall)        # both forms, whichever this CPU prefers
    calls = []
    monkeypatch.setattr(layers, "tall_mm", lambda x2, ws, f=layers.tall_mm: calls.append(1) or f(x2, ws))
    torch.manual_seed(0)
    w, b = torch.randn(96, 48), torch.randn(96)
    for rows in (1, 2, 8, 9):
        x = torch.randn(rows, 48)
        with torch.no_grad():
            got = layers.linear(x, w, b)
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert len(calls) == (3 if tall else 0)     # 1-8 rows take the tall form where it is faster


def test_tall_mm_choice_is_measured_once_or_set(monkeypatch):
    monkeypatch.setattr(layers, "_TALL_FASTER", None)
    monkeypatch.setenv("NANOSEEK_TALL_MM", "1")
    assert layers.tall_mm_is_faster() is True
    monkeypatch.setattr(layers, "_TALL_FASTER", None)
    monkeypatch.delenv("NANOSEEK_TALL_MM")
    measured = layers.tall_mm_is_faster()
    assert isinstance(measured, bool) and layers._TALL_FASTER is measured


@needs_onednn
def test_packed_weights_follow_in_place_updates():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 32).bfloat16())
    x = torch.randn(1, 32).bfloat16()
    with torch.no_grad():
        before = layers.linear(x, w)
        w.mul_(-2)                                      # what an optimizer step does: same tensor, new version
        after = layers.linear(x, w)
        torch.testing.assert_close(after, F.linear(x, w))
        assert not torch.equal(before, after)
        w.data = torch.randn(64, 32).bfloat16()         # new storage under the same Parameter
        torch.testing.assert_close(layers.linear(x, w), F.linear(x, w))
        stacked = torch.randn(3, 64, 32).bfloat16()
        layers.linear(x, stacked.select(0, 1))
        stacked[1].zero_()                              # a write through another view bumps the shared version
        assert layers.linear(x, stacked.select(0, 1)).abs().max() == 0


@needs_onednn
def test_derived_entries_die_with_their_weights():
    torch.manual_seed(0)
    x = torch.randn(1, 32).bfloat16()
    with torch.no_grad():
        for _ in range(5):          # freed weights and new ones, often at a reused address
            w = torch.randn(64, 32).bfloat16()
            torch.testing.assert_close(layers.linear(x, w), F.linear(x, w))
            ptr = w.data_ptr()
            del w
            gc.collect()
            assert not any(k[1] == ptr for k in layers._DERIVED if k[0] == "onednn" and len(k) == 4)


def test_derived_copies_stop_at_their_byte_budget(monkeypatch):
    """Past DERIVED_MAX_BYTES no copy is made: the linear and the absorbed attention take their plain
    paths, with the same results; freed weights give their bytes back."""
    torch.manual_seed(0)
    x = torch.randn(3, 32).bfloat16()
    w = torch.randn(64, 32).bfloat16()
    monkeypatch.setattr(layers, "DERIVED_MAX_BYTES", layers._derived_bytes + w.numel() * 2 - 1)
    with torch.no_grad():
        n = len(layers._DERIVED)
        torch.testing.assert_close(layers.linear(x, w), F.linear(x, w))
        assert len(layers._DERIVED) == n
        monkeypatch.setattr(layers, "DERIVED_MAX_BYTES", layers._derived_bytes + w.numel() * 2)
        torch.testing.assert_close(layers.linear(x, w), F.linear(x, w), atol=0.05, rtol=0.02)
        assert len(layers._DERIVED) == n + 1
        used = layers._derived_bytes
        del w
        gc.collect()
        assert layers._derived_bytes == used - 64 * 32 * 2 and len(layers._DERIVED) == n


def test_fallback_without_onednn(monkeypatch):
    monkeypatch.setattr(layers, "_ONEDNN", False)
    x, w = torch.randn(2, 16).bfloat16(), torch.randn(8, 16).bfloat16()
    with torch.no_grad():
        assert torch.equal(layers.linear(x, w), F.linear(x, w))


def small_model(dtype):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                      num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1)
    m = Transformer(cfg)
    m.init_weights(0.1)
    return m.eval().to(dtype)


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("copies", ["derived", "no budget for copies"])
def test_cached_decode_matches_full_forward_and_follows_weight_updates(dtype, cache_dtype, copies, monkeypatch):
    if copies != "derived":
        monkeypatch.setattr(layers, "DERIVED_MAX_BYTES", 0)       # every fast path on its plain fallback
    m = small_model(dtype)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    tol = 1e-4 if dtype == torch.float32 else 0.08     # bf16: one rounding per op, in another order

    def decode():
        cache = ContiguousCache(m.config, 2, 16, dtype=cache_dtype)
        steps = [m(ids[:, :4], cache=cache, absorb=False)[:, -1]]      # prefill on the clear path
        steps += [m(ids[:, t:t + 1], cache=cache)[:, 0] for t in range(4, 10)]
        return torch.stack(steps, 1).float()                             # (B, 7, V)

    with torch.inference_mode():
        full = m(ids)[:, 3:].float()
        assert (decode() - full).abs().max() < tol
        for layer in m.layers:      # in place, as an optimizer would: the cached W_UK / W_UV copies must follow
            layer.attn.wkv_b.weight.mul_(-1.5)
            layer.attn.wo.weight.mul_(0.5)
        full2 = m(ids)[:, 3:].float()
        assert (full2 - full).abs().max() > 10 * tol
        assert (decode() - full2).abs().max() < tol


def test_engine_keeps_fp32_latents_for_bf16_weights_on_cpu():
    from nanoseek.infer import Engine, SamplingParams
    m = small_model(torch.bfloat16)
    eng = Engine(m, max_batch=2, max_seq_len=32)
    assert eng.cache.kv.dtype == torch.float32 and eng.cache.dtype == torch.float32
    assert Engine(small_model(torch.float32), max_batch=2, max_seq_len=32).cache.kv.dtype == torch.float32
    assert Engine(m, max_batch=2, max_seq_len=32, cache_dtype=torch.bfloat16).cache.kv.dtype == torch.bfloat16
    prompt = [5, 17, 33, 2, 90]
    [c] = eng.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    ids = list(prompt)
    with torch.inference_mode():        # greedy by full forwards: the same tokens
        for _ in range(6):
            ids.append(int(m(torch.tensor([ids]))[0, -1].float().argmax()))
    assert c.token_ids == ids[len(prompt):]
