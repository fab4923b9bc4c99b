"""Hidden states of the frozen backbone over the self-distilled answers, cached once on disk so that
re-training heads never re-runs the model.

For every answer position t (the hidden state that predicts answer token t+1) we keep the final normed
hidden state (what Medusa heads read), the residual stream after each candidate early layer (what the
early-pruning head reads), and the sequence's tokens for the targets.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from propd.models.decoder import Decoder


def hidden_states(decoder: Decoder, tokens: list[int], early_layers: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One causal pass over ``tokens``: final normed hidden [T, dim] and {layer: residual after it [T, dim]}."""
    T = len(tokens)
    cache = decoder.new_cache(1, T)
    slots = torch.arange(T).unsqueeze(0)
    mask = cache.attention_mask(slots, torch.ones(T, T, dtype=torch.bool).tril().unsqueeze(0))
    x, early, start = decoder.embed(torch.tensor([tokens])), {}, 0
    for layer in sorted(early_layers) + [decoder.args.n_layers]:
        x = decoder.forward_layers(x, slots, slots, mask, cache, start, layer)
        early[layer], start = x[0], layer
    final = early.pop(decoder.args.n_layers)
    return decoder.final_norm(final), early


@torch.inference_mode()
def cache_features(decoder: Decoder, distill_path: Path, out: Path, early_layers: list[int]) -> Path:
    """Write ``out`` (safetensors): ``final`` [N, dim], ``early.{k}`` [N, dim] (fp16), ``seq`` [N] the
    sequence index of each row, ``tokens`` (all sequences concatenated), ``next_index`` [N] the index
    in ``tokens`` of the token each row predicts and ``end_index`` [N] the end of its sequence there.
    Reused when it exists for the same inputs; when answers were appended since, only those run."""
    rows = [json.loads(line) for line in distill_path.read_text().splitlines() if line.strip()]
    meta = {"sequences": str(len(rows)), "early_layers": ",".join(map(str, early_layers))}
    done, cached = _reusable(out, rows, meta["early_layers"])
    if done == len(rows):
        return out
    offset = 0 if cached is None else len(cached["tokens"])
    parts = {key: [] for key in ("final", "seq", "next_index", "end_index", "tokens", *(f"early.{k}" for k in early_layers))}
    if cached is not None:
        for key, value in cached.items():
            parts[key].append(value)
    for i, row in enumerate(tqdm(rows[done:], desc="hidden states", unit="seq"), start=done):
        tokens = row["prompt_ids"] + row["answer_ids"]
        P = len(row["prompt_ids"])
        parts["tokens"].append(torch.tensor(tokens))
        if len(row["answer_ids"]) >= 2:
            final, early = hidden_states(decoder, tokens, early_layers)
            positions = torch.arange(P - 1, len(tokens) - 1)  # each predicts the answer token after it
            parts["final"].append(final[positions].half())
            for k in early_layers:
                parts[f"early.{k}"].append(early[k][positions].half())
            parts["seq"].append(torch.full((len(positions),), i))
            parts["next_index"].append(offset + positions + 1)
            parts["end_index"].append(torch.full((len(positions),), offset + len(tokens)))
        offset += len(tokens)
    save_file({key: torch.cat(value) for key, value in parts.items()}, out, metadata=meta)
    return out


def _reusable(out: Path, rows: list[dict], early_layers: str) -> tuple[int, dict[str, torch.Tensor] | None]:
    """(how many of ``rows`` ``out`` already covers, its tensors) if it was computed for the same
    early layers over the first rows of ``rows`` (its token stream is a prefix of theirs), else (0, None)."""
    if not out.exists():
        return 0, None
    with safe_open(out, "pt") as existing:
        meta = existing.metadata()
    done = int(meta["sequences"])
    if meta.get("early_layers") != early_layers or done > len(rows):
        return 0, None
    cached = load_file(out)
    prefix = [t for row in rows[:done] for t in row["prompt_ids"] + row["answer_ids"]]
    return (done, cached) if cached["tokens"].tolist() == prefix else (0, None)


def load_features(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)
