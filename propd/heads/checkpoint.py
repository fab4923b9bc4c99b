"""Reading checkpoints, JSON and JSON-lines files with errors that say which file is wrong and why."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from propd.errors import PropdError


def read_json(path: Path) -> dict:
    """A JSON file that holds an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
        raise PropdError(f"cannot read {path}: {e}") from e
    if not isinstance(value, dict):
        raise PropdError(f"{path} must hold a JSON object, not a {type(value).__name__}")
    return value


def field(config: dict, key: str, path: Path) -> object:
    """``config[key]``, or an error that names the file that lacks it."""
    if key not in config:
        raise PropdError(f"{path} lacks {key!r}")
    return config[key]


def load_error(e: Exception) -> str:
    """The lines of a ``load_state_dict`` error that say what does not match (its first line only names the class)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(lines[:3])[:400]


def read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """Each non-blank line's number (from 1) and value."""
    try:
        with path.open() as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield n, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise PropdError(f"{path}:{n}: not valid JSON ({e.msg})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise PropdError(f"cannot read {path}: {e}") from e


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise PropdError(f"missing weights file {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise PropdError(f"corrupt or unreadable checkpoint {path}: {e}") from e
