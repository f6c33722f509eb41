"""SFT data: chat conversations -> packed fixed-length rows with a loss on assistant tokens only.

    convs = load_conversations("data/chat.jsonl")     # {"messages": [{"role": ..., "content": ...}, ...]}
    ds = SFTDataset(convs, tokenizer, seq_len=512)
    for x, y, loss_mask in ds.batches(batch_size=8, epoch=0):   # (B, T) each
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)

Each conversation is rendered with Tokenizer.render_chat (so its loss mask covers the assistant
contents and their closing eos) and whole conversations are packed in order into rows of seq_len + 1
tokens (next-fit: a conversation that does not fit in the current row starts the next one), the tail
padded. A conversation longer than a row is cut to fit (counted in `truncated`); one that the cut leaves
without a single target (a long prompt) is dropped (counted in `dropped`). Packed conversations see the
ones before them in the row; each starts with bos, which is the usual trade for not wasting compute on
padding.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from nanoseek.tokenizer import Tokenizer

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index
ROLES = ("system", "user", "assistant")   # what the chat format renders


def load_conversations(path: str | Path) -> list[list[dict]]:
    """Conversations from a jsonl file with a "messages" list per line."""
    convs = []
    try:
        f = open(path, "rb")
    except PermissionError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None
    with f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")     # a byte-order mark is no error
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 text (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            msgs = obj.get("messages") if isinstance(obj, dict) else None
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in msgs):
                raise ValueError(f"{path}:{n}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}")
            for m in msgs:
                if m["role"] not in ROLES:
                    raise ValueError(f"{path}:{n}: role {m['role']!r}; expected one of {', '.join(ROLES)}")
                if not isinstance(m["content"], str):
                    raise ValueError(f"{path}:{n}: a {m['role']} message's content is "
                                     f"{type(m['content']).__name__}, not a string")
                try:
                    m["content"].encode("utf-8")       # JSON may carry a lone surrogate ("\\ud800")
                except UnicodeEncodeError:
                    raise ValueError(f"{path}:{n}: a {m['role']} message's content is not valid Unicode "
                                     f"(a lone surrogate)") from None
            convs.append(msgs)
    if not convs:
        raise ValueError(f"{path}: no conversations in it")
    return convs


class SFTDataset:
    """Rows of (x, y, loss_mask), each (seq_len,): y is x shifted by one with IGNORE_INDEX where no loss."""

    def __init__(self, conversations: list[list[dict]], tokenizer: Tokenizer, seq_len: int):
        if not conversations:
            raise ValueError("SFTDataset: no conversations")
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        row_len = seq_len + 1  # one extra token: the last position's target
        rows_ids: list[list[int]] = []
        rows_mask: list[list[int]] = []
        cur_ids: list[int] = []
        cur_mask: list[int] = []
        self.truncated = self.dropped = 0
        for conv in conversations:
            ids, mask = tokenizer.render_chat(conv)
            if len(ids) > row_len:
                ids, mask = ids[:row_len], mask[:row_len]
                if not any(mask[1:]):     # the cut took every assistant token: a row of nothing to learn
                    self.dropped += 1
                    continue
                self.truncated += 1
            if len(cur_ids) + len(ids) > row_len:  # next-fit: close the row, start another
                rows_ids.append(cur_ids)
                rows_mask.append(cur_mask)
                cur_ids, cur_mask = [], []
            cur_ids += ids
            cur_mask += mask
        if self.dropped == len(conversations):
            raise ValueError(f"SFTDataset: every conversation ({self.dropped}) is longer than seq_len {seq_len} + 1 "
                             f"tokens before its first assistant token: nothing to learn; raise the sequence length")
        rows_ids.append(cur_ids)
        rows_mask.append(cur_mask)
        # pad to row_len; padding is never a target (mask 0)
        self.ids = np.full((len(rows_ids), row_len), pad, dtype=np.int64)  # (N, T + 1)
        self.mask = np.zeros((len(rows_ids), row_len), dtype=bool)  # (N, T + 1)
        for i, (r, m) in enumerate(zip(rows_ids, rows_mask)):
            self.ids[i, :len(r)] = r
            self.mask[i, :len(m)] = m
        # the mask belongs to the token being predicted: position t learns y[t] = row[t + 1]
        if not self.mask[:, 1:].any():
            raise ValueError("SFTDataset: no assistant tokens to learn from (no assistant messages?"
                             + (f" {self.dropped} conversation(s) dropped: no assistant token within seq_len "
                                f"{seq_len} + 1" if self.dropped else "") + ")")
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        row = torch.from_numpy(self.ids[i])
        loss_mask = torch.from_numpy(self.mask[i, 1:])
        y = torch.where(loss_mask, row[1:], IGNORE_INDEX)
        return row[:-1].clone(), y, loss_mask.clone()

    def batches(self, batch_size: int, epoch: int = 0, seed: int = 0, shuffle: bool = True,
                rank: int = 0, world_size: int = 1, start_step: int = 0
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One epoch of (x, y, loss_mask) batches (B, T), the same global-batch split as PretrainLoader:
        a seeded row order per epoch, rank r takes the r-th B rows of each global batch of B * world_size.
        start_step skips batches already trained on (resume)."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self)) if shuffle else np.arange(len(self))
        global_batch = batch_size * world_size
        steps = len(self) // global_batch
        if steps == 0:
            raise ValueError(f"SFTDataset: {len(self)} rows, fewer than one global batch of {global_batch}")
        for step in range(start_step, steps):
            first = step * global_batch + rank * batch_size
            rows = [self[int(i)] for i in order[first:first + batch_size]]
            yield tuple(torch.stack(t) for t in zip(*rows))  # type: ignore[misc]
