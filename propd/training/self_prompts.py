"""Prompts the model writes itself (Magpie, arXiv 2406.08464): fed its chat template up to where a
user's message begins, a chat model samples the kind of request it was tuned on. Distilling answers
to these covers the open-ended chat that benchmarks such as MT-Bench ask for, which task-template
prompt sets (classification, short QA) leave out. Resumable: the file is appended to."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from propd.decoding.ar import ARMethod
from propd.decoding.loop import generate_batch
from propd.decoding.sampling import Sampling
from propd.engine import Propd
from propd.errors import PropdError
from propd.heads.checkpoint import read_jsonl

_MARK = "\x00propd-user-message\x00"
# Left free, SmolLM2 asks mostly for advice and plans. These openings, taken in turn, also draw the
# code, text-to-work-on, role-play and maths requests that MT-Bench's categories hold: with them the
# draft's MT-Bench acceptance for coding went from 1.9 to 3.5 tokens per step (docs/training.md).
DEFAULT_OPENINGS = ("", "", "", "", "Write a Python function", "Write a program", "Implement", "Write a SQL query", "Extract",
                    "Given the following", "Read the following text", "Imagine you are", "Act as", "Pretend to be", "Solve", "What is",
                    "Explain", "Compose", "Write a", "Describe", "Suppose", "Identify", "Rewrite", "Summarize", "Edit the following", "Draft",
                    "How", "Why", "Compare", "Create")


def user_turn_prefix(model: Propd) -> list[int]:
    """The chat template's tokens up to where the user's message begins (system prompt included)."""
    if not model.tokenizer.chat_template:
        raise PropdError("the model has no chat template, so it cannot write prompts for itself; pass --self-prompts 0")
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False)
    return model.tokenizer(text[: text.index(_MARK)], add_special_tokens=False).input_ids


def write_self_prompts(
    model: Propd, path: Path, num_prompts: int, batch_size: int = 16, max_tokens: int = 128, temperature: float = 0.8, seed: int = 0,
    openings: Sequence[str] = ("",),
) -> Path:
    """Append ``{"id": "self-N", "prompt"}`` lines to ``path`` until it holds num_prompts. Only
    messages the model ended itself, non-empty and not seen before, are kept. ``openings`` steer
    the requests: each message starts with one of them in turn (e.g. "Write a Python function"
    for more coding requests; "" leaves the model free)."""
    seen: set[str] = set()
    if path.exists():
        seen = {row["prompt"] for _, row in read_jsonl(path)}
    prefix = user_turn_prefix(model)
    starts = [(text, prefix + model.tokenizer(text, add_special_tokens=False).input_ids if text else prefix) for text in openings]
    with path.open("a") as f, tqdm(total=num_prompts, initial=min(len(seen), num_prompts), desc="self-prompts", unit="prompt") as bar:
        attempt, fruitless = 0, 0
        while len(seen) < num_prompts:
            if fruitless == 5:
                raise PropdError(f"the model ended none of {5 * batch_size} sampled user messages within {max_tokens} tokens; "
                                 "it does not seem to be a chat model: pass --self-prompts 0")
            base = seed * 1_000_003 + len(seen) * 101 + attempt * batch_size
            attempt += 1
            fruitless += 1
            batch = [starts[(attempt * batch_size + i) % len(starts)] for i in range(batch_size)]
            with model.on_device():
                stats = generate_batch(model.decoder, ARMethod(), [ids for _, ids in batch], max_tokens, model.eos_ids,
                                       sampling=Sampling(temperature), seeds=[base + i for i in range(batch_size)])
            for (opening, _), s in zip(batch, stats):
                if not s.token_ids or s.token_ids[-1] not in model.eos_ids:
                    continue
                text = (opening + model.tokenizer.decode(s.token_ids, skip_special_tokens=True)).strip()
                if not text or text in seen or len(seen) >= num_prompts:
                    continue
                f.write(json.dumps({"id": f"self-{len(seen)}", "prompt": text}) + "\n")
                seen.add(text)
                fruitless = 0
                bar.update(1)
            f.flush()
    return path
