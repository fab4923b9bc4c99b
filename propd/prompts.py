"""Prompt files: Spec-Bench / MT-Bench ``question.jsonl`` (``turns``) or plain ``prompt`` lines."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from propd.errors import PropdError


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
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PropdError(f"{path}:{n}: not valid JSON ({e.msg})") from e
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
