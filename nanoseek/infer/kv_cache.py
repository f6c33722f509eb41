"""Latent KV caches for MLA: only the normalized latent (kv_lora_rank) and the rotated shared rope key
(qk_rope_head_dim) are stored per token per layer, 576 values for V3 instead of 128 heads x (192 + 128).

`ContiguousCache` is the simple one: one preallocated (layers, batch, max_len, .) buffer; rows may hold
different lengths. It implements what the model calls: `prepare(T)` and `update(layer, kv, k_pe)`.
"""

from __future__ import annotations

import torch

from nanoseek.model.config import ModelConfig


def latent_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, mtp: bool = False) -> int:
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    return layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * torch.finfo(dtype).bits // 8


def mha_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """The same model with ordinary multi-head attention caching full K (qk_head_dim) and V per head."""
    per_layer = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return cfg.num_hidden_layers * per_layer * torch.finfo(dtype).bits // 8


class ContiguousCache:
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", layers: int | None = None):
        n = cfg.num_hidden_layers + cfg.num_nextn_predict_layers if layers is None else layers
        self.kv = torch.zeros(n, batch, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.pe = torch.zeros(n, batch, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len
        self._write: torch.Tensor | None = None   # (B, T) positions being written by the current forward
        self._S = 0

    def prepare(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reserve T new positions per row; return their positions (B, T) and the mask (B, T, S)."""
        pos = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)   # (B, T)
        S = int(pos.max()) + 1
        if S > self.max_len:
            raise ValueError(f"cache overflow: {S} positions > max_len {self.max_len}")
        keys = torch.arange(S, device=pos.device)
        mask = keys[None, None, :] <= pos[:, :, None]                                # (B, T, S)
        self._write, self._S = pos, S
        self.lengths = self.lengths + T
        return pos, mask

    def update(self, layer: int, kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(kv.shape[0], device=kv.device)[:, None]
        self.kv[layer][rows, self._write] = kv.to(self.kv.dtype)
        self.pe[layer][rows, self._write] = k_pe.to(self.pe.dtype)
        return self.kv[layer, :, : self._S], self.pe[layer, :, : self._S]
