"""nanoseek vs llama.cpp on the same model, same threads, same run: prompt and decode tokens/s at batch 1,
then a batch of concurrent requests.

    .venv/bin/python bench/vs_llamacpp.py                       # small preset, 2 threads, f32 and bf16
    .venv/bin/python bench/vs_llamacpp.py --preset tiny --threads 1 --requests 16

The model is the `small` preset with random weights and a tokenizer trained on one sentence (prompts are
token ids; the GGUF just needs a vocabulary). Everything decodes greedily.
- nanoseek: its inference Engine (paged latent cache, continuous batching) and, as a floor, the bare
  model in a greedy loop over a ContiguousCache.
- llama.cpp: the exported GGUF (f32 KV cache for the f32 file, its default f16 cache for bf16) through
  llama-cpp-python's Llama (requests one after another, as that class serves them) and through llama.cpp's
  own batched decoding (one sequence id per request in a shared llama_batch, as llama-server does).
Each figure is the best of --repeats runs; prompt tok/s counts the time to the first token.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import llama_cpp
import numpy as np
import torch

from nanoseek.export import export_gguf
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.infer.kv_cache import ContiguousCache
from nanoseek.model import PRESETS, Transformer, preset
from nanoseek.tokenizer import Tokenizer


# --- the model: random weights, nonzero selection bias
def build_model_dir(path: Path, preset_name: str, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset(preset_name))
    model.init_weights()
    with torch.no_grad():
        for block in model.layers:
            gate = getattr(block.ffn, "gate", None)
            if gate is not None and gate.bias is not None:
                gate.bias.normal_(0.0, 0.01)
    model.save_pretrained(path)
    Tokenizer.train(["the quick brown fox jumps over the lazy dog"] * 4, vocab_size=300).save(path)
    return model.eval()


# --- the contestants: each gen(prompts, n) -> (seconds to the first token, seconds in all, token lists)
@torch.inference_mode()
def loop_generate(model: Transformer, prompts: list[list[int]], n: int):
    """Bare model: one forward for the (equal-length) prompts, then one token per step from the cache."""
    B, P = len(prompts), len(prompts[0])
    dtype = next(model.parameters()).dtype
    t0 = time.perf_counter()
    cache = ContiguousCache(model.config, B, P + n, dtype=dtype, layers=model.config.num_hidden_layers)
    out = [model(torch.tensor(prompts), cache=cache)[:, -1].argmax(-1)]
    t_first = time.perf_counter() - t0
    for _ in range(n - 1):
        out.append(model(out[-1][:, None], cache=cache)[:, -1].argmax(-1))
    return t_first, time.perf_counter() - t0, torch.stack(out, 1).tolist()


def engine_generate(engine: Engine, prompts: list[list[int]], n: int):
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    if len(prompts) > 1:                                   # the whole batch through the scheduler
        done = engine.generate(prompts, params)
        t = time.perf_counter() - t0
        return t, t, [c.token_ids for c in done]
    t_first, tokens = None, []
    for ev in engine.add_request(prompts[0], params):      # streamed: the first event is the first token
        if t_first is None and ev.token_ids:
            t_first = time.perf_counter() - t0
        tokens += ev.token_ids
    return t_first, time.perf_counter() - t0, [tokens]


def llama_generate(llm, prompts: list[list[int]], n: int):
    """llama-cpp-python's Llama, one request after another: eval the prompt, then one token per eval."""
    V = llm.n_vocab()
    t0, t_first, outs = time.perf_counter(), None, []
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt)
        out = []
        for i in range(n):
            out.append(int(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(V,)).argmax()))
            t_first = t_first or time.perf_counter() - t0
            if i < n - 1:
                llm.eval([out[-1]])
        outs.append(out)
    return t_first, time.perf_counter() - t0, outs


