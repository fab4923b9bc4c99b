"""Hidden states of the frozen backbone over the self-distilled answers, cached once on disk so that
re-training heads never re-runs the model.

For every answer position t (the hidden state that predicts answer token t+1) we keep the final normed
hidden state (what Medusa heads read), the residual stream after each candidate early layer (what the
early-pruning head reads), and the sequence's tokens for the targets.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from propd.heads.checkpoint import read_jsonl
from propd.models.decoder import Decoder


def hidden_states(decoder: Decoder, sequences: list[list[int]], early_layers: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One causal pass over right-padded ``sequences``: final normed hidden [B, T, dim] and {layer:
    residual after it [B, T, dim]}. Padding comes after each sequence's tokens, so none of them sees it."""
    B, T = len(sequences), max(len(s) for s in sequences)
    tokens = torch.zeros(B, T, dtype=torch.long)
    for b, s in enumerate(sequences):
        tokens[b, : len(s)] = torch.tensor(s)
    cache = decoder.new_cache(B, T)
    layout = cache.chain(T)
    x, early, start = decoder.embed(tokens), {}, 0
    for layer in sorted(early_layers) + [decoder.args.n_layers]:
        x = decoder.forward_layers(x, layout, cache, start, layer)
        early[layer], start = x, layer
    final = early.pop(decoder.args.n_layers)
    return decoder.final_norm(final), early


@torch.inference_mode()
def cache_features(decoder: Decoder, distill_path: Path, out: Path, early_layers: list[int], batch_size: int = 1) -> Path:
    """Write ``out`` (safetensors): ``final`` [N, dim], ``early.{k}`` [N, dim] (fp16), ``seq`` [N] the
    sequence index of each row, ``tokens`` (all sequences concatenated), ``next_index`` [N] the index
    in ``tokens`` of the token each row predicts and ``end_index`` [N] the end of its sequence there.
    Reused when it exists for the same inputs; when answers were appended since, only those run,
    ``batch_size`` sequences per pass (new tensors are made on the decoder's device)."""
    rows = [row for _, row in read_jsonl(distill_path)]
    meta = {"sequences": str(len(rows)), "early_layers": ",".join(map(str, early_layers))}
    done, cached = _reusable(out, rows, meta["early_layers"])
    if done == len(rows):
        return out
    parts = {key: [] for key in ("final", "seq", "next_index", "end_index", "tokens", *(f"early.{k}" for k in early_layers))}
    if cached is not None:
        for key, value in cached.items():
            parts[key].append(value)
    offset = 0 if cached is None else len(cached["tokens"])
    with torch.device(decoder.embed_tokens.device), tqdm(total=len(rows) - done, desc="hidden states", unit="seq") as bar:
        for first in range(done, len(rows), batch_size):
            batch = rows[first : first + batch_size]
            sequences = [row["prompt_ids"] + row["answer_ids"] for row in batch]
            final, early = hidden_states(decoder, sequences, early_layers)
            for b, (row, tokens) in enumerate(zip(batch, sequences)):
                parts["tokens"].append(torch.tensor(tokens, device="cpu"))
                P = len(row["prompt_ids"])
                if len(row["answer_ids"]) >= 2:
                    positions = torch.arange(P - 1, len(tokens) - 1)  # each predicts the answer token after it
                    parts["final"].append(final[b, positions].half().cpu())
                    for k in early_layers:
                        parts[f"early.{k}"].append(early[k][b, positions].half().cpu())
                    positions = positions.cpu()
                    parts["seq"].append(torch.full((len(positions),), first + b, device="cpu"))
                    parts["next_index"].append(offset + positions + 1)
                    parts["end_index"].append(torch.full((len(positions),), offset + len(tokens), device="cpu"))
                offset += len(tokens)
            bar.update(len(batch))
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


def load_features(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(path, device=str(device))
