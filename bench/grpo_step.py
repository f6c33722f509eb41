"""GRPO step time and completions/s: nanoseek (Engine rollouts + train/grpo.py) vs trl's GRPOTrainer, same run.

    .venv/bin/python bench/grpo_step.py                                # tiny, G=8, 8 prompts/step, 32 new tokens
    .venv/bin/python bench/grpo_step.py --group-size 16 --new 64 --steps 6
    .venv/bin/python bench/grpo_step.py --preset small --device cuda

trl is not a nanoseek dependency. Install it into the same environment, checking first that it
keeps your torch build:  .venv/bin/pip install trl --dry-run  then  .venv/bin/pip install trl

One random-init model (arithmetic-trained BPE tokenizer, --preset) is saved with save_pretrained;
nanoseek loads it with Transformer.from_pretrained, trl with transformers' AutoModelForCausalLM and
the saved tokenizer.json through PreTrainedTokenizerFast (AutoTokenizer). Matched settings: the same
arithmetic prompts (chat-rendered, identical token ids on both sides), G completions for each of
--prompts prompts per step, exactly --new tokens per completion (eos ignored / min_new_tokens), T=1,
no top-k/top-p, loss "grpo" with std-scaled group advantages, beta 0 (no reference model), one
optimizer step per batch of rollouts, AdamW at the same lr and betas (0.9, 0.999) in torch's fused
kernel on both sides (trl: optim adamw_torch_fused; nanoseek: build_optimizer, as `nanoseek grpo`),
fp32 weights on --device, the task's verifier (accuracy + 0.1 format) as the reward. Neither side runs a separate old log-probs pass
(one optimizer step per batch: the update's own forward, detached, gives them).
With beta 0 a group whose rewards are all equal has advantages 0 and a gradient of exactly 0: nanoseek
skips its forward/backward (GRPOConfig.skip_zero_advantage, the same update), trl runs it; the bench
prints the share of such groups, and --no-skip times nanoseek running them too.

The two sides alternate step by step (trl's step k, then nanoseek's step k, from a trl callback, outside
trl's timing), so a load change on a shared machine hits both alike. Reported per side: median step
time over the timed steps (after --warmup), split into generation, scoring and update (update = step
- generation - scoring: forward, loss, backward, optimizer step), and completions/s = completions per
step / step time. Then the ratio nanoseek / trl. On CPU also the step's process CPU time and
completions per CPU second: on a shared machine wall time swings with other processes' load, the
CPU time a step needs much less.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from nanoseek.common import pick_device, seed_everything
from nanoseek.infer.engine import Engine, SamplingParams
from nanoseek.model import Transformer, preset
from nanoseek.tasks import get_task
from nanoseek.tasks.rewards import Example
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.grpo import GRPO, GRPOConfig, chat_prompts
from nanoseek.train.optim import build_optimizer

arith = get_task("arithmetic")
INSTRUCTION = "Think step by step, then write only the final answer after the thinking."


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --- the shared model, tokenizer and prompts
def build(args, out: Path) -> tuple[Tokenizer, list[list[int]], list[Example]]:
    ex = arith.examples(200, 0)
    texts = arith.corpus(2000, 0) + [m["content"] for e in ex for m in arith.sft_messages(e)]
    vocab = 512 if args.preset == "tiny" else 4096
    tok = Tokenizer.train(texts, vocab_size=vocab)
    seed_everything(args.seed)
    model = Transformer(preset(args.preset, vocab_size=tok.vocab_size))
    model.init_weights()
    model.save_pretrained(out)
    tok.save(out)
    n = args.prompts * (args.warmup + args.steps + 1)
    problems = arith.examples(n, args.seed, "train")
    # The task's instruction names the tags ("inside <think> </think>"); nanoseek's tokenizer keeps tag
    # strings in user text as plain text (no forged turns), transformers parses them into the tag ids.
    # An instruction without tag strings gives both sides the same prompt ids.
    prompts = chat_prompts(tok, lambda e: [{"role": "user", "content": f"{e.prompt} {INSTRUCTION}"}], problems)
    return tok, prompts, problems


def reward_of(text: str, answer: str) -> float:
    return arith.reward(text, Example(prompt="", answer=answer))["total"]


# --- nanoseek
def nanoseek_stepper(args, model_dir: Path, tok: Tokenizer, prompts, problems, device):
    """-> (step(i): one GRPO step, timed and recorded from i >= warmup on; the recorded rows)."""
    model = Transformer.from_pretrained(model_dir, dtype=torch.float32, device=device)
    P, G, T = args.prompts, args.group_size, args.new
    engine = Engine(model, tok, max_batch=P * G, max_seq_len=max(map(len, prompts)) + T + 1,
                    max_prefill_tokens=P * G * max(map(len, prompts)))
    params = SamplingParams(max_tokens=T, temperature=1.0, ignore_eos=True)
    times = {"generation": 0.0, "scoring": 0.0}

    def generate(ps):
        sync(device)
        t = time.perf_counter()
        out = engine.generate(ps, params)
        times["generation"] += time.perf_counter() - t
        return out

    def reward_fn(c, ex):
        t = time.perf_counter()
        r = arith.reward(c.text, ex)
        times["scoring"] += time.perf_counter() - t
        return r

    cfg = GRPOConfig(variant="grpo", group_size=G, max_new_tokens=T, clip_grad=1.0, seed=args.seed, split=args.split,
                     skip_zero_advantage=not args.no_skip)
    opt = build_optimizer(model, "adamw", args.lr, 0.0, betas=(0.9, 0.999))   # as `nanoseek grpo`; trl's betas
    trainer = GRPO(model, opt, generate, reward_fn, cfg, pad_id=tok.pad_id)
    cursor = [0]

    def next_prompts():
        i = cursor[0]
        cursor[0] += P
        return prompts[i:i + P], problems[i:i + P]

    rows: list[dict] = []

    def one_step(i: int) -> None:
        times.update(generation=0.0, scoring=0.0)
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        stats = trainer.step(next_prompts)
        sync(device)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        if i >= args.warmup:
            rows.append({"step": dt, "cpu": cpu, **times, "length": stats["response_length"],
                         "reward": stats["reward"], "zero_std": stats["frac_zero_std"]})
    return one_step, rows


# --- trl
def prompt_texts(model_dir: Path, tok: Tokenizer, prompts: list[list[int]]) -> list[str]:
    """The prompts as strings for trl, checked to give transformers' tokenizer the very same ids."""
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [tok.decode(p) for p in prompts]
    for text, ids in zip(texts, prompts):
        got = hf_tok(text, add_special_tokens=False)["input_ids"]
        if got != ids:
            raise SystemExit(f"tokenizers disagree on {text!r}: {got} vs {ids}")
    return texts


