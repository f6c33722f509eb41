"""Pretraining data: documents -> token shards on disk -> (x, y) batches, resumable and rank-split.

On disk (what `nanoseek data` writes):

    out/meta.json            dtype, vocab, tokenizer hash, token/document counts, shard list per split
    out/train_000000.bin     raw little-endian uint16 (vocab <= 65536) or uint32 token ids, no header,
    out/val_000000.bin       read back with np.memmap; documents are laid end to end as doc eos doc eos
    out/tokenizer/           the tokenizer that made them (tokenizer.json + tokenizer_config.json)

Split: a document goes to validation when a hash of its text falls under --val-fraction, so the split
does not depend on file order and exact duplicates never straddle it. A corpus with too few documents
to draw any (tinyshakespeare is one file = one document) gets the last val-fraction of its token
stream instead, so it still has a real held-out tail.

Loading: the stream is cut into windows of seq_len + 1 tokens at stride seq_len (x = window[:-1],
y = window[1:]). Each epoch visits the windows in a seeded permutation; global batch s is windows
[s*B*W, (s+1)*B*W) of it and rank r takes its r-th slice of B. So the ranks read disjoint windows,
their batches stacked in rank order are exactly one rank's batch of B*W, and (epoch, step) is the
whole position: a resumed loader yields the same batches as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from nanoseek.common import missing_folders, read_json_object, remove_empty
from nanoseek.tokenizer import Tokenizer

SUFFIXES = (".txt", ".jsonl", ".parquet")
FORMAT_VERSION = 1
# Explicit little-endian so a shard written on one machine reads the same on any other.
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


# --- reading documents

def find_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand files and directories (searched recursively, sorted) into .txt/.jsonl/.parquet files."""
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
            if not found:
                raise ValueError(f"{p}: no {', '.join(SUFFIXES)} files inside")
            files += found
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise ValueError(f"{p}: unknown file type {p.suffix!r}; expected one of {', '.join(SUFFIXES)}")
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return files


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (bad byte 0x{raw[e.start]:02x} at offset {e.start}); "
                         "convert it first, e.g. `iconv -f latin1 -t utf-8`") from None


def read_documents(path: str | Path, text_field: str = "text", split_lines: bool = False) -> Iterator[str]:
    """The non-empty documents of one file.

    .txt: the whole file is one document, or each non-blank line with split_lines.
    .jsonl: one JSON object per line, its `text_field`. .parquet: the `text_field` column.
    """
    path = Path(path)
    try:
        yield from _read_documents(path, text_field, split_lines)
    except PermissionError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a file") from None


def _text(value, where: str, field: str) -> str:
    """A document's text: a str that UTF-8 can hold (a lone surrogate from a JSON escape cannot)."""
    if isinstance(value, bytes):        # a binary column: held to the same UTF-8 rule
        value = _utf8(value, where)
    if not isinstance(value, str):
        raise ValueError(f"{where}: {field!r} is {type(value).__name__}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where}: {field!r} is not valid Unicode (a lone surrogate, e.g. from a \\ud800 "
                         "escape)") from None
    return value


def _read_documents(path: Path, text_field: str, split_lines: bool) -> Iterator[str]:
    if path.suffix == ".txt":
        text = _utf8(path.read_bytes(), str(path))
        docs = (line for line in text.split("\n") if line.strip()) if split_lines else [text]
        yield from (d for d in docs if d)
    elif path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                where = f"{path}:{n}"
                line = _utf8(raw[3:] if n == 1 and raw.startswith(b"\xef\xbb\xbf") else raw, where).strip()   # a BOM
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not JSON ({e.msg})") from None
                if not isinstance(obj, dict) or text_field not in obj:
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise ValueError(f"{where}: no {text_field!r} field (found {keys}); choose with --text-field")
                text = _text(obj[text_field], where, text_field)
                if text:
                    yield text
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit("reading .parquet needs pyarrow: pip install 'nanoseek[data]'") from None
        try:
            pf = pq.ParquetFile(path)
        except (OSError, ValueError) as e:      # pyarrow's ArrowInvalid is a ValueError
            raise ValueError(f"{path}: not a parquet file pyarrow can read ({e})") from None
        if text_field not in pf.schema_arrow.names:
            raise ValueError(f"{path}: no column {text_field!r} (found {pf.schema_arrow.names}); "
                             "choose with --text-field")
        row = 0
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None:
                    continue
                text = _text(value, f"{path}: row {row}", text_field)
                if text:
                    yield text
    else:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}")


# --- writing shards

