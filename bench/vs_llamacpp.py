"""nanoseek vs llama.cpp on the same model, same threads, same run: prompt and decode tokens/s at batch 1,
then a batch of concurrent requests.

    .venv/bin/python bench/vs_llamacpp.py                       # small preset, 2 threads, f32 and bf16
    .venv/bin/python bench/vs_llamacpp.py --preset tiny --threads 1 --requests 16

The model is the `small` preset with random weights and a byte-level tokenizer with one merge (prompts are
token ids, so the tokenizer only has to exist for the export). Both sides decode greedily; llama.cpp runs
the exported GGUF (f32 KV cache for the f32 file, its default f16 cache for bf16), through llama-cpp-python
(one request at a time, as its Llama class serves them) and through llama.cpp's own batched decoding
(one sequence id per request in a shared batch). Each timing is the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import llama_cpp
from nanoseek.export import export_gguf
from nanoseek.infer.kv_cache import ContiguousCache
from nanoseek.model import PRESETS, Transformer, preset

SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]


# --- the model: random weights, a byte-level tokenizer with a single merge
def build_model_dir(path: Path, preset_name: str, seed: int) -> Transformer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    torch.manual_seed(seed)
    model = Transformer(preset(preset_name))
    model.init_weights()
    with torch.no_grad():
        for block in model.layers:
            gate = getattr(block.ffn, "gate", None)
            if gate is not None and gate.bias is not None:
                gate.bias.normal_(0.0, 0.01)
    model.save_pretrained(path)
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(byte_chars))}
    vocab["Ġt"] = len(vocab)                                           # llama.cpp wants >= 1 merge
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": SPECIALS[0], "eos_token": SPECIALS[1]}))
    return model.eval()


def best(fn, repeats: int) -> tuple[float, float, list]:
    """Run fn() -> (prefill s, decode s, tokens) `repeats` times; the fastest prefill and decode."""
    runs = [fn() for _ in range(repeats)]
    return min(r[0] for r in runs), min(r[1] for r in runs), runs[-1][2]


def serially(fn, prompts, n_new):
    """Requests one after another: summed prefill and decode times."""
    runs = [fn(p, n_new) for p in prompts]
    return sum(r[0] for r in runs), sum(r[1] for r in runs), [r[2] for r in runs]


# --- nanoseek: prefill the prompt(s) in one forward, then one token per step from the latent cache
@torch.inference_mode()
def nanoseek_generate(model: Transformer, prompts: list[list[int]], n_new: int, dtype: torch.dtype):
    B, P = len(prompts), len(prompts[0])
    cache = ContiguousCache(model.config, B, P + n_new, dtype=dtype, layers=model.config.num_hidden_layers)
    t0 = time.perf_counter()
    logits = model(torch.tensor(prompts), cache=cache)[:, -1]
    t_prefill = time.perf_counter() - t0
    out = []
    for _ in range(n_new):
        nxt = logits.argmax(-1)                                        # (B,)
        out.append(nxt)
        logits = model(nxt[:, None], cache=cache)[:, -1]
    t_total = time.perf_counter() - t0
    return t_prefill, t_total - t_prefill, torch.stack(out, 1).tolist()


# --- llama.cpp through llama-cpp-python: one request at a time
def llama_generate(llm, prompt: list[int], n_new: int):
    n_vocab = llm.n_vocab()
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t_prefill = time.perf_counter() - t0
    out = []
    for _ in range(n_new):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
        out.append(int(logits.argmax()))
        llm.eval([out[-1]])
    t_total = time.perf_counter() - t0
    return t_prefill, t_total - t_prefill, out


# --- llama.cpp batched: every request its own sequence id in one llama_batch (llama-batched's scheme)
class LlamaBatched:
    def __init__(self, llm, n_seq: int, n_ctx_per_seq: int, threads: int, f32_cache: bool):
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = n_seq * n_ctx_per_seq
        p.n_batch = p.n_ubatch = p.n_ctx
        p.n_seq_max = n_seq
        p.n_threads = p.n_threads_batch = threads
        p.flash_attn_type = llm.context_params.flash_attn_type           # as the Llama object above
        if f32_cache:
            p.type_k = p.type_v = 0
        self.ctx = llama_cpp.llama_init_from_model(llm._model.model, p)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.batch = llama_cpp.llama_batch_init(p.n_ctx, 0, n_seq)
        self.n_seq, self.n_vocab = n_seq, llm.n_vocab()

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        b.n_tokens = len(items)
        for j, (tok, pos, seq, want) in enumerate(items):
            b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = tok, pos, 1, want
            b.seq_id[j][0] = seq
        if llama_cpp.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def generate(self, prompts: list[list[int]], n_new: int):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        t0 = time.perf_counter()
        items = [(t, i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)]
        self._decode(items)
        rows = [j for j, it in enumerate(items) if it[3]]
        t_prefill = time.perf_counter() - t0
        out: list[list[int]] = [[] for _ in prompts]
        for step in range(n_new):
            for s, j in enumerate(rows):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, j), shape=(self.n_vocab,))
                out[s].append(int(logits.argmax()))
            items = [(out[s][-1], len(prompts[s]) + step, s, True) for s in range(len(prompts))]
            self._decode(items)
            rows = list(range(len(prompts)))
        t_total = time.perf_counter() - t0
        return t_prefill, t_total - t_prefill, out

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=8, help="concurrent requests in the batched comparison")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    # --- setup: one model, exported once per dtype
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="nanoseek-vs-llamacpp-"))
    model = build_model_dir(tmp / "hf", args.preset, args.seed)
    V = model.config.vocab_size
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(3, V, args.prompt_len).tolist() for _ in range(args.requests)]
    P, N, R = args.prompt_len, args.new_tokens, args.requests
    print(f"{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"prompt {P}, {N} new tokens, {R} requests, {args.threads} threads, torch {torch.__version__}, "
          f"llama-cpp-python {llama_cpp.__version__}")
    rows = []
    for dt in args.dtypes.split(","):
        gguf_path = export_gguf(tmp / "hf", tmp / f"model-{dt}.gguf", dtype=dt, log=lambda s: None)
        tdtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dt]
        ours = model.to(tdtype)
        llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=P + N + 8, n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False,
                              **({"type_k": 0, "type_v": 0} if dt == "f32" else {}))
        # llama.cpp pads each sequence's cache to 256 cells
        batched = LlamaBatched(llm, R, -(-(P + N + 8) // 256) * 256, args.threads, f32_cache=dt == "f32")

        # --- batch 1
        nanoseek_generate(ours, prompts[:1], 4, tdtype)                # warm-up
        llama_generate(llm, prompts[0], 4)
        batched.generate(prompts, 4)
        tp_n, td_n, toks_n = best(lambda: nanoseek_generate(ours, prompts[:1], N, tdtype), args.repeats)
        tp_l, td_l, toks_l = best(lambda: llama_generate(llm, prompts[0], N), args.repeats)
        same = sum(a == b for a, b in zip(toks_n[0], toks_l))
        rows.append((dt, "prompt tok/s, batch 1", P / tp_n, P / tp_l))
        rows.append((dt, "decode tok/s, batch 1", N / td_n, N / td_l))

        # --- R concurrent requests: nanoseek batches them; llama.cpp serially and batched
        t_n = sum(best(lambda: nanoseek_generate(ours, prompts, N, tdtype), args.repeats)[:2])
        t_s = sum(best(lambda: serially(lambda p, n: llama_generate(llm, p, n), prompts, N), args.repeats)[:2])
        t_b = sum(best(lambda: batched.generate(prompts, N), args.repeats)[:2])
        rows.append((dt, f"{R} requests, generated tok/s (llama.cpp one at a time)", R * N / t_n, R * N / t_s))
        rows.append((dt, f"{R} requests, generated tok/s (llama.cpp batched)", R * N / t_n, R * N / t_b))
        print(f"[{dt}] greedy tokens agree on {same}/{N} (batch 1; bf16 rounding may diverge)")
        batched.close()
        llm.close()

    # --- report
    print(f"\n{'dtype':<6}{'measure':<58}{'nanoseek':>10}{'llama.cpp':>11}{'ratio':>8}")
    for dt, what, a, b in rows:
        print(f"{dt:<6}{what:<58}{a:>10.1f}{b:>11.1f}{a / b:>7.2f}x")
    print("ratio = nanoseek / llama.cpp (above 1: nanoseek faster)")


if __name__ == "__main__":
    main()