def run_trl(args, model_dir: Path, tok: Tokenizer, prompts, problems, device, between=None) -> dict:
    """trl's GRPOTrainer for warmup + steps steps; between(i) runs after trl's step i, untimed."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    texts = prompt_texts(model_dir, tok, prompts)
    ds = Dataset.from_list([{"prompt": t, "answer": ex.answer} for t, ex in zip(texts, problems)])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    P, G, T = args.prompts, args.group_size, args.new
    times = {"generation": 0.0, "scoring": 0.0}

    def reward(completions, answer, **_):
        t = time.perf_counter()
        out = [reward_of(c, a) for c, a in zip(completions, answer)]
        times["scoring"] += time.perf_counter() - t
        return out

    class Timed(GRPOTrainer):
        def _generate_single_turn(self, *a, **kw):
            sync(device)
            t = time.perf_counter()
            out = super()._generate_single_turn(*a, **kw)
            sync(device)
            times["generation"] += time.perf_counter() - t
            return out

    rows: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            times.update(generation=0.0, scoring=0.0)
            sync(device)
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            sync(device)
            if state.global_step > args.warmup:
                rows.append({"step": time.perf_counter() - self.t0, "cpu": time.process_time() - self.c0, **times,
                             "length": T, "reward": float("nan")})
            if between is not None:
                between(state.global_step - 1)

    with tempfile.TemporaryDirectory() as out_dir:
        cfg = TRLConfig(output_dir=out_dir, per_device_train_batch_size=P * G, num_generations=G,
                        gradient_accumulation_steps=1, max_completion_length=T, temperature=1.0, top_p=1.0, top_k=0,
                        generation_kwargs={"min_new_tokens": T}, beta=0.0, loss_type="grpo", scale_rewards="group",
                        num_iterations=1, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
                        weight_decay=0.0, optim="adamw_torch_fused", adam_beta1=0.9, adam_beta2=0.999,
                        max_grad_norm=1.0, max_steps=args.warmup + args.steps, logging_steps=1,
                        report_to="none", save_strategy="no", use_cpu=device.type == "cpu", bf16=False,
                        seed=args.seed, shuffle_dataset=False, disable_tqdm=True, dataloader_num_workers=0,
                        log_completions=False)
        trainer = Timed(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=hf_tok,
                        callbacks=[StepTimer()])
        trainer.remove_callback(PrinterCallback)    # no per-step log dicts on stdout
        trainer.train()
    return summarize(rows, P * G)


def summarize(rows: list[dict], completions: int) -> dict:
    step = median([r["step"] for r in rows])
    gen = median([r["generation"] for r in rows])
    score = median([r["scoring"] for r in rows])
    return {"step": step, "generation": gen, "scoring": score, "update": median([r["step"] - r["generation"]
                                                                                  - r["scoring"] for r in rows]),
            "completions_per_s": completions / step, "cpu": median([r["cpu"] for r in rows]),
            "completions_per_cpu_s": completions / median([r["cpu"] for r in rows]),
            "length": median([r["length"] for r in rows]), "n": len(rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--new", type=int, default=32, help="tokens per completion")
    p.add_argument("--steps", type=int, default=4, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cuda | cpu (default: cuda if present)")
    p.add_argument("--threads", type=int, help="torch CPU threads for both sides (default: torch's choice; on a "
                                               "shared machine 1 avoids idle threads spinning against others)")
    p.add_argument("--no-skip", action="store_true", help="nanoseek's update runs the groups whose rewards are "
                                                          "all equal too (exactly zero gradient; skipped by default)")
    p.add_argument("--split", type=int, default=0, help="nanoseek's update: the groups as this many chunks in as "
                                                       "many CPU threads (GRPOConfig.split; 0: one per thread, 1: off)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import trl
    except ImportError:
        sys.exit("trl is not installed (it is not a nanoseek dependency). Install it with\n"
                 "  .venv/bin/pip install trl --dry-run   # check that it keeps your torch\n"
                 "  .venv/bin/pip install trl")
    device = pick_device(args.device)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()     # the MTP layer's weights are "unexpected" to transformers (it drops MTP)
    with tempfile.TemporaryDirectory() as d:
        model_dir = Path(d) / "model"
        tok, prompts, problems = build(args, model_dir)
        P, G, T = args.prompts, args.group_size, args.new
        print(f"preset {args.preset}, {device}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
              f"trl {trl.__version__}: {P} prompts x G={G} = {P * G} completions/step, prompt "
              f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, {T} new tokens each, "
              f"{args.steps} timed steps after {args.warmup} warm-up")
        prompt_texts(model_dir, tok, prompts)     # fail before timing anything
        ns_step, ns_rows = nanoseek_stepper(args, model_dir, tok, prompts, problems, device)
        tr = run_trl(args, model_dir, tok, prompts, problems, device, between=ns_step)
        results = {"nanoseek": summarize(ns_rows, P * G), "trl": tr}
        zero = statistics.mean(r["zero_std"] for r in ns_rows)
    print(f"\n| {'median per step':<16} | {'step s':>7} | {'generation':>10} | {'scoring':>8} | {'update':>7} "
          f"| {'completions/s':>13} | {'CPU s':>6} | {'per CPU s':>9} |\n"
          f"|{'-' * 18}|{'-' * 9}|{'-' * 12}|{'-' * 10}|{'-' * 9}|{'-' * 15}|{'-' * 8}|{'-' * 11}|")
    for name, r in results.items():
        print(f"| {name:<16} | {r['step']:>7.3f} | {r['generation']:>10.3f} | {r['scoring']:>8.4f} "
              f"| {r['update']:>7.3f} | {r['completions_per_s']:>13.1f} | {r['cpu']:>6.3f} "
              f"| {r['completions_per_cpu_s']:>9.1f} |")
    ns, tr = results["nanoseek"], results["trl"]
    print(f"\nzero-std groups (all rewards equal, advantages 0): {zero:.0%} of the timed steps' groups; nanoseek "
          + ("ran their forward/backward too (--no-skip)" if args.no_skip else
             "skipped their forward/backward (exactly zero gradient; --no-skip runs them)"))
    print(f"\nnanoseek / trl completions/s: {ns['completions_per_s'] / tr['completions_per_s']:.1f}x "
          f"(generation {tr['generation'] / ns['generation']:.1f}x faster, update {tr['update'] / ns['update']:.1f}x)"
          f"; goal >= 5x")
    if device.type == "cpu":
        print(f"per CPU second (process time; steady under other processes' load): "
              f"{ns['completions_per_cpu_s'] / tr['completions_per_cpu_s']:.1f}x")


if __name__ == "__main__":
    main()
