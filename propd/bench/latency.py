"""``propd latency``: what one verification step costs by tree size, and what building a tree costs.

This is the curve ProPD's dynamic tree trades accepted tokens against: measured on the real decoder
with a real cache, median of several repeats, for each batch size asked.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from propd.decoding.tree import PROJECT_ALL
from propd.models.decoder import Decoder, synchronize
from propd.models.kernels import median_ms
from propd.models.pages import zeros_in_large_pages
from propd.tree.tree import TokenTree, load_tree, medusa_paths


@torch.inference_mode()
def step_ms(decoder: Decoder, batch_size: int, size: int, context: int = 256, repeats: int = 5) -> float:
    """Median wall time (ms) of one verification step over ``size`` tree tokens in each of
    ``batch_size`` rows, after ``context`` cached tokens: every layer over every token, then the
    greedy picks ``verify`` takes: every node's where the step holds at most ``PROJECT_ALL`` tokens
    (at batch 1 on the AMD EPYC, 16 nodes' picks took 4.1 ms against 2.5 for one), else one node's
    a row (each further accepted token then adds one more product, see ``tree.walk``)."""
    anc = load_tree(f"top{size - 1}").ancestors if size > 1 else torch.ones(1, 1, dtype=torch.bool)
    cache = decoder.new_cache(batch_size, context + size + 1)
    cache.advance(torch.full((batch_size,), context, device=decoder.device))
    tokens = torch.randint(0, decoder.args.vocab_size, (batch_size, size), device=decoder.device)

    def step() -> None:
        with decoder.cores():
            normed = decoder.final_norm(decoder.extend(tokens, cache.tree(anc), cache))
            decoder.greedy_tokens(normed if batch_size * size <= PROJECT_ALL else normed[:, 0])
        synchronize(decoder.device)

    return round(median_ms(step, repeats), 2)


def step_latency(decoder: Decoder, sizes: list[int], batch_sizes: list[int], context: int = 256, repeats: int = 5) -> list[dict]:
    """``step_ms`` for every tree size at every batch size."""
    rows = []
    with tqdm(total=len(sizes) * len(batch_sizes), desc="step latency", unit="point") as bar:
        for b in batch_sizes:
            for n in sizes:
                rows.append({"batch_size": b, "tree_tokens": n, "ms": step_ms(decoder, b, n, context, repeats)})
                bar.update(1)
    return rows


def memory_bandwidth(device: torch.device = torch.device("cpu"), megabytes: int = 512, repeats: int = 5) -> float:
    """Read bandwidth of ``device``'s memory in GB/s: the median time of summing a buffer far larger than the caches
    (on the CPU in 2 MB pages, as the weights are: ``pages``)."""
    n = megabytes * 2**20 // 4
    buffer = zeros_in_large_pages((n,), torch.float32).fill_(1.0) if device.type == "cpu" else torch.ones(n, device=device)
    return buffer.numel() * 4 / (median_ms(lambda: (buffer.sum(), synchronize(device)), repeats) / 1e3) / 1e9


def weight_bytes(decoder: Decoder) -> int:
    """Bytes of weights one decode step must read: every product's weights (as its route keeps them)
    and the lm_head."""
    return sum(lin.bytes_read for layer in decoder.products for lin in layer) + decoder.lm_head_weight.numel() * decoder.dtype.itemsize


def tree_build_time(name: str = "mc_sim_7b_63", repeats: int = 50) -> float:
    """Median milliseconds to build a tree's tensors (parents, depths, ancestor mask) from its paths."""
    paths = medusa_paths(name)
    return median_ms(lambda: TokenTree.from_paths(paths), repeats)


def plot_latency(rows: list[dict], path: Path) -> Path:
    from propd.bench.plotting import plt, save_figure  # matplotlib only where a figure is drawn: the engine times steps with this module

    fig, ax = plt.subplots(figsize=(6, 4))
    for b in sorted({r["batch_size"] for r in rows}):
        pts = [r for r in rows if r["batch_size"] == b]
        ax.plot([r["tree_tokens"] for r in pts], [r["ms"] for r in pts], marker="o", label=f"batch {b}")
    ax.set(xlabel="tree tokens per row (root included)", ylabel="ms per verification step", title="Step latency by tree size")
    ax.set_xscale("log", base=2)
    sizes = sorted({r["tree_tokens"] for r in rows})
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
    return path
