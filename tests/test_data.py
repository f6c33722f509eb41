"""Data: shards from txt/jsonl/parquet, clear errors, loader determinism/sharding/resume, SFT masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nanoseek.commands import data as data_cmd
from nanoseek.commands import tokenizer as tokenizer_cmd
from nanoseek.data import (IGNORE_INDEX, PretrainLoader, SFTDataset, build_shards, check_tokenizer, document_ids,
                           load_conversations, open_split, read_meta, write_shards)
from nanoseek.tokenizer import EOS, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = (ROOT / "data/tinyshakespeare/input.txt").read_text(encoding="utf-8")
TEXT = SHAKESPEARE[:8000]
DOCS = [p.strip() for p in SHAKESPEARE[:40000].split("\n\n") if p.strip()]  # ~200 speeches as documents


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT], vocab_size=320)


def stream(out: Path, split: str) -> list[int]:
    meta = read_meta(out)
    return [int(t) for s in meta["splits"][split]["shards"] for t in np.fromfile(out / s["file"], dtype="<u2")]


def docs_of(tokens: list[int], eos: int) -> list[list[int]]:
    """Split an eos-terminated stream into documents (a trailing piece without eos is kept)."""
    out, cur = [], []
    for t in tokens:
        if t == eos:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out + ([cur] if cur else [])


# --- shards

def test_single_txt_document_gets_a_tail_validation_split(tok, tmp_path):
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    meta = build_shards([tmp_path / "a.txt"], tok, tmp_path / "out", val_fraction=0.1)
    assert meta["split_by"] == "tail" and meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size
    train, val = stream(tmp_path / "out", "train"), stream(tmp_path / "out", "val")
    whole = tok.encode(TEXT) + [tok.eos_id]
    assert train + val == whole  # the tail moved, nothing lost, order kept
    assert len(val) == int(np.ceil(len(whole) * 0.1))
    assert meta["splits"]["train"]["tokens"] == len(train) and meta["splits"]["val"]["documents"] == 1
    assert Tokenizer.from_dir(tmp_path / "out" / meta["tokenizer"]).sha256 == tok.sha256


def test_jsonl_parquet_and_dirs_give_the_same_document_split(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    with open(src / "docs.jsonl", "w", encoding="utf-8") as f:
        for d in DOCS:
            f.write(json.dumps({"body": d, "id": 1}) + "\n\n")  # blank lines are skipped
    pq.write_table(pa.table({"body": DOCS + [None, ""]}), tmp_path / "docs.parquet")
    a = build_shards([src], tok, tmp_path / "a", val_fraction=0.1, text_field="body", shard_tokens=3000)
    b = build_shards([tmp_path / "docs.parquet"], tok, tmp_path / "b", val_fraction=0.1, text_field="body",
                     shard_tokens=3000)
    assert a["split_by"] == "document" and a["splits"] == b["splits"]
    assert len(a["splits"]["train"]["shards"]) > 1  # shard_tokens cut the stream into several files
    bom = tmp_path / "bom" / "docs.jsonl"               # a byte-order mark before the first line is read past
    bom.parent.mkdir()
    bom.write_bytes(b"\xef\xbb\xbf" + (src / "docs.jsonl").read_bytes())
    assert build_shards([bom], tok, tmp_path / "c", val_fraction=0.1, text_field="body",
                        shard_tokens=3000)["splits"] == a["splits"]
    for split in ("train", "val"):
        assert stream(tmp_path / "a", split) == stream(tmp_path / "b", split)
    train = [tok.decode(d) for d in docs_of(stream(tmp_path / "a", "train"), tok.eos_id)]
    val = [tok.decode(d) for d in docs_of(stream(tmp_path / "a", "val"), tok.eos_id)]
    assert sorted(train + val) == sorted(DOCS)  # each document in exactly one split, whole
    assert 0 < len(val) < len(DOCS) / 4 and a["splits"]["val"]["documents"] == len(val)
    # the document split is by content, not position: shuffling the inputs does not move documents
    c = write_shards(DOCS[::-1], tok, tmp_path / "c", val_fraction=0.1)
    val_c = [tok.decode(d) for d in docs_of(stream(tmp_path / "c", "val"), tok.eos_id)]
    assert set(val_c) - {DOCS[0]} == set(val) - {DOCS[-1]}  # (the first document is pinned to train)
    total = sum(s["tokens"] for s in a["splits"].values())
    assert c["splits"]["train"]["tokens"] + c["splits"]["val"]["tokens"] == total


def test_split_lines_and_plain_text_rule(tok, tmp_path):
    (tmp_path / "l.txt").write_text(f"one\n\n  \ntwo {EOS}\nthree\n", encoding="utf-8")
    build_shards([tmp_path / "l.txt"], tok, tmp_path / "out", val_fraction=0, split_lines=True)
    docs = docs_of(stream(tmp_path / "out", "train"), tok.eos_id)
    # an eos string inside the text stays text: it does not add a document boundary
    assert [tok.decode(d) for d in docs] == ["one", f"two {EOS}", "three"]
    with pytest.raises(ValueError, match="'val' is empty"):
        open_split(tmp_path / "out", "val")


def test_input_errors_name_the_file(tok, tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="no text in .*empty.txt"):
        build_shards([tmp_path / "empty.txt"], tok, tmp_path / "o")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8 .*0xe9 at offset 3"):
        build_shards([tmp_path / "latin1.txt"], tok, tmp_path / "o")
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: no 'text' field \(found \['content'\]\)"):
        build_shards([tmp_path / "x.jsonl"], tok, tmp_path / "o")
    (tmp_path / "d.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unknown file type '.csv'"):
        build_shards([tmp_path / "d.csv"], tok, tmp_path / "o")
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="sub: no .txt"):
        build_shards([tmp_path / "sub"], tok, tmp_path / "o")
    with pytest.raises(ValueError, match="too few to hold out"):
        write_shards(["a"], tok, tmp_path / "o", val_fraction=0.6)
    # the command turns them into one line on exit, naming the file
    tok.save(tmp_path / "tok")
    with pytest.raises(SystemExit, match="nanoseek data: .*latin1.txt: not UTF-8"):
        data_cmd.main(["--input", str(tmp_path / "latin1.txt"), "--tokenizer", str(tmp_path / "tok"),
                       "--out", str(tmp_path / "o")])


def test_shard_errors(tok, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="meta.json missing"):
        PretrainLoader(out, "train", 2, 8)
    write_shards(DOCS, tok, out, val_fraction=0.1)
    meta = read_meta(out)
    other = Tokenizer.train([TEXT[:3000]], vocab_size=300)
    with pytest.raises(ValueError, match="vocabulary of 320 but the model/tokenizer has 300"):
        PretrainLoader(out, "train", 2, 8, vocab_size=other.vocab_size)
    PretrainLoader(out, "train", 2, 8, vocab_size=512)  # a larger (padded) model vocabulary is fine
    with pytest.raises(ValueError, match="another tokenizer"):
        check_tokenizer(out, other)
    check_tokenizer(out, Tokenizer.from_dir(out / "tokenizer"))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PretrainLoader(out, "val", 64, 256)
    shard = out / meta["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="meta.json says"):
        PretrainLoader(out, "train", 2, 8)
    shard.write_bytes(b"")
    with pytest.raises(ValueError, match=f"{shard.name}: zero-byte shard"):
        PretrainLoader(out, "train", 2, 8)


def test_data_and_tokenizer_commands(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    tokenizer_cmd.main(["--data", str(tmp_path / "a.txt"), "--vocab-size", "300", "--out", str(tmp_path / "tok")])
    assert Tokenizer.from_dir(tmp_path / "tok").vocab_size == 300
    data_cmd.main(["--input", str(tmp_path), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "d"),
                   "--val-fraction", "0.2"])
    printed = capsys.readouterr().out
    assert "split by tail" in printed and "characters/token" in printed
    loader = PretrainLoader(tmp_path / "d", "val", 2, 16)
    x, y = next(loader)
    assert x.shape == y.shape == (2, 16) and x.dtype == torch.int64


# --- loader (on a synthetic stream 0, 1, 2, ...: every token tells where it came from)

def synthetic(path: Path, shard_sizes: list[int], vocab_size: int = 1 << 20) -> None:
    path.mkdir(parents=True)
    shards, start = [], 0
    for i, n in enumerate(shard_sizes):
        np.arange(start, start + n, dtype="<u4").tofile(path / f"train_{i:06d}.bin")
        shards.append({"file": f"train_{i:06d}.bin", "tokens": n})
        start += n
    meta = {"version": 1, "dtype": "uint32", "vocab_size": vocab_size, "eos_id": 1, "bos_id": 0,
            "tokenizer_sha256": "", "tokenizer": "tokenizer",
            "splits": {"train": {"tokens": start, "documents": 0, "shards": shards}}}
    (path / "meta.json").write_text(json.dumps(meta))


def take(loader: PretrainLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def test_loader_windows_epochs_and_determinism(tmp_path):
    synthetic(tmp_path / "d", [500, 7, 1000])  # windows run across shard files
    T, B = 16, 4
    loader = PretrainLoader(tmp_path / "d", "train", B, T, seed=3)
    assert loader.n_windows == (1507 - 1) // T and loader.steps_per_epoch == loader.n_windows // B
    epoch = take(loader, loader.steps_per_epoch)
    starts = torch.cat([x[:, 0] for x, _ in epoch])
    for x, y in epoch:
        assert torch.equal(x, x[:, :1] + torch.arange(T))  # contiguous windows...
        assert torch.equal(y, x + 1)  # ...and y is x shifted by one
    assert (starts % T == 0).all() and len(set(starts.tolist())) == len(starts)  # each window once per epoch
    assert loader.epoch == 1 and loader.step == 0
    again = take(PretrainLoader(tmp_path / "d", "train", B, T, seed=3), 3)
    other = take(PretrainLoader(tmp_path / "d", "train", B, T, seed=4), 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, epoch))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(other, epoch))
    next_epoch = take(loader, 3)  # a new permutation each epoch
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(next_epoch, epoch))
    ordered = PretrainLoader(tmp_path / "d", "train", B, T, shuffle=False)
    assert next(ordered)[0][:, 0].tolist() == [0, T, 2 * T, 3 * T]


def test_ranks_are_disjoint_and_stack_into_the_single_process_batch(tmp_path):
    synthetic(tmp_path / "d", [2000])
    T, B = 8, 3
    one = PretrainLoader(tmp_path / "d", "train", 2 * B, T, seed=7)
    ranks = [PretrainLoader(tmp_path / "d", "train", B, T, rank=r, world_size=2, seed=7) for r in (0, 1)]
    for _ in range(one.steps_per_epoch + 5):  # into the second epoch
        (x, y), (x0, y0), (x1, y1) = next(one), next(ranks[0]), next(ranks[1])
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        assert not set(x0[:, 0].tolist()) & set(x1[:, 0].tolist())
    with pytest.raises(ValueError, match="rank 2"):
        PretrainLoader(tmp_path / "d", "train", B, T, rank=2, world_size=2)


def test_resume_yields_exactly_the_uninterrupted_batches(tmp_path):
    synthetic(tmp_path / "d", [300, 300])
    T, B = 8, 4
    ref = PretrainLoader(tmp_path / "d", "train", B, T, seed=1)
    full = take(ref, 3 * ref.steps_per_epoch)
    for stop in (5, ref.steps_per_epoch, ref.steps_per_epoch + 2):  # mid-epoch and at the boundary
        first = PretrainLoader(tmp_path / "d", "train", B, T, seed=1)
        take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # survives JSON (the trainer-state file)
        resumed = PretrainLoader(tmp_path / "d", "train", B, T, seed=1)
        resumed.load_state_dict(state)
        for (x, y), (rx, ry) in zip(full[stop:stop + 12], take(resumed, 12)):
            assert torch.equal(x, rx) and torch.equal(y, ry)
    # same global batch over two ranks continues the same stream
    halves = [PretrainLoader(tmp_path / "d", "train", B // 2, T, rank=r, world_size=2, seed=1) for r in (0, 1)]
    for h in halves:
        h.load_state_dict(state)
    assert torch.equal(torch.cat([next(halves[0])[0], next(halves[1])[0]]), full[stop][0])
    with pytest.raises(ValueError, match="seq_len=8 but this loader has 16"):
        PretrainLoader(tmp_path / "d", "train", B, 16, seed=1).load_state_dict(state)


def test_token_guard_and_document_ids(tmp_path):
    synthetic(tmp_path / "d", [200], vocab_size=100)  # ids up to 199 in a "100-token" vocabulary
    loader = PretrainLoader(tmp_path / "d", "train", 2, 8, shuffle=False)
    with pytest.raises(ValueError, match="token id .* >= vocab size 100"):
        take(loader, 20)
    x = torch.tensor([[5, 1, 7, 8, 1, 1, 9]])
    assert document_ids(x, eos_id=1).tolist() == [[0, 0, 1, 1, 1, 2, 3]]


# --- SFT

CONVS = [[{"role": "user", "content": f"What is {i}+{i}?"},
          {"role": "assistant", "content": f"<think>add</think>{2 * i}"}] for i in range(12)]


def test_sft_rows_learn_only_assistant_tokens(tok):
    ds = SFTDataset(CONVS, tok, seq_len=64)
    rendered = [tok.render_chat(c)[0] for c in CONVS]
    assert len(ds) < len(CONVS)  # several conversations share a row
    learned = []
    for i in range(len(ds)):
        x, y, m = ds[i]
        assert x.shape == y.shape == m.shape == (64,)
        assert torch.equal(m, y != IGNORE_INDEX)
        row = torch.cat([x, y[-1:]])
        assert torch.equal(y[m], row[1:][m])  # targets are the next tokens where learned
        learned.append(tok.decode(y[m].tolist()))
    assert "".join(learned) == "".join(f"<think>add</think>{2 * i}{EOS}" for i in range(12))
    # packing keeps whole conversations in order; the rest of a row is pad, never learned
    packed = [t for i in range(len(ds)) for t in ds.ids[i].tolist()]
    assert [t for t in packed if t != tok.pad_id] == [t for r in rendered for t in r]


def test_sft_errors_truncation_loading_and_batches(tok, tmp_path):
    with pytest.raises(ValueError, match="no conversations"):
        SFTDataset([], tok, 32)
    with pytest.raises(ValueError, match="no assistant tokens"):
        SFTDataset([[{"role": "user", "content": "hello"}]], tok, 32)
    long = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": TEXT[:2000]}]]
    assert SFTDataset(long, tok, 32).truncated == 1

    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    assert load_conversations(path) == CONVS
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_conversations(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no conversations"):
        load_conversations(tmp_path / "empty.jsonl")

    ds = SFTDataset(CONVS, tok, seq_len=16)
    one = list(ds.batches(4, epoch=1, seed=2))
    r0, r1 = (list(ds.batches(2, epoch=1, seed=2, rank=r, world_size=2)) for r in (0, 1))
    assert len(one) == len(ds) // 4 and len(r0) == len(one)
    for (x, y, m), (x0, y0, m0), (x1, y1, m1) in zip(one, r0, r1):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert torch.equal(list(ds.batches(4, epoch=1, seed=2, start_step=2))[0][0], one[2][0])


def test_meta_json_of_the_wrong_shape_is_named(tok, tmp_path):
    """A meta.json edited by hand or half-written: one ValueError naming the field (they were KeyError,
    TypeError, or numpy's 'need at least one array to stack')."""
    out = tmp_path / "out"
    write_shards(DOCS, tok, out, val_fraction=0.1)
    good = json.loads((out / "meta.json").read_text())

    def broken(**change):
        meta = json.loads(json.dumps(good))
        for k, v in change.items():
            if v is None:
                meta.pop(k)
            else:
                meta[k] = v
        (out / "meta.json").write_text(json.dumps(meta))

    for change, says in [(dict(vocab_size=None), "'vocab_size' missing or not an integer"),
                         (dict(tokenizer_sha256=None), "'tokenizer_sha256' missing"),
                         (dict(splits=None), "'splits' missing"),
                         (dict(splits={**good["splits"], "train": {**good["splits"]["train"], "shards": []}}),
                          "split 'train': its shards hold 0 tokens"),
                         (dict(splits={**good["splits"], "val": None}), "split 'val' is not")]:
        broken(**change)
        with pytest.raises(ValueError, match=says):
            PretrainLoader(out, "train", 2, 8)


def test_data_and_tokenizer_refuse_what_they_would_destroy_or_cannot_do(tmp_path, tok):
    """Audit findings: `nanoseek data` replaced a meta.json and a tokenizer/ it had not written; --out under
    a file, an unreadable input, a non-string parquet value, a lone surrogate in .jsonl text and a huge
    --vocab-size were tracebacks (or a process abort); each is now one line, and a failed run leaves no
    folder of its own behind."""
    import subprocess
    import sys
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be: that is the question. " * 40)
    tok.save(tmp_path / "tok")
    work = tmp_path / "work"
    (work / "tokenizer").mkdir(parents=True)
    (work / "meta.json").write_text('{"my": "notes"}')

    def fails(cmd, argv, says):
        with pytest.raises(SystemExit) as e:
            cmd.main(argv)
        msg = str(e.value.code)
        assert msg.startswith(f"nanoseek {cmd.__name__.rsplit('.', 1)[1]}: ") and says in msg, msg

    base = ["--input", str(text), "--tokenizer", str(tmp_path / "tok")]
    fails(data_cmd, [*base, "--out", str(work)], "holds a meta.json that `nanoseek data` did not write")
    assert (work / "meta.json").read_text() == '{"my": "notes"}'
    (work / "meta.json").unlink()
    fails(data_cmd, [*base, "--out", str(work)], "holds a tokenizer/ folder but no shards")
    fails(data_cmd, [*base, "--out", str(text / "sub")], "is a file, not a folder")
    bad = tmp_path / "s.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "a \\ud800 b"}\n')
    fails(data_cmd, ["--input", str(bad), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "x" / "y")],
          "s.jsonl:2: 'text' is not valid Unicode")
    assert not (tmp_path / "x").exists()                       # the folders it made are gone again
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    fails(data_cmd, ["--input", str(tmp_path / "ints.parquet"), "--tokenizer", str(tmp_path / "tok"),
                     "--out", str(tmp_path / "z")], "ints.parquet: row 1: 'text' is int, not a string")
    fails(tokenizer_cmd, ["--data", str(text), "--vocab-size", str(2**32), "--out", str(tmp_path / "t1")],
          "--vocab-size must be at most")
    fails(tokenizer_cmd, ["--data", str(text), "--out", str(text / "sub")], "is a file, not a folder")
    fails(tokenizer_cmd, ["--load", str(tmp_path / "tok"), "--encode", "ab\udcffcd"], "--encode is not valid UTF-8")
    # a file that cannot be read (EACCES even as root): one line, in a fresh process (the symlink's target)
    unread = tmp_path / "unread.txt"
    unread.symlink_to("/proc/1/mem")
    r = subprocess.run([sys.executable, "-m", "nanoseek", "data", *base[2:], "--input", str(unread), "--out",
                        str(tmp_path / "u")], capture_output=True, text=True, timeout=120)
    if "cannot be read" not in r.stderr:     # a user who may read /proc/1/mem: nothing to test here
        assert r.returncode == 0 or "Traceback" not in r.stderr, r.stderr
    else:
        assert r.returncode == 1 and "Traceback" not in r.stderr and not (tmp_path / "u").exists()
