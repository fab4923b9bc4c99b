"""Medusa heads: head i guesses the token i+1 positions after the next one from the last hidden state.

Each head is a stack of residual blocks ``x + SiLU(W x + b)`` and a vocabulary projection: its own
(Medusa-1 checkpoints) or the base model's frozen ``lm_head`` (``shared_lm_head``, a checkpoint of a
few MB). Checkpoints load from Medusa's own layout (``config.json`` + ``medusa_lm_head.pt`` or
``.safetensors``, keys ``{head}.{block}.linear.weight`` and ``{head}.{blocks}.weight``) and from
ours (``heads.safetensors`` + ``heads.json`` recording the base model and the acceptance statistics).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from propd.errors import PropdError
from propd.heads.checkpoint import read_json, read_weights


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)  # starts as the identity: head i begins as the base lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class MedusaHeads(nn.Module):
    def __init__(self, dim: int, vocab_size: int, num_heads: int, num_layers: int = 1, shared_lm_head: bool = True, meta: dict | None = None):
        super().__init__()
        self.dim, self.vocab_size, self.num_heads, self.num_layers = dim, vocab_size, num_heads, num_layers
        self.shared_lm_head = shared_lm_head
        self.meta = dict(meta or {})
        heads = []
        for _ in range(num_heads):
            layers: list[nn.Module] = [ResBlock(dim) for _ in range(num_layers)]
            if not shared_lm_head:
                layers.append(nn.Linear(dim, vocab_size, bias=False))
            heads.append(nn.Sequential(*layers))
        self.heads = nn.ModuleList(heads)

    def logits(self, hidden: torch.Tensor, lm_head_t: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        """[N, dim] normed hidden -> [N, H, vocab] for the first ``num_heads`` heads (default all);
        ``lm_head_t`` [dim, vocab] is the base model's projection, used when the heads share it."""
        out = torch.stack([h(hidden) for h in self.heads[: num_heads or self.num_heads]], dim=-2)
        return out @ lm_head_t if self.shared_lm_head else out

    def check_fits(self, dim: int, vocab_size: int, model_name: str | None = None) -> None:
        if dim != self.dim or vocab_size != self.vocab_size:
            raise PropdError(
                f"heads expect hidden size {self.dim} and vocabulary {self.vocab_size}, but the model has {dim} and {vocab_size}"
                + (f" (heads were trained for {self.meta.get('base_model')})" if self.meta.get("base_model") else "")
            )

    def save(self, directory: str | Path) -> None:
        """Our format: heads.safetensors + heads.json (shape, base model, acceptance statistics)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.heads.state_dict().items()}, directory / "heads.safetensors")
        config = {
            "format": "propd-medusa",
            "hidden_size": self.dim,
            "vocab_size": self.vocab_size,
            "medusa_num_heads": self.num_heads,
            "medusa_num_layers": self.num_layers,
            "shared_lm_head": self.shared_lm_head,
            **self.meta,
        }
        (directory / "heads.json").write_text(json.dumps(config, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> "MedusaHeads":
        directory = Path(directory)
        if not directory.is_dir():
            raise PropdError(f"heads directory not found: {directory}")
        if (directory / "heads.json").exists():
            config = read_json(directory / "heads.json")
            state = read_weights(directory / "heads.safetensors")
            meta = {k: v for k, v in config.items() if k not in ("format", "hidden_size", "vocab_size", "medusa_num_heads", "medusa_num_layers", "shared_lm_head")}
            heads = cls(config["hidden_size"], config["vocab_size"], config["medusa_num_heads"], config["medusa_num_layers"], config["shared_lm_head"], meta)
        elif (directory / "config.json").exists():
            config = read_json(directory / "config.json")
            weights = next((directory / n for n in ("medusa_lm_head.safetensors", "medusa_lm_head.pt") if (directory / n).exists()), None)
            if "medusa_num_heads" not in config or weights is None:
                raise PropdError(f"{directory} is not a Medusa checkpoint (needs medusa_num_heads in config.json and medusa_lm_head.pt/.safetensors)")
            state = read_weights(weights)
            n_layers = config.get("medusa_num_layers", 1)
            shared = f"0.{n_layers}.weight" not in state
            dim = state["0.0.linear.weight"].shape[1] if n_layers else config["hidden_size"]
            vocab = config.get("vocab_size") or (state[f"0.{n_layers}.weight"].shape[0] if not shared else None)
            if vocab is None:
                raise PropdError(f"{directory}: cannot tell the vocabulary size (no projection weights and no vocab_size)")
            heads = cls(dim, vocab, config["medusa_num_heads"], n_layers, shared, {"base_model": config.get("base_model_name_or_path")})
        else:
            raise PropdError(f"{directory} holds no heads (expected heads.json or a Medusa config.json)")
        try:
            heads.heads.load_state_dict(state)
        except RuntimeError as e:
            raise PropdError(f"{directory}: weights do not match the heads' configuration: {str(e).splitlines()[0]}") from e
        return heads.eval()
