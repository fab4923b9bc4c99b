"""Tree verification (Medusa / BPD): verify the heads' guesses arranged in a token tree in one pass.

One step, for every row of the batch (DESIGN.md section 2):
  1. candidates: the heads' top-k at the previous step's last accepted node (kept in ``self.candidates``);
  2. tree: root + candidate tokens at the tree's nodes;
  3. verify: all tokens through the model with the tree mask, K/V appended after the cache;
  4. accept: the longest path whose every token is its parent's argmax, plus the bonus token;
  5. cache: keep only the accepted nodes' K/V, packed;
  6. the heads at the last accepted node give the next step's candidates.
"""

from __future__ import annotations

import torch

from propd.decoding.loop import StepResult
from propd.errors import PropdError
from propd.heads.medusa import MedusaHeads
from propd.models.decoder import Decoder
from propd.models.kv_cache import KVCache
from propd.tree.tree import TokenTree


def tree_tokens(roots: torch.Tensor, candidates: torch.Tensor, tree: TokenTree) -> torch.Tensor:
    """[B] roots + [B, H, K] candidates -> [B, N] tokens at the tree's nodes (root first)."""
    return torch.cat([roots.unsqueeze(1), candidates.flatten(1)[:, tree.candidate_index]], dim=1)


def greedy_accept(tokens: torch.Tensor, predictions: torch.Tensor, tree: TokenTree) -> torch.Tensor:
    """The deepest node [B] whose whole root path is correct: every token equals its parent's argmax.

    tokens, predictions: [B, N]. Two nodes of equal depth cannot both qualify (siblings carry distinct
    tokens, and their depth-1 ancestors would both have to equal the root's argmax), so it is unique."""
    correct = tokens == predictions[:, tree.parents]
    correct[:, 0] = True
    wrong_on_path = (~correct).float() @ tree.ancestors.T.float()  # [B, N] wrong nodes on each node's path
    score = torch.where(wrong_on_path == 0, tree.depths + 1, 0)
    return score.argmax(dim=1)


def accepted_offsets(tree: TokenTree, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Node indices [B, D+1] of each row's accepted path (root first, padded) and their counts [B]."""
    counts = tree.depths[last] + 1
    on_path = tree.ancestors[last]  # [B, N], in index order = root-to-node order
    n = tree.size
    order = torch.where(on_path, torch.arange(n), n).sort(dim=1).values[:, : int(counts.max())]
    return order.clamp(max=n - 1), counts


class TreeMethod:
    """Static-tree verification with Medusa heads; with a chain tree this is BPD."""

    def __init__(self, heads: MedusaHeads, tree: TokenTree):
        if tree.depth > heads.num_heads:
            raise PropdError(f"tree depth {tree.depth} needs {tree.depth} heads; the checkpoint has {heads.num_heads}")
        self.heads = heads
        self.tree = tree
        self.tree_size = tree.size
        self.candidates: torch.Tensor | None = None  # [B, H, K]

    def propose(self, decoder: Decoder, normed: torch.Tensor) -> torch.Tensor:
        """Heads' top-k tokens [B, H, K] from normed hidden states [B, dim]."""
        return self.heads.top_tokens(normed, decoder.lm_head_t, max(1, self.tree.depth), max(1, self.tree.max_rank))

    def start(self, decoder: Decoder, hidden: torch.Tensor) -> torch.Tensor:
        normed = decoder.final_norm(hidden)
        self.candidates = self.propose(decoder, normed)
        return (normed @ decoder.lm_head_t).argmax(-1)

    def step(self, decoder: Decoder, cache: KVCache, roots: torch.Tensor) -> StepResult:
        tree, B, N = self.tree, roots.shape[0], self.tree.size
        tokens = tree_tokens(roots, self.candidates, tree)  # [B, N]
        slots = cache.lengths.unsqueeze(1) + torch.arange(N)
        positions = cache.lengths.unsqueeze(1) + tree.depths
        mask = cache.attention_mask(slots, tree.ancestors.expand(B, N, N))
        normed = decoder.final_norm(decoder.forward_layers(decoder.embed(tokens), positions, slots, mask, cache))
        predictions = (normed @ decoder.lm_head_t).argmax(-1)  # [B, N]
        last = greedy_accept(tokens, predictions, tree)
        offsets, counts = accepted_offsets(tree, last)
        cache.keep(offsets, counts)
        rows = torch.arange(B)
        new_roots = predictions[rows, last]
        self.candidates = self.propose(decoder, normed[rows, last])
        path_tokens = tokens.gather(1, offsets)
        accepted = [path_tokens[b, 1 : int(counts[b])].tolist() + [int(new_roots[b])] for b in range(B)]
        return StepResult(accepted, new_roots, [N] * B, [N] * B)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.candidates = self.candidates[rows]
