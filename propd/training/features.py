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
    Reused when it exists for the same inputs."""
    rows = [json.loads(line) for line in distill_path.read_text().splitlines() if line.strip()]
    meta = {"sequences": str(len(rows)), "early_layers": ",".join(map(str, early_layers))}
    if out.exists():
        with safe_open(out, "pt") as existing:
            if existing.metadata() == meta:
                return out
    finals, earlies, seq_ids, next_index, end_index, all_tokens = [], {k: [] for k in early_layers}, [], [], [], []
    offset = 0
    for i, row in enumerate(tqdm(rows, desc="hidden states", unit="seq")):
        tokens = row["prompt_ids"] + row["answer_ids"]
        P = len(row["prompt_ids"])
        if len(row["answer_ids"]) < 2:
            offset += len(tokens)
            all_tokens += tokens
            continue
        final, early = hidden_states(decoder, tokens, early_layers)
        positions = torch.arange(P - 1, len(tokens) - 1)  # each predicts the answer token after it
        finals.append(final[positions].half())
        for k in early_layers:
            earlies[k].append(early[k][positions].half())
        seq_ids.append(torch.full((len(positions),), i))
        next_index.append(offset + positions + 1)
        end_index.append(torch.full((len(positions),), offset + len(tokens)))
        offset += len(tokens)
        all_tokens += tokens
    tensors = {
        "final": torch.cat(finals),
        "seq": torch.cat(seq_ids),
        "next_index": torch.cat(next_index),
        "end_index": torch.cat(end_index),
        "tokens": torch.tensor(all_tokens),
        **{f"early.{k}": torch.cat(v) for k, v in earlies.items()},
    }
    save_file(tensors, out, metadata=meta)
    return out


def load_features(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)
