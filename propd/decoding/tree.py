"""Tree verification (Medusa / BPD): verify the heads' guesses arranged in a token tree in one pass.

One step, for every row of the batch:
  1. candidates: the heads' top-k at the previous step's last accepted node (kept in the rows' ``TreeState``);
  2. tree: root + candidate tokens at the tree's nodes;
  3. verify: all tokens through the model with the tree mask, K/V appended after the cache;
  4. accept: the longest path whose every token is the token its parent picks (the argmax, or a
     sample: ``sampling``), plus the bonus token (walked from the root; greedy steps of at most
     ``PROJECT_ALL`` tokens project every node to the vocabulary in one product, others only the
     accepted nodes, a product per depth);
  5. cache: keep only the accepted nodes' K/V, packed;
  6. the heads at the last accepted node give the next tree's candidates (made when it needs them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from propd.decoding.ar import ar_pass
from propd.decoding.loop import StepResult
from propd.decoding.pruning import Pruner
from propd.decoding.sampling import Picker
from propd.errors import PropdError
from propd.heads.medusa import MedusaHeads
from propd.models.decoder import Decoder
from propd.models.kv_cache import KVCache, Layout
from propd.tree.tree import TokenTree

PROJECT_ALL = 32  # tokens: up to one row tile, one vocabulary product over every node costs less than one per accepted depth


def tree_tokens(roots: torch.Tensor, candidates: torch.Tensor, tree: TokenTree) -> torch.Tensor:
    """[B] roots + [B, H, K] candidates -> [B, N] tokens at the tree's nodes (root first)."""
    return torch.cat([roots.unsqueeze(1), candidates[:, tree.depths[1:] - 1, tree.ranks[1:]]], dim=1)


