"""Speculative decoding by a draft model: a smaller model with the same tokenizer proposes the tree.

One step, for every row of the batch:
  1. the draft model reads the tokens it has not seen (the accepted path and the new root; it
     read the prompt when the row started) into its own KV cache;
  2. it expands the static tree depth by depth: each node's children are its top-k tokens after
     the node, the node's K/V written past the draft cache's committed entries (dropped afterwards:
     the draft cache rolls back to the accepted path by reading that path again next step);
  3. verification exactly as for the other trees (``verify``): the output never depends on the draft.

As ProPD's drafter (``--method propd --drafter model``) the tree changes every step and may be the
root alone: then the draft model does not run, and reads that step's token with the next ones. No
statistics come with a draft model, so ProPD's acceptance model starts from ``PRIOR`` and learns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from propd.decoding.draft import level_layout, tree_levels
from propd.decoding.loop import StepResult, prefill
from propd.decoding.pruning import Pruner
from propd.decoding.sampling import Picker
from propd.decoding.tree import verify
from propd.errors import PropdError
from propd.models.decoder import Decoder, synchronize
from propd.models.kv_cache import KVCache
from propd.tree.tree import TokenTree

# Per depth and rank, the chance a draft model's guess is the model's token given its parent was:
# a round prior (top-1 0.75, then 0.08, 0.03, 0.02) that ProPD's acceptance model moves within a
# few hundred observations; what `propd bench` measured for Qwen2.5-Coder 0.5B drafting the 1.5B
# on MT-Bench coding and writing lies on both sides of it.
PRIOR = [[0.75, 0.08, 0.03, 0.02]] * 8


@dataclass
class SpecState:
    """The draft model's cache and, per row, the tokens it has yet to read [B, M] (padded) and how
    many [B]; ``ar_steps``: AR steps that added to them since it last read."""

    cache: KVCache
    pending: torch.Tensor
    counts: torch.Tensor
    ar_steps: int = 0

    def select(self, rows: torch.Tensor) -> None:
        self.cache.select_rows(rows)
        self.pending, self.counts = self.pending[rows], self.counts[rows]

    def join(self, other: "SpecState") -> None:
        self.cache.join(other.cache)
        width = max(self.pending.shape[1], other.pending.shape[1])
        self.pending = torch.cat([F.pad(self.pending, (0, width - self.pending.shape[1])), F.pad(other.pending, (0, width - other.pending.shape[1]))])
        self.counts = torch.cat([self.counts, other.counts])
        self.ar_steps = max(self.ar_steps, other.ar_steps)


class SpecMethod:
    """A tree filled by a draft model's top-k guesses: static (``step``) or chosen per step (``step_tree``)."""

    drafted: tuple[int, float] | None = None  # the last tree's drafting: levels (a pass each) and seconds (``TreeChooser``)

    def __init__(self, draft: Decoder, tree: TokenTree):
        if tree.size < 2:
            raise PropdError("the spec tree holds only the root: the draft model needs nodes to fill (use --method ar for plain decoding)")
        self.draft, self.tree = draft, tree
        self.reserve(tree.size, tree.depth, tree.max_rank)

    def reserve(self, size: int, depth: int, ranks: int) -> None:
        """Make ``step_tree`` take trees of up to this many tokens and depth (any ranks)."""
        self.tree_size, self.tree_depth = size, depth

    def check_fits(self, target: Decoder) -> None:
        if self.draft.args.vocab_size != target.args.vocab_size:
            raise PropdError(f"the draft model's vocabulary ({self.draft.args.vocab_size} tokens) is not the model's ({target.args.vocab_size}): "
                             "a draft model must share the tokenizer")

    def start(self, decoder: Decoder, cache: KVCache, hidden: torch.Tensor, picker: Picker, prompts: list[list[int]]) -> tuple[torch.Tensor, SpecState]:
        self.check_fits(decoder)
        roots = picker.next_tokens(decoder, decoder.final_norm(hidden))
        draft_cache = self.draft.new_cache(len(prompts), cache.capacity)
        prefill(self.draft, draft_cache, prompts)  # the draft model reads the prompts too
        return roots, SpecState(draft_cache, roots.unsqueeze(1), torch.ones(len(prompts), dtype=torch.long))

    @torch.no_grad()
    def catch_up(self, decoder: Decoder, state: SpecState) -> int:
        """Read the tokens that AR steps left, all but each row's newest (which ``propose`` reads,
        for the root's guesses); how many AR steps they came from (see ``DraftMethod.catch_up``)."""
        ar_steps, state.ar_steps = state.ar_steps, 0
        if ar_steps < 1:
            return 0
        self._read(state.pending[:, :-1], state.counts - 1, state)
        state.pending, state.counts = state.pending.gather(1, (state.counts - 1).unsqueeze(1)), torch.ones_like(state.counts)
        return ar_steps

    def _read(self, tokens: torch.Tensor, counts: torch.Tensor, state: SpecState) -> torch.Tensor:
        """The draft model reads tokens [B, M] (padded), committing each row's first ``counts``: its hidden states [B, M, dim]."""
        out = self.draft.extend(tokens, state.cache.chain(tokens.shape[1]), state.cache)
        state.cache.advance(counts)
        return out

    @torch.no_grad()
    def propose(self, roots: torch.Tensor, state: SpecState, tree: TokenTree) -> torch.Tensor:
        """Steps 1-2: the tree's tokens [B, N], root first."""
        draft, cache = self.draft, state.cache
        B = len(state.counts)
        out = self._read(state.pending, state.counts, state)
        normed = torch.zeros(B, tree.size, draft.args.dim)  # each expanded node's final hidden state
        normed[:, 0] = draft.final_norm(out[torch.arange(B), state.counts - 1])
        tokens = torch.empty(B, tree.size, dtype=torch.long)
        tokens[:, 0] = roots
        synchronize(draft.device)  # the levels' own time (``drafted``), the draft's reading before them apart
        started, level = time.perf_counter(), 0
        for level, at in enumerate(tree_levels(tree), 1):
            guesses = draft.lm_head.topk(normed[:, at.parents], at.guesses)[1]  # [B, n, k]
            tokens[:, at.nodes] = at.chosen(guesses)
            if len(at.expand) == 0:
                break
            normed[:, at.expand] = draft.final_norm(draft.extend(tokens[:, at.expand], level_layout(cache, at.expand, at.paths), cache))
        synchronize(draft.device)
        self.drafted = (level, time.perf_counter() - started)
        return tokens

    def step(self, decoder: Decoder, cache: KVCache, roots: torch.Tensor, state: SpecState, picker: Picker) -> StepResult:
        return self.step_tree(decoder, cache, roots, state, picker, self.tree)[0]

    def step_tree(
        self, decoder: Decoder, cache: KVCache, roots: torch.Tensor, state: SpecState, picker: Picker, tree: TokenTree, pruner: Pruner | None = None,
    ) -> tuple[StepResult, torch.Tensor]:
        """One step over ``tree``: its result and each row's last accepted node [B]. A tree of the
        root alone is a plain AR step: the draft model does not run, and reads the new token after
        the ones it has yet to read."""
        root_only = tree.size == 1
        tokens = roots.unsqueeze(1) if root_only else self.propose(roots, state, tree)
        v = verify(decoder, cache, tree, tokens, picker, pruner)
        if root_only:
            state.pending = F.pad(state.pending, (0, 1)).scatter(1, state.counts.unsqueeze(1), v.roots.unsqueeze(1))
            state.counts = state.counts + 1
            state.ar_steps += 1
        else:  # the draft has read the root: it reads the rest of the accepted path and the new root next
            state.pending, state.counts = v.following, v.counts
            state.ar_steps = 0
        return v.result(), v.last
