"""Our own LLaMA-family decoder (llama, mistral, qwen2) that owns its weights and KV cache.

Unlike a ``transformers`` model it runs any *range of layers* over any set of new tokens, with
explicit position ids, explicit cache slots to write K/V into, and an explicit attention mask over
the cache. Tree verification (a tree mask) and early pruning (stop after layer k, continue with a
subset of tokens) are built on that without touching these internals.

Weights are stored pre-transposed ([in, out]) and fused per layer (q|k|v, gate|up). Within each
head, the q and k output features are stored as interleaved (even, odd) pairs so that RoPE is one
in-place complex multiply over q and k together; attention scores are unchanged because q and k
share the order.

fp32 inference runs each layer on numpy arrays (``_layer_fp32``): a decode step is ~60 small ops
besides the products, and numpy's per-op cost is a fraction of torch's on the CPU we measure on
(a 1-token step: 29 ms vs 36 ms for the 30 layers). bf16 and autograd use the torch layer.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from propd.models.kv_cache import KVCache


@contextmanager
def blas_threads(dtype: torch.dtype):
    """While decoding in fp32, torch runs its own small ops on one thread and leaves the cores to
    numpy's BLAS: with both thread pools active they contend and a step costs several times more.
    Other dtypes multiply with torch's kernels and keep its threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1 if dtype == torch.float32 else before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ w [in, out], each dtype by its fastest route on the CPU we measure on.

    fp32 without autograd goes through numpy's BLAS (OpenBLAS): 1.5x faster than torch's for one
    row and 3-4x for the 2-16 rows tree verification multiplies (``propd latency``). bf16 weights
    are stored as transposed views of [out, in] tensors, the layout torch's bf16 kernels want
    (a 49k-column product: 4 ms that way, 150 ms the other)."""
    if x.dtype != torch.float32:
        return F.linear(x, w.t())
    if not _numpy_ok(x, w):
        return x @ w
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    return torch.from_numpy(rows.numpy() @ w.numpy()).view(*x.shape[:-1], w.shape[-1])


def _numpy_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """fp32 tensors outside autograd: the cases numpy computes faster than torch's CPU kernels here
    (called twice per product and norm, so kept to plain attribute checks)."""
    return x.dtype == w.dtype == torch.float32 and x.is_cpu and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim. In fp32 inference numpy does it in ~8 us; torch's ``rms_norm`` on a
    576-wide row costs ~70 us on this CPU (measured with torch.profiler), twice per layer."""
    if not _numpy_ok(x, weight):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return torch.from_numpy(_rms_norm_np(x.numpy(), weight.numpy(), np.float32(eps)))


def _rms_norm_np(x: np.ndarray, weight: np.ndarray, eps: np.float32) -> np.ndarray:
    return x * (weight / np.sqrt(np.einsum("...i,...i->...", x, x)[..., None] / np.float32(x.shape[-1]) + eps))


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
    def from_hf_config(cls, config) -> "ModelArgs":
        rope = getattr(config, "rope_parameters", None) or {}
        rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope type {rope['rope_type']!r} is not supported")
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


@dataclass
class Layer:
    attn_norm: torch.Tensor  # [dim]
    wqkv: torch.Tensor  # [dim, (n_heads + 2 n_kv_heads) head_dim]
    bqkv: torch.Tensor | None
    wo: torch.Tensor  # [n_heads head_dim, dim]
    mlp_norm: torch.Tensor  # [dim]
    w_gate_up: torch.Tensor  # [dim, 2 intermediate]
    w_down: torch.Tensor  # [intermediate, dim]


