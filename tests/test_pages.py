"""Weights in 2 MB pages (``pages``): the same values, and 2 MB pages where Linux gives them."""

from pathlib import Path

import pytest
import torch

from propd.models.kernels import pack_bf16
from propd.models.pages import ALIGN, in_large_pages


@pytest.mark.parametrize("make", [
    lambda: torch.randn(3, 5), lambda: torch.randn(7, 4, 6).permute(2, 0, 1), lambda: torch.arange(1000, dtype=torch.int8),
    lambda: torch.randn(0, 3), lambda: torch.randn(40 << 18),
], ids=["small", "permuted", "int8", "empty", "own-mapping"])
def test_a_copy_holds_the_same_values_contiguous_and_aligned(make):
    source = make()
    copy = in_large_pages(source)
    assert copy.shape == source.shape and copy.dtype == source.dtype and copy.is_contiguous()
    assert torch.equal(copy, source) and copy.data_ptr() % ALIGN == 0
    if source.numel():
        assert copy.data_ptr() != source.data_ptr()
        source.zero_()
        assert not torch.equal(copy, source)  # its own memory


def test_copies_side_by_side_do_not_overlap():
    copies = [in_large_pages(torch.full((1000 + i,), i, dtype=torch.float32)) for i in range(50)]
    assert all(bool((c == i).all()) for i, c in enumerate(copies))
    spans = sorted((c.data_ptr(), c.data_ptr() + c.nbytes) for c in copies)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))


def _huge_kb(address: int) -> int | None:
    """AnonHugePages of the mapping holding ``address`` (/proc/self/smaps), None where not found."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(x, 16) for x in head.split("-"))
            inside = low <= address < high
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return None


def _thp(name: str) -> int:
    return int(next(line.split()[1] for line in Path("/proc/vmstat").read_text().splitlines() if line.startswith(name + " ")))


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists(), reason="no transparent huge pages here")
def test_weights_land_in_2mb_pages_where_linux_gives_them():
    if "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        pytest.skip("transparent huge pages are off on this machine")
    failed = _thp("thp_fault_fallback")
    weights = pack_bf16(torch.randn(8192, 1024))  # what our bf16 products read: 16 MB, a mapping of their own
    if _thp("thp_fault_fallback") > failed:
        pytest.skip("the kernel had no free 2 MB page just now")
    assert _huge_kb(weights.data_ptr()) >= 2048
