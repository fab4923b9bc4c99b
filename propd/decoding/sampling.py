"""How each row picks its tokens: greedy, or sampled with temperature, top-k and top-p.

A sampled row's token at answer index i is argmax(log p_i + g(seed, i)), where p_i is the model's
distribution there after temperature, top-k and top-p, and g a vector of Gumbel noise drawn from
(seed, i) alone: an exact sample of p_i (the Gumbel-max trick). AR takes that token; a tree step
accepts a node's child if the child carries it, and otherwise emits it as the bonus token.

For drafted candidates (the drafters' top-k, tried in rank order) this is multi-candidate
speculative sampling (SpecInfer, EAGLE): the first candidate is accepted with probability p(x1);
the second, given the first was rejected, with p(x2) / (1 - p(x1)), its probability in the
renormalised residual; when all are rejected, the token is a sample of the residual. So the output
distribution is AR sampling's, and more than that: with the same seed a tree step emits the very
tokens AR sampling emits, whatever the tree or the batch, since the engine's logits are exact.

``typical`` acceptance (Medusa) instead accepts the first child whose probability exceeds
min(epsilon, alpha * exp(-entropy)); faster, and lossy: its output is not AR sampling's.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from propd.errors import PropdError
from propd.models.decoder import Decoder
from propd.models.kernels import serial

ACCEPTANCES = ("exact", "typical")


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; ``seed`` None draws one. Row k of a generation uses seed + k."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    acceptance: str = "exact"
    epsilon: float = 0.09
    alpha: float = 0.3

    def __post_init__(self):
        if not 0 < self.temperature < math.inf:
            raise PropdError(f"temperature must be a finite number above 0 to sample (0 is greedy decoding), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PropdError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise PropdError(f"top_k must be 0 (off) or more, got {self.top_k}")
        if self.acceptance not in ACCEPTANCES:
            raise PropdError(f"unknown acceptance {self.acceptance!r}; choose one of {', '.join(ACCEPTANCES)}")

    def base_seed(self) -> int:
        return self.seed if self.seed is not None else random.SystemRandom().randrange(2**31)

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """log p [V] of one position's logits [V] after temperature, top-k and top-p (-inf outside)."""
        x = logits.double() / self.temperature
        if 0 < self.top_k < x.numel():
            x = x.masked_fill(x < x.topk(self.top_k).values[-1], float("-inf"))
        if self.top_p < 1:
            sorted_x, order = x.sort(descending=True)
            probs = sorted_x.softmax(-1)
            outside = probs.cumsum(-1) - probs >= self.top_p  # the mass before a token already reaches top_p
            x = x.index_put((order[outside],), torch.tensor(float("-inf"), dtype=x.dtype))
        return x.log_softmax(-1)


def gumbel(seed: int, index: int, size: int) -> torch.Tensor:
    """Gumbel noise [size] (float64) that depends on (seed, index) alone."""
    g = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) % 2**63)
    return -torch.log(-torch.log(torch.rand(size, generator=g, dtype=torch.float64)))


@dataclass
class RowChoice:
    """One row's picking rule for a step: its sampling (None: greedy), seed and tokens emitted so far."""

    sampling: Sampling | None
    seed: int
    emitted: int


class Picker:
    """The rows' rules for one step. ``pick`` gives each row's token after a node; ``accept`` also
    says which of the node's children the row accepts."""

    def __init__(self, rows: list[RowChoice], weights: list[float] | None = None):
        self.rows = rows
        self.greedy = all(r.sampling is None for r in rows)
        self.weights = weights  # what a row's tokens are worth to the step (``DecodeLoop.weights``); None: each the same

    def pick(self, decoder: Decoder, normed: torch.Tensor, rows: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
        """Tokens [R] after nodes at ``depths`` [R] below the roots of batch rows ``rows`` [R], from their normed states [R, dim]."""
        if self.greedy:
            return decoder.greedy_tokens(normed)
        logits = decoder.lm_head(normed)
        out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        with serial():  # one row at a time, one thread: the same sums whatever the batch
            for j, (b, d) in enumerate(zip(rows.tolist(), depths.tolist())):
                r = self.rows[b]
                if r.sampling is None:
                    out[j] = logits[j].argmax()
                else:
                    out[j] = (r.sampling.log_probs(logits[j]).cpu() + gumbel(r.seed, r.emitted + d, logits.shape[-1])).argmax()
        return out

    def next_tokens(self, decoder: Decoder, normed: torch.Tensor) -> torch.Tensor:
        """Every row's token [B] right after its newest one, from the normed states there [B, dim]."""
        if self.greedy:  # (no rows or depths to index: a greedy step's every tensor op costs it, run cold after the weights' stream)
            return decoder.greedy_tokens(normed)
        B = len(normed)
        return self.pick(decoder, normed, torch.arange(B), torch.zeros(B, dtype=torch.long))

    def accept(self, decoder: Decoder, normed: torch.Tensor, rows: torch.Tensor, depths: torch.Tensor,
               kids: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which children [R, C] (their tokens ``kids``, ``valid`` where a child exists) each row
        accepts (the first True counts), and the token it emits if none: [R]."""
        picked = self.pick(decoder, normed, rows, depths)
        match = valid & (kids == picked.unsqueeze(1))
        if self.greedy:
            return match, picked
        typical = [j for j, b in enumerate(rows.tolist()) if self.rows[b].sampling is not None and self.rows[b].sampling.acceptance == "typical"]
        if typical:
            logits = decoder.lm_head(normed[typical])
            with serial():
                for i, j in enumerate(typical):
                    s = self.rows[int(rows[j])].sampling
                    log_p = F.log_softmax(logits[i].double() / s.temperature, -1)
                    entropy = -(log_p.exp() * log_p).sum()
                    threshold = min(s.epsilon, s.alpha * float(torch.exp(-entropy)))
                    match[j] = valid[j] & (log_p[kids[j]].exp() > threshold)
        return match, picked
