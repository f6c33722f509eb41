"""Many decode rows of a tiny model on CPU: the model's absorbed-MLA decode step for B rows in a fraction
of the ops (GRPO rollouts: 64 rows of `tiny` per step).

At these sizes (hidden 64, 8 experts of 32) a decode step is bound by the number of ops and Python calls,
not by arithmetic. `BatchDecoder.step` runs the same math as `Transformer.forward(..., absorb=True)` for
one new token per row with everything prepared once per set of weights:

- RMSNorm weights folded into the matrices that read the normed vector, and the 1/rms row scale applied
  to the product (x W) * rstd(x) (a vector norm, an addcmul and an rsqrt on (B, 1): ~7 us less per
  norm than F.rms_norm, which runs ~8 ops on CPU);
- the absorbed attention folded into the weights: W_UK (and the softmax scale) into the query
  projection, which then yields each head's [q_latent | q_rope] directly; W_UV into W_o, so attention's
  output is one (B, H*c) x (H*c, dim) product added to the residual (addmm);
- q_a|kv_a (or q|kv_a without q_lora) as one matmul; the MoE as one matmul over every routed expert's
  w1|w3, the shared expert's and the gate (forward_dense's math: unchosen experts get weight exactly 0),
  one gate-weight multiply and one matmul over every w2;
- the rows' context in a dense buffer (layers, B, W, c + rope), left-padded so that every row's new
  token goes to the same column: a step writes its latents into one column view (no gather), attention
  reads one strided window per layer, the padding masked by a (B, 1, W) additive bias made once.
  The buffer is gathered from the paged cache when the rows change (a row finishes, joins or is
  preempted); every step also writes its latents into the paged cache (one index_copy_ per tensor for
  all layers), so the paged cache stays the truth and any other path can take over at any step.

`prefill` runs the same folded weights over fresh prompts (B rows of T tokens, padded): attention on the
latents, causal within each row (a real token never sees the padding after it), every layer's latents
written into the paged cache in one index_copy_ per tensor, logits at each row's last real token only.

Applies where the routed experts' dense product is cheap (Experts.DENSE_MAX_FLOPS, as the model's own
choice of forward_dense) and the buffer is small; `step` returns None otherwise (the engine runs the
model). tests/test_batch_rows.py holds the logits to the model's.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nanoseek.model.moe import Experts, MoE
from nanoseek.infer.one_row import OneRowDecoder

_vnorm = torch.linalg.vector_norm


class BatchDecoder:
    MAX_BUFFER_BYTES = 64 << 20

    def __init__(self, model):
        self.model = model
        cfg = self.cfg = model.config
        self.H, self.nope, self.rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.c, self.dim, self.eps = cfg.kv_lora_rank, cfg.hidden_size, cfg.rms_norm_eps
        self._eps_t = torch.tensor(float(cfg.rms_norm_eps))
        self.L = cfg.num_hidden_layers
        self._key: tuple | None = None
        self._params = None
        self._layers: list | None = None
        self._cis: torch.Tensor | None = None          # (positions, rope/2) complex rotations
        self._rows: list | None = None                 # the rows the buffer holds, and their next starts
        self._next: list[int] | None = None
        self.buf: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.t = 0
        self.pos: torch.Tensor | None = None
        self._causal: dict[int, torch.Tensor] = {}
        self._max_rows: int | None = None

    @staticmethod
    def supports(model, cache_dtype: torch.dtype) -> bool:
        """CPU, fp32 weights and latent cache, no attention biases, an MoE whose dense product is cheap."""
        p = next(model.parameters())
        cfg = model.config
        return (p.device.type == "cpu" and p.dtype == torch.float32 and cache_dtype == torch.float32
                and not cfg.attention_bias and cfg.qk_rope_head_dim % 2 == 0 and cfg.kv_lora_rank % 2 == 0)

    def max_rows(self) -> int:
        """The most rows the dense MoE product stays cheap for."""
        if self._max_rows is None:
            cfg = self.cfg
            per_row = 6 * cfg.n_routed_experts * cfg.moe_intermediate_size * cfg.hidden_size
            moe = any(isinstance(b.ffn, MoE) for b in self.model.layers)
            self._max_rows = int(Experts.DENSE_MAX_FLOPS // per_row) if moe else 1 << 30
        return self._max_rows

    _state = OneRowDecoder._state

    # --- packing
    def _ready(self) -> bool:
        """The folded weights for the model's current parameters (repacked when any changed); False
        when the model is not in a state this path takes (see OneRowDecoder._state)."""
        key = self._state()
        if key is None:
            return False
        if key != self._key:
            self._build()
            self._key = key
        return True

    @torch.inference_mode()
    def _build(self) -> None:
        m = self.model
        H, nope, rope, c, D = self.H, self.nope, self.rope, self.c, self.dim
        layers = []
        for blk in m.layers:
            a, f = blk.attn, blk.ffn
            n1 = blk.attn_norm.weight.detach()
            uk, uvt = a._split_wkv_b(a.wkv_b.weight.detach(), torch.float32)     # (H, nope, c), (H, c, v)
            scale = a.softmax_scale
            if a.q_lora_rank is None:
                wq, Qin = a.wq.weight.detach(), D                                 # (H*qk, D)
            else:
                wq, Qin = a.wq_b.weight.detach() * a.q_norm.weight.detach(), a.q_lora_rank
            wq = wq.view(H, nope + rope, Qin)
            q_lat = torch.einsum("hnq,hnc->qhc", wq[:, :nope], uk)                 # (Qin, H, c)
            q_pe = wq[:, nope:].permute(2, 0, 1)                                  # (Qin, H, rope)
            Wq = (torch.cat([q_lat, q_pe], dim=-1) * scale).reshape(Qin, H * (c + rope))
            wkv = a.wkv_a.weight.detach()                                         # (c + rope, D)
            if a.q_lora_rank is None:
                Wa = torch.cat([Wq * n1[:, None], (wkv * n1).t()], dim=1)         # (D, H*(c+rope) + c + rope)
                Wq, sp = None, [H * (c + rope), c, rope]
            else:
                Wa = (torch.cat([a.wq_a.weight.detach(), wkv]) * n1).t()          # (D, Q + c + rope)
                sp = [a.q_lora_rank, c, rope]
            wo = a.wo.weight.detach().view(D, H, -1)                              # (D, H, v)
            Wo = torch.einsum("hcv,dhv->hcd", uvt, wo).reshape(H * c, D)
            n2 = blk.ffn_norm.weight.detach()
            if isinstance(f, MoE):
                ex, g = f.experts, f.gate
                E, inter = ex.w1.shape[0], ex.w1.shape[1]
                sh = f.shared
                w1 = [ex.w1.detach().reshape(E * inter, D)] + ([sh.w1.weight.detach()] if sh is not None else [])
                w3 = [ex.w3.detach().reshape(E * inter, D)] + ([sh.w3.weight.detach()] if sh is not None else [])
                W13 = (torch.cat(w1 + w3 + [g.weight.detach().float()]) * n2).t()
                w2 = [ex.w2.detach().transpose(1, 2).reshape(E * inter, D)] + (
                    [sh.w2.weight.detach().t()] if sh is not None else [])
                W2 = torch.cat(w2)
                A = E * inter + (sh.w1.weight.shape[0] if sh is not None else 0)
                route = (g.E, g.topk, g.n_group, g.topk_group, g.topk_method, g.scoring_func == "sigmoid",
                         g.norm_topk_prob, g.route_scale, g.bias)
                sp_f = [A, A, E]
            else:
                inter = f.w1.weight.shape[0]
                E, A, route = 0, inter, None
                W13 = (torch.cat([f.w1.weight.detach(), f.w3.weight.detach()]) * n2).t()
                W2 = f.w2.weight.detach().t()
                sp_f = [A, A]
            layers.append(dict(Wa=Wa.contiguous(), Wq=None if Wq is None else Wq.contiguous(), sp=sp,
                               kvn=a.kv_norm.weight.detach().clone(), Wo=Wo.contiguous(), W13=W13.contiguous(),
                               W2=W2.contiguous(), sp_f=sp_f, E=E, inter=inter, route=route,
                               Q=a.q_lora_rank))
        self._layers = layers
        self._head = (m.head.weight.detach() * m.norm.weight.detach()).t().contiguous()   # (D, V)
        self._rows = None           # the buffer was computed with other weights' latents: gather again

    def _rotations(self, n: int) -> torch.Tensor:
        if self._cis is None or self._cis.shape[0] < n:
            n = max(n, 1024, 0 if self._cis is None else 2 * self._cis.shape[0])
            cos, sin = self.model.rope(torch.arange(n)[None])                    # (1, n, rope/2)
            self._cis = torch.complex(cos, sin)[0].contiguous()
        return self._cis

    # --- the dense context buffer
    def _gather(self, cache, tables: list[list[int]], starts: list[int], room) -> bool:
        B, L, c, rope = len(tables), self.L, self.c, self.rope
        W0 = max(starts)
        cap = W0 + max(room() if callable(room) else room, 1)
        if L * B * cap * (c + rope) * 4 > self.MAX_BUFFER_BYTES:
            return False
        bs = cache.block_size
        start = np.asarray(starts, dtype=np.int64)
        nblk = -(-W0 // bs)
        table = np.array([tab[:nblk] + [0] * (nblk - len(tab[:nblk])) for tab in tables], dtype=np.int64)
        cols = np.arange(W0)
        p = cols[None, :] - (W0 - start)[:, None]                      # (B, W0) position held by each column
        pad = p < 0
        p = np.where(pad, 0, p)
        slots = np.take_along_axis(table, p // bs, axis=1) * bs + p % bs
        slots[pad] = 0
        idx = torch.from_numpy(slots.reshape(-1))
        if self.buf is None or self.buf.shape[1] != B or self.buf.shape[2] < cap:
            self.buf = torch.zeros(L, B, cap, c + rope)
        buf = self.buf
        buf[:, :, :W0, :c] = cache.kv[:L].index_select(1, idx).view(L, B, W0, c)
        buf[:, :, :W0, c:] = cache.pe[:L].index_select(1, idx).view(L, B, W0, rope)
        bias = np.zeros((B, 1, buf.shape[2]), dtype=np.float32)
        bias[:, 0, :W0][pad] = -np.inf
        self.bias = torch.from_numpy(bias)
        self.t = W0
        self.pos = torch.tensor(starts)
        return True

    # --- the step
    @torch.inference_mode()
    def step(self, tokens: list[int], starts: list[int], tables: list[list[int]], cache, rows: list,
             room: int) -> torch.Tensor | None:
        """Logits (B, vocab) fp32 for tokens[b] at position starts[b] of row b (block table tables[b] in
        the paged `cache`, whose positions < starts[b] are written); the new latents are written into
        the cache. rows: the callers' row objects (identity: whether the buffer still holds them);
        room: how many more steps these rows may take (sizes the buffer), or a function that tells it
        (called only when the buffer is made). None: not this path."""
        B = len(tokens)
        if B > self.max_rows():
            return None
        if not self._ready():
            return None
        if self._rows is None or rows != self._rows or starts != self._next or self.t >= self.buf.shape[2]:
            if not self._gather(cache, tables, starts, room):
                self._rows = None
                return None
            self._rows = list(rows)
        else:
            self.pos += 1
        t = self.t
        self._next = [s + 1 for s in starts]
        H, c, rope = self.H, self.c, self.rope
        half = rope // 2
        cis = self._rotations(max(starts) + 1).index_select(0, self.pos)          # (B, rope/2)
        cis_h = cis[:, None]
        eps_t = self._eps_t
        x = self.model.embed.weight.index_select(0, _longs(tokens))              # (B, D)
        buf, bias = self.buf, self.bias[:, :, :t + 1]
        # every layer's views of this step, made once: column t (written), columns <= t (read)
        col_kv = buf[:, :, t, :c].unbind(0)                                       # (B, c) each
        col_pe = torch.view_as_complex(buf[:, :, t, c:].view(-1, B, half, 2)).unbind(0)   # (B, rope/2)
        keys = buf[:, :, :t + 1]
        keys_t, values = keys.transpose(2, 3).unbind(0), keys[..., :c].unbind(0)  # (B, c+rope, S), (B, S, c)
        for i, L in enumerate(self._layers):
            q, kv, k_pe = _project(x, L, eps_t)
            q = q.view(B, H, c + rope)
            torch.view_as_complex(q[:, :, c:].view(B, H, half, 2)).mul_(cis_h)   # rotate q's rope part
            torch.mul(kv, L["kvn"], out=col_kv[i]).mul_(_rstd(kv, eps_t))
            torch.mul(torch.view_as_complex(k_pe.view(B, half, 2)), cis, out=col_pe[i])
            p = torch.baddbmm(bias, q, keys_t[i]).softmax(dim=-1)                 # (B, H, S)
            o = torch.bmm(p, values[i])                                           # (B, H, c)
            x = torch.addmm(x, o.view(B, H * c), L["Wo"])
            x = _feed_forward(x, L, eps_t)
        # this step's latents into the paged cache, every layer at once
        bs = cache.block_size
        slots = _longs([tab[s // bs] * bs + s % bs for tab, s in zip(tables, starts)])
        nL = self.L
        cache.kv[:nL].index_copy_(1, slots, buf[:, :, t, :c])
        cache.pe[:nL].index_copy_(1, slots, buf[:, :, t, c:])
        self.t = t + 1
        return torch.mm(x, self._head).mul_(_rstd(x, eps_t))

    # --- fresh prompts
    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, lengths: list[int], cache) -> torch.Tensor | None:
        """The model's prefill of fresh prompts (nothing cached before them): ids (B, T), row b's first
        lengths[b] real and the rest padding, the cache bound to these rows (`PagedCache.bind`: its write
        slots, padding into block 0). Writes every layer's latents into the cache and returns the logits
        at each row's last real position (B, 1, vocab); None: not this path.
        The attention is causal over each row's own tokens (a real token never sees the padding after
        it), on the latents (absorbed) as the decode step."""
        B, T = ids.shape
        N = B * T
        if N > 4 * self.max_rows() or getattr(cache, "_write", None) is None or cache._write.numel() != N:
            return None
        if not self._ready():
            return None
        H, c, rope, D, eps, nL = self.H, self.c, self.rope, self.dim, self.eps, self.L
        half = rope // 2
        cis = self._rotations(T)[:T].repeat(B, 1)                                 # (N, rope/2)
        causal = self._causal.get(T)
        if causal is None:       # (T*H, T): query row (t, h) sees keys <= t
            t = torch.arange(T)
            causal = torch.zeros(T, T).masked_fill_(t[None, :] > t[:, None], float("-inf"))
            causal = self._causal[T] = causal.repeat_interleave(H, dim=0)[None]
        lat = torch.empty(nL, N, c + rope)                                         # every layer's latents
        x = self.model.embed.weight.index_select(0, ids.reshape(-1))             # (N, D)
        rms_norm = torch.rms_norm
        for i, L in enumerate(self._layers):
            q, kv, k_pe = _project(x, L, self._eps_t)
            q = q.view(N, H, c + rope)
            torch.view_as_complex(q[:, :, c:].view(N, H, half, 2)).mul_(cis[:, None])
            li = lat[i]
            li[:, :c] = rms_norm(kv, (c,), L["kvn"], eps)
            torch.mul(torch.view_as_complex(k_pe.view(N, half, 2)), cis,
                      out=torch.view_as_complex(li[:, c:].view(N, half, 2)))
            keys = li.view(B, T, c + rope)
            p = torch.baddbmm(causal, q.reshape(B, T * H, c + rope), keys.transpose(1, 2)).softmax(dim=-1)
            o = torch.bmm(p, keys[:, :, :c])                                      # (B, T*H, c)
            x = torch.addmm(x, o.view(N, H * c), L["Wo"])
            x = _feed_forward(x, L, self._eps_t)
        w = cache._write
        cache.kv[:nL].index_copy_(1, w, lat[:, :, :c])
        cache.pe[:nL].index_copy_(1, w, lat[:, :, c:])
        last = torch.tensor([b * T + n - 1 for b, n in enumerate(lengths)])
        x = x.index_select(0, last)
        return torch.mm(rms_norm(x, (D,), None, eps), self._head)[:, None]


def _longs(xs: list[int]) -> torch.Tensor:
    """A list of ints as an int64 tensor (through numpy: ~2 us for 64 against ~11 for torch.tensor)."""
    return torch.from_numpy(np.array(xs, dtype=np.int64))


def _rstd(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """1 / rms(x) per row (N, 1): rms_norm(x) = x * _rstd(x), and rms_norm(x) W = (x W) * _rstd(x)."""
    n = _vnorm(x, dim=-1, keepdim=True)
    return torch.addcmul(eps, n, n, value=1.0 / x.shape[-1]).rsqrt_()


def _project(x: torch.Tensor, L: dict, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, D) -> the attention's inputs: q (N, H*(c+rope)) already [q_latent | q_rope] per head and
    scaled, the latent kv (N, c) before its norm, k_pe (N, rope) before its rotation. eps: 0-dim."""
    y = torch.mm(x, L["Wa"]).mul_(_rstd(x, eps))
    a, kv, k_pe = y.split_with_sizes(L["sp"], -1)
    if L["Wq"] is not None:
        a = torch.mm(a, L["Wq"]).mul_(_rstd(a, eps))
    return a, kv, k_pe