def walk(
    tokens: torch.Tensor, tree: TokenTree, accept: Callable[..., tuple[torch.Tensor, torch.Tensor]], alive: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Follow each row's tree from the root while the row accepts a child (among those ``alive``
    [B, N], where early pruning left some).

    tokens: [B, N]; ``accept(rows, nodes, kids, valid)`` says, for rows [R] at nodes [R] whose
    children carry tokens kids [R, C] (``valid`` where a child exists), which children they accept
    [R, C] (the first counts) and the token each would emit instead [R] (``Picker.accept``).
    Returns the last accepted node [B] and the bonus token after it [B]. Only nodes on the accepted
    paths are projected to the vocabulary: one product per depth, over the rows still walking."""
    B = tokens.shape[0]
    last = torch.zeros(B, dtype=torch.long)
    bonus = torch.empty(B, dtype=torch.long)
    rows = torch.arange(B)
    while len(rows):
        kids = tree.children[last[rows]]  # [R, C]
        valid = kids >= 0
        if alive is not None:
            valid &= alive[rows.unsqueeze(1), kids.clamp(min=0)]
        match, picked = accept(rows, last[rows], tokens[rows.unsqueeze(1), kids.clamp(min=0)], valid)
        found = match.any(dim=1)
        bonus[rows[~found]] = picked[~found]
        child = kids.gather(1, match.int().argmax(dim=1, keepdim=True)).squeeze(1)
        last[rows[found]] = child[found]
        rows = rows[found]
    return last, bonus


def walk_picks(rows: list[list[int]], tree: TokenTree, picks: torch.Tensor, alive: torch.Tensor | None = None) -> tuple[list[int], list[int]]:
    """``walk`` where every node's pick [B, N] is known (greedy steps of up to ``PROJECT_ALL``
    tokens): each row of tokens (``rows``, as lists) follows the first (alive) child carrying its
    node's pick, in plain lists (the tensor walk's dozen small ops per depth took 7% of a batch-1
    ProPD step on the AMD EPYC); the last nodes and bonus tokens as lists (``Verified.of`` makes them tensors)."""
    chosen = picks.tolist()
    ok = None if alive is None else alive.tolist()
    last, bonus = [], []
    for b, (row, pick) in enumerate(zip(rows, chosen)):
        node = 0
        while (child := next((k for k in tree.kids[node] if row[k] == pick[node] and (ok is None or ok[b][k])), None)) is not None:
            node = child
        last.append(node)
        bonus.append(pick[node])
    return last, bonus


@dataclass
class Verified:
    """What verifying one tree gave each row: the model's normed hidden state at every node
    [B, N, dim], the accepted path's node indices [B, D+1] (root first, padded) and lengths [B],
    the new roots (bonus tokens) [B], the last accepted node [B] (the one the bonus token follows),
    the token after each node of the path [B, D+1] (the bonus token after the last; padded with it),
    the accepted tokens as lists (the bonus token last), and whether every path is its tree's first
    nodes (a chain's: their K/V stay where they are)."""

    normed: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor
    roots: torch.Tensor
    last: torch.Tensor
    following: torch.Tensor
    accepted: list[list[int]]
    in_place: bool
    verified: list[int]  # per row: tree tokens it ran (its own nodes, where rows keep different ones)
    late: list[int]  # per row: tokens that went through the late layers (fewer where pruning dropped some)

    @classmethod
    def of(
        cls, normed: torch.Tensor, tree: TokenTree, rows: list[list[int]], last: list[int], roots: list[int], verified: list[int], late: list[int],
    ) -> "Verified":
        """From each row's tokens (``rows``), last accepted node and new root, as lists: the tensors
        as views of one (each tensor op costs a decode step ~10 us, run cold after the weights'
        stream: AMD EPYC)."""
        paths = [tree.lineage[node] for node in last]
        width = max(map(len, paths))
        accepted = [[row[n] for n in path[1:]] + [root] for row, path, root in zip(rows, paths, roots)]
        table = torch.tensor([
            [len(path), node, root, *path, *(tree.size - 1,) * (width - len(path)), *tokens, *tokens[-1:] * (width - len(tokens))]
            for path, node, root, tokens in zip(paths, last, roots, accepted)
        ])
        in_place = all(path == tuple(range(len(path))) for path in paths)
        return cls(normed, table[:, 3 : 3 + width], table[:, 0], table[:, 2], table[:, 1], table[:, 3 + width :], accepted, in_place, verified, late)

    def result(self) -> StepResult:
        return StepResult(self.accepted, self.roots, self.verified, self.late)


def verify(
    decoder: Decoder, cache: KVCache, tree: TokenTree, tokens: torch.Tensor, picker: Picker, pruner: Pruner | None = None, alive: torch.Tensor | None = None,
) -> Verified:
    """Steps 3-5: run the tree's tokens [B, N] through the model after the cache (only each row's
    ``alive`` nodes [B, N] where given; with ``pruner``, the late layers on the early survivors
    only), accept each row's longest path that ``picker`` accepts (greedy, or sampled: see
    ``sampling``) and keep only its K/V. The root alone is an AR step, and costs what one does."""
    B = len(tokens)
    if tree.size == 1:
        normed, roots = ar_pass(decoder, cache, tokens[:, 0], picker)
        ones, zeros = torch.ones(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
        return Verified(normed, zeros.unsqueeze(1), ones, roots, zeros, roots.unsqueeze(1), [[t] for t in roots.tolist()], True, [1] * B, [1] * B)
    verified = [tree.size] * B if alive is None else alive.sum(1).tolist()
    normed, alive = run_tree(decoder, cache, tree, tokens, alive, pruner)
    picks = _all_picks(decoder, picker, normed, alive)
    rows = tokens.tolist()
    if picks is not None:
        last, roots = walk_picks(rows, tree, picks, alive)
    else:  # a product per depth, over the rows still walking

        def accept(rows, nodes, kids, valid):
            return picker.accept(decoder, normed[rows, nodes], rows, tree.depths[nodes], kids, valid)

        last, roots = (t.tolist() for t in walk(tokens, tree, accept, alive))
    v = Verified.of(normed, tree, rows, last, roots, verified, verified if pruner is None else alive.sum(1).tolist())
    cache.keep(v.offsets, v.counts, v.in_place)
    return v


def run_tree(
    decoder: Decoder, cache: KVCache, tree: TokenTree, tokens: torch.Tensor, alive: torch.Tensor | None = None, pruner: Pruner | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tree's tokens [B, N] through the model: every node, or each row's ``alive`` nodes [B, N]
    only (whole paths); with ``pruner``, layers [0, k) on them and the late layers on the early
    survivors only (early pruning). The final-normed states [B, N, dim] (zeros at nodes that did
    not run every layer) and which nodes did [B, N] (None: all)."""
    layout = cache.tree(tree.ancestors)
    if alive is None and pruner is None:
        return decoder.final_norm(decoder.extend(tokens, layout, cache)), None
    alive = torch.ones(tokens.shape, dtype=torch.bool) if alive is None else alive
    split = pruner.layer if pruner else decoder.args.n_layers
    hidden = run_nodes(decoder, cache, tree, layout, decoder.embed(tokens), alive, 0, split)
    if pruner is not None:
        alive = alive & pruner.survivors(decoder, hidden, tokens, tree)
        hidden = run_nodes(decoder, cache, tree, layout, hidden, alive, split, decoder.args.n_layers)
    normed = torch.zeros_like(hidden)
    normed[alive] = decoder.final_norm(hidden[alive])
    return normed, alive


def run_nodes(
    decoder: Decoder, cache: KVCache, tree: TokenTree, layout: Layout, x: torch.Tensor, nodes: torch.Tensor, start: int, end: int,
) -> torch.Tensor:
    """Layers [start, end) over each row's ``nodes`` [B, N] (whole paths) of a tree laid out by
    ``layout``, their states taken from x [B, N, dim]: x with theirs updated. Rows keep different
    numbers of nodes: each row's come first, and a shorter row repeats its root after them, which
    the fused layers skip (``Layout.counts``) and other routes compute again into the same slot."""
    B, N = nodes.shape
    if bool(nodes.all()):
        return decoder.forward_layers(x, layout, cache, start, end)
    counts = nodes.sum(1)
    S = int(counts.max())
    order = torch.where(nodes, torch.arange(N), N).sort(dim=1).values[:, :S]
    real = order < N
    order = torch.where(real, order, 0)
    paths = layout.plan.path.gather(1, order.unsqueeze(-1).expand(-1, -1, layout.plan.path.shape[-1]))  # each node's path's slots
    sub = cache.paths(layout.slots.gather(1, order), paths)
    sub.counts = counts
    y = decoder.forward_layers(x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1])), sub, cache, start, end)
    out = x.clone()
    rows, at = real.nonzero(as_tuple=True)
    out[rows, order[rows, at]] = y[rows, at]
    return out


def _all_picks(decoder: Decoder, picker: Picker, normed: torch.Tensor, alive: torch.Tensor | None) -> torch.Tensor | None:
    """Every (alive) node's greedy pick [B, N] from one product, for greedy steps of up to
    ``PROJECT_ALL`` such nodes (measured on the Intel Xeon with AMX: 8 rows cost 2.4 ms, 32 rows
    5.9, one row 1.7, and a walk projects 2-4 depths); None otherwise. A row's logits do not depend
    on the rows beside it on an exact route, so the tokens are the same."""
    nodes = normed.shape[0] * normed.shape[1] if alive is None else int(alive.sum())
    if not picker.greedy or nodes > PROJECT_ALL:
        return None
    if alive is None:
        return decoder.greedy_tokens(normed)
    picks = torch.zeros(alive.shape, dtype=torch.long)
    picks[alive] = decoder.greedy_tokens(normed[alive])
    return picks


@dataclass
class TreeState:
    """Each row's normed state at its last accepted node [B, dim], and the heads' top-k guesses after
    it [B, H, K], made when a tree first needs them (None until then): a ProPD step of the root alone
    needs none, and with the guesses made after every step, ProPD with the Medusa heads kept to AR at
    0.53x AR's speed (batch 1, AMD EPYC)."""

    normed: torch.Tensor
    candidates: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> None:
        self.normed = self.normed[rows]
        if self.candidates is not None:
            self.candidates = self.candidates[rows]

    def join(self, other: "TreeState") -> None:
        self.normed = torch.cat([self.normed, other.normed])
        both = self.candidates is not None and other.candidates is not None
        self.candidates = torch.cat([self.candidates, other.candidates]) if both else None


class TreeMethod:
    """Static-tree verification with Medusa heads; with a chain tree this is BPD."""

    drafted = None  # the heads guess every depth in one pass, whatever the tree's depth: no cost per level

    def __init__(self, heads: MedusaHeads, tree: TokenTree):
        self.heads = heads
        self.tree = tree
        self.reserve(tree.size, tree.depth, tree.max_rank)

    def reserve(self, size: int, depth: int, ranks: int) -> None:
        """Make ``step_tree`` take trees of up to this many tokens, depth and ranks per depth."""
        if depth > self.heads.num_heads:
            raise PropdError(f"tree depth {depth} needs {depth} heads; the checkpoint has {self.heads.num_heads}")
        self.tree_size, self.tree_depth = size, depth
        self.candidate_shape = (max(1, depth), max(1, ranks))

    def catch_up(self, decoder: Decoder, state: TreeState) -> int:
        """Nothing: the heads read only the last accepted node's state, so AR steps leave them nothing to read."""
        return 0

    def propose(self, decoder: Decoder, normed: torch.Tensor, roots: torch.Tensor) -> torch.Tensor:
        """Heads' top-k tokens [B, H, K] from normed hidden states [B, dim] and the roots [B] they produced."""
        return self.heads.top_tokens(normed, roots, decoder, *self.candidate_shape)

    def start(self, decoder: Decoder, cache: KVCache, hidden: torch.Tensor, picker: Picker, prompts: list[list[int]]) -> tuple[torch.Tensor, TreeState]:
        normed = decoder.final_norm(hidden)
        roots = picker.next_tokens(decoder, normed)
        return roots, TreeState(normed)

    def step(self, decoder: Decoder, cache: KVCache, roots: torch.Tensor, state: TreeState, picker: Picker) -> StepResult:
        return self.step_tree(decoder, cache, roots, state, picker, self.tree)[0]

    def step_tree(
        self, decoder: Decoder, cache: KVCache, roots: torch.Tensor, state: TreeState, picker: Picker, tree: TokenTree, pruner: Pruner | None = None,
    ) -> tuple[StepResult, torch.Tensor]:
        """One step over ``tree`` (pruned by ``pruner``, if any): its result and each row's last accepted node [B]."""
        if tree.size > 1 and state.candidates is None:
            state.candidates = self.propose(decoder, state.normed, roots)
        tokens = roots.unsqueeze(1) if tree.size == 1 else tree_tokens(roots, state.candidates, tree)  # [B, N]
        v = verify(decoder, cache, tree, tokens, picker, pruner)
        state.normed, state.candidates = v.normed[torch.arange(len(v.last)), v.last], None
        return v.result(), v.last
