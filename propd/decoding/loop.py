"""The decode loop shared by every method, with rows joining and leaving between steps.

A method (AR, tree verification, ProPD) only says how one step turns the current state into newly
accepted tokens per row; this loop owns prefill, stopping at EOS / the token limit, rows joining
(continuous batching: a prompt is prefilled a chunk at a time between decode steps, then its row
joins the batch) and leaving (done or cancelled), and the per-row metrics. A method object holds
configuration only; what a generation carries from step to step lives in a ``State`` the method
makes in ``start`` and the loop owns, row by row.

Invariant between steps: the KV cache holds every accepted token of a row except the newest one,
its ``root``, which the next step feeds to the model.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch

from propd.decoding.sampling import Picker, RowChoice, Sampling
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
    # ProPD: tokens its acceptance model expected of each step's tree; None where EOS or the limit cut the
    # step's tokens (what it accepted past the cut is not emitted, so it is no test of the expectation)
    step_expected: list[float | None] = field(default_factory=list)
    prefill_seconds: float = 0.0
    seconds: float = 0.0  # from submission to the last token
    share_seconds: float = 0.0  # its share of the loop's time: each step's split evenly among the rows in it, a prefill among its group

    @property
    def steps(self) -> int:
        return len(self.step_accepted)

    @property
    def mean_accepted(self) -> float:
        """Tokens per decode step (AR: 1.0); the prefill's first token is not counted."""
        return sum(self.step_accepted) / max(1, self.steps)


def summarize(rows: list[RowStats], seconds: float) -> dict:
    """What ``--json`` and ``bench`` report of these rows' generations, taken together over ``seconds``."""
    new = sum(len(r.token_ids) for r in rows)
    steps = sum(r.steps for r in rows)
    judged = [(e, a) for r in rows for e, a in zip(r.step_expected, r.step_accepted) if e is not None]  # ProPD's uncut steps

    def per_step(total: float, digits: int) -> float | None:
        return round(total / steps, digits) if steps else None

    return {
        "new_tokens": new,
        "seconds": round(seconds, 4),
        "tokens_per_s": round(new / seconds, 3) if seconds else None,
        "steps": steps,
        "mean_accepted": per_step(sum(sum(r.step_accepted) for r in rows), 4),
        "expected_accepted": round(sum(e for e, _ in judged) / len(judged), 4) if judged else None,  # ProPD's acceptance model, per uncut step
        "observed_accepted": round(sum(a for _, a in judged) / len(judged), 4) if judged else None,  # what those steps accepted
        "tree_tokens_per_step": per_step(sum(sum(r.step_tree_tokens) for r in rows), 3),
        "late_tokens_per_step": per_step(sum(sum(r.step_late_tokens) for r in rows), 3),
        "ms_per_step": per_step(1e3 * sum(sum(r.step_seconds) for r in rows), 3),
    }


@dataclass
class StepResult:
    accepted: list[list[int]]  # per active row: accepted tokens, bonus token last (always >= 1; EOS / the limit may cut them)
    roots: torch.Tensor  # [B] each row's new root (= its bonus token)
    tree_tokens: list[int]  # per row: tokens verified (root included)
    late_tokens: list[int]  # per row: tokens that went through the late layers (ProPD prunes before them)
    expected: list[float] | None = None  # ProPD: per row, accepted tokens its acceptance model expected of the row's tree


class State(Protocol):
    """What a method carries for its rows from one step to the next (the drafter's next guesses,
    the draft layer's cache), changed in place by ``step``."""

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (others left the batch)."""

    def join(self, other: State) -> None:
        """Append ``other``'s rows after these (new rows joined the batch)."""


class Stateless:
    """The state of a method that carries nothing between steps (AR)."""

    def select(self, rows: torch.Tensor) -> None:
        pass

    def join(self, other: State) -> None:
        pass