class LlamaBatched:
    """llama.cpp's parallel decoding: each request a sequence id in one llama_batch per step."""

    def __init__(self, llm, n_seq: int, n_ctx_per_seq: int, threads: int, f32_cache: bool):
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = n_seq * n_ctx_per_seq
        p.n_batch = p.n_ubatch = p.n_ctx
        p.n_seq_max = n_seq
        p.n_threads = p.n_threads_batch = threads
        p.flash_attn_type = llm.context_params.flash_attn_type           # as the Llama object
        if f32_cache:
            p.type_k = p.type_v = 0
        self.ctx = llama_cpp.llama_init_from_model(llm._model.model, p)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.batch = llama_cpp.llama_batch_init(p.n_ctx, 0, n_seq)
        self.V = llm.n_vocab()

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """items (token, position, sequence, wants logits) -> batch rows with logits."""
        b = self.batch
        b.n_tokens = len(items)
        for j, (tok, pos, seq, want) in enumerate(items):
            b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = tok, pos, 1, want
            b.seq_id[j][0] = seq
        if llama_cpp.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return [j for j, it in enumerate(items) if it[3]]

    def generate(self, prompts: list[list[int]], n: int):
        t0, t_first = time.perf_counter(), None
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        rows = self._decode([(t, i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)])
        out: list[list[int]] = [[] for _ in prompts]
        for step in range(n):
            for s, j in enumerate(rows):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, j), shape=(self.V,))
                out[s].append(int(logits.argmax()))
            t_first = t_first or time.perf_counter() - t0
            if step < n - 1:
                rows = self._decode([(out[s][-1], len(p) + step, s, True) for s, p in enumerate(prompts)])
        return t_first, time.perf_counter() - t0, out

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)


def best(gen, prompts: list[list[int]], n: int, repeats: int):
    """Fastest time to first token, fastest rest (decode) and total over `repeats` runs; the tokens."""
    runs = [gen(prompts, n) for _ in range(repeats)]
    return (min(r[0] for r in runs), min(r[1] - r[0] for r in runs), min(r[1] for r in runs), runs[-1][2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    workdir = tempfile.TemporaryDirectory(prefix="nanoseek-vs-llamacpp-")   # removed at exit
    tmp = Path(workdir.name)
    model = build_model_dir(tmp / "hf", args.preset, args.seed)
    P, N, R = args.prompt_len, args.new_tokens, args.requests
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(7, model.config.vocab_size, P).tolist() for _ in range(R)]
    print(f"{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, prompt {P} tokens, "
          f"{N} new, {R} concurrent requests, {args.threads} threads; torch {torch.__version__}, "
          f"llama-cpp-python {llama_cpp.__version__}")
    results: list[tuple[str, str, str, float]] = []   # (dtype, measure, contestant, tokens/s)
    for dt in args.dtypes.split(","):
        path = export_gguf(tmp / "hf", tmp / f"model-{dt}.gguf", dtype=dt, log=lambda s: None)
        model.to({"f32": torch.float32, "bf16": torch.bfloat16}[dt])
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=P + N + 8, n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False,
                              **({"type_k": 0, "type_v": 0} if dt == "f32" else {}))
        batched = LlamaBatched(llm, R, -(-(P + N + 8) // 256) * 256, args.threads, f32_cache=dt == "f32")
        engine = Engine(model, max_batch=R, max_seq_len=P + N + 8)
        contestants = {"nanoseek engine": lambda ps, n: engine_generate(engine, ps, n),
                       "nanoseek loop": lambda ps, n: loop_generate(model, ps, n),
                       "llama.cpp": lambda ps, n: llama_generate(llm, ps, n),
                       "llama.cpp batched": batched.generate}
        tokens = {}
        for name, gen in contestants.items():
            gen(prompts[:1], 4)                                                # warm-up
            t_first, t_decode, _, tokens[name] = best(gen, prompts[:1], N, args.repeats)
            results.append((dt, "prompt tok/s, batch 1", name, P / t_first))
            results.append((dt, "decode tok/s, batch 1", name, (N - 1) / t_decode))
            t_all = best(gen, prompts, N, args.repeats)[2]
            results.append((dt, f"{R} requests, generated tok/s", name, R * N / t_all))
        agree = {k: sum(a == b for a, b in zip(v[0], tokens["llama.cpp"][0])) for k, v in tokens.items()}
        print(f"[{dt}] greedy tokens equal to llama.cpp's (of {N}): {agree}")
        batched.close()
        llm.close()

    # --- report: each measure, every contestant, ratio of nanoseek's best to llama.cpp's best
    print(f"\n{'':<6}{'measure':<32}" + "".join(f"{c:>19}" for c in contestants) + f"{'ratio':>8}")
    for dt in args.dtypes.split(","):
        for measure in dict.fromkeys(m for d, m, _, _ in results if d == dt):
            row = {c: v for d, m, c, v in results if d == dt and m == measure}
            ours = max(v for c, v in row.items() if c.startswith("nanoseek"))
            theirs = max(v for c, v in row.items() if c.startswith("llama.cpp"))
            print(f"{dt:<6}{measure:<32}" + "".join(f"{row[c]:>19.1f}" for c in contestants) + f"{ours / theirs:>7.2f}x")
    print("ratio = best nanoseek / best llama.cpp (above 1: nanoseek faster)")


if __name__ == "__main__":
    main()
