"""`nanoseek pretrain` end to end on a tiny model: learning, router balancing, exact resume, crash safety;
plus the optimizer pieces (Muon's orthogonalization, schedules, weight-decay groups)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoseek.commands.pretrain import main as pretrain
from nanoseek.data.pretrain import build_shards
from nanoseek.model import Transformer, preset
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.optim import Muon, lr_at, param_groups, zeropower_newton_schulz
from nanoseek.train.step import max_violation, moe_gates, update_router_bias
from nanoseek.train.trainer_state import load_trainer_state, resolve_checkpoint, rng_state, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
FAST = ["--batch-size", "4", "--seq-len", "32", "--sample-tokens", "0", "--eval-every", "0", "--eval-steps", "1",
        "--warmup", "2", "--peak-flops", "1e11"]


def corpus(n_lines: int = 1500, seed: int = 0) -> str:
    """Sentences from a small grammar: a tiny model learns the structure in a few dozen steps."""
    rng = random.Random(seed)
    who = ["the king", "a fool", "my lord", "the queen", "your servant", "good Romeo"]
    verb = ["speaks of", "dreams of", "weeps for", "fights for", "sings to"]
    what = ["the crown.", "sweet love.", "his honour.", "the night.", "old Rome.", "a rose."]
    return "\n".join(f"{rng.choice(who).capitalize()} {rng.choice(verb)} {rng.choice(what)}" for _ in range(n_lines))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Tokenizer + train/val shards built once for every test here (as `nanoseek data` would)."""
    root = tmp_path_factory.mktemp("pretrain_data")
    text = root / "corpus.txt"
    text.write_text(corpus())
    tok = Tokenizer.train([text.read_text()], vocab_size=300)
    build_shards([text], tok, root / "shards", val_fraction=0.1)
    return root / "shards"


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_rows(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in metrics(run) if "loss" in r}


def test_loss_falls_and_run_folder_is_complete(shards, tmp_path):
    run = tmp_path / "run"
    pretrain(["--data", str(shards), "--out", str(run), "--steps", "40", "--lr", "3e-3", "--warmup", "4",
              "--batch-size", "8", "--seq-len", "32", "--eval-every", "20", "--eval-steps", "2",
              "--sample-tokens", "8", "--save-every", "20"])
    rows = train_rows(run)
    first = sum(rows[s]["ce"] for s in range(1, 6)) / 5
    last = sum(rows[s]["ce"] for s in range(36, 41)) / 5
    assert last < first - 1.0, (first, last)
    val = [r["val_loss"] for r in metrics(run) if "val_loss" in r]
    assert len(val) == 3 and val[2] < val[0] - 1.0, val
    assert rows[40]["mtp"] > 0 and rows[40]["balance"] > 0 and 0 < rows[40]["mfu"] < 1
    for f in ("run.json", "report.md", "samples.txt", "plots/loss.png", "plots/lr.png", "plots/expert_load.png"):
        assert (run / f).stat().st_size > 0, f
    ckpt = resolve_checkpoint(run)
    assert ckpt.name == "step_000040"
    model = Transformer.from_pretrained(ckpt / "model")     # a plain HF directory, tokenizer beside it
    assert (ckpt / "model" / "tokenizer.json").exists()
    assert model.config.vocab_size == Tokenizer.from_dir(ckpt / "model").vocab_size
    assert any(g.bias.abs().sum() > 0 for g in moe_gates(model))   # the bias update ran and was saved


def test_bias_update_balances_a_skewed_router():
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    model.init_weights()
    gates = moe_gates(model)
    x = torch.randn(512, 64) + 0.5
    with torch.no_grad():
        for g in gates:              # every token now prefers expert 0 (and its group) by a wide margin
            g.weight[0] = x.mean(0) * 0.5

    def counts() -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([torch.bincount(g(x).indices.flatten(), minlength=g.E).float() for g in gates])

    before = max_violation(counts())
    assert min(before) > 1.5            # expert 0 carries > 2.5x the mean load
    for _ in range(150):
        update_router_bias(model, counts(), gamma=0.01)
    after = max_violation(counts())
    assert max(after) < 0.5 * min(before), (before, after)
    assert all(g.bias.requires_grad is False for g in gates)


@pytest.mark.parametrize("optimizer,dtype", [("adamw", "fp32"), ("muon", "fp32"), ("adamw", "bf16")])
def test_resume_gives_identical_losses(shards, tmp_path, optimizer, dtype):
    # bf16: autocast with fp32 master weights, the bf16 attention / norm / loss paths included
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = ["--data", str(shards), "--steps", "6", "--save-every", "3", "--keep", "0", "--optimizer", optimizer,
            "--dtype", dtype, *FAST]
    pretrain([*args, "--out", str(full)])
    pretrain(["--resume", str(full / "checkpoints" / "step_000003"), "--out", str(resumed)])
    a, b = train_rows(full), train_rows(resumed)
    assert sorted(b) == [4, 5, 6]
    for s in (4, 5, 6):
        for key in ("loss", "ce", "mtp", "balance", "grad_norm", "lr"):
            assert a[s][key] == b[s][key], (s, key, a[s][key], b[s][key])   # bit for bit
    ma = Transformer.from_pretrained(full / "checkpoints" / "step_000006" / "model")
    mb = Transformer.from_pretrained(resumed / "checkpoints" / "step_000006" / "model")
    sb = mb.state_dict()
    assert all(torch.equal(v, sb[k]) for k, v in ma.state_dict().items())


