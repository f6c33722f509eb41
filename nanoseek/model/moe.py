"""DeepSeekMoE: gate (scoring, group-limited top-k, selection bias), routed + shared experts, dispatch.

V3 inference/model.py `Gate` and `MoE`; V2 for softmax scoring and greedy / group_limited_greedy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import ModelConfig
from nanoseek.model.layers import MLP, linear, linears, onednn_cpu, swiglu


@dataclass
class Routing:
    weights: torch.Tensor   # (N, K) gate weights of the chosen experts (scaled)
    indices: torch.Tensor   # (N, K) chosen experts
    scores: torch.Tensor    # (N, E) unbiased scores (sigmoid or softmax), fp32: for the balance loss


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.E = cfg.n_routed_experts
        self.topk = cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.topk_method = cfg.topk_method
        self.scoring_func = cfg.scoring_func
        self.norm_topk_prob = cfg.norm_topk_prob
        self.route_scale = cfg.routed_scaling_factor
        # zeros until Transformer.init_weights (or a checkpoint) sets it: finite, and no draw from the global RNG
        # (a seeded model's init stays what it was)
        self.weight = nn.Parameter(torch.zeros(self.E, cfg.hidden_size))
        # V3's aux-loss-free selection bias: chooses experts, never weights them; fp32, no gradient
        # (updated by the trainer: b_i += gamma * sign(mean load - load_i)).
        if cfg.use_selection_bias:
            self.register_buffer("bias", torch.zeros(self.E, dtype=torch.float32))
        else:
            self.bias = None

    def _apply(self, fn, recurse=True):
        # Keep the selection bias fp32 through .to(bfloat16): gamma=1e-3 updates vanish in bf16.
        super()._apply(fn, recurse)
        if self.bias is not None and self.bias.dtype != torch.float32:
            self.bias = self.bias.float()
        return self

    def forward(self, x: torch.Tensor) -> Routing:
        """x: (N, dim) -> Routing. Logits and scores in fp32 (as V3.2 and HF do)."""
        w = self.weight
        if x.dtype != torch.float32 or w.dtype != torch.float32:
            x, w = x.float(), w.float()
        if torch.is_autocast_enabled(x.device.type):      # autocast would run the product in bf16: keep it fp32
            with torch.autocast(x.device.type, enabled=False):
                logits = F.linear(x, w)
        else:
            logits = F.linear(x, w)                                       # (N, E), fp32 even under bf16
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.bias is None else scores + self.bias      # biased: selection only
        if self.n_group > 1 and self.topk_group < self.n_group and self.topk_method != "greedy":
            grouped = choice.view(-1, self.n_group, self.E // self.n_group)   # (N, G, E/G)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)     # sum of each group's top-2
            else:  # group_limited_greedy (V2): the group's best expert
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices          # (N, topk_group)
            lose = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            # -inf as DeepSeek's reference does; HF's 0.0 lets a losing group win when scores are < 0.
            choice = grouped.masked_fill(lose[..., None], float("-inf")).flatten(1)
        indices = choice.topk(self.topk, dim=-1).indices                  # (N, K)
        weights = scores.gather(1, indices)                               # unbiased scores weight
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(weights * self.route_scale, indices, scores)


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: w1/w3 (E, inter, dim), w2 (E, dim, inter)."""

    def __init__(self, n: int, dim: int, inter: int):
        super().__init__()
        # zeros until Transformer.init_weights (or a checkpoint) sets them: a bare Transformer(cfg) held
        # uninitialized memory here (values up to 1e15); zeros draw nothing from the global RNG
        self.w1 = nn.Parameter(torch.zeros(n, inter, dim))
        self.w2 = nn.Parameter(torch.zeros(n, dim, inter))
        self.w3 = nn.Parameter(torch.zeros(n, inter, dim))

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """w1, w2, w3 (E, ., .), cast once to the autocast dtype under autocast (autocast would cast
        each expert's slice, and autograd cast each slice's gradient back: 2 * 3 * E small copies per layer)."""
        ws = (self.w1, self.w2, self.w3)
        dev = self.w1.device.type
        if torch.is_autocast_enabled(dev) and self.w1.dtype == torch.float32:
            dt = torch.get_autocast_dtype(dev)
            ws = tuple(w.to(dt) for w in ws)
        return ws

    def weights(self) -> tuple[tuple[torch.Tensor, ...], ...]:
        # unbind once per forward: its backward stacks the E gradients in one op. Indexing w1[e] per
        # expert instead makes autograd zero-fill and add a full (E, inter, dim) gradient per expert.
        return tuple(w.unbind(0) for w in self.stacked())

    # forward_dense's extra work (all E experts on every token) is worth paying up to about this many
    # FLOPs (~0.1 ms of one CPU core): below it the layer is bound by its op count (tiny GRPO rollouts:
    # 64 rows of `tiny` per decode step, 0.36 -> 0.21 ms; 8 rows 0.18 -> 0.05 ms, one thread).
    DENSE_MAX_FLOPS = 1.5e7
    # Decoding a batch with 16-bit weights on CPU, the grouped path makes one small weight-bound call
    # per active expert, each with its dtype casts (`small`, bf16, 16 rows: ~145 calls and ~850 casts a
    # step), where dense streams every expert's weights once through two large products: on the AMX
    # VM, 2 threads, `small` bf16 decode 36.6 -> 25.5 ms a step at 16 rows (151 MFLOP a layer by the
    # count below), 29.3 -> 22.3 at 8. In fp32 dense was slower (30.5 -> 40.1 ms at 16 rows).
    DENSE_DECODE_16BIT_MAX_FLOPS = 2e8

    def forward(self, x: torch.Tensor, r: Routing) -> torch.Tensor:
        N, K = r.indices.shape
        no_grad = not torch.is_grad_enabled()
        if no_grad and N * K <= 8:
            return self.forward_few(x, r)
        E, inter, dim = self.w1.shape
        limit = self.DENSE_DECODE_16BIT_MAX_FLOPS if no_grad and onednn_cpu(x) else self.DENSE_MAX_FLOPS
        # dense only when about every expert is active anyway (dense then reads no extra weights)
        if N * K >= E and 6 * N * E * inter * dim <= limit:
            return self.forward_dense(x, r)
        return self.forward_grouped(x, r)

    def forward_few(self, x: torch.Tensor, r: Routing) -> torch.Tensor:
        """Decoding a handful of tokens: run the chosen experts directly on weight views
        (no sort, count, split or cat: a decode step is bound by the number of small ops).
        The gate weights come to the host with the indices (an fp32 value times y is the same
        product whether it is a 0-d tensor or a Python float)."""
        rows = []
        weights = r.weights.to(x.dtype).tolist()
        for n, chosen in enumerate(r.indices.tolist()):                   # one host sync per layer
            xn = x if x.shape[0] == 1 else x[n:n + 1]
            y = None
            for e, wk in zip(chosen, weights[n]):
                yk = swiglu(xn, self.w1.select(0, e), self.w2.select(0, e), self.w3.select(0, e)) * wk
                y = yk if y is None else y + yk
            rows.append(y)
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    def forward_dense(self, x: torch.Tensor, r: Routing) -> torch.Tensor:
        """Every expert on every token, weighted by a dense (N, E) gate matrix that is zero off each
        token's chosen experts: two matmuls, one batched matmul, no dispatch. Costs E/K times the
        routed FLOPs, so it pays only where the number of ops, not arithmetic, bounds the layer
        (small experts and few tokens: tiny models, GRPO rollouts). Unchosen experts get exactly
        zero weight, so outputs and gradients are those of the sparse paths (up to summation order)."""
        E, inter, dim = self.w1.shape
        N = x.shape[0]
        acc = torch.promote_types(x.dtype, torch.float32)                # gate weights and the sum in fp32
        g = torch.zeros(N, E, dtype=acc, device=x.device).scatter(1, r.indices, r.weights.to(acc))
        a, b = (y.view(N, E, inter) for y in linears(x, (self.w1.view(E * inter, dim), self.w3.view(E * inter, dim))))
        h = (F.silu(a) * (b * g[:, :, None])).to(a.dtype)                 # (N, E, inter), zero off the chosen
        return torch.bmm(h.transpose(0, 1), self.w2.transpose(1, 2)).sum(0, dtype=acc)   # (E, N, dim) -> (N, dim)

    def forward_grouped(self, x: torch.Tensor, r: Routing) -> torch.Tensor:
        """Grouped dispatch: sort the (token, slot) pairs by expert, run each active expert once
        on its contiguous slice, scatter-add the weighted results back. x: (N, dim)."""
        N, K = r.indices.shape
        flat = r.indices.flatten()                                        # (N*K,)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.w1.shape[0]).tolist()  # one host sync per layer
        token = order // K                                                # source token of each sorted slot
        acc = torch.promote_types(x.dtype, torch.float32)
        # (N*K, 1) gate weight of each slot, fp32 (bf16 would round the routing weights under autocast)
        gw = r.weights.flatten()[order, None].to(acc)
        if torch.is_grad_enabled() and x.device.type == "cpu":   # (gathers its own padded rows)
            return self._grouped_train(x, r, order, counts, token, gw)
        xs = x.index_select(0, token)                                     # (N*K, dim), grouped by expert
        w1, w2, w3 = self.weights()
        # split (not slicing in a loop): its backward is one cat instead of a zero-fill per expert.
        # The gate weight scales the inter-wide hidden before w2 (linear, so the same sum), not the
        # dim-wide output: fewer elements to multiply, and to reduce for the gate's gradient.
        # (layers.linear(s): F.linear under autograd; packed weights when decoding a batch)
        outs = []
        for e, (chunk, g) in enumerate(zip(xs.split(counts), gw.split(counts))):
            if counts[e]:
                a, b = linears(chunk, (w1[e], w3[e]))
                # back to the matmul dtype: a bf16 model's w2 takes bf16 (autocast would cast it too)
                outs.append(linear((F.silu(a) * (b * g)).to(a.dtype), w2[e]))
        # summed in fp32 at least: x is bf16 under autocast (the norm's output) and a token's K expert
        # outputs, and then the shared expert's, would otherwise be rounded to bf16 after every add
        return x.new_zeros(x.shape, dtype=acc).index_add_(0, token, torch.cat(outs).to(acc))   # (N, dim)

    @staticmethod
    def _padded(c: int) -> int:
        """c rows rounded up to a multiple of 8 .. 64 (an eighth of c's power of two: at most 1/8 more
        rows, ~1/16 on average, and at most 16 row counts per octave)."""
        align = max(8, 1 << max(0, c.bit_length() - 4))
        return -(-c // align) * align

    def _grouped_train(self, x, r, order, counts, token, gw):
        """forward_grouped for training on CPU: every expert's slice padded to `_padded` rows, and w1|w3
        as one (2 inter, dim) matmul per expert.

        oneDNN builds a kernel for each new matmul shape (~0.5 ms on this CPU, a cache of 1024): with
        a token count per expert that changes every step, most of the 9 expert matmuls of every expert
        paid it (in a `small` step the expert matmuls ran at ~120 GFLOP/s, against ~210 for the same
        shapes repeated). Padded counts repeat. A padding row reads token 0 and has gate weight 0, so
        its hidden is exactly 0, its output row is 0 and adds 0 to token 0; its gradients are 0 too
        (dW sums over exact zeros). The fused w1|w3 matmul halves the calls of that layer and makes the
        backward's dx one matmul instead of two and an add."""
        N, K = r.indices.shape
        E, inter, dim = self.w1.shape
        w1, w2, w3 = self.stacked()
        # oneDNN's dtypes only (MKL's fp32 sgemm builds no kernels per shape)
        pad = self._padded if w1.dtype in (torch.bfloat16, torch.float16) else int
        padded = [pad(c) for c in counts]
        shift, start, pstart = [], 0, 0
        for c, p in zip(counts, padded):
            shift.append(pstart - start)
            start, pstart = start + c, pstart + p
        experts = r.indices.flatten()[order]                              # (N*K,) sorted expert ids
        pos = torch.arange(N * K, device=x.device) + torch.tensor(shift, device=x.device)[experts]
        idx = token.new_zeros(pstart).index_copy_(0, pos, token)          # (P,) source token; padding: 0
        gp = gw.new_zeros(pstart, 1).index_copy_(0, pos, gw)              # (P, 1) gate weight; padding: 0
        xs = x.index_select(0, idx)                                       # (P, dim), grouped by expert
        w13 = torch.cat([w1, w3], dim=1).unbind(0)                        # E x (2 inter, dim)
        w2 = w2.unbind(0)                                                 # E x (dim, inter)
        outs = []
        for e, (chunk, g) in enumerate(zip(xs.split(padded), gp.split(padded))):
            if padded[e]:
                a, b = F.linear(chunk, w13[e]).split(inter, dim=-1)       # (p, inter) each
                outs.append(F.linear((F.silu(a) * (b * g)).to(a.dtype), w2[e]))   # (p, dim)
        acc = gw.dtype
        return x.new_zeros(x.shape, dtype=acc).index_add_(0, idx, torch.cat(outs).to(acc))   # (N, dim)

    def forward_reference(self, x: torch.Tensor, r: Routing) -> torch.Tensor:
        """The plain loop over every expert (the reference's shape): tests compare against it."""
        out = x.new_zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32))   # summed in fp32
        for e in range(self.w1.shape[0]):
            tok, slot = (r.indices == e).nonzero(as_tuple=True)
            if tok.numel():
                y = swiglu(x[tok], self.w1[e], self.w2[e], self.w3[e])
                out[tok] += y * r.weights[tok, slot, None].to(out.dtype)
        return out


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared = (MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size)
                       if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor, reference: bool = False) -> tuple[torch.Tensor, Routing]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                      # (N, dim)
        r = self.gate(x)
        y = (self.experts.forward_reference if reference else self.experts)(x, r)
        if self.shared is not None:
            # fp32 sums (see forward_grouped); in place: y is this function's own fresh tensor (an
            # out-of-place fp32 + bf16 add cost a new 8 MB tensor per layer for `small` at 8 x 512)
            y = y.add_(self.shared(x)) if y.dtype == torch.promote_types(y.dtype, x.dtype) else y + self.shared(x)
        if y.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            y = y.to(x.dtype)       # a bf16 model keeps a bf16 residual stream; autocast's stays fp32
        return y.view(shape), r
