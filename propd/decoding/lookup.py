"""Prompt lookup decoding (PLD, Saxena 2023; a Spec-Bench peer): a row's guesses are the tokens
that followed its newest n-gram the last time that n-gram occurred, in the prompt or the answer so
far. Drafting reads no weights and runs no pass, and it guesses well exactly where the draft layer
guesses worst: answers that copy their context (extraction, summarization, retrieval). Simulated
on the default model's own greedy answers (16 MT-Bench questions, 4 long-context prompts; chains of
4 guesses) it accepts 2.2 tokens a step on extraction, 2.0 on summarization and 2.8 on retrieval,
against 1.1-1.4 on the other categories.

``LookupMethod`` verifies each row's guesses as a chain (rows without a match step as AR does);
ProPD offers the same guesses beside the draft layer's tree (``propd``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from propd.decoding.loop import StepResult
from propd.decoding.sampling import Picker
from propd.decoding.tree import verify
from propd.models.decoder import Decoder
from propd.models.kv_cache import KVCache
from propd.tree.tree import TokenTree, chain, tree_of

MAX_NGRAM = 3  # the longest n-gram looked up (the longest match is taken: it guesses best)
LOOKUP_DEPTH = 4  # guesses ProPD offers a row
LOOKUP_RANK = 1 << 10  # the rank of a lookup guess in a tree's paths: after any drafter's, and no acceptance model's


class NgramIndex:
    """One row's tokens (prompt and answer) and, for n = 1..``MAX_NGRAM``, where the token after each
    n-gram's latest occurrence sits, over the n-grams that end before the row's newest token; and
    whether the row is ``copying``: its last guess's first token was right (on the default model's
    MT-Bench answers a 1-gram's first guess was right 0.30 of the time then, 0.17 otherwise). The
    n-grams are indexed when a guess is asked for: from 4 rows, where ProPD offers no guesses,
    indexing every step's tokens cost it 0.05 ms a batch-8 step (AMD EPYC)."""

    def __init__(self, tokens: list[int]):
        self.tokens: list[int] = []
        self.after: dict[tuple[int, ...], int] = {}
        self.copying = False
        self._guessed: int | None = None  # the first token of the guess made since the last ``extend``
        self._indexed = 0  # tokens whose n-grams ending before them are in ``after``
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        """The row's next tokens (a step's accepted ones)."""
        if self._guessed is not None and tokens:
            self.copying, self._guessed = tokens[0] == self._guessed, None
        self.tokens += tokens

    def _index(self) -> None:
        """Index the n-grams that end before each token added since the last guess."""
        tokens, after = self.tokens, self.after
        for end in range(max(1, self._indexed), len(tokens)):  # the n-grams ending at tokens[end - 1], followed by tokens[end]
            for n in range(1, min(MAX_NGRAM, end) + 1):
                after[tuple(tokens[end - n : end])] = end
        self._indexed = len(tokens)

    def state(self) -> tuple[bool, int]:
        """Whether the row is copying, and the length n of the n-gram its guesses would follow (0: none)."""
        return self.copying, self._match()[1]

    def guess(self, depth: int) -> tuple[list[int], int]:
        """Up to ``depth`` tokens that followed the longest n-gram ending the tokens where it last
        occurred before, and that n (0, and no tokens: no n-gram occurred before)."""
        at, n = self._match()
        if not n:
            return [], 0
        self._guessed = self.tokens[at]
        return self.tokens[at : at + depth], n

    def _match(self) -> tuple[int, int]:
        """Where the token after the longest n-gram ending the tokens sat when that n-gram last
        occurred before, and n; (0, 0) where none did."""
        self._index()
        for n in range(min(MAX_NGRAM, len(self.tokens)), 0, -1):
            at = self.after.get(tuple(self.tokens[-n:]))
            if at is not None:
                return at, n
        return 0, 0


class LookupState:
    """Every row's ``NgramIndex``."""

    def __init__(self, rows: list[NgramIndex]):
        self.rows = rows

    def select(self, rows: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in rows.tolist()]

    def join(self, other: "LookupState") -> None:
        self.rows += other.rows

    def states(self) -> list[tuple[bool, int]]:
        """Each row's ``NgramIndex.state``."""
        return [row.state() for row in self.rows]

    def extend(self, accepted: list[list[int]]) -> None:
        """Each row's accepted tokens (its new root last)."""
        for row, tokens in zip(self.rows, accepted):
            row.extend(tokens)


@dataclass
class Chain:
    """A row's lookup guesses in a tree: its nodes (in order), the node they hang from (0: the root;
    else the drafter's depth-1 node carrying the first guess, whose place the chain takes from its
    second guess on), the length n of the n-gram that matched, the guess index of the first node,
    and whether the row was copying (``NgramIndex``)."""

    nodes: list[int]
    anchor: int
    n: int
    first: int
    copying: bool = False


