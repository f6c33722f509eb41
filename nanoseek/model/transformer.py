"""Block and Transformer: embed -> [MLA + (dense MLP | DeepSeekMoE)] x L -> norm -> head, plus MTP modules.

`model(ids)` returns logits (B, T, vocab). With a cache object (see mla.LatentCache plus
`prepare(T) -> (positions, mask)`) the same call decodes incrementally.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from nanoseek.model.config import ModelConfig
from nanoseek.model.layers import MLP, RMSNorm, linear, rope_cis, rope_cos_sin, rope_inv_freq
from nanoseek.model.mla import MLA
from nanoseek.model.moe import Experts, Gate, MoE, Routing
from nanoseek.model.mtp import MTPModule


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, cache=None,
                mask: torch.Tensor | None = None, absorb: bool | None = None,
                moe_reference: bool = False) -> tuple[torch.Tensor, Routing | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache=cache, layer=self.layer_idx, mask=mask, absorb=absorb)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            y, routing = self.ffn(h, reference=moe_reference)
        else:
            y, routing = self.ffn(h), None
        return x + y, routing


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight
        L = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(MTPModule(cfg, L + k, Block(cfg, L + k))
                                 for k in range(cfg.num_nextn_predict_layers))
        # RoPE frequencies live outside the module's buffers so .to(bfloat16) can never round them.
        self._inv_freq, self.rope_attention_factor = rope_inv_freq(cfg)
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}

    # --- init
    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Normal(0, initializer_range) matrices, unit norms, zero biases (V3 uses std 0.006)."""
        std = self.config.initializer_range if std is None else std
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, Experts):
                for p in m.parameters():
                    nn.init.normal_(p, 0.0, std)
            elif isinstance(m, Gate):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    m.bias.zero_()

    # --- rope
    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B|1, T) -> cos, sin (B|1, T, rope/2), fp32."""
        inv = self._inv_freq_on.get(positions.device)
        if inv is None:
            inv = self._inv_freq_on[positions.device] = self._inv_freq.to(positions.device)
        return rope_cos_sin(inv, positions, self.rope_attention_factor)

    # --- forward
    def forward(self, input_ids: torch.Tensor, *, cache=None, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, absorb: bool | None = None, return_hidden: bool = False,
                return_mtp: bool = False, return_routing: bool = False, moe_reference: bool = False,
                logits_at: torch.Tensor | None = None, head: bool = True) -> torch.Tensor | dict[str, Any]:
        """input_ids (B, T) -> logits (B, T, vocab).

        With any return_* flag a dict comes back: logits, hidden (before the final norm),
        mtp_logits (list over depths k=1..D, each (B, T-k, vocab), predicting token i+k+1), routing.
        logits_at (B, K) long: logits only at these positions of each row, (B, K, vocab); a prefill
        needs one per row, and (B, T, vocab) is a gigabyte for a 2k-token chunk at V3's vocabulary.
        head=False: the final-normed hidden states (B, T|K, dim) that the head would multiply take the
        place of every logits tensor (also in "logits" and "mtp_logits"), for a loss that applies the
        head itself one row block at a time (train.losses.linear_cross_entropy).
        """
        B, T = input_ids.shape
        if cache is not None and positions is None:
            positions, mask = cache.prepare(T)
        if positions is None:
            positions = torch.arange(T, device=input_ids.device)[None]
        cos, sin = self.rope(positions)
        if cache is not None:   # attention with a cache rotates q and k together: one complex rotation
            cos, sin = rope_cis(cos, sin), None
        x = self.embed(input_ids)                                         # (B, T, dim)
        routing: list[Routing] = []
        for layer in self.layers:
            x, r = layer(x, cos, sin, cache=cache, mask=mask, absorb=absorb, moe_reference=moe_reference)
            if r is not None:
                routing.append(r)
        logits = self.norm(x if logits_at is None else _rows_at(x, logits_at))   # (B, T|K, dim)
        if head:
            logits = linear(logits, self.head.weight)                     # (B, T|K, vocab)
        if not (return_hidden or return_mtp or return_routing):
            return logits
        out: dict[str, Any] = {"logits": logits, "hidden": x, "routing": routing}
        if return_mtp:
            out["mtp_logits"] = []
            h = x
            for k in range(1, len(self.mtp) + 1):
                # depth k: positions 0..T-k-1 see h^{k-1}_i and the embedding of token i+k
                n = T - k
                if n <= 0:
                    break
                lg, h, r = self.mtp_step(h[:, :n], input_ids[:, k:], depth=k - 1,
                                         positions=positions[:, :n], moe_reference=moe_reference, head=head)
                out["mtp_logits"].append(lg)
                routing.extend(r)
        return out

    def mtp_step(self, h: torch.Tensor, next_ids: torch.Tensor, *, depth: int = 0, cache=None,
                 positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                 absorb: bool | None = None, moe_reference: bool = False, logits_at: torch.Tensor | None = None,
                 head: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[Routing]]:
        """One MTP depth: h (B, T, dim) and the ids one step ahead (B, T) -> (logits, hidden, routing).

        Used by training (no cache) and by speculative decoding (cache slot = the module's layer_idx).
        logits_at (B, K): logits only at these positions, as in forward; head=False as in forward.
        """
        module = self.mtp[depth]
        if positions is None:
            positions = torch.arange(h.shape[1], device=h.device)[None]
        cos, sin = self.rope(positions)
        if cache is not None:
            cos, sin = rope_cis(cos, sin), None
        hk, r = module(h, self.embed(next_ids), cos, sin, cache=cache, mask=mask, absorb=absorb,
                       moe_reference=moe_reference)
        logits = module.norm(hk if logits_at is None else _rows_at(hk, logits_at))   # (B, T|K, dim)
        if head:
            logits = linear(logits, self.head.weight)                     # (B, T|K, vocab)
        return logits, hk, ([r] if r is not None else [])

    # --- HF-format directories (thin: checkpoint.py does the work)
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> "Transformer":
        from nanoseek.checkpoint import load_pretrained
        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 2 * 1024**3,
                        files: dict[str, bytes] | None = None) -> None:
        """An HF directory (see checkpoint.save_pretrained); `files` are written into it with the weights."""
        from nanoseek.checkpoint import save_pretrained
        save_pretrained(self, path, max_shard_bytes=max_shard_bytes, files=files)


def _rows_at(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, T, dim), idx (B, K) -> (B, K, dim)."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def count_parameters(model: Transformer) -> dict[str, int]:
    """Total, MTP and per-token active parameter counts (works on the meta device)."""
    cfg = model.config
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    inactive = 0
    inactive_mtp = 0
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            per_expert = sum(p[0].numel() for p in m.experts.parameters())
            idle = (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
            if name.startswith("mtp."):
                inactive_mtp += idle
            else:
                inactive += idle
    return {"total": main, "active": main - inactive, "mtp": mtp, "mtp_active": mtp - inactive_mtp,
            "embedding": model.embed.weight.numel()}
