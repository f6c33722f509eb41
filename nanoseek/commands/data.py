"""Tokenize text (.txt, .jsonl, .parquet) into train/validation token shards for pretraining.

    nanoseek data --input data/tinyshakespeare/input.txt --tokenizer runs/tok --out runs/shakespeare \\
        --val-fraction 0.1
    nanoseek data --input corpus/ --tokenizer runs/tok --out runs/corpus --text-field content

A .txt file is one document (--split-lines: each non-blank line is one); .jsonl and .parquet give one
document per row from --text-field. The output directory holds meta.json, train_*.bin / val_*.bin
(uint16 or uint32 token ids, documents separated by eos) and a copy of the tokenizer; see
nanoseek/data/pretrain.py for the format and the split rule.
"""

from __future__ import annotations

import argparse
import time

from nanoseek.commands import _checks as checks
from nanoseek.data.pretrain import build_shards
from nanoseek.tokenizer import Tokenizer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nanoseek data", description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="files or directories (searched recursively)")
    p.add_argument("--tokenizer", required=True, help="directory with tokenizer.json (e.g. from `nanoseek tokenizer`)")
    p.add_argument("--out", required=True, help="output directory (old shards in it are replaced)")
    p.add_argument("--val-fraction", type=float, default=0.005, help="share of documents (or, for one document, of its tail tokens) held out "
                                                                 "(default 0.005; `pretrain` on a raw text file holds out 0.1)")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet column holding the text")
    p.add_argument("--split-lines", action="store_true", help=".txt: each non-blank line is a document")
    p.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard file")
    args = p.parse_args(argv)

    checks.out_folder("data", args.out)       # not a file, not under one, writable: before any tokenizing

    # --- tokenize and write (every input problem surfaces as one line naming the file)
    t0 = time.time()
    try:
        tok = Tokenizer.from_dir(args.tokenizer)
        meta = build_shards(args.input, tok, args.out, val_fraction=args.val_fraction, text_field=args.text_field,
                            split_lines=args.split_lines, shard_tokens=args.shard_tokens, progress=True)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"nanoseek data: {e}") from None
    except OSError as e:                        # the disk: full, or a file that cannot be written
        raise SystemExit(f"nanoseek data: writing {args.out}: {e.strerror or e}") from None

    # --- report
    print(f"{len(meta['sources'])} file(s), tokenizer vocab {meta['vocab_size']}, {meta['dtype']}, "
          f"split by {meta['split_by']}")
    for name, s in meta["splits"].items():
        docs = f"  {s['documents']:>9,} documents" if meta["split_by"] == "document" else ""   # a tail split: one text
        print(f"{name:>5}: {s['tokens']:>12,} tokens{docs}  {len(s['shards'])} shard(s)")
    print(f"{time.time() - t0:.1f}s -> {args.out}/meta.json")
