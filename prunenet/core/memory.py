"""Handing memory a prune no longer uses back to the operating system (Linux; elsewhere a no-op).

Two kinds of dead memory stayed resident through a prune and set its peak (measured on
SmolLM2-135M's default run, docs/scale.md):

- Weights read from a safetensors file are pages of a memory-mapped file. When the cut replaces
  a layer's weights by smaller new ones, the old tensors are freed but their file pages stay
  mapped, since the mapping holds the whole file: by the last layer the process held the dense
  FFN weights and the cut ones, ~300 MB more. `page_out_replaced` asks the kernel to drop the
  old weights' pages (`madvise(MADV_PAGEOUT)`): clean file pages are simply released and read
  again from the file if anything touches them, so no tensor's content can change. Loading
  without the mapping instead (`disable_mmap`) would hold two copies of every weight while
  loading: worse for large models.
- glibc keeps freed heap blocks for reuse; after the text's generation (a 768 MB cache, 12 MB
  of logits per step) they sat under the cut. `trim_heap` returns them (`malloc_trim`) once the
  text is written. Not after every cut layer: each layer's temporaries would then be
  page-faulted in afresh for ~40 MB less peak.
- glibc also serves blocks below its mmap threshold from the heap, and that threshold rises to
  the size of every large block freed (up to 32 MB): after a few layers the cut's 6-35 MB
  temporaries (attention chunks, moment blocks) lived in the heap and stayed resident under
  the next phase's. `return_large_blocks` fixes the threshold at 16 MB, so every block that
  large is its own mapping, returned when freed: on two layers of SmolLM2's default-size
  text the cut's peak fell by ~90 MB with no measurable time cost (a 4 MB threshold saved
  ~70 MB more but cost ~10% more time in page faults).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys

from torch import nn

MADV_PAGEOUT = 21  # Linux 5.4+; older kernels answer EINVAL and nothing happens


@functools.cache
def _libc():
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def tensor_ranges(module: nn.Module) -> list[tuple[int, int]]:
    """The address ranges (start, end) of `module`'s parameters and buffers on the CPU.

    :param module: any module.
    """
    ranges = []
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type == "cpu" and tensor.numel():
            start = tensor.data_ptr()
            ranges.append((start, start + tensor.numel() * tensor.element_size()))
    return ranges


def page_out_replaced(before: list[tuple[int, int]], module: nn.Module) -> int:
    """Release the file pages of tensors `module` held before (`before`, from `tensor_ranges`)
    and no longer does. Only whole pages inside a replaced tensor and inside a file mapping
    are touched; a tensor that is a view of an old one keeps its pages.

    :param before: `tensor_ranges(module)` taken before the module's weights were replaced.
    :param module: the module now.
    :return: bytes handed to the kernel (0 where nothing could be released).
    """
    libc = _libc()
    if libc is None or not before:
        return 0
    kept = sorted(tensor_ranges(module))
    files = _file_mappings()
    released = 0
    for start, end in before:
        for low, high in _minus(start, end, kept):
            low = -(-low // mmap.PAGESIZE) * mmap.PAGESIZE
            high = high // mmap.PAGESIZE * mmap.PAGESIZE
            in_file = high > low and any(a <= low and high <= b for a, b in files)
            if in_file and libc.madvise(low, high - low, MADV_PAGEOUT) == 0:
                released += high - low
    return released


# glibc's mallopt parameter and the threshold `return_large_blocks` sets.
M_MMAP_THRESHOLD = -3
LARGE_BLOCK = 16 << 20


def return_large_blocks(threshold: int = LARGE_BLOCK) -> bool:
    """Serve every C heap block of `threshold` bytes or more by its own mapping, unmapped when
    freed (glibc's `mallopt(M_MMAP_THRESHOLD)`; this also stops the threshold from rising).
    Process-wide, like `torch.set_num_threads`. Returns whether it was set (False off glibc).

    :param threshold: bytes.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, threshold))


def trim_heap() -> None:
    """Return the C heap's free blocks to the system (glibc's `malloc_trim`)."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _minus(start: int, end: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) without the sorted `ranges`."""
    pieces, low = [], start
    for a, b in ranges:
        if b <= low or a >= end:
            continue
        if a > low:
            pieces.append((low, a))
        low = max(low, b)
    if low < end:
        pieces.append((low, end))
    return pieces


def _file_mappings() -> list[tuple[int, int]]:
    """This process's mappings of regular files (`/proc/self/maps` rows with a path)."""
    try:
        with open("/proc/self/maps") as maps:
            rows = maps.read().splitlines()
    except OSError:
        return []
    mappings = []
    for row in rows:
        fields = row.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
            low, high = fields[0].split("-")
            mappings.append((int(low, 16), int(high, 16)))
    return mappings