class _SplitWriter:
    """Appends token arrays for one split and cuts them into shard files of shard_tokens each."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []  # {"file", "tokens"} in stream order
        self.buf: list[np.ndarray] = []
        self.n_buf = 0
        self.documents = 0

    def add(self, tokens: np.ndarray, documents: int = 1) -> None:
        self.buf.append(tokens)
        self.n_buf += len(tokens)
        self.documents += documents
        while self.n_buf >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        data = np.concatenate(self.buf)
        name = f"{self.split}_{len(self.shards):06d}.bin"
        data[:n].tofile(self.out_dir / name)
        self.shards.append({"file": name, "tokens": int(n)})
        self.buf, self.n_buf = [data[n:]], len(data) - n

    def close(self) -> None:
        if self.n_buf:  # never write a zero-length shard
            self._flush(self.n_buf)

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self.n_buf


def _is_val(text: str, val_fraction: float) -> bool:
    # content hash -> uniform in [0, 1): independent of order and of Python's per-process hash seed
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64 < val_fraction


def _move_tail(train: _SplitWriter, val: _SplitWriter, n: int, eos_id: int) -> None:
    """Move the last n tokens of the (closed) train split into val, shrinking train's files."""
    taken = []
    while n > 0:
        last = train.shards[-1]
        path = train.out_dir / last["file"]
        k = min(n, last["tokens"])
        mm = np.memmap(path, dtype=train.dtype, mode="r")
        taken.append(np.array(mm[last["tokens"] - k:]))
        del mm  # release the mapping before truncating the file under it
        if k == last["tokens"]:
            path.unlink()
            train.shards.pop()
        else:
            last["tokens"] -= k
            os.truncate(path, last["tokens"] * train.dtype.itemsize)
        n -= k
    tail = np.concatenate(taken[::-1])
    docs = int((tail == eos_id).sum())  # documents = eos-terminated documents in the split
    train.documents -= docs
    val.add(tail, documents=docs)


def write_shards(documents: Iterable[str], tokenizer: Tokenizer, out_dir: str | Path,
                 val_fraction: float = 0.005, shard_tokens: int = 1 << 27,
                 sources: list[str] | None = None, batch_docs: int = 256) -> dict:
    """Tokenize `documents` (plain text: special-token strings are not parsed) into out_dir.

    Returns the meta dict also written to out_dir/meta.json. The new shards are written into
    out_dir/.staging and replace the old ones (shards, meta.json, tokenizer/) only once all are
    written: bad input (an empty or non-UTF-8 file) leaves the old shards as they were.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction {val_fraction} must be in [0, 1)")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens {shard_tokens} must be >= 1")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give a folder for the shards")
    _check_replaceable(out)
    made = missing_folders(out)
    stage = out / ".staging"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        meta = _write_shards(documents, tokenizer, stage, val_fraction, shard_tokens, sources, batch_docs)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        remove_empty(made)      # nothing of this run is left: the folders it made go while empty
        raise
    # swap: old shards out, new ones in, meta.json last (a reader without meta.json refuses the folder)
    for old in [out / "meta.json", *out.glob("train_*.bin"), *out.glob("val_*.bin")]:
        old.unlink(missing_ok=True)
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    for f in sorted(stage.iterdir(), key=lambda f: f.name == "meta.json"):
        os.replace(f, out / f.name)
    stage.rmdir()
    return meta


def _check_replaceable(out: Path) -> None:
    """The shards replace only what `nanoseek data` wrote: a meta.json of another kind, or a tokenizer/
    folder beside no shards of ours, is the user's and is not overwritten."""
    meta, tok = out / "meta.json", out / "tokenizer"
    ours = False
    if meta.exists():
        try:
            ours = read_json_object(meta).get("version") == FORMAT_VERSION
        except ValueError:      # not JSON, not an object, not readable (a folder)
            ours = False
        if not ours:
            raise ValueError(f"{out} holds a meta.json that `nanoseek data` did not write; choose another --out")
    if tok.exists() and not ours:
        raise ValueError(f"{out} holds a tokenizer/ folder but no shards of `nanoseek data`; choose another --out")


