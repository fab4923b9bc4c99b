"""Preallocated KV cache for a batch of rows, each with its own length.

One tensor holds every layer's keys and values, [layers, 2, B, kv_heads, max_len, head_dim], so
compaction after acceptance or pruning is a single gather/scatter over all layers at once.
Row b's valid entries are slots [0, lengths[b]); new tokens are written at slots >= lengths[b]
and only become part of the row when ``keep`` (or ``advance``) commits them.
"""

from __future__ import annotations

import numpy as np
import torch


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device: torch.device | None = None):
        self.kv = torch.zeros(n_layers, 2, batch_size, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self._set_rows(batch_size)

    @property
    def batch_size(self) -> int:
        return self.kv.shape[2]

    def update(self, layer: int, slots: torch.Tensor | np.ndarray, kv: torch.Tensor | np.ndarray, span: int):
        """Write new keys and values kv [B, T, 2, kv_heads, hd] at slots [B, T]; return this layer's
        keys and values for slots [0, span) as [B, kv_heads, span, hd] views. The fp32 decoder
        passes numpy arrays: numpy's indexed write costs a fraction of torch's for a few tokens."""
        if isinstance(kv, np.ndarray):
            self.kv.numpy()[layer, :, self._rows_np, :, slots] = kv
        else:
            self.kv[layer, :, self._rows, :, slots] = kv
        return self.kv[layer, 0, :, :, :span], self.kv[layer, 1, :, :, :span]

    def attention_mask(self, slots: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
        """Mask [B, 1, T, S] for new tokens at slots [B, T]: each sees its row's committed cache and,
        among the new tokens, those marked in ancestors [B, T, T] (itself included)."""
        B, T = slots.shape
        span = int(slots.max()) + 1
        mask = (torch.arange(span) < self.lengths.unsqueeze(1)).unsqueeze(1).expand(B, T, span).clone()
        mask.scatter_(2, slots.unsqueeze(1).expand(B, T, T), ancestors)
        return mask.unsqueeze(1)

    def keep(self, offsets: torch.Tensor, counts: torch.Tensor, layers: slice = slice(None)) -> None:
        """Keep, for every row b, the new entries at slots lengths[b] + offsets[b, :counts[b]], packed in
        order right after the row's committed entries, and commit them. offsets: [B, n], increasing."""
        if offsets.shape[1] == 0:
            return
        base = self.lengths.unsqueeze(1)
        dst = base + torch.arange(offsets.shape[1])
        moved = self.kv[layers, :, self._rows, :, base + offsets]  # [B, n, layers, 2, kv_heads, hd]
        self.kv[layers, :, self._rows, :, dst] = moved
        self.lengths += counts

    def advance(self, counts: torch.Tensor) -> None:
        """Commit the first counts[b] new entries of each row as they are."""
        self.lengths += counts

    def truncate(self, row: int, length: int) -> None:
        self.lengths[row] = min(int(self.lengths[row]), length)

    def reset(self, row: int) -> None:
        self.lengths[row] = 0

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished rows leave the batch)."""
        self.kv = self.kv[:, :, rows].contiguous()
        self.lengths = self.lengths[rows]
        self._set_rows(len(rows))

    def _set_rows(self, batch_size: int) -> None:
        self._rows = torch.arange(batch_size, device=self.kv.device).unsqueeze(1)  # [B, 1] row index for advanced indexing
        self._rows_np = self._rows.numpy() if self._rows.is_cpu else None  # only the CPU's fp32 decoder writes through numpy