class Method(Protocol):
    """One decoding method. ``start`` sees the prefill's last hidden states [B, dim] of rows whose
    prompts (token ids) fill ``cache`` and returns their first roots [B] and state; ``step`` runs one forward
    pass over the roots (and whatever it guesses after them). ``picker`` says how each row picks
    its tokens (greedy or sampled)."""

    tree_size: int  # tokens a step writes into the cache past a row's length
    tree_depth: int  # positions a step reaches past a row's length

    def start(self, decoder: Decoder, cache: KVCache, hidden: torch.Tensor, picker: Picker, prompts: list[list[int]]) -> tuple[torch.Tensor, State]: ...

    def step(self, decoder: Decoder, cache: KVCache, roots: torch.Tensor, state: State, picker: Picker) -> StepResult: ...


@dataclass(eq=False)
class Row:
    """One sequence in the loop: its prompt, its token limit, and what it produced."""

    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling | None = None  # None: greedy
    seed: int = 0
    stats: RowStats = field(default_factory=RowStats)
    done: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def finish_reason(self) -> str:
        """``stop`` (EOS or cancelled by a stop string), or ``length`` (the token limit)."""
        return "length" if len(self.stats.token_ids) >= self.max_new_tokens else "stop"

    def choice(self) -> RowChoice:
        return RowChoice(self.sampling, self.seed, len(self.stats.token_ids))


@dataclass
class StepRecord:
    """One decode step of the running rows: its wall time and, per row, tokens emitted, verified
    and sent through the late layers."""

    seconds: float
    emitted: list[int]
    tree_tokens: list[int]
    late_tokens: list[int]


LEAD_SCALE = 4.0  # tokens: in a fixed batch, a row this far ahead of the furthest-behind one counts 1 / e of it (``DecodeLoop.weights``)
PREFILL_CHUNK = 256  # prompt tokens per pass: bounds the attention scores' memory and the stall of running rows


class _Joining:
    """Rows whose prompts are being prefilled, one chunk per ``DecodeLoop.advance``, in a cache of their own."""

    def __init__(self, decoder: Decoder, rows: list[Row], tree_size: int):
        self.rows = rows
        self.cache = decoder.new_cache(len(rows), max(len(r.prompt) + r.max_new_tokens for r in rows) + tree_size + 1)
        self.chunks = prefill_chunks(decoder, self.cache, [r.prompt for r in rows])
        self.seconds = 0.0


