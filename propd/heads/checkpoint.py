"""Reading checkpoint files with errors that say which file is wrong and why."""

from __future__ import annotations

import json
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


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise PropdError(f"missing weights file {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise PropdError(f"corrupt or unreadable checkpoint {path}: {e}") from e
