"""Train Medusa heads and early-pruning heads on cached backbone features, and measure them.

Medusa head i at answer position t reads the final normed hidden state h_t (which predicts token t+1)
and learns token t+2+i; losses are weighted 0.8^i as in Medusa. An early head at layer k reads the
residual stream after layer k at t and learns token t+1, the full model's own greedy choice there.
Both project through the base model's frozen lm_head, so only their residual blocks train.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from propd.heads.early import EarlyHead
from propd.heads.medusa import MedusaHeads
from propd.models.decoder import Decoder

IGNORE = -100
TOP_KS = (1, 5, 10, 20)


def split_rows(features: dict[str, torch.Tensor], holdout: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices for training and held-out evaluation, split by whole sequences."""
    seq = features["seq"]
    n_seq = int(seq.max()) + 1
    held = torch.randperm(n_seq, generator=torch.Generator().manual_seed(0))[: max(1, int(n_seq * holdout))]
    is_held = torch.isin(seq, held)
    return (~is_held).nonzero().flatten(), is_held.nonzero().flatten()


def candidate_vocabulary(features: dict[str, torch.Tensor], rows: torch.Tensor, size: int, vocab_size: int) -> torch.Tensor | None:
    """The ``size`` tokens the model emits most often in the training answers (None: all of them)."""
    if size <= 0 or size >= vocab_size:
        return None
    counts = torch.bincount(features["tokens"][features["next_index"][rows]], minlength=vocab_size)
    return counts.topk(size).indices.sort().values


def medusa_targets(features: dict[str, torch.Tensor], rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[n, H] target tokens (IGNORE past the end of a sequence)."""
    index = features["next_index"][rows].unsqueeze(1) + 1 + torch.arange(num_heads)
    valid = index < features["end_index"][rows].unsqueeze(1)
    return torch.where(valid, features["tokens"][index.clamp(max=len(features["tokens"]) - 1)], IGNORE)


def to_candidate_index(targets: torch.Tensor, heads: MedusaHeads) -> torch.Tensor:
    """Token ids -> positions in the heads' candidate vocabulary (IGNORE when absent)."""
    if heads.candidate_vocab is None:
        return targets
    lookup = torch.full((heads.vocab_size,), IGNORE)
    lookup[heads.candidate_vocab] = torch.arange(len(heads.candidate_vocab))
    return torch.where(targets >= 0, lookup[targets.clamp(min=0)], IGNORE)


def next_targets(features: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """The token each row's hidden state produced: the early head's target, the Medusa heads' root."""
    return features["tokens"][features["next_index"][rows]]


def _fit(module: torch.nn.Module, loss_fn, rows: torch.Tensor, epochs: float, batch_size: int, lr: float, desc: str) -> list[float]:
    """AdamW with cosine decay over ``epochs`` passes of ``rows``; returns the loss of every step."""
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    steps = max(1, int(math.ceil(len(rows) / batch_size) * epochs))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses = []
    module.train()
    g = torch.Generator().manual_seed(0)
    order = rows[torch.randperm(len(rows), generator=g)]
    with tqdm(total=steps, desc=desc, unit="step") as bar:
        for step in range(steps):
            start = (step * batch_size) % len(order)
            if start + batch_size > len(order):
                order = rows[torch.randperm(len(rows), generator=g)]
                start = 0
            loss = loss_fn(order[start : start + batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update(1)
    module.eval()
    return losses


def train_medusa(
    decoder: Decoder, features, train_rows, num_heads: int, num_layers: int, epochs: float,
    batch_size: int = 128, lr: float = 1e-3, candidate_vocab_size: int = 0, root_conditioned: bool = True,
) -> tuple[MedusaHeads, list[float]]:
    vocab = decoder.args.vocab_size
    heads = MedusaHeads(decoder.args.dim, vocab, num_heads, num_layers, shared_lm_head=True,
                        candidate_vocab=candidate_vocabulary(features, train_rows, candidate_vocab_size, vocab), root_conditioned=root_conditioned)
    weights = torch.tensor([0.8**i for i in range(num_heads)])

    def loss_fn(rows):
        logits = heads.logits(features["final"][rows].float(), next_targets(features, rows), decoder)  # [b, H, Vc]
        targets = to_candidate_index(medusa_targets(features, rows, num_heads), heads)
        per_head = torch.stack([F.cross_entropy(logits[:, i], targets[:, i], ignore_index=IGNORE) for i in range(num_heads)])
        return (per_head.nan_to_num() * weights).sum()

    return heads, _fit(heads, loss_fn, train_rows, epochs, batch_size, lr, "medusa heads")


def train_early(decoder: Decoder, features, train_rows, layer: int, epochs: float, batch_size: int = 128, lr: float = 1e-3) -> tuple[EarlyHead, list[float]]:
    head = EarlyHead(decoder.args.dim, decoder.args.vocab_size, layer)

    def loss_fn(rows):
        return F.cross_entropy(head.logits(features[f"early.{layer}"][rows].float(), decoder), next_targets(features, rows))

    return head, _fit(head, loss_fn, train_rows, epochs, batch_size, lr, f"early head @ layer {layer}")


def ranks_of_targets(logits_fn, rows: torch.Tensor, targets: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Rank of each target token in the predicted logits (0 = top-1); IGNORE targets get -1."""
    out = []
    for i in range(0, len(rows), batch_size):
        with torch.no_grad():
            logits = logits_fn(rows[i : i + batch_size])
        t = targets[i : i + batch_size]
        target_logit = logits.gather(-1, t.clamp(min=0).unsqueeze(-1))
        rank = (logits > target_logit).sum(-1)
        out.append(torch.where(t == IGNORE, -1, rank))
    return torch.cat(out)


def top_k_accuracy(ranks: torch.Tensor, ks=TOP_KS) -> dict[str, float]:
    valid = ranks[ranks >= 0]
    return {f"top{k}": round(float((valid < k).float().mean()), 4) for k in ks}


def rank_probabilities(ranks: torch.Tensor, max_rank: int = 10) -> list[float]:
    """p_r: the probability that the true token is the head's rank-r candidate, r < max_rank."""
    valid = ranks[ranks >= 0]
    return [round(float((valid == r).float().mean()), 5) for r in range(max_rank)]


def evaluate_medusa(decoder: Decoder, heads: MedusaHeads, features, rows) -> dict:
    """Top-k accuracy and rank probabilities per head; a target outside the candidate vocabulary is a miss."""
    tokens = medusa_targets(features, rows, heads.num_heads)
    targets = to_candidate_index(tokens, heads)
    ranks = ranks_of_targets(lambda r: heads.logits(features["final"][r].float(), next_targets(features, r), decoder), rows, targets)
    ranks[(tokens >= 0) & (targets == IGNORE)] = heads.vocab_size
    return {
        "per_head": [top_k_accuracy(ranks[:, i]) for i in range(heads.num_heads)],
        "rank_probabilities": [rank_probabilities(ranks[:, i]) for i in range(heads.num_heads)],
    }


def evaluate_early(decoder: Decoder, head: EarlyHead | None, layer: int, features, rows) -> dict[str, float]:
    """Recall of the full model's next token within the early top-K; ``head=None`` is the logit lens."""
    hidden = features[f"early.{layer}"]
    fn = (lambda r: decoder.logits(hidden[r].float())) if head is None else (lambda r: head.logits(hidden[r].float(), decoder))
    return top_k_accuracy(ranks_of_targets(fn, rows, next_targets(features, rows)))
