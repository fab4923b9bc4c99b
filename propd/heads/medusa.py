"""Medusa heads: head i guesses the token i+1 positions after the next one from the last hidden state.

Each head is a stack of residual blocks ``x + SiLU(W x + b)`` and a vocabulary projection: its own
(Medusa-1 checkpoints) or the base model's frozen ``lm_head`` (``shared_lm_head``, a checkpoint of a
few MB). Shared-projection heads may guess only among a *candidate vocabulary* (the tokens the model
actually emits most): on a CPU the full 49k-row projection per head costs more than the guess is
worth, and since heads only propose, restricting them never changes the output. Checkpoints load from
Medusa's own layout (``config.json`` + ``medusa_lm_head.pt`` or
``.safetensors``, keys ``{head}.{block}.linear.weight`` and ``{head}.{blocks}.weight``) and from
ours (``heads.safetensors`` + ``heads.json`` recording the base model and the acceptance statistics).

``root_conditioned`` heads (ours) also read the embedding of the root, the token the hidden state
has just produced and which is known before the heads run: head i then adds ``W_i embed(root)`` to
the hidden state. Medusa's heads must guess t+2 without knowing t+1; knowing it is worth a lot of
accuracy (EAGLE's draft reads its next token for the same reason) and costs one small product.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, TypeVar

import torch
from safetensors.torch import save_file
from torch import nn

from propd.errors import PropdError
from propd.heads.checkpoint import field, load_error, read_json, read_weights
from propd.models.decoder import Decoder
from propd.models.kernels import Linear

T = TypeVar("T")


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)  # starts as the identity: head i begins as the base lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class PackedBlocks:
    """Residual blocks' products by a base model's route, to run them where they only propose (their
    weights as the route reads proposing weights, ``Decoder.proposing``): as fp32 modules, the
    Medusa heads' blocks and projection took 2.8 ms of a batch-1 step on the AMD EPYC."""

    def __init__(self, blocks: list[ResBlock], base: Decoder):
        self.products = [(base.linear(base.proposing(b.linear.weight.detach())), b.linear.bias.detach().float()) for b in blocks]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for product, bias in self.products:
            x = x + nn.functional.silu(product(x).float() + bias)
        return x


def packed_once(owner: nn.Module, base: Decoder, make: Callable[[], T]) -> T:
    """``make()`` for ``owner``'s weights by ``base``'s route, kept in ``owner._packed`` until the base
    model or a weight changes (training moves them)."""
    key = (id(base), tuple(p._version for p in owner.parameters()))
    if owner._packed is None or owner._packed[0] != key:
        owner._packed = (key, make())
    return owner._packed[1]