def _write_shards(documents: Iterable[str], tokenizer: Tokenizer, out: Path, val_fraction: float,
                  shard_tokens: int, sources: list[str] | None, batch_docs: int) -> dict:
    if tokenizer.vocab_size > 2**32:
        raise ValueError(f"vocab size {tokenizer.vocab_size} does not fit uint32")
    dtype_name = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
    dtype = _DTYPES[dtype_name]
    writers = {s: _SplitWriter(out, s, dtype, shard_tokens) for s in ("train", "val")}
    eos = tokenizer.eos_id
    first = True

    def flush(batch: list[str]) -> None:
        nonlocal first
        for text, ids in zip(batch, tokenizer.encode_batch(batch)):
            # the first document always trains, so a tiny corpus never ends up with an empty train split
            split = "val" if not first and _is_val(text, val_fraction) else "train"
            first = False
            writers[split].add(np.array([*ids, eos], dtype=dtype))

    batch: list[str] = []
    for doc in documents:
        if not doc:
            continue
        batch.append(doc)
        if len(batch) == batch_docs:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if first:
        where = ", ".join(sources) if sources else "the input"
        raise ValueError(f"no text in {where}: every file or field is empty")
    for w in writers.values():
        w.close()

    split_by = "document"
    train, val = writers["train"], writers["val"]
    if val_fraction > 0 and val.tokens == 0:
        n = int(np.ceil(train.tokens * val_fraction))
        if n >= train.tokens:
            raise ValueError(f"only {train.tokens} tokens: too few to hold out {val_fraction:.1%} for "
                             "validation; add text or pass --val-fraction 0")
        _move_tail(train, val, n, eos)
        val.close()
        split_by = "tail"

    tok_dir = out / "tokenizer"
    tokenizer.save(tok_dir)
    meta = {
        "version": FORMAT_VERSION,
        "format": "documents end to end, each followed by eos; raw little-endian token ids",
        "dtype": dtype_name,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": eos,
        "tokenizer_sha256": tokenizer.sha256,
        "tokenizer": tok_dir.name,
        "val_fraction": val_fraction,
        "split_by": split_by,
        "sources": sources or [],
        "splits": {s: {"tokens": w.tokens, "documents": w.documents, "shards": w.shards}
                   for s, w in writers.items()},
    }
    # written last and atomically: a crash mid-way leaves no meta.json, which readers reject
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "meta.json")
    return meta


def build_shards(inputs: Iterable[str | Path], tokenizer: Tokenizer, out_dir: str | Path,
                 val_fraction: float = 0.005, text_field: str = "text", split_lines: bool = False,
                 shard_tokens: int = 1 << 27, progress: bool = False) -> dict:
    """Files/directories -> shards in out_dir (find_inputs + read_documents + write_shards); returns meta."""
    files = find_inputs(inputs)

    def documents() -> Iterator[str]:
        for path in files:
            yield from read_documents(path, text_field, split_lines)

    docs: Iterable[str] = documents()
    if progress:
        from tqdm import tqdm
        docs = tqdm(docs, desc="documents", unit="doc", leave=False)
    return write_shards(docs, tokenizer, out_dir, val_fraction=val_fraction, shard_tokens=shard_tokens,
                        sources=[str(f) for f in files])


# --- reading shards

def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: {data_dir} is not a `nanoseek data` output "
                                "(run `nanoseek data --input ... --tokenizer ... --out DIR`)")
    meta = read_json_object(path, hint="; re-run `nanoseek data`")
    if meta.get("version") != FORMAT_VERSION or meta.get("dtype") not in _DTYPES:
        raise ValueError(f"{path}: version {meta.get('version')} / dtype {meta.get('dtype')} not understood")
    _check_meta(meta, path)
    return meta


def _check_meta(meta: dict, path: Path) -> None:
    """The fields build_shards writes, of their kinds, and each split's shards adding up to its tokens."""
    def bad(what: str):
        raise ValueError(f"{path}: {what}; re-run `nanoseek data`")

    for key, kind in (("vocab_size", int), ("tokenizer_sha256", str), ("tokenizer", str), ("splits", dict)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            bad(f"{key!r} missing or not {'an integer' if kind is int else 'a ' + kind.__name__}")
    for name, info in meta["splits"].items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list) or not isinstance(info.get("tokens"), int) or not all(
                isinstance(sh, dict) and isinstance(sh.get("file"), str) and isinstance(sh.get("tokens"), int)
                and sh["tokens"] >= 0 for sh in shards):
            bad(f"split {name!r} is not {{'tokens': N, 'shards': [{{'file': ..., 'tokens': N}}, ...]}}")
        if sum(sh["tokens"] for sh in shards) != info["tokens"]:
            bad(f"split {name!r}: its shards hold {sum(sh['tokens'] for sh in shards)} tokens, not the "
                f"{info['tokens']} it lists")


