"""Preallocated KV cache for a batch of rows, each with its own length.

One tensor holds every layer's keys and values, [layers, 2, B, kv_heads, max_len, head_dim + 1], so
compaction after acceptance or pruning is a single gather/scatter over all layers at once. The last
feature of every entry is 1: attention multiplies its weights by the values and this column in one
product, which gives the weights' sum in the same (row-invariant) reduction (see ``attention``).
Row b's valid entries are slots [0, lengths[b]); new tokens are written at slots >= lengths[b]
and only become part of the row when ``keep`` (or ``advance``) commits them. The entries are in the
default dtype, or in bf16 (``dtype``): the C attention reads either, and a bf16 cache is half the
bytes a step reads (at batch 8 on the AMD EPYC, the fp32 cache's reads were a fifth of an AR step).

For the AMX attention (``tiles``), the cache also keeps every layer's committed blocks of 32 entries
converted to the tiles' bf16 layout (``packed``; ``ready[layer, b]`` blocks of row b are), so a step
reads them in half the bytes and converts only its newest block; lowering a row's length lowers its
``ready``.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass

import torch

from propd.models.attention import BLOCK, Plan, TileCopy, chain_plan, path_plan, round_up
from propd.models.pages import zeros_in_large_pages


@dataclass
class Layout:
    """Where one step's new tokens [B, T] go and what each of them sees."""

    slots: torch.Tensor  # [B, T] cache slot receiving each token's K/V
    positions: torch.Tensor  # [B, T] RoPE position
    plan: Plan  # how attention reads the cache
    # [B] or None: row b's tokens past counts[b] are padding whose outputs and K/V nobody reads (a
    # tree's shorter rows repeat their root, a prompt's padding lies past its end), so a kernel may
    # skip them (their outputs are then left as they came)
    counts: torch.Tensor | None = None


