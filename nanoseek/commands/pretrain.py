"""Pretrain a DeepSeek-style model (MLA + MoE + MTP) with the V3 recipe; resumable, multi-process.

    nanoseek pretrain --preset tiny --data data/tinyshakespeare/input.txt
    nanoseek pretrain --preset small --data data/shards --tokenizer tok/ --out runs/small --dtype bf16
    nanoseek pretrain --resume runs/small                       # continue from its latest checkpoint
    torchrun --nproc_per_node 8 -m nanoseek pretrain --preset small --data data/shards [--fsdp]

--data is a raw text file (a tokenizer is trained, or --tokenizer used, and shards are built in
the run folder) or a shard folder made by `nanoseek data`. The objective is DeepSeek-V3's:
CE + lambda * MTP + alpha * sequence-wise balance, and after every optimizer step the aux-loss-free
bias update b_i += gamma * sign(mean load - load_i) on every gate (counts over the global batch).
--batch-size is sequences per rank per micro-step: global batch = batch * grad-accum * ranks.
A run folder holds run.json, metrics.jsonl, plots/, samples.txt, report.md and checkpoints/.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from nanoseek.commands import _checks as checks
from nanoseek.common import missing_folders, pick_device, pick_dtype, print0, remove_empty, seed_everything
from nanoseek.data.pretrain import PretrainLoader, build_shards, check_tokenizer, find_inputs, read_documents
from nanoseek.model import PRESETS, Transformer, count_parameters, preset
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import parallel
from nanoseek.train.optim import build_optimizer, lr_at
from nanoseek.train.plots import plot_run, read_metrics
from nanoseek.train.step import (autocast, flops_per_token, max_violation, measure_peak_flops, pretrain_backward,
                                 pretrain_loss,
                                 sample, update_router_bias)
from nanoseek.train.trainer_state import (latest_name, load_trainer_state, plain_model, resolve_checkpoint,
                                          rng_state, save_checkpoint, set_rng_state)

# --- defaults: global, then per preset (tiny: learns tinyshakespeare visibly in minutes on 2 CPU cores)
DEFAULTS = dict(preset="tiny", steps=1000, batch_size=8, seq_len=256, grad_accum=1, lr=3e-4, min_lr=None,
                warmup=100, schedule="cosine", optimizer="adamw", weight_decay=0.1, clip=1.0, mtp_weight=0.3,
                balance_alpha=1e-4, bias_gamma=1e-3, eval_every=100, eval_steps=10, save_every=500, keep=2,
                seed=1337, device=None, dtype=None, fsdp=False, compile=False, peak_flops=None,
                sample_tokens=120, tokenizer=None, data=None, out=None, threads=None, split=None)
PRESET_DEFAULTS = {
    # tinyshakespeare: ~2M tokens (4 epochs of the 512-token BPE stream) in about 7 minutes on one
    # core; lr 3e-3 and 1e-2 gave the same curve within 0.02 nats. One thread: hidden 64 matmuls gain
    # little from a second one, and on a shared machine OpenMP barriers made steps ~10x slower.
    "tiny": dict(steps=1000, batch_size=16, seq_len=128, lr=1e-2, warmup=50, eval_every=100, eval_steps=8,
                 save_every=250, threads=1),
    "small": dict(steps=5000, batch_size=8, seq_len=512, lr=1e-3, warmup=200, eval_every=250, save_every=1000),
}
DEFAULTS_MIN_LR_RATIO = 0.1   # min_lr = lr / 10 unless given
RAW_TEXT_VAL_FRACTION = 0.1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanoseek pretrain", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    # Every default is None here and filled in later (explicit flag > resumed run > preset > global),
    # so `--resume RUN` alone continues with the run's own settings and any flag overrides them.
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), help="model size (default tiny)")
    a("--data", help="raw text file, or a shard folder from `nanoseek data`")
    a("--tokenizer", help="tokenizer folder (default: trained on --data, or the one beside the shards)")
    a("--out", help="run folder (default runs/<preset>-<time>)")
    a("--steps", type=int, help="optimizer steps")
    a("--batch-size", type=int, help="sequences per rank per micro-step")
    a("--seq-len", type=int)
    a("--grad-accum", type=int, help="micro-steps per optimizer step")
    a("--lr", type=float, help="peak learning rate")
    a("--min-lr", type=float, help="final learning rate (default lr/10)")
    a("--warmup", type=int, help="linear warmup steps")
    a("--schedule", choices=["cosine", "wsd"])
    a("--optimizer", choices=["adamw", "muon"])
    a("--weight-decay", type=float)
    a("--clip", type=float, help="gradient norm clip (0: off)")
    a("--mtp-weight", type=float, help="lambda of the MTP loss (V3: 0.3, then 0.1)")
    a("--balance-alpha", type=float, help="alpha of the sequence-wise balance loss (V3: 1e-4)")
    a("--bias-gamma", type=float, help="aux-loss-free bias update speed (V3: 1e-3)")
    a("--eval-every", type=int, help="steps between validation passes (0: only at the end)")
    a("--eval-steps", type=int, help="validation batches per pass (0: no validation)")
    a("--save-every", type=int, help="steps between checkpoints (0: only at the end)")
    a("--keep", type=int, help="checkpoints kept (0: all)")
    a("--sample-tokens", type=int, help="tokens sampled at each validation pass (0: none)")
    a("--seed", type=int)
    a("--device", help="cuda | cpu | cuda:N (default: cuda if present)")
    a("--dtype", help="fp32 or bf16 (autocast, fp32 master weights); default fp32 on CPU, bf16 on CUDA")
    a("--threads", type=int, help="CPU threads per process (default: torch's choice; 1 is faster for tiny "
                                 "models and on a busy machine, where OpenMP threads wait on each other)")
    a("--split", type=int, help="CPU, one process: each micro-batch's rows as this many chunks, each in its own "
                               "thread with threads/N intra-op threads (default: one chunk per thread; 1: off)")
    a("--peak-flops", type=float, help="MFU denominator per device (default: measured matmul peak)")
    a("--fsdp", action="store_true", default=None, help="FSDP2 fully_shard instead of DDP (torchrun)")
    a("--compile", action="store_true", default=None, help="torch.compile each block")
    a("--resume", help="run folder or checkpoint to continue from")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace, saved: dict | None) -> argparse.Namespace:
    explicit = {k: v for k, v in vars(args).items() if v is not None and k != "resume"}
    name = explicit.get("preset") or (saved or {}).get("preset") or DEFAULTS["preset"]
    merged = {**DEFAULTS, **PRESET_DEFAULTS.get(name, {}), **(saved or {}), **explicit}
    merged["preset"] = name
    if merged["min_lr"] is None or ("lr" in explicit and "min_lr" not in explicit):
        merged["min_lr"] = merged["lr"] * DEFAULTS_MIN_LR_RATIO
    merged["resume"] = args.resume
    return argparse.Namespace(**merged)


def main(argv: list[str] | None = None) -> None:
    cli = parse_args(argv)

    # --- resume: the checkpoint decides the model, the data and (unless overridden) the settings
    ckpt = state = optim_state = None
    if cli.resume:
        try:
            ckpt = resolve_checkpoint(cli.resume)
            state, optim_state = load_trainer_state(ckpt)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"nanoseek pretrain: {e}") from None
        if state.get("kind", "pretrain") != "pretrain":
            raise SystemExit(f"nanoseek pretrain: --resume {cli.resume}: {ckpt} is a {state['kind']} checkpoint "
                             f"(go on with nanoseek {state['kind']} --resume)")
    args = resolve(cli, state["args"] if state else None)
    if ckpt is not None:
        # a resumed run goes on in the folder it was resumed from (it may have been copied or moved since
        # it was saved: not the folder named in its saved settings), or forks into a new --out; a raw
        # text's shards are read from the resumed folder
        run_dir = ckpt.parent.parent
        if cli.out is not None and Path(cli.out).resolve() != run_dir.resolve():
            if (Path(cli.out) / "checkpoints").exists():
                raise SystemExit(f"nanoseek pretrain: --out {cli.out} already holds a run; a run resumed from "
                                 f"{ckpt} goes on in {run_dir}, or in a new --out")
        saved_out, data = state["args"].get("out"), Path(args.data or "")
        if saved_out and data.parent.name == Path(saved_out).name and (run_dir / data.name / "meta.json").exists():
            args.data = str((run_dir / data.name).resolve())      # RUN/data, tokenized from a raw text
        args.out = cli.out or str(run_dir)
    if args.data is None and ckpt is None:
        raise SystemExit("nanoseek pretrain: --data is required (a text file or a shard folder)")
    if args.steps <= 0 or args.batch_size <= 0 or args.seq_len <= 1 or args.grad_accum <= 0:
        raise SystemExit("nanoseek pretrain: --steps, --batch-size, --grad-accum must be > 0 and --seq-len > 1")
    if args.split is not None and args.split <= 0:
        raise SystemExit(f"nanoseek pretrain: --split {args.split}: give a chunk count >= 1 (1: no split)")
    checks.seed("pretrain", args.seed)
    checks.threads("pretrain", args.threads)
    checks.numbers("pretrain", args, positive=("lr", "peak_flops"),
                   non_negative=("min_lr", "warmup", "weight_decay", "clip", "eval_steps", "eval_every",
                                 "save_every", "keep", "sample_tokens", "mtp_weight", "balance_alpha", "bias_gamma"))
    checks.lr_range("pretrain", args.lr, args.min_lr)
    if args.fsdp and args.optimizer == "muon":      # (it failed at the first optimizer step, on every rank)
        raise SystemExit("nanoseek pretrain: Muon needs whole matrices and FSDP2 shards them: use --optimizer adamw "
                         "with --fsdp, or Muon under DDP (no --fsdp)")
    if args.split is not None and args.split > args.batch_size:
        raise SystemExit(f"nanoseek pretrain: --split {args.split} is more chunks than the {args.batch_size} rows "
                         f"of --batch-size")
    if state is not None:       # what the checkpoint fixed: a different value could not take effect
        saved = state["args"]
        for key in ("preset", "optimizer"):
            if saved.get(key) is not None and getattr(args, key) != saved[key]:
                raise SystemExit(f"nanoseek pretrain: --{key} {getattr(args, key)}: the run resumed from {ckpt} "
                                 f"was trained with {saved[key]} (start a new run to change it)")
        if args.steps < state["step"]:
            raise SystemExit(f"nanoseek pretrain: --steps {args.steps}: {ckpt} is already at step {state['step']}; "
                             f"give a larger --steps to go on")
    if args.out:
        checks.out_folder("pretrain", args.out)

    # --- setup: device, processes, seed, run folder
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dist, device, owns_group = parallel.start(device)
    amp_dtype = pick_dtype(args.dtype, device)
    if amp_dtype not in (torch.float32, torch.bfloat16):
        raise SystemExit(f"nanoseek pretrain: --dtype {args.dtype}: use fp32 or bf16 (fp16 needs loss scaling)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(args.seed)
    if args.out is None:
        args.out = str(ckpt.parent.parent) if ckpt else f"runs/{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = Path(args.out)
    if ckpt is None and (run / "checkpoints").exists():
        raise SystemExit(f"nanoseek pretrain: {run} already holds a run; pass --resume {run} to continue it, "
                         "or choose another --out")
    if ckpt is None:            # the --data mistakes that need no reading, before the run folder is made
        data = Path(args.data)
        if not data.exists():
            raise SystemExit(f"nanoseek pretrain: --data {data}: no such file or directory")
        if data.is_dir() and not (data / "meta.json").is_file():
            raise SystemExit(f"nanoseek pretrain: --data {data} is a folder without meta.json: give a text file, "
                             f"or shards made by `nanoseek data --input {data} --tokenizer DIR --out DIR`")
    made = missing_folders(run)
    if dist.is_main:
        run.mkdir(parents=True, exist_ok=True)
    parallel.barrier()

    def data_error(message: str) -> SystemExit:
        """A data mistake found by reading it: the folders this command made are removed while empty."""
        if dist.is_main:
            remove_empty(made)
        return SystemExit(f"nanoseek pretrain: {message}")

    # --- data: tokenizer + shards (a raw text file is tokenized into the run folder once)
    if ckpt is not None:
        tok_dir = ckpt / "model"
    else:
        if data.is_file():
            shards = run / "data"
            if dist.is_main:
                fresh = not shards.exists()
                try:
                    if args.tokenizer:
                        tokenizer = Tokenizer.from_dir(args.tokenizer)
                    else:
                        vocab = PRESETS[args.preset].get("vocab_size", 512)
                        print0(f"training a {vocab}-token byte-level BPE tokenizer on {data}")
                        # the documents the shards will hold (a .jsonl's text field, not its JSON), read
                        # as build_shards reads them: an unknown file type fails before any training
                        tokenizer = Tokenizer.train(list(read_documents(find_inputs([data])[0])), vocab_size=vocab)
                    # one text is one document: hold out its last 10% (nanoGPT's split of tinyshakespeare)
                    build_shards([data], tokenizer, shards, val_fraction=RAW_TEXT_VAL_FRACTION)
                except (FileNotFoundError, ValueError) as e:
                    if fresh:
                        shutil.rmtree(shards, ignore_errors=True)
                    raise data_error(str(e)) from None
                print0(f"tokenized {data} into {shards}")
            parallel.barrier()
            args.data = str(shards.resolve())
            tok_dir = shards / "tokenizer"
        else:
            tok_dir = Path(args.tokenizer) if args.tokenizer else data / "tokenizer"
        args.tokenizer = str(tok_dir.resolve())
    try:
        tokenizer = Tokenizer.from_dir(tok_dir)
        check_tokenizer(args.data, tokenizer)
        loader = PretrainLoader(args.data, "train", args.batch_size, args.seq_len, rank=dist.rank,
                                world_size=dist.world_size, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        raise data_error(str(e)) from None
    try:
        val_loader = PretrainLoader(args.data, "val", args.batch_size, args.seq_len, rank=dist.rank,
                                    world_size=dist.world_size, seed=args.seed) if args.eval_steps > 0 else None
    except (ValueError, FileNotFoundError) as e:
        raise data_error(f"{e} (or --eval-steps 0: no validation loss)") from None
    # read now: on resume tok_dir is inside the checkpoint resumed from, which --keep prunes later
    tok_files = {n: (tok_dir / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json")
                 if (tok_dir / n).exists()}

    # --- model, parallel wrapping, optimizer
    if ckpt is not None:
        try:
            raw = Transformer.from_pretrained(ckpt / "model", dtype=torch.float32, device=device)
        except (FileNotFoundError, ValueError) as e:     # CheckpointError is a ValueError
            raise SystemExit(f"nanoseek pretrain: --resume {cli.resume}: {e}") from None
        cfg = raw.config
    else:
        cfg = preset(args.preset, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                     eos_token_id=tokenizer.eos_id)
        raw = Transformer(cfg).to(device)
        raw.init_weights()
    raw.train()
    checks.seq_len("pretrain", args.seq_len, raw)
    if args.compile:
        for block in [*raw.layers, *(m.block for m in raw.mtp)]:
            block.compile()
    model = parallel.wrap_model(raw, dist, device, fsdp=args.fsdp)
    optimizer = build_optimizer(raw, args.optimizer, args.lr, args.weight_decay)
    step = 0
    if ckpt is not None:
        checks.load_optimizer_state("pretrain", model, optimizer, optim_state, ckpt)
        try:   # any number of processes, as long as the global batch (hence the data stream) is the same
            loader.load_state_dict(state["loader"])
        except ValueError as e:
            raise SystemExit(f"nanoseek pretrain: cannot resume {ckpt}: {e}") from None
        set_rng_state(state["rng"])
        step = state["step"]
    del optim_state

    # --- bookkeeping: run.json, metrics, compute accounting
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * dist.world_size
    fpt = flops_per_token(raw, args.seq_len, mtp=args.mtp_weight > 0)
    peak = args.peak_flops or measure_peak_flops(device, amp_dtype)
    counts_p = count_parameters(raw)
    metrics_path = run / "metrics.jsonl"
    if dist.is_main:
        (run / "run.json").write_text(json.dumps({"args": vars(args), "model": cfg.to_hf_dict(),
                                                  "parameters": counts_p, "world_size": dist.world_size,
                                                  "tokens_per_step": tokens_per_step}, indent=2, default=str))
        if metrics_path.exists():   # drop what the interrupted run logged after its checkpoint (all, if none)
            rows = [r for r in read_metrics(metrics_path) if ckpt is not None and r.get("step", 0) <= step]
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        if ckpt is None:
            (run / "samples.txt").unlink(missing_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    split = args.split or (1 if args.compile else parallel.cpu_split(device, args.batch_size))   # dynamo: one thread
    if split > 1:
        print0(f"rows of each micro-batch in {split} chunks, one per thread "
               f"({max(1, torch.get_num_threads() // split)} intra-op thread(s) each; --split 1: off)")
    print0(f"model: {counts_p['total'] / 1e6:.2f}M parameters ({counts_p['active'] / 1e6:.2f}M active, "
           f"{counts_p['mtp'] / 1e6:.2f}M MTP) | {dist.world_size} process(es) on {device}, "
           f"{'FSDP2' if args.fsdp and dist.enabled else 'DDP' if dist.enabled else 'single'} | "
           f"{str(amp_dtype).removeprefix('torch.')} | {tokens_per_step} tokens/step | "
           f"peak {peak / 1e9:.0f} GFLOP/s per device")

    def log(row: dict) -> None:
        if dist.is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    # --- helpers: validation, samples, checkpoint
    val_start = val_loader.state_dict() if val_loader is not None else None
    # the same prompt on every rank (FSDP2 ranks must run identical forwards)
    sample_prompt = (next(PretrainLoader(args.data, "val", 1, args.seq_len, seed=args.seed))[0][0, :8].tolist()
                     if val_loader is not None else [])

    def resume_hint() -> str:
        """Where a stopped run goes on from: the last checkpoint saved, or that none was."""
        latest = latest_name(run)
        return f"resume with --resume {run} (checkpoint {latest})" if latest else "no checkpoint was saved yet"

    def draw(it):
        """The next batch; a shard that turns out damaged mid-run (ids beyond the vocabulary) is one line
        naming the last checkpoint, not a traceback."""
        try:
            return next(it)
        except ValueError as e:
            raise SystemExit(f"nanoseek pretrain: {e}; {resume_hint()}") from None

    def evaluate() -> float:
        """Mean CE over the same eval_steps validation batches every time."""
        model.eval()
        val_loader.load_state_dict(val_start)
        total = torch.zeros((), device=device)
        with torch.no_grad():
            for _ in range(args.eval_steps):
                x, y = draw(val_loader)
                x, y = x.to(device), y.to(device)
                with autocast(device, amp_dtype):
                    _, parts, _ = pretrain_loss(model, x, y, mtp_weight=0.0, balance_alpha=0.0)
                total += parts["ce"]
        parallel.reshard(model)
        model.train()
        return parallel.all_reduce_mean(total / args.eval_steps).item()

    def show_sample() -> None:
        if args.sample_tokens <= 0:
            return
        g = torch.Generator().manual_seed(args.seed)
        # prompt: the first tokens of held-out text (the packed stream has no BOS to start from)
        prompt = sample_prompt if sample_prompt else [tokenizer.eos_id]
        model.eval()
        with autocast(device, amp_dtype):   # every rank samples alike (FSDP2 needs them all)
            ids = sample(parallel.unwrap(model), prompt, args.sample_tokens, temperature=0.8,
                         context=args.seq_len, eos_id=tokenizer.eos_id, generator=g, device=device)
        parallel.reshard(model)
        model.train()
        text = f"[{tokenizer.decode(prompt, skip_special=True)}]{tokenizer.decode(ids, skip_special=True)}"
        if dist.is_main:
            tqdm.write(f"--- sample at step {step} ([prompt] from validation text, temperature 0.8):\n{text}\n---")
            with (run / "samples.txt").open("a") as f:
                f.write(f"--- step {step}\n{text}\n")

    def checkpoint() -> None:
        optim_sd = parallel.full_optimizer_state(model, optimizer)
        model_sd = parallel.full_model_state(model) if args.fsdp and dist.enabled else None
        if dist.is_main:
            to_save = plain_model(cfg, model_sd) if model_sd is not None else raw
            save_checkpoint(run / "checkpoints", step, to_save, optim_sd, keep=args.keep, model_files=tok_files,
                            state={"kind": "pretrain", "args": vars(args), "loader": loader.state_dict(),
                                   "world_size": dist.world_size, "rng": rng_state()})
        parallel.barrier()

    # --- training loop
    if step == 0 and args.eval_every > 0 and args.eval_steps > 0:
        val_loss = evaluate()
        log({"step": 0, "val_loss": val_loss})
        print0(f"step 0: val loss {val_loss:.4f}")
    bar = tqdm(total=args.steps, initial=step, disable=not dist.is_main, dynamic_ncols=True, desc="pretrain")
    batches = iter(loader)
    t_start = time.perf_counter()
    try:
        while step < args.steps:
            t0 = time.perf_counter()
            lr = lr_at(step, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup, total=args.steps,
                       schedule=args.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums: dict[str, torch.Tensor] = {}
            counts = None
            for micro in range(args.grad_accum):
                x, y = draw(batches)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with parallel.grad_sync(model, micro == args.grad_accum - 1):
                    parts, c = pretrain_backward(model, params, x, y, mtp_weight=args.mtp_weight,
                                                 balance_alpha=args.balance_alpha, amp_dtype=amp_dtype,
                                                 scale=1 / args.grad_accum, split=split)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0) + v / args.grad_accum
                if c is not None:
                    counts = c if counts is None else counts + c
            grad_norm = parallel.clip_grad_norm_(model, args.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if counts is not None:   # aux-loss-free balancing: global counts, identical update on every rank
                counts = parallel.all_reduce_sum_(counts)
                if args.bias_gamma > 0:
                    update_router_bias(raw, counts, args.bias_gamma)
            step += 1

            names = sorted(sums)
            means = parallel.all_reduce_mean(torch.stack([sums[k] for k in names])).tolist()
            row = {"step": step, **dict(zip(names, means)), "lr": lr, "grad_norm": grad_norm.item()}
            if not math.isfinite(row["loss"]):
                raise SystemExit(f"nanoseek pretrain: loss is {row['loss']} at step {step}; lower --lr or raise "
                                 f"--warmup ({resume_hint()})")
            dt = time.perf_counter() - t0
            row.update(tok_per_s=tokens_per_step / dt, mfu=tokens_per_step / dt * fpt / (peak * dist.world_size),
                       time=time.perf_counter() - t_start)
            if counts is not None:
                row["maxvio"] = max_violation(counts)
            log(row)
            bar.update(1)
            bar.set_postfix(ce=f"{row['ce']:.3f}", tok_s=f"{row['tok_per_s']:.0f}", mfu=f"{100 * row['mfu']:.1f}%")

            if args.eval_steps > 0 and (step == args.steps or (args.eval_every > 0 and step % args.eval_every == 0)):
                val_loss = evaluate()
                log({"step": step, "val_loss": val_loss})
                if dist.is_main:
                    tqdm.write(f"step {step}: val loss {val_loss:.4f}")
                show_sample()
            if step == args.steps or (args.save_every > 0 and step % args.save_every == 0):
                checkpoint()
    except KeyboardInterrupt:     # Ctrl-C: one line saying where the run goes on from, not a traceback
        bar.close()
        if dist.is_main:
            print(f"\nnanoseek pretrain: interrupted at step {step}; {resume_hint()}", file=sys.stderr)
        raise SystemExit(130) from None
    bar.close()

    # --- end: plots and a short report
    if dist.is_main:
        plot_run(metrics_path, run / "plots")
        rows = read_metrics(metrics_path)
        vals = [r for r in rows if "val_loss" in r]
        train_rows = [r for r in rows if "loss" in r]
        speed = sorted(r["tok_per_s"] for r in train_rows[1:]) or [0.0]
        (run / "report.md").write_text(
            f"# pretrain {run.name}\n\n"
            f"- model: preset {args.preset}, {counts_p['total'] / 1e6:.2f}M parameters, "
            f"{counts_p['active'] / 1e6:.2f}M active\n"
            f"- steps {step}, {tokens_per_step} tokens/step, {dist.world_size} process(es), "
            f"{str(amp_dtype).removeprefix('torch.')}\n"
            f"- median throughput {speed[len(speed) // 2]:.0f} tokens/s\n"
            f"- validation loss: " + ", ".join(f"{r['step']}: {r['val_loss']:.3f}" for r in vals) + "\n"
            f"- plots: plots/loss.png, plots/lr.png, plots/expert_load.png; samples: samples.txt\n"
            f"- final checkpoint: checkpoints/step_{step:06d}/model (a Hugging Face directory)\n")
        print0(f"done: {run}")
    parallel.finish(owns_group)


if __name__ == "__main__":
    main(sys.argv[1:])
