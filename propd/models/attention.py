"""Attention whose result for a token depends only on its own query and the keys on its path.

AR decoding of a token at position p attends to the cache slots [0, p], laid out in position
order. Verifying a tree puts the same token's ancestors at other slots, among siblings it must not
see, next to other queries; a fused kernel (SDPA) then reduces in another order and the logits move
in the last bits. Here the reduction order is fixed by *position* alone:

- keys are cut into blocks of ``BLOCK`` positions aligned at position 0; a block's weighted sum
  of values (and, through a ones column the cache keeps beside each value, of the weights) is one
  small product of fixed shape, which is row-invariant on every kernel we measured;
- blocks that lie wholly in the committed cache are read in place (slot == position there);
  the few blocks around the new tokens are gathered per query in position order from its path;
- block sums are added up in position order by a sequential scan (``cumsum``), where an empty
  block adds an exact zero; the weights are exp(score - the query's maximum score), and a maximum
  does not depend on order.

So a token gets bitwise the same output alone (AR), inside a tree, or inside a batch.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from propd.models import native
from propd.models.kernels import serial

BLOCK = 32


@dataclass
class Plan:
    """How one step's queries read one layer's cache [B, KV, S, hd + 1]: query (b, t) reads slots
    [0, inplace[b, t]) and then ``path[b, t]`` up to its first -1. ``blocked`` (what the tensor
    version reads) is built only when that version runs."""

    inplace: torch.Tensor  # [B, T] long
    path: torch.Tensor  # [B, T, D] long
    n_kv_heads: int
    max_len: int  # the cache's slots per row
    fixed_sizes: bool = False  # the tensor version's sizes from shapes alone, never from values (a CUDA graph replays them)

    @functools.cached_property
    def blocked(self) -> "Blocked":
        if self.path.shape[-1] == 0:
            return _blocked_chain(self.inplace, self.max_len if self.fixed_sizes else round_up(int(self.inplace.max())))
        if self.fixed_sizes:
            return _blocked_path(self.inplace, self.path, self.n_kv_heads, self.max_len, self.max_len, round_up(BLOCK - 1 + self.path.shape[-1]))
        return _blocked_path(self.inplace, self.path, self.n_kv_heads, self.max_len)


@dataclass
class Blocked:
    """The tensor version's view of a ``Plan``. Masks broadcast against scores [B, KV, T, group, *]."""

    span: int  # key slots [0, span) are scored
    shared: torch.Tensor  # [B, 1, T, 1, Cs] 0 where a query sees in-place column c < Cs, else -inf (Cs: a positive multiple of BLOCK)
    recent_slots: torch.Tensor | None = None  # [B, 1, T, 1, R] long: slot holding position start + r on the query's path
    recent_valid: torch.Tensor | None = None  # [B, 1, T, 1, R] 0 where that position is on the path, else -inf
    recent_rows: torch.Tensor | None = None  # [B * KV * T * R] those slots as rows of the cache flattened to [B * KV * S, hd + 1]


def round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _bias(seen: torch.Tensor) -> torch.Tensor:
    """0 where a key is seen, -inf where not: added to scores once per layer (x + 0 is exact)."""
    return torch.zeros(seen.shape, device=seen.device).masked_fill_(~seen, float("-inf"))


def chain_plan(position: torch.Tensor, n_kv_heads: int, max_len: int) -> Plan:
    """New tokens at slots ``position`` [B, T] (each row's length + [0, T)), each seeing every slot up to its own (prefill, AR)."""
    return Plan(position + 1, torch.empty(*position.shape, 0, dtype=torch.long, device=position.device), n_kv_heads, max_len)


def path_plan(base: torch.Tensor, path_slots: torch.Tensor, n_kv_heads: int, max_len: int) -> Plan:
    """Queries that see the committed slots [0, base) (slot == position there) and then their path:
    path_slots [B, T, D], the slots holding positions base, base + 1, ..., itself last, padded with -1."""
    return Plan(base.contiguous(), path_slots.contiguous(), n_kv_heads, max_len)


def _blocked_chain(seen: torch.Tensor, width: int) -> Blocked:
    """Queries seeing slots [0, seen) [B, T] of the first ``width``: slots are positions throughout,
    so every block is read in place."""
    shared = torch.arange(width, device=seen.device) < seen.unsqueeze(-1)  # [B, T, Cs]
    return Blocked(width, _bias(shared[:, None, :, None]))


