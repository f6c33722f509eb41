"""One decode row on CPU: the model's own math for one token, in about a third of the ops (and a few
rows of one sequence, for MTP speculation's verify step).

At batch 1 a decode step of a small model is bound by the number of ops and Python calls around its
~70 matrix-vector products, not by their arithmetic. `OneRowDecoder.step` runs the absorbed-MLA
decode step of `Transformer.forward` for one token with everything prepared once per set of weights:

- the matvecs on weights packed for the kernel that streams them fastest: bf16 weights through
  FBGEMM's fp16 GEMV (exact for them, see layers._fp16_pack), fp32 weights through MKL with the weight
  as the tall operand (layers.tall_mm) where this CPU runs that faster (layers.tall_mm_is_faster);
  weights that read the same input as one pack: q_a|kv_a, w1|w3, and the MoE gate with the shared
  expert's w1|w3;
- RMSNorm as one vector_norm read to the host: its weight multiplies the input, the 1/rms scalar
  goes where it costs nothing (the query norm's into the softmax scale, the latent norm's into the
  cache write), instead of the ~8 kernels of F.rms_norm;
- RoPE as one small matmul by the step's rotation matrix (the same position in every layer), the
  rotated key written straight into the cache; q's rows packed nope-first so every view is contiguous;
- MoE routing (scores, selection bias, group-limited top-k) on the host from the gate's E logits:
  ~10 us of Python instead of ~15 small ops (~50 us) per layer;
- W_UK and W_UV^T contiguous fp32, activations fp32 throughout (for bf16 weights that rounds less
  than the model path, which rounds to bf16 between ops); no module calls, masks or casts.

Small preset, bf16, one thread: ~430 ops and ~3 ms a step (the model's forward: ~1,200 ops). `verify`
and `mtp` run T rows of one sequence (main model, MTP block) with plain norms, per-row rotations and a
causal mask: the engine's speculative step at batch 1. tests/test_one_row.py holds the logits to the
model's, the routing to moe.Gate's, and the engine's output with it to the output without it;
tests/test_engine.py the speculative path's tokens and drafts to the model path's.
"""

from __future__ import annotations

import math
import operator
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.modules import module as nn_module

from nanoseek.model import layers
from nanoseek.model.moe import Gate, MoE

_vnorm = torch.linalg.vector_norm
_version = operator.attrgetter("_version")
_data_ptr = torch.Tensor.data_ptr
_gemv = layers._FP16_LINEAR if layers._FP16_GEMV else None      # (x, packed, bias): see layers.fp16_gemv


