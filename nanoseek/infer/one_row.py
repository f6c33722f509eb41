"""One decode row on CPU: the model's own math for one token, in about half the ops.

At batch 1 a decode step of a small model is bound by the number of ops and Python calls around its
~70 matrix-vector products, not by their arithmetic. `OneRowDecoder.step` runs the absorbed-MLA
decode step of `Transformer.forward` for one token with everything prepared once per set of weights:

- the matvecs on weights packed for the kernel that streams them fastest: bf16 weights through
  FBGEMM's fp16 GEMV (exact for them, see layers._fp16_pack), fp32 weights through MKL with the weight
  as the tall operand (layers.linear); q_a|kv_a and w1|w3 as one product each (bf16);
- W_UK and W_UV^T contiguous fp32, the norms' weights fp32, activations fp32 throughout (for bf16
  weights that rounds less than the model path, which rounds to bf16 between ops);
- no module calls, masks or casts; routing by the model's own Gate; the engine's paged cache.

Small preset, one thread: ~650 ops a step instead of ~1,200. tests/test_one_row.py holds its logits to
the model's, and the engine's output with it to the output without it.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.modules import module as nn_module

from nanoseek.model import layers
from nanoseek.model.layers import apply_rope, rope_cis
from nanoseek.model.moe import MoE


class OneRowDecoder:
    def __init__(self, model):
        self.model = model
        cfg = self.cfg = model.config
        self.H, self.nope, self.rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.c, self.dim, self.eps = cfg.kv_lora_rank, cfg.hidden_size, cfg.rms_norm_eps
        self._key: tuple | None = None
        self._layers: list | None = None
        self._params: list | None = None
        # Packing bf16 weights takes a while (small preset: 0.4 s, ~65 steps of decoding), so after the
        # weights change (an RL loop's optimizer step) the packs are rebuilt only once the new weights
        # have held still for this many one-row steps; until then the model's forward runs. fp32 packs
        # are views of the weights: rebuilt at once.
        self.patience = 0 if next(model.parameters()).dtype == torch.float32 else 64
        self._seen: tuple | None = None
        self._waited = 0

    @staticmethod
    def supports(model, cache_dtype: torch.dtype) -> bool:
        """CPU, fp32 or bf16 weights (bf16 needs FBGEMM), an fp32 latent cache, no attention biases, and
        packed copies within layers.DERIVED_MAX_BYTES."""
        p = next(model.parameters())
        size = sum(q.numel() * q.element_size() for q in model.parameters())
        return (p.device.type == "cpu" and cache_dtype == torch.float32 and not model.config.attention_bias
                and (p.dtype == torch.float32 or (p.dtype == torch.bfloat16 and layers._FP16_GEMV))
                and size <= layers.DERIVED_MAX_BYTES)

    # --- packing, once per set of weights
    def _state(self) -> tuple | None:
        """The weights' addresses and versions: an optimizer step or a load changes them (the packs are
        rebuilt). None while any module has forward hooks: this step calls no module, so a hook (a
        probe, a profiler, a test's pacing) would be skipped silently; the model's forward runs instead.
        The module and parameter lists are walked once (walking the tree costs ~0.2 ms a step)."""
        if self._params is None:
            self._params = list(self.model.parameters())
            self._modules = list(self.model.modules())
        if (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in self._modules)):
            return None
        return tuple((p.data_ptr(), p._version) for p in self._params)

    def _pack(self, *ws: torch.Tensor):
        """-> what _mvs takes: an fp16 GEMV pack of the concatenated bf16 weights (None if fp16 cannot
        hold them), or the fp32 weights themselves."""
        if ws[0].dtype == torch.float32:
            return ws
        packed = layers._fp16_pack(*ws)
        if packed is None:
            self._packable = False
        return packed, [w.shape[0] for w in ws]

    def _build(self) -> None:
        m, self._layers, self._packable = self.model, [], True
        f32 = lambda w: w.detach().float()        # noqa: E731
        for blk in m.layers:
            a, f = blk.attn, blk.ffn
            L = SimpleNamespace(n1=f32(blk.attn_norm.weight), n2=f32(blk.ffn_norm.weight),
                                kvn=f32(a.kv_norm.weight), idx=blk.layer_idx, moe=isinstance(f, MoE),
                                scale=a.softmax_scale)
            if a.q_lora_rank is None:
                L.qkv, L.qn, L.qb = self._pack(a.wq.weight, a.wkv_a.weight), None, None
            else:
                L.qkv, L.qn, L.qb = (self._pack(a.wq_a.weight, a.wkv_a.weight), f32(a.q_norm.weight),
                                     self._pack(a.wq_b.weight))
            L.wo = self._pack(a.wo.weight)
            L.uk, L.uvt = a._split_wkv_b(a.wkv_b.weight.detach(), torch.float32)   # (H, nope, c), (H, c, v)
            dense = f.shared if L.moe else f
            L.s13 = None if dense is None else self._pack(dense.w1.weight, dense.w3.weight)
            L.s2 = None if dense is None else self._pack(dense.w2.weight)
            if L.moe:
                L.gate, ex = f.gate, f.experts
                L.e13 = [self._pack(ex.w1[e], ex.w3[e]) for e in range(ex.w1.shape[0])]
                L.e2 = [self._pack(ex.w2[e]) for e in range(ex.w2.shape[0])]
            self._layers.append(L)
        self._norm, self._head = f32(m.norm.weight), self._pack(m.head.weight)
        if not self._packable:
            self._layers = None        # a bf16 weight fp16 cannot hold: the model path runs instead

    @staticmethod
    def _mvs(x: torch.Tensor, pack) -> list[torch.Tensor]:
        """x (1, in) fp32 -> one (1, out_i) fp32 product per packed weight."""
        if isinstance(pack[0], torch.Tensor):           # fp32 weights: y^T = W x^T (see layers.linear)
            return [y.view(1, -1) for y in layers.tall_mm(x, pack)]
        y = torch.ops.quantized.linear_dynamic_fp16(x, pack[0])
        return [y] if len(pack[1]) == 1 else list(y.split(pack[1], dim=-1))

    # --- the step
    @torch.no_grad()
    def step(self, token: int, positions: torch.Tensor, cache) -> torch.Tensor | None:
        """Logits (1, vocab) fp32 for `token` at positions (1, 1), the cache bound to this one row (the
        engine's `_bind`); None when these weights cannot take this path (the caller runs the model)."""
        key = self._state()
        if key is None:
            return None
        if key != self._key:
            if key != self._seen:
                self._seen, self._waited = key, 0
            self._waited += 1
            if self._waited <= self.patience:
                return None
            self._build()
            self._key = key
        if self._layers is None:
            return None
        m, mvs, eps, D = self.model, self._mvs, self.eps, self.dim
        H, nope, rope, c = self.H, self.nope, self.rope, self.c
        rot = rope_cis(*m.rope(positions))                              # (1, 1, 1, rope/2) complex
        x = m.embed.weight[token].float().view(1, D)
        for L in self._layers:
            h = F.rms_norm(x, (D,), L.n1, eps)
            if L.qb is None:
                q, kv = mvs(h, L.qkv)
            else:
                qa, kv = mvs(h, L.qkv)
                q = mvs(F.rms_norm(qa, (qa.shape[-1],), L.qn, eps), L.qb)[0]
            q_nope, q_pe = q.view(H, nope + rope).split([nope, rope], dim=-1)
            kv, k_pe = kv.split([c, rope], dim=-1)
            pe = apply_rope(torch.cat([q_pe, k_pe]).view(1, 1, H + 1, rope), rot, None)[0, 0]   # (H+1, rope)
            kv_s, pe_s = cache.update(L.idx, F.rms_norm(kv, (c,), L.kvn, eps).view(1, 1, c), pe[H:].view(1, 1, rope))
            kv_s, pe_s = kv_s[0], pe_s[0]                               # (S, c), (S, rope)
            q_lat = torch.bmm(q_nope.view(H, 1, nope), L.uk).view(H, c)
            scores = torch.addmm(torch.mm(pe[:H], pe_s.t()), q_lat, kv_s.t(), beta=L.scale, alpha=L.scale)  # (H, S)
            o = torch.bmm(torch.mm(scores.softmax(dim=-1), kv_s).view(H, 1, c), L.uvt)     # (H, 1, v)
            x = x + mvs(o.view(1, -1), L.wo)[0]
            h = F.rms_norm(x, (D,), L.n2, eps)
            y = None
            if L.s13 is not None:
                a, b = mvs(h, L.s13)
                y = mvs(F.silu(a) * b, L.s2)[0]
            if L.moe:
                r = L.gate(h)
                for e, w in zip(r.indices[0].tolist(), r.weights[0].tolist()):   # one host sync per layer
                    a, b = mvs(h, L.e13[e])
                    ye = mvs(F.silu(a) * b, L.e2[e])[0] * w
                    y = ye if y is None else y + ye
            x = x + y
        return mvs(F.rms_norm(x, (D,), self._norm, eps), self._head)[0]
