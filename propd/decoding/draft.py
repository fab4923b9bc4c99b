"""Tree verification with the draft layer proposing the tree (EAGLE-style drafting).

One step, for every row of the batch:
  1. draft update: the draft reads the model's true features at the tokens accepted last step (for
     the first step, the prompt's last position) and commits them to its own cache; its prediction
     at the newest one gives the root's children;
  2. draft expansion, depth by depth: each node with children in the static tree is fed its
     parent's predicted feature and its own token, attending to the draft cache and its ancestors;
     its top-k fills its children's ranks;
  3. verification exactly as for Medusa trees (``verify``): the output never depends on the draft.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from propd.decoding.ar import ar_pass
from propd.decoding.lookup import LookupState, Offer, graft, lookup_state
from propd.decoding.loop import StepResult
from propd.decoding.pruning import Pruner
from propd.decoding.sampling import Picker
from propd.decoding.tree import Verified, verify
from propd.heads.draft import DraftHead
from propd.models.decoder import Decoder, synchronize
from propd.models.kv_cache import KVCache, Layout, path_slots
from propd.tree.tree import TokenTree, path_products, tree_of

Entries = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # features [B, M, dim], next tokens [B, M], counts [B]
DRAFT_WINDOW = 32  # AR steps: after a longer run, the draft reads only this many of them (``DraftMethod.catch_up``)


@dataclass
class DraftState:
    """The draft layer's cache (one entry per answer position) and the entries it has yet to read:
    the model's features at the tokens accepted since, with the token after each, queued one step's
    entries at a time (a run of AR steps appends without copying) and packed when read. Of a run
    of AR steps, only the last ``DRAFT_WINDOW`` are kept (``queue``)."""

    cache: KVCache
    queued: list[Entries]
    lookup: LookupState | None = None  # the rows' n-gram indexes, where ProPD offers lookup guesses beside the draft's
    dropped: int = 0  # AR steps whose entries left the queue unread: the draft's cache starts afresh at its next read

    @property
    def pending(self) -> Entries:
        """The queued entries, packed: per row its own, in order (rows padded on the right)."""
        self.queued = [_pack(self.queued)]
        return self.queued[0]

    def queue(self, entries: Entries) -> None:
        """Queue an AR step's entries behind those queued; beyond ``DRAFT_WINDOW`` such steps the
        oldest leave unread (``DraftMethod.catch_up``)."""
        self.queued.append(entries)
        if len(self.queued) > DRAFT_WINDOW + 1:
            del self.queued[0]
            self.dropped += 1

    def select(self, rows: torch.Tensor) -> None:
        self.cache.select_rows(rows)
        self.queued = [tuple(x[rows] for x in entries) for entries in self.queued]
        if self.lookup is not None:
            self.lookup.select(rows)

    def join(self, other: "DraftState") -> None:
        """Append ``other``'s rows, step by step from the newest (a joining row has no entries
        of the older steps): packed into one, a running batch's queue lost its steps, and the next
        tree read a continuous batch's AR steps since its last tree (27 ms tree steps at batch 8,
        AMD EPYC)."""
        self.cache.join(other.cache)
        steps = max(len(self.queued), len(other.queued))
        mine, theirs = _aligned(self.queued, steps), _aligned(other.queued, steps)
        self.queued = [_joined(a, b) for a, b in zip(mine, theirs)]
        self.dropped = max(self.dropped, other.dropped)
        if self.lookup is not None:
            self.lookup.join(other.lookup)


def _aligned(queued: list[Entries], steps: int) -> list[Entries]:
    """``queued`` behind as many empty steps as make it ``steps`` long."""
    features, tokens, _ = queued[0]
    B = tokens.shape[0]
    empty = (features.new_zeros(B, 1, features.shape[-1]), tokens.new_zeros(B, 1), tokens.new_zeros(B))
    return [empty] * (steps - len(queued)) + queued


def _pad_entries(entries: Entries, width: int) -> Entries:
    """The same entries with room for ``width`` per row (padding past each row's count)."""
    features, tokens, counts = entries
    extra = width - tokens.shape[1]
    return F.pad(features, (0, 0, 0, extra)), F.pad(tokens, (0, extra)), counts


def _joined(mine: Entries, theirs: Entries) -> Entries:
    """One step's entries of two groups of rows as one (the narrower padded past its counts)."""
    width = max(mine[1].shape[1], theirs[1].shape[1])
    return tuple(torch.cat(pair) for pair in zip(_pad_entries(mine, width), _pad_entries(theirs, width)))


@dataclass(frozen=True)
class Level:
    """One depth of a tree, for drafting it depth by depth: the nodes there, their parents, their
    ranks among their parent's guesses, which of them have children, and those nodes' paths below
    the root [n, depth] (node indices in depth order, the node last)."""

    nodes: torch.Tensor
    parents: torch.Tensor
    ranks: torch.Tensor
    expand: torch.Tensor
    paths: torch.Tensor

    @functools.cached_property
    def guesses(self) -> int:
        """How many of each parent's best guesses its nodes take (the largest rank + 1)."""
        return int(self.ranks.max()) + 1

    def chosen(self, top: torch.Tensor) -> torch.Tensor:
        """Each node's own of its parent's guesses [B, n] from the parents' top ``guesses`` [B, n, k]."""
        return top.gather(2, self._at.expand(top.shape[0], -1, -1)).squeeze(2)

    @functools.cached_property
    def _at(self) -> torch.Tensor:
        return self.ranks.view(1, -1, 1)


@functools.lru_cache(maxsize=256)
def _levels(rank_paths: tuple) -> list[Level]:
    tree = tree_of(rank_paths)
    out = []
    for depth in range(1, tree.depth + 1):
        nodes = (tree.depths == depth).nonzero().flatten()
        expand = nodes[(tree.children[nodes] >= 0).any(dim=1)]
        paths = path_slots(tree.ancestors[expand, 1:].unsqueeze(0), torch.arange(1, tree.size).unsqueeze(0))[0]
        out.append(Level(nodes, tree.parents[nodes], tree.ranks[nodes], expand, paths))
    return out


def tree_levels(tree: TokenTree) -> list[Level]:
    """The tree's ``Level`` at each depth, built once per tree shape (with what a step would
    otherwise work out again in tensor ops, each costing it ~10 us: AMD EPYC)."""
    return _levels(tree.paths)


def level_layout(cache: KVCache, expand: torch.Tensor, paths: torch.Tensor) -> Layout:
    """Where a drafting pass writes the tree nodes ``expand`` (node i at slot lengths + i - 1; the
    root's entry, at lengths - 1, already read) and what each sees: ``paths`` from ``tree_levels``."""
    base = cache.lengths.view(-1, 1, 1) - 1
    return cache.paths(base[:, :, 0] + expand, torch.where(paths >= 0, base + paths, -1))


class DraftMethod:
    """A static tree filled by the draft layer."""

    drafted: tuple[int, float] | None = None  # the last tree's drafting: levels (a pass each) and seconds (``TreeChooser``)
    lookup = False  # whether the rows keep n-gram indexes for prompt-lookup guesses (ProPD: ``step_scored``, ``step_guesses``)

    def __init__(self, draft: DraftHead, tree: TokenTree):
        self.draft = draft
        self.tree = tree
        self.reserve(tree.size, tree.depth, tree.max_rank)

    def reserve(self, size: int, depth: int, ranks: int) -> None:
        """Make ``step_tree`` take trees of up to this many tokens and depth (any ranks)."""
        self.tree_size, self.tree_depth = size, depth

    def start(self, decoder: Decoder, cache: KVCache, hidden: torch.Tensor, picker: Picker, prompts: list[list[int]]) -> tuple[torch.Tensor, DraftState]:
        normed = decoder.final_norm(hidden)
        roots = picker.next_tokens(decoder, normed)
        pending = (normed.float().unsqueeze(1), roots.unsqueeze(1), torch.ones(len(roots), dtype=torch.long, device=roots.device))
        self.draft.prepare(decoder)
        lookup = lookup_state(prompts, roots) if self.lookup else None
        return roots, DraftState(self.draft.decoder(decoder).new_cache(len(roots), cache.capacity), [pending], lookup)

    @torch.no_grad()
    def catch_up(self, decoder: Decoder, state: DraftState) -> int:
        """Read the entries that AR steps queued, all but the newest step's (which ``propose``
        reads, for the root's prediction); how many AR steps they came from. ProPD times this apart
        from the tree that follows and charges it to AR: counted in the tree's time, it made every
        tree tried after a run of AR steps look slow. After more than ``DRAFT_WINDOW`` AR steps
        it reads only the last ``DRAFT_WINDOW`` (``DraftState.queue``) into an emptied cache: the prompt and everything
        before them leave the draft's context (it only proposes; under RoPE the entries it keeps
        see the same distances), and at batch 8, where ProPD keeps to AR and tries a tree now
        and then, reading 80 steps' entries took 21-25 ms, more than the tree step itself, and 8-9
        ms with the window (AMD EPYC)."""
        ar_steps = len(state.queued) - 1 + state.dropped
        if ar_steps < 1:
            return 0
        newest = state.queued.pop()
        self._read(decoder, state)
        state.queued = [newest]
        return ar_steps

    def _read(self, decoder: Decoder, state: DraftState) -> torch.Tensor:
        """The draft reads its queued entries into its cache (committed): its output at each [B, M, dim].
        Where AR steps' entries left the queue unread, the cache starts afresh from the queued ones."""
        features, next_tokens, counts = state.pending
        cache = state.cache
        if state.dropped:
            cache.cut(torch.zeros_like(cache.lengths))
            state.dropped = 0
        out = self.draft.decoder(decoder).forward_layers(self.draft.inputs(features, next_tokens, decoder), cache.chain(next_tokens.shape[1]), cache)
        cache.advance(counts)
        return out

    @torch.no_grad()
    def propose(
        self, decoder: Decoder, roots: torch.Tensor, state: DraftState, tree: TokenTree, probs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Steps 1-2: the tree's tokens [B, N], root first; ``probs`` [B, N], where given, receives the
        draft's probability of each node's token after its parent (``propd calibrate``)."""
        draft = self.draft
        dec = draft.decoder(decoder)
        counts, cache = state.pending[2], state.cache
        B = len(counts)
        out = self._read(decoder, state)

        N = tree.size
        predicted = torch.zeros(B, N, dec.args.dim)  # each node's predicted feature: its children's guess
        predicted[:, 0] = out[torch.arange(B), counts - 1]
        tokens = torch.empty(B, N, dtype=torch.long)
        tokens[:, 0] = roots
        synchronize(decoder.device)  # the levels' own time (``drafted``), the draft's reading before them apart
        started, level = time.perf_counter(), 0
        for level, at in enumerate(tree_levels(tree), 1):
            top = draft.top_tokens(predicted[:, at.parents], decoder, at.guesses, probs is not None)  # [B, n, k]
            guesses, chances = top if probs is not None else (top, None)
            tokens[:, at.nodes] = at.chosen(guesses)
            if probs is not None:
                probs[:, at.nodes] = at.chosen(chances)
            if len(at.expand) == 0:
                break
            x = draft.inputs(predicted[:, tree.parents[at.expand]], tokens[:, at.expand], decoder)
            predicted[:, at.expand] = dec.forward_layers(x, level_layout(cache, at.expand, at.paths), cache)
        synchronize(decoder.device)
        self.drafted = (level, time.perf_counter() - started)
        return tokens

    def step(self, decoder: Decoder, cache: KVCache, roots: torch.Tensor, state: DraftState, picker: Picker) -> StepResult:
        return self.step_tree(decoder, cache, roots, state, picker, self.tree)[0]

    def step_tree(
        self, decoder: Decoder, cache: KVCache, roots: torch.Tensor, state: DraftState, picker: Picker, tree: TokenTree, pruner: Pruner | None = None,
    ) -> tuple[StepResult, torch.Tensor]:
        """One step over ``tree``: its result and each row's last accepted node [B]. A tree of the
        root alone is a plain AR step (``step_root``)."""
        if tree.size == 1:
            return self.step_root(decoder, cache, roots, state, picker)
        tokens = self.propose(decoder, roots, state, tree)
        return self.finish(tokens, verify(decoder, cache, tree, tokens, picker, pruner), state, read=True)

    def step_root(self, decoder: Decoder, cache: KVCache, roots: torch.Tensor, state: DraftState, picker: Picker) -> tuple[StepResult, torch.Tensor]:
        """An AR step (each row's last accepted node: the root): the draft does not run, and reads the
        step's entry later. ProPD takes it wherever trees do not pay; as the verification of a
        one-node tree, its bookkeeping cost a batch-1 step ~0.1 ms more than AR's (Intel Xeon with AMX)."""
        B = len(roots)
        normed, roots = ar_pass(decoder, cache, roots, picker)
        accepted = [[t] for t in roots.tolist()]
        state.queue((normed.float(), roots.unsqueeze(1), torch.ones(B, dtype=torch.long)))
        if state.lookup is not None:
            state.lookup.extend(accepted)
        return StepResult(accepted, roots, [1] * B, [1] * B), torch.zeros(B, dtype=torch.long)

    def step_scored(
        self, decoder: Decoder, cache: KVCache, roots: torch.Tensor, state: DraftState, picker: Picker, tree: TokenTree,
        select: Callable[[list[list[float]], Offer | None], torch.Tensor], pruner: Pruner | None = None, lookup: bool = False,
    ) -> tuple[StepResult, torch.Tensor, torch.Tensor, Offer | None]:
        """Draft ``tree`` (and, with ``lookup``, graft each row's lookup guesses on: the ``Offer``),
        then verify only the nodes [B, N] ``select`` keeps of each row given their draft path
        probabilities [B, N] (whole paths; rows keep different numbers): the step's result, each
        row's last accepted node and the nodes verified (of the offer's tree, where there is one)."""
        probs = torch.ones(len(roots), tree.size)
        drafted = self.propose(decoder, roots, state, tree, probs)
        scores, offer = path_products(tree, probs), None
        if lookup:
            offer = graft(tree, drafted, scores, state.lookup, self.tree_size)
            tree, drafted, scores = offer.tree, offer.tokens, offer.scores
        nodes = select(scores, offer)
        alive, keep, rows = nodes, None, nodes.tolist()
        if all(row == rows[0] for row in rows):  # every row keeps the same nodes (always at batch 1): verified as a smaller tree
            kept = [i for i, taken in enumerate(rows[0]) if taken]  # root first; kept nodes keep their order, so sub-tree node j is kept[j]
            keep = torch.tensor(kept)
            tree, drafted, alive = tree_of(tuple(tree.paths[i - 1] for i in kept[1:])), drafted[:, keep], None
        result, last = self.finish(drafted, verify(decoder, cache, tree, drafted, picker, pruner, alive), state, read=True)
        return result, last if keep is None else keep[last], nodes, offer

    def step_guesses(
        self, decoder: Decoder, cache: KVCache, roots: torch.Tensor, state: DraftState, picker: Picker, select: Callable[[Offer], torch.Tensor | None],
    ) -> tuple[StepResult, torch.Tensor, torch.Tensor | None, Offer | None]:
        """A step without drafting: the rows' lookup guesses that ``select`` keeps [B, N] of the
        root's tree with them grafted on, else (none offered or kept) an AR step; the result, each
        row's last accepted node, the nodes verified and the offer (None for an AR step). The draft
        reads the step's path later, as after an AR step."""
        offer = graft(tree_of(()), roots.unsqueeze(1), [[1.0]] * len(roots), state.lookup, self.tree_size)
        nodes = select(offer) if offer.tree.size > 1 else None
        if nodes is None:
            result, last = self.step_root(decoder, cache, roots, state, picker)
            return result, last, None, None
        result, last = self.finish(offer.tokens, verify(decoder, cache, offer.tree, offer.tokens, picker, alive=nodes), state, read=False)
        return result, last, nodes, offer

    def finish(self, tokens: torch.Tensor, v: Verified, state: DraftState, read: bool) -> tuple[StepResult, torch.Tensor]:
        """Queue the accepted path's features, each with the token after it, for the draft to read
        next step (behind those queued before, where the draft did not ``read`` them this step: a
        root-only step, or lookup guesses alone); the step's result and each row's last accepted node."""
        normed = v.normed if tokens.shape[1] == 1 else v.normed.gather(1, v.offsets.unsqueeze(-1).expand(-1, -1, v.normed.shape[-1]))  # (an AR step: no gather)
        entries = (normed.float(), v.following, v.counts)
        result = v.result()
        if read:
            state.queued = [entries]
        else:
            state.queue(entries)
        if state.lookup is not None:
            state.lookup.extend(result.accepted)
        return result, v.last


def _pack(queued: list[Entries]) -> Entries:
    """Several steps' entries, (features [B, M, dim], next tokens [B, M], counts [B]) each, as one
    queue: per row its own entries in order (rows hold different counts, padded on the right). The
    order is worked out in Python and taken in one gather, none where every step queued one entry
    a row (AR steps): as a dozen tensor ops (sort, repeat_interleave, ...) that no AR step runs,
    packing 32 AR steps' entries took 10-19 ms of thread time on the Intel Xeon with AMX, their
    code cold after the weights' stream."""
    if len(queued) == 1:
        return queued[0]
    features, tokens = torch.cat([e[0] for e in queued], 1), torch.cat([e[1] for e in queued], 1)
    per_step = torch.stack([e[2] for e in queued])  # [steps, B]
    counts, held = per_step.sum(0), per_step.tolist()
    widths = [e[1].shape[1] for e in queued]
    if all(w == 1 for w in widths) and all(c == 1 for row in held for c in row):
        return features, tokens, counts
    rows = range(len(held[0]))
    kept = [[j < step[b] for width, step in zip(widths, held) for j in range(width)] for b in rows]
    most = max(sum(step[b] for step in held) for b in rows)
    order = torch.tensor([([c for c, k in enumerate(row) if k] + [c for c, k in enumerate(row) if not k])[:most] for row in kept])  # (padding: the rest)
    return features.gather(1, order.unsqueeze(-1).expand(-1, -1, features.shape[-1])), tokens.gather(1, order), counts
