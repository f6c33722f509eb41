"""The output head and the log-softmax of the GRPO update, fused: log pi(target) and the policy
entropy per token in one pass over row blocks, without the (B, T, V) logits and their log-softmax,
exp and product as separate tensors (on CPU each fresh multi-MB temporary can cost more in page
faults than the op filling it). At a real vocabulary the logits are the largest tensor of the update
(B x T x 129k floats); here they exist one row block at a time. Tested against F.log_softmax in
tests/test_rl_forward.py.
"""

from __future__ import annotations

import threading

import torch

from nanoseek.model.workspace import scratch


def linear_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(h W^T)[target] and the entropy of softmax(h W^T), per row, in fp32 (fp64 for fp64 h).

    h (..., dim) final-normed hidden states, weight (V, dim) the head, targets (...) long ->
    (logp, entropy), each shaped like targets. logp carries the gradient (to h and W); entropy is
    detached (a logged statistic). Under autocast the matmuls run in the autocast dtype, as F.linear's
    would, and the softmax arithmetic in fp32.
    """
    shape = targets.shape
    h = h.reshape(-1, h.shape[-1])
    if torch.is_autocast_enabled(h.device.type):
        dt = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dt), weight.to(dt)
    elif h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    keep = (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
            and h.shape[0] * weight.shape[0] <= LinearLogprobs.KEEP_MAX)
    logp, ent = LinearLogprobs.apply(h, weight, targets.reshape(-1), keep)
    return logp.view(shape), ent.view(shape)


class LinearLogprobs(torch.autograd.Function):
    """Per row i: logits_i = h_i W^T, logp_i = logits_i[t_i] - logsumexp(logits_i), H_i = lse_i - sum_v p_v
    logits_v, one block of ROWS rows at a time in reused buffers. d logits_i = g_i (onehot(t_i) - p_i),
    then dh = d logits W and dW = d logits^T h. Where N * V <= KEEP_MAX (a small vocabulary: tiny's
    GRPO update, 2048 x 512) the forward keeps the normalized probabilities in a reused buffer and the
    backward reads them, all rows at once; otherwise (or when another forward has taken the buffer
    since) the backward recomputes each block's logits (one (R, dim) x (dim, V) matmul) and exp."""

    ROWS = 256
    KEEP_MAX = 1 << 22          # N * V up to this: the forward keeps the probabilities (16 MB in fp32)

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, keep: bool = False):
        with torch.autocast(h.device.type, enabled=False):
            N, V = h.shape[0], weight.shape[0]
            R = min(LinearLogprobs.ROWS, N)
            acc = torch.promote_types(h.dtype, torch.float32)               # the softmax in fp32 at least
            logp = torch.empty(N, dtype=acc, device=h.device)
            ent = torch.empty(N, dtype=acc, device=h.device)
            lse = torch.empty(N, dtype=acc, device=h.device)
            lbuf = scratch("rl-logits", (R, V), h.dtype, h.device)
            fbuf = lbuf if h.dtype == acc else scratch("rl-logits-acc", (R, V), acc, h.device)
            # keep (a small N x V that needs a backward): the probabilities stay for the backward (no second
            # head matmul and exp), in a scratch buffer (no page faults), claimed by a ticket the backward checks
            if keep:
                probs = scratch("rl-probs-kept", (N, V), acc, h.device)
                ticket = _claim()
            else:
                pbuf = scratch("rl-probs", (R, V), acc, h.device)
            wt = weight.t()
            for r0 in range(0, N, R):
                r1 = min(r0 + R, N)
                z = _block_logits(h[r0:r1], wt, lbuf, fbuf)                        # (R, V) fp32
                m = z.amax(dim=1, keepdim=True)                                   # (R, 1)
                out = probs[r0:r1] if keep else pbuf[: r1 - r0]
                p = torch.sub(z, m, out=out).exp_()                               # unnormalized probs
                s = p.sum(dim=1, keepdim=True)                                    # (R, 1)
                l_ = m + s.log()                                                  # (R, 1) logsumexp
                lse[r0:r1] = l_[:, 0]
                logp[r0:r1] = z.gather(1, targets[r0:r1, None])[:, 0] - l_[:, 0]
                # H = lse - E_p[logits] = lse - sum(p * z) / s
                if keep:
                    ent[r0:r1] = l_[:, 0] - torch.linalg.vecdot(p, z) / s[:, 0]
                    p.mul_(s.reciprocal_())                                       # normalized, for the backward
                else:                                                             # p is not needed after this
                    ent[r0:r1] = l_[:, 0] - p.mul_(z).sum(dim=1) / s[:, 0]
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.kept = (probs, ticket) if keep else None
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g: torch.Tensor, _g_ent: torch.Tensor | None):
        h, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        kept, ctx.kept = ctx.kept, None
        with torch.autocast(h.device.type, enabled=False):
            N, V = h.shape[0], weight.shape[0]
            acc = lse.dtype
            g = g.to(acc)
            if kept is not None and kept[1] == _ticket():
                # the forward's probabilities, still in the buffer: d logits = g (onehot(t) - p), all rows
                # at once (in place: the buffer is not read again)
                d = kept[0].mul_(-g[:, None])                                     # (N, V)
                d.scatter_add_(1, targets[:, None], g[:, None])
                _claim()                                                          # used up
                dl = d if d.dtype == h.dtype else d.to(h.dtype)                   # rounded once, as F.linear's grad
                dh = torch.mm(dl, weight) if need_h else None                     # (N, dim)
                dw = torch.mm(d.t(), h.to(acc)).to(weight.dtype) if need_w else None   # (V, dim)
                return dh, dw, None, None
            R = min(LinearLogprobs.ROWS, N)
            dh = torch.empty_like(h) if need_h else None
            dw = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
            lbuf = scratch("rl-logits", (R, V), h.dtype, h.device)
            fbuf = lbuf if h.dtype == acc else scratch("rl-logits-acc", (R, V), acc, h.device)
            wt = weight.t()
            for r0 in range(0, N, R):
                r1 = min(r0 + R, N)
                z = _block_logits(h[r0:r1], wt, lbuf, fbuf)                        # (R, V) fp32
                # d logits = -g p, then + g at the target (fp32)
                d = z.sub_(lse[r0:r1, None]).exp_().mul_(-g[r0:r1, None])          # (R, V)
                d.scatter_add_(1, targets[r0:r1, None], g[r0:r1, None])
                if need_h:
                    dl = d if d.dtype == h.dtype else lbuf[: r1 - r0].copy_(d)    # rounded once, as F.linear's grad
                    torch.mm(dl, weight, out=dh[r0:r1])                           # (R, dim)
                if need_w:
                    dw.addmm_(d.t(), h[r0:r1].to(acc))                            # (V, dim) fp32
        return dh, (None if dw is None else dw.to(weight.dtype)), None, None


_LOCAL = threading.local()   # .ticket: which forward's probabilities this thread's kept buffer holds


def _ticket() -> int:
    return getattr(_LOCAL, "ticket", 0)


def _claim() -> int:
    _LOCAL.ticket = _ticket() + 1
    return _LOCAL.ticket


def _block_logits(h: torch.Tensor, wt: torch.Tensor, lbuf: torch.Tensor, fbuf: torch.Tensor) -> torch.Tensor:
    """One row block's logits h W^T (R, V) into the reused buffers, widened to fbuf's dtype (fp32 at least)."""
    n = h.shape[0]
    lg = torch.mm(h, wt, out=lbuf[:n])
    z = fbuf[:n]
    if z is not lg:
        z.copy_(lg)
    return z
