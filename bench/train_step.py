"""Full training steps (forward, backward, AdamW) in tokens/s: nanoseek vs transformers, same weights, same run.

    .venv/bin/python bench/train_step.py                      # small preset, batch 8 x 512
    .venv/bin/python bench/train_step.py --steps 5 --compile --profile
    .venv/bin/python bench/train_step.py --preset tiny --batch 8 --seq 256 --threads 1

The nanoseek model is saved as a Hugging Face directory and loaded by transformers'
DeepseekV3ForCausalLM, so both train the same weights. Without MTP on either side (transformers does
not train the MTP module), nanoseek's step is CE + sequence-wise balance loss + the bias update;
transformers' is its CE. Both use torch.optim.AdamW. Each transformers experts implementation that
can train (eager, grouped_mm) is timed and its best mode is the peer. Steps of all modes are
interleaved, so a machine shared with other work slows them alike. MFU = tokens/s * FLOPs per token
(nanoseek.train.step.flops_per_token) / the matmul peak of the precision used, measured here;
both are best-of-N (the table also shows median step times). nanoseek runs its rows as one chunk per
thread, each in its own thread, as `nanoseek pretrain` does on CPU (train/parallel.split_backward); its
one-chunk step (intra-op threads only) is timed beside it. Then the matmul ceiling: one thread's chunk of
the step with every matmul recorded and replayed alone (same shapes, strides, dtypes), the MFU the step
would have if nothing but its matmuls took time, and the slowest matmul classes (`--no-ceiling` skips).
bf16 modes are skipped with a message when this CPU only emulates bf16 (no AVX-512 BF16 / AMX).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch

from nanoseek.model import Transformer, count_parameters, preset
from nanoseek.train.optim import build_optimizer
from nanoseek.train.parallel import cpu_split
from nanoseek.train.step import (autocast, flops_per_token, measure_peak_flops, pretrain_backward, pretrain_loss,
                                 update_router_bias)


# --- the two kinds of step
def nanoseek_step(model, opt, x, y, dtype, mtp_weight=0.0, split=1):
    """The step of `nanoseek pretrain`: its rows as `split` chunks in as many CPU threads."""
    params = [p for p in model.parameters() if p.requires_grad]
    parts, counts = pretrain_backward(model, params, x, y, mtp_weight=mtp_weight, balance_alpha=1e-4,
                                      amp_dtype=dtype, split=split)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    update_router_bias(model, counts, 1e-3)
    return parts["loss"].item()


def hf_step(model, opt, x, y, dtype):
    with autocast(torch.device("cpu"), dtype):
        # transformers shifts labels itself: labels = inputs gives the same next-token targets
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def profile_nanoseek(model, opt, x, y, dtype) -> None:
    """Op table of one step, plus forward wall time by module kind (hooks), to say where time goes."""
    from torch.profiler import ProfilerActivity, profile

    from nanoseek.model.layers import MLP, RMSNorm
    from nanoseek.model.mla import MLA
    from nanoseek.model.moe import Experts, Gate

    kinds = {MLA: "MLA attention", Gate: "MoE gate", Experts: "routed experts (dispatch + SwiGLU)",
             RMSNorm: "RMSNorm", MLP: "dense / shared SwiGLU"}
    spent: dict[str, float] = {}
    starts: dict[int, float] = {}
    handles = []
    for m in model.modules():
        kind = next((v for k, v in kinds.items() if isinstance(m, k)), None)
        if kind is None:
            continue
        handles.append(m.register_forward_pre_hook(lambda mod, a: starts.__setitem__(id(mod), time.perf_counter())))
        handles.append(m.register_forward_hook(
            lambda mod, a, o, kind=kind: spent.__setitem__(kind, spent.get(kind, 0) + time.perf_counter() - starts[id(mod)])))
    t = time.perf_counter()
    with torch.no_grad(), autocast(torch.device("cpu"), dtype):
        model(x, return_routing=True)
    total = time.perf_counter() - t
    for h in handles:
        h.remove()
    print(f"\nnanoseek forward {total * 1e3:.0f} ms by module kind (nested kinds overlap: a shared SwiGLU sits in MoE):")
    for kind, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<36} {s * 1e3:8.0f} ms  {100 * s / total:5.1f}%")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        nanoseek_step(model, opt, x, y, dtype)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


# --- the matmul ceiling: the step's own matmuls, replayed alone
_MM = {"mm": (0, 1), "mm.out": (0, 1), "addmm": (1, 2), "bmm": (0, 1), "bmm.out": (0, 1), "baddbmm": (1, 2),
       "baddbmm_": (1, 2), "baddbmm.out": (1, 2)}      # op -> positions of its two factors


def matmul_ceiling(model, opt, x, y, dtype, top: int = 5) -> None:
    """Record every matmul of one chunk's step (the rows one thread runs in `nanoseek pretrain`) on one
    thread, replay them alone with their own shapes, strides and dtypes, and print their FLOP rate
    against the one-thread peak: the MFU the step could reach if every other op (norms, casts, copies,
    softmax, routing, the optimizer) took no time. Also the matmul classes that take longest."""
    from torch.utils._python_dispatch import TorchDispatchMode

    def flops(a: torch.Tensor, b: torch.Tensor) -> int:
        return 2 * a.shape[:-1].numel() * a.shape[-1] * b.shape[-1]       # (.., M, K) x (.., K, N)

    calls: list = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.__name__.removesuffix(".default")
            if name in _MM:
                i, j = _MM[name]
                spec = lambda t: (t.shape, t.stride(), t.dtype) if isinstance(t, torch.Tensor) else t
                calls.append((func, name, [spec(a) for a in args], {k: spec(v) for k, v in kwargs.items()},
                              flops(args[i], args[j])))
            return func(*args, **kwargs)

    def tensor(s):     # a tensor with the recorded layout (expanded strides included)
        if not (isinstance(s, tuple) and len(s) == 3 and isinstance(s[2], torch.dtype)):
            return s
        shape, stride, dt = s
        n = 1 + sum((a - 1) * b for a, b in zip(shape, stride)) if all(shape) else 1
        return torch.randn(n).to(dt).as_strided(shape, stride)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        split = cpu_split(torch.device("cpu"), x.shape[0], threads)
        xc, yc = x[: x.shape[0] // split], y[: y.shape[0] // split]
        step_s = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            nanoseek_step(model, opt, xc, yc, dtype)
            step_s = min(step_s, time.perf_counter() - t)
        with Record():
            nanoseek_step(model, opt, xc, yc, dtype)
        replay = [(f, name, [tensor(a) for a in args], {k: tensor(v) for k, v in kw.items()}, fl)
                  for f, name, args, kw, fl in calls]
        per = [float("inf")] * len(replay)
        for _ in range(3):
            for i, (f, _n, args, kw, _fl) in enumerate(replay):
                t = time.perf_counter()
                f(*args, **kw)
                per[i] = min(per[i], time.perf_counter() - t)
        peak = measure_peak_flops(torch.device("cpu"), dtype)
    finally:
        torch.set_num_threads(threads)
    total, fl = sum(per), sum(c[-1] for c in replay)
    model_fl = flops_per_token(model, x.shape[1], mtp=False) * xc.numel()
    print(f"\nmatmul ceiling, {str(dtype).removeprefix('torch.')}, one thread, {xc.shape[0]} x {xc.shape[1]} rows: "
          f"{len(replay)} matmuls, {fl / 1e9:.0f} GFLOP, replayed alone in {total:.2f} s = {fl / total / 1e9:.0f} "
          f"GFLOP/s = {100 * model_fl / total / peak:.0f}% MFU at best (one-thread peak {peak / 1e9:.0f} GFLOP/s); "
          f"the step {step_s:.2f} s = {100 * model_fl / step_s / peak:.0f}% MFU, its matmuls {100 * total / step_s:.0f}% "
          f"of it")
    classes: dict[tuple, list] = {}
    for (f, name, args, _kw, fl), s in zip(replay, per):
        shapes = " ".join("x".join(map(str, a.shape)) + ("" if a.is_contiguous() else "(T)")
                          for a in args if isinstance(a, torch.Tensor))
        c = classes.setdefault((name, shapes), [0, 0.0, 0])
        c[0], c[1], c[2] = c[0] + 1, c[1] + s, c[2] + fl
    print("  longest matmul classes ((T): a strided, e.g. transposed, operand):")
    for (name, shapes), (n, s, f) in sorted(classes.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {s * 1e3:7.1f} ms {n:4d} x {name:<11} {shapes:<44} {f / s / 1e9:6.0f} GFLOP/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode (after one warm-up step)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="also time nanoseek with each block torch.compile'd")
    p.add_argument("--no-mtp-row", action="store_true", help="skip the full V3 objective row (with MTP)")
    p.add_argument("--force-bf16", action="store_true", help="time bf16 even where it is only emulated")
    p.add_argument("--split", type=int, default=None,
                   help="nanoseek's rows as this many chunks in as many threads (default: one per thread, as "
                        "`nanoseek pretrain`); its one-chunk step is timed beside it when this is > 1")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--no-ceiling", action="store_true", help="skip the matmul ceiling (the step's matmuls replayed "
                                                               "alone: the MFU reachable if all else were free)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import DeepseekV3ForCausalLM

    # --- peaks
    cpu = torch.device("cpu")
    peak = {torch.float32: measure_peak_flops(cpu, torch.float32), torch.bfloat16: measure_peak_flops(cpu, torch.bfloat16)}
    print(f"threads {torch.get_num_threads()} | matmul peak: fp32 {peak[torch.float32] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peak[torch.bfloat16] / 1e9:.1f} GFLOP/s")
    dtypes = [torch.float32]
    if peak[torch.bfloat16] > 0.5 * peak[torch.float32] or args.force_bf16:
        dtypes.append(torch.bfloat16)
    else:
        print("bf16: skipped, this CPU emulates bf16 matmuls (no AVX-512 BF16 / AMX): every bf16 mode would "
              "run at the bf16 peak above")

    # --- the same weights on both sides
    torch.manual_seed(0)
    cfg = preset(args.preset, num_nextn_predict_layers=0)
    base = Transformer(cfg)
    base.init_weights()
    c = count_parameters(base)
    fpt = flops_per_token(base, args.seq, mtp=False)
    print(f"{args.preset}: {c['total'] / 1e6:.1f}M parameters, {c['active'] / 1e6:.1f}M active | "
          f"batch {args.batch} x {args.seq} | {fpt / 1e6:.0f} MFLOP per token (fwd+bwd)")
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    y = torch.cat([x[:, 1:], torch.randint(0, cfg.vocab_size, (args.batch, 1))], dim=1)
    modes: list[tuple[str, torch.dtype, object, object, callable]] = []
    with tempfile.TemporaryDirectory() as d:
        base.save_pretrained(d)
        for impl in ("eager", "grouped_mm"):
            hf = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa",
                                                       experts_implementation=impl)
            hf.train()
            for dt in dtypes:
                m = hf if dt == dtypes[-1] else copy.deepcopy(hf)
                modes.append((f"transformers {impl}", dt, m, torch.optim.AdamW(m.parameters(), lr=1e-4),
                              lambda m, o, dt: hf_step(m, o, x, y, dt)))
    with torch.no_grad():   # parity of the first forward: the comparison is of the same model
        hf_logits = modes[0][2](input_ids=x[:1, :64]).logits
        diff = (base(x[:1, :64]) - hf_logits).abs().max().item()
    print(f"parity: max |logits nanoseek - transformers| = {diff:.2e} (fp32)")
    split = args.split or cpu_split(cpu, args.batch)
    print(f"nanoseek: rows in {split} chunk(s)")
    for dt in dtypes:
        m = copy.deepcopy(base).train()
        modes.append(("nanoseek", dt, m, build_optimizer(m, "adamw", 1e-4, 0.1),
                      lambda m, o, dt: nanoseek_step(m, o, x, y, dt, split=split)))
        if split > 1:
            m = copy.deepcopy(base).train()
            modes.append(("nanoseek 1 chunk", dt, m, build_optimizer(m, "adamw", 1e-4, 0.1),
                          lambda m, o, dt: nanoseek_step(m, o, x, y, dt)))
        if args.compile:
            mc = copy.deepcopy(base).train()
            for block in mc.layers:
                block.compile()
            modes.append(("nanoseek --compile", dt, mc, build_optimizer(mc, "adamw", 1e-4, 0.1),
                          lambda m, o, dt: nanoseek_step(m, o, x, y, dt)))
    if not args.no_mtp_row:
        torch.manual_seed(0)
        full = Transformer(preset(args.preset))
        full.init_weights()
        full.train()
        fpt_mtp = flops_per_token(full, args.seq, mtp=True)
        modes.append(("nanoseek V3 objective (+MTP)", torch.float32, full, build_optimizer(full, "adamw", 1e-4, 0.1),
                      lambda m, o, dt: nanoseek_step(m, o, x, y, dt, mtp_weight=0.3, split=split)))

    # --- interleaved timing
    times: dict[int, list[float]] = {i: [] for i in range(len(modes))}
    for rep in range(args.steps + 1):
        for i, (name, dt, m, opt, step) in enumerate(modes):
            t = time.perf_counter()
            step(m, opt, dt)
            dt_s = time.perf_counter() - t
            if rep > 0:
                times[i].append(dt_s)
            print(f"  {'warm-up' if rep == 0 else f'step {rep}'}: {name} {str(dt).removeprefix('torch.')} "
                  f"{dt_s:.2f} s", flush=True)

    # --- results: the peak measured again after the steps, the higher one counts (a VM has slow moments)
    for dt in dtypes:
        peak[dt] = max(peak[dt], measure_peak_flops(cpu, dt))
    print(f"matmul peak (best of before and after): " + ", ".join(
        f"{str(dt).removeprefix('torch.')} {peak[dt] / 1e9:.0f} GFLOP/s" for dt in dtypes))
    tokens = args.batch * args.seq
    # best step (as the peak is the best matmul): on a shared machine the median mixes in other jobs' bursts
    print(f"\n{'mode':<32}{'dtype':<10}{'best s':>8}{'median s':>10}{'tok/s':>9}{'MFU':>8}")
    best: dict[str, float] = {}
    for i, (name, dt, *_rest) in enumerate(modes):
        s = min(times[i])
        tps = tokens / s
        f = fpt_mtp if "MTP" in name else fpt
        print(f"{name:<32}{str(dt).removeprefix('torch.'):<10}{s:8.2f}{statistics.median(times[i]):10.2f}{tps:9.0f}"
              f"{100 * tps * f / peak[dt]:7.1f}%")
        side = "transformers" if name.startswith("transformers") else "nanoseek" if "MTP" not in name else "mtp"
        best[side] = max(best.get(side, 0), tps)
    print(f"\nnanoseek best / transformers best: {best['nanoseek'] / best['transformers']:.2f}x "
          f"({best['nanoseek']:.0f} vs {best['transformers']:.0f} tok/s)")
    if not args.no_ceiling:
        for name, dt, m, opt, _ in modes:
            if name == "nanoseek":
                matmul_ceiling(m, opt, x, y, dt)
    if args.profile:
        name, dt, m, opt, _ = next(md for md in modes if md[0] == "nanoseek")
        profile_nanoseek(m, opt, x, y, dt)


if __name__ == "__main__":
    main()
