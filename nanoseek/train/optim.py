"""Optimizers and learning-rate schedules for pretraining.

- `param_groups`: which tensors get weight decay. Matrices do; norms, biases and the embedding
  table do not (decay would pull the rows of rare tokens to zero between their visits).
- `Muon`: Newton-Schulz-orthogonalized momentum for hidden matrices (Keller Jordan's Muon; the
  update-RMS matching of Kimi's Moonlight so one lr serves both), AdamW for everything else,
  in one optimizer object so one state dict and one schedule cover both.
- `lr_at`: linear warmup, then cosine decay or WSD (warmup-stable-decay, with a linear decay; DeepSeek-V3's
  schedule is a constant stage then a cosine decay then constant steps).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Quintic Newton-Schulz coefficients from Muon's description: they push every singular value of
# the normalized update into roughly [0.7, 1.2] in five steps (not exactly 1: speed over precision).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def param_groups(model: nn.Module, weight_decay: float, muon: bool = False) -> list[dict]:
    """Split parameters into optimizer groups.

    decay: every matrix (attention/FFN/expert weights, the gate, the output head);
    no decay: 1-D tensors (RMSNorm weights, biases) and embedding tables.
    With muon=True the hidden matrices go to a Muon group; embedding and head stay on AdamW,
    as Muon's authors and Moonlight do (they are lookups/classifiers, not hidden linear maps).
    """
    embed_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = getattr(model, "head", None)
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    groups: dict[str, list] = {"decay": [], "no_decay": [], "muon": []}
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or id(p) in embed_ids:
            groups["no_decay"].append(p)
        elif muon and id(p) not in head_ids:
            groups["muon"].append(p)
        else:
            groups["decay"].append(p)
    out = [{"params": groups["decay"], "weight_decay": weight_decay, "use_muon": False},
           {"params": groups["no_decay"], "weight_decay": 0.0, "use_muon": False}]
    if muon:
        out.append({"params": groups["muon"], "weight_decay": weight_decay, "use_muon": True})
    return [g for g in out if g["params"]]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.Optimizer:
    """'adamw' (torch's fused kernel where it applies) or 'muon'. betas (0.9, 0.95) as DeepSeek-V3 pretrains."""
    if name == "adamw":
        groups = [{k: v for k, v in g.items() if k != "use_muon"} for g in param_groups(model, weight_decay)]
        # The fused kernel is one pass over each tensor: on CPU it is ~10x faster than the default
        # per-tensor loop (0.25 s vs 2.7 s for 32M parameters). FSDP2's DTensors take the foreach path.
        from torch.distributed.tensor import DTensor
        fused = not any(isinstance(p, DTensor) for p in model.parameters())
        return AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                     fused=fused or None, foreach=None if fused else True)
    if name == "muon":
        return Muon(param_groups(model, weight_decay, muon=True), lr=lr, betas=betas, eps=eps,
                    weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose adamw or muon")


class AdamW(torch.optim.AdamW):
    """torch's AdamW whose step bumps every parameter's version counter, as any in-place update does.

    The fused kernel (torch 2.13) writes the parameters without bumping them, so whatever caches a
    tensor derived from a weight and checks `_version` (model.layers.derived: the decode path's packed
    and split weights) kept serving the weights from before the step: an engine sharing a model with
    its trainer (GRPO rollouts, the demo's eval after GRPO) decoded with stale attention weights."""

    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    torch.autograd.graph.increment_version(p)
        return loss


def zeropower_newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalize g (..., m, n): U V^T of its SVD, by a quintic Newton-Schulz iteration.

    Works on the short side (X X^T is min(m,n) square), batched over leading dims (stacked experts).
    """
    a, b, c = NS_COEFFS
    dtype = torch.bfloat16 if g.is_cuda else torch.float32   # bf16 is safe for NS; CPUs without bf16 are slow at it
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT                                                       # (..., n, m), n < m
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)                 # spectral norm <= Frobenius <= 1
    for _ in range(steps):
        A = x @ x.mT                                                   # (..., short, short)
        B = b * A + c * A @ A
        x = a * x + B @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for groups with use_muon=True, AdamW for the rest.

    Muon step for a matrix W (m, n) with gradient G:
        M <- mu * M + G;  U = G + mu * M (Nesterov) or M
        O = NewtonSchulz(U);  W <- W * (1 - lr * wd) - lr * 0.2 * sqrt(max(m, n)) * O
    The 0.2 * sqrt(max(m, n)) factor gives O the RMS of a typical AdamW update (Moonlight), so
    the AdamW learning rate and weight decay carry over. 3-D expert stacks are E separate matrices.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, betas=betas,
                        eps=eps, weight_decay=weight_decay, use_muon=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if type(p).__name__ == "DTensor" and group["use_muon"]:
                    raise RuntimeError("Muon needs whole matrices; it does not run on FSDP-sharded "
                                       "parameters. Use --optimizer adamw with --fsdp, or DDP with Muon.")
                g, state = p.grad, self.state[p]
                if group["use_muon"]:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.mul_(group["momentum"]).add_(g)
                    u = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                    o = zeropower_newton_schulz(u, group["ns_steps"])
                    scale = 0.2 * math.sqrt(max(p.shape[-2], p.shape[-1]))
                    p.mul_(1 - lr * wd).add_(o, alpha=-lr * scale)
                else:  # AdamW (Loshchilov & Hutter), bias-corrected
                    if "step" not in state:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    b1, b2 = group["betas"]
                    state["step"] += 1
                    t = state["step"].item()
                    state["exp_avg"].lerp_(g, 1 - b1)
                    state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                    denom = (state["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                    p.mul_(1 - lr * wd).addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1 ** t))
        return loss


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int, schedule: str = "cosine",
          decay_frac: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`.

    cosine: linear warmup to lr, then half a cosine down to min_lr at the last step.
    wsd: linear warmup, constant lr, then a linear decay to min_lr over the last `decay_frac` of
    the steps (DeepSeek-V3 decays in stages; one linear stage keeps the knob count small).
    """
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "cosine":
        span = max(total - warmup - 1, 1)
        progress = min((step - warmup) / span, 1.0)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(int(round(total * decay_frac)), 1)
        start = total - decay_steps
        if step < start:
            return lr
        progress = min((step - start + 1) / decay_steps, 1.0)
        return lr + (min_lr - lr) * progress
    raise ValueError(f"unknown schedule {schedule!r}; choose cosine or wsd")