def _blocked_path(base: torch.Tensor, path_slots: torch.Tensor, n_kv_heads: int, max_len: int, width: int | None = None, R: int | None = None) -> Blocked:
    """Each query reads whole blocks in place up to its last block start <= base, then a window of R
    positions from there gathered from its path. ``width`` (in-place columns) and R: the least that
    holds every query where not given (read from the values)."""
    B, T, D = path_slots.shape
    device = base.device
    start = base // BLOCK * BLOCK  # [B, T] first position not read in place
    path_len = (path_slots >= 0).sum(-1)  # [B, T]
    R = round_up(int((base - start + path_len).max())) if R is None else R
    width = max(int(start.max()), BLOCK) if width is None else width
    shared = torch.arange(width, device=device) < start.unsqueeze(-1)  # [B, T, Cs]
    pos = start.unsqueeze(-1) + torch.arange(R, device=device)  # [B, T, R] positions in the recent window
    offset = pos - base.unsqueeze(-1)  # < 0: committed; else index into the path
    on_path = path_slots.gather(2, offset.clamp(0, D - 1))
    slots = torch.where(offset < 0, pos, on_path)
    valid = (offset < path_len.unsqueeze(-1)) & (slots >= 0)
    slots = slots.clamp(0, max_len - 1)
    span = max_len if width == max_len else max(width, int(slots.max()) + 1)
    heads = torch.arange(B * n_kv_heads, device=device).view(B, n_kv_heads, 1) * max_len
    rows = (heads + slots.view(B, 1, T * R)).flatten()
    return Blocked(span, _bias(shared[:, None, :, None]), slots[:, None, :, None], _bias(valid[:, None, :, None]), rows)


@dataclass
class TileCopy:
    """One layer's committed blocks as the AMX attention reads them (``KVCache.packed``)."""

    packed: torch.Tensor  # [B, KV, blocks, BLOCK * hd] int32 (two bf16 each)
    ready: torch.Tensor  # [B] long: row b's first ready[b] blocks are packed (the kernel raises it)
    committed: torch.Tensor  # [B] long: the rows' committed lengths


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: Plan, exact: bool = True, copy: TileCopy | None = None) -> torch.Tensor:
    """q [B, T, H, hd] (fp32) over one layer's cache entries keys/values [B, KV, S, hd + 1] (the
    last feature of every entry is 1; fp32, or bf16 read as the fp32 they widen to) -> [B, T, H * hd]:
    by a C kernel where one runs (with ``copy``: on AMX tiles, in bf16, ``csrc/attention_amx.c``),
    else by tensor ops (``blocked_attention``), which also run where autograd records (training a
    draft layer on a CPU: through the C kernel its q/k/v weights got no gradient)."""
    lib = native.usable(q, keys, values)
    if lib is None or not runs_native(q.shape[-1], q.device):
        return blocked_attention(q, keys, values, plan, exact)
    return _native(lib, q, keys, values, plan, copy)


def runs_native(head_dim: int, device: torch.device) -> bool:
    """Whether ``attention`` runs the C kernel for heads of this size on this device."""
    return device.type == "cpu" and head_dim % 16 == 0 and head_dim <= 128 and native.native_kernel() is not None


@functools.cache
def blocked_is_exact(n_heads: int, n_kv_heads: int, head_dim: int) -> bool:
    """Whether the tensor version gives a query bitwise the same output alone as among other
    queries and rows, on this CPU. Its block sums are small batched products, and some BLAS
    libraries pick their kernel by the batch's layout (MKL on an AMD EPYC, measured: a block's
    product changed with its place in the batch), so this is measured, not assumed."""
    gen = torch.Generator().manual_seed(0)
    B, T, S = 3, 7, 4 * BLOCK + 16
    keys, values = torch.randn(2, B, n_kv_heads, S, head_dim + 1, generator=gen).unbind(0)
    keys[..., head_dim] = values[..., head_dim] = 1.0
    q = torch.randn(B, T, n_heads, head_dim, generator=gen)
    lengths = torch.tensor([5, BLOCK + 3, 3 * BLOCK + 1])
    slots = (lengths[:, None] + torch.arange(T)).unsqueeze(1).expand(B, T, T)
    ancestors = torch.ones(T, T, dtype=torch.bool).tril()
    chained = blocked_attention(q, keys, values, path_plan(lengths[:, None].expand(B, T), slots.masked_fill(~ancestors, -1), n_kv_heads, S))
    for b in range(B):
        for t in range(T):
            plan = chain_plan((lengths[b : b + 1] + t).unsqueeze(1), n_kv_heads, S)
            alone = blocked_attention(q[b : b + 1, t : t + 1], keys[b : b + 1], values[b : b + 1], plan)
            if not torch.equal(alone[0, 0], chained[b, t]):
                return False
    return True


