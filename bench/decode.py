"""Generation speed: nanoseek's engine vs transformers' `generate` on the same weights, in the same run.

    .venv/bin/python bench/decode.py                          # small preset, batch 1 and 16
    .venv/bin/python bench/decode.py --preset tiny --new 32   # quick look

A random-init model is saved with save_pretrained and loaded by both sides (transformers'
DeepseekV3ForCausalLM via from_pretrained). For each batch size it reports prefill and decode
tokens/s and the ratio, and how far the two agree: identical greedy sequences and common prefixes
(in bf16 these part at the first near-tie that the two roundings decide differently), and top-1
agreement on one fixed sequence (teacher-forced) with the fp32 forward of the same weights, for
both sides' decode paths. Decode speed is (B * (new - 1)) / (time(new tokens) - time(1 token)), so the
prefill is taken out. Each figure is the best of --repeats runs, the two sides alternating so that
machine noise hits both alike.

Then MTP speculation: on random weights acceptance is meaningless (the MTP head guesses), so the
tiny model is also trained for a few hundred steps on repetitive text (main + MTP loss, ~1 min) and
the engine's acceptance rate and speed-up over plain decoding are reported on it.

On a machine other processes share, pass --threads 1: OpenMP threads spin-wait for each other, and
with more runnable threads than cores every op can stall for a scheduler tick (runs 10-100x slower).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from nanoseek.common import pick_device, pick_dtype
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.kv_cache import ContiguousCache, latent_bytes_per_token, mha_bytes_per_token
from nanoseek.infer.one_row import OneRowDecoder
from nanoseek.model import Transformer, preset


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


# --- the two generators
def hf_generate(hf, prompts: torch.Tensor, n: int):
    with torch.inference_mode():
        out = hf.generate(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True)
    return out.sequences[:, prompts.shape[1]:].tolist(), out.past_key_values


def ns_generate(engine: Engine, prompts: torch.Tensor, n: int):
    outs = engine.generate(prompts.tolist(), SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    return [c.token_ids for c in outs]


def hf_cache_bytes_per_token(cache, batch: int) -> tuple[float, str]:
    total, what = 0, None
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        total += k.numel() * k.element_size() + v.numel() * v.element_size()
        what = f"keys {tuple(k.shape[-1:])[0]} + values {tuple(v.shape[-1:])[0]} per token per layer"
        seq = k.shape[-2]
    return total / (batch * seq), what


def same_prefix(a: list[list[int]], b: list[list[int]]) -> tuple[int, int, float]:
    """(rows identical, shortest common prefix, mean common prefix)."""
    common = []
    for x, y in zip(a, b):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        common.append(k)
    return sum(x == y for x, y in zip(a, b)), min(common), sum(common) / len(common)


def teacher_forced_agreement(ours: Transformer, exact, prompts: torch.Tensor, hf_tokens: list[list[int]],
                             cache_dtype: torch.dtype) -> tuple[float, float]:
    """Greedy sequences part at the first near-tie that rounding decides differently, and in bf16 that
    comes early, so compare next-token choices on one fixed sequence instead: prompt + transformers'
    greedy tokens. Reference: `exact`, the fp32 full forward of the same weights (transformers' model
    upcast), argmax at each generated position: the choice the weights make without rounding.
    Returns the share of positions where (nanoseek's decode path at this batch size, one cached step at
    a time, the engine's cache dtype) and (transformers' own generate) pick the reference token."""
    B, P = prompts.shape
    seq = torch.cat([prompts, torch.tensor(hf_tokens, device=prompts.device)], dim=1)     # (B, P + N)
    N = seq.shape[1] - P
    with torch.inference_mode():
        ref = exact(seq).logits[:, P - 1:-1].float().argmax(-1)                         # (B, N)
        cache = ContiguousCache(ours.config, B, seq.shape[1], dtype=cache_dtype, device=prompts.device)
        steps = [ours(seq[:, :P], cache=cache, absorb=False)[:, -1]]                    # prefill, as the engine
        one_row = OneRowDecoder(ours) if B == 1 and OneRowDecoder.supports(ours, cache_dtype) else None
        if one_row is not None:
            one_row.patience = 0            # pack at once (the engine waits for the weights to hold still)
        for t in range(P, P + N - 1):       # the decode path the engine takes at this batch size
            if one_row is not None:
                steps.append(one_row.step(int(seq[0, t]), cache.prepare(1)[0], cache))
            else:
                steps.append(ours(seq[:, t:t + 1], cache=cache, absorb=True)[:, 0])
        mine = torch.stack(steps, 1).float().argmax(-1)                                  # (B, N)
    return (mine == ref).float().mean().item(), (seq[:, P:] == ref).float().mean().item()


# --- MTP training on repetitive text
def train_mtp_model(steps: int, device, seed: int = 0) -> tuple[Transformer, torch.Tensor]:
    """Tiny model trained on token streams that repeat a few fixed 'phrases' (main CE + MTP CE)."""
    torch.manual_seed(seed)
    m = Transformer(preset("tiny")).to(device)
    m.init_weights()
    phrases = [torch.randint(10, 500, (int(torch.randint(5, 12, ()).item()),)) for _ in range(8)]

    def stream(n):
        out = []
        while len(out) < n:
            out += phrases[int(torch.randint(0, len(phrases), ()))].tolist()
        return out[:n]

    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    m.train()
    for _ in range(steps):
        x = torch.tensor([stream(65) for _ in range(16)], device=device)
        out = m(x[:, :-1], return_mtp=True)
        loss = F.cross_entropy(out["logits"].flatten(0, 1), x[:, 1:].flatten()) + 0.5 * F.cross_entropy(
            out["mtp_logits"][0].flatten(0, 1), x[:, 2:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    m.eval()
    prompts = torch.tensor([stream(16) for _ in range(16)], device=device)
    return m, prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--mtp-steps", type=int, default=300, help="training steps of the tiny MTP model (0: skip)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)

    # --- setup
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    cfg = preset(args.preset)
    model = Transformer(cfg)
    model.init_weights()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        ours = Transformer.from_pretrained(d, dtype=dtype, device=device)
        hf = DeepseekV3ForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
    del model
    print(f"{args.preset}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params, {dtype}, {device}, "
          f"{torch.get_num_threads()} threads; prompt {args.prompt_len} tokens, {args.new} new tokens, "
          f"best of {args.repeats}")
    batches = [int(b) for b in args.batches.split(",")]
    max_batch = max(batches)
    engines = {False: Engine(ours, max_batch=max_batch, max_seq_len=args.prompt_len + args.new + 8)}
    if cfg.num_nextn_predict_layers:
        engines[True] = Engine(ours, max_batch=max_batch, max_seq_len=args.prompt_len + args.new + 8,
                               speculative=True)
    print(f"\n{'batch':>5} {'':<22} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/step':>8}")
    rows = {}
    for B in batches:
        prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=torch.Generator().manual_seed(B))
        best = {}
        for rep in range(args.repeats + 1):     # repeat 0 warms up: first calls, and the engine's one-row packs
            for name, run in [("transformers", lambda n: hf_generate(hf, prompts.to(device), n)[0]),
                              ("nanoseek", lambda n: ns_generate(engines[False], prompts, n)),
                              ("nanoseek +MTP", lambda n: ns_generate(engines[True], prompts, n))]:
                if name == "nanoseek +MTP" and True not in engines:
                    continue
                if rep == 0:        # (one-row packs wait for 64 single-row steps on unchanged weights)
                    for _ in range(-(-80 // max(args.new - 1, 1))):
                        run(args.new)
                    continue
                t1, _ = timed(lambda: run(1), device)
                tn, toks = timed(lambda: run(args.new), device)
                b = best.setdefault(name, [float("inf"), float("inf"), None])
                b[0], b[1], b[2] = min(b[0], t1), min(b[1], tn), toks
        for name, (t1, tn, toks) in best.items():
            prefill = B * args.prompt_len / t1
            decode = B * (args.new - 1) / max(tn - t1, 1e-9)
            rows[(B, name)] = (prefill, decode)
            print(f"{B:>5} {name:<22} {prefill:>14.0f} {decode:>13.1f} {1e3 * (tn - t1) / (args.new - 1):>8.2f}")
        ref = best["transformers"][2]
        for name in [n for n in best if n != "transformers"]:
            same, prefix, mean = same_prefix(best[name][2], ref)
            print(f"      greedy tokens ({name} vs transformers): {same}/{B} sequences identical; common prefix "
                  f"shortest {prefix}, mean {mean:.1f} of {args.new}")
        exact = hf if dtype == torch.float32 else copy.deepcopy(hf).float()
        ours_top1, hf_top1 = teacher_forced_agreement(ours, exact, prompts.to(device), ref, engines[False].cache_dtype)
        del exact
        print(f"      teacher-forced on transformers' tokens, top-1 agreement with the fp32 forward of the same "
              f"weights: nanoseek decode steps {ours_top1:.1%}, transformers' generate {hf_top1:.1%}")
        for name in [n for n in best if n != "transformers"]:
            pre = rows[(B, name)][0] / rows[(B, "transformers")][0]
            dec = rows[(B, name)][1] / rows[(B, "transformers")][1]
            print(f"      {name} / transformers: prefill {pre:.2f}x, decode {dec:.2f}x")
        if True in engines:
            st = engines[True].stats
            print(f"      MTP acceptance on random weights (meaningless): "
                  f"{st['accepted'] / max(st['drafted'], 1):.1%}")

    # --- KV cache bytes per token
    _, cache = hf_generate(hf, torch.randint(0, cfg.vocab_size, (1, 8), device=device), 4)
    hf_bytes, what = hf_cache_bytes_per_token(cache, 1)
    cdt = engines[False].cache_dtype
    print(f"\nKV cache per token: nanoseek {latent_bytes_per_token(cfg, cdt):,} B in {cdt} "
          f"(latent {cfg.kv_lora_rank} + rope key {cfg.qk_rope_head_dim} per layer; "
          f"+MTP layer when speculating: {latent_bytes_per_token(cfg, cdt, mtp=True):,} B; "
          f"{latent_bytes_per_token(cfg, dtype):,} B in {dtype}); "
          f"transformers stores {hf_bytes:,.0f} B ({what}) but re-expands it through kv_b_proj every step; "
          f"plain MHA would be {mha_bytes_per_token(cfg, dtype):,} B")

    # --- speculation on a trained MTP head
    if args.mtp_steps:
        t, (m, prompts) = timed(lambda: train_mtp_model(args.mtp_steps, device, args.seed), device)
        print(f"\ntiny model trained {args.mtp_steps} steps on repetitive text ({t:.0f} s):")
        for B in (1, 16):
            res = {}
            for spec in (False, True):
                eng = Engine(m, max_batch=16, speculative=spec)
                sp = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)
                eng.generate(prompts[:B].tolist(), SamplingParams(max_tokens=4, temperature=0.0))   # warm up
                eng.stats.update(drafted=0, accepted=0, steps=0)
                best = float("inf")
                for _ in range(args.repeats):
                    dt, outs = timed(lambda: eng.generate(prompts[:B].tolist(), sp), device)
                    best = min(best, dt)
                res[spec] = (best, [c.token_ids for c in outs], dict(eng.stats))
            (t0, plain, _), (t1, spec_out, st) = res[False], res[True]
            print(f"  batch {B:>2}: plain {B * args.new / t0:7.1f} tok/s, +MTP {B * args.new / t1:7.1f} tok/s "
                  f"({t0 / t1:.2f}x), acceptance {st['accepted'] / max(st['drafted'], 1):.1%}, "
                  f"{st['steps'] / args.repeats:.0f} verify steps for {args.new} tokens, "
                  f"same tokens as plain: {plain == spec_out}")


if __name__ == "__main__":
    main()
