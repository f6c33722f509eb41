"""R1-Zero in miniature: pretrain a tiny MLA+MoE+MTP model on arithmetic, then GRPO; held-out before/after.

    nanoseek demo                                   # the full run into runs/demo (minutes on 2 CPU cores)
    nanoseek demo --quick --out /tmp/demo           # every stage and artifact, reduced (under a minute)
    nanoseek demo --seed 1 --threads 2 --out runs/demo-s1
    nanoseek demo --device cuda --dtype bf16

Stages, in one process, no network, everything written under --out:
  1. data: arithmetic problems ("What is 7*8-5?": three one-digit operands, + - *) from the task's
     train split, a pretraining corpus made of them, and a byte-level BPE tokenizer trained on it.
     The corpus mixes plain one-step lines ("7*8=56") with chat documents in R1's format that either
     answer at once ("<think>\\n</think>\\n51") or think first, one operation a line
     ("<think>\\n7*8=56\\n56-5=51\\n</think>\\n51"). Half of the chat documents carry the task's
     instruction (as the held-out prompts do) and answer at once 70% of the time; the other half are
     the bare question and think half of the time.
  2. pretrain: a tiny DeepSeek-V3 (MLA, DeepSeekMoE with a shared expert and aux-loss-free
     balancing, one MTP module) from scratch on that corpus with V3's loss (CE + MTP + balance).
  3. evaluate the base model on held-out problems (the task's hash split: in no training text) with
     the inference engine: greedy accuracy, and pass@1 / pass@k / cons@k from k samples.
  4. GRPO (DeepSeekMath's: per-sequence mean, std-normalized group advantages, clipped ratio), the
     engine for rollouts, the task's verifier as the reward (accuracy + 0.1 format).
  5. evaluate again on the same held-out problems.
  6. report.md (before/after table, the gain with a paired-bootstrap 95% interval, wall and CPU
     time and throughput per stage), plots/, metrics.jsonl, run.json, heldout.jsonl, and two
     Hugging Face model directories with the tokenizer: base/ (pretrained) and final/ (after GRPO).

Why it works in minutes: a one-shot answer to a*b+c is hard for a 0.2M-parameter model, while each
line of the worked trace is an easy fact. Asked with the instruction, the base model usually answers
at once and is often wrong; its samples think now and then and are then mostly right (pass@k >>
pass@1). The verifier rewards exactly those samples, so GRPO teaches the policy to think: accuracy
on held-out problems jumps and responses grow longer (R1-Zero's signature, in miniature).

Threads: a model this small is bound by per-op overhead, not arithmetic. One thread is the robust
default: two are ~25% faster on an idle 2-core machine but several times slower when other
processes compete for the cores (OpenMP workers spin-waiting against them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nanoseek.commands import _checks as checks
from nanoseek.common import pick_device, pick_dtype, seed_everything
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.model import Transformer, count_parameters, preset
from nanoseek.tasks import arithmetic
from nanoseek.tasks.rewards import INSTRUCTION
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.grpo import GRPO, GRPOConfig, chat_prompts, evaluate
from nanoseek.train.optim import build_optimizer, lr_at
from nanoseek.train.sft import save_model
from nanoseek.train.step import autocast, pretrain_loss, update_router_bias

# --- settings: the full demo, and the reduced one the test runs (same stages, smaller numbers)
FULL = dict(
    task=dict(n_digits=1, n_operands=3, ops="+-*"),
    corpus_problems=40_000,      # documents in the corpus (train-split problems drawn with replacement)
    fact_frac=0.35,              # share of plain one-step lines ("7*8=56")
    bare_frac=0.5,               # share of chat documents asking the bare question (no instruction)
    worked_frac=0.3,             # share of instruction chat documents that think before answering
    worked_frac_bare=0.5,        # the same for bare questions: the operands sit right before the
                                 # answer there, where copying them into the trace is quick to learn
    vocab_size=512,              # upper bound; the corpus runs out of merges before it
    model=dict(preset="tiny"),   # MLA + 8 routed experts (top-2) + 1 shared + 1 MTP module
    pretrain=dict(steps=800, batch_size=64, seq_len=64, optimizer="muon", lr=1e-2, min_lr=1e-3, warmup=30,
                  weight_decay=0.0, clip=1.0, mtp_weight=0.3, balance_alpha=1e-4, bias_gamma=1e-3),
    eval=dict(problems=500, samples=8, max_new_tokens=32, every=10),
    grpo=dict(variant="grpo", steps=120, group_size=8, prompts_per_step=16, lr=1e-4, temperature=1.0,
              max_new_tokens=32, train_problems=4000),
    bootstrap=10_000,
)
QUICK = dict(
    FULL, corpus_problems=3_000,
    pretrain=dict(FULL["pretrain"], steps=40, batch_size=16, warmup=5),
    eval=dict(problems=48, samples=4, max_new_tokens=24, every=2),
    grpo=dict(FULL["grpo"], steps=4, group_size=4, prompts_per_step=4, max_new_tokens=24, train_problems=200),
    bootstrap=1_000,
)
DIRECT = "<think>\n</think>\n{answer}"   # the assistant turn that answers at once (empty reasoning)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanoseek demo", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", help="run folder (default runs/demo, or runs/demo-N when that holds a run already)")
    p.add_argument("--quick", action="store_true", help="reduced sizes: every stage and artifact in under a minute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: see the note above)")
    p.add_argument("--device", help="cuda | cpu | cuda:N (default: cuda if present)")
    p.add_argument("--dtype", help="fp32 or bf16 autocast for training (default fp32 on CPU, bf16 on CUDA)")
    return p.parse_args(argv)


def _command_name() -> str:
    """How to call nanoseek from here: `nanoseek` when it is on PATH, else the script beside this Python
    (`make demo` runs .venv/bin/python, whose bin folder a new shell has not on its PATH)."""
    if shutil.which("nanoseek"):
        return "nanoseek"
    script = Path(sys.executable).parent / "nanoseek"
    if script.is_file():
        try:
            return shlex.quote(os.path.relpath(script))
        except ValueError:      # another drive (Windows)
            return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m nanoseek"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    checks.threads("demo", args.threads)
    checks.seed("demo", args.seed)
    threads_before = torch.get_num_threads()
    try:
        run_demo(args)
    finally:   # in-process callers (tests) get their thread count back
        torch.set_num_threads(threads_before)


def run_demo(args: argparse.Namespace) -> None:
    S = QUICK if args.quick else FULL
    if args.out is None:      # `make demo` twice keeps the first run and writes the second beside it
        run, n = Path("runs/demo"), 1
        while any((run / name).exists() for name in checks.RUN_FILES):
            run, n = Path(f"runs/demo-{n}"), n + 1
    else:
        run = Path(args.out)
    run = checks.fresh_run("demo", run)      # a file, a path under a file or a folder holding a run: one line

    # --- setup: device, threads, seed, run folder, stage clock
    device = pick_device(args.device)
    amp_dtype = pick_dtype(args.dtype, device)
    checks.train_dtype("demo", amp_dtype, args.dtype)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    (run / "plots").mkdir(parents=True, exist_ok=True)
    metrics_path = run / "metrics.jsonl"
    # Wall time says how long one waited; process CPU time (all threads) says how much machine the
    # stage needed, which on a shared box is the honest figure to compare with a dedicated one.
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    clock = [time.perf_counter(), time.process_time()]

    def lap(stage: str) -> float:
        """Charge the time since the previous lap to `stage`; returns the wall seconds charged."""
        w, c = time.perf_counter(), time.process_time()
        wall[stage] = wall.get(stage, 0.0) + w - clock[0]
        cpu[stage] = cpu.get(stage, 0.0) + c - clock[1]
        dt = w - clock[0]
        clock[:] = [w, c]
        return dt

    def log(row: dict) -> None:
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    print(f"nanoseek demo: R1-Zero in miniature -> {run} ({'quick' if args.quick else 'full'}, seed {args.seed}, "
          f"{device}, {torch.get_num_threads()} thread(s))")

    # --- 1. data: problems, pretraining corpus, tokenizer
    knobs = S["task"]
    rng = random.Random(args.seed)
    problems = arithmetic.examples(S["corpus_problems"], args.seed, "train", unique=False, **knobs)
    docs: list[dict] = []            # {"text": ...} plain lines, {"messages": [...]} chat documents
    kinds = {"plain_lines": 0, "direct": 0, "worked": 0, "direct_bare": 0, "worked_bare": 0}
    for ex in problems:
        if rng.random() < S["fact_frac"]:
            steps = arithmetic.worked(ex).split("\n")[1:-2]      # the trace lines between the tags
            docs.append({"text": rng.choice(steps)})
            kinds["plain_lines"] += 1
            continue
        bare = rng.random() < S["bare_frac"]
        worked = rng.random() < S["worked_frac_bare" if bare else "worked_frac"]
        user = [{"role": "user", "content": ex.prompt}] if bare else arithmetic.messages(ex)
        answer = arithmetic.worked(ex) if worked else DIRECT.format(answer=ex.answer)
        docs.append({"messages": user + [{"role": "assistant", "content": answer}]})
        kinds[("worked" if worked else "direct") + ("_bare" if bare else "")] += 1
    (run / "data").mkdir(exist_ok=True)
    with (run / "data" / "corpus.jsonl").open("w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)

    # Digits stay single tokens (as in LLaMA's tokenizer): merges like "56" would hide the digit
    # structure arithmetic is made of, so the BPE is trained on the corpus with its digits removed.
    def words(d: dict) -> str:
        text = d["text"] if "text" in d else "\n".join(m["content"] for m in d["messages"])
        return re.sub(r"[0-9]+", "", text)

    tokenizer = Tokenizer.train([words(d) for d in docs[:2000]], vocab_size=S["vocab_size"])
    tokenizer.save(run / "data" / "tokenizer")
    # One stream of documents, each bos ... eos (render_chat adds both to a conversation); chat
    # documents go through render_chat so <｜User｜>, <think> etc. are their special ids.
    stream: list[int] = []
    for d in docs:
        if "text" in d:
            stream += [tokenizer.bos_id, *tokenizer.encode(d["text"]), tokenizer.eos_id]
        else:
            stream += tokenizer.render_chat(d["messages"])[0]
    stream_t = torch.tensor(stream, dtype=torch.long)
    corpus_stats = {"documents": len(docs), **kinds, "tokens": len(stream), "vocab_size": tokenizer.vocab_size}
    heldout = arithmetic.examples(S["eval"]["problems"], args.seed, "test", **knobs)
    train_rl = arithmetic.examples(S["grpo"]["train_problems"], args.seed + 1, "train", **knobs)
    dt = lap("data")
    print(f"[1/6 data] {len(docs)} documents ({kinds['plain_lines']} plain lines, "
          f"{kinds['direct'] + kinds['direct_bare']} chat answered at once, {kinds['worked'] + kinds['worked_bare']} "
          f"worked), {len(stream)} tokens, vocab {tokenizer.vocab_size} ({dt:.1f} s)")

    # --- 2. pretrain: V3's objective (CE + lambda * MTP + alpha * balance) and aux-loss-free bias updates
    P = S["pretrain"]
    mcfg = preset(S["model"]["preset"], vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                  eos_token_id=tokenizer.eos_id)
    model = Transformer(mcfg).to(device)
    model.init_weights()
    model.train()
    n_params = count_parameters(model)
    optimizer = build_optimizer(model, P["optimizer"], P["lr"], P["weight_decay"])
    batch_gen = torch.Generator().manual_seed(args.seed)
    B, T = P["batch_size"], P["seq_len"]
    window = torch.arange(T + 1)
    t0 = time.perf_counter()
    bar = tqdm(range(P["steps"]), desc="pretrain", dynamic_ncols=True, mininterval=2)
    for step in bar:
        lr = lr_at(step, lr=P["lr"], min_lr=P["min_lr"], warmup=P["warmup"], total=P["steps"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(stream_t) - T - 1, (B,), generator=batch_gen)     # random windows
        rows = stream_t[starts[:, None] + window].to(device)                             # (B, T + 1)
        with autocast(device, amp_dtype):
            loss, parts, counts = pretrain_loss(model, rows[:, :-1], rows[:, 1:], mtp_weight=P["mtp_weight"],
                                                balance_alpha=P["balance_alpha"])
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), P["clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if counts is not None:
            update_router_bias(model, counts, P["bias_gamma"])
        row = {"stage": "pretrain", "step": step + 1, **{k: v.item() for k, v in parts.items()}, "lr": lr,
               "grad_norm": grad_norm.item(), "time": time.perf_counter() - t0}
        if not math.isfinite(row["loss"]):
            raise SystemExit(f"nanoseek demo: pretraining loss is {row['loss']} at step {step + 1}")
        log(row)
        bar.set_postfix(ce=f"{row['ce']:.3f}")
    bar.close()
    model.eval()
    save_model(model, tokenizer, run / "base")
    pretrain_tokens = P["steps"] * B * T
    dt = lap("pretrain")
    print(f"[2/6 pretrain] {n_params['total'] / 1e6:.2f}M parameters ({n_params['active'] / 1e6:.2f}M active, "
          f"{n_params['mtp'] / 1e6:.2f}M MTP), {P['steps']} steps, {pretrain_tokens} tokens, "
          f"final CE {row['ce']:.3f} ({dt:.1f} s, {pretrain_tokens / dt:.0f} tokens/s)")

    # --- engine (shares the model's weights: what GRPO changes, the next rollout sees) and evaluation
    E, G = S["eval"], S["grpo"]
    k = E["samples"]
    held_prompts = chat_prompts(tokenizer, arithmetic.messages, heldout)
    bare_prompts = chat_prompts(tokenizer, lambda ex: [{"role": "user", "content": ex.prompt}], heldout)
    train_prompts = chat_prompts(tokenizer, arithmetic.messages, train_rl)
    engine = Engine(model, tokenizer, max_batch=max(256, G["group_size"] * G["prompts_per_step"]),
                    max_seq_len=max(map(len, held_prompts + train_prompts)) + max(E["max_new_tokens"],
                                                                                    G["max_new_tokens"]) + 1)
    seeds = iter(range(args.seed * 10**9, (args.seed + 1) * 10**9))   # one sampling seed per request
    generated = {"tokens": 0, "time": 0.0}

    def generate(prompts: list[list[int]], temperature: float, max_tokens: int) -> list:
        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                 seed=next(seeds) if temperature > 0 else None) for _ in prompts]
        t = time.perf_counter()
        out = engine.generate(prompts, params)
        generated["tokens"] += sum(len(c.token_ids) for c in out)
        generated["time"] += time.perf_counter() - t
        return out

    def greedy_eval(grpo_step: int, tag: str, prompts: list[list[int]] = held_prompts,
                    stage: str = "eval") -> dict:
        res = evaluate(lambda ps: generate(ps, 0.0, E["max_new_tokens"]), prompts, heldout,
                       arithmetic.reward, arithmetic.extract_answer)
        thinks = [_thinks(p["first_sample"]) for p in res["problems"]]
        row = {"stage": stage, "tag": tag, "grpo_step": grpo_step, "problems": len(heldout),
               "accuracy": res["pass@1"], "format": res["format"], "thinks": sum(thinks) / len(thinks),
               "response_length": res["response_length"]}
        log(row)
        return {**row, "per_problem": res["problems"]}

    def full_eval(grpo_step: int, tag: str) -> dict:
        """Greedy accuracy; k samples per problem at the GRPO temperature (pass@1, pass@k, cons@k);
        greedy accuracy on the bare question, a phrasing GRPO never trains on (transfer)."""
        g = greedy_eval(grpo_step, tag)
        res = evaluate(lambda ps: generate(ps, G["temperature"], E["max_new_tokens"]), held_prompts, heldout,
                       arithmetic.reward, arithmetic.extract_answer, n_samples=k, k=k)
        row = {"stage": "eval_sampled", "tag": tag, "grpo_step": grpo_step, "problems": len(heldout), "k": k,
               "temperature": G["temperature"], "pass@1": res["pass@1"], f"pass@{k}": res[f"pass@{k}"],
               f"cons@{k}": res[f"cons@{k}"], "format": res["format"], "response_length": res["response_length"]}
        log(row)
        bare = greedy_eval(grpo_step, tag, bare_prompts, "eval_bare")
        return {"greedy": g, "sampled": row, "sampled_correct": [p["correct"] for p in res["problems"]],
                "bare": bare}

    # --- 3. evaluate the base model
    before = full_eval(0, "before")
    eval_tok_s = generated["tokens"] / max(generated["time"], 1e-9)
    dt = lap("eval_before")
    print(f"[3/6 eval before] held-out greedy accuracy {before['greedy']['accuracy']:.3f} (thinks "
          f"{before['greedy']['thinks']:.2f}), sampled pass@1 {before['sampled']['pass@1']:.3f}, "
          f"pass@{k} {before['sampled'][f'pass@{k}']:.3f} ({dt:.1f} s)")

    # --- 4. GRPO
    cfg = GRPOConfig(variant=G["variant"], group_size=G["group_size"], max_new_tokens=G["max_new_tokens"],
                     seed=args.seed, temperature=G["temperature"])
    rl_optimizer = build_optimizer(model, "adamw", G["lr"], 0.0)
    trainer = GRPO(model, rl_optimizer, lambda ps: generate(ps, G["temperature"], G["max_new_tokens"]),
                   lambda c, ex: arithmetic.reward(c.text, ex), cfg, pad_id=tokenizer.pad_id, dtype=amp_dtype)
    order = list(range(len(train_rl)))
    cursor = [len(order)]

    def next_prompts() -> tuple[list[list[int]], list]:
        """The next prompts_per_step training problems, reshuffled after each pass."""
        picked = []
        while len(picked) < G["prompts_per_step"]:
            if cursor[0] == len(order):
                rng.shuffle(order)
                cursor[0] = 0
            picked.append(order[cursor[0]])
            cursor[0] += 1
        return [train_prompts[i] for i in picked], [train_rl[i] for i in picked]

    generated.update(tokens=0, time=0.0)
    completions = 0
    bar = tqdm(range(1, G["steps"] + 1), desc=f"grpo ({G['variant']})", dynamic_ncols=True, mininterval=2)
    for step in bar:
        stats = trainer.step(next_prompts)
        completions += stats["completions"]
        log({"stage": "grpo", "step": step, **stats})
        bar.set_postfix(reward=f"{stats['reward']:.2f}", acc=f"{stats['accuracy']:.2f}",
                        len=f"{stats['response_length']:.1f}")
        if step % E["every"] == 0 and step != G["steps"]:   # held-out curve, charged to its own line
            lap("grpo")
            model.eval()
            tokens, seconds = generated["tokens"], generated["time"]
            greedy_eval(step, "during")
            generated.update(tokens=tokens, time=seconds)
            lap("eval_during")
    bar.close()
    model.eval()
    rollout_tok_s = generated["tokens"] / max(generated["time"], 1e-9)
    lap("grpo")
    print(f"[4/6 grpo] {G['steps']} steps x {G['prompts_per_step']} prompts x G={G['group_size']} = {completions} "
          f"completions ({wall['grpo']:.1f} s, {completions / wall['grpo']:.1f} completions/s)")

    # --- 5. evaluate again on the same held-out problems
    after = full_eval(G["steps"], "after")
    dt = lap("eval_after")
    print(f"[5/6 eval after] held-out greedy accuracy {after['greedy']['accuracy']:.3f} (thinks "
          f"{after['greedy']['thinks']:.2f}), sampled pass@1 {after['sampled']['pass@1']:.3f}, "
          f"pass@{k} {after['sampled'][f'pass@{k}']:.3f} ({dt:.1f} s)")

    # --- 6. run folder: model, per-problem outcomes, statistics, plots, config, report
    final_dir = save_model(model, tokenizer, run / "final")
    c0 = np.array([p["correct"] for p in before["greedy"]["per_problem"]], dtype=np.float64)
    c1 = np.array([p["correct"] for p in after["greedy"]["per_problem"]], dtype=np.float64)
    s0 = np.array(before["sampled_correct"], dtype=np.float64) / k
    s1 = np.array(after["sampled_correct"], dtype=np.float64) / k
    boot = np.random.default_rng(args.seed)
    gain = _paired_bootstrap(c0, c1, S["bootstrap"], boot)
    gain_sampled = _paired_bootstrap(s0, s1, S["bootstrap"], boot)
    with (run / "heldout.jsonl").open("w") as f:
        for ex, b, a, sb, sa in zip(heldout, before["greedy"]["per_problem"], after["greedy"]["per_problem"],
                                    before["sampled_correct"], after["sampled_correct"]):
            f.write(json.dumps({"prompt": ex.prompt, "answer": ex.answer, "before": b["first_sample"],
                                "before_correct": b["correct"], "after": a["first_sample"],
                                "after_correct": a["correct"], f"before_correct_of_{k}": sb,
                                f"after_correct_of_{k}": sa}) + "\n")
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    _plots(rows, run / "plots")
    lap("save_and_report")
    summary = {"stage": "summary", "heldout_problems": len(heldout), "seed": args.seed,
               "accuracy_before": before["greedy"]["accuracy"], "accuracy_after": after["greedy"]["accuracy"],
               "gain": gain["mean"], "gain_ci95": [gain["lo"], gain["hi"]],
               "pass1_before": before["sampled"]["pass@1"], "pass1_after": after["sampled"]["pass@1"],
               "pass1_gain": gain_sampled["mean"], "pass1_gain_ci95": [gain_sampled["lo"], gain_sampled["hi"]],
               "pretrain_tokens_per_s": pretrain_tokens / wall["pretrain"], "eval_tokens_per_s": eval_tok_s,
               "grpo_completions_per_s": completions / wall["grpo"], "rollout_tokens_per_s": rollout_tok_s,
               "wall_s": {**wall, "total": sum(wall.values())}, "cpu_s": {**cpu, "total": sum(cpu.values())},
               "threads": torch.get_num_threads(), "device": str(device)}
    log(summary)
    (run / "run.json").write_text(json.dumps({
        "args": vars(args), "settings": S, "model": mcfg.to_hf_dict(), "parameters": n_params,
        "device": str(device), "dtype": str(amp_dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "corpus": corpus_stats}, indent=2) + "\n")
    (run / "report.md").write_text(_report(S, args, mcfg, n_params, corpus_stats, before, after, gain, gain_sampled,
                                           summary, heldout, final_dir))
    print(f"[6/6 report] {run / 'report.md'}")

    # --- the end: what changed, and how to talk to the model
    total = summary["wall_s"]["total"]
    print(f"\nheld-out accuracy (greedy, {len(heldout)} problems never seen in training): "
          f"{before['greedy']['accuracy']:.1%} -> {after['greedy']['accuracy']:.1%} "
          f"(gain {100 * gain['mean']:+.1f} points, 95% CI [{100 * gain['lo']:+.1f}, {100 * gain['hi']:+.1f}]); "
          f"{total / 60:.1f} min wall, {summary['cpu_s']['total'] / 60:.1f} min CPU")
    cmd = _command_name()
    print(f"\nchat with it (ask what it was trained on):\n  {cmd} chat --model {final_dir}\n"
          f"  > What is 7*8-5? {INSTRUCTION}\n"
          f"serve it (OpenAI API, chat page at http://127.0.0.1:8000):\n  {cmd} serve --model {final_dir}")


# --- helpers: statistics, plots, report
def _thinks(response: str) -> bool:
    """Whether a response (the text after the prompt's "<think>\\n") reasons before "</think>"."""
    return bool(response.split("</think>", 1)[0].strip())


def _paired_bootstrap(before: np.ndarray, after: np.ndarray, n: int, rng: np.random.Generator) -> dict:
    """Mean per-problem difference after - before and its 95% percentile interval, resampling problems
    with replacement (paired: both models answer the same problems, so problem difficulty cancels)."""
    d = after - before
    means = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(n)])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi)}