def _feed_forward(x: torch.Tensor, L: dict, eps: torch.Tensor) -> torch.Tensor:
    """x (N, D) -> x + the layer's FFN of rms_norm(x): dense SwiGLU, or every routed expert, the shared
    one and the gate in one matmul (unchosen experts weighted 0) and every w2 in another."""
    y = torch.mm(x, L["W13"]).mul_(_rstd(x, eps))
    if L["E"]:
        a, b, g = y.split_with_sizes(L["sp_f"], -1)
        h = F.silu(a).mul_(b)
        E, inter = L["E"], L["inter"]
        h[:, :E * inter].view(-1, E, inter).mul_(_route(g, L["route"])[:, :, None])   # (N, E, inter)
    else:
        a, b = y.split_with_sizes(L["sp_f"], -1)
        h = F.silu(a).mul_(b)
    return torch.addmm(x, h, L["W2"])


def _route(logits: torch.Tensor, route: tuple) -> torch.Tensor:
    """moe.Gate.forward on (B, E) logits -> the dense (B, E) gate weights (0 off the chosen experts)."""
    E, k, n_group, topk_group, method, sigmoid, norm, scale, bias = route
    scores = logits.sigmoid() if sigmoid else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias
    if n_group > 1 and topk_group < n_group and method != "greedy":
        grouped = choice.view(-1, n_group, E // n_group)
        if method == "noaux_tc":
            gs = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            gs = grouped.amax(dim=-1)
        keep = gs.topk(topk_group, dim=-1).indices
        lose = torch.ones_like(gs, dtype=torch.bool).scatter_(1, keep, False)
        choice = grouped.masked_fill(lose[..., None], float("-inf")).flatten(1)
    idx = choice.topk(k, dim=-1).indices
    w = scores.gather(1, idx)
    if norm:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return torch.zeros_like(scores).scatter_(1, idx, w * scale)
