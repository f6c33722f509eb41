"""Distill a reasoning teacher into a student: rejection-sampled traces (R1's third stage), then SFT.

    nanoseek distill --teacher runs/grpo/model --student runs/demo-1/base --task arithmetic --out runs/distill
    nanoseek distill --teacher DIR --student DIR --task countdown --samples-per-prompt 8 --n-prompts 2000 \\
        --temperature 0.7 --epochs 2 --out runs/distill

The teacher samples --samples-per-prompt completions for each of --n-prompts training problems with
the inference engine; the task's verifier keeps the correct ones that ended by themselves
(rejection sampling; identical traces of one prompt are kept once). The student, which must use the
teacher's tokenizer, is then fine-tuned on the kept conversations with the SFT loss (assistant
tokens only, packed rows). The run folder holds traces.jsonl (the kept conversations, usable with
`nanoseek sft --data`), run.json, metrics.jsonl, plots/, report.md and model/ (the student).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from nanoseek.commands import _checks as checks
from nanoseek.common import pick_device, pick_dtype, print0, seed_everything
from nanoseek.data.sft import SFTDataset
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.tasks import TASKS, get_task
from nanoseek.train import parallel
from nanoseek.train.grpo import chat_prompts, evaluate, merge_evaluations
from nanoseek.train.optim import build_optimizer
from nanoseek.train.plots import plot_run
from nanoseek.train.sft import load_model, rejection_sample, save_model, sft_train, task_knobs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanoseek distill", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    a = p.add_argument
    a("--teacher", required=True, help="teacher checkpoint directory (Hugging Face format)")
    a("--student", required=True, help="student checkpoint directory to fine-tune")
    a("--task", required=True, choices=sorted(TASKS))
    a("--task-arg", action="append", metavar="KEY=VALUE", help="task knob, e.g. n_digits=2 (repeatable)")
    a("--out", required=True, help="run folder")
    a("--n-prompts", type=int, default=500, help="training problems the teacher solves")
    a("--samples-per-prompt", type=int, default=4, help="k traces sampled per problem")
    a("--temperature", type=float, default=0.7)
    a("--top-k", type=int, default=0)
    a("--max-new-tokens", type=int, default=128)
    a("--batch", type=int, default=64, help="engine batch rows")
    a("--steps", type=int, help="student optimizer steps (default: --epochs passes)")
    a("--epochs", type=float, default=2.0)
    a("--batch-size", type=int, default=16, help="packed rows per student step")
    a("--seq-len", type=int, default=256)
    a("--lr", type=float, default=1e-3)
    a("--warmup", type=int, default=10)
    a("--eval-problems", type=int, default=0, help="held-out problems to score teacher and student on (greedy)")
    a("--seed", type=int, default=0)
    a("--device", help="cuda | cpu | cuda:N (default: cuda if present)")
    a("--dtype", help="fp32 or bf16 autocast for the student's training (default fp32 on CPU, bf16 on CUDA)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.n_prompts < 1 or args.samples_per_prompt < 1 or args.batch_size < 1 or args.seq_len < 2:
        raise SystemExit("nanoseek distill: --n-prompts, --samples-per-prompt and --batch-size must be >= 1, "
                         "--seq-len >= 2")
    checks.seed("distill", args.seed)
    checks.numbers("distill", args, at_least_1=("batch", "steps"), positive=("lr", "epochs"),
                   non_negative=("warmup", "eval_problems"))
    checks.sampling("distill", max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
    run = checks.fresh_run("distill", args.out)

    # --- setup: processes (under torchrun each samples its share of the problems, then the student
    # trains in DDP on all the traces), teacher, student, task
    device = pick_device(args.device)
    info, device, owns_group = parallel.start(device)
    parallel.barrier()          # every rank has checked --out before rank 0 writes into it
    amp_dtype = pick_dtype(args.dtype, device)
    checks.train_dtype("distill", amp_dtype, args.dtype)
    seed_everything(args.seed + info.rank)
    try:
        teacher, tokenizer = load_model(args.teacher, device)
        student, student_tok = load_model(args.student, device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"nanoseek distill: {e}") from None
    if student_tok.sha256 != tokenizer.sha256:
        raise SystemExit(f"nanoseek distill: the student ({args.student}) has a different tokenizer from the "
                         f"teacher ({args.teacher}); distillation by SFT on traces needs the same one")
    task = get_task(args.task)
    try:
        knobs = task_knobs(args.task_arg, task.examples)
        problems = task.examples(args.n_prompts, args.seed, "train", **knobs)
        heldout = task.examples(args.eval_problems, args.seed, "test", **knobs) if args.eval_problems > 0 else []
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise SystemExit(f"nanoseek distill: task {args.task}: {e}") from None
    if not problems:
        raise SystemExit(f"nanoseek distill: task {args.task}: its training split has no problems")
    prompts = chat_prompts(tokenizer, task.messages, problems)
    heldout_prompts = chat_prompts(tokenizer, task.messages, heldout)
    longest = max(map(len, prompts + heldout_prompts))
    checks.positions("distill", teacher, longest, args.max_new_tokens)
    if heldout:             # the student answers the held-out problems too
        checks.positions("distill", student, max(map(len, heldout_prompts)), args.max_new_tokens)
    checks.seq_len("distill", args.seq_len, student, "the student's")
    max_len = longest + args.max_new_tokens + 1
    greedy = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0)

    def heldout_accuracy(model) -> float | None:
        if not heldout:
            return None
        eng = Engine(model, tokenizer, max_batch=args.batch, max_seq_len=max_len)
        mine = range(info.rank, len(heldout), info.world_size)
        res = evaluate(lambda ps: eng.generate(ps, greedy), [heldout_prompts[i] for i in mine],
                       [heldout[i] for i in mine], task.reward, task.extract_answer)
        return merge_evaluations(parallel.gather_objects(res))["pass@1"]

    # --- rejection sampling: the teacher's verified traces
    t0 = time.perf_counter()
    engine = Engine(teacher, tokenizer, max_batch=args.batch, max_seq_len=max_len)
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
    mine = range(info.rank, len(problems), info.world_size)
    share = rejection_sample(lambda ps: engine.generate(ps, params), tokenizer, [problems[i] for i in mine],
                             task.messages, task.reward, args.samples_per_prompt)
    shares = parallel.gather_objects(share)
    convs = [conv for share, _ in shares for conv in share]
    stats = {key: sum(st[key] for _, st in shares) for key in shares[0][1]}
    t_sample = time.perf_counter() - t0
    teacher_acc = heldout_accuracy(teacher)
    del engine, teacher
    print0(f"teacher: {stats['sampled']} traces sampled for {len(problems)} problems in {t_sample:.1f} s; "
          f"{stats['verified']} verified (correct and well-formed), {stats['kept']} kept (distinct, not truncated), "
          f"covering {stats['prompts_with_a_trace']} problems")
    if not convs:       # before anything is written: the suggested retry may use the same --out
        raise SystemExit("nanoseek distill: the teacher solved none of the problems, so there is nothing to "
                         "distill; use a stronger teacher, more --samples-per-prompt or a higher --temperature")
    try:                # the student's data, also before anything is written
        ds = SFTDataset(convs, tokenizer, args.seq_len)
    except ValueError as e:
        raise SystemExit(f"nanoseek distill: {e} (--seq-len {args.seq_len})") from None
    if info.is_main:
        run.mkdir(parents=True, exist_ok=True)
        with (run / "traces.jsonl").open("w") as f:
            for conv in convs:
                f.write(json.dumps({"messages": conv}, ensure_ascii=False) + "\n")

    # --- SFT of the student on the kept traces
    batch = min(args.batch_size, len(ds))
    steps = args.steps or max(1, round(args.epochs * len(ds) / batch))
    student_before = heldout_accuracy(student)
    metrics_path = run / "metrics.jsonl"
    if info.is_main:
        metrics_path.write_text("")
        (run / "run.json").write_text(json.dumps({"args": vars(args), "sampling": stats, "steps": steps,
                                                  "rows": len(ds), "processes": info.world_size}, indent=2))
    optimizer = build_optimizer(student, "adamw", args.lr, 0.0)
    with tqdm(total=steps, desc="distill (student SFT)", dynamic_ncols=True, disable=not info.is_main) as bar:
        def log(row: dict) -> None:
            if info.is_main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps({**row, "ce": row["loss"]}) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}")

        try:
            rows = sft_train(student, ds, optimizer, steps=steps, batch_size=batch, lr=args.lr,
                             warmup=min(args.warmup, steps // 2), device=device, dtype=amp_dtype, seed=args.seed,
                             log=log, dist=info)
        except (FloatingPointError, ValueError) as e:
            raise SystemExit(f"nanoseek distill: {e}") from None
    student_after = heldout_accuracy(student)
    if not info.is_main:
        parallel.finish(owns_group)   # rank 0 saves; then every rank leaves together
        return

    # --- save: student model, plots, report
    out = save_model(student, tokenizer, run / "model")
    plot_run(metrics_path, run / "plots")
    acc = ""
    if heldout:
        acc = (f"- held-out accuracy (greedy, {len(heldout)} problems): teacher {teacher_acc:.3f}, "
               f"student {student_before:.3f} -> {student_after:.3f}\n")
    (run / "report.md").write_text(
        f"# distill {run.name}\n\n- teacher {args.teacher}, student {args.student}, task {args.task} {knobs or ''}\n"
        f"- rejection sampling: {stats['sampled']} traces ({args.samples_per_prompt} per problem, "
        f"T={args.temperature}) for {len(problems)} problems; {stats['verified']} verified, {stats['kept']} kept, "
        f"covering {stats['prompts_with_a_trace']} problems ({t_sample:.1f} s)\n"
        f"- student SFT: {len(ds)} packed rows, {steps} steps, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}\n"
        f"{acc}- traces: traces.jsonl; student: model/ (Hugging Face directory with tokenizer)\n")
    print(f"student loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}"
          + (f"; held-out accuracy teacher {teacher_acc:.3f}, student {student_before:.3f} -> {student_after:.3f}"
             if heldout else "") + f"; saved {out}")
    parallel.finish(owns_group)


if __name__ == "__main__":
    main(sys.argv[1:])
