"""The batched generation loop shared by every method.

A method (AR, tree verification, ProPD) only says how one step turns the current state into newly
accepted tokens per row; this loop owns prefill, stopping at EOS / the token limit, dropping
finished rows from the batch, streaming, and the per-row metrics.

Invariant between steps: the KV cache holds every accepted token of a row except the newest one,
its ``root``, which the next step feeds to the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from propd.models.decoder import Decoder
from propd.models.kv_cache import KVCache


@dataclass
class RowStats:
    """What happened to one sequence: its new tokens and what each decode step cost and gave."""

    token_ids: list[int] = field(default_factory=list)
    step_accepted: list[int] = field(default_factory=list)  # tokens each step emitted (bonus included; EOS / the limit cut the last)
    step_tree_tokens: list[int] = field(default_factory=list)  # tokens verified by each step (root included)
    step_late_tokens: list[int] = field(default_factory=list)  # tokens that went through the late layers
    step_seconds: list[float] = field(default_factory=list)
    prefill_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.step_accepted)

    @property
    def mean_accepted(self) -> float:
        """Tokens per decode step (AR: 1.0); the prefill's first token is not counted."""
        return sum(self.step_accepted) / max(1, self.steps)


@dataclass
class StepResult:
    accepted: list[list[int]]  # per active row: accepted tokens, bonus token last (always >= 1; EOS / the limit may cut them)
    roots: torch.Tensor  # [B] each row's new root (= its bonus token)
    tree_tokens: list[int]  # per row: tokens verified (root included)
    late_tokens: list[int]  # per row: tokens that went through the late layers (ProPD prunes before them)


class Method(Protocol):
    """One decoding method. ``start`` sees the prefill's last hidden states [B, dim] and returns the first roots [B];
    ``step`` runs one forward pass over the roots (and whatever it guesses after them)."""

    tree_size: int  # tokens a step writes into the cache past a row's length
    tree_depth: int  # positions a step reaches past a row's length

    def start(self, decoder: Decoder, hidden: torch.Tensor) -> torch.Tensor: ...

    def step(self, decoder: Decoder, cache: KVCache, roots: torch.Tensor) -> StepResult: ...

    def select_rows(self, rows: torch.Tensor) -> None: ...


StreamCallback = Callable[[int, list[int]], None]  # (row index in the batch, new token ids)


@torch.inference_mode()
def generate_batch(
    decoder: Decoder,
    method: Method,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_ids: set[int],
    on_tokens: StreamCallback | None = None,
) -> list[RowStats]:
    """Greedy-decode a batch of tokenised prompts; every row gets exactly what it would get alone."""
    t0 = time.perf_counter()
    B = len(prompts)
    max_len = max(len(p) for p in prompts) + max_new_tokens + method.tree_size + 1
    cache = decoder.new_cache(B, max_len)
    stats = [RowStats() for _ in range(B)]

    hidden_last = _prefill(decoder, cache, prompts)
    roots = method.start(decoder, hidden_last)
    prefill_seconds = time.perf_counter() - t0
    active = list(range(B))  # batch row -> original row
    first = [[t] for t in roots.tolist()]
    _, done = _emit(first, active, stats, max_new_tokens, eos_ids, on_tokens)
    for s in stats:
        s.prefill_seconds = prefill_seconds

    while True:
        keep = [i for i, d in enumerate(done) if not d]
        if not keep:
            break
        if len(keep) < len(active):
            rows = torch.tensor(keep)
            cache.select_rows(rows)
            method.select_rows(rows)
            roots = roots[rows]
            active = [active[i] for i in keep]
        t = time.perf_counter()
        result = method.step(decoder, cache, roots)
        roots = result.roots
        dt = time.perf_counter() - t
        emitted, done = _emit(result.accepted, active, stats, max_new_tokens, eos_ids, on_tokens)
        for i, row in enumerate(active):
            s = stats[row]
            s.step_accepted.append(emitted[i])
            s.step_tree_tokens.append(result.tree_tokens[i])
            s.step_late_tokens.append(result.late_tokens[i])
            s.step_seconds.append(dt)

    total = time.perf_counter() - t0
    for s in stats:
        s.seconds = total
    return stats


PREFILL_CHUNK = 256  # prompt tokens per pass: bounds the attention scores' memory on long prompts


def _prefill(decoder: Decoder, cache: KVCache, prompts: list[list[int]]) -> torch.Tensor:
    """Run the right-padded prompts through the model in chunks; return each row's last hidden
    state [B, dim]. Padding comes after a row's tokens, so none of them sees it."""
    B, T = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(B, T, dtype=torch.long, device=cache.device)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts], device=cache.device)
    last = torch.empty(B, decoder.args.dim, device=cache.device)
    for start in range(0, T, PREFILL_CHUNK):
        chunk = tokens[:, start : start + PREFILL_CHUNK]
        hidden = decoder.extend(chunk, cache.chain(chunk.shape[1]), cache)
        cache.advance(torch.full((B,), chunk.shape[1], device=cache.device))
        ends_here = (lengths > start) & (lengths <= start + chunk.shape[1])
        last[ends_here] = hidden[ends_here, lengths[ends_here] - 1 - start]
    cache.lengths = lengths
    return last


def _emit(accepted, active, stats, max_new_tokens, eos_ids, on_tokens) -> tuple[list[int], list[bool]]:
    """Append accepted tokens (cut at EOS / the limit), stream them; say how many each row emitted
    and which rows are done."""
    done, emitted = [], []
    for i, row in enumerate(active):
        out = stats[row].token_ids
        new = []
        for tok in accepted[i]:
            if len(out) + len(new) >= max_new_tokens:
                break
            new.append(tok)
            if tok in eos_ids:
                break
        out.extend(new)
        if on_tokens is not None and new:
            on_tokens(row, new)
        emitted.append(len(new))
        done.append(len(out) >= max_new_tokens or (bool(out) and out[-1] in eos_ids))
    return emitted, done