def paused_in_the_save_of_step_4(shards, run: Path) -> subprocess.Popen:
    """A 6-step run saving every 2 steps, returned once it sleeps in the middle of saving step 4 (the test hook
    sleeps after the model files are written and before the trainer state is)."""
    env = {**os.environ, "NANOSEEK_SAVE_PAUSE": "4:60", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "pretrain", "--data", str(shards), "--out", str(run),
                             "--steps", "6", "--save-every", "2", *FAST], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = run / "checkpoints" / "step_000004.tmp" / "model" / "model.safetensors"
    deadline = time.time() + 120
    while not partial.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the save of step 4 never started"
        time.sleep(0.1)
    return proc


def test_killed_save_leaves_last_checkpoint_loadable(shards, tmp_path):
    run = tmp_path / "run"
    proc = paused_in_the_save_of_step_4(shards, run)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = resolve_checkpoint(run)
    assert ckpt.name == "step_000002"
    state, optim = load_trainer_state(ckpt)
    assert state["step"] == 2 and optim["state"]
    Transformer.from_pretrained(ckpt / "model")
    # and the run continues from it
    pretrain(["--resume", str(run), "--steps", "3"])
    assert resolve_checkpoint(run).name == "step_000003"
    assert max(train_rows(run)) == 3


def test_ctrl_c_names_the_checkpoint_to_resume_from(shards, tmp_path):
    """Ctrl-C (here in the middle of a save) is one line naming the last whole checkpoint, exit status 130."""
    run = tmp_path / "run"
    proc = paused_in_the_save_of_step_4(shards, run)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"interrupted at step 4; resume with --resume {run} (checkpoint step_000002)" in err
    assert resolve_checkpoint(run).name == "step_000002"


def test_diverged_loss_names_the_last_checkpoint_or_none(shards, tmp_path, monkeypatch):
    import nanoseek.commands.pretrain as cmd

    real, calls = cmd.pretrain_backward, []

    def nan_from_step_3(*a, **kw):
        parts, counts = real(*a, **kw)
        calls.append(1)
        return ({**parts, "loss": torch.tensor(float("nan"))} if len(calls) >= 3 else parts), counts

    monkeypatch.setattr(cmd, "pretrain_backward", nan_from_step_3)
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"loss is nan at step 3; .*resume with --resume .*run "
                                         r"\(checkpoint step_000002\)"):
        pretrain(["--data", str(shards), "--out", str(run), "--steps", "6", "--save-every", "2", *FAST])
    calls.clear()
    calls.extend([1, 1])       # nan from the first step: nothing saved yet
    with pytest.raises(SystemExit, match="loss is nan at step 1; .*no checkpoint was saved yet"):
        pretrain(["--data", str(shards), "--out", str(tmp_path / "run2"), "--steps", "6", *FAST])


def test_checkpoint_pointer_and_pruning(tmp_path):
    model = Transformer(preset("tiny", num_hidden_layers=2))
    model.init_weights()
    state = {"args": {}, "loader": {}, "world_size": 1, "rng": rng_state()}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, {"state": {}, "param_groups": []}, state, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000002", "step_000003"]
    assert resolve_checkpoint(tmp_path).name == "step_000003"
    # a run resumed from step 2 saves step 2 again: `latest` follows it, nothing newer is deleted
    save_checkpoint(tmp_path, 2, model, {"state": {}, "param_groups": []}, state, keep=2)
    assert resolve_checkpoint(tmp_path).name == "step_000002"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000002", "step_000003"]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.old"))
    assert load_trainer_state(tmp_path / "step_000002")[0]["step"] == 2
    # a damaged pointer is one message naming the complete checkpoints there (not a leftover .tmp)
    (tmp_path / "step_000004.tmp" / "trainer").mkdir(parents=True)
    pointer = tmp_path / "latest"
    for content, says in ((b"", "does not name a step_"), (b"\xff\xfe", "cannot be read"),
                          (b"step_000009", "names step_000009, which is incomplete or missing")):
        pointer.write_bytes(content)
        with pytest.raises(FileNotFoundError, match=says) as e:
            resolve_checkpoint(tmp_path)
        assert str(e.value).endswith(f"resume from an earlier one: {tmp_path / 'step_000002'}, "
                                     f"{tmp_path / 'step_000003'}")
    pointer.unlink()
    pointer.mkdir()
    with pytest.raises(FileNotFoundError, match="cannot be read"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):   # a step folder outside checkpoints/
        resolve_checkpoint(tmp_path / "step_000002")


