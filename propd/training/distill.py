"""Self-distillation data: the base model answers training prompts greedily with its chat template,
so the heads learn to predict the model's *own* continuations. Resumable: answers already written
to ``distill.jsonl`` are skipped on the next run."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tqdm import tqdm

from propd.engine import Propd
from propd.heads.checkpoint import read_jsonl
from propd.prompts import load_prompts


def generate_answers(
    model: Propd, prompts_path: str | Path, out_dir: Path, num_prompts: int, max_new_tokens: int,
    batch_size: int = 8, max_prompt_chars: int = 2000, seed: int = 0,
) -> Path:
    """Append ``{"id", "prompt_ids", "answer_ids"}`` lines to out_dir/distill.jsonl until it holds
    num_prompts answers, drawing prompts (up to max_prompt_chars) from a seeded shuffle of the file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "distill.jsonl"
    done = set()
    if path.exists():
        done = {row["id"] for _, row in read_jsonl(path)}
    pool = [p for p in load_prompts(prompts_path) if len(p.text) <= max_prompt_chars]
    random.Random(seed).shuffle(pool)
    answered = sum(p.id in done for p in pool)  # the file may also hold answers to other prompt files
    prompts = [p for p in pool if p.id not in done][: max(0, num_prompts - answered)]
    # Similar lengths in a batch waste less padding in prefill.
    prompts.sort(key=lambda p: len(p.text))
    with path.open("a") as f, tqdm(total=len(prompts), initial=0, desc="self-distillation", unit="prompt") as bar:
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            results = model.generate([p.text for p in batch], "ar", max_new_tokens, batch_size)
            for p, r in zip(batch, results):
                f.write(json.dumps({"id": p.id, "prompt_ids": model.encode(p.text), "answer_ids": r.token_ids}) + "\n")
            f.flush()
            bar.update(len(batch))
    return path