class Decoder:
    """Weights + RoPE tables + forward passes; the KV cache is passed in, never hidden inside."""

    def __init__(self, args: ModelArgs, embed: torch.Tensor, layers: list[Layer], norm: torch.Tensor, lm_head_t: torch.Tensor):
        self.args = args
        self.embed_tokens = embed  # [vocab, dim]
        self.layers = layers
        self.norm = norm
        self.lm_head_t = lm_head_t  # [dim, vocab]
        self.dtype = embed.dtype
        inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float32) / args.head_dim))
        angles = torch.outer(torch.arange(args.max_position, dtype=torch.float32), inv_freq)
        self.rope = torch.polar(torch.ones_like(angles), angles).to(embed.device)  # [max_position, head_dim / 2] complex64
        on_cpu_fp32 = self.dtype == torch.float32 and embed.is_cpu
        self._fp32_layers = [Layer(*(None if t is None else t.detach().numpy() for t in vars(l).values())) for l in layers] if on_cpu_fp32 else []

    def to(self, device: str | torch.device) -> "Decoder":
        """This decoder with its weights on ``device`` (itself when they are there already)."""
        device = torch.device(device)
        if self.embed_tokens.device == device:
            return self
        layers = [Layer(*(None if t is None else t.to(device) for t in vars(l).values())) for l in self.layers]
        return Decoder(self.args, self.embed_tokens.to(device), layers, self.norm.to(device), self.lm_head_t.to(device))

    @classmethod
    def from_hf(cls, hf_model, dtype: torch.dtype = torch.float32) -> "Decoder":
        """Take the weights of a loaded ``transformers`` LLaMA-family model."""
        args = ModelArgs.from_hf_config(hf_model.config)
        sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
        prefix = "model."

        def w(name: str) -> torch.Tensor:
            return sd[prefix + name].to(dtype)

        def in_out(weight: torch.Tensor) -> torch.Tensor:
            """[out, in] -> [in, out] in the memory layout ``matmul`` is fastest with: for fp32 (OpenBLAS)
            contiguous [in, out] unless in > out (down_proj: 150 us vs 195 us per row on this CPU), for
            bf16 always a view of the contiguous [out, in] tensor."""
            out_features, in_features = weight.shape
            if dtype == torch.float32 and in_features <= out_features:
                return weight.t().contiguous()
            return weight.contiguous().t()

        half = args.head_dim // 2
        pairs = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()  # rotate-half -> interleaved

        def interleave(t: torch.Tensor) -> torch.Tensor:
            """Reorder each head's output features [heads * hd, ...] into RoPE pairs (i, i + hd/2)."""
            return t.unflatten(0, (-1, args.head_dim))[:, pairs].flatten(0, 1)

        layers = []
        for i in range(args.n_layers):
            p = f"layers.{i}."
            qkv = torch.cat([interleave(w(p + "self_attn.q_proj.weight")), interleave(w(p + "self_attn.k_proj.weight")), w(p + "self_attn.v_proj.weight")])
            bias = None
            if args.qkv_bias:
                bias = torch.cat([interleave(w(p + "self_attn.q_proj.bias")), interleave(w(p + "self_attn.k_proj.bias")), w(p + "self_attn.v_proj.bias")])
            gate_up = torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")])
            layers.append(
                Layer(
                    attn_norm=w(p + "input_layernorm.weight"),
                    wqkv=in_out(qkv),
                    bqkv=bias,
                    wo=in_out(w(p + "self_attn.o_proj.weight")),
                    mlp_norm=w(p + "post_attention_layernorm.weight"),
                    w_gate_up=in_out(gate_up),
                    w_down=in_out(w(p + "mlp.down_proj.weight")),
                )
            )
        lm_head = sd.get("lm_head.weight", sd[prefix + "embed_tokens.weight"]).to(dtype)
        return cls(args, w("embed_tokens.weight"), layers, w("norm.weight"), in_out(lm_head))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        a = self.args
        return KVCache(a.n_layers, batch_size, a.n_kv_heads, max_len, a.head_dim, self.dtype, self.embed_tokens.device)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens[tokens]

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last layer's output after the final RMSNorm: what lm_head (and Medusa heads) read."""
        return rms_norm(hidden, self.norm, self.args.norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + vocabulary projection of hidden states [..., dim] -> [..., vocab]."""
        return matmul(self.final_norm(hidden), self.lm_head_t)

    def greedy_tokens(self, normed: torch.Tensor) -> torch.Tensor:
        """Argmax tokens [...] of normed hidden states [..., dim]."""
        return matmul(normed, self.lm_head_t).argmax(-1)

    def forward_layers(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache,
        start: int = 0,
        end: int | None = None,
    ) -> torch.Tensor:
        """Run layers [start, end) over new tokens.

        x: [B, T, dim] hidden states; positions: [B, T] RoPE positions; slots: [B, T] cache slots
        that receive the new K/V; mask: [B, 1, T, S] bool over cache slots [0, S) (True = attend),
        or None when every new token may see every slot below its own (single-row decoding).
        """
        end = self.args.n_layers if end is None else end
        rope = self.rope[positions].unsqueeze(2)  # [B, T, 1, hd / 2]
        span = int(slots.max()) + 1
        if mask is not None and self.args.n_heads != self.args.n_kv_heads:
            mask = mask.repeat_interleave(self.args.n_heads // self.args.n_kv_heads, dim=2)  # one row per grouped query
        if _numpy_ok(x, self.embed_tokens):
            with blas_threads(self.dtype):  # callers need not remember: without it a pass costs ~3.7x more
                h = x.contiguous().numpy()
                for i in range(start, end):
                    h = self._layer_fp32(i, h, rope.numpy(), slots.numpy(), mask, cache, span)
            return torch.from_numpy(h)
        for i in range(start, end):
            x = self._layer(i, x, rope, slots, mask, cache, span)
        return x

    def _layer(self, i, x, rope, slots, mask, cache: KVCache, span: int) -> torch.Tensor:
        a, layer = self.args, self.layers[i]
        B, T, _ = x.shape
        h = matmul(rms_norm(x, layer.attn_norm, a.norm_eps), layer.wqkv)
        if layer.bqkv is not None:
            h += layer.bqkv
        heads = h.view(B, T, a.n_heads + 2 * a.n_kv_heads, a.head_dim)  # q heads | k heads | v heads
        _rotate_(heads[:, :, : a.n_heads + a.n_kv_heads], rope)
        keys, values = cache.update(i, slots, heads[:, :, a.n_heads :].unflatten(2, (2, a.n_kv_heads)), span)
        o = self._attention(heads[:, :, : a.n_heads], keys, values, mask)
        x = x + matmul(o, layer.wo)
        gate_up = matmul(rms_norm(x, layer.mlp_norm, a.norm_eps), layer.w_gate_up)
        inter = a.intermediate_size
        return x + matmul(F.silu(gate_up[..., :inter]).mul_(gate_up[..., inter:]), layer.w_down)

    def _layer_fp32(self, i, x: np.ndarray, rope: np.ndarray, slots: np.ndarray, mask, cache: KVCache, span: int) -> np.ndarray:
        """``_layer`` on numpy arrays (fp32 inference): the same operations in the same order."""
        a, layer, eps = self.args, self._fp32_layers[i], np.float32(self.args.norm_eps)
        B, T, dim = x.shape
        h = (_rms_norm_np(x, layer.attn_norm, eps).reshape(B * T, dim) @ layer.wqkv).reshape(B, T, -1)
        if layer.bqkv is not None:
            h += layer.bqkv
        qk = a.n_heads + a.n_kv_heads
        pairs = h[..., : qk * a.head_dim].view(np.complex64).reshape(B, T, qk, a.head_dim // 2)
        pairs *= rope
        keys, values = cache.update(i, slots, h[..., a.n_heads * a.head_dim :].reshape(B, T, 2, a.n_kv_heads, a.head_dim), span)
        q = torch.from_numpy(h[..., : a.n_heads * a.head_dim]).unflatten(-1, (a.n_heads, a.head_dim))
        o = self._attention(q, keys, values, mask).numpy()
        x = x + (o.reshape(B * T, -1) @ layer.wo).reshape(B, T, dim)
        gate_up = _rms_norm_np(x, layer.mlp_norm, eps).reshape(B * T, dim) @ layer.w_gate_up
        inter = a.intermediate_size
        act = F.silu(torch.from_numpy(gate_up[:, :inter])).numpy()
        act *= gate_up[:, inter:]
        return x + (act @ layer.w_down).reshape(B, T, dim)

    def _attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q [B, T, n_heads, hd] over keys/values [B, kv_heads, S, hd] -> [B, T, n_heads * hd].

        The query heads that share a K/V head are attended as extra query rows of it (mask rows
        repeated to match in ``forward_layers``): 20% faster than ``enable_gqa`` for one token."""
        a = self.args
        B, T = q.shape[:2]
        group = a.n_heads // a.n_kv_heads
        grouped = q.reshape(B, T, a.n_kv_heads, group, a.head_dim).permute(0, 2, 1, 3, 4).reshape(B, a.n_kv_heads, T * group, a.head_dim)
        o = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask)  # [B, kv_heads, T * group, hd]
        return o.view(B, a.n_kv_heads, T, group, a.head_dim).permute(0, 2, 1, 3, 4).reshape(B, T, a.n_heads * a.head_dim)


def _rotate_(heads: torch.Tensor, rope: torch.Tensor) -> None:
    """RoPE in place on heads [B, T, n, hd] whose features are interleaved (even, odd) pairs: one
    complex multiply by rope [B, T, 1, hd / 2]. Computed in fp32 (bf16 has no complex type)."""
    pairs = heads.float()  # the same memory in fp32, a copy otherwise
    torch.view_as_complex(pairs.unflatten(-1, (-1, 2))).mul_(rope)
    if pairs.data_ptr() != heads.data_ptr():
        heads.copy_(pairs)
