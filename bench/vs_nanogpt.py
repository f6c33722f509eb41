"""Validation bits per character on tinyshakespeare after the same wall-clock time: nanoseek vs nanoGPT.

    .venv/bin/python bench/vs_nanogpt.py /tmp/nanoGPT              # a karpathy/nanoGPT checkout
    .venv/bin/python bench/vs_nanogpt.py /tmp/nanoGPT --threads 1 --skip-nanogpt --nanoseek-args "--mtp-weight 0"

1. nanoGPT runs its README's CPU configuration (char-level, 4 layers x 128, block 64, batch 12,
   2000 iterations) from a copy of the checkout; its wall time W is the budget.
2. `nanoseek pretrain --preset tiny` (MLA + MoE + MTP, byte-level BPE trained on the same first 90%
   of the text) trains on that 90%, for as many steps as fit in W (step time measured by a short
   calibration run; periodic validation off: the held-out 10% is only ever used for the score).
3. Both final models are scored on nanoGPT's validation text (the last 10% of characters),
   every character covered once by non-overlapping windows of each model's own context length.
   Bits per character = total nats / characters / ln 2; for nanoseek the token-level nats are summed
   over the tokenized text, which is what converting with the tokens-per-character ratio amounts to.
Nothing from nanoGPT is imported into this process: it runs as subprocesses in its own folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
NANOGPT_CPU = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
               "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
               "--lr_decay_iters=2000", "--dropout=0.0"]

# Scores a nanoGPT checkpoint on its val.bin with its own model.py; run inside the checkout.
NANOGPT_EVAL = textwrap.dedent("""
    import json, math, sys, numpy as np, torch
    from model import GPT, GPTConfig
    ck = torch.load(sys.argv[1], map_location="cpu", weights_only=False)   # nanoGPT's own checkpoint format
    model = GPT(GPTConfig(**ck["model_args"]))
    sd = {k.removeprefix("_orig_mod."): v for k, v in ck["model"].items()}
    model.load_state_dict(sd)
    model.eval()
    data = torch.from_numpy(np.fromfile(sys.argv[2], dtype=np.uint16).astype(np.int64))
    T = ck["model_args"]["block_size"]
    n = (len(data) - 1) // T
    x, y = data[: n * T].view(n, T), data[1 : n * T + 1].view(n, T)
    nats = 0.0
    with torch.no_grad():
        for i in range(0, n, 64):
            logits, _ = model(x[i:i + 64], y[i:i + 64])
            nats += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[i:i + 64].flatten(), reduction="sum").item()
    print(json.dumps({"nats": nats, "chars": n * T, "iter": ck["iter_num"]}))