def test_clear_errors(shards, tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        pretrain(["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "a")])
    run = tmp_path / "b"
    pretrain(["--data", str(shards), "--out", str(run), "--steps", "1", *FAST])
    with pytest.raises(SystemExit, match="already holds a run"):
        pretrain(["--data", str(shards), "--out", str(run), "--steps", "1", *FAST])
    with pytest.raises(SystemExit, match="global_batch"):
        pretrain(["--resume", str(run), "--steps", "2", "--batch-size", "2"])
    assert resolve_checkpoint(run).name == "step_000001"    # nothing saved was lost


# --- optimizer pieces
def test_newton_schulz_orthogonalizes_stacked_matrices():
    torch.manual_seed(0)
    g = torch.randn(3, 48, 16) @ torch.diag(torch.logspace(-0.7, 0.7, 16))   # tall, singular values spread ~20x
    s_in = torch.linalg.svdvals(g)
    assert (s_in.max(-1).values / s_in.min(-1).values > 10).all()
    o = zeropower_newton_schulz(g)
    s = torch.linalg.svdvals(o)
    assert o.shape == g.shape and s.min() > 0.6 and s.max() < 1.25, s      # all pushed near 1


def test_param_groups_and_muon_step():
    model = Transformer(preset("tiny"))
    model.init_weights()
    groups = param_groups(model, 0.1, muon=True)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(model.embed.weight)]["weight_decay"] == 0 and not by_id[id(model.embed.weight)]["use_muon"]
    assert not by_id[id(model.head.weight)]["use_muon"] and by_id[id(model.head.weight)]["weight_decay"] == 0.1
    assert by_id[id(model.norm.weight)]["weight_decay"] == 0
    assert by_id[id(model.layers[1].ffn.experts.w1)]["use_muon"]
    opt = Muon(groups, lr=0.01)
    ids = torch.randint(0, 512, (4, 16))
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] - 0.5, losses


def test_lr_schedules():
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, total=100)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(99, **kw) == pytest.approx(0.1)
    cos = [lr_at(s, **kw) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(cos, cos[1:]))
    wsd = [lr_at(s, **kw, schedule="wsd") for s in range(100)]
    assert wsd[10:80] == [1.0] * 70 and wsd[99] == pytest.approx(0.1) and wsd[85] < 1.0


def test_resumed_run_saves_past_the_pruned_checkpoint_it_came_from(shards, tmp_path):
    """The tokenizer files are written from memory: with --keep 1 the checkpoint a run resumed from is pruned
    at the first save, and later saves copied its tokenizer.json from there (FileNotFoundError, steps lost)."""
    run = tmp_path / "run"
    pretrain(["--data", str(shards), "--out", str(run), "--steps", "2", "--save-every", "1", "--keep", "1", *FAST])
    pretrain(["--resume", str(run), "--steps", "5", "--save-every", "1", "--keep", "1"])
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_000005"]
    last = run / "checkpoints" / "step_000005" / "model"
    assert Tokenizer.from_dir(last).sha256 == Tokenizer.from_dir(shards / "tokenizer").sha256
    Transformer.from_pretrained(last)


def test_trainer_state_of_the_wrong_shape_is_named(tmp_path):
    model = Transformer(preset("tiny", num_hidden_layers=2))
    state = {"args": {}, "loader": {}, "world_size": 1, "rng": rng_state()}
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, {"state": {}, "param_groups": []}, state, keep=0)
    ckpt = tmp_path / "step_000002"
    for bad, says in [([1, 2], "no args, loader, rng, step"), ({"args": {}, "rng": 0, "step": 2}, "no loader")]:
        torch.save(bad, ckpt / "trainer" / "state.pt")
        with pytest.raises(ValueError, match=f"not a nanoseek trainer state \\({says}\\); resume from an earlier "
                                             f"one: .*step_000001"):
            load_trainer_state(ckpt)
    save_checkpoint(tmp_path, 2, model, {"state": {}, "param_groups": []}, state, keep=0)
    torch.save({"x": 1}, ckpt / "trainer" / "optimizer.pt")
    with pytest.raises(ValueError, match="optimizer.pt is not a nanoseek trainer state"):
        load_trainer_state(ckpt)


def test_raw_jsonl_trains_the_tokenizer_on_its_text_field(tmp_path):
    """A .jsonl --data: the tokenizer learns from the documents the shards hold, not from the JSON around them
    (it learned 'source' and runs of x from a metadata field the shards never contain)."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"w{(i * j) % 41}" for j in range(40)),
                                        "meta": {"source": "x" * 30}}) + "\n" for i in range(300)))
    run = tmp_path / "run"
    pretrain(["--data", str(data), "--out", str(run), "--steps", "1", *FAST])
    vocab = json.loads((run / "data" / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert not [t for t in vocab if "xxxx" in t or "source" in t or "meta" in t]
    assert "\u0120w" in vocab                                            # it did learn the documents' text


def test_fresh_run_in_a_folder_left_before_any_checkpoint_starts_its_logs_anew(shards, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "val_loss": 123.0}) + "\n")   # an interrupted start
    (run / "samples.txt").write_text("stale\n")
    pretrain(["--data", str(shards), "--out", str(run), "--steps", "1", *FAST])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("val_loss") != 123.0 for r in rows) and [r["step"] for r in rows if "loss" in r] == [1]
    assert not (run / "samples.txt").exists()                           # --sample-tokens 0: none written since
