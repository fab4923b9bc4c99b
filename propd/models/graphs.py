"""The decoder's layers as CUDA graphs, captured once per step shape and replayed.

On a GPU an eager step of a small model is bound by kernel launches, not by the GPU: an H100 ran
SmolLM2-135M's step in ~23 ms, of which reading the weights takes 0.1 ms. A graph launches a whole
run of layers at once. It needs every size fixed when it is captured, so inside it attention takes
its sizes from the cache's capacity and the path's depth alone (``Plan.fixed_sizes``), never from
values read back from the GPU; the step's tensors are copied into the graph's own inputs first.
The reads and the order of every sum are those of the eager tensor code (``attention``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from propd.models.attention import Plan
from propd.models.kv_cache import KVCache, Layout

ENV = "PROPD_CUDA_GRAPHS"  # "0": eager steps on a GPU
MAX_TOKENS = 1024  # rows x new tokens above which a step runs eagerly
MAX_GRAPHS = 64  # captured step shapes kept at once


def enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get(ENV, "1") != "0"


def captured() -> int:
    """Graphs captured so far in this process (a step that captured one timed the capture too)."""
    return GraphedLayers.captures


def fixed_plan(plan: Plan, tokens: int) -> Plan:
    """``plan`` read with sizes from shapes alone, its paths padded to at least ``tokens`` deep
    (fewer depths, fewer graphs); a chain's plan has no paths and keeps none."""
    depth = max(plan.path.shape[-1], tokens) if plan.path.shape[-1] else 0
    path = F.pad(plan.path, (0, depth - plan.path.shape[-1]), value=-1)
    return Plan(plan.inplace, path, plan.n_kv_heads, plan.max_len, fixed_sizes=True)


def step_inputs(x: torch.Tensor, rope: torch.Tensor, layout: Layout, cache: KVCache) -> tuple[torch.Tensor, ...]:
    """A step's tensors as a graph takes them (x, rope, slots, positions, inplace, path), its tokens
    padded to a power of two: a tree of any size, a pruned step's survivors, reuse a few graphs
    instead of each capturing its own. The added tokens write their K/V to the cache's last slot,
    which no token's ever takes (the cache keeps a block spare), and see slot 0 alone; no real
    token sees them, and each token's result depends on its own row only."""
    B, T = layout.slots.shape
    extra = (1 << (T - 1).bit_length()) - T
    plan = fixed_plan(layout.plan, T + extra)

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        return torch.cat([t, torch.full((B, extra, *t.shape[2:]), value, dtype=t.dtype, device=t.device)], dim=1) if extra else t

    return (pad(x, 0.0), pad(rope, 1.0), pad(layout.slots, cache.max_len - 1), pad(layout.positions, 0), pad(plan.inplace, 1), pad(plan.path, -1))


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # x, rope, slots, positions, inplace, path: copied into before each replay
    out: torch.Tensor
    held: tuple[torch.Tensor, ...]  # the cache's tensors the graph reads and writes: alive while it is, so no other tensor takes their memory


class GraphedLayers:
    """Runs ``layer(i, x, rope, layout, cache)`` for i in [start, end) as one replayed graph per
    (rows, tokens, path depth, layer range, cache tensor)."""

    captures = 0  # in this process (``captured``)

    def __init__(self, layer):
        self.layer = layer
        self.graphs: dict[tuple, _Captured] = {}

    def run(self, x: torch.Tensor, rope: torch.Tensor, layout: Layout, cache: KVCache, start: int, end: int) -> torch.Tensor:
        inputs = step_inputs(x, rope, layout, cache)
        key = (tuple(inputs[0].shape), inputs[-1].shape[-1], start, end, cache.kv.data_ptr(), tuple(cache.kv.shape), cache.kv.stride())
        captured = self.graphs.get(key)
        if captured is None:
            captured = self.graphs[key] = self._capture(inputs, cache, start, end)
        else:
            for static, new in zip(captured.inputs, inputs):
                static.copy_(new)
        captured.graph.replay()
        return captured.out[:, : x.shape[1]].clone()

    def _capture(self, inputs: tuple[torch.Tensor, ...], cache: KVCache, start: int, end: int) -> _Captured:
        GraphedLayers.captures += 1
        live = {id(t) for t in (cache.pool.tensors() if cache.pool else [cache.storage])}  # what a later cache may take again
        stale = [k for k, c in self.graphs.items() if id(c.held[0]) not in live]
        for k in stale if len(self.graphs) < MAX_GRAPHS else list(self.graphs):  # graphs of caches gone by; all, past the limit
            del self.graphs[k]
        with torch.inference_mode(False):  # inputs a later step may copy into from outside inference mode
            static = tuple(t.clone() for t in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # a first run outside the graph: kernels' one-time set-up is not captured
            self.layers(static, cache, start, end)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        pool = next(iter(self.graphs.values())).graph.pool() if self.graphs else None  # one memory pool for the graphs kept
        with torch.cuda.graph(graph, pool=pool):
            out = self.layers(static, cache, start, end)
        return _Captured(graph, static, out, cache.buffers)

    def layers(self, inputs: tuple[torch.Tensor, ...], cache: KVCache, start: int, end: int) -> torch.Tensor:
        """What a graph records and a replay computes (``step_inputs``' tensors in), run eagerly."""
        x, rope, slots, positions, inplace, path = inputs
        layout = Layout(slots, positions, Plan(inplace, path, cache.kv.shape[3], cache.max_len, fixed_sizes=True))
        for i in range(start, end):
            x = self.layer(i, x, rope, layout, cache)
        return x
