"""An EAGLE-style draft layer: one transformer layer that runs ahead of the model on its features.

Medusa heads guess token t+k from the hidden state at t alone, so every depth of a tree is a guess
made without the tokens before it. The draft instead reads, at each position j, the model's final
normed hidden state n_j together with the token x_{j+1} it produced, and predicts n_{j+1}; the base
model's frozen ``lm_head`` turns that into a guess for x_{j+2}. Fed its own prediction and a guessed
token, it continues one more position, so each tree node's children come from a pass that knows the
node's whole path (EAGLE, arXiv 2401.15077; here with the normed features as input and target).

It is a one-layer ``Decoder`` of the base model's shape, so it runs with our own attention, KV cache
and tree masks: its cache holds one entry per position of the answer (the prompt's last position
first), written from the model's true features as tokens are accepted.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from propd.errors import PropdError
from propd.heads.checkpoint import load_error, read_json, read_weights
from propd.models.decoder import Decoder, Layer, ModelArgs
from propd.models.kernels import Linear, autograd_route


class DraftHead(nn.Module):
    def __init__(self, args: ModelArgs, meta: dict | None = None, candidate_vocab: torch.Tensor | None = None):
        super().__init__()
        self.args = ModelArgs(**{**vars(args), "n_layers": 1, "qkv_bias": False})
        self.meta = dict(meta or {})
        self.register_buffer("candidate_vocab", candidate_vocab, persistent=False)  # [Vc] token ids the draft may guess, or None for all
        a = self.args
        dim, qkv = a.dim, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim
        self.fc = nn.Linear(2 * dim, dim, bias=False)  # [n_j, embed(x_{j+1})] -> the layer's input
        with torch.no_grad():  # start as "the feature itself": the layer then learns the step forward
            self.fc.weight.zero_()
            self.fc.weight[:, :dim].copy_(torch.eye(dim))
        self.attn_norm = nn.Parameter(torch.ones(dim))
        self.wqkv = nn.Parameter(torch.randn(dim, qkv) * 0.02)  # [in, out], the layout ``Decoder`` uses in fp32
        self.wo = nn.Parameter(torch.randn(a.n_heads * a.head_dim, dim) * 0.02)
        self.mlp_norm = nn.Parameter(torch.ones(dim))
        self.w_gate_up = nn.Parameter(torch.randn(dim, 2 * a.intermediate_size) * 0.02)
        self.w_down = nn.Parameter(torch.zeros(dim, a.intermediate_size))  # [out, in]: ``Decoder`` reads its transpose
        self._decoders: dict[tuple, Decoder] = {}  # (base, training, weights' versions) -> the draft as a Decoder
        self._fc: tuple[tuple[int, int], Linear] | None = None  # ((base's id, fc's version), fc by the base's route)

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    def decoder(self, base: Decoder) -> Decoder:
        """The draft as a one-layer ``Decoder``. With gradients on, it multiplies these parameters
        in fp32 (training); otherwise copies of them as the base model's route reads proposing
        weights (``Decoder.proposing``), made once per base model and weights' version (it only
        proposes, so its rounding never changes an output)."""
        training = torch.is_grad_enabled()
        key = (id(base), training, tuple(p._version for p in self.parameters()))
        if key not in self._decoders:
            self._decoders.clear()
            weights = (self.wqkv.t(), self.wo.t(), self.w_gate_up.t(), self.w_down)
            if not training:
                weights = tuple(base.proposing(w.detach()) for w in weights)
            wqkv, wo, w_gate_up, w_down = weights
            layer = Layer(self.attn_norm, wqkv, None, wo, self.mlp_norm, w_gate_up, w_down)
            route = autograd_route() if training else base.route
            self._decoders[key] = Decoder(self.args, base.embed_tokens, [layer], base.norm, base.lm_head_weight, route)
        return self._decoders[key]

    def inputs(self, features: torch.Tensor, next_tokens: torch.Tensor, base: Decoder) -> torch.Tensor:
        """The layer's input [..., dim] (fp32) from normed features [..., dim] and the tokens they
        produced [...]: in training by ``fc``, else by a copy of it packed by the base's route."""
        x = torch.cat([features, base.embed(next_tokens).to(features.dtype)], dim=-1)
        if torch.is_grad_enabled():
            return self.fc(x)
        return self._packed_fc(base)(x).float()

    def prepare(self, base: Decoder) -> None:
        """Pack what proposing reads (the layer, its input projection, the candidate rows) before
        the first step: packed inside it, they were timed as that step's cost (a 2-token tree took
        58 ms instead of ~17), and ProPD ruled trees out for the rest of a short answer."""
        self.decoder(base)
        self._packed_fc(base)
        base.vocab_projection(self.candidate_vocab)

    def _packed_fc(self, base: Decoder) -> Linear:
        key = (id(base), self.fc.weight._version)
        if self._fc is None or self._fc[0] != key:
            self._fc = (key, base.linear(base.proposing(self.fc.weight.detach())))
        return self._fc[1]

    def projection(self, base: Decoder) -> torch.Tensor:
        """The base lm_head's columns for the candidate vocabulary, in fp32 [dim, Vc] (training)."""
        return base.vocab_rows(self.candidate_vocab).t()

    def top_tokens(self, predicted: torch.Tensor, base: Decoder, k: int, probs: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The k best guesses [..., k] (token ids) after predicted features [..., dim], projected in
        the base model's dtype and route (the rows packed once per base model); with ``probs``, also
        the draft's probability of each [..., k] (over its candidate vocabulary)."""
        scores, best = base.vocab_projection(self.candidate_vocab).topk(predicted, k, normalized=probs)
        index = best if self.candidate_vocab is None else self.candidate_vocab[best]
        return (index, scores.exp()) if probs else index

    def check_fits(self, base: ModelArgs) -> None:
        a = self.args
        if (a.dim, a.vocab_size, a.n_heads, a.n_kv_heads, a.head_dim) != (base.dim, base.vocab_size, base.n_heads, base.n_kv_heads, base.head_dim):
            raise PropdError(
                f"draft expects hidden size {a.dim}, vocabulary {a.vocab_size} and {a.n_heads}/{a.n_kv_heads} heads of {a.head_dim}, "
                f"but the model has {base.dim}, {base.vocab_size} and {base.n_heads}/{base.n_kv_heads} of {base.head_dim}"
                + (f" (the draft was trained for {self.meta.get('base_model')})" if self.meta.get("base_model") else "")
            )

    def save(self, directory: str | Path, weight_dtype: torch.dtype = torch.float16) -> None:
        """draft.safetensors + draft.json (shape, base model, acceptance statistics)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to(weight_dtype).contiguous() for k, v in self.state_dict().items()}
        if self.candidate_vocab is not None:
            tensors["candidate_vocab"] = self.candidate_vocab
        save_file(tensors, directory / "draft.safetensors")
        (directory / "draft.json").write_text(json.dumps({"format": "propd-draft", "args": vars(self.args), **self.meta}, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> "DraftHead":
        directory = Path(directory)
        config = read_json(directory / "draft.json")
        if config.get("format") != "propd-draft" or "args" not in config:
            raise PropdError(f"{directory / 'draft.json'} is not a propd draft configuration")
        state = read_weights(directory / "draft.safetensors")
        meta = {k: v for k, v in config.items() if k not in ("format", "args")}
        try:
            draft = cls(ModelArgs(**config["args"]), meta, state.pop("candidate_vocab", None))
            draft.load_state_dict({k: v.float() for k, v in state.items()})
        except (TypeError, RuntimeError) as e:
            raise PropdError(f"{directory}: draft weights do not match its configuration: {load_error(e)}") from e
        return draft.eval()
