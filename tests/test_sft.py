"""SFT: the loss sees assistant tokens only (whatever sits in the other targets), training lowers it,
and `nanoseek sft` writes a loadable model directory and refuses bad input without writing anything."""

from __future__ import annotations

import json

import pytest
import torch

from nanoseek.data.sft import SFTDataset
from nanoseek.model import Transformer
from nanoseek.tokenizer import EOS, Tokenizer
from nanoseek.train.sft import sft_loss, sft_train, task_knobs

from helpers import arith, arith_tokenizer, tiny_model


CONVS = [
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is 2+3?"},
     {"role": "assistant", "content": "<think>\n2+3=5\n</think>\n5"},
     {"role": "user", "content": "And 4*4?"},
     {"role": "assistant", "content": "<think>\n4*4=16\n</think>\n16"}],
    [{"role": "user", "content": "What is 7-9? <｜Assistant｜> not a turn"},
     {"role": "assistant", "content": "<think>\n7-9=-2\n</think>\n-2"}],
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return arith_tokenizer(("You are terse. And",))


def test_loss_targets_are_exactly_the_assistant_turns(tok):
    ds = SFTDataset(CONVS, tok, seq_len=160)
    assert len(ds) == 1                                   # both conversations packed into one row
    x, y, m = ds[0]
    full_targets = torch.from_numpy(ds.ids[0, 1:])        # every next token, masked or not
    learned = tok.decode(full_targets[m].tolist())
    expected = "".join(msg["content"] + EOS for conv in CONVS for msg in conv if msg["role"] == "assistant")
    assert learned == expected                            # nothing from system, user, role markers or padding
    assert torch.equal(y[m], full_targets[m]) and bool((y[~m] == -100).all())


def test_sft_loss_ignores_every_non_assistant_target(tok):
    ds = SFTDataset(CONVS, tok, seq_len=160)
    x, y, m = (t[None] for t in ds[0])
    full = torch.from_numpy(ds.ids[0, 1:])[None].clone()  # real tokens as targets everywhere
    model = tiny_model(tok)
    with torch.no_grad():
        base = sft_loss(model, x, full, m)
        assert base == pytest.approx(sft_loss(model, x, y, m).item(), rel=1e-6)
        # rewrite every target outside the mask (user, system, role markers, padding)
        g = torch.Generator().manual_seed(0)
        scrambled = torch.where(m, full, torch.randint(0, tok.vocab_size, full.shape, generator=g))
        assert int((scrambled != full)[~m].sum()) > 20
        assert sft_loss(model, x, scrambled, m).item() == pytest.approx(base.item(), rel=1e-6)
        # ...while changing one assistant target does change it
        t = int(m[0].nonzero()[0])
        changed = full.clone()
        changed[0, t] = (changed[0, t] + 1) % tok.vocab_size
        assert sft_loss(model, x, changed, m).item() != pytest.approx(base.item(), rel=1e-6)


def test_sft_train_fits_a_few_conversations(tok):
    ds = SFTDataset([arith.sft_messages(e) for e in arith.examples(8, 0, n_digits=1)], tok, seq_len=64)
    model = tiny_model(tok, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rows = sft_train(model, ds, opt, steps=30, batch_size=4, lr=1e-2, warmup=2)
    assert len(rows) == 30 and [r["step"] for r in rows[:2]] == [1, 2]
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]


def test_task_knobs_parses_values():
    assert task_knobs(["n_digits=3", "ops=+-", "test_frac=0.2"]) == {"n_digits": 3, "ops": "+-", "test_frac": 0.2}
    # a true/false knob reads truth words and 0/1 ("False" used to be a true, non-empty string)
    from nanoseek.tasks.arithmetic import examples
    assert task_knobs(["unique=False"], examples) == {"unique": False}
    assert task_knobs(["unique=yes"], examples) == {"unique": True}
    assert task_knobs(["unique=0"], examples) == {"unique": False}
    with pytest.raises(ValueError, match="unique='maybe': expected true or false"):
        task_knobs(["unique=maybe"], examples)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        task_knobs(["n_digits"])