def _wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion p observed over n trials."""
    if n == 0:
        return 0.0, 1.0
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return center - half, center + half


def _plots(rows: list[dict], out: Path) -> None:
    """loss.png (pretraining), reward.png (GRPO), accuracy.png (held-out), response_length.png."""
    import matplotlib
    matplotlib.use("Agg")   # files only, never a window
    import matplotlib.pyplot as plt

    pre = [r for r in rows if r["stage"] == "pretrain"]
    rl = [r for r in rows if r["stage"] == "grpo"]
    ev = [r for r in rows if r["stage"] == "eval"]
    sampled = [r for r in rows if r["stage"] == "eval_sampled"]
    bare = [r for r in rows if r["stage"] == "eval_bare"]

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in pre], [r["ce"] for r in pre], lw=1, label="next-token CE")
    if any("mtp" in r for r in pre):
        ax.plot([r["step"] for r in pre], [r.get("mtp", 0.0) for r in pre], lw=1, label="MTP loss (weighted)")
    ax.set(xlabel="step", ylabel="nats / token", title="pretraining loss", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "loss.png")

    steps = [r["step"] for r in rl]
    fig, ax = plt.subplots(figsize=(7, 4))
    mean, std = np.array([r["reward"] for r in rl]), np.array([r["reward_std"] for r in rl])
    ax.plot(steps, mean, label="reward (mean over rollouts)")
    ax.fill_between(steps, mean - std, mean + std, alpha=0.2, label="reward +- std")
    ax.plot(steps, [r["accuracy"] for r in rl], label="rollout accuracy")
    ax.plot(steps, [r["frac_zero_std"] for r in rl], lw=1, ls=":", label="groups with equal rewards")
    ax.set(xlabel="GRPO step", title="GRPO reward (accuracy + 0.1 format)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "reward.png")

    k = sampled[0]["k"] if sampled else 0
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["grpo_step"] for r in ev], [r["accuracy"] for r in ev], "o-", label="accuracy (greedy)")
    ax.plot([r["grpo_step"] for r in ev], [r["thinks"] for r in ev], "s--", label="answers that think first")
    ax.plot([r["grpo_step"] for r in sampled], [r["pass@1"] for r in sampled], "^", ms=9, label="pass@1 (sampled)")
    ax.plot([r["grpo_step"] for r in sampled], [r.get(f"pass@{k}", float("nan")) for r in sampled], "v", ms=9,
            label=f"pass@{k}")
    ax.plot([r["grpo_step"] for r in bare], [r["accuracy"] for r in bare], "D:", label="bare question, greedy")
    ax.set(xlabel="GRPO step", ylim=(0, 1.02),
           title=f"{ev[0]['problems'] if ev else 0} held-out problems during GRPO")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "accuracy.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["response_length"] for r in rl], label="rollouts")
    ax.plot([r["grpo_step"] for r in ev], [r["response_length"] for r in ev], "o-", label="held-out (greedy)")
    ax.set(xlabel="GRPO step", ylabel="tokens", title="response length")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "response_length.png")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f} pts"


def _report(S: dict, args: argparse.Namespace, mcfg, n_params: dict, corpus: dict, before: dict, after: dict,
            gain: dict, gain_sampled: dict, summary: dict, heldout: list, final_dir: Path) -> str:
    n, k = len(heldout), S["eval"]["samples"]
    b, a, bs, as_ = before["greedy"], after["greedy"], before["sampled"], after["sampled"]
    P, G, knobs = S["pretrain"], S["grpo"], S["task"]
    (lo0, hi0), (lo1, hi1) = _wilson(b["accuracy"], n), _wilson(a["accuracy"], n)
    rows = [
        ("**accuracy, greedy**", f"{_pct(b['accuracy'])} [{_pct(lo0)}, {_pct(hi0)}]",
         f"{_pct(a['accuracy'])} [{_pct(lo1)}, {_pct(hi1)}]",
         f"**{_pts(gain['mean'])} [{100 * gain['lo']:+.1f}, {100 * gain['hi']:+.1f}]**"),
        (f"pass@1, T={G['temperature']} (mean of {k} samples)", _pct(bs["pass@1"]), _pct(as_["pass@1"]),
         f"{_pts(gain_sampled['mean'])} [{100 * gain_sampled['lo']:+.1f}, {100 * gain_sampled['hi']:+.1f}]"),
        (f"pass@{k}, T={G['temperature']}", _pct(bs[f"pass@{k}"]), _pct(as_[f"pass@{k}"]),
         _pts(as_[f"pass@{k}"] - bs[f"pass@{k}"])),
        (f"cons@{k} (majority vote)", _pct(bs[f"cons@{k}"]), _pct(as_[f"cons@{k}"]),
         _pts(as_[f"cons@{k}"] - bs[f"cons@{k}"])),
        ("format rate, greedy", _pct(b["format"]), _pct(a["format"]), _pts(a["format"] - b["format"])),
        ("answers that think first, greedy", _pct(b["thinks"]), _pct(a["thinks"]), _pts(a["thinks"] - b["thinks"])),
        ("response length, greedy (tokens)", f"{b['response_length']:.1f}", f"{a['response_length']:.1f}",
         f"{a['response_length'] - b['response_length']:+.1f}"),
        ("bare question (no instruction; not in GRPO), greedy", _pct(before["bare"]["accuracy"]),
         _pct(after["bare"]["accuracy"]), _pts(after["bare"]["accuracy"] - before["bare"]["accuracy"])),
    ]
    table = f"| {n} held-out problems | base (pretrained) | after GRPO | change [95% CI] |\n|---|---|---|---|\n"
    table += "".join(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |\n" for r in rows)
    w, c = summary["wall_s"], summary["cpu_s"]
    stage_rows = [("1. data + tokenizer", "data", f"{corpus['tokens']} corpus tokens"),
                  ("2. pretrain", "pretrain", f"{summary['pretrain_tokens_per_s']:.0f} training tokens/s"),
                  ("3. eval before", "eval_before", f"{summary['eval_tokens_per_s']:.0f} generated tokens/s"),
                  ("4. GRPO", "grpo", f"{summary['grpo_completions_per_s']:.1f} completions/s, "
                                      f"{summary['rollout_tokens_per_s']:.0f} generated tokens/s in rollouts"),
                  ("   held-out curve during GRPO", "eval_during", f"greedy, every {S['eval']['every']} steps"),
                  ("5. eval after", "eval_after", ""),
                  ("6. save, plots, report", "save_and_report", ""),
                  ("**total**", "total", "")]
    stages = "| stage | wall time | CPU time (all threads) | throughput |\n|---|---|---|---|\n"
    stages += "".join(f"| {name} | {w.get(key, 0.0):.1f} s | {c.get(key, 0.0):.1f} s | {what} |\n"
                      for name, key, what in stage_rows)
    changed = [(ex, pb, pa) for ex, pb, pa in zip(heldout, b["per_problem"], a["per_problem"])
               if not pb["correct"] and pa["correct"]][:3]
    examples = "".join(f"- {ex.prompt} (answer {ex.answer})\n  - base: `{_oneline(pb['first_sample'])}`\n"
                       f"  - after GRPO: `{_oneline(pa['first_sample'])}`\n" for ex, pb, pa in changed)
    if gain["lo"] > 0 and a["thinks"] > b["thinks"]:
        story = (f"What GRPO found: asked with the instruction, the base model answers at once "
                 f"{_pct(1 - b['thinks'])} of the time (greedy) and is often wrong; sampled at T={G['temperature']} "
                 f"it sometimes thinks first and is then more often right (pass@{k} {_pct(bs[f'pass@{k}'])} "
                 f"against greedy {_pct(b['accuracy'])}). The verifier rewards those samples, so the policy "
                 f"learned to think: {_pct(b['thinks'])} -> {_pct(a['thinks'])} of greedy answers reason first, "
                 f"and responses grew from {b['response_length']:.1f} to {a['response_length']:.1f} tokens.")
    else:
        story = ("GRPO brought no clear gain in this run (the interval includes 0 or the policy did not "
                 "start thinking)" + (": expected with --quick, whose model is barely trained." if args.quick else "."))
    return f"""# nanoseek demo: R1-Zero in miniature