@dataclass
class Offer:
    """A drafter's tree with the rows' lookup guesses grafted on (``graft``)."""

    tree: TokenTree
    tokens: torch.Tensor  # [B, N] root first
    scores: list[list[float]]  # [B][N] the drafter's path probabilities (0 at the lookup guesses)
    chains: list[Chain | None]  # per row (None: no guesses)
    duplicates: list[list[int]]  # per row: the drafter's nodes whose token a chain carries at the same place, and their subtrees


def graft(tree: TokenTree, tokens: torch.Tensor, scores: list[list[float]], state: LookupState, room: int) -> Offer:
    """The drafted ``tree``, its ``tokens`` [B, N] and their path probabilities ``scores`` [B][N],
    and each row's lookup guesses as a chain of ``LOOKUP_RANK`` nodes: under the drafter's depth-1
    node that carries the first guess (a second copy of it would only cost a tree token), else under
    the root. A drafted node below that one carrying the second guess is a duplicate (listed, with
    its subtree: worth nothing). At most ``room`` nodes in all: rows past it (in row order) offer no
    guesses this step."""
    drafted = tokens.tolist()
    roots = [row[0] for row in drafted]
    paths = list(tree.paths)
    placed: set[tuple[int, ...]] = set()
    plans = []
    for row, index in enumerate(state.rows):
        guesses, n = index.guess(LOOKUP_DEPTH)
        anchor = next((node for node in tree.kids[0] if guesses and drafted[row][node] == guesses[0]), 0)
        first = 1 if anchor else 0
        base = tree.paths[anchor - 1] if anchor else ()
        wanted = [base + (LOOKUP_RANK,) + (0,) * j for j in range(len(guesses) - first)]
        new = [path for path in wanted if path not in placed]
        if len(paths) + 1 + len(new) > room or not wanted:
            plans.append(None)
            continue
        placed.update(new)
        paths += new
        plans.append((wanted, anchor, n, first, guesses, index.copying))
    if len(paths) == len(tree.paths):  # no row has guesses: the drafted tree as it is
        return Offer(tree, tokens, scores, [None] * len(plans), [[] for _ in plans])
    full = tree_of(tuple(paths))
    at = {path: i for i, path in enumerate(full.paths, 1)}
    order = [0] + [at[path] for path in tree.paths]  # the drafted nodes' places in ``full``
    out = [[root] * full.size for root in roots]  # (as lists, made tensors once: a dozen small tensor ops took 0.07 ms a step)
    placed = [[0.0] * full.size for _ in roots]
    for out_row, placed_row, drafted_row, score_row in zip(out, placed, drafted, scores):
        for node, i in enumerate(order):
            out_row[i], placed_row[i] = drafted_row[node], score_row[node]
    chains, duplicates = [], []
    for row, plan in enumerate(plans):
        if plan is None:
            chains.append(None)
            duplicates.append([])
            continue
        wanted, anchor, n, first, guesses, copying = plan
        nodes = [at[path] for path in wanted]
        for node, guess in zip(nodes, guesses[first:]):
            out[row][node] = guess
        chains.append(Chain(nodes, at[tree.paths[anchor - 1]] if anchor else 0, n, first, copying))
        below = [at[tree.paths[kid - 1]] for kid in (tree.kids[anchor] if anchor else ()) if drafted[row][kid] == guesses[first]]
        duplicates.append([node for kid in below for node, line in enumerate(full.lineage) if kid in line])  # each kid and its subtree
    return Offer(full, torch.tensor(out), placed, chains, duplicates)


def lookup_state(prompts: list[list[int]], roots: torch.Tensor) -> LookupState:
    """The rows' indexes over their prompts and first roots."""
    return LookupState([NgramIndex(prompt + [root]) for prompt, root in zip(prompts, roots.tolist())])


class LookupMethod:
    """Each row's lookup guesses verified as a chain of up to ``tree.depth`` tokens after its root."""

    def __init__(self, tree: TokenTree):
        self.tree_size, self.tree_depth = tree.size, tree.depth

    def start(self, decoder: Decoder, cache: KVCache, hidden: torch.Tensor, picker: Picker, prompts: list[list[int]]) -> tuple[torch.Tensor, LookupState]:
        roots = picker.next_tokens(decoder, decoder.final_norm(hidden))
        return roots, lookup_state(prompts, roots)

    def step(self, decoder: Decoder, cache: KVCache, roots: torch.Tensor, state: LookupState, picker: Picker) -> StepResult:
        guesses = [row.guess(self.tree_depth)[0] for row in state.rows]
        width = max(map(len, guesses))
        tree = chain(width)
        tokens = torch.tensor([[root, *guess, *[root] * (width - len(guess))] for root, guess in zip(roots.tolist(), guesses)])
        alive = None
        if any(len(guess) < width for guess in guesses):  # rows verify their own guesses only
            alive = torch.arange(width + 1) <= torch.tensor([len(guess) for guess in guesses]).unsqueeze(1)
        result = verify(decoder, cache, tree, tokens, picker, alive=alive).result()
        state.extend(result.accepted)
        return result
