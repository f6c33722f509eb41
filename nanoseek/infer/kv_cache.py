"""Latent KV caches for MLA: only the normalized latent (kv_lora_rank) and the rotated shared rope key
(qk_rope_head_dim) are stored per token per layer, 576 values for V3 instead of 128 heads x (192 + 128).

`ContiguousCache` is the simple one: one preallocated (layers, batch, max_len, .) buffer; rows may hold
different lengths. It implements what the model calls: `prepare(T)` and `update(layer, kv, k_pe)`.

`PagedCache` is the engine's: one pool of fixed-size blocks per layer, a free list, and a block table
per sequence (vLLM's PagedAttention layout, on the latent). Long and short sequences share the pool
without copying; a finished sequence hands its blocks back at once. Blocks are reference-counted:
requests with the same prompt share its full blocks (`share`), each with its own copy of the partly
filled last one (`copy_block`), and a block is free again when its last user releases it. The engine
`bind`s the rows of each forward (block tables, cached lengths, new lengths) and passes the positions
and mask it returns to the model, which calls `update` per layer.
"""

from __future__ import annotations

import numpy as np
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

    @property
    def dtype(self) -> torch.dtype:
        """The latents' dtype: attention computes in it (mla.MLA._absorbed)."""
        return self.kv.dtype

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