A {n_params['total'] / 1e6:.2f}M-parameter DeepSeek-V3-style model ({n_params['active'] / 1e6:.2f}M active;
MLA, DeepSeekMoE with {mcfg.n_routed_experts} routed experts top-{mcfg.num_experts_per_tok} + {mcfg.n_shared_experts} shared and aux-loss-free balancing,
{mcfg.num_nextn_predict_layers} MTP module(s); {mcfg.num_hidden_layers} layers, hidden size {mcfg.hidden_size})
pretrained from scratch on synthetic arithmetic, then trained with GRPO against the task's verifier.
Task: `arithmetic` with {', '.join(f'{kk}={vv}' for kk, vv in knobs.items())} ("What is 7*8-5?"). Held-out
problems come from the task's hash split and appear in no training text (their one-step facts such as
"7*8=56" do). {'**Reduced run (--quick)**: its numbers show that the pipeline runs, nothing more.' if args.quick else ''}

## Before and after GRPO

{table}
Accuracy intervals: Wilson 95% per column. Change: the mean per-problem difference on the same {n}
held-out problems with a paired bootstrap 95% interval ({S['bootstrap']} resamples). One seed ({args.seed})
drives the data, the initialization, the batches and the sampling; another seed gives another run.

{story}

{('Held-out problems the base model got wrong and the final model gets right (greedy):' + chr(10) + chr(10) + examples) if examples else ''}
## Setup

