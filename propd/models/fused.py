"""A run of decoder layers in one C call (``csrc/layer.c``) on our bf16 routes (``amx``, ``avx512``).

The tensor code calls the same C kernels one by one, with ~15 Python-level ops per layer between
them; on the Intel Xeon with AMX those ops took a third of a batch-1 step. Here the whole run is one
call: the same kernels on the same values in the same order, so every value is bitwise what the
tensor code gives (``tests/test_exact.py`` compares them).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from propd.models import native
from propd.models.kernels import PACKED, Q4_KERNELS
from propd.models.kv_cache import KVCache, Layout


class _Weights(ctypes.Structure):
    _fields_ = [
        *[(name, ctypes.c_void_p) for name in ("attn_norm", "bqkv", "mlp_norm", "qkv", "wo", "gate_up", "down")],
        ("q4", ctypes.c_int64 * 4),
        ("bf16", ctypes.c_int64),
    ]


class _Step(ctypes.Structure):
    _fields_ = [
        *[(name, ctypes.c_int64) for name in ("dim", "heads", "kv_heads", "hd", "inter", "threads")],
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("kv", ctypes.c_void_p),
        *[(name, ctypes.c_int64) for name in ("kv_bf16", "s_layer", "s_kv", "s_row", "s_head", "s_slot", "B", "T", "D", "max_keys", "attend_threads")],
        *[(name, ctypes.c_void_p) for name in ("starts", "slots", "n_in", "path", "cs", "packed")],
        *[(name, ctypes.c_int64) for name in ("p_layer", "p_row", "p_head")],
        *[(name, ctypes.c_void_p) for name in ("ready", "committed")],
    ]


@functools.lru_cache(maxsize=64)
def _starts(B: int, T: int) -> torch.Tensor:
    """Where each of B rows of T tokens starts among them [B + 1] (the C code only reads it)."""
    return torch.arange(0, (B + 1) * T, T)


class FusedLayers:
    """The decoder's layers as the C code reads them: norms, biases and packed weights (bf16, or
    Q4_1 blocks where ``Linear.q4`` holds them: ``q4`` says which, and by which kernel)."""

    def __init__(self, args, layers, products, lib: ctypes.CDLL):
        self.args, self.lib = args, lib
        self.weights = (_Weights * len(layers))()
        for w, layer, (qkv, wo, gate_up, down) in zip(self.weights, layers, products):
            w.attn_norm, w.mlp_norm = layer.attn_norm.data_ptr(), layer.mlp_norm.data_ptr()
            w.bqkv = None if layer.bqkv is None else layer.bqkv.data_ptr()
            w.qkv, w.wo, w.gate_up, w.down = ((p.packed if p.q4 is None else p.q4).data_ptr() for p in (qkv, wo, gate_up, down))
            w.q4[:] = [0 if p.q4 is None else Q4_KERNELS[p.route.kernel].number for p in (qkv, wo, gate_up, down)]
            w.bf16 = PACKED[qkv.route.kernel]
        self._keep = (layers, products)  # the tensors behind the pointers

    @staticmethod
    def fits(args, layers, products) -> bool:
        """Whether the C code takes these layers: our packed products (bf16 or Q4_1), inputs needing no padding, fp32 norms."""
        widths = (args.dim, args.n_heads * args.head_dim, args.intermediate_size)
        return (
            all(p.route.kernel in PACKED for ps in products for p in ps)
            and all(n % 32 == 0 for n in widths)
            and args.head_dim % 16 == 0
            and args.head_dim <= 128
            and all(t.dtype == torch.float32 and t.is_contiguous() for layer in layers for t in (layer.attn_norm, layer.mlp_norm))
            and all(layer.bqkv is None or (layer.bqkv.dtype == torch.float32 and layer.bqkv.is_contiguous()) for layer in layers)
        )

    def run(self, x: torch.Tensor, rope: torch.Tensor, layout: Layout, cache: KVCache, start: int, end: int) -> torch.Tensor:
        """Layers [start, end) over x [B, T, dim] (fp32): the new hidden states, K/V written into
        ``cache``. Rows' repeated tokens past ``layout.counts`` are skipped (and returned as they came)."""
        a, plan = self.args, layout.plan
        B, T, _ = x.shape
        cs, slots, n_in, path = torch.view_as_real(rope), layout.slots, plan.inplace, plan.path
        counts, given = layout.counts, x
        real = None if counts is None or bool((counts == T).all()) else torch.arange(T) < counts.unsqueeze(1)  # [B, T]
        if real is None:  # every row T tokens (the rows' first token at T b: four fewer tensor ops than from counts, each run cold here)
            x, most, starts = x.contiguous().clone(), T, _starts(B, T)
        else:
            x, cs, slots, n_in, path = (t[real] for t in (x, cs, slots, n_in, path))
            most, starts = int(counts.max()), torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        cs, slots, n_in, path = (t.contiguous() for t in (cs, slots, n_in, path))
        max_keys = int(n_in.max()) + path.shape[-1]
        kv = cache.kv
        step = _Step(
            a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.intermediate_size, native.kernel_threads(), a.norm_eps, a.head_dim**-0.5,
            kv.data_ptr(), kv.dtype == torch.bfloat16, *kv.stride()[:5], B, most, path.shape[-1], max_keys,
            native.threads(len(x) * a.n_heads * max_keys), starts.data_ptr(), slots.data_ptr(), n_in.data_ptr(), path.data_ptr(), cs.data_ptr(),
        )
        if cache.packed is not None:
            committed = cache.lengths.contiguous()
            step.packed, step.ready, step.committed = cache.packed.data_ptr(), cache.ready.data_ptr(), committed.data_ptr()
            step.p_layer, step.p_row, step.p_head = cache.packed.stride()[:3]
        weights = ctypes.cast(ctypes.addressof(self.weights) + start * ctypes.sizeof(_Weights), ctypes.POINTER(_Weights))
        if self.lib.forward_layers(x.data_ptr(), weights, start, end - start, ctypes.byref(step)):
            raise MemoryError("fused layers: out of memory")
        if real is None:
            return x
        out = given.clone()
        out[real] = x
        return out
