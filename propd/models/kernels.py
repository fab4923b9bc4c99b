"""Matrix products whose result for one row never depends on how many rows share the call.

Tree verification multiplies N rows where AR multiplies one; if a kernel's blocking or its choice
between a matrix-vector and a matrix-matrix routine depends on the row count, a token's logits
depend on how many tokens share its step and a near-tie can flip the output. A ``Route`` is one
kernel family at one dtype, called with a fixed row tile: a product of M rows runs as calls of at
most ``tile`` rows (``pad``: exactly ``tile`` rows, zero-padded), so every row sees one code path;
our ``amx`` and ``avx512`` kernels take any number of rows in one call, each computed as if alone.

Which route is fastest, and which kernels are row-invariant, differs between machines (oneDNN's
AMX kernels on an Intel Xeon, OpenBLAS or MKL elsewhere). ``choose_route`` measures both for the
model's own shapes once per machine, torch version and model (the closest routes as whole decode
steps on the model's weights), and caches the answer.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import platform
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from propd.errors import PropdError
from propd.models import native
from propd.models.pages import in_large_pages

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
KERNELS = ("onednn", "torch", "amx", "avx512", "avx512q4", "avx512q4i8")
# our C products (``csrc/matmul.c``): the kernel of each route's bf16 products, as bf16_products()
# names them (a bit each: 1 AMX tiles, 2 AVX512-BF16, which a CPU with AMX has too); ``avx512q4``
# multiplies weights that hold the GGUF's Q4_1 values from their 4-bit blocks by 16-bit inputs (as two
# int8 planes), ``avx512q4i8`` by int8 inputs (``csrc/matmul_q4.c``, ``pack_q4``)
PACKED = {"amx": 1, "avx512": 2, "avx512q4": 2, "avx512q4i8": 2}
# Chosen only where asked for (``--route``, ``$PROPD_ROUTE``): its int8 inputs move the logits 4x as far
# from fp32's as bf16 inputs do (``docs/engine.md``), beyond what the dtype's own rounding does.
ASKED_ONLY = ("avx512q4i8",)
TILE = 32  # rows per call; oneDNN's prepacked bf16 kernels were row-invariant up to 32 rows (not at 64) on AMX
ROUTE_ENV = "PROPD_ROUTE"


@dataclass(frozen=True)
class Route:
    kernel: str  # "onednn" (weights prepacked once), "torch" (F.linear), "amx", "avx512", "avx512q4" or "avx512q4i8" (ours; fp32 out)
    dtype_name: str  # "float32" or "bfloat16"
    tile: int = TILE  # 0: one call whatever the row count (autograd, GPUs)
    pad: bool = False  # pad every call to exactly ``tile`` rows
    exact: bool = False  # the row-invariance check passed on this machine

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def name(self) -> str:
        return f"{self.dtype_name}-{self.kernel}" + (f"-pad{self.tile}" if self.pad else "")

    @classmethod
    def parse(cls, name: str) -> "Route":
        """``bfloat16-onednn``, ``float32-torch-pad8`` ... (what ``name`` gives)."""
        parts = name.split("-")
        padded = len(parts) == 3 and parts[2].startswith("pad") and parts[2][3:].isdigit() and int(parts[2][3:]) > 0
        if len(parts) not in (2, 3) or parts[0] not in DTYPES or parts[1] not in KERNELS or (len(parts) == 3 and not padded):
            raise PropdError(f"unknown route {name!r}: use DTYPE-KERNEL[-padN], DTYPE one of {', '.join(DTYPES)}, KERNEL one of {', '.join(KERNELS)}")
        if parts[1] in PACKED and parts[0] != "bfloat16":
            raise PropdError(f"unknown route {name!r}: the {parts[1]} kernel multiplies bfloat16 only")
        tile = int(parts[2][3:]) if len(parts) == 3 else TILE
        return cls(parts[1], parts[0], tile, len(parts) == 3)


@contextmanager
def torch_threads(n: int):
    """Run torch's ops on ``n`` threads for a while."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def serial(enabled: bool = True):
    """A scope for the ops whose vector and scalar loops round differently (exp, silu, complex
    products). Split across threads, such an op cuts the tensor where its size says, and the rows
    cut there end in the scalar loop: a token's result would depend on how many share its step.
    On one thread every row runs the same loops. Adds, products and copies round the same in
    both loops and keep every thread."""
    return torch_threads(1) if enabled else nullcontext()


