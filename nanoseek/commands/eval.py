"""Evaluate a model on a task's held-out problems: pass@1, pass@k (unbiased) and cons@k (majority vote).

    nanoseek eval --model runs/grpo/model --task arithmetic                        # greedy pass@1
    nanoseek eval --model DIR --task arithmetic --k 8 --temperature 1.0 --n-problems 200 --out eval.json
    nanoseek eval --model DIR --task gsm8k --k 4 --samples 16 --temperature 0.7

Problems come from the task's held-out ("test") split, which no training command ever draws from.
With --temperature 0 each problem gets one greedy completion and pass@1 is its accuracy. Otherwise
--samples completions (default k) are drawn per problem: pass@1 is the mean accuracy over them,
pass@k the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021) with n samples and c
correct, and cons@k the accuracy of the majority answer of the first k samples. Prints a table and
writes the figures plus each problem's outcome to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from nanoseek.commands import _checks as checks
from nanoseek.common import pick_device, pick_dtype, seed_everything
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.tasks import TASKS, get_task
from nanoseek.train import parallel
from nanoseek.train.grpo import chat_prompts, evaluate, merge_evaluations
from nanoseek.train.sft import load_model, task_knobs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanoseek eval", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    a = p.add_argument
    a("--model", required=True, help="checkpoint directory (Hugging Face format)")
    a("--tokenizer", help="tokenizer directory (default: the one in --model)")
    a("--task", required=True, choices=sorted(TASKS))
    a("--task-arg", action="append", metavar="KEY=VALUE", help="task knob, e.g. n_digits=2 (repeatable)")
    a("--n-problems", type=int, default=100, help="held-out problems")
    a("--k", type=int, default=1, help="k of pass@k and cons@k")
    a("--samples", type=int, help="completions per problem, n >= k (default k)")
    a("--temperature", type=float, help="0 = greedy (default 0 for one sample per problem, else 1.0)")
    a("--top-k", type=int, default=0)
    a("--max-new-tokens", type=int, default=64)
    a("--batch", type=int, default=64, help="engine batch rows")
    a("--seed", type=int, default=0)
    a("--out", help="JSON file (default eval_<task>.json)")
    a("--device", help="cuda | cpu | cuda:N (default: cuda if present)")
    a("--dtype", help="fp32 or bf16 weights for inference (default fp32 on CPU, bf16 on CUDA)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    n = args.k if args.samples is None else args.samples
    temperature = args.temperature if args.temperature is not None else (0.0 if n == 1 else 1.0)
    if args.k < 1 or args.n_problems < 1 or n < args.k:
        raise SystemExit(f"nanoseek eval: need --k >= 1, --n-problems >= 1 and --samples >= --k (got k={args.k}, "
                         f"samples={n})")
    if temperature == 0 and n > 1:
        raise SystemExit("nanoseek eval: greedy decoding gives the same completion every time; pass "
                         "--temperature > 0 with --k or --samples above 1")

    checks.numbers("eval", args, at_least_1=("batch",))
    checks.seed("eval", args.seed)
    checks.sampling("eval", max_tokens=args.max_new_tokens, temperature=temperature, top_k=args.top_k)
    # the JSON file, checked now (not after the evaluation): never one of the model's files, and an existing
    # file only when it is an earlier evaluation's
    out = checks.output_file("eval", args.out or f"eval_{args.task}.json", protect=(args.model, args.tokenizer),
                             replace_if=_is_evaluation)

    # --- model, task, engine (under torchrun each process takes every world-th problem)
    device = pick_device(args.device)
    info, device, owns_group = parallel.start(device)
    dtype = pick_dtype(args.dtype, device)
    seed_everything(args.seed + info.rank)
    try:
        model, tokenizer = load_model(args.model, device, args.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"nanoseek eval: {e}") from None
    model.to(dtype).eval()
    task = get_task(args.task)
    try:
        problems = task.examples(args.n_problems, args.seed, "test", **task_knobs(args.task_arg, task.examples))
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise SystemExit(f"nanoseek eval: task {args.task}: {e}") from None
    if not problems:
        raise SystemExit(f"nanoseek eval: task {args.task}: its held-out split has no problems")
    prompts = chat_prompts(tokenizer, task.messages, problems)
    checks.positions("eval", model, max(map(len, prompts)), args.max_new_tokens)
    mine = list(range(info.rank, len(problems), info.world_size))
    engine = Engine(model, tokenizer, max_batch=args.batch,
                    max_seq_len=max(map(len, prompts)) + args.max_new_tokens + 1)
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=temperature, top_k=args.top_k)

    # --- generate and score
    t0 = time.perf_counter()
    res = evaluate(lambda ps: engine.generate(ps, params), [prompts[i] for i in mine], [problems[i] for i in mine],
                   task.reward, task.extract_answer, n_samples=n, k=args.k)
    res = merge_evaluations(parallel.gather_objects(res))      # torchrun: the ranks' shares as one
    wall = time.perf_counter() - t0
    if not info.is_main:
        parallel.finish(owns_group)
        return

    # --- report: table + JSON
    k = args.k
    mode = "greedy" if temperature == 0 else f"T={temperature}, {n} samples/problem"
    print(f"{args.task}: {len(problems)} held-out problems, {mode}, {wall:.1f} s")
    print(f"| {'metric':<10} | {'value':>7} |\n|{'-' * 12}|{'-' * 9}|")
    for name in ["pass@1", f"pass@{k}", f"cons@{k}", "format"] if k > 1 else ["pass@1", "format"]:
        print(f"| {name:<10} | {res[name]:>7.3f} |")
    print(f"| {'length':<10} | {res['response_length']:>7.1f} |")
    checks.write_atomic("eval", out, json.dumps({"model": str(args.model), "task": args.task, "split": "test",
                                                 "temperature": temperature, "seconds": wall, **res}, indent=2) + "\n")
    print(f"wrote {out}")
    parallel.finish(owns_group)


def _is_evaluation(path: Path) -> bool:
    """Whether `path` holds what this command writes (a JSON object with task, split and pass@1)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and {"task", "split", "pass@1"} <= obj.keys()


if __name__ == "__main__":
    main(sys.argv[1:])
