"""Autoregressive decoding: the tree with the root only, one token per forward pass, greedy or
sampled (``Picker``): the reference every parallel method's output equals."""

from __future__ import annotations

import torch

from propd.decoding.loop import Stateless, StepResult
from propd.decoding.sampling import Picker
from propd.models.decoder import Decoder
from propd.models.kv_cache import KVCache


class ARMethod:
    tree_size = 1
    tree_depth = 0

    def start(self, decoder: Decoder, cache: KVCache, hidden: torch.Tensor, picker: Picker, prompts: list[list[int]]) -> tuple[torch.Tensor, Stateless]:
        return picker.next_tokens(decoder, decoder.final_norm(hidden)), Stateless()

    def step(self, decoder: Decoder, cache: KVCache, roots: torch.Tensor, state: Stateless, picker: Picker) -> StepResult:
        B = roots.shape[0]
        roots = ar_pass(decoder, cache, roots, picker)[1]
        return StepResult([[t] for t in roots.tolist()], roots, [1] * B, [1] * B)


def ar_pass(decoder: Decoder, cache: KVCache, roots: torch.Tensor, picker: Picker) -> tuple[torch.Tensor, torch.Tensor]:
    """One AR step's pass over the roots [B], committed to the cache: the final-normed states there
    [B, 1, dim] and each row's next token [B]."""
    normed = decoder.final_norm(decoder.extend(roots.unsqueeze(1), cache.chain(1), cache))
    cache.advance(1)
    return normed, picker.next_tokens(decoder, normed[:, 0])