def autograd_route(dtype: torch.dtype = torch.float32) -> Route:
    """Plain ``F.linear`` in one call: for training (gradients) and for devices without a check."""
    return Route("torch", next(k for k, v in DTYPES.items() if v == dtype), tile=0)


def as_rows(x: torch.Tensor, dtype: torch.dtype, width: int) -> torch.Tensor:
    """x [..., width] as rows [M, width] in ``dtype``, with no tensor op where it is that already: in a
    decode step each op runs cold after the weights' stream, ~10 us (AMD EPYC)."""
    x = x if x.dtype == dtype else x.to(dtype)
    return x if x.dim() == 2 else x.reshape(-1, width)


def shaped(y: torch.Tensor, x: torch.Tensor, *tail: int) -> torch.Tensor:
    """y [M, *tail], computed from rows of x [..., width] (``as_rows``), as [..., *tail]."""
    return y if x.dim() == 2 else y.view(*x.shape[:-1], *tail)


class Linear:
    """y = x W^T by one route. ``weight`` [out, in]; x [..., in] in any float dtype; y in the route's
    dtype (fp32 from ours, which sum in fp32)."""

    def __init__(self, weight: torch.Tensor, route: Route):
        self.route = route
        self.weight = weight.to(route.dtype) if route.tile == 0 else weight.detach().to(route.dtype).contiguous()  # .to keeps autograd
        self.out_features, self.in_features = weight.shape
        self.dtype = torch.float32 if route.kernel in PACKED else route.dtype  # what it takes and gives
        self.packed = self.q4 = None
        if route.kernel == "onednn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, route.tile)
        elif route.kernel in PACKED:
            self.lib = packed_kernels(route.kernel)
            self.q4 = pack_q4(weight.detach()) if route.kernel in Q4_KERNELS else None  # None: not Q4_1 values, multiplied in bf16
            self.packed, self.weight = (pack_bf16(self.weight) if self.q4 is None else None), None

    @property
    def bytes_read(self) -> int:
        """Bytes of weights a product reads: its Q4_1 blocks, or its weights in the route's dtype."""
        return self.q4.numel() if self.q4 is not None else self.out_features * self.in_features * self.route.dtype.itemsize

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        route = self.route
        if route.tile == 0:
            return F.linear(x.to(self.dtype), self.weight)
        rows = as_rows(x, self.dtype, self.in_features)
        M = rows.shape[0]
        if (M <= route.tile or route.kernel in PACKED) and not route.pad:  # ours: any rows, each as alone
            return shaped(self._call(rows), x, self.out_features)
        out = torch.empty(M, self.out_features, dtype=self.dtype, device=x.device)
        for start in range(0, M, route.tile):
            chunk = rows[start : start + route.tile]
            n = chunk.shape[0]
            if route.pad and n < route.tile:
                chunk = F.pad(chunk, (0, 0, 0, route.tile - n))
            out[start : start + n] = self._call(chunk)[:n]
        return out.view(*x.shape[:-1], self.out_features)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """The column of each row's largest output [...] (the first of equal ones): on our
        route without writing the outputs (a greedy step's vocabulary projection: 3 MB at 16 rows);
        for a vocabulary, screened by int8 copies of the weights where the CPU can (``Int8Screen``)."""
        if self.route.kernel not in PACKED or self.q4 is not None or x.device.type != "cpu":
            return self(x).argmax(-1)
        rows = packed_rows(as_rows(x, self.dtype, self.in_features), self.packed)
        at = torch.empty(rows.shape[0], dtype=torch.long)
        K = rows.shape[1]
        for start in range(0, len(rows), TILE):
            n = min(TILE, len(rows) - start)
            tile = (rows, at) if n == len(rows) else (rows[start : start + n], at[start : start + n])  # (a decode step's rows: no slicing ops)
            if n <= SCREEN_ROWS and self.screened_argmax(*tile) == 0:
                continue
            threads, kernel = native.kernel_threads(), PACKED[self.route.kernel]
            if self.lib.bf16_argmax(rows[start].data_ptr(), self.packed.data_ptr(), at[start].data_ptr(), n, self.out_features, K, threads, kernel):
                raise RuntimeError(f"{self.route.kernel} argmax of {n} rows failed (out of memory)")
        return shaped(at, x)

    def screened_argmax(self, rows: torch.Tensor, at: torch.Tensor) -> int:
        """``argmax`` of rows [n, in] (fp32, packed_rows, n <= 32) into at [n] by the int8 screen: 0
        where it answered, else 1 (no screen here, or one it cannot answer: call the full argmax)
        or -1 (out of memory)."""
        screen = self.screen
        if screen is None:
            return 1
        return self.lib.bf16_argmax_screened(
            rows.data_ptr(), self.packed.data_ptr(), screen.q.data_ptr(), screen.scales.data_ptr(), screen.weight_norms.data_ptr(),
            screen.error_norms.data_ptr(), at.data_ptr(), len(rows), self.out_features, rows.shape[1], screen.blocks, screen.most_blocks,
            native.kernel_threads(),
        )

    @functools.cached_property
    def screen(self) -> Int8Screen | None:
        """The argmax's int8 screen: for products of ``SCREEN_COLUMNS`` outputs or more (a
        vocabulary) on our AVX512-BF16 kernel where the CPU has AVX512-VNNI; else None."""
        if self.packed is None or PACKED.get(self.route.kernel) != PACKED["avx512"] or self.out_features < SCREEN_COLUMNS or not self.lib.bf16_screen_ready():
            return None
        return Int8Screen.of(self.packed)

    def topk(self, x: torch.Tensor, k: int, normalized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's k largest outputs [..., k] (fp32, largest first) and their columns; ``normalized``:
        as log-probabilities (minus the row's logsumexp). On our routes without handing the
        outputs back to torch (a draft's candidates: its topk and logsumexp took as long as the product)."""
        if self.route.kernel not in PACKED or x.device.type != "cpu":
            outputs = self(x).float()
            best = outputs.topk(k, dim=-1)
            return (best.values - outputs.logsumexp(-1, keepdim=True) if normalized else best.values), best.indices
        rows = as_rows(x, self.dtype, self.in_features)
        top, at = torch.empty(rows.shape[0], k), torch.empty(rows.shape[0], k, dtype=torch.long)
        if self.q4 is not None:  # (Q4_1 blocks: the product, then the same selection; torch's took 0.17 ms of a drafting level)
            outputs = self._call(rows)
            failed = self.lib.rows_topk(outputs.data_ptr(), at.data_ptr(), top.data_ptr(), rows.shape[0], self.out_features, k, int(normalized),
                                        native.kernel_threads())
        else:
            rows = packed_rows(rows, self.packed)
            failed = self.lib.bf16_topk(rows.data_ptr(), self.packed.data_ptr(), at.data_ptr(), top.data_ptr(), rows.shape[0], self.out_features,
                                        rows.shape[1], k, int(normalized), native.kernel_threads(), PACKED[self.route.kernel])
        if failed:
            raise RuntimeError(f"{self.route.kernel} top-{k} of {rows.shape[0]} rows failed (out of memory, or more than {self.out_features})")
        return shaped(top, x, k), shaped(at, x, k)

    def _call(self, rows: torch.Tensor) -> torch.Tensor:
        if self.q4 is not None:
            return q4_product(self.lib, self.route.kernel, rows, self.q4, self.out_features)
        if self.route.kernel in PACKED:
            return packed_product(self.lib, rows, self.packed, self.out_features, PACKED[self.route.kernel])
        held = native.kernel_threads()  # inside ``native.own_cores``, torch's threads back for this product
        with torch_threads(held) if held != torch.get_num_threads() else nullcontext():
            if self.packed is not None:
                return torch.ops.mkldnn._linear_pointwise(rows, self.packed, None, "none", [], "")
            return F.linear(rows, self.weight)


def packed_kernels(kernel: str) -> ctypes.CDLL:
    """The C kernels, where they multiply by ``kernel`` ("amx", "avx512" or one of ``Q4_KERNELS``) on this CPU."""
    lib = native.native_kernel()
    q4 = kernel in Q4_KERNELS
    if lib is None or not lib.bf16_products() & PACKED[kernel] or (q4 and not lib.q4_products()):
        need = "AMX tiles and Linux's permission to use them" if kernel == "amx" else "AVX512-BF16"
        need += " and AVX512-VNNI" if q4 else ""
        raise RuntimeError(f"the {kernel} kernel needs a CPU with {need}, and a C compiler")
    return lib


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """bf16 weights [out, in] in the AMX tiles' layout, which the AVX512-BF16 kernel reads too
    (``csrc/matmul.c``): per block of 16 outputs and 32 inputs, 16 rows of input pairs x 16
    outputs; zero-padded to whole blocks."""
    if weight.device.type != "cpu":
        raise RuntimeError("our bf16 kernels run on the CPU")
    out, inp = weight.shape
    padded = F.pad(weight.to(torch.bfloat16), (0, -inp % 32, 0, -out % 16))
    return in_large_pages(padded.view(padded.shape[0] // 16, 16, padded.shape[1] // 32, 16, 2).permute(0, 2, 3, 1, 4))


Q4_LEVELS = 15  # Q4_1: levels 0 .. 15 of d per block of 32 inputs, above its minimum m (d, m fp16)


def q4_1_values(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] (in a multiple of 32) quantized to Q4_1 as llama.cpp does and expanded
    again as the GGUF reader does (fp32 (d q) + m): weights a model read from a Q4_1 file holds."""
    blocks = weight.float().view(weight.shape[0], -1, 32)
    low, high = blocks.amin(2, keepdim=True), blocks.amax(2, keepdim=True)
    d, m = ((high - low) / Q4_LEVELS).half().float(), low.half().float()
    levels = torch.where(d > 0, ((blocks - m) / d).round(), 0.0).clamp(0, Q4_LEVELS)
    return ((d * levels) + m).view_as(weight)


def q4_1_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The Q4_1 blocks whose expansion (fp32 (d q) + m) is ``weight`` [out, in] exactly: levels q
    [out, in] (uint8), d and m [out, in / 32] (fp16); None where the values are not Q4_1's. Each
    block's minimum is m (its level 0), and d is the fp16 nearest its span / 15, or one step beside it."""
    if weight.dim() != 2 or weight.shape[1] % 32 or weight.dtype != torch.float32 or not bool(weight.isfinite().all()):
        return None
    blocks = weight.view(weight.shape[0], -1, 32)
    m = blocks.amin(2)
    if not torch.equal(m.half().float(), m):
        return None
    nearest = ((blocks.amax(2) - m) / Q4_LEVELS).half()
    d, levels = nearest.clone(), torch.zeros(blocks.shape, dtype=torch.uint8)
    todo = torch.ones(m.shape, dtype=torch.bool)
    for step in (0, 1, -1):
        candidate = (nearest.view(torch.int16) + step).view(torch.float16)[todo]
        scale, low, values = candidate.float().unsqueeze(1), m[todo].unsqueeze(1), blocks[todo]
        q = torch.where(scale > 0, ((values - low) / scale).round(), 0.0)
        fits = ((q >= 0) & (q <= Q4_LEVELS) & ((scale * q) + low == values)).all(1)
        where = todo.nonzero()[fits]
        d[where[:, 0], where[:, 1]] = candidate[fits]
        levels[where[:, 0], where[:, 1]] = q[fits].to(torch.uint8)
        todo[where[:, 0], where[:, 1]] = False
        if not bool(todo.any()):
            return levels.view(weight.shape), d, m.half()
    return None


def holds_q4_1(weight: torch.Tensor) -> bool:
    """Whether the first rows of ``weight`` [out, in] hold Q4_1 values: a quick look before a whole
    tensor is searched for its blocks (the vocabulary's 28M values took 2.5 s)."""
    return q4_1_blocks(weight[:16].float()) is not None


def pack_q4(weight: torch.Tensor) -> torch.Tensor | None:
    """Q4_1 weights [out, in] in ``csrc/matmul_q4.c``'s layout, [out / 16, in / 32, 320] bytes (outputs
    zero-padded to whole blocks of 16): per block, each group h of 8 inputs as 64 bytes (byte 4 o + k
    holds inputs 8h + k and 8h + 4 + k of output o), then d and m; or None where the weights are not
    Q4_1 values (``q4_1_blocks``)."""
    if weight.device.type != "cpu" or not holds_q4_1(weight) or (found := q4_1_blocks(weight.float())) is None:
        return None
    levels, d, m = (F.pad(t, (0, 0, 0, -weight.shape[0] % 16)) for t in found)
    NB, KB = levels.shape[0] // 16, levels.shape[1] // 32
    groups = levels.view(NB, 16, KB, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)  # [block, input block, group h, output o, input k, half]
    nibbles = (groups[..., 0] | (groups[..., 1] << 4)).contiguous().view(NB, KB, 256)
    scales = [t.view(NB, 16, KB).permute(0, 2, 1).contiguous().view(torch.uint8) for t in (d, m)]  # [block, input block, 32 bytes]
    return in_large_pages(torch.cat([nibbles, *scales], dim=2))


@dataclass(frozen=True)
class Q4Kernel:
    """How ``csrc/matmul_q4.c`` multiplies a Q4_1 route's blocks (``pack_q4``): the route's number in
    ``csrc/layer.c`` and its C function."""

    number: int
    linear: str


Q4_KERNELS = {"avx512q4": Q4Kernel(1, "q4_linear"), "avx512q4i8": Q4Kernel(2, "q4i8_linear")}


def q4_product(lib: ctypes.CDLL, kernel: str, rows: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """rows [M, in] (fp32) times the Q4_1 weights' transpose (packed for ``kernel``, ``Q4_KERNELS``): [M, out] in fp32."""
    x = rows.contiguous()
    y = torch.empty(x.shape[0], out_features)
    linear = getattr(lib, Q4_KERNELS[kernel].linear)
    if linear(x.data_ptr(), packed.data_ptr(), y.data_ptr(), x.shape[0], out_features, x.shape[1], native.kernel_threads()):
        raise RuntimeError(f"Q4_1 product of {x.shape[0]} rows failed (out of memory)")
    return y


SCREEN_COLUMNS = 4096  # outputs from which an argmax is screened: below, the bf16 weights are few to read
# Rows up to which the screen is used: its integer products cost a widening per weight vector, so from
# ~8 rows, where the product is bound by arithmetic rather than reading, it gains little or loses (the
# default model's 49152 x 576 vocabulary, screen vs full product: AMD EPYC 1 row 1.01 vs 1.65 ms, 4:
# 1.08 vs 1.52, 6: 1.54 vs 1.87, 8: 2.24 vs 2.21, 16: 3.63 vs 3.30; Intel Xeon with AMX, whose
# AVX512-BF16 products are slower, 1: 1.73 vs 2.99, 4: 2.21 vs 3.22, 8: 3.14 vs 4.18, 12: 4.48 vs
# 4.60, 16: 5.27 vs 5.82). Up to 8, a batch of 8's AR step: even on the one, a quarter faster on the other.
SCREEN_ROWS = 8
SCREEN_GROUP = 4  # output blocks the screen takes together (``GROUP`` in csrc/screen.c): the int8 copy has whole groups


@dataclass(frozen=True)
class Int8Screen:
    """int8 copies of packed bf16 weights for the exact screened argmax (``csrc/screen.c``): per
    output column i, w_i = scale_i q_i + e_i with q_i int8 (per-column scale), and the norms |w_i|
    and |e_i| (rounded up) that bound the screen's error; padded to whole groups of 4 blocks."""

    q: torch.Tensor  # int8, packed as the bf16 weights are
    scales: torch.Tensor  # [blocks * 16] fp32
    weight_norms: torch.Tensor
    error_norms: torch.Tensor
    blocks: int

    @property
    def most_blocks(self) -> int:
        """Blocks a row may leave to compute again before the full argmax is cheaper."""
        return self.blocks // 16

    @classmethod
    def of(cls, packed: torch.Tensor, chunk: int = 4096) -> Int8Screen | None:
        """The screen of packed bf16 weights, ``chunk`` columns at a time (in float64: the whole of
        a 49152-column vocabulary at once held ~1 GB); None where a weight is not finite or a
        column's norm passes 2^40 (the screen's sums must stay far inside fp32's range)."""
        NB, KB = packed.shape[:2]
        blocks = NB + -NB % SCREEN_GROUP
        q = torch.zeros(blocks * 16, KB * 32, dtype=torch.int8)
        scales, weight_norms, error_norms = (torch.zeros(blocks * 16) for _ in range(3))
        columns = packed.permute(0, 3, 1, 2, 4).reshape(NB * 16, KB * 32)  # the bf16 values the product multiplies
        for start in range(0, NB * 16, chunk):
            weight = columns[start : start + chunk].double()
            if not bool(weight.isfinite().all()):
                return None
            end = start + len(weight)
            scales[start:end] = (weight.abs().amax(1) / 127).float()
            step = scales[start:end].double().unsqueeze(1)
            levels = torch.where(step > 0, weight / step.clamp(min=1e-300), 0.0).round().clamp(-127, 127)
            q[start:end] = levels.to(torch.int8)
            weight_norms[start:end] = (weight.norm(dim=1) * (1 + 1e-6)).float()
            error_norms[start:end] = ((weight - step * levels).norm(dim=1) * (1 + 1e-6)).float()
        if float(weight_norms.max()) > 2.0**40:
            return None
        packed_q = in_large_pages(q.view(blocks, 16, KB, 16, 2).permute(0, 2, 3, 1, 4))
        return cls(packed_q, scales, weight_norms, error_norms, blocks)


def packed_rows(rows: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """rows [M, in] (fp32), contiguous and zero-padded to the packed weights' whole input blocks."""
    inner = packed.shape[1] * 32
    return F.pad(rows, (0, inner - rows.shape[1])) if rows.shape[1] != inner else rows.contiguous()


def packed_product(lib: ctypes.CDLL, rows: torch.Tensor, packed: torch.Tensor, out_features: int, kernel: int) -> torch.Tensor:
    """rows [M, in] (fp32) times the packed weights' transpose by ``kernel`` (``PACKED``): [M, out] in fp32."""
    x = packed_rows(rows, packed)
    y = torch.empty(rows.shape[0], out_features)
    if lib.bf16_linear(x.data_ptr(), packed.data_ptr(), y.data_ptr(), x.shape[0], out_features, x.shape[1], native.kernel_threads(), kernel):
        raise RuntimeError(f"bf16 product of {x.shape[0]} rows failed (out of memory)")
    return y


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor() or platform.machine()


def is_row_invariant(route: Route, weight: torch.Tensor, max_rows: int, elements: int = 1 << 18) -> bool:
    """Whether every row of a product of 1..max_rows rows equals the same row computed in one
    call of max_rows rows, bitwise, wherever it sits among them (random inputs; the route's own
    tiling and padding). A bf16 output hides most differences in the fp32 sums behind its
    rounding (measured: a kernel whose one-row path sums in another order passed 6k elements and
    failed on real activations), so in bf16 each comparison covers about ``elements`` outputs."""
    gen = torch.Generator().manual_seed(0)
    lin = Linear(weight, route)
    counts = sorted({2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 24, max_rows - 1, max_rows} & set(range(1, max_rows + 1)))
    trials = min(32, -(-elements // (max_rows * weight.shape[0]))) if route.dtype == torch.bfloat16 else 1
    for _ in range(trials):
        x = torch.randn(max_rows, weight.shape[1], generator=gen).to(weight.device)
        full = lin(x)
        if not all(torch.equal(lin(x[r : r + 1]), full[r : r + 1]) for r in range(max_rows)):
            return False
        if not all(torch.equal(lin(x[start : start + m]), full[start : start + m]) for m in counts for start in {0, max_rows - m}):
            return False
    return True


def median_ms(fn: Callable[[], object], repeats: int = 7) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn`` after one untimed call (first-call allocations, cold caches)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def measure_route(route: Route, shapes: list[tuple[int, int, int]], rows: tuple[int, ...] = (1, 8, 32)) -> dict:
    """Invariance on every shape and the time of the model's products (shapes: (out, in, count))
    at a few row counts, with random weights of the model's shapes."""
    gen = torch.Generator().manual_seed(1)
    weights = [(torch.randn(o, i, generator=gen) * 0.05, n) for o, i, n in shapes]
    if route.kernel in Q4_KERNELS:  # what it multiplies in 4-bit blocks: a Q4_1 model's weights
        weights = [(q4_1_values(w) if w.shape[1] % 32 == 0 else w, n) for w, n in weights]
    try:
        exact = all(is_row_invariant(route, w, max(route.tile, TILE)) for w, _ in weights)
        lins = [(Linear(w, route), n) for w, n in weights]
        ms = {}
        for m in rows:
            xs = [torch.randn(m, lin.in_features) for lin, _ in lins]
            ms[str(m)] = round(sum(n * median_ms(lambda lin=lin, x=x: lin(x)) for (lin, n), x in zip(lins, xs)), 3)
    except RuntimeError as e:  # a kernel this torch build or CPU lacks
        return {"route": route.name, "error": str(e).splitlines()[0]}
    return {"route": route.name, "exact": exact, "ms": ms}


PAD_TILE = 8  # a padded route multiplies at least this many rows per call, so AR pays for them


def calibrate(shapes: list[tuple[int, int, int]], dtype: torch.dtype | None, q4_1: bool = False) -> list[dict]:
    """Measure every kernel at every dtype asked (``Q4_KERNELS`` only for weights that hold Q4_1
    values: elsewhere they multiply in bf16 as ``avx512`` does; not ``ASKED_ONLY``'s); a kernel that is not row-invariant
    by itself is measured again padded to a fixed tile, which is invariant by construction (one call shape)."""
    results = []
    for name in [n for n, d in DTYPES.items() if dtype is None or d == dtype]:
        for kernel in [k for k in KERNELS if (k not in PACKED or name == "bfloat16") and (k not in Q4_KERNELS or q4_1) and k not in ASKED_ONLY]:
            results.append(measure_route(Route(kernel, name), shapes))
            if results[-1].get("exact") is False:
                results.append(measure_route(Route(kernel, name, PAD_TILE, pad=True), shapes))
    return results


FINALISTS = 2.0  # exact routes whose products take at most this times the fastest one's (3 at most) are timed as whole steps


def time_finalists(results: list[dict], steps: Callable[[list[Route]], list[dict[str, float]]]) -> None:
    """Add whole decode steps' milliseconds (``step_ms``, by ``steps``) to the three fastest exact
    routes by their products, those within ``FINALISTS`` of the fastest. Products timed alone, each
    again and again, find their weights in the cache: on the AMD EPYC the Q4_1 route's products
    summed 1.07-1.51x the bf16 route's (at 1, 8 and 32 rows) where its decode steps were faster."""
    exact = sorted((r for r in results if r.get("exact")), key=lambda r: sum(r["ms"].values()))
    if not exact:
        return
    finalists = [r for r in exact[:3] if sum(r["ms"].values()) <= FINALISTS * sum(exact[0]["ms"].values())]
    for r, ms in zip(finalists, steps([Route.parse(r["route"]) for r in finalists])):
        r["step_ms"] = ms


def choose_route(
    shapes: list[tuple[int, int, int]], dtype: torch.dtype | None = None, override: str | None = None,
    steps: Callable[[list[Route]], list[dict[str, float]]] | None = None, q4_1: bool = False,
) -> tuple[Route, list[dict]]:
    """The fastest exact route for these product shapes on this machine (``dtype`` None: any dtype),
    and the measurements behind the choice: the finalists' whole decode steps where ``steps`` times
    them (``time_finalists``), else their products. ``q4_1``: the model's layer weights hold Q4_1
    values (the ``Q4_KERNELS`` are candidates). ``override`` (or ``$PROPD_ROUTE``) names a route instead;
    it is still checked for exactness. Measurements are cached under ``$PROPD_CACHE/routes``."""
    from propd.models.loading import cache_file, write_cache

    override = override or os.environ.get(ROUTE_ENV)
    if override:
        route = Route.parse(override)
        if dtype is not None and route.dtype != dtype:
            raise PropdError(f"route {override!r} runs in {route.dtype_name}, but dtype {dtype} was asked for")
        result = measure_route(route, shapes, rows=(1,))
        if "error" in result:
            raise PropdError(f"route {override!r} does not run here: {result['error']}")
        return Route(route.kernel, route.dtype_name, route.tile, route.pad, result["exact"]), [result]
    key = json.dumps({
        "check": 8, "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "shapes": shapes, "dtype": str(dtype),
        "q4_1": q4_1, "steps": steps is not None, "kernels": native.build_id(),
    })
    path = cache_file("routes", key, ".json")
    try:
        results = json.loads(path.read_text())["results"]
    except (OSError, ValueError, KeyError):
        results = calibrate(shapes, dtype, q4_1)
        if steps is not None:
            time_finalists(results, steps)
        write_cache(path, json.dumps({"key": json.loads(key), "results": results}, indent=1))  # (unwritable: a calibration per load)
    ok = [r for r in results if "error" not in r]
    if not ok:
        raise PropdError("no matrix-product route runs on this machine: " + "; ".join(f"{r['route']}: {r['error']}" for r in results))
    exact = [r for r in ok if r["exact"]] or ok
    timed = [r for r in exact if "step_ms" in r]
    best = min(timed, key=lambda r: math.prod(r["step_ms"].values())) if timed else min(exact, key=lambda r: sum(r["ms"].values()))
    route = Route.parse(best["route"])
    return Route(route.kernel, route.dtype_name, route.tile, route.pad, best["exact"]), results
