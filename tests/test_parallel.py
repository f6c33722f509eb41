"""Data parallelism: 2 gloo processes (DDP and FSDP2) train exactly like 1 process on the same global
batch, gradient accumulation like a bigger batch, and a batch split over CPU threads like one chunk."""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from nanoseek.commands.pretrain import main as pretrain
from nanoseek.data.pretrain import build_shards
from nanoseek.model import Transformer, preset
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.parallel import split_backward
from nanoseek.train.step import pretrain_backward

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--steps", "3", "--seq-len", "32", "--sample-tokens", "0", "--eval-every", "0", "--eval-steps", "1",
          "--warmup", "1",
          "--lr", "3e-3", "--peak-flops", "1e11", "--keep", "1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parallel_data")
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    text = root / "t.txt"
    text.write_text(" ".join(words[(i * 7 + i // 5) % len(words)] for i in range(30000)))
    build_shards([text], Tokenizer.train([text.read_text()], vocab_size=280), root / "shards", val_fraction=0.1)
    return root / "shards"


TEARDOWN_ABORT = "terminate called without an active exception"


def assert_launch_ok(proc: subprocess.CompletedProcess) -> None:
    """The torchrun launch ran to its end. Known race, not ours: in ~3% of 2-process gloo launches on a
    loaded 2-core machine a rank that finished (destroy_process_group done, the run's files written,
    nothing left but the interpreter's exit) hits std::terminate while the process exits (SIGABRT,
    "terminate called without an active exception"; torch 2.13, pytorch/pytorch#190489 and #179291),
    and torchrun reports the launch failed. That alone is let through with a warning; any worker
    traceback, a worker's own exit code or a missing output still fails (the callers check the
    outputs after this)."""
    out = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return
    codes = [line.split(":", 1)[1].split()[0] for line in out.splitlines() if line.strip().startswith("exitcode")]
    teardown = (TEARDOWN_ABORT in out and out.count("Traceback (most recent call last)") == 1   # the launcher's
                and "ChildFailedError" in out and codes and set(codes) <= {"-6", "-15"})
    assert teardown, proc.stdout[-3000:] + proc.stderr[-3000:]
    warnings.warn(f"torchrun: a rank aborted at interpreter exit after finishing ({TEARDOWN_ABORT!r})")


def losses(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def assert_same_run(a: Path, b: Path, rtol: float) -> None:
    ra, rb = losses(a), losses(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2, 3]
    for x, y in zip(ra, rb):
        for key in ("loss", "ce", "mtp", "balance", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=rtol), (x["step"], key, x[key], y[key])


def test_two_gloo_processes_match_one(shards, tmp_path):
    one = tmp_path / "one"
    pretrain(["--data", str(shards), "--out", str(one), "--batch-size", "4", "--grad-accum", "2", *COMMON])
    # one torchrun launch, two runs in the same process group: DDP, then FSDP2
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent("""
        import sys
        import torch.distributed as dist
        from nanoseek.commands.pretrain import main
        dist.init_process_group("gloo")
        out, args = sys.argv[1], sys.argv[2:]
        main([*args, "--out", out + "/ddp"])
        main([*args, "--out", out + "/fsdp", "--fsdp", "--sample-tokens", "3"])   # sampling runs on every rank
        dist.destroy_process_group()
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(tmp_path), "--data", str(shards), "--batch-size", "2", "--grad-accum", "2", *COMMON]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert_launch_ok(proc)
    assert "2 process(es) on cpu, DDP" in proc.stdout and "2 process(es) on cpu, FSDP2" in proc.stdout
    for mode in ("ddp", "fsdp"):
        assert_same_run(one, tmp_path / mode, rtol=1e-5)
    # FSDP2's sharded state is gathered into the same HF checkpoint a single process writes
    ref = Transformer.from_pretrained(one / "checkpoints" / "step_000003" / "model").state_dict()
    got = Transformer.from_pretrained(tmp_path / "fsdp" / "checkpoints" / "step_000003" / "model").state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.allclose(ref[k], got[k], atol=1e-4) for k in ref)


def test_grad_accumulation_matches_bigger_batch(shards, tmp_path):
    pretrain(["--data", str(shards), "--out", str(tmp_path / "big"), "--batch-size", "8", *COMMON])
    pretrain(["--data", str(shards), "--out", str(tmp_path / "acc"), "--batch-size", "2", "--grad-accum", "4",
              *COMMON])
    assert_same_run(tmp_path / "big", tmp_path / "acc", rtol=1e-5)


def test_split_over_threads_matches_one_chunk(shards, tmp_path, capsys):
    pretrain(["--data", str(shards), "--out", str(tmp_path / "one"), "--batch-size", "4", "--split", "1", *COMMON])
    assert "chunks, one per thread" not in capsys.readouterr().out
    pretrain(["--data", str(shards), "--out", str(tmp_path / "split"), "--batch-size", "4", "--split", "2",
              "--grad-accum", "1", *COMMON])
    assert "rows of each micro-batch in 2 chunks" in capsys.readouterr().out
    assert_same_run(tmp_path / "one", tmp_path / "split", rtol=1e-5)


# --- the batch split over CPU threads inside one process (train.parallel.split_backward)
def _grads(model, x, y, split: int, accumulate: int = 1):
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    for _ in range(accumulate):
        parts, counts = pretrain_backward(model, params, x, y, mtp_weight=0.3, balance_alpha=1e-2,
                                          amp_dtype=torch.float32, scale=1 / accumulate, split=split)
    return parts, counts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_split_backward_equals_one_chunk_and_is_deterministic():
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    model.init_weights()
    ids = torch.randint(0, model.embed.num_embeddings, (5, 33))
    x, y = ids[:, :-1], ids[:, 1:]
    torch.set_num_threads(2)
    try:
        ref_parts, ref_counts, ref = _grads(model, x, y, 1, accumulate=2)
        for split in (2, 3):   # uneven chunks: 2 + 3 rows, 1 + 2 + 2 rows
            parts, counts, got = _grads(model, x, y, split, accumulate=2)
            assert torch.get_num_threads() == 2                   # the caller's count is restored
            assert parts.keys() == ref_parts.keys() and "mtp" in parts and "balance" in parts
            for k in parts:
                assert parts[k].item() == pytest.approx(ref_parts[k].item(), rel=1e-6), k
            assert torch.equal(counts, ref_counts)
            assert got.keys() == ref.keys() and len(got) > 20
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)
        # added in chunk order: the same bits whichever thread finishes first
        again = _grads(model, x, y, 3, accumulate=2)[2]
        assert all(torch.equal(again[k], got[k]) for k in got)
    finally:
        torch.set_num_threads(1)


def test_split_backward_reraises_a_chunk_error_once_every_chunk_is_done():
    w = torch.ones(3, requires_grad=True)
    finished = []

    def fn(weight, x):
        if x[0, 0] < 0:
            raise ValueError("bad chunk")
        finished.append(x.shape[0])
        return (w * x).sum() * weight, None

    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="bad chunk"):
            split_backward(fn, [w], 3, torch.tensor([[1.0] * 3, [-1.0] * 3, [2.0] * 3]))
        assert sorted(finished) == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_sft_in_two_gloo_processes_matches_one(tmp_path):
    """`torchrun -m nanoseek sft`: each rank trains on its rows of the same global batch (DDP), and the
    losses, gradient norms and final weights equal the one-process run's."""
    from helpers import arith_tokenizer, tiny_model

    from nanoseek.commands.sft import main as sft

    tok = arith_tokenizer()
    base = tmp_path / "base"
    tiny_model(tok).save_pretrained(base)
    tok.save(base)
    # (no --n: torchrun's own parser takes it for an abbreviation of its options)
    args = ["--model", str(base), "--task", "arithmetic", "--steps", "3", "--batch-size", "5",
            "--seq-len", "64", "--lr", "3e-3", "--warmup", "1", "--val-frac", "0", "--device", "cpu"]
    sft([*args, "--out", str(tmp_path / "one")])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "nanoseek",
           "sft", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert_launch_ok(proc)
    assert "2 processes on cpu, DDP" in proc.stdout
    rows = [[r for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
            for run in ("one", "two")]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [1, 2, 3]
    for a, b in zip(*rows):
        assert b["tokens"] == a["tokens"]
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    one = Transformer.from_pretrained(tmp_path / "one" / "model").state_dict()
    two = Transformer.from_pretrained(tmp_path / "two" / "model").state_dict()
    start = Transformer.from_pretrained(base).state_dict()
    assert any(not torch.equal(one[k], start[k]) for k in one)           # it trained
    for k in one:      # Adam moved the weights by ~lr (3e-3) a step; summation order in the all-reduce by ~1e-6
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)


GRPO_WORKER = """
import sys
import torch
import torch.distributed as dist
from nanoseek.model import Transformer, preset
from nanoseek.train.grpo import GRPO, GRPOConfig, Rollouts


UNEVEN = {"three_one": [[True, True, True, False], [False, False, False, True]],
          "all_none": [[True] * 4, [False] * 4]}


def collect_shares(rank, world, signal, rounds):
    # GRPO.collect with dynamic sampling and a stand-in engine: signal[rank][round] of the 4 groups a
    # round draws on this rank have rewards that differ. -> how many groups this rank keeps (all with signal)
    from types import SimpleNamespace
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=64))
    cfg = GRPOConfig(variant="dapo", group_size=2, dynamic_sampling=True, max_sampling_rounds=rounds)
    calls = [0]

    def next_prompts():
        r = calls[0]
        calls[0] += 1
        return [[3, 4]] * 4, [SimpleNamespace(signal=i < signal[rank][r], seen=0) for i in range(4)]

    def reward(c, ex):
        ex.seen += 1
        v = float(ex.signal and ex.seen == 1)          # a group with signal: 1 then 0
        return {"total": v, "accuracy": v, "format": 0.0}
    gen = lambda ps: [SimpleNamespace(token_ids=[5], text="", finish_reason="stop") for _ in ps]   # noqa: E731
    batch, sampled = GRPO(model, None, gen, reward, cfg).collect(next_prompts)
    assert all(ex.signal for ex in batch.examples)
    return len(batch.examples)


def batch():
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (6, 3, 5, 4)]
    comps = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (5, 2, 7, 4, 1, 6, 3, 3)]
    B, G = len(comps), 2
    return Rollouts(prompt_ids=[p for p in prompts for _ in range(G)], completion_ids=comps, texts=[""] * B,
                    truncated=torch.zeros(B, dtype=torch.bool),
                    # groups 1 and 3 (rank 1's share on two ranks) all-equal: skipped, rank 1 runs one for its zeros
                    rewards=torch.tensor([[0.0, 2.0], [4.0, 4.0], [3.0, 0.0], [1.0, 1.0]]),
                    accuracy=torch.zeros(B // G, G), format=torch.zeros(B // G, G), examples=[None] * (B // G))


def update(variant, rank=0, world=1, skip=True, share=None, **cfg):
    b = batch()
    mine = torch.arange(len(b.examples)) % world == rank if share is None else torch.tensor(share[rank])
    b = b.select(mine)                                                  # this rank's groups
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=64))
    model.init_weights()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = GRPO(model, torch.optim.SGD(model.parameters(), lr=1.0), None, None,
                   GRPOConfig(variant=variant, group_size=2, clip_grad=0.0, split=1, skip_zero_advantage=skip,
                              **cfg), pad_id=2)
    stats = trainer.update(b)
    return torch.cat([(a - p.detach()).flatten() for a, p in zip(before, model.parameters())]), stats


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {(v, skip): update(v, rank, world, skip) for v in ("grpo", "dapo", "gspo") for skip in (True, False)}
    # uneven shares (dynamic sampling keeps different counts on each rank), one of them empty
    for name, share in UNEVEN.items():
        out[name] = update("dapo", rank, world, share=share)
    # two minibatches, slices of one permutation of the 4 groups: rank 1 may have none in one of them
    delta, _ = update("grpo", rank, world, share=UNEVEN["three_one"], minibatches=2)
    both = [torch.zeros_like(delta) for _ in range(world)]
    dist.all_gather(both, delta)
    out["minibatches"] = both
    # one group a rank and two minibatches: two steps, as one process on the two groups takes
    out["one_each"] = update("grpo", rank, world, share=[[True, False, False, False], [False, False, True, False]],
                             minibatches=2)[1]["updates"]
    # dynamic sampling's shares: rank 0 keeps 4 + 4 in two rounds, rank 1 0 + 2; 8 wanted in all
    out["collect"] = [collect_shares(rank, world, [[4, 4], [0, 2]], 4),   # rank 0 makes up 2 for rank 1
                      collect_shares(rank, world, [[1, 4], [0, 1]], 2)]   # rounds run out at 6: all kept
    if dist.get_rank() == 0:
        torch.save(out, sys.argv[1])
    # leave together: a rank that tears gloo down and exits while the other still works aborted at exit
    # (std::terminate, ~8% of runs); parallel.finish does the same
    dist.barrier()
    dist.destroy_process_group()
"""


def test_grpo_update_in_two_gloo_processes_equals_one(tmp_path):
    """Each rank updates on its share of the groups with the global normalizers and the gradients
    summed over the ranks (train.parallel.all_reduce_grads_): the step of one process on all groups."""
    worker = tmp_path / "grpo_worker.py"
    worker.write_text(GRPO_WORKER)
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{tmp_path}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(tmp_path / "two.pt")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert_launch_ok(proc)
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    sys.path.insert(0, str(tmp_path))
    try:
        import grpo_worker
        for variant in ("grpo", "dapo", "gspo"):
            for skip in (True, False):      # zero-advantage groups skipped or run: the same step either way
                delta, stats = grpo_worker.update(variant, skip=skip)
                assert delta.abs().sum() > 0
                torch.testing.assert_close(two[variant, skip][0], delta, rtol=1e-4, atol=1e-7)
                assert two[variant, skip][1].keys() == stats.keys()
                for k in stats:
                    if k not in ("entropy", "ratio_mean") or not skip:      # the trained groups' when skipping
                        assert two[variant, skip][1][k] == pytest.approx(stats[k], rel=1e-5, abs=1e-7), (variant, k)
        # uneven shares, one rank's empty: the same step as one process on all the groups
        delta, stats = grpo_worker.update("dapo")
        for name in grpo_worker.UNEVEN:
            torch.testing.assert_close(two[name][0], delta, rtol=1e-4, atol=1e-7)
            for k in ("loss", "clip_frac", "grad_norm"):
                assert two[name][1][k] == pytest.approx(stats[k], rel=1e-5, abs=1e-7), (name, k)
        a, b = two["minibatches"]
        assert a.abs().sum() > 0 and torch.equal(a, b)
        torch.testing.assert_close(a, grpo_worker.update("grpo", minibatches=2)[0], rtol=1e-4, atol=1e-7)
        assert two["one_each"] == 2
        assert two["collect"] == [6, 5]                 # this was rank 0; rank 1 kept 2 and 1
        assert grpo_worker.collect_shares(0, 1, [[1, 2, 4]], 4) == 4   # one process: up to one batch
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("grpo_worker", None)


def test_grpo_command_under_torchrun(tmp_path):
    """`torchrun -m nanoseek grpo`: each rank rolls out half the prompts; rank 0 logs the global batch
    (all completions, the held-out set scored in shares) and saves one model."""
    from helpers import arith_tokenizer, eos_heavy_model_dir

    base = tmp_path / "base"
    eos_heavy_model_dir(arith_tokenizer(), base)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "nanoseek",
           "grpo", "--variant", "dapo", "--overlong-penalty", "2", "--model", str(base), "--task", "arithmetic",
           "--task-arg", "n_digits=1", "--out",
           str(tmp_path / "run"), "--steps", "2", "--group-size", "4", "--prompts-per-step", "4",
           "--max-new-tokens", "6", "--eval-problems", "5", "--eval-every", "0", "--lr", "1e-3", "--device", "cpu"]
    proc = subprocess.run(cmd + ["--save-every", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert_launch_ok(proc)
    assert "(2 processes on cpu)" in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["completions"] == 16 and r["groups_trained"] == 4 for r in train)     # both ranks' shares
    assert train[0]["reward_std"] > 0 and train[0]["grad_norm"] > 1e-3
    held = [r for r in rows if "heldout_accuracy" in r]
    assert [r["step"] for r in held] == [0, 2]
    assert all(0 <= r["heldout_accuracy"] <= 1 and r["heldout_length"] > 0 for r in held)
    model = Transformer.from_pretrained(tmp_path / "run" / "model")
    start = Transformer.from_pretrained(base)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), start.state_dict().values()))
    # DAPO's dynamic sampling: the ranks sample rounds (2 prompts x 4 each) until together they keep 4 groups
    # with signal or run out of rounds; their shares may differ, the step is one global step
    dyn = cmd[:cmd.index("--out") + 1] + [str(tmp_path / "dyn")] + cmd[cmd.index("--out") + 2:] + [
        "--dynamic-sampling", "--steps", "3", "--temperature", "1.5"]
    proc = subprocess.run(dyn, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert_launch_ok(proc)
    rows = [json.loads(line) for line in (tmp_path / "dyn" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["completions"] % 16 == 0 and 16 <= r["completions"] <= 4 * 16 for r in train)   # 1-4 rounds
    assert all(r["groups_trained"] <= 4 for r in train)
    assert any(r["completions"] > 16 or r["groups_trained"] == 4 for r in train)
    trained = [r for r in train if r["groups_trained"] > 0]
    assert trained and all(r["grad_norm"] > 0 for r in trained)
    assert (tmp_path / "dyn" / "model" / "model.safetensors").exists()
    # the first run's checkpoint holds both ranks' random streams: it resumes under torchrun, not in one process
    from nanoseek.commands.grpo import main as grpo_main

    with pytest.raises(SystemExit, match="saved by 2 process"):
        grpo_main(["--resume", str(tmp_path / "run"), "--steps", "3", "--device", "cpu"])
    launcher = cmd[:cmd.index("-m", 3) + 3]                       # torchrun ... -m nanoseek grpo
    proc = subprocess.run(launcher + ["--resume", str(tmp_path / "run"), "--steps", "3"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert_launch_ok(proc)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000003"


def test_eval_and_distill_under_torchrun(tmp_path):
    """`torchrun -m nanoseek eval`: each rank scores every second problem and rank 0 writes the whole
    table, the same as one process (greedy). `distill`: the ranks sample their shares of the problems,
    all the traces train the student in DDP, one model is saved."""
    from helpers import arith_tokenizer, tiny_model

    from nanoseek.commands.eval import main as eval_main

    tok = arith_tokenizer()
    base = tmp_path / "base"
    tiny_model(tok).save_pretrained(base)
    tok.save(base)
    ev = ["--model", str(base), "--task", "arithmetic", "--n-problems", "7", "--max-new-tokens", "6", "--device", "cpu"]
    eval_main([*ev, "--out", str(tmp_path / "one.json")])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "nanoseek"]
    proc = subprocess.run([*launch, "eval", *ev, "--out", str(tmp_path / "two.json")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert_launch_ok(proc)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["n_problems"] == 7 and [p["prompt"] for p in two["problems"]] == [p["prompt"] for p in one["problems"]]
    assert [p["first_sample"] for p in two["problems"]] == [p["first_sample"] for p in one["problems"]]
    for key in ("pass@1", "format", "response_length"):
        assert two[key] == pytest.approx(one[key]), key

    # distill: a teacher that has memorized two problems (as in test_distill_eval); each rank samples
    # one problem's traces, and the student trains on both ranks' traces in DDP
    from helpers import arith

    from nanoseek.data.sft import SFTDataset
    from nanoseek.train.sft import sft_train

    problems = arith.examples(2, 0, n_digits=1, ops="+")
    teacher = tiny_model(tok, seed=0)
    ds = SFTDataset([arith.sft_messages(e) for e in problems], tok, seq_len=64)
    sft_train(teacher, ds, torch.optim.AdamW(teacher.parameters(), lr=1e-2), steps=80, batch_size=2, lr=1e-2)
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save(tmp_path / "teacher")
    out = tmp_path / "distill"
    proc = subprocess.run([*launch, "distill", "--teacher", str(tmp_path / "teacher"), "--student", str(base),
                           "--task", "arithmetic", "--task-arg", "n_digits=1", "--task-arg", "ops=+",
                           "--n-prompts", "2", "--samples-per-prompt", "4", "--temperature", "0.3",
                           "--max-new-tokens", "16", "--steps", "3", "--batch-size", "2", "--seq-len", "64",
                           "--device", "cpu", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert_launch_ok(proc)
    run = json.loads((out / "run.json").read_text())
    traces = (out / "traces.jsonl").read_text().splitlines()
    assert run["processes"] == 2 and run["sampling"]["sampled"] == 8 and run["sampling"]["kept"] == len(traces) >= 1
    assert len([line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]) == 3
    student, start = Transformer.from_pretrained(out / "model"), Transformer.from_pretrained(base)
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), start.state_dict().values()))
