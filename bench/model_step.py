"""Forward+backward throughput of the model: nanoseek vs transformers' DeepseekV3ForCausalLM on the
same weights, in the same run, plus model FLOP utilisation against a matmul peak measured here.

    .venv/bin/python bench/model_step.py                 # small preset, batch 8 x 512
    .venv/bin/python bench/model_step.py --preset tiny --batch 4 --seq 128 --iters 3   # quick look
    .venv/bin/python bench/model_step.py --modes fp32 --threads 1    # on a machine shared with other work

Timings alternate between the two models so that machine noise hits both alike. On CPU nanoseek runs
the batch as one chunk of rows per thread, each in its own thread (as `nanoseek pretrain` does; see
train/parallel.split_backward); its one-chunk, intra-op-threaded step is timed beside it, and
transformers runs as its users run it (intra-op threads).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext

import torch

from nanoseek.common import pick_device
from nanoseek.model import Transformer, count_parameters, preset
from nanoseek.train.losses import linear_cross_entropy
from nanoseek.train.parallel import cpu_split, split_backward


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_token(model: Transformer, T: int) -> float:
    """6 * active non-embedding parameters + causal attention matmuls (fwd + bwd = 3x forward)."""
    cfg = model.config
    n = count_parameters(model)["active"] - model.embed.weight.numel()
    attn = cfg.num_hidden_layers * 3 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * T
    return 6 * n + attn


def step_fn(model, ids, hf: bool, autocast, split: int = 1):
    """Forward + next-token loss + backward, each side with its own training loss: transformers'
    `labels=` loss (fp32 log-softmax of the logits), nanoseek's `train.losses.linear_cross_entropy`
    on the final-normed hidden states (head=False: the head and fp32 CE a row block at a time, as
    train.step.pretrain_loss runs them). Both are the mean CE over the same B * (T-1) targets.
    nanoseek runs the rows as `split` chunks in as many CPU threads, as `nanoseek pretrain` does
    (train.parallel.split_backward; 1: one forward and backward with intra-op threads)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def chunk(weight, x):
        with autocast():
            loss = linear_cross_entropy(model(x, head=False)[:, :-1], model.head.weight, x[:, 1:])
        return loss * weight, loss.detach()

    def run():
        model.zero_grad(set_to_none=True)
        if not hf:
            return split_backward(chunk, params, split, ids)[0]
        with autocast():
            loss = model(ids, labels=ids).loss                            # shifts the labels itself
        loss.backward()
        return loss
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("--modes", default="fp32,bf16")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine)")
    p.add_argument("--split", type=int, default=None,
                   help="nanoseek's rows as this many chunks in as many threads (default: one per thread on "
                        "CPU, as `nanoseek pretrain`); its one-chunk step is timed beside it when this is > 1")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(0)

    # --- same weights in both
    from transformers import DeepseekV3ForCausalLM
    cfg = preset(args.preset, num_nextn_predict_layers=0)
    ours = Transformer(cfg)
    ours.init_weights()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32)
    ours.to(device).train()
    theirs.to(device).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    with torch.no_grad():
        diff = (ours(ids[:1, :64]) - theirs(ids[:1, :64]).logits).abs().max().item()
        loss_diff = abs(linear_cross_entropy(ours(ids[:2, :64], head=False)[:, :-1], ours.head.weight, ids[:2, 1:64]).item()
                        - theirs(ids[:2, :64], labels=ids[:2, :64]).loss.item())
    fpt = flops_per_token(ours, args.seq)
    split = args.split or cpu_split(device, args.batch)
    tokens = args.batch * args.seq
    print(f"{args.preset}: {count_parameters(ours)['total'] / 1e6:.1f}M params, "
          f"{count_parameters(ours)['active'] / 1e6:.1f}M active, batch {args.batch} x {args.seq}, "
          f"{fpt / 1e6:.0f} MFLOP/token (fwd+bwd), device {device}, threads {torch.get_num_threads()}, "
          f"nanoseek rows in {split} chunk(s), "
          f"logit diff {diff:.1e}, loss diff {loss_diff:.1e}")

    results = {}
    for mode in args.modes.split(","):
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        peak = matmul_peak(dtype, device)
        autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if mode == "bf16"
                    else nullcontext)
        runs = {"nanoseek": step_fn(ours, ids, False, autocast, split)}
        if split > 1:
            runs["nanoseek 1 chunk"] = step_fn(ours, ids, False, autocast)
        runs["transformers"] = step_fn(theirs, ids, True, autocast)
        times = {k: [] for k in runs}
        for k, f in runs.items():   # warm-up
            f()
        for _ in range(args.iters):
            for k, f in runs.items():
                sync(device)
                t = time.perf_counter()
                f()
                sync(device)
                times[k].append(time.perf_counter() - t)
        print(f"\n[{mode}] matmul peak {peak / 1e9:.0f} GFLOP/s")
        for k, ts in times.items():
            t = statistics.median(ts)
            tps = tokens / t
            results[(mode, k)] = tps
            print(f"  {k:<16} {t * 1e3:8.1f} ms/step  {tps:9.0f} tok/s  MFU {tps * fpt / peak:6.1%}")
        print(f"  ratio nanoseek / transformers: {results[(mode, 'nanoseek')] / results[(mode, 'transformers')]:.2f}x")

    best_ours = max(v for (m, k), v in results.items() if k == "nanoseek")
    best_theirs = max(v for (m, k), v in results.items() if k == "transformers")
    print(f"\nbest mode: nanoseek {best_ours:.0f} tok/s vs transformers {best_theirs:.0f} tok/s "
          f"= {best_ours / best_theirs:.2f}x (goal >= 2x)")


if __name__ == "__main__":
    main()
