"""Our own LLaMA-family decoder (llama, mistral, qwen2) that owns its weights and runs any layers.

Unlike a ``transformers`` model it runs any *range of layers* over any set of new tokens laid out by
the KV cache (``KVCache.chain`` / ``tree`` / ``paths``: slots, positions and what each token sees).
Tree verification and early pruning (stop after layer k, continue with a subset) build on that.

It is exact by construction where its route is (``kernels``): a token's hidden states are bitwise
the same whichever tokens and rows share its step. The residual stream, norms, RoPE and attention
run in fp32; only the matrix products take the route's dtype (bf16 on CPUs with AMX), through
kernels whose per-row result does not depend on the row count, and attention reduces in an order
fixed by position alone (``attention``). Weights are fused per layer (q|k|v, gate|up); within each
head, q and k features are stored as interleaved (even, odd) pairs so that RoPE is one complex
multiply over q and k together (scores are unchanged because q and k share the order).
"""

from __future__ import annotations

import weakref
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Callable, TypeVar

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

from propd.errors import PropdError
from propd.models import graphs, native, pointwise
from propd.models.attention import attention, runs_native, tiles_take
from propd.models.fused import FusedLayers
from propd.models.kernels import PACKED, Q4_KERNELS, Linear, Route, autograd_route, q4_1_values
from propd.models.kv_cache import CachePool, KVCache, Layout


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    norm_eps: float
    qkv_bias: bool
    max_position: int

    @classmethod
    def from_hf_config(cls, config: PretrainedConfig) -> "ModelArgs":
        rope = getattr(config, "rope_parameters", None) or {}
        rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            raise PropdError(f"rope type {rope['rope_type']!r} is not supported (propd's decoder implements the default RoPE)")
        if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
            raise PropdError("sliding-window attention layers are not supported (every layer here attends to the whole context)")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size,
            dim=config.hidden_size,
            n_layers=config.num_hidden_layers,
            n_heads=config.num_attention_heads,
            n_kv_heads=config.num_key_value_heads or config.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            rope_theta=float(rope_theta),
            norm_eps=float(config.rms_norm_eps),
            qkv_bias=config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            max_position=config.max_position_embeddings,
        )

    def product_shapes(self) -> list[tuple[int, int, int]]:
        """(out, in, how many) of every matrix product in one pass: what a route is chosen for."""
        qkv = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        layer = [(qkv, self.dim), (self.dim, self.n_heads * self.head_dim), (2 * self.intermediate_size, self.dim), (self.dim, self.intermediate_size)]
        return [(o, i, self.n_layers) for o, i in layer] + [(self.vocab_size, self.dim, 1)]


@dataclass
class Layer:
    """One layer's weights, products in [out, in] layout."""

    attn_norm: torch.Tensor  # [dim]
    wqkv: torch.Tensor | None  # [(n_heads + 2 n_kv_heads) head_dim, dim]; the products' weights are None once packed (``Decoder``)
    bqkv: torch.Tensor | None
    wo: torch.Tensor | None  # [dim, n_heads head_dim]
    mlp_norm: torch.Tensor  # [dim]
    w_gate_up: torch.Tensor | None  # [2 intermediate, dim]
    w_down: torch.Tensor | None  # [dim, intermediate]


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a GPU runs behind the host), so wall clocks measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


T = TypeVar("T")
SPARE_CACHE_BYTES = 1 << 30  # spare KV cache tensors kept on a CPU (``cache_pool``)


def per_token_set(made: dict, tokens: torch.Tensor, make: Callable[[], T]) -> T:
    """``make()`` once per tensor ``tokens`` while it lives, then dropped (keyed by its address, every
    drafter loaded anew left 9.4 MB of packed rows behind, and a new set at a dead one's address
    would have taken them)."""
    key = id(tokens)
    if key not in made:
        made[key] = make()
        weakref.finalize(tokens, made.pop, key, None)
    return made[key]


