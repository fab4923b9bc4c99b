"""Autoregressive decoding: the tree with the root only, one token per forward pass. Greedy by
default; with a temperature it samples, which only self-distillation uses (to let the model write
its own prompts): the parallel methods are lossless with respect to the greedy output."""

from __future__ import annotations

import torch

from propd.decoding.loop import Stateless, StepResult
from propd.models.decoder import Decoder
from propd.models.kv_cache import KVCache


class ARMethod:
    tree_size = 1
    tree_depth = 0

    def __init__(self, temperature: float = 0.0, generator: torch.Generator | None = None):
        self.temperature = temperature
        self.generator = generator

    def start(self, decoder: Decoder, cache: KVCache, hidden: torch.Tensor) -> tuple[torch.Tensor, Stateless]:
        return self._next_tokens(decoder, hidden), Stateless()

    def step(self, decoder: Decoder, cache: KVCache, roots: torch.Tensor, state: Stateless) -> StepResult:
        B = roots.shape[0]
        hidden = decoder.extend(roots.unsqueeze(1), cache.chain(1), cache)
        cache.advance(torch.ones(B, dtype=torch.long, device=cache.device))
        roots = self._next_tokens(decoder, hidden[:, -1])
        return StepResult([[t] for t in roots.tolist()], roots, [1] * B, [1] * B)

    def _next_tokens(self, decoder: Decoder, hidden: torch.Tensor) -> torch.Tensor:
        if self.temperature <= 0:
            return decoder.greedy_tokens(decoder.final_norm(hidden))
        probs = torch.softmax(decoder.logits(hidden).float() / self.temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
