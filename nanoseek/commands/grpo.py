"""Reinforcement learning with verifiable rewards: GRPO, Dr. GRPO, DAPO or GSPO on a task.

    nanoseek grpo --model runs/sft/model --task arithmetic --out runs/grpo
    nanoseek grpo --model DIR --task countdown --variant dapo --dynamic-sampling --overlong-filter \\
        --overlong-penalty 16 --group-size 16 --prompts-per-step 8 --steps 200 --out runs/dapo
    nanoseek grpo --model DIR --task gsm8k --beta 0.001 --epochs-per-batch 2 --minibatches 4 --out runs/r1

Each step samples --group-size completions for each of --prompts-per-step training problems with
the inference engine (batched, paged latent cache: the code that serves), scores them with the
task's verifier (accuracy + 0.1 format, optional DAPO overlong shaping), computes group-relative
advantages, recomputes the old log-probs with a no-grad forward of the same weights (so the ratio
starts at 1), then takes --epochs-per-batch x --minibatches optimizer steps on the clipped ratio
loss, plus --beta x k3 KL to a frozen copy of the starting model when beta > 0. With --beta 0, groups
whose rewards are all equal (advantages 0: no loss, no gradient) get no forward/backward; the update
is the same as with them (entropy and ratio_mean are then logged over the groups that trained).
Variants: grpo (per-sequence mean, std-normalized advantages), dr_grpo (no length or std
normalization), dapo (clip-higher 0.2/0.28, token-level sum), gspo (sequence-level ratio).
Not applied in RL: the MoE router's bias update and the MTP loss (see nanoseek/train/grpo.py).
The run folder holds run.json, metrics.jsonl, plots/ (reward, accuracy, response length, zero-std
groups, clip fraction, KL, entropy), report.md and model/ (a Hugging Face directory).

--save-every N writes a checkpoint every N steps (checkpoints/step_NNNNNN: the model as a Hugging Face
directory, the optimizer state, the data stream's position and every RNG state), and
`nanoseek grpo --resume RUN [--steps N]` goes on from the latest one with the run's own settings,
taking the same steps the run would have taken without the stop.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from nanoseek.commands import _checks as checks
from nanoseek.common import pick_device, pick_dtype, print0, seed_everything
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.model import Transformer
from nanoseek.tasks import TASKS, get_task
from nanoseek.tasks.rewards import overlong_penalty
from nanoseek.train import parallel
from nanoseek.train.grpo import GRPO, GRPOConfig, chat_prompts, evaluate, merge_evaluations, plot_grpo
from nanoseek.train.losses import RL_VARIANTS
from nanoseek.train.optim import build_optimizer, lr_at
from nanoseek.train.plots import read_metrics
from nanoseek.train.sft import load_model, save_model, task_knobs, tokenizer_files
from nanoseek.train.trainer_state import (latest_name, load_trainer_state, python_rng_state, resolve_checkpoint,
                                          rng_state, save_checkpoint, set_python_rng_state, set_rng_state)


# what a resumed run may change: everything else is the run's own (its data stream and optimizer state
# were made with it)
RESUME_MAY_CHANGE = ("steps", "save_every", "keep", "eval_every", "device")


def parse_args(argv: list[str] | None, given_only: bool = False) -> argparse.Namespace:
    """The options; given_only: only those on the command line (no defaults), to tell them apart."""
    p = argparse.ArgumentParser(prog="nanoseek grpo", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
                                argument_default=argparse.SUPPRESS if given_only else None)

    def a(*names, **kw):
        if given_only:
            kw.pop("default", None)
        p.add_argument(*names, **kw)
    a("--model", help="checkpoint directory (Hugging Face format) to start from (required)")
    a("--tokenizer", help="tokenizer directory (default: the one in --model)")
    a("--task", choices=sorted(TASKS), help="(required)")
    a("--task-arg", action="append", metavar="KEY=VALUE", help="task knob, e.g. n_digits=2 (repeatable)")
    a("--out", help="run folder (required)")
    a("--resume", metavar="RUN", help="go on from the latest checkpoint of this run folder (or a step_* folder) "
                                      "with its settings; only --" + ", --".join(RESUME_MAY_CHANGE).replace("_", "-")
                                      + " may be given")
    a("--variant", default="grpo", choices=RL_VARIANTS)
    a("--group-size", type=int, default=8, help="G completions per prompt")
    a("--prompts-per-step", type=int, default=8, help="problems per batch of rollouts")
    a("--steps", type=int, default=50, help="batches of rollouts")
    a("--max-new-tokens", type=int, default=64, help="completion length limit")
    a("--temperature", type=float, default=1.0)
    a("--top-k", type=int, default=0, help="0: off (sample the policy's own distribution). The update's log-probs are "
                                            "of logits / --temperature over the whole vocabulary, as TRL's: top-k's "
                                            "cut is not in the ratio")
    a("--lr", type=float, default=1e-4, help="learning rate (tiny models from scratch like 1e-4..1e-3; "
                                             "R1-size ones 1e-6)")
    a("--warmup", type=int, default=0, help="linear warmup steps; constant lr after")
    a("--weight-decay", type=float, default=0.0)
    a("--beta", type=float, default=0.0, help="k3 KL weight to a frozen reference (0 = no reference model)")
    a("--epochs-per-batch", type=int, default=1, help="passes over each batch of rollouts (mu)")
    a("--minibatches", type=int, default=1, help="optimizer steps per pass (whole groups: at most one per group)")
    a("--micro-batch", type=int, default=0, help="completions per forward/backward, in whole groups "
                                                  "(0: a whole minibatch)")
    a("--eps-low", type=float, help="clip range below 1 (default: the variant's paper value)")
    a("--eps-high", type=float, help="clip range above 1 (DAPO clip-higher: 0.28)")
    a("--dynamic-sampling", action="store_true", help="DAPO: drop groups with all-equal rewards, sample more")
    a("--overlong-filter", action="store_true", help="DAPO: no loss on completions cut at the limit")
    a("--overlong-penalty", type=int, default=0, metavar="L_CACHE",
      help="DAPO soft overlong punishment over the last L_CACHE tokens before the limit (0: off)")
    a("--clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    a("--no-skip-zero-advantage", dest="skip_zero_advantage", action="store_false",
      help="run the forward/backward of groups whose rewards are all equal too (with --beta 0 their gradient "
           "is exactly 0 and they are skipped by default; the update is the same either way)")
    a("--train-problems", type=int, default=2000, help="training problems drawn (cycled, reshuffled)")
    a("--eval-every", type=int, default=10, help="steps between held-out evaluations (0: start and end only)")
    a("--eval-problems", type=int, default=64, help="held-out problems per evaluation (greedy)")
    a("--save-every", type=int, default=0, help="steps between resumable checkpoints (0: none; model/ is "
                                                 "written at the end)")
    a("--keep", type=int, default=2, help="checkpoints kept (0: all)")
    a("--seed", type=int, default=0)
    a("--device", help="cuda | cpu | cuda:N (default: cuda if present)")
    a("--dtype", help="fp32 or bf16 autocast for the updates (default fp32 on CPU, bf16 on CUDA)")
    return p.parse_args(argv)


def resume_settings(args: argparse.Namespace, argv: list[str] | None):
    """--resume: (the run's saved settings with the allowed changes, checkpoint, state, optimizer state);
    without it the required flags are checked and (args, None, None, None) returned."""
    if args.resume is None:
        for flag in ("model", "task", "out"):
            if getattr(args, flag) is None:
                raise SystemExit(f"nanoseek grpo: --{flag} is required (or --resume RUN)")
        return args, None, None, None
    given = set(vars(parse_args(argv, given_only=True))) - {"resume"}
    fixed = sorted(given - set(RESUME_MAY_CHANGE))
    if fixed:
        flags = {"skip_zero_advantage": "no_skip_zero_advantage"}
        raise SystemExit(f"nanoseek grpo: --resume goes on with the run's own settings; only --"
                         + ", --".join(RESUME_MAY_CHANGE).replace("_", "-") + " may be given (got --"
                         + ", --".join(flags.get(f, f) for f in fixed).replace("_", "-") + ")")
    try:
        ckpt = resolve_checkpoint(args.resume)
        if ckpt.parent.name != "checkpoints":
            raise FileNotFoundError(f"--resume {args.resume}: {ckpt} is not in a run's checkpoints/ folder")
        try:        # an older checkpoint than the run's latest: going on from it would replace what came after
            latest = resolve_checkpoint(ckpt.parent)
        except FileNotFoundError:
            latest = ckpt                     # `latest` is damaged: the checkpoint named is the one to take
        if latest != ckpt:
            raise FileNotFoundError(f"--resume {args.resume}: the run went on to {latest.name}; resuming the older "
                                    f"{ckpt.name} would replace what came after it (resume {ckpt.parent.parent}, "
                                    f"or copy the run folder and resume the copy)")
        state, optim_state = load_trainer_state(ckpt)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"nanoseek grpo: {e}") from None
    kind = state.get("kind", "pretrain")
    if kind != "grpo":
        raise SystemExit(f"nanoseek grpo: --resume {args.resume}: {ckpt} is a {kind} checkpoint (go on with "
                         f"nanoseek {kind} --resume)")
    saved = state["args"]
    merged = argparse.Namespace(**{**vars(parse_args([])), **saved, **{k: getattr(args, k) for k in given},
                                   "resume": args.resume, "out": str(ckpt.parent.parent)})
    if merged.steps <= state["step"]:
        raise SystemExit(f"nanoseek grpo: --steps {merged.steps}: {ckpt} is already at step {state['step']}; give a "
                         f"larger --steps to go on")
    return merged, ckpt, state, optim_state


def main(argv: list[str] | None = None) -> None:
    args, ckpt, state, optim_state = resume_settings(parse_args(argv), argv)
    checks.numbers("grpo", args, at_least_1=("group_size", "prompts_per_step", "steps", "max_new_tokens",
                                             "train_problems"))
    if args.overlong_penalty >= args.max_new_tokens:
        raise SystemExit("nanoseek grpo: --overlong-penalty (the soft buffer) must be < --max-new-tokens")
    if args.group_size < 2:
        raise SystemExit("nanoseek grpo: --group-size must be >= 2: advantages are relative to the group's other "
                         "completions (one alone has advantage 0 and nothing to learn)")
    checks.seed("grpo", args.seed)
    checks.numbers("grpo", args, positive=("lr",), fraction=("eps_low",),
                   non_negative=("warmup", "weight_decay", "beta", "eps_high", "overlong_penalty", "clip",
                                 "eval_every", "eval_problems", "save_every", "keep", "micro_batch"))
    if args.micro_batch % args.group_size:
        raise SystemExit(f"nanoseek grpo: --micro-batch {args.micro_batch} is not whole groups of "
                         f"--group-size {args.group_size}")
    checks.sampling("grpo", max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)

    # --- setup: device, processes, seed, run folder, model, tokenizer
    device = pick_device(args.device)
    info, device, owns_group = parallel.start(device)
    if args.prompts_per_step % info.world_size:
        raise SystemExit(f"nanoseek grpo: --prompts-per-step {args.prompts_per_step} does not split evenly over "
                         f"{info.world_size} processes")
    if state is not None and state.get("device", device.type) != device.type:
        raise SystemExit(f"nanoseek grpo: {ckpt} was saved on {state['device']}; resume it on {state['device']} "
                         f"(its sampler's random streams are {state['device']}'s)")
    if state is not None and len(state["rng"]) != info.world_size:
        raise SystemExit(f"nanoseek grpo: {ckpt} was saved by {len(state['rng'])} process(es); resume it with as "
                         f"many (each one's rollouts have their own random stream)")
    amp_dtype = pick_dtype(args.dtype, device)
    checks.train_dtype("grpo", amp_dtype, args.dtype)
    seed_everything(args.seed + info.rank)       # each rank's engine samples its own noise
    run = checks.fresh_run("grpo", args.out) if ckpt is None else Path(args.out)
    parallel.barrier()          # every rank has checked --out before rank 0 writes into it
    try:
        if ckpt is None:
            model, tokenizer = load_model(args.model, device, args.tokenizer)
        else:      # the checkpoint's weights; the reference model (--beta) is the run's starting one
            model, tokenizer = load_model(ckpt / "model", device)
            start_model = None
            if args.beta > 0:
                start_model = Transformer.from_pretrained(args.model, dtype=torch.float32, device=device)
                if start_model.config != model.config:
                    raise ValueError(f"the starting model {args.model} (the --beta reference) is not the model this "
                                     f"run trained: its config.json differs from {ckpt / 'model'}'s")
        cfg = GRPOConfig(variant=args.variant, group_size=args.group_size, epochs_per_batch=args.epochs_per_batch,
                         minibatches=args.minibatches, micro_batch=args.micro_batch, eps_low=args.eps_low,
                         eps_high=args.eps_high, beta=args.beta, dynamic_sampling=args.dynamic_sampling,
                         overlong_filter=args.overlong_filter, max_new_tokens=args.max_new_tokens,
                         clip_grad=args.clip, seed=args.seed, skip_zero_advantage=args.skip_zero_advantage,
                         temperature=args.temperature)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"nanoseek grpo: {e}") from None
    ref_model = None
    if args.beta > 0:            # frozen copy of the starting policy for the k3 KL term
        ref_model = copy.deepcopy(model if ckpt is None else start_model).eval().requires_grad_(False)

    # --- task: training stream and held-out problems
    task = get_task(args.task)
    try:
        knobs = task_knobs(args.task_arg, task.examples)
        n_train = args.train_problems
        while True:          # a small problem space (1-digit arithmetic) has fewer distinct problems
            try:
                train = task.examples(n_train, args.seed, "train", **knobs)
                break
            except ValueError:
                if n_train <= 8:
                    raise
                n_train //= 2
        if not train:
            raise ValueError("its training split has no problems")
        if n_train < args.train_problems:
            print(f"the training split has fewer than {args.train_problems} distinct problems; using {n_train}")
        heldout = task.examples(args.eval_problems, args.seed, "test", **knobs) if args.eval_problems > 0 else []
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise SystemExit(f"nanoseek grpo: task {args.task}: {e}") from None
    train_prompts = chat_prompts(tokenizer, task.messages, train)
    heldout_prompts = chat_prompts(tokenizer, task.messages, heldout)
    order = list(range(len(train)))
    rng = random.Random(args.seed)
    cursor = [len(order)]

    def next_prompts() -> tuple[list[list[int]], list]:
        """The next --prompts-per-step training problems (reshuffled after each pass); under torchrun
        every rank draws the same ones and rolls out its share."""
        picked = []
        while len(picked) < args.prompts_per_step:
            if cursor[0] >= len(order):
                rng.shuffle(order)
                cursor[0] = 0
            picked.append(order[cursor[0]])
            cursor[0] += 1
        picked = picked[info.rank::info.world_size]
        return [train_prompts[i] for i in picked], [train[i] for i in picked]

    # --- engine (shares the model's weights: every update is visible to the next rollout) and rewards
    longest = max(len(p) for p in train_prompts + heldout_prompts)
    checks.positions("grpo", model, longest, args.max_new_tokens)
    rows = args.prompts_per_step // info.world_size * args.group_size      # this rank's completions a step
    my_heldout = list(range(info.rank, len(heldout), info.world_size))     # and its share of the held-out set
    engine = Engine(model, tokenizer, max_batch=max(rows, len(my_heldout) or 1),
                    max_seq_len=longest + args.max_new_tokens + 1,
                    max_prefill_tokens=min(16384, max(2048, rows * longest)))
    sample_params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
    greedy_params = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0)

    def generate(prompts: list[list[int]]):
        return engine.generate(prompts, sample_params)

    def generate_greedy(prompts: list[list[int]]):
        return engine.generate(prompts, greedy_params)

    def reward_fn(completion, ex) -> dict:
        r = task.reward(completion.text, ex)
        if args.overlong_penalty > 0:
            r["total"] += overlong_penalty(len(completion.token_ids), args.max_new_tokens, args.overlong_penalty)
        return r

    optimizer = build_optimizer(model, "adamw", args.lr, args.weight_decay)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    trainer = GRPO(model, optimizer, generate, reward_fn, cfg, ref_model=ref_model, pad_id=pad_id, dtype=amp_dtype)

    # --- checkpoints: the weights, the optimizer, the data stream's position and every rank's random streams
    def rank_state() -> dict:
        return {"rng": rng_state(), "engine": engine._gen.get_state(), "trainer": trainer.gen.get_state()}

    start = 0
    if state is not None:
        checks.load_optimizer_state("grpo", model, optimizer, optim_state, ckpt)
        data = state["loader"]
        if sorted(data["order"]) != list(range(len(train))):
            raise SystemExit(f"nanoseek grpo: {ckpt} was saved with {len(data['order'])} training problems, this "
                             f"task gives {len(train)}")
        order[:], cursor[0] = data["order"], data["cursor"]
        set_python_rng_state(data["rng"], rng)
        mine = state["rng"][info.rank]
        set_rng_state(mine["rng"])
        engine._gen.set_state(mine["engine"])
        trainer.gen.set_state(mine["trainer"])
        start = state["step"]
        print0(f"resuming {run} at step {start} from {ckpt}")
    del optim_state
    tok_files = tokenizer_files(tokenizer)          # for each checkpoint's model/

    # the starting model's path as an absolute one: a resumed run reloads it as the reference (--beta) from
    # wherever it is started
    saved_args = {**vars(args), "model": str(Path(args.model).resolve()),
                  "tokenizer": args.tokenizer and str(Path(args.tokenizer).resolve())}

    def checkpoint(step: int) -> Path:
        optim_sd = parallel.full_optimizer_state(model, optimizer)
        ranks = parallel.gather_objects(rank_state())
        root = run / "checkpoints"
        if info.is_main:
            save_checkpoint(root, step, model, optim_sd, keep=args.keep, model_files=tok_files,
                            state={"kind": "grpo", "args": saved_args, "rng": ranks, "device": device.type,
                                   "loader": {"order": list(order), "cursor": cursor[0],
                                              "rng": python_rng_state(rng)}})
        parallel.barrier()
        return root / f"step_{step:06d}"

    # --- bookkeeping (rank 0 writes)
    metrics_path = run / "metrics.jsonl"
    if info.is_main:
        run.mkdir(parents=True, exist_ok=True)
        if state is not None and metrics_path.exists():
            # drop what the stopped run logged after its checkpoint, and the held-out row of a finished run's last
            # step unless an unbroken run evaluates there too
            evaluates = args.eval_every > 0 and start % args.eval_every == 0
            rows = [r for r in read_metrics(metrics_path) if r.get("step", 0) < start or (
                r.get("step") == start and ("heldout_accuracy" not in r or evaluates))]
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "run.json").write_text(json.dumps({"args": vars(args), "grpo": vars(cfg), "processes": info.world_size,
                                                  "model": model.config.to_hf_dict(), "train_problems": len(train),
                                                  "heldout_problems": len(heldout)}, indent=2, default=str))

    def log(row: dict) -> None:
        if info.is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def heldout_eval(step: int) -> float | None:
        """Greedy accuracy on the held-out problems, each rank scoring its share."""
        if not heldout:
            return None
        res = evaluate(generate_greedy, [heldout_prompts[i] for i in my_heldout], [heldout[i] for i in my_heldout],
                       task.reward, task.extract_answer)
        res = merge_evaluations(parallel.gather_objects(res))      # torchrun: the ranks' shares as one
        log({"step": step, "heldout_accuracy": res["pass@1"], "heldout_format": res["format"],
             "heldout_length": res["response_length"]})
        return res["pass@1"]

    def save() -> Path:
        if info.is_main:
            save_model(model, tokenizer, run / "model")
        parallel.barrier()
        return run / "model"

    # --- training loop
    done_time = 0.0        # a resumed run: the time its earlier part took (the before-accuracy is logged)
    if start == 0:
        acc_before = heldout_eval(0)
        if acc_before is not None:
            print0(f"held-out accuracy before: {acc_before:.3f} ({len(heldout)} problems, greedy)")
    else:
        logged = read_metrics(metrics_path) if metrics_path.exists() else []
        acc_before = next((r["heldout_accuracy"] for r in logged if r.get("step") == 0 and "heldout_accuracy" in r),
                          float("nan"))
        done_time = max((r.get("time", 0.0) for r in logged), default=0.0)
    t_start = time.perf_counter() - done_time
    bar = tqdm(range(start + 1, args.steps + 1), desc=f"grpo ({args.variant})", dynamic_ncols=True,
               initial=start, total=args.steps, disable=not info.is_main)
    step, phase = start, "during"     # the step under way
    try:
        for step in bar:
            lr = lr_at(step - 1, lr=args.lr, min_lr=args.lr, warmup=args.warmup, total=args.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            stats = trainer.step(next_prompts)
            row = {"step": step, "lr": lr, **stats, "time": time.perf_counter() - t_start}
            log(row)
            bar.set_postfix(reward=f"{stats['reward']:.3f}", acc=f"{stats['accuracy']:.3f}",
                            len=f"{stats['response_length']:.0f}", cps=f"{stats['completions_per_s']:.0f}")
            if args.eval_every > 0 and step % args.eval_every == 0 and step != args.steps:
                acc = heldout_eval(step)
                if acc is not None and info.is_main:
                    tqdm.write(f"step {step}: held-out accuracy {acc:.3f}")
            if args.save_every > 0 and step % args.save_every == 0 and step != args.steps:
                checkpoint(step)
        bar.close()
        phase = "after"
        wall = time.perf_counter() - t_start
        # --- end: a last checkpoint (to go on with a larger --steps), the held-out accuracy, model/. The
        # checkpoint is taken where a longer run would take its own, before or after the evaluation at this step
        # (the evaluation draws from the sampler's random stream), so a resumed run takes the same steps.
        eval_here = args.eval_every > 0 and args.steps % args.eval_every == 0
        if args.save_every > 0 and not eval_here:
            checkpoint(args.steps)
        acc_after = heldout_eval(args.steps)
        if args.save_every > 0 and eval_here:
            checkpoint(args.steps)
        out = save()
    except KeyboardInterrupt:     # Ctrl-C: one line saying where the run goes on from, not a traceback
        bar.close()
        if info.is_main:
            latest = latest_name(run)
            kept = (f"resume with --resume {run} (checkpoint {latest})" if latest
                    else "no checkpoint was saved (--save-every N saves resumable ones)")
            print(f"\nnanoseek grpo: interrupted {phase} step {step}; {kept}", file=sys.stderr)
        raise SystemExit(130) from None
    if not info.is_main:
        parallel.finish(owns_group)
        return
    plot_grpo(metrics_path, run / "plots")
    rows = read_metrics(metrics_path)
    train_rows = [r for r in rows if "reward" in r]
    k = max(1, min(5, len(train_rows) // 2))
    first = sum(r["reward"] for r in train_rows[:k]) / k
    last = sum(r["reward"] for r in train_rows[-k:]) / k
    cps = sum(r["completions"] for r in train_rows) / max(sum(r["time_rollout"] + r["time_update"]
                                                               for r in train_rows), 1e-9)
    held_line = (f"- held-out accuracy (greedy, {len(heldout)} problems never trained on): "
                 f"{acc_before:.3f} -> {acc_after:.3f}\n" if heldout else "")
    (run / "report.md").write_text(
        f"# grpo {run.name}\n\n- from {args.model}, task {args.task} {knobs or ''}\n"
        f"- {args.variant}, G={args.group_size}, {args.prompts_per_step} prompts/step, {args.steps} steps, "
        f"lr {args.lr}, beta {args.beta}, {args.epochs_per_batch} epoch(s) x {args.minibatches} minibatch(es)\n"
        f"- train reward (mean of first/last {k} steps): {first:.3f} -> {last:.3f}\n{held_line}"
        f"- wall time {wall:.1f} s, {cps:.1f} completions/s over rollout + update\n"
        f"- plots: plots/reward.png, plots/response_length.png, plots/diagnostics.png\n"
        f"- model: model/ (Hugging Face directory with tokenizer)\n")
    print(f"reward {first:.3f} -> {last:.3f}" + (f", held-out accuracy {acc_before:.3f} -> {acc_after:.3f}"
                                                 if heldout else "") + f"; saved {out}"
          + (f" ({info.world_size} processes on {device.type})" if info.enabled else ""))
    parallel.finish(owns_group)


if __name__ == "__main__":
    main(sys.argv[1:])