""")


def run(cmd: list[str], cwd: Path, env: dict, log: Path) -> tuple[float, float]:
    """Run to completion, output to `log`; returns (wall seconds, CPU seconds of the child).

    CPU seconds say how much compute a run actually got on a machine shared with other work."""
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.perf_counter() - t, cpu


@torch.no_grad()
def nanoseek_bpc(ckpt: Path, text: str, seq_len: int) -> tuple[float, float]:
    """(bits per character, tokens per character) of the checkpoint on `text`."""
    from nanoseek.model import Transformer
    from nanoseek.tokenizer import Tokenizer
    model = Transformer.from_pretrained(ckpt).eval()
    ids = torch.tensor(Tokenizer.from_dir(ckpt).encode(text))
    n = (len(ids) - 1) // seq_len
    x, y = ids[: n * seq_len].view(n, seq_len), ids[1: n * seq_len + 1].view(n, seq_len)
    nats = 0.0
    for i in range(0, n, 16):
        logits = model(x[i:i + 16])
        nats += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y[i:i + 16].flatten(),
                                                  reduction="sum").item()
    # the few characters after the last full window are left out of both counts
    chars = len(Tokenizer.from_dir(ckpt).decode(ids[1: n * seq_len + 1].tolist()))
    return nats / chars / math.log(2), n * seq_len / chars


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("nanogpt", type=Path, help="path of a karpathy/nanoGPT checkout")
    p.add_argument("--text", type=Path, default=REPO / "data" / "tinyshakespeare" / "input.txt")
    p.add_argument("--work", type=Path, default=Path("/tmp/vs_nanogpt"))
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both (default: all cores)")
    p.add_argument("--budget", type=float, default=None, help="seconds for nanoseek (default: nanoGPT's wall time)")
    p.add_argument("--nanoseek-steps", type=int, default=None, help="fixed step count instead of the calibration")
    p.add_argument("--skip-nanogpt", action="store_true", help="reuse a finished nanoGPT run in --work")
    p.add_argument("--nanoseek-args", default="", help="extra `nanoseek pretrain` flags, e.g. '--mtp-weight 0'")
    args = p.parse_args()
    if not (args.nanogpt / "train.py").exists():
        sys.exit(f"{args.nanogpt}: not a nanoGPT checkout (no train.py)")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(REPO)}
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    text = args.text.read_text(encoding="utf-8")
    split = int(len(text) * 0.9)                        # nanoGPT's prepare.py split
    val_text = text[split:]
    print(f"{args.text}: {len(text):,} characters; validation = last {len(val_text):,} | "
          f"{args.threads} thread(s) each | load average {os.getloadavg()[0]:.1f}")

    # --- nanoGPT: its own data preparation and training, in a copy of the checkout
    gpt = work / "nanoGPT"
    if not args.skip_nanogpt:
        shutil.rmtree(gpt, ignore_errors=True)
        shutil.copytree(args.nanogpt, gpt, ignore=shutil.ignore_patterns(".git", "out*"))
        shutil.copy(args.text, gpt / "data" / "shakespeare_char" / "input.txt")   # prepare.py downloads otherwise
        run([sys.executable, "data/shakespeare_char/prepare.py"], gpt, env, work / "nanogpt_prepare.log")
        wall, cpu = run([sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_CPU], gpt, env,
                        work / "nanogpt_train.log")
        (work / "nanogpt_time.json").write_text(json.dumps({"wall": wall, "cpu": cpu, "load": os.getloadavg()[0]}))
    timing = json.loads((work / "nanogpt_time.json").read_text())
    wall, cpu = timing["wall"], timing["cpu"]
    log = (work / "nanogpt_train.log").read_text()
    reported = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", log)
    (gpt / "score_for_nanoseek_bench.py").write_text(NANOGPT_EVAL)   # beside its model.py, in the copy
    out = subprocess.run([sys.executable, "score_for_nanoseek_bench.py", "out-shakespeare-char/ckpt.pt",
                          "data/shakespeare_char/val.bin"], cwd=gpt, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr)
    g = json.loads(out.stdout.strip().splitlines()[-1])
    gpt_bpc = g["nats"] / g["chars"] / math.log(2)
    print(f"nanoGPT: {wall:.0f} s wall ({cpu:.0f} CPU s, load average {timing['load']:.1f} at its end) for 2000 "
          f"iterations; its own val estimate at step {reported[-1][0]}: "
          f"{float(reported[-1][2]):.4f} nats/char; full validation text: {gpt_bpc:.4f} bits/char "
          f"(checkpoint of iteration {g['iter']})")

    # --- nanoseek: the same 90% as training data (tokenizer trained on it alone), no held-out part
    # inside it: periodic validation is off, the score below is the comparison.
    from nanoseek.data.pretrain import write_shards
    from nanoseek.model import PRESETS
    from nanoseek.tokenizer import Tokenizer
    shards = work / "nanoseek_shards"
    tok = Tokenizer.train([text[:split]], vocab_size=PRESETS["tiny"].get("vocab_size", 512))
    write_shards([text[:split]], tok, shards, val_fraction=0.0)
    budget = args.budget or wall
    base = [sys.executable, "-m", "nanoseek", "pretrain", "--preset", "tiny", "--threads", str(args.threads),
            "--data", str(shards), "--eval-steps", "0", *shlex.split(args.nanoseek_args)]
    steps = args.nanoseek_steps
    if steps is None:
        cal = work / "nanoseek_calibrate"
        shutil.rmtree(cal, ignore_errors=True)
        t_cal, _ = run([*base, "--out", str(cal), "--steps", "40"], REPO, env, work / "nanoseek_calibrate.log")
        cfg = json.loads((cal / "run.json").read_text())
        dts = [cfg["tokens_per_step"] / r["tok_per_s"] for r in map(json.loads, (cal / "metrics.jsonl").open())]
        step_s = sorted(dts)[len(dts) // 2]
        overhead = t_cal - sum(dts)                      # start-up, checkpoint, plots
        steps = max(10, int((budget - overhead) / step_s))
        print(f"nanoseek calibration: {step_s * 1e3:.0f} ms/step, {overhead:.0f} s fixed -> {steps} steps in "
              f"{budget:.0f} s")
    ours = work / "nanoseek"
    shutil.rmtree(ours, ignore_errors=True)
    t_ours, cpu_ours = run([*base, "--out", str(ours), "--steps", str(steps)], REPO, env, work / "nanoseek_train.log")
    ckpt = ours / "checkpoints" / f"step_{steps:06d}" / "model"
    seq_len = json.loads((ours / "run.json").read_text())["args"]["seq_len"]
    ns_bpc, tpc = nanoseek_bpc(ckpt, val_text, seq_len)
    params = json.loads((ours / "run.json").read_text())["parameters"]
    print(f"nanoseek: {t_ours:.0f} s wall ({cpu_ours:.0f} CPU s, load average {os.getloadavg()[0]:.1f} at its end) "
          f"for {steps} steps; full validation text: {ns_bpc:.4f} bits/char "
          f"({tpc:.3f} tokens/char)")

    # --- verdict
    print(f"\n{'':<10}{'wall s':>8}{'CPU s':>8}{'params':>10}{'active':>10}{'val bits/char':>15}")
    print(f"{'nanoGPT':<10}{wall:8.0f}{cpu:8.0f}{'0.80M':>10}{'0.80M':>10}{gpt_bpc:15.4f}")
    print(f"{'nanoseek':<10}{t_ours:8.0f}{cpu_ours:8.0f}{params['total'] / 1e6:9.2f}M{params['active'] / 1e6:9.2f}M"
          f"{ns_bpc:15.4f}")
    print(f"nanoseek - nanoGPT: {ns_bpc - gpt_bpc:+.4f} bits/char at {t_ours / wall:.2f}x nanoGPT's wall time and "
          f"{cpu_ours / cpu:.2f}x its CPU time (negative = nanoseek learned more)")


if __name__ == "__main__":
    main()
