"""Train Medusa heads, early-pruning heads and the EAGLE-style draft layer on cached backbone features, and measure them.

Medusa head i at answer position t reads the final normed hidden state h_t (which predicts token t+1)
and learns token t+2+i; losses are weighted 0.8^i as in Medusa. An early head at layer k reads the
residual stream after layer k at t and learns token t+1, the full model's own greedy choice there.
Both project through the base model's frozen lm_head, so only their own weights train (residual blocks;
the Medusa heads' projection of the root token too). The draft layer: see ``train_draft``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from propd.heads.draft import DraftHead
from propd.heads.early import EarlyHead
from propd.heads.medusa import MedusaHeads
from propd.models.decoder import Decoder

IGNORE = -100
TOP_KS = (1, 5, 10, 20)


def split_rows(features: dict[str, torch.Tensor], holdout: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices for training and held-out evaluation, split by whole sequences."""
    seq = features["seq"]
    n_seq = int(seq.max()) + 1
    held = torch.randperm(n_seq, generator=torch.Generator().manual_seed(0), device="cpu")[: max(1, int(n_seq * holdout))].to(seq.device)
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
    g = torch.Generator().manual_seed(0)  # on the CPU: the same order whatever the device

    def shuffled() -> torch.Tensor:
        return rows[torch.randperm(len(rows), generator=g, device="cpu").to(rows.device)]

    order = shuffled()
    with tqdm(total=steps, desc=desc, unit="step") as bar:
        for step in range(steps):
            start = (step * batch_size) % len(order)
            if start + batch_size > len(order):
                order = shuffled()
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


