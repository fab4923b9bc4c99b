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
        hidden = decoder.extend(roots.unsqueeze(1), cache.chain(1), cache)
        cache.advance(1)
        roots = picker.next_tokens(decoder, decoder.final_norm(hidden[:, -1]))
        return StepResult([[t] for t in roots.tolist()], roots, [1] * B, [1] * B)

