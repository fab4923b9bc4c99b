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
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PropdError(f"cannot read {path}: {e}") from e


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
    except OSError as e:
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
