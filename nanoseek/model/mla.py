"""Multi-head latent attention (DeepSeek-V2 section 2.1; V3 inference/model.py class MLA).

Two paths, tested equal:
- clear: up-project the latent into per-head K (nope | rope) and V, then scaled_dot_product_attention.
  Used for training and prefill.
- absorbed: fold W_UK into the query and W_UV after the attention, so attention runs directly on
  the cached latent (kv_lora_rank) and the shared rope key (qk_rope_head_dim). Used for decoding;
  the cache holds only those two tensors per token per layer.

The cache is an object passed in (see `LatentCache` below); the module owns no cache buffers.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import ModelConfig
from nanoseek.model.layers import RMSNorm, apply_rope, derived, linear, linears, onednn_cpu
from nanoseek.model.workspace import scratch


class LatentCache(Protocol):
    """What attention needs from a cache (the engine implements it; the model only calls it).

    `update` stores this step's latent (B, T, kv_lora_rank) and rotated rope key (B, T, rope)
    for `layer` and returns everything cached so far for those rows: (B, S, kv_lora_rank), (B, S, rope).
    A cache may also have a `dtype` wider than the model's: attention then computes in it.
    """

    def update(self, layer: int, kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax attention, heads first: q/k (B, H, T, qk), v (B, H, T, v) -> (B, T, H, v), as
    explicit matmuls in cache-sized blocks (see `BlockCausalAttention`). Equals SDPA with is_causal=True."""
    B, H, T, _ = q.shape
    o = BlockCausalAttention.apply(*(t.reshape(B * H, T, t.shape[-1]) for t in (q, k, v)), scale)  # (B*H, T, v)
    return o.view(B, H, T, -1).transpose(1, 2)                            # (B, T, H, v)


