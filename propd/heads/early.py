"""The early-pruning head: predicts the next token from the residual stream after an early layer k.

Form: residual blocks, then the base model's own final norm and frozen ``lm_head`` (so the checkpoint
holds only the blocks). ProPD compares each tree node's token with the top-K of its parent's early
prediction and prunes the node, with its subtree, when it is not there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from propd.errors import PropdError
from propd.heads.checkpoint import field, load_error, read_json, read_weights
from propd.heads.medusa import PackedBlocks, ResBlock, packed_once
from propd.models.decoder import Decoder


class EarlyHead(nn.Module):
    def __init__(self, dim: int, vocab_size: int, layer: int, num_layers: int = 1, meta: dict | None = None):
        super().__init__()
        self.dim, self.vocab_size, self.layer, self.num_layers = dim, vocab_size, layer, num_layers
        self.meta = dict(meta or {})
        self.blocks = nn.Sequential(*[ResBlock(dim) for _ in range(num_layers)])
        self._packed: tuple[tuple, PackedBlocks] | None = None  # (``packed_once``)

    def logits(self, hidden: torch.Tensor, decoder: Decoder) -> torch.Tensor:
        """Residual stream after layer ``self.layer`` [..., dim] -> next-token logits [..., vocab]
        (in fp32 through the frozen final norm and lm_head, so that it trains)."""
        return nn.functional.linear(decoder.final_norm(self.blocks(hidden)), decoder.vocab_rows())

    def packed(self, base: Decoder) -> PackedBlocks:
        """The blocks by ``base``'s route, for pruning (the early head only ranks: no output depends on it)."""
        return packed_once(self, base, lambda: PackedBlocks(list(self.blocks), base))

    def save(self, directory: str | Path, weight_dtype: torch.dtype = torch.float16) -> None:
        """early_head.safetensors (weights in ``weight_dtype``, loaded back as fp32) + early_head.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to(weight_dtype).contiguous() for k, v in self.blocks.state_dict().items()}, directory / "early_head.safetensors")
        config = {"hidden_size": self.dim, "vocab_size": self.vocab_size, "layer": self.layer, "num_layers": self.num_layers, **self.meta}
        (directory / "early_head.json").write_text(json.dumps(config, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> "EarlyHead":
        directory = Path(directory)
        config = read_json(directory / "early_head.json")
        meta = {k: v for k, v in config.items() if k not in ("hidden_size", "vocab_size", "layer", "num_layers")}
        head = cls(*(field(config, k, directory / "early_head.json") for k in ("hidden_size", "vocab_size", "layer", "num_layers")), meta)
        try:
            head.blocks.load_state_dict(read_weights(directory / "early_head.safetensors"))
        except RuntimeError as e:
            raise PropdError(f"{directory}: early head weights do not match its configuration: {load_error(e)}") from e
        return head.eval()