class MedusaHeads(nn.Module):
    def __init__(
        self, dim: int, vocab_size: int, num_heads: int, num_layers: int = 1, shared_lm_head: bool = True,
        meta: dict | None = None, candidate_vocab: torch.Tensor | None = None, root_conditioned: bool = False,
    ):
        super().__init__()
        self.dim, self.vocab_size, self.num_heads, self.num_layers = dim, vocab_size, num_heads, num_layers
        self.shared_lm_head = shared_lm_head
        self.meta = dict(meta or {})
        self.register_buffer("candidate_vocab", candidate_vocab, persistent=False)  # [Vc] token ids, or None for the whole vocabulary
        heads = []
        for _ in range(num_heads):
            layers: list[nn.Module] = [ResBlock(dim) for _ in range(num_layers)]
            if not shared_lm_head:
                layers.append(nn.Linear(dim, vocab_size, bias=False))
            heads.append(nn.Sequential(*layers))
        self.heads = nn.ModuleList(heads)
        self.root_proj: nn.Linear | None = None  # embed(root) [dim] -> one addend per head [H * dim]
        if root_conditioned:
            self.root_proj = nn.Linear(dim, num_heads * dim, bias=False)
            nn.init.zeros_(self.root_proj.weight)
        self._packed: tuple[tuple, list[tuple[Linear | None, PackedBlocks, Linear | None]]] | None = None  # (``packed_once``)

    @property
    def root_conditioned(self) -> bool:
        return self.root_proj is not None

    def logits(self, hidden: torch.Tensor, roots: torch.Tensor | None, decoder: Decoder | None, num_heads: int | None = None) -> torch.Tensor:
        """[N, dim] normed hidden states and the [N] roots they produced -> [N, H, V] for the first
        ``num_heads`` heads (default all), over the candidate vocabulary when there is one. The
        decoder lends its embeddings (root-conditioned heads) and its lm_head (shared projection)."""
        H = num_heads or self.num_heads
        inputs = hidden.unsqueeze(-2).expand(*hidden.shape[:-1], H, self.dim)  # [N, H, dim]
        if self.root_proj is not None:
            inputs = inputs + self.root_proj(decoder.embed(roots)).unflatten(-1, (self.num_heads, self.dim))[..., :H, :]
        out = torch.stack([head(x) for head, x in zip(self.heads[:H], inputs.unbind(-2))], dim=-2)
        return nn.functional.linear(out, decoder.vocab_rows(self.candidate_vocab)) if self.shared_lm_head else out

    @torch.no_grad()
    def top_tokens(self, hidden: torch.Tensor, roots: torch.Tensor, decoder: Decoder, num_heads: int, k: int) -> torch.Tensor:
        """Each of the first ``num_heads`` heads' k best guesses as token ids [N, num_heads, k]: what
        ``logits`` ranks, by the base model's route (``packed``), each head's projection keeping only
        its k best (``Linear.topk``)."""
        hidden = hidden.float()
        embedded = decoder.embed(roots) if self.root_proj is not None else None
        shared = decoder.vocab_projection(self.candidate_vocab) if self.shared_lm_head else None
        guesses = []
        for root_proj, blocks, own in self.packed(decoder)[:num_heads]:
            x = hidden if root_proj is None else hidden + root_proj(embedded).float()
            guesses.append((shared if shared is not None else own).topk(blocks(x), k)[1])
        index = torch.stack(guesses, dim=-2)
        return index if self.candidate_vocab is None else self.candidate_vocab[index]

    def packed(self, base: Decoder) -> list[tuple[Linear | None, PackedBlocks, Linear | None]]:
        """Per head: its part of ``root_proj`` (or None), its blocks and its own projection (or None:
        shared), by ``base``'s route."""

        def make() -> list[tuple[Linear | None, PackedBlocks, Linear | None]]:
            roots = self.root_proj.weight.detach().split(self.dim) if self.root_proj is not None else [None] * self.num_heads
            per_head = []
            for head, root in zip(self.heads, roots):
                blocks = [m for m in head if isinstance(m, ResBlock)]
                own = None if self.shared_lm_head else base.linear(base.proposing(head[-1].weight.detach()))
                per_head.append((None if root is None else base.linear(base.proposing(root)), PackedBlocks(blocks, base), own))
            return per_head

        return packed_once(self, base, make)

    def check_fits(self, dim: int, vocab_size: int) -> None:
        if dim != self.dim or vocab_size != self.vocab_size:
            raise PropdError(
                f"heads expect hidden size {self.dim} and vocabulary {self.vocab_size}, but the model has {dim} and {vocab_size}"
                + (f" (heads were trained for {self.meta.get('base_model')})" if self.meta.get("base_model") else "")
            )

    def save(self, directory: str | Path, weight_dtype: torch.dtype = torch.float32) -> None:
        """Our format: heads.safetensors + heads.json (shape, base model, acceptance statistics).
        ``weight_dtype=torch.float16`` halves the file (the shipped heads); loading restores the
        module's dtype, and heads only propose, so their rounding never changes an output."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {k if k.startswith("root_proj.") else k.removeprefix("heads."): v for k, v in self.state_dict().items()}
        tensors = {k: v.detach().to(weight_dtype).contiguous() for k, v in weights.items()}
        if self.candidate_vocab is not None:
            tensors["candidate_vocab"] = self.candidate_vocab
        save_file(tensors, directory / "heads.safetensors")
        config = {
            "format": "propd-medusa",
            "hidden_size": self.dim,
            "vocab_size": self.vocab_size,
            "medusa_num_heads": self.num_heads,
            "medusa_num_layers": self.num_layers,
            "shared_lm_head": self.shared_lm_head,
            "root_conditioned": self.root_conditioned,
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
            shape_keys = ("format", "hidden_size", "vocab_size", "medusa_num_heads", "medusa_num_layers", "shared_lm_head", "root_conditioned")
            meta = {k: v for k, v in config.items() if k not in shape_keys}
            path = directory / "heads.json"
            heads = cls(*(field(config, k, path) for k in ("hidden_size", "vocab_size", "medusa_num_heads", "medusa_num_layers", "shared_lm_head")),
                        meta, state.pop("candidate_vocab", None), config.get("root_conditioned", False))
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
            heads.load_state_dict({k if k.startswith("root_proj.") else f"heads.{k}": v for k, v in state.items()})
        except RuntimeError as e:
            raise PropdError(f"{directory}: weights do not match the heads' configuration: {load_error(e)}") from e
        return heads.eval()