class BlockCausalAttention(torch.autograd.Function):
    """Causal attention on CPU (fp32 or bf16), faster than SDPA's fused CPU kernel for training.

    The fused kernel's backward runs at ~20% of the matmul peak here (3x its forward for 2x the FLOPs;
    in bf16 it is 2x slower than this path); plain bmm runs near the peak, but one (B*H, T, T) score
    tensor is far larger than the caches and costs a fresh allocation per op. So: blocks of `QBLOCK`
    query rows against only the keys they may see (skipping the masked upper triangle, ~38% of the
    work at T=512 in 128-row blocks), a few heads at a time so a score block stays ~`BLOCK_BYTES`.
    The probability blocks are kept for the backward while they total at most `KEEP_BYTES` (21 MB per
    layer for `small` at 8 x 512 in bf16): recomputing them costs a score matmul and a softmax per block,
    about a quarter of the backward. Longer sequences recompute them block by block (FlashAttention's
    recomputation) instead of keeping (T, T) per head. q, k: (N, T, qk), v: (N, T, v), contiguous, one dtype.

    bf16 matmuls go through oneDNN, which copies any operand that is not a whole contiguous (or
    transposed) batch of matrices, and a key prefix k[heads, :t1] is not one (its batch stride is
    T rows). Worse, the transposed prefix in the score matmul became a physically transposed copy and a
    slower kernel. So each block's key and value prefixes are copied once into a reused buffer as
    contiguous (heads, t1, d) (in cache; ~5% of the block's matmul time) and enter the matmuls whole.

    bf16: the matmuls run in bf16 (fp32 accumulation) and round their outputs to bf16, as eager
    attention under autocast does; the softmax reads the bf16 scores and normalises in fp32 inside the
    kernel, and delta = rowsum(dO * O) is summed in fp32. The scale is applied by the matmuls (alpha:
    to the fp32 accumulators, before the one rounding) to the scores, dQ and dK.
    """

    # `small`, 8 x 512, bf16 step on the AMX VM, in process: 128 rows and 2 MB -4 to -8% against 64 and
    # 1 MB (fp32 equal; 256 rows or 4-16 MB slower); on the AVX-512 VM 64/128 and 1-4 MB were within noise
    QBLOCK = 128
    BLOCK_BYTES = 2**21           # bytes per score block: heads per block = this // (QBLOCK * T * itemsize)
    KEEP_BYTES = 2**26            # keep the probabilities for the backward up to this many bytes per call

    @staticmethod
    def _blocks(N: int, T: int, itemsize: int, reverse: bool = False):
        """(head slice, t0, t1) per block; reverse: each head group's last query block first (it sees
        every key, so the backward's first block of a group writes dK and dV whole: no zero fill)."""
        b = BlockCausalAttention.QBLOCK
        heads = max(1, BlockCausalAttention.BLOCK_BYTES // (b * T * itemsize))
        starts = range(0, T, b)
        for n0 in range(0, N, heads):
            for t0 in (reversed(starts) if reverse else starts):
                yield slice(n0, n0 + heads), t0, min(t0 + b, T)

    @staticmethod
    def _mask(q: torch.Tensor) -> torch.Tensor:
        return torch.full((BlockCausalAttention.QBLOCK,) * 2, float("-inf"), dtype=q.dtype, device=q.device).triu_(1)

    @staticmethod
    def _prefix(x: torch.Tensor, n: slice, t1: int, buf: torch.Tensor | None) -> torch.Tensor:
        """x[n, :t1] (heads, t1, d), as a contiguous copy in `buf` where bmm would copy it anyway."""
        p = x[n, :t1]
        if buf is None or p.is_contiguous():
            return p
        return buf[: p.numel()].view(p.shape).copy_(p)

    @staticmethod
    def _buffers(q, k, v):
        """Reused prefix buffers for oneDNN's dtypes (bf16/fp16); fp32/fp64 bmm (MKL) reads strided
        batches as they are."""
        if not onednn_cpu(q):
            return None, None
        N, T, _ = q.shape
        heads = min(N, max(1, BlockCausalAttention.BLOCK_BYTES // (BlockCausalAttention.QBLOCK * T * q.element_size())))
        return (scratch("attn-k", (heads * T * k.shape[-1],), k.dtype, k.device),
                scratch("attn-v", (heads * T * v.shape[-1],), v.dtype, v.device))

    @staticmethod
    def _probs(q, k, t0, t1, mask, scale, out):
        """Probabilities of query rows t0..t1 over keys 0..t1, written into out (n, t1-t0, t1)."""
        s = out.baddbmm_(q, k.transpose(1, 2), beta=0, alpha=scale)        # (n, t1-t0, t1) scale * q k^T
        s[:, :, t0:].add_(mask[: t1 - t0, : t1 - t0])                      # causal within the diagonal block
        return torch.ops.aten._softmax.out(s, -1, False, out=s)           # bf16 in, fp32 inside, bf16 out

    @staticmethod
    def forward(ctx, q, k, v, scale):
        N, T, _ = q.shape
        o = q.new_empty(N, T, v.shape[-1])                                # (N, T, v)
        mask = BlockCausalAttention._mask(q)
        b = BlockCausalAttention.QBLOCK
        m = -(-T // b)
        keep = N * b * b * m * (m + 1) // 2 * q.element_size()           # bytes of all probability blocks
        keep = keep <= BlockCausalAttention.KEEP_BYTES and any(ctx.needs_input_grad)
        # one tensor per block (not one buffer for all: a fresh 19 MB block of memory every layer paid
        # ~5k page faults, block-sized ones are reused from the heap)
        ctx.probs = [] if keep else None
        kbuf, vbuf = BlockCausalAttention._buffers(q, k, v)
        for n, t0, t1 in BlockCausalAttention._blocks(N, T, q.element_size()):
            kb = BlockCausalAttention._prefix(k, n, t1, kbuf)
            out = q.new_empty(kb.shape[0], t1 - t0, t1)
            p = BlockCausalAttention._probs(q[n, t0:t1], kb, t0, t1, mask, scale, out)
            torch.bmm(p, BlockCausalAttention._prefix(v, n, t1, vbuf), out=o[n, t0:t1])
            if keep:
                ctx.probs.append(p)
        ctx.save_for_backward(q, k, v, o)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o = ctx.saved_tensors
        probs, ctx.probs = ctx.probs, None
        scale = ctx.scale
        N, T, _ = q.shape
        do = do.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        acc = torch.promote_types(do.dtype, torch.float32)               # summed in fp32 (fp64 stays fp64)
        mask = BlockCausalAttention._mask(q)
        kbuf, vbuf = BlockCausalAttention._buffers(q, k, v)
        m = -(-T // BlockCausalAttention.QBLOCK)
        for j, (n, t0, t1) in enumerate(BlockCausalAttention._blocks(N, T, q.element_size(), reverse=True)):
            whole = 0 if t1 == T else 1                                    # beta: the group's first block writes dK, dV
            kb = BlockCausalAttention._prefix(k, n, t1, kbuf)
            vb = BlockCausalAttention._prefix(v, n, t1, vbuf)
            qb, dob = q[n, t0:t1], do[n, t0:t1]
            if t1 == T:
                # rowsum(dP * P) = rowsum(dO * O) in fp32, per head group (whole-tensor fp32 copies of
                # dO and O were 8 MB each, fresh every layer; per block, 3 small ops per block cost more)
                delta = torch.linalg.vecdot(do[n].to(acc), o[n].to(acc)).neg_().to(do.dtype)   # (n, T) -delta
            if probs is not None:
                p = probs[(j // m) * m + m - 1 - j % m]                    # forward order
            else:
                p = BlockCausalAttention._probs(qb, kb, t0, t1, mask, scale, qb.new_empty(kb.shape[0], t1 - t0, t1))
            dv[n, :t1].baddbmm_(p.transpose(1, 2), dob, beta=whole)      # dV += P^T dO
            # dP - delta = dO V^T - delta, the subtraction in the matmul's epilogue (one rounding, and no
            # separate pass over the block: bf16 elementwise ops cost ~1/3 of this matmul here)
            ds = torch.baddbmm(delta[:, t0:t1, None].expand(-1, -1, t1), dob, vb.transpose(1, 2))
            ds = ds.mul_(p)                                               # dS = P (dP - delta) (w.r.t. scaled scores)
            dq[n, t0:t1].baddbmm_(ds, kb, beta=0, alpha=scale)            # dQ = scale dS K
            dk[n, :t1].baddbmm_(ds.transpose(1, 2), qb, beta=whole, alpha=scale)   # dK += scale dS^T Q
        return dq, dk, dv, None


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope = cfg.qk_nope_head_dim
        self.rope = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.qk_dim = cfg.qk_head_dim
        self.softmax_scale = cfg.softmax_scale
        dim, H = cfg.hidden_size, self.n_heads
        if self.q_lora_rank is None:
            self.wq = nn.Linear(dim, H * self.qk_dim, bias=False)
        else:
            self.wq_a = nn.Linear(dim, self.q_lora_rank, bias=cfg.attention_bias)
            self.q_norm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, H * self.qk_dim, bias=False)
        # wkv_a output is ordered [latent | k_pe]; k_pe is one rope key shared by all heads.
        self.wkv_a = nn.Linear(dim, self.kv_lora_rank + self.rope, bias=cfg.attention_bias)
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        # wkv_b rows are grouped per head as [k_nope | v].
        self.wkv_b = nn.Linear(self.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(H * self.v_dim, dim, bias=cfg.attention_bias)

    def absorb_is_cheaper(self, T: int) -> bool:
        """Per head, absorbed attention costs ~T*S*(2*kv_lora+rope); the clear path pays
        S*kv_lora*(nope+v) to expand the cache plus T*S*(qk+v). Pick the cheaper one."""
        absorbed = T * (2 * self.kv_lora_rank + self.rope)
        clear = self.kv_lora_rank * (self.nope + self.v_dim) + T * (self.qk_dim + self.v_dim)
        return absorbed < clear

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                cache: LatentCache | None = None, layer: int = 0, mask: torch.Tensor | None = None,
                absorb: bool | None = None) -> torch.Tensor:
        """x: (B, T, dim); cos/sin: (B|1, T, rope/2) for the positions of x (with a cache: cos may be
        the complex rotation and sin None, see layers.apply_rope).

        mask: bool (B, T, S), True = may attend; None means plain causal over x (no cache).
        With a cache, `mask` must cover all S cached positions (the engine builds it).
        """
        B, T, _ = x.shape
        H = self.n_heads
        if self.q_lora_rank is None:
            q, kv = linears(x, (self.wq.weight, self.wkv_a.weight), (None, self.wkv_a.bias))
        else:
            q, kv = linears(x, (self.wq_a.weight, self.wkv_a.weight), (self.wq_a.bias, self.wkv_a.bias))
            q = linear(self.q_norm(q), self.wq_b.weight)
        q = q.view(B, T, H, self.qk_dim)                                   # (B, T, H, nope+rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        kv, k_pe = kv.split([self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_norm(kv)                                             # (B, T, kv_lora)
        if cache is None:
            q_pe = apply_rope(q_pe, cos, sin)                             # (B, T, H, rope)
            k_pe = apply_rope(k_pe, cos, sin)                             # (B, T, rope)
        else:
            # inference: the shared rope key rides along as head H+1, one rotation instead of two
            # (a decode step is bound by the number of small ops, not by their size)
            pe = torch.cat([q_pe, k_pe[:, :, None]], dim=2)               # (B, T, H+1, rope)
            # A cache wider than the weights (the engine's fp32 latents for bf16 weights on CPU) keeps
            # the rotation and the absorbed attention in its dtype (see `_absorbed`).
            wide = getattr(cache, "dtype", x.dtype)
            pe = apply_rope(pe if wide == x.dtype else pe.to(wide), cos, sin)
            q_pe, k_pe = pe[:, :, :H], pe[:, :, H]
            kv, k_pe = cache.update(layer, kv, k_pe)                      # (B, S, kv_lora), (B, S, rope)
            if absorb is None:
                absorb = self.absorb_is_cheaper(T)
            if not absorb and kv.dtype != x.dtype:                        # the clear path: the weights' dtype
                q_pe, kv, k_pe = q_pe.to(x.dtype), kv.to(x.dtype), k_pe.to(x.dtype)
        if absorb:
            o = self._absorbed(q_nope, q_pe, kv, k_pe, mask)
            if o.dtype != x.dtype:
                o = o.to(x.dtype)
        else:
            o = self._clear(q_nope, q_pe, kv, k_pe, mask)
        return linear(o.flatten(2), self.wo.weight, self.wo.bias)         # (B, T, dim)

    def _clear(self, q_nope, q_pe, kv, k_pe, mask):
        B, T, H, _ = q_nope.shape
        S = kv.shape[1]
        kv = self.wkv_b(kv).view(B, S, H, self.nope + self.v_dim)         # (B, S, H, nope+v)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        # heads first: one cat writes each of q and k in the layout attention reads (a cat and then
        # a transposed copy made every element twice)
        k = torch.cat([k_nope.transpose(1, 2), k_pe[:, None].expand(B, H, S, self.rope)], dim=-1)  # (B, H, S, qk)
        q = torch.cat([q_nope.transpose(1, 2), q_pe.transpose(1, 2)], dim=-1)                       # (B, H, T, qk)
        v = v.transpose(1, 2)                                             # (B, H, S, v)
        if (mask is None and S == T > 1 and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
                and q.dtype == k.dtype == v.dtype):
            return causal_attention(q, k, v, self.softmax_scale)          # (B, T, H, v)
        # SDPA's fused (flash) kernels want one head dim for q, k and v: zero-pad the smaller side
        # (zeros change neither the scores nor the output; the explicit scale keeps qk_head_dim^-0.5).
        # On CPU this is 2-3x faster than the math fallback that unequal dims get.
        if self.v_dim < self.qk_dim:
            v = F.pad(v, (0, self.qk_dim - self.v_dim))
        elif self.v_dim > self.qk_dim:
            q, k = F.pad(q, (0, self.v_dim - self.qk_dim)), F.pad(k, (0, self.v_dim - self.qk_dim))
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.softmax_scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=self.softmax_scale)
        return o.transpose(1, 2)[..., : self.v_dim]                       # (B, T, H, v)

    def _absorbed(self, q_nope, q_pe, kv, k_pe, mask):
        """Attention on the latents. The cache's dtype is the compute dtype: with fp32 latents for bf16
        weights, fp32 copies of W_UK / W_UV and the bf16 q_nope widened exactly. On CPU that is the
        faster way (bf16 bmm goes through oneDNN at ~20 us a call whatever its size, fp32 bmm through
        MKL at ~6 us) and the more exact one (nothing is rounded to bf16 between the matmuls)."""
        B, T, H, _ = q_nope.shape
        S, c = kv.shape[1], self.kv_lora_rank
        # decoding: bmm copies a strided operand on every call, so keep contiguous copies
        split = None if torch.is_grad_enabled() else derived(
            (self.wkv_b.weight,), f"absorbed-{kv.dtype}", lambda w: self._split_wkv_b(w, kv.dtype))
        if split is None:
            wkv_b = self.wkv_b.weight.view(H, self.nope + self.v_dim, c).to(kv.dtype)
            split = wkv_b[:, : self.nope], wkv_b[:, self.nope:].transpose(1, 2)   # (H, nope, c), (H, c, v)
        w_uk, w_uv_t = split
        if q_nope.dtype != kv.dtype:
            q_nope, q_pe = q_nope.to(kv.dtype), q_pe.to(kv.dtype)
        # per-head matmuls as bmm over heads (einsum would add its own permutes and parsing per call);
        # rows of the score matrix are (head, position) pairs, H*T per sequence
        if T == 1:   # a decode step: every reshape below is a view
            q_lat = torch.bmm(q_nope.squeeze(1).transpose(0, 1), w_uk).transpose(0, 1)   # (B, H, c)
            q_pe = q_pe.squeeze(1)                                        # (B, H, rope)
        else:
            q_lat = torch.bmm(q_nope.flatten(0, 1).transpose(0, 1), w_uk)  # (H, B*T, c)
            q_lat = q_lat.view(H, B, T, c).transpose(0, 1).reshape(B, H * T, c)   # (B, H*T, c)
            q_pe = q_pe.transpose(1, 2).reshape(B, H * T, self.rope)      # (B, H*T, rope)
        # every head shares one key [latent | k_pe]: attention is MQA over a (c + rope)-d key, done as
        # two batched matmuls so the cache is never copied into one concatenated key.
        # The scale stays qk_head_dim^-0.5 (not (c+rope)^-0.5): the dot products are the same numbers.
        scale = self.softmax_scale
        scores = torch.bmm(q_pe, k_pe.transpose(1, 2))                    # (B, H*T, S)
        scores = torch.baddbmm(scores, q_lat, kv.transpose(1, 2), beta=scale, alpha=scale)
        if mask is None and T > 1:
            mask = torch.ones(T, S, dtype=torch.bool, device=kv.device).tril(S - T)[None]
        if mask is not None:
            scores = scores.float().view(B, H, T, S).masked_fill(~mask[:, None], float("-inf")).view(B, H * T, S)
        if scores.dtype == kv.dtype and kv.device.type == "cpu":
            p = scores.softmax(dim=-1)    # CPU's bf16 softmax computes in fp32 and rounds once: one op less
        else:
            p = scores.softmax(dim=-1, dtype=torch.float32).to(kv.dtype)  # (B, H*T, S)
        o_lat = torch.bmm(p, kv)                                          # (B, H*T, c)
        if T == 1:
            o = torch.bmm(o_lat.transpose(0, 1), w_uv_t)                  # (H, B, v)
            return o.transpose(0, 1).unsqueeze(1)                         # (B, 1, H, v)
        o_lat = o_lat.view(B, H, T, c).transpose(0, 1).reshape(H, B * T, c)   # (H, B*T, c)
        o = torch.bmm(o_lat, w_uv_t)                                      # (H, B*T, v)
        return o.view(H, B, T, self.v_dim).permute(1, 2, 0, 3)            # (B, T, H, v)

    def _split_wkv_b(self, w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """wkv_b (H*(nope+v), c) -> contiguous W_UK (H, nope, c) and W_UV^T (H, c, v) in `dtype`."""
        wkv_b = w.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank).to(dtype)
        return wkv_b[:, : self.nope].contiguous(), wkv_b[:, self.nope:].transpose(1, 2).contiguous()