def open_split(data_dir: str | Path, split: str, vocab_size: int | None = None) -> tuple[dict, list[np.memmap]]:
    """meta and one read-only memmap per shard of `split`, after checking them against meta.json.

    vocab_size: the model's vocabulary; shards holding larger ids (another tokenizer's) are refused.
    """
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    if split not in meta["splits"]:
        raise ValueError(f"{data_dir}: no split {split!r}; have {sorted(meta['splits'])}")
    info = meta["splits"][split]
    if info["tokens"] == 0:
        raise ValueError(f"{data_dir}: split {split!r} is empty (made with --val-fraction 0?)")
    if vocab_size is not None and meta["vocab_size"] > vocab_size:
        raise ValueError(f"{data_dir}: shards use a vocabulary of {meta['vocab_size']} but the model/tokenizer "
                         f"has {vocab_size}; re-run `nanoseek data` with the model's tokenizer")
    dtype = _DTYPES[meta["dtype"]]
    shards = []
    for s in info["shards"]:
        path = data_dir / s["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: shard listed in meta.json is missing")
        size = path.stat().st_size
        if size == 0:
            raise ValueError(f"{path}: zero-byte shard (an interrupted write?); re-run `nanoseek data`")
        if size != s["tokens"] * dtype.itemsize:
            raise ValueError(f"{path}: {size} bytes, but meta.json says {s['tokens']} {meta['dtype']} tokens "
                             f"({s['tokens'] * dtype.itemsize} bytes)")
        shards.append(np.memmap(path, dtype=dtype, mode="r"))
    return meta, shards


def check_tokenizer(data_dir: str | Path, tokenizer: Tokenizer) -> None:
    """Raise unless `tokenizer` is the one the shards in data_dir were made with."""
    meta = read_meta(data_dir)
    if meta["vocab_size"] != tokenizer.vocab_size or meta["tokenizer_sha256"] != tokenizer.sha256:
        raise ValueError(f"{data_dir}: shards were made with another tokenizer (vocab {meta['vocab_size']}, "
                         f"sha256 {meta['tokenizer_sha256'][:12]}) than this one (vocab {tokenizer.vocab_size}, "
                         f"sha256 {tokenizer.sha256[:12]}); use {Path(data_dir) / meta['tokenizer']}")


def document_ids(x: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per-token document index within each row, (B, T) -> (B, T); an eos belongs to the document it ends.

    A trainer that wants no attention across documents masks with d[:, :, None] == d[:, None, :].
    """
    is_eos = (x == eos_id).long()
    return torch.cumsum(is_eos, dim=1) - is_eos


class PretrainLoader:
    """Endless (x, y) int64 batches of shape (batch_size, seq_len) from a split; see the module doc."""

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, vocab_size: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.meta, self.shards = open_split(data_dir, split, vocab_size)
        self.data_dir, self.split = Path(data_dir), split
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.vocab_size, self.eos_id = self.meta["vocab_size"], self.meta["eos_id"]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # stream offset of each shard
        self.n_tokens = int(self.starts[-1])
        self.n_windows = (self.n_tokens - 1) // seq_len  # window w = tokens [w*T, w*T + T + 1)
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = self.n_windows // self.global_batch  # the remainder is dropped each epoch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{data_dir}: split {split!r} has {self.n_tokens} tokens, fewer than one global "
                             f"batch of {self.global_batch} x {seq_len + 1}; lower batch_size or seq_len")
        self.epoch, self.step = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _window_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:  # cached: a permutation per batch would cost O(windows)
            self._order_epoch = self.epoch
            self._order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
                           if self.shuffle else np.arange(self.n_windows))
        return self._order

    def _read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the split's stream, which may run across shard files."""
        parts = []
        while n > 0:
            i = int(np.searchsorted(self.starts, start, side="right")) - 1
            off = start - int(self.starts[i])
            part = self.shards[i][off:off + n]
            parts.append(part)
            start, n = start + len(part), n - len(part)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __iter__(self) -> PretrainLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        order = self._window_order()
        first = self.step * self.global_batch + self.rank * self.batch_size
        T = self.seq_len
        buf = np.stack([self._read(int(w) * T, T + 1) for w in order[first:first + self.batch_size]])
        buf = torch.from_numpy(buf.astype(np.int64))  # (B, T + 1)
        if int(buf.max()) >= self.vocab_size:  # cheap guard against shards swapped under meta.json
            raise ValueError(f"{self.data_dir}: token id {int(buf.max())} >= vocab size {self.vocab_size}")
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()  # x, y: (B, T)

    # --- resume

    def state_dict(self) -> dict:
        """The position (shared by all ranks) plus what must match for it to mean the same stream."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch": self.global_batch, "n_tokens": self.n_tokens, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. world_size may change as long as the global batch stays the same."""
        for key in ("seed", "seq_len", "global_batch", "n_tokens", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]} but this loader has {getattr(self, key)}; "
                                 "resuming would read a different stream")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
