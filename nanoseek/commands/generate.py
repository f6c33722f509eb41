"""Continue a prompt with a model, streaming the text to the terminal.

    nanoseek generate --model runs/demo/final --prompt "Once upon a time" --max-tokens 64
    nanoseek generate --model DIR --prompt "2+2=" --temperature 0 --speculative --stats
    nanoseek generate --model DIR --prompt-ids 0,17,42 --max-tokens 8     # no tokenizer.json needed

The model directory is a Hugging Face one (config.json, *.safetensors, tokenizer.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nanoseek.commands import _checks as checks
from nanoseek.common import pick_device, pick_dtype


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        ids = []
    if not ids:
        raise SystemExit(f"nanoseek generate: --prompt-ids {text!r}: expected integers separated by commas")
    return ids


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nanoseek generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory (config.json, safetensors, tokenizer.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="prompt as token ids, e.g. 0,17,42")
    p.add_argument("--no-bos", action="store_true", help="do not put the begin-of-sentence token first")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    p.add_argument("--stats", action="store_true", help="print token counts, speed and MTP acceptance to stderr")
    p.add_argument("--device", default=None, help="cuda if present, else cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: fp32 on cpu, bf16 on cuda)")
    args = p.parse_args(argv)

    # --- load
    from nanoseek.checkpoint import CheckpointError
    from nanoseek.infer import Engine, SamplingParams
    from nanoseek.model import Transformer

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model_dir = Path(args.model)
    try:
        model = Transformer.from_pretrained(model_dir, dtype=dtype, device=device)
        tokenizer = None
        if (model_dir / "tokenizer.json").is_file():
            from nanoseek.tokenizer import Tokenizer
            tokenizer = Tokenizer.from_dir(model_dir)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        raise SystemExit(f"nanoseek generate: cannot load a model from {model_dir}: {e}")
    if tokenizer is None and args.prompt is not None:
        raise SystemExit(f"nanoseek generate: {model_dir} has no tokenizer.json; give --prompt-ids instead of --prompt")
    if tokenizer is None and args.stop:
        raise SystemExit(f"nanoseek generate: {model_dir} has no tokenizer.json, so --stop strings cannot be matched")
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise SystemExit(f"nanoseek generate: the tokenizer in {model_dir} has {tokenizer.vocab_size} tokens but the "
                         f"model's vocab_size is {model.config.vocab_size}: they do not belong together")

    # --- prompt
    if args.prompt is not None:
        checks.utf8("generate", args.prompt, "--prompt is not valid UTF-8")
        ids = tokenizer.encode(args.prompt, add_bos=not args.no_bos)
    else:
        ids = parse_ids(args.prompt_ids)
        bos = model.config.bos_token_id
        if not args.no_bos and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            stop=args.stop, seed=args.seed, ignore_eos=args.ignore_eos)

    # --- generate, streaming
    try:
        engine = Engine(model, tokenizer, max_batch=1, speculative=args.speculative)
        request = engine.add_request(ids, params)
        engine.start()
    except ValueError as e:
        raise SystemExit(f"nanoseek generate: {e}")
    if args.prompt is not None:
        print(args.prompt, end="", flush=True)
    t0 = time.perf_counter()
    first = None
    last = None
    for ev in request:
        if first is None:
            first = time.perf_counter()
        if tokenizer is not None:
            print(ev.text, end="", flush=True)
        else:
            print(" ".join(map(str, ev.token_ids)), end=" " if not ev.finished else "", flush=True)
        last = ev
    print()
    engine.stop()

    # --- stats
    if args.stats:
        dt = time.perf_counter() - t0
        decode = time.perf_counter() - first
        st = engine.stats
        msg = (f"[{last.prompt_tokens} prompt + {last.completion_tokens} generated tokens, finish: "
               f"{last.finish_reason}; {dt:.2f} s, first token {first - t0:.2f} s, "
               f"{max(last.completion_tokens - 1, 0) / max(decode, 1e-9):.1f} tok/s after it")
        if args.speculative:
            msg += f"; MTP acceptance {st['accepted'] / max(st['drafted'], 1):.0%} of {st['drafted']} drafts"
        print(msg + "]", file=sys.stderr)