def tiles_take(head_dim: int) -> bool:
    """Whether the AMX attention runs heads of this size here."""
    lib = native.native_kernel()
    return lib is not None and head_dim in (64, 128) and bool(lib.amx_ready())


def _native(lib: ctypes.CDLL, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: Plan, copy: TileCopy | None = None) -> torch.Tensor:
    B, T, H, hd = q.shape
    q = q.contiguous()
    out = torch.empty(B, T, H * hd)
    sb, sh, ss, _ = keys.stride()
    max_keys = int(plan.inplace.max()) + plan.path.shape[-1]
    threads = native.threads(B * T * H * max_keys)  # the split changes no result
    starts = torch.arange(0, B * T + 1, T)  # row b's tokens: [starts[b], starts[b + 1])
    args = [
        q.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(), plan.inplace.data_ptr(), plan.path.data_ptr(), starts.data_ptr(),
        B, T, H, keys.shape[1], plan.path.shape[-1], hd, sb, sh, ss, ctypes.c_float(hd**-0.5), max_keys, threads,
    ]  # fmt: skip
    if copy is None:
        status = lib.attend(*args, keys.dtype == torch.bfloat16)
    else:
        committed = copy.committed.contiguous()
        pb, ph = copy.packed.stride()[:2]
        status = lib.attend_amx(*args, copy.packed.data_ptr(), pb, ph, copy.ready.data_ptr(), committed.data_ptr())
    if status:
        raise MemoryError("attention: out of memory for the scores")
    return out


def blocked_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: Plan, exact: bool = True) -> torch.Tensor:
    """The tensor version: per block of positions, one small product; blocks added in position
    order. ``exact``: exponentials on one thread (``serial``)."""
    B, T, H, hd = q.shape
    plan = plan.blocked
    KV, S = keys.shape[1], keys.shape[2]
    keys, values = keys.to(q.dtype), values.to(q.dtype)
    g = H // KV
    # Queries get a zero feature against the keys' ones column: scoring whole cache entries reads
    # the keys in place (one term 0 * 1 = 0 more in every dot product).
    rows = F.pad(q * hd**-0.5, (0, 1)).view(B, T, KV, g, hd + 1).transpose(1, 2).reshape(B, KV, T * g, hd + 1)
    scores = (rows @ keys[:, :, : plan.span].transpose(2, 3)).view(B, KV, T, g, plan.span)
    width = plan.shared.shape[-1]
    inplace = scores[..., :width] + plan.shared
    top = inplace.amax(-1, keepdim=True)
    if plan.recent_slots is not None:
        R = plan.recent_slots.shape[-1]
        recent = scores.gather(-1, plan.recent_slots.expand(B, KV, T, g, R)) + plan.recent_valid
        top = torch.maximum(top, recent.amax(-1, keepdim=True))
    # Per block of positions: weighted values | summed weights, [B, KV, blocks, T, g, hd + 1].
    with serial(exact):
        weights = torch.exp(inplace - top).view(B, KV, T * g, width // BLOCK, BLOCK).transpose(2, 3)
    sums = (weights @ values[:, :, :width].unflatten(2, (-1, BLOCK))).view(B, KV, width // BLOCK, T, g, hd + 1)
    if plan.recent_slots is not None:
        with serial(exact):
            weights = torch.exp(recent - top).unflatten(-1, (-1, BLOCK)).transpose(3, 4)  # [B, KV, T, blocks, g, BLOCK]
        gathered = values.reshape(B * KV * S, hd + 1).index_select(0, plan.recent_rows).view(B, KV, T, R // BLOCK, BLOCK, hd + 1)
        # After every in-place block: those past the query's own are empty, and adding an exact zero changes no sum.
        sums = torch.cat([sums, (weights @ gathered).transpose(2, 3)], dim=2)  # [B, KV, blocks, T, g, hd + 1]
    # In position order, by a sequential scan: ``sum`` picks its reduction order by the whole
    # tensor's shape (measured: a row's sum changes with the number of queries beside it).
    total = sums.cumsum(2)[:, :, -1]
    out = total[..., :hd] / total[..., hd:]
    return out.transpose(1, 2).reshape(B, T, H * hd)