class OneRowDecoder:
    def __init__(self, model):
        self.model = model
        cfg = self.cfg = model.config
        self.H, self.nope, self.rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.c, self.dim, self.eps = cfg.kv_lora_rank, cfg.hidden_size, cfg.rms_norm_eps
        self._key: tuple | None = None
        self._layers: list | None = None
        self._params: list | None = None
        # Packing takes a while (small preset, one thread: bf16 0.5 s, ~65 steps of decoding; fp32, whose
        # packs are concatenated copies, 0.11 s, ~13 steps), so after the weights change (an RL loop's
        # optimizer step) the packs are rebuilt only once the new weights have held still for about as
        # many one-row steps as the packing costs; until then the model's forward runs.
        self.patience = 16 if next(model.parameters()).dtype == torch.float32 else 64
        self._seen: tuple | None = None
        self._waited = 0
        self._rot_vals: torch.Tensor | None = None      # (positions, 2 * rope): the rotation's entries

    @staticmethod
    def supports(model, cache_dtype: torch.dtype) -> bool:
        """CPU, fp32 or bf16 weights (bf16 needs FBGEMM), an fp32 latent cache, no attention biases, a
        non-rope part in the query (qk_nope_head_dim > 0: the packing folds W_UK into it), and packed
        copies within layers.DERIVED_MAX_BYTES."""
        p = next(model.parameters())
        size = sum(q.numel() * q.element_size() for q in model.parameters())
        return (p.device.type == "cpu" and cache_dtype == torch.float32 and not model.config.attention_bias
                and model.config.qk_nope_head_dim > 0
                and (p.dtype == torch.float32 or (p.dtype == torch.bfloat16 and layers._FP16_GEMV))
                and size <= layers.DERIVED_MAX_BYTES)

    # --- packing, once per set of weights
    def _state(self) -> tuple | None:
        """The weights' (and the gates' selection biases') addresses and versions: an optimizer step,
        a bias update or a load changes them (the packs are rebuilt). None while any module has forward
        hooks: this step calls no module, so a hook (a probe, a profiler, a test's pacing) would be
        skipped silently; the model's forward runs instead. The tensors and every module's hook dicts
        are listed once and read with C-level maps (~35 us a step for the small preset; walking the
        module tree costs ~0.2 ms)."""
        if self._params is None:
            mods = list(self.model.modules())
            self._hook_dicts = [d for m in mods for d in (m._forward_hooks, m._forward_pre_hooks)]
            self._params = list(self.model.parameters()) + [
                m.bias for m in mods if isinstance(m, Gate) and m.bias is not None]
        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks or any(self._hook_dicts):
            return None
        return (*map(_data_ptr, self._params), *map(_version, self._params))

    def _pack(self, *ws: torch.Tensor):
        """The weights as one matrix for `_mv`: an fp16 GEMV pack of the concatenated bf16 weights, or
        the fp32 weights (concatenated if several). None (the model path runs) if fp16 cannot hold them
        or a weight's dtype is not the model's."""
        if any(w.dtype != (torch.float32 if self._fp32 else torch.bfloat16) for w in ws):
            self._packable = False
            return None
        if self._fp32:
            return (ws[0] if len(ws) == 1 else torch.cat(ws)).detach().contiguous()
        packed = layers._fp16_pack(*ws)
        if packed is None:
            self._packable = False
        return packed

    def _build(self) -> None:
        m, self._packable = self.model, True
        self._fp32 = next(m.parameters()).dtype == torch.float32
        self._tall = self._fp32 and layers.tall_mm_is_faster()     # W as the tall operand (layers.linear)
        rope = self.rope
        f32 = lambda w: w.detach().float()        # noqa: E731
        self._layers = [self._pack_block(blk) for blk in m.layers]
        self._mtp_packed = None                   # the MTP block's packs: made at the first speculative step
        self._norm, self._head = f32(m.norm.weight), self._pack(m.head.weight)
        # the rotation x -> x R of adjacent pairs (x[2i], x[2i+1]) by angle a_i: R[2i, 2i] = R[2i+1, 2i+1]
        # = cos a_i, R[2i, 2i+1] = sin a_i, R[2i+1, 2i] = -sin a_i; the other entries stay 0
        i = torch.arange(0, rope, 2)
        self._rot_idx = torch.cat([i * rope + i, (i + 1) * rope + i, i * rope + i + 1, (i + 1) * rope + i + 1])
        self._rot = torch.zeros(rope, rope)
        self._zeros_c, self._zeros_pe = torch.zeros(1, self.c), torch.zeros(1, rope)
        if not self._packable:
            self._layers = None        # a bf16 weight fp16 cannot hold: the model path runs instead

    def _pack_block(self, blk) -> SimpleNamespace:
        H, nope, rope = self.H, self.nope, self.rope
        f32 = lambda w: w.detach().float()        # noqa: E731

        def nope_first(w):    # (H*(nope+rope), in) -> rows [every head's nope | every head's rope]
            w = w.detach().view(H, nope + rope, -1)
            return w[:, :nope].reshape(H * nope, -1), w[:, nope:].reshape(H * rope, -1)

        a, f = blk.attn, blk.ffn
        L = SimpleNamespace(n1=f32(blk.attn_norm.weight), n2=f32(blk.ffn_norm.weight),
                            kvn=f32(a.kv_norm.weight), idx=blk.layer_idx, moe=isinstance(f, MoE),
                            scale=a.softmax_scale)
        if a.q_lora_rank is None:
            L.qkv, L.Q, L.qn, L.qb = self._pack(*nope_first(a.wq.weight), a.wkv_a.weight), 0, None, None
        else:
            L.qkv, L.Q = self._pack(a.wq_a.weight, a.wkv_a.weight), a.q_lora_rank
            L.qn, L.qb = f32(a.q_norm.weight), self._pack(*nope_first(a.wq_b.weight))
        L.wo = self._pack(a.wo.weight)
        L.uk, L.uvt = a._split_wkv_b(a.wkv_b.weight.detach(), torch.float32)   # (H, nope, c), (H, c, v)
        shared = f.shared if L.moe else f
        if L.moe:
            g = f.gate
            L.E, L.inter = g.E, f.experts.w1.shape[1]
            L.route = (g.E, g.topk, g.n_group, g.topk_group, g.topk_method, g.scoring_func == "sigmoid",
                       g.norm_topk_prob, g.route_scale, None if g.bias is None else g.bias.tolist())
            # the gate reads the same input as the shared expert: one product (fp32 logits either way),
            # its rows last so that one split gives w1's, w3's and the gate's outputs
            L.g13 = self._pack(g.weight) if shared is None else self._pack(shared.w1.weight, shared.w3.weight,
                                                                         g.weight)
            ex = f.experts
            L.e13 = [self._pack(ex.w1[e], ex.w3[e]) for e in range(ex.w1.shape[0])]
            L.e2 = [self._pack(ex.w2[e]) for e in range(ex.w2.shape[0])]
        else:
            L.E, L.g13, L.s13 = 0, None, self._pack(shared.w1.weight, shared.w3.weight)
        L.s_inter = 0 if shared is None else shared.w1.weight.shape[0]
        L.s2 = None if shared is None else self._pack(shared.w2.weight)
        # split sizes, made once (Tensor.split is a Python wrapper around split_with_sizes)
        L.sp_qkv = [H * (nope + rope) if L.qb is None else L.Q, self.c, rope]
        L.sp_q, L.sp_s, L.sp_e = [H * nope, H * rope], [L.s_inter] * 2, [getattr(L, "inter", 0)] * 2
        L.sp_g = [L.s_inter, L.s_inter, L.E]
        return L

    def _rotation(self, pos: int) -> torch.Tensor:
        """(rope, rope) fp32: x -> x R rotates a rope row for position `pos` as layers.apply_rope does
        (cos/sin from the model's own `rope`, a table of them made once for a run of positions)."""
        vals = self._rot_vals
        if vals is None or pos >= vals.shape[0]:
            n = max(1024, 2 * pos + 1)
            cos, sin = self.model.rope(torch.arange(n)[None])              # (1, n, rope/2) each
            vals = self._rot_vals = torch.cat([cos, -sin, sin, cos], dim=-1)[0]   # (n, 2 * rope)
        self._rot.view(-1).index_copy_(0, self._rot_idx, vals[pos])
        return self._rot

    def _mv(self, x: torch.Tensor, pack) -> torch.Tensor:
        """x (1, in) fp32 -> x W^T (1, out) fp32 (fp32: a strided view, see layers.tall_mm; a small
        weight, bound by the op count, as one F.linear: tiny preset, 64 x 64, 5 ops -> 1)."""
        if self._fp32:
            if pack.numel() <= 32768 or not self._tall:
                return F.linear(x, pack)
            return torch.mm(pack, torch.cat([x, x]).t())[:, :1].t()
        return _gemv(x, pack, None)

    def _ready(self) -> bool:
        """Whether the packs match the weights now (built here once they have held still long enough)."""
        key = self._state()
        if key is None:
            return False
        if key != self._key:
            if key != self._seen:
                self._seen, self._waited = key, 0
            self._waited += 1
            if self._waited <= self.patience:
                return False
            self._build()
            self._key = key
        return self._layers is not None

    # --- the step
    @torch.no_grad()
    def step(self, token: int, position, cache) -> torch.Tensor | None:
        """Logits (1, vocab) fp32 for `token` at `position` (an int, or a (1, 1) tensor), the cache bound
        to this one row (the engine's `_bind` / `PagedCache.bind_one`, or a cache's `prepare(1)`); None
        when these weights cannot take this path (the caller runs the model)."""
        if not self._ready():
            return None
        if not isinstance(position, int):
            position = int(position.reshape(-1)[0])
        mv, eps, D = self._mv, self.eps, self.dim
        H, nope, rope, c = self.H, self.nope, self.rope, self.c
        rot = self._rotation(position)                                   # (rope, rope)
        span = getattr(cache, "_span", None)
        if span is not None:                # the paged cache, this row's slots consecutive: written in place
            first, w, S = span
            kv_w, pe_w = cache.kv[:, w:w + 1].unbind(0), cache.pe[:, w:w + 1].unbind(0)            # (1, c|rope)
            kv_r, pe_r = cache.kv[:, first:first + S].unbind(0), cache.pe[:, first:first + S].unbind(0)   # (S, .)
        x = self.model.embed.weight[token].view(1, D).float()
        for L in self._layers:
            # --- attention. RMSNorm: y = W (x * n1) / rms(x); the 1/rms scalar r is carried into the
            # query and latent norms (exactly: rms(r a) from r and |a|), the softmax scale and the rope key
            r = 1.0 / math.sqrt(_vnorm(x).item() ** 2 / D + eps)
            r2 = r * r
            y = mv(x * L.n1, L.qkv)                                     # (1, Q + c + rope), times 1/r
            if L.qb is None:
                q, kv, k_pe = y.split_with_sizes(L.sp_qkv, -1)
                alpha = L.scale * r
            else:
                qa, kv, k_pe = y.split_with_sizes(L.sp_qkv, -1)
                q = mv(qa * L.qn, L.qb)                                 # (1, H*(nope+rope)), times 1/(r r_q)
                alpha = L.scale * r / math.sqrt(r2 * _vnorm(qa).item() ** 2 / L.Q + eps)
            q_nope, q_pe = q.split_with_sizes(L.sp_q, -1)
            r_kv = r / math.sqrt(r2 * _vnorm(kv).item() ** 2 / c + eps)
            if span is not None:
                i = L.idx
                torch.addcmul(self._zeros_c, kv, L.kvn, value=r_kv, out=kv_w[i])   # rms_norm(kv) * kvn
                torch.addmm(self._zeros_pe, k_pe, rot, beta=0, alpha=r, out=pe_w[i])   # the rotated rope key
                kv_s, pe_s = kv_r[i], pe_r[i]                           # (S, c), (S, rope)
            else:
                kv_s, pe_s = cache.update(L.idx, torch.addcmul(self._zeros_c, kv, L.kvn, value=r_kv).view(1, 1, c),
                                          torch.addmm(self._zeros_pe, k_pe, rot, beta=0, alpha=r).view(1, 1, rope))
                kv_s, pe_s = kv_s[0], pe_s[0]
            q_lat = torch.bmm(q_nope.view(H, 1, nope), L.uk).view(H, c)
            scores = torch.addmm(F.linear(torch.mm(q_pe.view(H, rope), rot), pe_s), q_lat, kv_s.t(),
                                 beta=alpha, alpha=alpha)                # (H, S)
            o = torch.bmm(torch.mm(scores.softmax(dim=-1), kv_s).view(H, 1, c), L.uvt)   # (H, 1, v)
            x = x + mv(o.view(1, -1), L.wo)
            # --- feed-forward
            r = 1.0 / math.sqrt(_vnorm(x).item() ** 2 / D + eps)
            h = torch.mul(x, L.n2).mul_(r)
            if L.moe:
                y = None
                if L.s_inter:
                    a, b, g = mv(h, L.g13).split_with_sizes(L.sp_g, -1)    # shared w1, w3; gate logits (1, E)
                    y = mv(F.silu(a) * b, L.s2)
                else:
                    g = mv(h, L.g13)
                for e, we in _route(g.tolist()[0], L.route):
                    a, b = mv(h, L.e13[e]).split_with_sizes(L.sp_e, -1)
                    ye = mv(F.silu(a) * b, L.e2[e])
                    y = ye.mul_(we) if y is None else y.add_(ye, alpha=we)
            else:
                a, b = mv(h, L.s13).split_with_sizes(L.sp_s, -1)
                y = mv(F.silu(a) * b, L.s2)
            x = x + y
        r = 1.0 / math.sqrt(_vnorm(x).item() ** 2 / D + eps)
        return mv(torch.mul(x, self._norm).mul_(r), self._head)

    # --- a few rows of one sequence: MTP speculation's verify step (2 rows) and the MTP block after it
    @torch.no_grad()
    def verify(self, tokens: list[int], start: int, cache) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The model's forward for tokens at positions start.. of one sequence (the cache bound to those
        rows: `PagedCache.bind`): (logits (T, vocab), hidden (T, dim) before the final norm), fp32; None
        when these weights cannot take this path."""
        if not self._ready():
            return None
        D = self.dim
        x = self._rows(self.model.embed.weight[tokens].float(), start, cache, self._layers)     # (T, D)
        return self._mvn(F.rms_norm(x, (D,), self._norm, self.eps), self._head), x

    @torch.no_grad()
    def mtp(self, h: torch.Tensor, next_ids: list[int], start: int, cache) -> torch.Tensor | None:
        """Transformer.mtp_step at depth 0 for rows of one sequence (after `verify` in the same step, the
        cache bound to these rows): h (T, dim), the ids one step ahead -> logits (1, vocab) of the last
        row; None where the MTP block cannot be packed."""
        if self._layers is None:
            return None
        if self._mtp_packed is None:
            mt, f32 = self.model.mtp[0], (lambda w: w.detach().float())
            blk = self._pack_block(mt.block)
            self._mtp_packed = (blk, f32(mt.enorm.weight), f32(mt.hnorm.weight), self._pack(mt.eh_proj.weight),
                                f32(mt.norm.weight)) if self._packable else False
        if self._mtp_packed is False:
            return None
        blk, en, hn, eh, norm = self._mtp_packed
        D, eps = self.dim, self.eps
        e = self.model.embed.weight[next_ids].float()                                  # (T, D)
        x = self._mvn(torch.cat([F.rms_norm(e, (D,), en, eps), F.rms_norm(h.float(), (D,), hn, eps)], -1), eh)
        x = self._rows(x, start, cache, [blk])
        return self._mvn(F.rms_norm(x[-1:], (D,), norm, eps), self._head)

    def _mvn(self, x: torch.Tensor, pack) -> torch.Tensor:
        """_mv for x (T, in) fp32, any few rows."""
        if x.shape[0] == 1:
            return self._mv(x, pack)
        if self._fp32:
            return (F.linear(x, pack) if pack.numel() <= 32768 or not self._tall
                    else torch.mm(pack, x.contiguous().t()).t())
        return _gemv(x.contiguous(), pack, None)

    def _rows(self, x: torch.Tensor, start: int, cache, blocks: list) -> torch.Tensor:
        """`blocks` on x (T, dim) fp32 at positions start .. start+T-1 of one sequence: the model's math
        with plain F.rms_norm, per-row rotations and a causal mask among the T new positions."""
        mv, eps, D = self._mvn, self.eps, self.dim
        H, nope, rope, c = self.H, self.nope, self.rope, self.c
        T = x.shape[0]
        self._rotation(start + T - 1)                                   # the table reaches start + T - 1
        rots = torch.zeros(T, rope * rope).index_copy_(1, self._rot_idx, self._rot_vals[start:start + T])
        rots = rots.view(T, rope, rope)                                 # (T, rope, rope)
        S = start + T
        masked = torch.arange(S) > torch.arange(start, S)[:, None] if T > 1 else None   # (T, S): a later key
        span = getattr(cache, "_span", None)
        if span is not None:
            first, w, _ = span
            kv_w, pe_w = cache.kv[:, w:w + T].unbind(0), cache.pe[:, w:w + T].unbind(0)          # (T, c|rope)
            kv_r, pe_r = cache.kv[:, first:first + S].unbind(0), cache.pe[:, first:first + S].unbind(0)
        def rms_norm(x, w):     # F.rms_norm in 5 small ops instead of ~8 (the row norms read to the host)
            n = x.shape[-1]
            r = torch.tensor([1.0 / math.sqrt(v * v / n + eps) for v in _vnorm(x, dim=-1).tolist()])
            return torch.mul(x, w).mul_(r.view(-1, 1))

        for L in blocks:
            h = rms_norm(x, L.n1)
            y = mv(h, L.qkv)
            if L.qb is None:
                q, kv, k_pe = y.split_with_sizes(L.sp_qkv, -1)
            else:
                qa, kv, k_pe = y.split_with_sizes(L.sp_qkv, -1)
                q = mv(rms_norm(qa, L.qn), L.qb)
            q_nope, q_pe = q.split_with_sizes(L.sp_q, -1)       # (T, H*nope), (T, H*rope)
            kv = rms_norm(kv, L.kvn)                                     # (T, c)
            k_pe = torch.bmm(k_pe.reshape(T, 1, rope), rots).view(T, rope)
            if span is not None:
                kv_w[L.idx].copy_(kv)
                pe_w[L.idx].copy_(k_pe)
                kv_s, pe_s = kv_r[L.idx], pe_r[L.idx]                   # (S, c), (S, rope)
            else:
                kv_s, pe_s = cache.update(L.idx, kv.view(1, T, c), k_pe.view(1, T, rope))
                kv_s, pe_s = kv_s[0], pe_s[0]
            # rows of the scores are (head, new position) pairs
            q_lat = torch.bmm(q_nope.reshape(T, H, nope).transpose(0, 1), L.uk).view(H * T, c)
            q_pe = torch.bmm(q_pe.reshape(T, H, rope), rots).transpose(0, 1).reshape(H * T, rope)
            scores = torch.addmm(F.linear(q_pe, pe_s), q_lat, kv_s.t(), beta=L.scale, alpha=L.scale)   # (H*T, S)
            if masked is not None:
                scores = scores.view(H, T, S).masked_fill_(masked, float("-inf")).view(H * T, S)
            o = torch.bmm(torch.mm(scores.softmax(dim=-1), kv_s).view(H, T, c), L.uvt)   # (H, T, v)
            x = x + mv(o.transpose(0, 1).reshape(T, -1), L.wo)
            h = rms_norm(x, L.n2)
            if L.moe:
                if L.s_inter:
                    a, b, g = mv(h, L.g13).split_with_sizes(L.sp_g, -1)
                    y = mv(F.silu(a) * b, L.s2)
                else:
                    g, y = mv(h, L.g13), torch.zeros_like(x)
                for t, logits in enumerate(g.tolist()):
                    ht, yt = h[t:t + 1], y[t:t + 1]
                    for e, we in _route(logits, L.route):
                        a, b = self._mv(ht, L.e13[e]).split_with_sizes(L.sp_e, -1)
                        yt.add_(self._mv(F.silu(a) * b, L.e2[e]), alpha=we)
            else:
                a, b = mv(h, L.s13).split_with_sizes(L.sp_s, -1)
                y = mv(F.silu(a) * b, L.s2)
            x = x + y
        return x


def _route(logits: list[float], route: tuple) -> list[tuple[int, float]]:
    """moe.Gate.forward for one row, on the host: [(expert, weight)] from the E gate logits."""
    E, k, n_group, topk_group, method, sigmoid, norm, scale, bias = route
    if sigmoid:
        scores = [1.0 / (1.0 + math.exp(-v)) if v > -700 else 0.0 for v in logits]
    else:
        top = max(logits)
        ex = [math.exp(v - top) for v in logits]
        tot = sum(ex)
        scores = [v / tot for v in ex]
    choice = scores if bias is None else [s + b for s, b in zip(scores, bias)]
    experts = range(E)
    if n_group > 1 and topk_group < n_group and method != "greedy":
        n = E // n_group
        groups = [choice[i * n:(i + 1) * n] for i in range(n_group)]
        if method == "noaux_tc":                      # sum of each group's top-2
            gs = [sum(sorted(grp, reverse=True)[:2]) for grp in groups]
        else:                                         # group_limited_greedy: the group's best expert
            gs = [max(grp) for grp in groups]
        keep = sorted(range(n_group), key=gs.__getitem__, reverse=True)[:topk_group]
        experts = [i * n + j for i in sorted(keep) for j in range(n)]
    chosen = sorted(experts, key=choice.__getitem__, reverse=True)[:k]
    w = [scores[e] for e in chosen]
    if norm:
        tot = sum(w) + 1e-20
        w = [v / tot for v in w]
    return [(e, v * scale) for e, v in zip(chosen, w)]
