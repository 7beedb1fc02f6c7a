import mmap
import sys

import pytest
import torch
from torch import nn

from prunenet.core.memory import (
    _minus,
    page_out_replaced,
    return_large_blocks,
    tensor_ranges,
    trim_heap,
)

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="madvise and /proc are Linux's")


def test_a_range_minus_the_kept_ranges_leaves_the_gaps_between_them():
    assert _minus(0, 100, [(10, 20), (50, 60)]) == [(0, 10), (20, 50), (60, 100)]
    assert _minus(0, 100, [(0, 100)]) == []
    assert _minus(10, 20, [(0, 5), (30, 40)]) == [(10, 20)]


def _mapped_module(tmp_path, pages: int) -> tuple[nn.Module, mmap.mmap, torch.Tensor]:
    """A module whose two parameters live in a private mapping of a file, as weights read from
    a memory-mapped safetensors file do."""
    values = torch.arange(pages * mmap.PAGESIZE // 4, dtype=torch.float32)
    path = tmp_path / "weights.bin"
    path.write_bytes(values.numpy().tobytes())
    with open(path, "rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    mapped = torch.frombuffer(mapping, dtype=torch.float32)
    half = mapped.numel() // 2
    module = nn.Module()
    module.first = nn.Parameter(mapped[:half], requires_grad=False)
    module.second = nn.Parameter(mapped[half:], requires_grad=False)
    return module, mapping, values


@linux_only
def test_replaced_file_backed_weights_are_paged_out_and_kept_ones_are_not(tmp_path):
    module, mapping, values = _mapped_module(tmp_path, pages=64)
    before = tensor_ranges(module)
    half_bytes = values.numel() // 2 * 4
    module.first = nn.Parameter(torch.zeros(4), requires_grad=False)  # replaced
    released = page_out_replaced(before, module)
    # All of `first`'s whole pages go; none of `second`'s, which the module still holds.
    assert released == half_bytes // mmap.PAGESIZE * mmap.PAGESIZE
    assert 0 < released <= half_bytes
    # Clean file pages come back from the file: the mapping still reads the same values.
    assert torch.equal(torch.frombuffer(mapping, dtype=torch.float32), values)


@linux_only
def test_a_weight_cut_as_a_view_of_the_old_one_keeps_its_pages(tmp_path):
    module, _, values = _mapped_module(tmp_path, pages=64)
    before = tensor_ranges(module)
    old = module.first
    module.first = nn.Parameter(old[: old.numel() // 2], requires_grad=False)  # a view
    released = page_out_replaced(before, module)
    assert released <= old.numel() // 2 * 4
    assert torch.equal(module.first, values[: old.numel() // 2])


@linux_only
def test_heap_memory_is_never_paged_out():
    module = nn.Linear(512, 512)
    before = tensor_ranges(module)
    module.weight = nn.Parameter(torch.zeros(2, 2))
    assert page_out_replaced(before, module) == 0


def test_trimming_the_heap_leaves_tensors_intact():
    kept = torch.randn(1000)
    copy = kept.clone()
    del_me = [torch.randn(1 << 16) for _ in range(8)]
    del del_me
    trim_heap()
    assert torch.equal(kept, copy)


def _resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * mmap.PAGESIZE / 2**20


@linux_only
def test_with_large_blocks_returned_a_freed_20_mb_tensor_leaves_memory():
    # glibc's default threshold rises to 20 MB once such a block is freed; the next one then
    # comes from the heap and stays resident after it is freed.
    if not return_large_blocks():
        pytest.skip("not glibc")
    for _ in range(3):
        before = _resident_mb()
        block = torch.ones(5 << 20)  # 20 MB, every page touched
        assert _resident_mb() - before > 15
        del block
        assert _resident_mb() - before < 5