def target_ranks(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rank of each target in its logits (0 = top-1); IGNORE targets get -1."""
    rank = (logits > logits.gather(-1, targets.clamp(min=0).unsqueeze(-1))).sum(-1)
    return torch.where(targets == IGNORE, -1, rank)


def ranks_of_targets(logits_fn, rows: torch.Tensor, targets: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``target_ranks`` of the logits ``logits_fn`` gives for the rows, ``batch_size`` rows at a time."""
    out = []
    for i in range(0, len(rows), batch_size):
        with torch.no_grad():
            out.append(target_ranks(logits_fn(rows[i : i + batch_size]), targets[i : i + batch_size]))
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


def sequences_of(features: dict[str, torch.Tensor], rows: torch.Tensor) -> list[torch.Tensor]:
    """``rows`` (sorted) cut into whole sequences: each answer's rows, in order."""
    counts = torch.unique_consecutive(features["seq"][rows], return_counts=True)[1]
    return list(rows.split(counts.tolist()))


def draft_batch(features: dict[str, torch.Tensor], seqs: list[torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Right-padded [b, T] views of some sequences: the draft's inputs ``features`` n_j and
    ``next_tokens`` x_{j+1}, and for each depth d < ``depth`` its targets ``target_features`` n_{j+1+d}
    [b, T, depth, dim] and ``targets`` x_{j+2+d} [b, T, depth] (IGNORE past the end of the answer)."""
    T = max(len(s) for s in seqs)
    index = torch.stack([torch.cat([s, s[-1:].expand(T - len(s))]) for s in seqs])  # pad by repeating the last row
    inside = torch.stack([torch.arange(T) < len(s) for s in seqs])
    nxt = features["next_index"][index]
    ahead = torch.arange(depth)
    valid = inside.unsqueeze(-1) & (nxt.unsqueeze(-1) + 1 + ahead < features["end_index"][index].unsqueeze(-1))  # [b, T, depth]
    tokens, final = features["tokens"], features["final"]
    return {
        "features": final[index].float(),
        "next_tokens": tokens[nxt],
        "target_features": final[(index.unsqueeze(-1) + 1 + ahead).clamp(max=len(final) - 1)].float(),
        "targets": torch.where(valid, tokens[(nxt.unsqueeze(-1) + 1 + ahead).clamp(max=len(tokens) - 1)], IGNORE),
        "valid": valid,
    }


def draft_unroll(draft: DraftHead, decoder: Decoder, features: torch.Tensor, next_tokens: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
    """The draft's predicted features [b, T, dim] at each depth, run the way it runs in a tree.

    Depth 0 is a teacher-forced causal pass over the sequences [b, T]. At depth d > 0 position j
    goes one step further along the true path (targets [b, T, depth]): it reads its own prediction
    from depth d-1 and the true token there, attending to the true entries up to j and to its own
    earlier steps, as a tree node attends to the committed cache and its ancestors."""
    B, T = next_tokens.shape
    depth = targets.shape[-1]
    dec = draft.decoder(decoder)
    cache = dec.new_cache(B, depth * T)
    j = torch.arange(T)
    predicted = [dec.forward_layers(draft.inputs(features, next_tokens, decoder), cache.chain(T), cache)]
    for d in range(1, depth):
        # position j + d: the true entries up to j, then its own steps at depths 1..d (slots d' T + j)
        path = (torch.arange(1, d + 1) * T).view(1, 1, d) + j.view(1, T, 1)
        layout = cache.paths((d * T + j).expand(B, T), path.expand(B, T, d), (j + 1).expand(B, T))
        x = draft.inputs(predicted[-1], targets[..., d - 1].clamp(min=0), decoder)
        cache.kv = cache.kv.clone()  # writing in place would change the keys autograd kept from depth d-1
        predicted.append(dec.forward_layers(x, layout, cache))
    return predicted


def train_draft(
    decoder: Decoder, features, train_rows, epochs: float, depth: int = 3, batch_size: int = 8, lr: float = 1e-3,
    candidate_vocab_size: int = 8192, class_weight: float = 1.0,
) -> tuple[DraftHead, list[float]]:
    """EAGLE's objective (smooth-L1 regression of the next feature plus ``class_weight`` x
    cross-entropy on the token after it), summed over ``depth`` unrolled steps: trained on its own
    predictions, as it runs deeper in a tree, the draft learns to correct its own errors. Measured
    on the shipped data: depth-2 top-1 was 0.15 teacher-forced (1 epoch) and 0.35 unrolled (2 epochs):
    trained on true features only, the draft is lost on its own predictions. ``class_weight`` 1.0 (3 epochs) reached
    depth-1 top-1 0.428 where EAGLE's 0.1 (2 epochs) reached 0.395."""
    draft = DraftHead(decoder.args, candidate_vocab=candidate_vocabulary(features, train_rows, candidate_vocab_size, decoder.args.vocab_size))
    projection = draft.projection(decoder)
    seqs = sequences_of(features, train_rows)

    def loss_fn(seq_ids):
        b = draft_batch(features, [seqs[i] for i in seq_ids], depth)
        loss = torch.zeros(())
        for d, predicted in enumerate(draft_unroll(draft, decoder, b["features"], b["next_tokens"], b["targets"])):
            valid = b["valid"][..., d]
            reg = F.smooth_l1_loss(predicted[valid], b["target_features"][..., d, :][valid])
            cls = F.cross_entropy(predicted[valid] @ projection, to_candidate_index(b["targets"][..., d][valid], draft), ignore_index=IGNORE)
            loss = loss + (reg + class_weight * cls).nan_to_num()
        return loss

    return draft, _fit(draft, loss_fn, torch.arange(len(seqs)), epochs, batch_size, lr, "draft layer")


@torch.no_grad()
def evaluate_draft(decoder: Decoder, draft: DraftHead, features, rows, depth: int = 5, batch_size: int = 16) -> dict:
    """Top-k accuracy and rank probabilities at each tree depth, given that the path before it is
    right (the only case in which that depth can be accepted); a token outside the draft's
    candidate vocabulary is a miss."""
    projection = draft.projection(decoder)
    seqs = sequences_of(features, rows)
    ranks: list[list[torch.Tensor]] = [[] for _ in range(depth)]
    for i in range(0, len(seqs), batch_size):
        b = draft_batch(features, seqs[i : i + batch_size], depth)
        for d, predicted in enumerate(draft_unroll(draft, decoder, b["features"], b["next_tokens"], b["targets"])):
            targets = b["targets"][..., d]
            cand = to_candidate_index(targets, draft)
            rank = target_ranks(predicted @ projection, cand)
            rank[(targets >= 0) & (cand == IGNORE)] = draft.vocab_size
            ranks[d].append(rank.flatten())
    ranks_t = [torch.cat(r) for r in ranks]
    return {"per_depth": [top_k_accuracy(r) for r in ranks_t], "rank_probabilities": [rank_probabilities(r) for r in ranks_t]}
