"""The pieces of one pretraining step that the command, the tests and the benchmarks share:
the V3 loss on a batch, the aux-loss-free bias update of every gate, FLOPs per token for MFU,
a measured matmul peak, and a plain sampling loop for eval-time samples.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from torch import nn

from nanoseek.model import Transformer, count_parameters
from nanoseek.model.moe import Gate, MoE
from nanoseek.train.losses import bias_update, expert_counts, linear_cross_entropy, mtp_loss, sequence_balance_loss
from nanoseek.train.parallel import split_backward


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast with fp32 master weights (CPU and CUDA); a no-op context for fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def moe_gates(model: Transformer) -> list[Gate]:
    """Gates in the order the forward reports routing: main MoE layers, then the MTP modules'."""
    gates = [layer.ffn.gate for layer in model.layers if isinstance(layer.ffn, MoE)]
    gates += [m.block.ffn.gate for m in model.mtp if isinstance(m.block.ffn, MoE)]
    return gates


def pretrain_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, mtp_weight: float,
                  balance_alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """DeepSeek-V3's training objective on one batch: CE + lambda * MTP + alpha * sequence balance.

    x, y: (B, T) inputs and next-token targets. Returns (loss to backpropagate, detached parts,
    routed-token counts per gate (n_gates, E) or None for a dense model).
    """
    want_mtp = mtp_weight > 0
    # head=False: "logits" and "mtp_logits" hold the final-normed hidden states, and the loss applies
    # the head a row block at a time (no (B, T, V) logits). DDP keeps the Transformer in .module;
    # FSDP2 leaves the root's (head's) parameters gathered after its forward, for the backward.
    out = model(x, return_mtp=want_mtp, return_routing=True, head=False)
    head = getattr(model, "module", model).head.weight
    ce = linear_cross_entropy(out["logits"], head, y)
    loss = ce
    parts = {"ce": ce.detach()}
    if want_mtp and out.get("mtp_logits"):
        mtp = mtp_loss(out["mtp_logits"], y, mtp_weight, head_weight=head)
        loss = loss + mtp
        parts["mtp"] = mtp.detach()                    # weighted: what the objective adds
        parts["mtp_ce"] = mtp.detach() / mtp_weight    # mean CE over depths: comparable to ce
    counts = None
    if out["routing"]:
        B = x.shape[0]
        if balance_alpha > 0:
            bal = sum(sequence_balance_loss(r.scores, r.indices, B, balance_alpha) for r in out["routing"])
            loss = loss + bal
            parts["balance"] = bal.detach()
        E = out["routing"][0].scores.shape[-1]
        counts = torch.stack([expert_counts(r.indices, E) for r in out["routing"]])   # (n_gates, E)
    parts["loss"] = loss.detach()
    return loss, parts, counts


def pretrain_backward(model: nn.Module, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, *,
                      mtp_weight: float, balance_alpha: float, amp_dtype: torch.dtype, scale: float = 1.0,
                      split: int = 1) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """`pretrain_loss` on (x, y) under autocast(amp_dtype) and its backward into `params`' .grad, the
    gradients scaled by `scale` (1 / micro-steps when accumulating); the rows run as `split` chunks in
    as many CPU threads (parallel.split_backward, parallel.cpu_split). Returns (the loss parts, the
    whole batch's routed-token counts (n_gates, E) or None)."""
    def chunk(weight: float, xc: torch.Tensor, yc: torch.Tensor):
        with autocast(xc.device, amp_dtype):
            loss, parts, counts = pretrain_loss(model, xc, yc, mtp_weight=mtp_weight, balance_alpha=balance_alpha)
        # every part is a mean over the chunk's rows (all rows hold seq_len targets): weighted by rows
        return loss * (weight * scale), ({k: v * weight for k, v in parts.items()}, counts)
    results = split_backward(chunk, params, split, x, y)
    parts = {k: sum(r[0][k] for r in results) for k in results[0][0]}
    counts = None if results[0][1] is None else sum(r[1] for r in results)
    return parts, counts


@torch.no_grad()
def update_router_bias(model: Transformer, counts: torch.Tensor, gamma: float) -> None:
    """b_i += gamma * sign(mean load - load_i) on every gate, from counts (n_gates, E) over the
    global batch (all-reduce them first under data parallelism, so every rank moves alike)."""
    gates = moe_gates(model)
    for gate, c in zip(gates, counts):
        if gate.bias is not None:
            gate.bias += bias_update(c, gamma).to(gate.bias.device)


def max_violation(counts: torch.Tensor) -> list[float]:
    """MaxVio per gate: max load / mean load - 1 (0 = perfectly balanced). counts (n_gates, E)."""
    c = counts.float()
    return (c.max(dim=-1).values / c.mean(dim=-1).clamp(min=1e-9) - 1).tolist()


# --- compute accounting
def flops_per_token(model: Transformer, seq_len: int, mtp: bool = True) -> float:
    """Training FLOPs per token: 6 * (active matmul parameters) + causal attention.

    Matmul parameters: everything a token multiplies through (experts it is routed to, shared
    experts, attention projections, gate, head), not the embedding lookup. Each MTP depth adds
    its block and another pass through the shared head. Attention per layer: forward
    2 * H * (qk_head_dim + v_head_dim) * T/2 (causal, T/2 keys on average), times 3 for training.
    """
    cfg = model.config
    c = count_parameters(model)
    head = cfg.vocab_size * cfg.hidden_size
    matmul = c["active"] - c["embedding"] + (head if cfg.tie_word_embeddings else 0)
    layers = cfg.num_hidden_layers
    if mtp and len(model.mtp):
        matmul += c["mtp_active"] + head * len(model.mtp)
        layers += len(model.mtp)
    attn = 3 * layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
    return 6 * matmul + attn


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 3,
                       budget_s: float = 0.5) -> float:
    """Best observed FLOP/s of an n x n matmul in `dtype` on `device` (the MFU denominator).

    n = 1024 on CPU (already at the BLAS plateau there), 8192 on GPUs. At least `reps` timed calls
    after a warm-up, and more until `budget_s` has passed: on a VM a few calls can all land in a slow
    moment (3 calls of ~10 ms once gave 141 GFLOP/s for fp32 where 200 is usual), and a low peak
    inflates every MFU figure. A dtype the hardware only emulates (bf16 on a CPU without AVX-512
    BF16/AMX runs at ~1 GFLOP/s) is measured once rather than spending a minute on it.
    """
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    start = time.perf_counter()
    i = 0
    while i <= reps or time.perf_counter() - start < budget_s:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        if i > 0 or dt > 1.0:      # the first call only warms up (kernel choice), unless it is slow anyway
            best = min(best, dt)
        if best < float("inf") and dt > 1.0:
            break
        i += 1
    return 2 * n**3 / best


# --- samples
@torch.no_grad()
def sample(model: nn.Module, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.8,
           top_k: int | None = 50, context: int = 256, eos_id: int | None = None,
           generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> list[int]:
    """Plain autoregressive sampling (full forward each token, no cache): slow but simple, and it
    runs on a sharded FSDP2 model when every rank calls it. temperature 0 = greedy."""
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        logits = model(ids[:, -context:])[:, -1].float()                    # (1, V)
        if temperature <= 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(dim=-1).cpu(), 1, generator=generator).to(ids.device)
        ids = torch.cat([ids, nxt], dim=1)
        if eos_id is not None and nxt.item() == eos_id:
            break
    return ids[0, len(prompt):].tolist()
