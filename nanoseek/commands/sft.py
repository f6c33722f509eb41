"""Supervised fine-tuning on chat conversations: loss on assistant tokens only, packed rows, from any checkpoint.

    nanoseek sft --model runs/demo-1/base --data chat.jsonl --out runs/sft
    nanoseek sft --model runs/demo-1/base --task arithmetic --n 2000 --out runs/sft    # the task's worked examples
    nanoseek sft --model DIR --task arithmetic --task-arg n_digits=1 --n 500 --epochs 3 --out runs/sft

--data is JSONL, one {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]} per
line, rendered in DeepSeek-R1's chat format. With --task instead, N training-split problems get the
task's worked solutions ("<think>\\n...\\n</think>\\nANSWER"). Conversations are packed in order
(next-fit) into rows of --seq-len tokens; only assistant contents and their closing eos are targets.
Under torchrun give --num-examples rather than --n (torchrun reads --n as one of its own options).
The run folder holds run.json, metrics.jsonl, plots/loss.png, report.md and model/ (a Hugging Face
directory with the tokenizer, ready for `nanoseek grpo --model`, `eval`, `chat`, `serve`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from nanoseek.commands import _checks as checks
from nanoseek.common import pick_device, pick_dtype, print0, seed_everything
from nanoseek.data.sft import SFTDataset, load_conversations
from nanoseek.tasks import get_task
from nanoseek.train import parallel
from nanoseek.train.optim import build_optimizer
from nanoseek.train.plots import plot_run
from nanoseek.train.sft import load_model, save_model, sft_eval_loss, sft_train, task_knobs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanoseek sft", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    a = p.add_argument
    a("--model", required=True, help="checkpoint directory (Hugging Face format) to start from")
    a("--tokenizer", help="tokenizer directory (default: the one in --model)")
    a("--data", help="JSONL file of {\"messages\": [...]} conversations")
    a("--task", help="instead of --data: generate worked examples of this task")
    a("--n", "--num-examples", dest="n", type=int, help="worked examples with --task (default 1000)")
    a("--task-arg", action="append", metavar="KEY=VALUE", help="task knob, e.g. n_digits=2 (repeatable)")
    a("--out", required=True, help="run folder")
    a("--steps", type=int, help="optimizer steps (default: --epochs passes over the data)")
    a("--epochs", type=float, default=1.0)
    a("--batch-size", type=int, default=16, help="packed rows per step")
    a("--seq-len", type=int, default=256, help="tokens per packed row")
    a("--lr", type=float, default=1e-3, help="peak learning rate (cosine to --min-lr)")
    a("--min-lr", type=float, help="default lr/10")
    a("--warmup", type=int, default=10)
    a("--weight-decay", type=float, default=0.0)
    a("--clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    a("--val-frac", type=float, default=0.05, help="conversations held out for a validation loss")
    a("--seed", type=int, default=0)
    a("--device", help="cuda | cpu | cuda:N (default: cuda if present)")
    a("--dtype", help="fp32 or bf16 autocast (default fp32 on CPU, bf16 on CUDA)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if (args.data is None) == (args.task is None):
        raise SystemExit("nanoseek sft: give exactly one of --data FILE.jsonl or --task NAME")
    if args.data is not None and (args.n is not None or args.task_arg):
        raise SystemExit("nanoseek sft: --n and --task-arg shape --task's worked examples; with --data they "
                         "would do nothing")
    if args.n is None:
        args.n = 1000
    if args.batch_size <= 0 or args.seq_len <= 1 or (args.steps is not None and args.steps <= 0):
        raise SystemExit("nanoseek sft: --steps, --epochs, --batch-size must be > 0 and --seq-len > 1")
    checks.numbers("sft", args, at_least_1=("n",), positive=("lr", "epochs"), fraction=("val_frac",),
                   non_negative=("min_lr", "warmup", "weight_decay", "clip"))
    checks.seed("sft", args.seed)
    checks.lr_range("sft", args.lr, args.min_lr)

    # --- setup (under torchrun: one process per device, DDP over the batch's rows)
    device = pick_device(args.device)
    info, device, owns_group = parallel.start(device)
    amp_dtype = pick_dtype(args.dtype, device)
    checks.train_dtype("sft", amp_dtype, args.dtype)
    seed_everything(args.seed)
    run = checks.fresh_run("sft", args.out)
    parallel.barrier()          # every rank has checked --out before rank 0 writes into it
    try:
        model, tokenizer = load_model(args.model, device, args.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"nanoseek sft: {e}") from None

    # --- data: conversations -> packed rows (a small validation share held out)
    try:
        if args.data is not None:
            if not Path(args.data).is_file():
                raise ValueError(f"--data {args.data}: no such file")
            convs = load_conversations(args.data)
        else:
            task = get_task(args.task)
            if not hasattr(task, "sft_messages"):
                raise ValueError(f"task {args.task!r} has no worked examples; give --data FILE.jsonl")
            convs = [task.sft_messages(ex) for ex in task.examples(args.n, args.seed, "train",
                                                                   **task_knobs(args.task_arg, task.examples))]
    except (ValueError, TypeError) as e:
        raise SystemExit(f"nanoseek sft: {e}") from None
    random.Random(args.seed).shuffle(convs)
    n_val = int(len(convs) * args.val_frac) if len(convs) >= 20 else 0
    val_convs, train_convs = convs[:n_val], convs[n_val:]
    checks.seq_len("sft", args.seq_len, model)
    try:
        train_ds = SFTDataset(train_convs, tokenizer, args.seq_len)
    except ValueError as e:
        raise SystemExit(f"nanoseek sft: {e} (--seq-len {args.seq_len})") from None
    val_ds = None
    if val_convs:
        try:
            val_ds = SFTDataset(val_convs, tokenizer, args.seq_len)
        except ValueError:      # the held-out share has nothing to score at this --seq-len: train without it
            print0(f"no validation loss: the {n_val} held-out conversations have no assistant token within "
                   f"--seq-len {args.seq_len}")
    batch = min(args.batch_size, len(train_ds))
    if batch < info.world_size:
        raise SystemExit(f"nanoseek sft: the data packs into {len(train_ds)} row(s) of --seq-len {args.seq_len}, "
                         f"fewer than the {info.world_size} processes (each trains on at least one row a step)")
    steps = args.steps or max(1, round(args.epochs * len(train_ds) / batch))
    print0(f"{len(train_convs)} conversations -> {len(train_ds)} packed rows of {args.seq_len} tokens "
          f"({train_ds.truncated} cut to fit, {train_ds.dropped} dropped: no assistant token within a row), "
          f"{int(train_ds.mask[:, 1:].sum())} target tokens; "
          f"{steps} steps of {batch} rows; {n_val} conversations held out"
           + (f"; {info.world_size} processes on {device.type}, DDP" if info.enabled else ""))

    # --- train (files written by rank 0; the validation loss is computed by every rank alike)
    metrics_path = run / "metrics.jsonl"
    if info.is_main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "run.json").write_text(json.dumps({"args": vars(args), "steps": steps, "rows": len(train_ds),
                                                  "conversations": len(train_convs),
                                                  "processes": info.world_size}, indent=2))
        metrics_path.write_text("")
    optimizer = build_optimizer(model, "adamw", args.lr, args.weight_decay)

    def record(row: dict) -> None:
        if info.is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def log(row: dict) -> None:
        record({**row, "ce": row["loss"]})     # plots.plot_run draws "ce"
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}")

    val_before = sft_eval_loss(model, val_ds, batch, device, amp_dtype) if val_ds else None
    if val_before is not None:
        record({"step": 0, "val_loss": val_before})
    t0 = time.perf_counter()
    with tqdm(total=steps, desc="sft", dynamic_ncols=True, disable=not info.is_main) as bar:
        try:
            rows = sft_train(model, train_ds, optimizer, steps=steps, batch_size=batch, lr=args.lr,
                             min_lr=args.min_lr, warmup=min(args.warmup, steps // 2), clip=args.clip,
                             device=device, dtype=amp_dtype, seed=args.seed, log=log, dist=info)
        except (FloatingPointError, ValueError) as e:
            raise SystemExit(f"nanoseek sft: {e}") from None
    wall = time.perf_counter() - t0
    val_after = sft_eval_loss(model, val_ds, batch, device, amp_dtype) if val_ds else None
    if val_after is not None:
        record({"step": steps, "val_loss": val_after})
    if not info.is_main:
        parallel.finish(owns_group)   # rank 0 saves; then every rank leaves together
        return

    # --- save: model dir, plots, report
    out = save_model(model, tokenizer, run / "model")
    plot_run(metrics_path, run / "plots")
    val_line = (f"- validation loss (assistant tokens, {n_val} conversations): {val_before:.3f} -> {val_after:.3f}\n"
                if val_ds else "")
    (run / "report.md").write_text(
        f"# sft {run.name}\n\n- from {args.model}, data: {args.data or f'task {args.task} x {args.n}'}\n"
        f"- {len(train_convs)} conversations in {len(train_ds)} packed rows of {args.seq_len} tokens\n"
        f"- {steps} steps, batch {batch}, lr {args.lr}, {wall:.1f} s\n"
        f"- train loss: {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}\n{val_line}"
        f"- model: model/ (Hugging Face directory with tokenizer)\n")
    print(f"train loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}"
          + (f", validation {val_before:.3f} -> {val_after:.3f}" if val_ds else "") + f"; saved {out}")
    parallel.finish(owns_group)


if __name__ == "__main__":
    main(sys.argv[1:])
