"""Train a byte-level BPE tokenizer with DeepSeek's special tokens and chat format, or try one out.

    nanoseek tokenizer --data data/tinyshakespeare/input.txt --vocab-size 2048 --out runs/tok
    nanoseek tokenizer --load runs/tok --encode "To be, or not to be"

--data takes .txt/.jsonl/.parquet files or directories, read as `nanoseek data` reads them. The output
directory holds tokenizer.json and tokenizer_config.json (transformers' AutoTokenizer loads it).
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Iterator
from pathlib import Path

from nanoseek.commands import _checks as checks
from nanoseek.data.pretrain import find_inputs, read_documents
from nanoseek.tokenizer import MAX_VOCAB, Tokenizer


def limited(docs: Iterator[str], max_chars: int | None) -> Iterator[str]:
    """Stop after max_chars characters (the last document cut short): BPE counts saturate early."""
    left = max_chars
    for d in docs:
        if left is not None:
            if left <= 0:
                return
            d, left = d[:left], left - len(d)
        yield d


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nanoseek tokenizer", description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", help="text files or directories to train on")
    p.add_argument("--vocab-size", type=int, default=4096, help="upper bound, specials and 256 bytes included")
    p.add_argument("--out", help="directory to write the tokenizer to")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet column holding the text")
    p.add_argument("--split-lines", action="store_true", help=".txt: each non-blank line is a document")
    p.add_argument("--max-chars", type=int, default=None, help="train on at most this many characters")
    p.add_argument("--load", help="an existing tokenizer directory (instead of training)")
    p.add_argument("--encode", help="text to show as tokens with the trained or loaded tokenizer")
    args = p.parse_args(argv)
    if not args.load and not (args.data and args.out):
        p.error("give --data and --out to train, or --load DIR to inspect")
    if args.load and (args.data or args.out):
        p.error("--load inspects a tokenizer, --data and --out train one: give one or the other")
    if args.max_chars is not None and args.max_chars < 1:
        raise SystemExit(f"nanoseek tokenizer: --max-chars must be >= 1, got {args.max_chars}")
    if args.encode is not None:
        checks.utf8("tokenizer", args.encode, "--encode is not valid UTF-8")
    if args.out and not args.load:
        if args.vocab_size > MAX_VOCAB:
            raise SystemExit(f"nanoseek tokenizer: --vocab-size must be at most {MAX_VOCAB}, got {args.vocab_size}")
        out = checks.out_folder("tokenizer", args.out)     # before training: not a file, not under one, writable
        for name in ("tokenizer.json", "config.json"):   # another tokenizer, or a model whose ids it fixes
            if (out / name).exists():
                raise SystemExit(f"nanoseek tokenizer: {out} already holds a {name}; choose another --out")

    def documents() -> Iterator[str]:
        for path in find_inputs(args.data):
            yield from read_documents(path, args.text_field, args.split_lines)

    try:
        # --- train or load
        if args.load:
            tok = Tokenizer.from_dir(args.load)
        else:
            t0 = time.time()
            if not any(d.strip() for d in limited(documents(), args.max_chars)):
                raise ValueError(f"no text in {', '.join(args.data)}: every file or field is empty")
            tok = Tokenizer.train(limited(documents(), args.max_chars), args.vocab_size)
            tok.save(args.out)
            print(f"trained vocab {tok.vocab_size} in {time.time() - t0:.1f}s -> {args.out}/tokenizer.json")

            # --- compression on (a prefix of) the training text
            sample = "".join(itertools.islice(limited(documents(), 1_000_000), 1000))
            n = len(tok.encode(sample))
            print(f"{len(sample):,} characters -> {n:,} tokens: {len(sample) / max(n, 1):.2f} characters/token")
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"nanoseek tokenizer: {e}") from None
    except OSError as e:                        # writing the tokenizer: the disk
        raise SystemExit(f"nanoseek tokenizer: writing {args.out}: {e.strerror or e}") from None

    # --- show
    print(f"special ids: bos {tok.bos_id} eos {tok.eos_id} pad {tok.pad_id} user {tok.user_id} "
          f"assistant {tok.assistant_id} think {tok.think_id} end_think {tok.end_think_id}")
    if args.encode is not None:
        ids = tok.encode(args.encode)
        print(ids)
        print(" ".join(tok.backend.id_to_token(i) for i in ids))  # byte-level symbols: Ġ is a space