class Decoder:
    """Weights + RoPE tables + forward passes; the KV cache is passed in, never hidden inside."""

    def __init__(self, args: ModelArgs, embed: torch.Tensor, layers: list[Layer], norm: torch.Tensor, lm_head: torch.Tensor, route: Route | None = None):
        self.args = args
        self.route = route or autograd_route(embed.dtype)
        self.dtype = self.route.dtype
        self.embed_tokens = embed  # [vocab, dim]
        self.products = [tuple(Linear(w, self.route) for w in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)) for layer in layers]
        if self.route.kernel in PACKED:  # the packed copies are what the products read: no second copy (the Q4_1 route's fp32 ones held 425 MB)
            layers = [replace(layer, wqkv=None, wo=None, w_gate_up=None, w_down=None) for layer in layers]
        self.layers = layers
        self.norm = norm
        self.lm_head_weight = lm_head  # [vocab, dim]
        self._vocab_rows: dict[int, torch.Tensor] = {}  # id of a token set (``per_token_set``) -> its rows in fp32
        self._vocab_projections: dict[int, Linear] = {}  # id of a token set -> its rows by the route
        inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float32) / args.head_dim))
        angles = torch.outer(torch.arange(args.max_position, dtype=torch.float32), inv_freq)
        self.rope = torch.polar(torch.ones_like(angles), angles).to(embed.device)  # [max_position, head_dim / 2] complex64

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    @cached_property
    def lm_head(self) -> Linear:
        """The vocabulary projection, packed on first use (a draft layer's decoder never uses it), with
        its argmax's int8 screen built then too: built in the first step of at most ``SCREEN_ROWS`` rows
        instead, it took that step 0.44 s (AMD EPYC), which a latency model then took for AR's cost."""
        linear = Linear(self.lm_head_weight, self.route)
        linear.screen  # noqa: B018 (a cached property: built now)
        return linear

    def vocab_rows(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The lm_head's rows for ``tokens`` (None: the whole vocabulary) in fp32 [V, dim]: the frozen
        projection heads train and guess through. Made once per token set."""
        if tokens is None:
            return per_token_set(self._vocab_rows, self.lm_head_weight, lambda: self.lm_head_weight.float())
        return per_token_set(self._vocab_rows, tokens, lambda: self.lm_head_weight[tokens].float())

    def vocab_projection(self, tokens: torch.Tensor | None = None) -> Linear:
        """The lm_head restricted to ``tokens`` (None: the whole vocabulary), by this decoder's route:
        what a drafter's guesses and early pruning's ranking are projected through, over the tokens
        a drafter can guess (a sixth of the vocabulary costs a sixth). Packed once per token set."""
        if tokens is None:
            return self.lm_head
        return per_token_set(self._vocab_projections, tokens, lambda: self.linear(self.proposing(self.lm_head_weight[tokens])))

    @cached_property
    def fused(self) -> FusedLayers | None:
        """The layers as one C call (``fused``), where the route and shapes allow it."""
        lib = native.native_kernel()
        if lib is None or self.device.type != "cpu" or not FusedLayers.fits(self.args, self.layers, self.products):
            return None
        return FusedLayers(self.args, self.layers, self.products, lib)

    @cached_property
    def graphed(self) -> graphs.GraphedLayers | None:
        """The layers as replayed CUDA graphs (``graphs``), on a GPU unless ``PROPD_CUDA_GRAPHS=0``."""
        return graphs.GraphedLayers(self._layer) if graphs.enabled(self.device) else None

    def linear(self, weight: torch.Tensor) -> Linear:
        """Another product [out, in] by this decoder's route (heads' projections)."""
        return Linear(weight, self.route)

    def proposing(self, weight: torch.Tensor) -> torch.Tensor:
        """Weights [out, in] that only propose (a draft layer's, the vocabulary rows that drafters
        and early pruning rank by), as this route reads them best: on a Q4_1 route their nearest
        Q4_1 values, which it then multiplies as 4-bit blocks (no output depends on them). The draft's
        layer and candidate rows are 18 MB in bf16, read cold every step; as 4-bit blocks a 2-token
        tree's drafting at batch 1 took 0.80 ms instead of 1.09 (AMD EPYC), for 2% fewer accepted
        tokens."""
        if self.route.kernel not in Q4_KERNELS or weight.shape[-1] % 32:
            return weight
        return q4_1_values(weight.contiguous())

    def to(self, device: str | torch.device) -> "Decoder":
        """This decoder with its weights on ``device`` (itself when they are there already)."""
        device = torch.device(device)
        if self.device == device:
            return self
        if self.route.kernel in PACKED:
            raise PropdError(f"the {self.route.name} route's packed weights stay on the CPU: load the model on {device} with a plain route instead")
        layers = [Layer(*(None if t is None else t.to(device) for t in vars(layer).values())) for layer in self.layers]
        return Decoder(self.args, self.embed_tokens.to(device), layers, self.norm.to(device), self.lm_head_weight.to(device), self.route)

    @classmethod
    def from_hf(cls, hf_model: PreTrainedModel, route: Route | torch.dtype = torch.float32) -> "Decoder":
        """Take the weights of a loaded ``transformers`` LLaMA-family model; products by ``route``
        (a dtype: plain ``F.linear`` in that dtype, no exactness check)."""
        route = autograd_route(route) if isinstance(route, torch.dtype) else route
        args = ModelArgs.from_hf_config(hf_model.config)
        sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
        prefix = "model."

        def w(name: str) -> torch.Tensor:
            return sd[prefix + name].to(route.dtype)

        def product(name: str) -> torch.Tensor:  # the Q4_1 routes find a Q4_1 file's blocks in the fp32 values (``pack_q4``)
            return sd[prefix + name].to(torch.float32 if route.kernel in Q4_KERNELS else route.dtype)

        def f32(name: str) -> torch.Tensor:  # a copy: a view would keep the whole checkpoint file mapped (and resident)
            return sd[prefix + name].to(torch.float32, copy=True)

        half = args.head_dim // 2
        pairs = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()  # rotate-half -> interleaved

        def interleave(t: torch.Tensor) -> torch.Tensor:
            """Reorder each head's output features [heads * hd, ...] into RoPE pairs (i, i + hd/2)."""
            return t.unflatten(0, (-1, args.head_dim))[:, pairs].flatten(0, 1)

        layers = []
        for i in range(args.n_layers):
            p = f"layers.{i}."
            qkv = torch.cat(
                [interleave(product(p + "self_attn.q_proj.weight")), interleave(product(p + "self_attn.k_proj.weight")), product(p + "self_attn.v_proj.weight")]
            )
            bias = None
            if args.qkv_bias:
                bias = torch.cat([interleave(f32(p + "self_attn.q_proj.bias")), interleave(f32(p + "self_attn.k_proj.bias")), f32(p + "self_attn.v_proj.bias")])
            layers.append(
                Layer(
                    attn_norm=f32(p + "input_layernorm.weight"),
                    wqkv=qkv,
                    bqkv=bias,
                    wo=product(p + "self_attn.o_proj.weight"),
                    mlp_norm=f32(p + "post_attention_layernorm.weight"),
                    w_gate_up=torch.cat([product(p + "mlp.gate_proj.weight"), product(p + "mlp.up_proj.weight")]),
                    w_down=product(p + "mlp.down_proj.weight"),
                )
            )
        embed = w("embed_tokens.weight")
        head = sd.get("lm_head.weight")
        tied = head is None or head.data_ptr() == sd[prefix + "embed_tokens.weight"].data_ptr()
        lm_head = embed if tied else head.to(route.dtype)  # tied: one copy in the route's dtype, not two
        return cls(args, embed, layers, f32("norm.weight"), lm_head, route)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A cache for ``batch_size`` rows of at least ``max_len`` entries: a power of two (256 at
        least, the model's context at most), its tensor from ``cache_pool``, so a later batch of as
        many rows takes it again."""
        a = self.args
        tiles = self.route.kernel == "amx" and self.device.type == "cpu" and tiles_take(a.head_dim)
        capacity = min(max(256, 1 << (max_len - 1).bit_length()), max(max_len, a.max_position))
        return KVCache(a.n_layers, batch_size, a.n_kv_heads, capacity, a.head_dim, self.device, tiles, self.cache_pool, self.cache_dtype)

    @property
    def cache_dtype(self) -> torch.dtype | None:
        """bf16 K/V where our AVX512-BF16 products run and the C attention reads the cache (its
        products take bf16 inputs already; the AMX route keeps its own bf16 copy beside an fp32 cache);
        else None, the default dtype."""
        return torch.bfloat16 if self.route.kernel in ("avx512", *Q4_KERNELS) and runs_native(self.args.head_dim, self.device) else None

    @cached_property
    def cache_pool(self) -> CachePool:
        """Cache tensors lent again (``CachePool``): a few spares, up to ``SPARE_CACHE_BYTES`` on a CPU.
        One spare had methods of different tree sizes (so cache capacities) in one process make a new
        cache for every batch: ProPD's batch-8 cache of 512 entries took 27 ms (AMD EPYC), 2% of its 96-token batch."""
        return CachePool(keep=4, spare_bytes=None if self.graphed is not None else SPARE_CACHE_BYTES)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings [..., dim] in fp32, the residual stream's dtype."""
        return self.embed_tokens[tokens].float()

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last layer's output after the final RMSNorm: what lm_head (and Medusa heads) read."""
        return pointwise.rms_norm(hidden, self.norm, self.args.norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + vocabulary projection of hidden states [..., dim] -> [..., vocab]."""
        return self.lm_head(self.final_norm(hidden))

    def greedy_tokens(self, normed: torch.Tensor) -> torch.Tensor:
        """Argmax tokens [...] of normed hidden states [..., dim]."""
        return self.lm_head.argmax(normed)

    def cores(self) -> AbstractContextManager:
        """The scope to run steps in: with our bf16 products, torch's own ops on one thread and the
        cores to our kernels (``native.own_cores``)."""
        return native.own_cores() if self.route.kernel in PACKED else nullcontext()

    def forward_layers(self, x: torch.Tensor, layout: Layout, cache: KVCache, start: int = 0, end: int | None = None, eager: bool = False) -> torch.Tensor:
        """Run layers [start, end) over new tokens x [B, T, dim] laid out by ``layout``, writing their
        K/V into ``cache`` (committed later by ``cache.keep`` / ``advance``). ``eager``: no CUDA graph
        (a prompt's prefill: every length would be captured anew)."""
        end = self.args.n_layers if end is None else end
        rope = self.rope[layout.positions]  # [B, T, hd / 2]
        recording = x.requires_grad and torch.is_grad_enabled()
        if self.fused is not None and not recording:
            return self.fused.run(x, rope, layout, cache, start, end)
        if self.graphed is not None and not (recording or eager) and x.shape[0] * x.shape[1] <= graphs.MAX_TOKENS:
            return self.graphed.run(x, rope, layout, cache, start, end)
        for i in range(start, end):
            x = self._layer(i, x, rope, layout, cache)
        return x

    def extend(self, tokens: torch.Tensor, layout: Layout, cache: KVCache, eager: bool = False) -> torch.Tensor:
        """All layers over new tokens [B, T] laid out by ``layout``: their last hidden states [B, T, dim]."""
        return self.forward_layers(self.embed(tokens), layout, cache, eager=eager)

    def _layer(self, i: int, x: torch.Tensor, rope: torch.Tensor, layout: Layout, cache: KVCache) -> torch.Tensor:
        a, layer = self.args, self.layers[i]
        qkv, wo, gate_up, down = self.products[i]
        exact = self.route.tile > 0
        h = qkv(pointwise.rms_norm(x, layer.attn_norm, a.norm_eps)).float()
        if layer.bqkv is not None:
            h = h + layer.bqkv
        heads = pointwise.rotate(h, rope, a.n_heads + a.n_kv_heads, a.head_dim, exact)  # q heads | k heads | v heads, q and k rotated
        q, k, v = heads.split([a.n_heads, a.n_kv_heads, a.n_kv_heads], dim=2)
        keys, values = cache.update(i, layout.slots, torch.stack([k, v], dim=2))
        x = x + wo(attention(q, keys, values, layout.plan, exact, cache.tile_copy(i)))
        return x + down(pointwise.silu_mul(gate_up(pointwise.rms_norm(x, layer.mlp_norm, a.norm_eps)), exact))