class PagedCache:
    """Latent cache in blocks: kv (layers, num_blocks * block_size, kv_lora_rank) and pe (..., rope).

    Slot s of the pool is token s % block_size of block s // block_size. Block 0 is never handed out:
    the padding tokens of a ragged batch write there, and nothing reads it unmasked.
    """

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", layers: int | None = None):
        if num_blocks < 2:
            raise ValueError(f"num_blocks {num_blocks} < 2 (block 0 is reserved)")
        n = cfg.num_hidden_layers + cfg.num_nextn_predict_layers if layers is None else layers
        self.block_size, self.num_blocks, self.num_layers = block_size, num_blocks, n
        self.device = torch.device(device)
        # zeros, not empty: masked keys still enter the weighted sum with weight 0, and 0 * NaN = NaN
        self.kv = torch.zeros(n, num_blocks * block_size, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.pe = torch.zeros(n, num_blocks * block_size, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self._layers = list(zip(self.kv.unbind(0), self.pe.unbind(0)))   # per-layer views, made once
        self._rows = list(zip(self.kv[:, None].unbind(0), self.pe[:, None].unbind(0)))   # (1, slots, .) each
        self._free = list(range(num_blocks - 1, 0, -1))     # pop() hands out low ids first
        self._refs = [0] * num_blocks                        # users of each block (sequences holding it)
        self._write: torch.Tensor | None = None               # (B*T,) slots written by the bound forward
        self._read: torch.Tensor | None = None                # (B*S,) slots read back
        self._span: tuple[int, int, int] | None = None        # one row in consecutive slots: (first, write, S)
        self._shape = (0, 0)

    @property
    def dtype(self) -> torch.dtype:
        """The latents' dtype: attention computes in it (mla.MLA._absorbed)."""
        return self.kv.dtype

    # --- blocks
    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"cache has {len(self._free)} free blocks, {n} asked")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> list[int]:
        """Another user of these (already written) blocks: they are freed when the last user releases."""
        for b in blocks:
            self._refs[b] += 1
        return list(blocks)

    def release(self, blocks: list[int]) -> None:
        refs = self._refs
        for b in reversed(blocks):
            refs[b] -= 1
            if refs[b] == 0:
                self._free.append(b)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy-on-write: block src's latents (every layer) into block dst, before dst's owner writes."""
        bs = self.block_size
        self.kv[:, dst * bs:(dst + 1) * bs] = self.kv[:, src * bs:(src + 1) * bs]
        self.pe[:, dst * bs:(dst + 1) * bs] = self.pe[:, src * bs:(src + 1) * bs]

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """copy_block for many pairs at once (one gather and one scatter per tensor; a shared prompt's
        G - 1 followers each take a copy of the leader's last block)."""
        if len(src) == 1:
            return self.copy_block(src[0], dst[0])
        bs = self.block_size
        offs = torch.arange(bs)
        s_idx = (torch.tensor(src)[:, None] * bs + offs).flatten().to(self.device)
        d_idx = (torch.tensor(dst)[:, None] * bs + offs).flatten().to(self.device)
        self.kv.index_copy_(1, d_idx, self.kv.index_select(1, s_idx))
        self.pe.index_copy_(1, d_idx, self.pe.index_select(1, s_idx))

    def bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() + self.pe.numel() * self.pe.element_size()

    # --- one forward
    def bind(self, tables: list[list[int]], starts: list[int], lengths: list[int], T: int,
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the next forward: row b has starts[b] cached tokens and lengths[b] (<= T) new ones,
        padded to T. Returns positions (B, T) and mask (B, T, S) (True = attend), S = max(start + length).
        Padding queries repeat their row's last position (so their mask row is never empty) and write
        into block 0."""
        bs = self.block_size
        B = len(tables)
        if B == 1 and T == 1 and lengths[0] == 1 and self.bind_one(tables[0], starts[0]):
            # the general path's numpy below, without numpy (~30 us a step)
            st = starts[0]
            return (torch.tensor([[st]], device=self.device),
                    torch.ones(1, 1, st + 1, dtype=torch.bool, device=self.device))
        start = np.asarray(starts, dtype=np.int64)
        decode = T == 1                 # one new token per row (lengths are >= 1): no padding
        if decode:
            S = int(start.max()) + 1
            pos = start[:, None]                                                    # (B, 1)
        else:
            length = np.asarray(lengths, dtype=np.int64)
            S = int((start + length).max())
            t = np.arange(T)
            pos = start[:, None] + np.minimum(t[None, :], length[:, None] - 1)      # (B, T)
        keys = np.arange(S)
        nblk = -(-S // bs)
        table = np.array([tab[:nblk] if len(tab) >= nblk else tab + [0] * (nblk - len(tab)) for tab in tables],
                         dtype=np.int64)                                        # (B, nblk)
        slots = table[:, keys // bs] * bs + keys % bs                               # (B, S)
        if decode:
            write = slots[np.arange(B), start][:, None]                             # (B, 1)
        else:
            write = np.take_along_axis(slots, pos, axis=1)                          # (B, T)
            padded = t[None, :] >= length[:, None]
            write[padded] = 0
        mask = keys[None, None, :] <= pos[:, :, None]                               # (B, T, S)
        self._shape = (B, S)
        self._span = None
        if B == 1 and (decode or not padded.any()) and (np.diff(table[0]) == 1).all():
            # one sequence in consecutive blocks (the usual case at batch 1, as the free list hands out
            # low ids first): read and write the pool in place, no gather
            self._span = (int(slots[0, 0]), int(write[0, 0]), S)
        dev = self.device
        self._write = torch.from_numpy(write.reshape(-1)).to(dev, non_blocking=True)
        self._read = torch.from_numpy(slots.reshape(-1)).to(dev, non_blocking=True)
        return (torch.from_numpy(pos).to(dev, non_blocking=True),
                torch.from_numpy(mask).to(dev, non_blocking=True))

    def bind_one(self, table: list[int], start: int) -> bool:
        """Bind one decode row (batch 1, one new token after `start` cached ones) if its blocks are
        consecutive, the usual case as the free list hands out low ids first: `_span` = (first slot,
        slot written, S) then lets `update` (or infer.one_row, which writes the pools in place) read
        and write the pool without a gather. False (nothing bound) otherwise: use `bind`."""
        bs = self.block_size
        n = start // bs + 1
        t0 = table[0]
        if len(table) < n or table[n - 1] - t0 != n - 1 or (n > 2 and table[:n] != list(range(t0, t0 + n))):
            return False
        first = t0 * bs
        self._span, self._shape = (first, first + start, start + 1), (1, start + 1)
        # the slots of the last general bind are not this forward's: no reader may take them (BatchDecoder's
        # prefill wrote a one-token prompt into them, another request's slot)
        self._write = self._read = None
        return True

    def update(self, layer: int, kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's latent (B, T, c) and rope key (B, T, rope) for `layer`; return the
        bound rows' whole context (B, S, c), (B, S, rope)."""
        B, T, _ = kv.shape
        if self._span is not None:     # one row (B == 1): the pool as one (1, slots, .) sequence
            kvr, per = self._rows[layer]
            first, w, S = self._span
            kvr[:, w:w + T] = kv
            per[:, w:w + T] = k_pe
            return kvr[:, first:first + S], per[:, first:first + S]
        kvl, pel = self._layers[layer]
        kvl.index_copy_(0, self._write, kv.reshape(B * T, -1).to(kvl.dtype))
        pel.index_copy_(0, self._write, k_pe.reshape(B * T, -1).to(pel.dtype))
        B, S = self._shape
        return (kvl.index_select(0, self._read).view(B, S, -1),
                pel.index_select(0, self._read).view(B, S, -1))