def test_sft_command_saves_model_and_rejects_bad_input(tok, tmp_path):
    from nanoseek.commands import sft as sft_cmd

    base = tmp_path / "base"
    tiny_model(tok).save_pretrained(base)
    tok.save(base)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS * 4))
    out = tmp_path / "run"
    sft_cmd.main(["--model", str(base), "--data", str(data), "--out", str(out), "--steps", "4",
                  "--batch-size", "2", "--seq-len", "64", "--device", "cpu"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    model = Transformer.from_pretrained(out / "model")
    assert Tokenizer.from_dir(out / "model").sha256 == tok.sha256
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     Transformer.from_pretrained(base).state_dict().values()))
    assert (out / "plots" / "loss.png").exists() and "train loss" in (out / "report.md").read_text()

    # bad input: a clear message naming the problem, and no run folder left behind
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:1"):
        sft_cmd.main(["--model", str(base), "--data", str(bad), "--out", str(tmp_path / "r2"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="exactly one of"):
        sft_cmd.main(["--model", str(base), "--out", str(tmp_path / "r3"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="not a model directory"):
        sft_cmd.main(["--model", str(tmp_path), "--task", "arithmetic", "--out", str(tmp_path / "r4")])
    with pytest.raises(SystemExit, match="already holds"):
        sft_cmd.main(["--model", str(base), "--data", str(data), "--out", str(out), "--device", "cpu"])
    assert not any((tmp_path / r).exists() for r in ("r2", "r3", "r4"))


def test_sft_refuses_bad_values_before_writing(tok, tmp_path):
    """Values found by an audit: each refused in one line before the run folder is written (a retry can use
    the same --out), and a run that failed says so instead of calling itself a run."""
    from nanoseek.commands import sft as sft_cmd

    base = tmp_path / "base"
    tiny_model(tok).save_pretrained(base)
    tok.save(base)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS * 4))
    common = ["--model", str(base), "--data", str(data), "--steps", "2", "--batch-size", "2", "--seq-len", "64",
              "--device", "cpu"]
    out = tmp_path / "run"
    for flags, says in [(["--epochs", "nan"], "--epochs must be a number > 0"),
                        (["--epochs", "inf"], "--epochs must be a number > 0"),
                        (["--seed", "-1"], "--seed must be in [0, 2**32)"),
                        (["--seed", str(10**20)], "--seed must be in [0, 2**32)"),
                        (["--min-lr", "5"], "--min-lr 5.0 is above --lr"),
                        (["--dtype", "fp16"], "fp16 needs loss scaling"),
                        # a name the terminal could not decode: report.md's writing failed after the model was saved
                        (["--out", str(tmp_path / "t\udcff")], "--out is not a valid UTF-8 path")]:
        with pytest.raises(SystemExit) as e:
            sft_cmd.main([*common, "--out", str(out), *flags])
        msg = str(e.value.code)
        assert says in msg and "\n" not in msg, (flags, msg)
        assert not out.exists(), flags
    # a lone surrogate in valid JSON is named with its line, not a tokenizer traceback
    bad = tmp_path / "surrogate.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\ud800"}]}\n')
    with pytest.raises(SystemExit, match=r"surrogate.jsonl:1: .*lone surrogate"):
        sft_cmd.main([*common[:2], "--data", str(bad), *common[4:], "--out", str(out)])
    from nanoseek.data.sft import load_conversations
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + data.read_bytes())                # a byte-order mark is read past
    assert load_conversations(bom) == load_conversations(data)
    # a run that diverged leaves no model: the folder is named an unfinished run
    with pytest.raises(SystemExit, match="loss is nan"):
        sft_cmd.main([*common, "--out", str(out), "--lr", "1e30", "--warmup", "0", "--clip", "0"])
    with pytest.raises(SystemExit, match="holds an unfinished run"):
        sft_cmd.main([*common, "--out", str(out)])
    # weights that are NaN already: the first loss says so (it is the loaded model's, before any update)
    nan = tmp_path / "nan"
    broken = tiny_model(tok)
    with torch.no_grad():
        broken.embed.weight[:] = float("nan")
    broken.save_pretrained(nan)
    tok.save(nan)
    with pytest.raises(SystemExit, match="at step 1; the model's outputs are not finite before any update"):
        sft_cmd.main(["--model", str(nan), *common[2:], "--out", str(tmp_path / "nan_run")])
    with pytest.raises(SystemExit, match="with --data they would do nothing"):
        sft_cmd.main([*common, "--out", str(out), "--n", "5"])
    # --num-examples is --n (torchrun takes --n as an abbreviation of its own options)
    assert sft_cmd.parse_args(["--model", "m", "--out", "o", "--num-examples", "7"]).n == 7


def test_sft_drops_conversations_the_cut_leaves_without_targets(tok):
    long_prompt = [{"role": "user", "content": "1+1 " * 200}, {"role": "assistant", "content": "2"}]
    ds = SFTDataset([long_prompt, *CONVS], tok, seq_len=64)
    assert ds.dropped == 1 and len(ds) >= 1
    for i in range(len(ds)):                      # every row left has something to learn
        assert ds[i][2].any()
    with pytest.raises(ValueError, match="every conversation .* longer than seq_len 64"):
        SFTDataset([long_prompt], tok, seq_len=64)
