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

from dataclasses import dataclass

import torch

from propd.models.kernels import serial

BLOCK = 32


@dataclass
class Plan:
    """How one step's queries read one layer's cache [B, KV, S, hd + 1]. Masks broadcast against
    scores [B, KV, T, group, *]."""

    span: int  # key slots [0, span) are scored
    shared: torch.Tensor  # [B, 1, T, 1, Cs] bool: which of the in-place columns [0, Cs) each query sees (Cs: a positive multiple of BLOCK)
    recent_slots: torch.Tensor | None  # [B, 1, T, 1, R] long: slot holding position start + r on the query's path
    recent_valid: torch.Tensor | None  # [B, 1, T, 1, R] bool
    recent_rows: torch.Tensor | None  # [B * KV * T * R] those slots as rows of the cache flattened to [B * KV * S, hd + 1]
    recent_block: torch.Tensor | None  # [B, 1, R / BLOCK, T, 1, 1] index of each recent block among all blocks: start / BLOCK + r


def round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def chain_plan(lengths: torch.Tensor, T: int) -> Plan:
    """New tokens at slots lengths + [0, T), each seeing every slot up to its own (prefill, AR):
    slots are positions throughout, so every block is read in place."""
    width = round_up(int(lengths.max()) + T)
    position = lengths.unsqueeze(1) + torch.arange(T, device=lengths.device)  # [B, T]
    shared = torch.arange(width, device=lengths.device) <= position.unsqueeze(-1)  # [B, T, Cs]
    return Plan(width, shared[:, None, :, None], None, None, None, None)


def path_plan(base: torch.Tensor, path_slots: torch.Tensor, n_kv_heads: int, max_len: int) -> Plan:
    """Queries that see the committed slots [0, base) and then their path.

    base: [B, T] committed entries each query sees (slot == position below it); path_slots:
    [B, T, D] the slots holding positions base, base + 1, ... on the query's path, itself last,
    padded with -1. The in-place region extends R columns past the last in-place block, all
    masked, so that it has an (empty) block wherever a query's recent blocks go."""
    B, T, D = path_slots.shape
    device = base.device
    start = base // BLOCK * BLOCK  # [B, T] first position not read in place
    path_len = (path_slots >= 0).sum(-1)  # [B, T]
    R = round_up(int((base - start + path_len).max()))
    width = int(start.max()) + R
    shared = torch.arange(width, device=device) < start.unsqueeze(-1)  # [B, T, Cs]
    pos = start.unsqueeze(-1) + torch.arange(R, device=device)  # [B, T, R] positions in the recent window
    offset = pos - base.unsqueeze(-1)  # < 0: committed; else index into the path
    on_path = path_slots.gather(2, offset.clamp(0, D - 1))
    slots = torch.where(offset < 0, pos, on_path)
    valid = (offset < path_len.unsqueeze(-1)) & (slots >= 0)
    slots = slots.clamp(min=0)
    span = max(width, int(slots.max()) + 1)
    heads = torch.arange(B * n_kv_heads, device=device).view(B, n_kv_heads, 1) * max_len
    rows = (heads + slots.view(B, 1, T * R)).flatten()
    block = (start // BLOCK).view(B, 1, 1, T, 1, 1) + torch.arange(R // BLOCK, device=device).view(1, 1, -1, 1, 1, 1)
    return Plan(span, shared[:, None, :, None], slots[:, None, :, None], valid[:, None, :, None], rows, block)


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: Plan, exact: bool = True) -> torch.Tensor:
    """q [B, T, H, hd] (fp32) over one layer's cache entries keys/values [B, KV, S, hd + 1] (the
    last feature of every entry is 1) -> [B, T, H * hd]. Query heads sharing a K/V head are its rows.
    ``exact``: exponentials on one thread (``serial``)."""
    B, T, H, hd = q.shape
    KV, S = keys.shape[1], keys.shape[2]
    g = H // KV
    rows = (q * hd**-0.5).view(B, T, KV, g, hd).transpose(1, 2).reshape(B, KV, T * g, hd)
    scores = (rows @ keys[:, :, : plan.span, :hd].transpose(2, 3)).view(B, KV, T, g, plan.span)
    width = plan.shared.shape[-1]
    inplace = scores[..., :width].masked_fill(~plan.shared, float("-inf"))
    top = inplace.amax(-1, keepdim=True)
    if plan.recent_slots is not None:
        R = plan.recent_slots.shape[-1]
        recent = scores.gather(-1, plan.recent_slots.expand(B, KV, T, g, R)).masked_fill(~plan.recent_valid, float("-inf"))
        top = torch.maximum(top, recent.amax(-1, keepdim=True))
    # Per block of positions: weighted values | summed weights, [B, KV, blocks, T, g, hd + 1].
    with serial(exact):
        weights = torch.exp(inplace - top).view(B, KV, T * g, width // BLOCK, BLOCK).transpose(2, 3)
    sums = (weights @ values[:, :, :width].unflatten(2, (-1, BLOCK))).view(B, KV, width // BLOCK, T, g, hd + 1)
    if plan.recent_slots is not None:
        with serial(exact):
            weights = torch.exp(recent - top).unflatten(-1, (-1, BLOCK)).transpose(3, 4)  # [B, KV, T, blocks, g, BLOCK]
        gathered = values.reshape(B * KV * S, hd + 1).index_select(0, plan.recent_rows).view(B, KV, T, R // BLOCK, BLOCK, hd + 1)
        recent_sums = (weights @ gathered).transpose(2, 3)  # [B, KV, blocks, T, g, hd + 1]
        sums.scatter_add_(2, plan.recent_block.expand_as(recent_sums), recent_sums)  # into the query's empty blocks after its in-place ones
    # In position order, by a sequential scan: ``sum`` picks its reduction order by the whole
    # tensor's shape (measured: a row's sum changes with the number of queries beside it).
    total = sums.cumsum(2)[:, :, -1]
    out = total[..., :hd] / total[..., hd:]
    return out.transpose(1, 2).reshape(B, T, H * hd)
