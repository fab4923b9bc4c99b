"""Prompt files: Spec-Bench / MT-Bench ``question.jsonl`` (``turns``) or plain ``prompt`` lines."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

from propd.errors import PropdError
from propd.heads.checkpoint import read_jsonl


@dataclass
class Prompt:
    id: str
    category: str
    text: str


def builtin_prompts_path() -> Path:
    """The project's own small prompt set (written for propd) used by demos, tests and bench."""
    return Path(str(resources.files("propd") / "data" / "prompts.jsonl"))


def load_prompts(path: str | Path | None = None, turn: int = 0, limit: int | None = None, per_category: int | None = None) -> list[Prompt]:
    """Read prompts; ``turn`` picks which user turn of multi-turn questions to use. ``per_category``
    keeps the first N of each category (MT-Bench lists its 8 categories one after another, so
    ``limit`` alone samples only the first ones); ``limit`` then caps the total."""
    if turn < 0:
        raise PropdError(f"turn must be 0 or more, got {turn}")
    for name, value in (("limit", limit), ("per_category", per_category)):
        if value is not None and value < 1:
            raise PropdError(f"{name} must be at least 1, got {value}")
    path = Path(path) if path else builtin_prompts_path()
    if not path.is_file():
        raise PropdError(f"prompts file not found: {path}")
    prompts = []
    for n, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise PropdError(f"{path}:{n}: expected a JSON object")
        if "turns" in row:
            turns = row["turns"]
            if not isinstance(turns, list) or len(turns) <= turn:
                raise PropdError(f"{path}:{n}: 'turns' has no turn {turn}")
            text = turns[turn]
        elif "prompt" in row:
            text = row["prompt"]
        else:
            raise PropdError(f"{path}:{n}: needs a 'turns' list or a 'prompt' field")
        if not isinstance(text, str):
            raise PropdError(f"{path}:{n}: the prompt must be a string, got {type(text).__name__}")
        if not text.strip():
            raise PropdError(f"{path}:{n}: empty prompt")
        pid = str(row.get("question_id", row.get("id", n)))
        category = str(row.get("category", "general"))
        if per_category is not None and sum(p.category == category for p in prompts) >= per_category:
            continue
        prompts.append(Prompt(pid, category, text))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise PropdError(f"{path}: no prompts")
    return prompts


# Spec-Bench's long-input tasks, rebuilt from documents that a training-prompt file carries (T0's
# news articles for summarization, as Spec-Bench's CNN/DailyMail; reading-comprehension passages
# with their questions for retrieval, as its RAG set).
LONG_TASKS = {
    "summarization": (("t0/cnn_dailymail", "t0/xsum"), "Article", "Summarize each article above in two or three sentences."),
    "retrieval": (("t0/duorc", "t0/quoref"), "Document", "Answer the question asked in the last document, using only the documents above."),
}


def long_context_prompts(
    source: str | Path, count_tokens: Callable[[str], int], per_category: int = 4, min_tokens: int = 1000, max_tokens: int = 2000,
) -> list[Prompt]:
    """Prompts of ``min_tokens``-``max_tokens`` tokens (by ``count_tokens``), ``per_category`` of
    each long task, made by joining consecutive documents of ``source`` (jsonl rows with
    ``source`` and ``prompt``, as ``../shared/data/train_prompts.jsonl``) until long enough."""
    if not 0 < min_tokens <= max_tokens:
        raise PropdError(f"context tokens: need 0 < min <= max, got {min_tokens}, {max_tokens}")
    path = Path(source)
    if not path.is_file():
        raise PropdError(f"long-context source not found: {path}")
    rows = [row for _, row in read_jsonl(path)]
    prompts = []
    for category, (prefixes, label, task) in LONG_TASKS.items():
        docs = [r["prompt"] for r in rows if isinstance(r, dict) and str(r.get("source", "")).startswith(prefixes) and r.get("prompt")]
        made, picked = 0, []
        for doc in docs:
            picked.append(doc)
            text = "\n\n".join(f"{label} {k}:\n{d}" for k, d in enumerate(picked, 1)) + "\n\n" + task
            n = count_tokens(text)
            if n < min_tokens:
                continue
            if n <= max_tokens:
                prompts.append(Prompt(f"{category}-{made}", category, text))
                made += 1
            picked = []
            if made == per_category:
                break
        if made < per_category:
            raise PropdError(f"{path}: only {made} {category} prompts of {min_tokens}-{max_tokens} tokens (from rows whose source starts with {prefixes})")
    return prompts
