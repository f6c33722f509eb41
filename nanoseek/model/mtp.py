"""Multi-token prediction modules (DeepSeek-V3 section 2.2). Hidden states and logits only: no loss here.

Depth k: h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]), then one full block, then the shared
output head after this module's own norm. The concatenation order [embedding; hidden] is the one the
released checkpoints' eh_proj expects (the paper writes the opposite). Embedding and head are shared
with the main model, so this module holds neither.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.model.config import ModelConfig
from nanoseek.model.layers import RMSNorm, linear


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, block: nn.Module):
        super().__init__()
        self.layer_idx = layer_idx          # its cache slot and checkpoint index (num_hidden_layers + k)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = block
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)   # HF name: shared_head.norm

    def forward(self, h: torch.Tensor, emb_next: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                **attn_kwargs) -> tuple[torch.Tensor, list]:
        """h: (B, T, dim) previous depth's hidden states (main model: before the final norm);
        emb_next: (B, T, dim) embeddings of the tokens one step further. Returns (hidden, routing)."""
        x = linear(torch.cat([self.enorm(emb_next), self.hnorm(h)], dim=-1), self.eh_proj.weight)  # (B, T, dim)
        return self.block(x, cos, sin, **attn_kwargs)