- corpus: {corpus['documents']} documents, {corpus['tokens']} tokens: {corpus['plain_lines']} plain one-step lines
  ("7*8=56"); chat problems with the task's instruction, {corpus['direct']} answered at once
  (`<think>\\n</think>\\n51`) and {corpus['worked']} worked in R1's format (`<think>\\n7*8=56\\n56-5=51\\n</think>\\n51`);
  bare questions, {corpus['direct_bare']} answered at once and {corpus['worked_bare']} worked. Byte-level BPE
  ({corpus['vocab_size']} tokens), digits kept single.
- pretrain: {P['steps']} steps x {P['batch_size']} x {P['seq_len']} tokens, {P['optimizer']} lr {P['lr']} (cosine to
  {P['min_lr']}), V3's loss CE + {P['mtp_weight']} x MTP + {P['balance_alpha']} x sequence balance, bias update
  gamma {P['bias_gamma']}.
- GRPO: variant `{G['variant']}` (DeepSeekMath: per-sequence mean, std-normalized group advantages,
  clip 0.2, no KL), G={G['group_size']}, {G['prompts_per_step']} prompts per step, {G['steps']} steps, AdamW lr
  {G['lr']}, T={G['temperature']}, at most {G['max_new_tokens']} new tokens; reward = accuracy + 0.1 x format.
- evaluation: the inference engine (paged latent cache, continuous batching), at most
  {S['eval']['max_new_tokens']} new tokens.
- machine: {summary['device']}, {summary['threads']} torch thread(s), torch {torch.__version__}.

## Time and throughput

{stages}
Wall time depends on what else runs on the machine; CPU time is what the run itself used.

## Files

- `metrics.jsonl` (a row per pretraining step, GRPO step and evaluation; `summary` last), `run.json`
- `plots/loss.png`, `plots/reward.png`, `plots/accuracy.png`, `plots/response_length.png`
- `heldout.jsonl`: every held-out problem with the greedy answers before and after
- `base/` and `final/`: Hugging Face model directories with the tokenizer; `data/`: corpus, tokenizer

```bash
nanoseek chat --model {final_dir}
nanoseek serve --model {final_dir}
nanoseek eval --model {final_dir} --task arithmetic {' '.join('--task-arg ' + shlex.quote(f'{kk}={vv}') for kk, vv in knobs.items())} --k 8
```
"""


def _oneline(text: str) -> str:
    return text.replace("\n", "\\n")
