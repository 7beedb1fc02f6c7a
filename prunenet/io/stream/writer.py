"""Writing streamed output shards tensor by tensor, then the index, config and side files.

A shard is written incrementally (header first, then one tensor at a time) instead of being
assembled in memory, because real checkpoints ship 5-10 GB shards.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from prunenet.errors import PruneNetError
from prunenet.io.saving import REPORT_FILE
from prunenet.io.stream.checkpoint import CONFIG_FILE, INDEX_FILE, Checkpoint, TensorEntry
from prunenet.io.stream.plan import PruningPlan

# Weight files in other formats are not copied: they would hold the unpruned model.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


_REWRITTEN = {CONFIG_FILE, INDEX_FILE, REPORT_FILE}


def write_shard(
    path: Path,
    entries: list[TensorEntry],
    metadata: dict[str, str] | None,
    tensor_for: Callable[[str], torch.Tensor],
) -> int:
    """Write one safetensors file incrementally: header first, then one tensor at a time.

    `safetensors.torch.save_file` needs the whole shard in memory (5-10 GB for real checkpoints);
    here every shape is known before any data is read, so the header (the format's documented
    8-byte length + JSON with contiguous `data_offsets`) can be written first and each tensor
    dropped right after its bytes are written. Returns the bytes of tensor data written.
    """
    if sys.byteorder != "little":
        raise PruneNetError("Stream mode writes safetensors (little-endian) on little-endian CPUs.")
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # tensor data starts 8-byte aligned
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header_bytes)))
        file.write(header_bytes)
        for entry in entries:
            tensor = tensor_for(entry.name)
            if tuple(tensor.shape) != entry.shape or tensor.nbytes != entry.nbytes:
                raise RuntimeError(
                    f"Bug: {entry.name} came out as {tuple(tensor.shape)} {tensor.dtype}, "
                    f"planned {entry.shape} {entry.dtype}."
                )
            file.write(_raw_bytes(tensor))
            del tensor
    return offset


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().reshape(-1).contiguous()
    return memoryview(flat.view(torch.uint8).numpy())


def verify_output(staging: Path, checkpoint: Checkpoint, plan: PruningPlan) -> None:
    """Re-open every written shard with safetensors itself: its header checks (offsets cover
    the file exactly, dtypes and shapes parse) guard the hand-written header."""
    for shard in checkpoint.shards:
        with safe_open(staging / shard, framework="pt") as handle:
            for entry in plan.output_entries(checkpoint, shard):
                view = handle.get_slice(entry.name)
                if tuple(view.get_shape()) != entry.shape or view.get_dtype() != entry.dtype:
                    raise RuntimeError(f"Bug: {shard} holds a wrong header for {entry.name}.")


def write_index(staging: Path, checkpoint: Checkpoint, plan: PruningPlan) -> None:
    metadata = dict(checkpoint.index_metadata or {})
    metadata["total_size"] = plan.output_bytes
    if "total_parameters" in metadata:
        metadata["total_parameters"] = plan.params_after
    weight_map = {name: checkpoint.tensors[name].shard for name in sorted(checkpoint.tensors)}
    index = {"metadata": metadata, "weight_map": weight_map}
    (staging / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def copy_side_files(source: Path, staging: Path) -> list[str]:
    """Copy tokenizer, generation config and other small top-level files verbatim.

    Weight files (any format) and files this module rewrites are skipped, and so are folders
    (hub repos keep e.g. the original consolidated weights in `original/`) and Python files:
    an output never carries its input's code (`prunenet.io.trust`; `write_remote_code` then
    drops any `auto_map` the copied JSON files name it in).
    """
    copied = []
    for path in sorted(source.iterdir()):
        if (
            not path.is_file()
            or path.name in _REWRITTEN
            or path.name.endswith(_WEIGHT_SUFFIXES)
            or path.suffix == ".py"
        ):
            continue
        shutil.copy2(path, staging / path.name)
        copied.append(path.name)
    return copied
