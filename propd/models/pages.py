"""Weights in 2 MB pages.

A decode step streams every weight once. In 4 KB pages that is a TLB miss every 4 KB (the
default model's 130 MB: some 33,000 page walks a step), and the CPU's prefetchers stop at each
page's end. Summing 140 MB on the Intel Xeon with AMX read 18-19 GB/s from 4 KB pages and
25-29 GB/s from 2 MB pages, and AR at batch 1 ran 1.13x as fast (``docs/engine.md``, 9). Linux backs
an anonymous private mapping with 2 MB pages where asked (``madvise``) and able; elsewhere this
is an ordinary copy.
"""

from __future__ import annotations

import math
import mmap
import threading

import torch

PAGE = 2 << 20
ARENA = 64 << 20  # bytes a shared mapping holds; a tensor of a quarter of that or more gets its own
ALIGN = 64  # each tensor starts on a cache line


class _Arena:
    """Consecutive tensors packed into one 2 MB-aligned mapping, in the order they come (a decoder's
    weights in the order its step reads them); a mapping lives while any tensor in it does, and the
    current one while it has room."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.free = torch.empty(0, dtype=torch.uint8)  # what is left of the current mapping

    def take(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` uninitialised bytes, 64-byte aligned."""
        size = -(-nbytes // ALIGN) * ALIGN
        with self.lock:
            if size >= ARENA // 4:
                return _mapping(size)[:nbytes]
            if size > self.free.numel():
                self.free = _mapping(ARENA)
            taken, self.free = self.free[:nbytes], self.free[size:]
            return taken


def _mapping(nbytes: int) -> torch.Tensor:
    """A fresh mapping of at least ``nbytes`` (whole 2 MB pages), starting on a page, asked to be
    backed by 2 MB pages."""
    size = -(-nbytes // PAGE) * PAGE
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    region = mmap.mmap(-1, size + PAGE, flags=flags) if flags else mmap.mmap(-1, size + PAGE)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # (no such advice here, or a kernel built without huge pages: 4 KB pages)
        pass
    whole = torch.frombuffer(region, dtype=torch.uint8)  # (keeps the mapping alive)
    start = -whole.data_ptr() % PAGE
    return whole[start : start + size]


_arena = _Arena()


def zeros_in_large_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros on the CPU in a mapping of their own (freed with them), in 2 MB pages where the OS gives
    them: a KV cache, which attention reads every step."""
    nbytes = math.prod(shape) * dtype.itemsize
    return _mapping(nbytes)[:nbytes].view(dtype).view(shape)  # (a fresh anonymous mapping reads as zeros)


def in_large_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of CPU tensor ``t`` (contiguous, the same shape and dtype) in 2 MB pages where the OS
    gives them; elsewhere ``t`` made contiguous."""
    if t.device.type != "cpu":
        return t.contiguous()
    nbytes = t.numel() * t.element_size()
    out = _arena.take(nbytes).view(t.dtype).view(t.shape)
    out.copy_(t)
    return out