class DecodeLoop:
    """Rows decoding together. ``submit`` queues prompts; each ``advance`` runs one prefill chunk of
    the oldest queued group (whose rows join the batch once their prompts are in) and one decode step
    of the running rows. Every row gets exactly the tokens it would get alone."""

    def __init__(self, decoder: Decoder, method: Method, eos_ids: set[int]):
        self.decoder, self.method, self.eos_ids = decoder, method, eos_ids
        self.rows: list[Row] = []  # running rows, in the cache's row order
        self.cache: KVCache | None = None
        self.state: State | None = None
        self.roots: torch.Tensor | None = None
        self.joining: deque[_Joining] = deque()
        self.last_step: StepRecord | None = None  # the step of the latest ``advance``, if it ran one
        self.fixed = False  # no row joins after the first group's: the batch ends with its slowest row (``weights``)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.joining)

    @property
    def waiting(self) -> int:
        """Rows submitted whose prompts are not in yet."""
        return sum(len(j.rows) for j in self.joining)

    @property
    def in_flight(self) -> int:
        """Rows submitted and not finished (finished ones leave before others join: ``advance``)."""
        return self.waiting + sum(not row.done for row in self.rows)

    def submit(self, prompts: list[list[int]], max_new_tokens: int | list[int], sampling: Sampling | list[Sampling | None] | None = None,
               seeds: list[int] | None = None) -> list[Row]:
        """Queue prompts (token ids) to decode, prefilled together; returns their rows. ``sampling``
        None decodes greedily; sampled row k takes seed ``seeds[k]`` (default: the settings' seed + k)."""
        limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        settings = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        if seeds is None:
            bases = {id(s): s.base_seed() for s in settings if s is not None}
            seeds = [bases[id(s)] + k if s is not None else 0 for k, s in enumerate(settings)]
        rows = [Row(p, n, s, seed) for p, n, s, seed in zip(prompts, limits, settings, seeds)]
        self.joining.append(_Joining(self.decoder, rows, self.method.tree_size))
        return rows

    def cancel(self, row: Row) -> None:
        """Stop a row: it leaves the batch before the next step (a client went away, a stop string)."""
        row.done = True

    @torch.inference_mode()
    def advance(self) -> list[tuple[Row, list[int]]]:
        """One prefill chunk (if prompts wait) and one decode step (if rows run); the new tokens of
        every row that got some, in order. Rows that finished have ``done`` set."""
        self.last_step = None
        with self.decoder.cores():
            self._leave()  # before rows join: the cache's tensor then has their room
            events = self._prefill_chunk() if self.joining else []
            self._leave()
            if self.rows:
                events += self._step()
        return events

    def _prefill_chunk(self) -> list[tuple[Row, list[int]]]:
        group = self.joining[0]
        t = time.perf_counter()
        hidden = next(group.chunks)
        group.seconds += time.perf_counter() - t
        if hidden is None:
            return []
        self.joining.popleft()
        roots, state = self.method.start(self.decoder, group.cache, hidden, Picker([r.choice() for r in group.rows]), [r.prompt for r in group.rows])
        for row in group.rows:
            row.stats.prefill_seconds = group.seconds
            row.stats.share_seconds += group.seconds / len(group.rows)
        if self.cache is None:
            self.cache, self.state, self.roots, self.rows = group.cache, state, roots, []
        else:
            self.cache.join(group.cache)
            self.state.join(state)
            self.roots = torch.cat([self.roots, roots])
        self.rows += group.rows
        events = self._emit(group.rows, [[t] for t in roots.tolist()])[0]
        return events

    def _leave(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.state, self.roots = [], None, None, None
            return
        rows = torch.tensor(keep, device=self.cache.device)
        self.cache.select_rows(rows)
        self.state.select(rows)
        self.roots = self.roots[rows]
        self.rows = [self.rows[i] for i in keep]

    def _step(self) -> list[tuple[Row, list[int]]]:
        t = time.perf_counter()
        result = self.method.step(self.decoder, self.cache, self.roots, self.state, Picker([r.choice() for r in self.rows], self.weights()))
        self.roots = result.roots
        dt = time.perf_counter() - t
        events, emitted = self._emit(self.rows, result.accepted)
        for i, row in enumerate(self.rows):
            s = row.stats
            s.step_accepted.append(emitted[i])
            s.step_tree_tokens.append(result.tree_tokens[i])
            s.step_late_tokens.append(result.late_tokens[i])
            s.step_seconds.append(dt)
            s.share_seconds += dt / len(self.rows)
            if result.expected is not None:
                s.step_expected.append(result.expected[i] if emitted[i] == len(result.accepted[i]) else None)
        self.last_step = StepRecord(dt, emitted, result.tree_tokens, result.late_tokens)
        return events

    def weights(self) -> list[float] | None:
        """What each row's next tokens are worth to a ``fixed`` batch: it ends with its slowest row,
        so a row ``lead`` tokens ahead of the one with the most left to emit counts exp(-lead /
        ``LEAD_SCALE``) (on 8 MT-Bench questions at batch 8, a static 2-token tree accepted 1.49
        tokens a row per step, yet the batch took 73 steps for 96 tokens, its rows 52-73). None
        (each the same) where rows may join, since there every token counts, or where no row is ahead."""
        if not self.fixed:
            return None
        left = [r.max_new_tokens - len(r.stats.token_ids) for r in self.rows]
        most = max(left)
        return None if min(left) == most else [math.exp((n - most) / LEAD_SCALE) for n in left]

    def _emit(self, rows: list[Row], accepted: list[list[int]]) -> tuple[list[tuple[Row, list[int]]], list[int]]:
        """Append accepted tokens (cut at EOS / the limit); the rows' new tokens and how many each emitted."""
        events, emitted = [], []
        now = time.perf_counter()
        for row, tokens in zip(rows, accepted):
            out = row.stats.token_ids
            new = []
            for tok in tokens if not row.done else []:
                if len(out) + len(new) >= row.max_new_tokens:
                    break
                new.append(tok)
                if tok in self.eos_ids:
                    break
            out.extend(new)
            if new:
                events.append((row, new))
            emitted.append(len(new))
            if len(out) >= row.max_new_tokens or (out and out[-1] in self.eos_ids):
                row.done = True
            row.stats.seconds = now - row.submitted
        return events, emitted


StreamCallback = Callable[[int, list[int]], None]  # (row index in the batch, new token ids)


def generate_batch(
    decoder: Decoder,
    method: Method,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_ids: set[int],
    on_tokens: StreamCallback | None = None,
    sampling: Sampling | None = None,
    seeds: list[int] | None = None,
) -> list[RowStats]:
    """Decode a batch of tokenised prompts, prefilled together, greedily or by ``sampling``; every
    row gets exactly what it would get alone."""
    loop = DecodeLoop(decoder, method, eos_ids)
    rows = loop.submit(prompts, max_new_tokens, sampling, seeds)
    loop.fixed = True
    index = {id(row): i for i, row in enumerate(rows)}
    while loop.busy:
        for row, tokens in loop.advance():
            if on_tokens is not None:
                on_tokens(index[id(row)], tokens)
    return [row.stats for row in rows]


def generate_continuous(
    decoder: Decoder,
    method: Method,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_ids: set[int],
    rows: int,
    on_tokens: StreamCallback | None = None,
    sampling: Sampling | None = None,
    seeds: list[int] | None = None,
) -> list[RowStats]:
    """Decode tokenised prompts with at most ``rows`` in flight, the next ones joining as rows
    finish, as ``propd serve`` batches them: no row waits for a batch's slowest one. Prompt k
    takes seed ``seeds[k]`` (default k); every row gets exactly what it would get alone."""
    loop = DecodeLoop(decoder, method, eos_ids)
    seeds = list(range(len(prompts))) if seeds is None else seeds
    submitted: list[Row] = []
    index: dict[int, int] = {}
    while len(submitted) < len(prompts) or loop.busy:
        room = rows - loop.in_flight
        if room > 0 and len(submitted) < len(prompts):
            start = len(submitted)
            group = loop.submit(prompts[start : start + room], max_new_tokens, sampling, seeds[start : start + room])
            index |= {id(row): start + i for i, row in enumerate(group)}
            submitted += group
        for row, tokens in loop.advance():
            if on_tokens is not None:
                on_tokens(index[id(row)], tokens)
    return [row.stats for row in submitted]


def prefill_chunks(decoder: Decoder, cache: KVCache, prompts: list[list[int]]) -> Iterator[torch.Tensor | None]:
    """Run the right-padded prompts through the model a chunk at a time, yielding None after each
    chunk but the last, and then each row's last hidden state [B, dim]. Padding comes after a row's
    tokens, so none of them sees it."""
    B, T = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(B, T, dtype=torch.long, device=cache.device)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts], device=cache.device)
    last = torch.empty(B, decoder.args.dim, device=cache.device)
    for start in range(0, T, PREFILL_CHUNK):
        chunk = tokens[:, start : start + PREFILL_CHUNK]
        layout = cache.chain(chunk.shape[1])
        layout.counts = (lengths - start).clamp(0, chunk.shape[1])  # the fused layers skip the padding (8 MT-Bench prompts: a fifth of the tokens)
        hidden = decoder.extend(chunk, layout, cache, eager=True)
        cache.advance(torch.full((B,), chunk.shape[1], device=cache.device))
        ends_here = (lengths > start) & (lengths <= start + chunk.shape[1])
        last[ends_here] = hidden[ends_here, lengths[ends_here] - 1 - start]
        if start + PREFILL_CHUNK < T:
            yield None
    cache.cut(lengths)
    yield last


def prefill(decoder: Decoder, cache: KVCache, prompts: list[list[int]]) -> torch.Tensor:
    """All of ``prefill_chunks`` at once: the rows' last hidden states [B, dim]."""
    *_, last = prefill_chunks(decoder, cache, prompts)
    return last