class CachePool:
    """Cache tensors handed out again once no cache holds them, as they are (every entry finite,
    the ones column set: what a new one holds, as far as any step can tell). A CUDA graph reads the
    cache at the address it was captured with (``graphs``): a batch whose cache takes an earlier
    batch's tensor of the same shape replays that batch's graphs instead of capturing its own (on
    the H200, every batch of a bench captured each of its step shapes anew). On a CPU, a new
    batch-8 cache cost 0.1 s to make (its pages touched for the first time): 4% of a bench batch.
    ``keep`` spare tensors at most, of ``spare_bytes`` in all where given (the oldest go first)."""

    def __init__(self, keep: int, spare_bytes: int | None = None):
        self.keep, self.spare_bytes = keep, spare_bytes
        self._lent: list[tuple[torch.Tensor, weakref.ref]] = []  # (tensor, the cache it was last lent to)

    def lend(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, owner: "KVCache", make) -> torch.Tensor:
        """A spare tensor of ``shape`` and ``dtype`` for ``owner``, or a new one from ``make()``."""
        spare = [i for i, (t, cache) in enumerate(self._lent) if cache() is None or cache().storage is not t]
        inference = torch.is_inference_mode_enabled()  # an inference tensor takes no in-place write outside that mode
        match = next((i for i in spare if self._fits(self._lent[i][0], shape, dtype, device, inference)), None)
        if match is None:
            dropped = set(spare[: max(0, len(spare) - self.keep + 1)])  # the oldest spares make room, before the new one is made
            if self.spare_bytes is not None:
                kept = [i for i in spare if i not in dropped]
                room = self.spare_bytes - math.prod(shape) * dtype.itemsize
                while kept and sum(self._lent[i][0].nbytes for i in kept) > room:
                    dropped.add(kept.pop(0))
            self._lent = [e for i, e in enumerate(self._lent) if i not in dropped]
            tensor = make()
        else:
            tensor = self._lent.pop(match)[0]
        self._lent.append((tensor, weakref.ref(owner)))
        return tensor

    @staticmethod
    def _fits(t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, inference: bool) -> bool:
        return t.shape == shape and t.device == device and t.dtype == dtype and t.is_inference() == inference and not t.requires_grad

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor it may hand out or has lent."""
        return [t for t, _ in self._lent]


class KVCache:
    def __init__(
        self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, device: torch.device | str | None = None, tiles: bool = False,
        pool: CachePool | None = None, dtype: torch.dtype | None = None,
    ):
        self.capacity = max_len  # entries asked for (a draft's cache asks as many)
        max_len = round_up(max_len) + BLOCK  # attention reads whole blocks, and one more past a tree
        self.pool, self.head_dim, self.dtype = pool, head_dim, dtype or torch.get_default_dtype()
        if tiles and self.dtype != torch.float32:
            raise ValueError("the AMX attention's cache (tiles) keeps fp32 entries beside its bf16 copy")
        self.kv = self._new((n_layers, 2, batch_size, n_kv_heads, max_len, head_dim + 1), torch.device(device) if device else None)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self.packed = torch.empty(n_layers, batch_size, n_kv_heads, max_len // BLOCK, BLOCK * head_dim, dtype=torch.int32) if tiles else None
        self.ready = torch.zeros(n_layers, batch_size, dtype=torch.long, device="cpu")
        self._set_rows(batch_size)

    def _new(self, shape: tuple[int, ...], device: torch.device | None) -> torch.Tensor:
        """The whole cache tensor (``storage``; ``kv`` is a view of its first rows once rows leave):
        zeros with the ones column set, or the pool's spare one."""

        def make() -> torch.Tensor:
            on_cpu = (torch.device(device) if device is not None else torch.get_default_device()).type == "cpu"
            kv = zeros_in_large_pages(shape, self.dtype) if on_cpu else torch.zeros(shape, dtype=self.dtype, device=device)
            kv[..., self.head_dim] = 1.0
            return kv

        self.storage = make() if self.pool is None or device is None else self.pool.lend(shape, self.dtype, device, self, make)
        return self.storage

    @property
    def lengths(self) -> torch.Tensor:
        """Each row's committed entries [B]."""
        return self._lengths

    @lengths.setter
    def lengths(self, lengths: torch.Tensor) -> None:
        self._lengths, self._longest = lengths, None

    @property
    def longest(self) -> int:
        """The longest row's committed entries, as an int, read from ``lengths`` once per change of
        them but the same count for every row (an AR step): read every step, it cost a batch-1
        step 25-40 us (Intel Xeon with AMX)."""
        if self._longest is None:
            self._longest = int(self.lengths.max()) if len(self.lengths) else 0
        return self._longest

    @property
    def batch_size(self) -> int:
        return self.kv.shape[2]

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensors a step reads and writes in place by address (what a CUDA graph keeps alive)."""
        return self.storage, self._rows

    def chain(self, T: int) -> Layout:
        """T new tokens after each row's cache, each seeing the cache and the new tokens before it."""
        slots = self.lengths.unsqueeze(1) + torch.arange(T, device=self.device)
        return Layout(slots, slots, chain_plan(slots, self.kv.shape[3], self.max_len))

    def tree(self, ancestors: torch.Tensor) -> Layout:
        """N new tokens after each row's cache forming a tree: ancestors [N, N] or [B, N, N] bool
        (ancestors[i, j]: j is i or an ancestor of i; ancestors come before their descendants)."""
        B, N = self.batch_size, ancestors.shape[-1]
        slots = self.lengths.unsqueeze(1) + torch.arange(N, device=self.device)
        if ancestors.dim() == 3:
            return self.paths(slots, path_slots(ancestors.to(self.device), slots))
        version = -1 if ancestors.is_inference() else ancestors._version  # (an inference tensor counts no versions)
        order, found, depths = (t if t.device == self.device else t.to(self.device) for t in _path_order(ancestors, version))
        base = self.lengths.unsqueeze(1)  # every row the same tree: node j at slot lengths + j, its depth known
        plan = path_plan(base.expand(B, N), torch.where(found, base.unsqueeze(2) + order, -1), self.kv.shape[3], self.max_len)
        return Layout(slots, base + depths, plan)

    def paths(self, slots: torch.Tensor, path: torch.Tensor, base: torch.Tensor | None = None) -> Layout:
        """New tokens at ``slots`` [B, T] whose paths ``path`` [B, T, D] (slots of positions base,
        base + 1, ..., the token itself last; -1 after) follow the committed entries [0, base):
        base [B, T] defaults to each row's length."""
        base = self.lengths.unsqueeze(1).expand_as(slots) if base is None else base
        positions = base + (path >= 0).sum(-1) - 1
        return Layout(slots, positions, path_plan(base, path, self.kv.shape[3], self.max_len))

    def update(self, layer: int, slots: torch.Tensor, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys and values kv [B, T, 2, kv_heads, hd] at slots [B, T]; return this layer's
        keys and values, [B, kv_heads, max_len, hd + 1] views."""
        self.kv[layer, :, self._rows, :, slots, : self.head_dim] = kv.to(self.kv.dtype)
        return self.kv[layer, 0], self.kv[layer, 1]

    def tile_copy(self, layer: int) -> TileCopy | None:
        """What the AMX attention reads of this layer besides the entries, where the cache keeps it."""
        return None if self.packed is None else TileCopy(self.packed[layer], self.ready[layer], self.lengths)

    def keep(self, offsets: torch.Tensor, counts: torch.Tensor, in_place: bool) -> None:
        """Keep, for every row b, the new entries at slots lengths[b] + offsets[b, :counts[b]], packed in
        order right after the row's committed entries, and commit them. offsets: [B, n], increasing;
        ``in_place``: whether every row's kept offsets are 0, 1, 2, ... (the caller knows it from its paths)."""
        if offsets.shape[1] == 0:
            return
        if in_place:  # every path is its tree's first nodes (chains): nothing moves
            self.lengths += counts
            return
        base = self.lengths.unsqueeze(1)
        dst = base + torch.arange(offsets.shape[1], device=self.device)
        moved = self.kv[:, :, self._rows, :, base + offsets]  # [B, n, layers, 2, kv_heads, hd + 1]
        self.kv[:, :, self._rows, :, dst] = moved
        self.lengths += counts

    def advance(self, counts: torch.Tensor | int) -> None:
        """Commit the first counts[b] new entries of each row (or ``counts`` of every row) as they are."""
        longest = self._longest
        self.lengths += counts
        if isinstance(counts, int) and longest is not None:
            self._longest = longest + counts

    def cut(self, lengths: torch.Tensor) -> None:
        """Lower every row's length to lengths [B] (a right-padded prefill's padding leaves the rows)."""
        self.lengths = torch.minimum(self.lengths, lengths)
        self.ready = torch.minimum(self.ready, (self.lengths // BLOCK).cpu())

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows, increasing indices (finished rows leave the batch). The kept
        rows move up in place, their committed entries only: a copy of the whole cache cost 26 ms
        each time a row left a batch of 8 (the slots past a row's length hold finite values, masked)."""
        used = int(self.lengths[rows].max()) if len(rows) else 0
        for i, r in enumerate(rows.tolist()):
            if r != i:
                self.kv[:, :, i, :, :used] = self.kv[:, :, r, :, :used]
                if self.packed is not None:
                    self.packed[:, i, :, : used // BLOCK] = self.packed[:, r, :, : used // BLOCK]
        self.kv = self.kv[:, :, : len(rows)]
        self.packed = None if self.packed is None else self.packed[:, : len(rows)]
        self.ready = self.ready[:, rows.cpu()].contiguous()
        self.lengths = self.lengths[rows]
        self._set_rows(len(rows))

    def join(self, other: "KVCache") -> None:
        """Append ``other``'s rows after these (rows whose prompts are in join a running batch):
        into the room that rows which left made in the cache's tensor, where they fit, else into a
        new tensor (in a continuous batch of 8 on the AMD EPYC a new one at every join took 31 ms,
        13% of ProPD's time). Only committed entries are copied: past a row's length the slots
        hold finite values, masked."""
        B, rows = self.batch_size, self.batch_size + other.batch_size
        if other.max_len <= self.max_len and self.storage.shape[2] >= rows:
            kv = self.storage[:, :, :rows]
        else:
            kept, mine = self.kv, int(self.lengths.max())
            shape = list(kept.shape)
            shape[2], shape[4] = rows, max(self.max_len, other.max_len)
            kv = self._new(tuple(shape), self.device)
            kv[:, :, :B, :, :mine] = kept[:, :, :, :, :mine]
        theirs = int(other.lengths.max())
        kv[:, :, B:, :, :theirs] = other.kv[:, :, :, :, :theirs]
        self.kv, self.max_len, self.capacity = kv, kv.shape[4], max(self.capacity, other.capacity)
        if self.packed is not None:  # packed anew from the entries by the next step
            self.packed = torch.empty(kv.shape[0], kv.shape[2], kv.shape[3], self.max_len // BLOCK, BLOCK * self.head_dim, dtype=torch.int32)
        self.ready = torch.zeros(kv.shape[0], kv.shape[2], dtype=torch.long, device="cpu")
        self.lengths = torch.cat([self.lengths, other.lengths])
        self._set_rows(self.batch_size)

    def _set_rows(self, batch_size: int) -> None:
        self._rows = torch.arange(batch_size, device=self.kv.device).unsqueeze(1)  # [B, 1] row index for advanced indexing


def path_slots(ancestors: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Slots [B, N, D] of each node's ancestors in depth order (itself last, -1 after) from an
    ancestor mask [B, N, N] whose nodes come after their ancestors, and the nodes' slots [B, N]."""
    order, found = _ancestor_order(ancestors)
    picked = slots.unsqueeze(1).expand_as(ancestors).gather(2, order.clamp(max=ancestors.shape[-1] - 1))
    return torch.where(found, picked, -1)


def _ancestor_order(ancestors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each node's ancestors' indices in depth order [..., N, D] (itself last; N after) and where
    they are real [..., N, D], from an ancestor mask [..., N, N]."""
    depth = int(ancestors.sum(-1).amax()) if ancestors.numel() else 0
    order = torch.where(ancestors, torch.arange(ancestors.shape[-1], device=ancestors.device), ancestors.shape[-1]).sort(-1).values[..., :depth]
    return order, order < ancestors.shape[-1]


@functools.lru_cache(maxsize=256)
def _path_order(ancestors: torch.Tensor, version: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_ancestor_order`` of one tree's mask [N, N] and each node's depth [N], once per mask and
    ``version`` of it (a tensor hashes by identity, and the cache holds it; a tree's tensors are
    built once per shape). Worked out at every step, it took half the 0.1 ms a tree step's layout
    cost at batch 1 on the AMD EPYC."""
    order, found = _ancestor_order(ancestors)
    return order, found, found.sum(-1) - 1
