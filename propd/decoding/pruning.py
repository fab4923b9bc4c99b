"""Early pruning (ProPD): layers [0, k) run on every tree token; the early head reads each node's
state after layer k and predicts its children's tokens; a child whose token is not among its
parent's top-K there is dropped with its subtree; layers [k, L) run on the survivors only.

Lossless whatever the head predicts: pruning only removes candidates. A survivor's late layers see
exactly the K/V of its ancestors (survivors all), written in the same pass, so its logits are the
ones the whole tree would give it; the accepted path stops where the model's token was pruned, and
the bonus token comes from the last survivor on it. Pruned nodes' early K/V are never committed.
"""

from __future__ import annotations

import torch

from propd.heads.early import EarlyHead
from propd.models.decoder import Decoder
from propd.tree.tree import TokenTree


class Pruner:
    """Drops tree nodes whose token is not in the top ``top_k`` of their parent's early prediction,
    except the drafter's ``keep_ranks`` best guesses at each node (a score of both predictors: the
    drafter's top guesses carry most accepted tokens, and the early head is weakest on them)."""

    def __init__(self, head: EarlyHead, top_k: int = 10, keep_ranks: int = 0, vocab: torch.Tensor | None = None):
        """``vocab``: the tokens the drafter guesses among (None: all). The early head ranks only
        those, since no other token can be a child: projecting onto the whole vocabulary cost a
        batch-1 step of a 16-token tree 2.2 ms, more than the late layers it saved."""
        self.head, self.top_k, self.keep_ranks, self.vocab = head, top_k, keep_ranks, vocab

    @property
    def layer(self) -> int:
        return self.head.layer

    def survivors(self, decoder: Decoder, early: torch.Tensor, tokens: torch.Tensor, tree: TokenTree) -> torch.Tensor:
        """Which nodes [B, N] survive, from the states after the early layers [B, N, dim] and the tokens [B, N]."""
        B, N = tokens.shape
        parents = (tree.children >= 0).any(dim=1).nonzero().flatten()  # nodes with children
        projection = decoder.vocab_projection(self.vocab)
        with torch.no_grad():
            top = projection.topk(decoder.final_norm(self.head.packed(decoder)(early[:, parents])), min(self.top_k, projection.out_features))[1]  # [B, P, K]
        if self.vocab is not None:
            top = self.vocab[top]
        slot = torch.full((N,), -1, dtype=torch.long)
        slot[parents] = torch.arange(len(parents))
        predicted = top[:, slot[tree.parents[1:]]]  # [B, N - 1, K]: each non-root node's parent's guesses
        ok = torch.ones(B, N, dtype=torch.bool)
        ok[:, 1:] = (predicted == tokens[:, 1:].unsqueeze(-1)).any(-1) | (tree.ranks[1:] < self.keep_ranks)
        return whole_paths(ok, tree)


def whole_paths(ok: torch.Tensor, tree: TokenTree) -> torch.Tensor:
    """Nodes [B, N] whose every node on the path from the root is ``ok`` [B, N]: a pruned node takes its subtree."""
    return ~(tree.ancestors.unsqueeze(0) & ~ok.unsqueeze(1)).any(-1)
