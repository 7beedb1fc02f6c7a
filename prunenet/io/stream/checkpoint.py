"""Reading a safetensors checkpoint folder without loading the model: headers, then one tensor.

Every shard's header is validated up front (names, dtypes, shapes), so a broken checkpoint fails
before anything is written; tensors are then read one at a time through short-lived handles, so
memory stays bounded (`prunenet.stream` says why).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig

from prunenet.errors import PruneNetError
from prunenet.io.trust import (
    NO_REMOTE_CODE,
    check_model_folder,
    is_remote_code_error,
    remote_code_error,
)

INDEX_FILE = "model.safetensors.index.json"


SINGLE_FILE = "model.safetensors"


CONFIG_FILE = "config.json"


# Bytes per element of the safetensors dtype names (the header stores names, not torch dtypes).
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
                "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                "I64": 8, "U64": 8, "F64": 8}  # fmt: skip


FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                 "F64": torch.float64}  # fmt: skip


def checkpoint_bytes(model_dir: str | Path) -> int:
    """Total size of the safetensors files the folder's index (or single file) refers to."""
    folder = Path(model_dir).expanduser()
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError):
            return 0
    else:
        shards = {SINGLE_FILE}
    return sum((folder / s).stat().st_size for s in shards if (folder / s).is_file())


def available_memory_bytes() -> int:
    """Memory the kernel can hand out without swapping (`MemAvailable`), else free pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def load_config(folder: Path):
    """The checkpoint's config, or a clear error when the folder is not a local HF model, asks
    to run its own code, or has only pickle weights (`prunenet.io.trust.check_model_folder`)."""
    if not (folder / CONFIG_FILE).is_file():
        raise PruneNetError(
            f"{folder} holds no config.json. Stream mode reads a local folder written by "
            "save_pretrained (download hub models first, e.g. with `hf download`)."
        )
    check_model_folder(folder)
    try:
        return AutoConfig.from_pretrained(folder, **NO_REMOTE_CODE)
    except (OSError, ValueError, KeyError) as error:
        if is_remote_code_error(error):
            raise remote_code_error(str(folder)) from None
        raise PruneNetError(f"Could not read {folder / CONFIG_FILE}: {error}") from error


def record_weights_dtype(config, checkpoint: Checkpoint) -> None:
    """Record the weights' dtype on the config and every sub-config, as `from_pretrained` does.

    In-memory pruning saves a config whose `dtype` (and each sub-config's) names the loaded
    weights' dtype; stream mode keeps the checkpoint's dtype, so it writes the same fields.
    """
    dtype = getattr(config, "dtype", None) or _checkpoint_float_dtype(checkpoint)
    if dtype is None:
        return
    config.dtype = dtype
    for key in getattr(config, "sub_configs", {}):
        sub_config = getattr(config, key, None)
        if sub_config is not None:
            sub_config.dtype = dtype


def _checkpoint_float_dtype(checkpoint: Checkpoint) -> torch.dtype | None:
    """The floating dtype holding most of the checkpoint's bytes."""
    totals: dict[str, int] = {}
    for entry in checkpoint.tensors.values():
        if entry.dtype in FLOAT_DTYPES:
            totals[entry.dtype] = totals.get(entry.dtype, 0) + entry.nbytes
    return FLOAT_DTYPES[max(totals, key=totals.get)] if totals else None


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it (shape after pruning in output plans)."""

    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


@dataclass
class Checkpoint:
    """A checkpoint folder's tensors, read from shard headers only (no tensor data).

    :param tensors: name -> entry, for every tensor the index (or the single file) lists.
    :param shards: shard file names in order.
    :param shard_metadata: each shard's `__metadata__` (kept in the output shards).
    :param index_metadata: the index's `metadata`, or None for a single-file checkpoint.
    """

    folder: Path
    tensors: dict[str, TensorEntry]
    shards: list[str]
    shard_metadata: dict[str, dict[str, str] | None]
    index_metadata: dict | None

    def path(self, name: str) -> Path:
        return self.folder / self.tensors[name].shard


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """Validate every shard's header up front, so a broken checkpoint fails before any writing."""
    folder = Path(folder)
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = dict(index["weight_map"])
        except (ValueError, KeyError, TypeError) as error:
            raise PruneNetError(
                f"{index_path} is not a valid safetensors index ({type(error).__name__}: "
                f"{error}); it needs a 'weight_map' from tensor names to shard files."
            ) from None
        index_metadata = dict(index.get("metadata") or {})
        shards = sorted(set(weight_map.values()))
    elif (folder / SINGLE_FILE).is_file():
        weight_map, index_metadata, shards = None, None, [SINGLE_FILE]
    else:
        raise PruneNetError(
            f"{folder} has no {SINGLE_FILE} and no {INDEX_FILE}; stream mode reads safetensors "
            "checkpoints only. Convert once with from_pretrained + save_pretrained, or prune "
            "without --stream."
        )
    tensors: dict[str, TensorEntry] = {}
    shard_metadata = {}
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            raise PruneNetError(
                f"{INDEX_FILE} names the shard {shard}, but {path} does not exist; the "
                "checkpoint is incomplete (re-download the missing shard)."
            )
        try:
            with safe_open(path, framework="pt") as handle:
                present = set(handle.keys())
                names = [n for n, s in weight_map.items() if s == shard] if weight_map else present
                missing = [n for n in names if n not in present]
                if missing:
                    raise PruneNetError(
                        f"{INDEX_FILE} says {missing[0]!r} (and {len(missing) - 1} more) is in "
                        f"{shard}, but that shard does not contain it; the checkpoint is "
                        "inconsistent."
                    )
                for name in sorted(names):
                    view = handle.get_slice(name)
                    dtype = view.get_dtype()
                    if dtype not in DTYPE_BYTES:
                        raise PruneNetError(
                            f"Tensor {name!r} in {shard} has dtype {dtype}, which stream mode "
                            "cannot copy; prune without --stream."
                        )
                    tensors[name] = TensorEntry(name, shard, dtype, tuple(view.get_shape()))
                shard_metadata[shard] = handle.metadata()
        except (SafetensorError, OSError) as error:
            raise PruneNetError(
                f"Shard {path} cannot be read: {error}. It is probably truncated or corrupt "
                "(an interrupted download or copy); re-download it."
            ) from None
    return Checkpoint(folder, tensors, shards, shard_metadata, index_metadata)


def read_tensor(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    """One tensor through its own short-lived handle.

    The tensor is backed by the shard's memory map; closing the handle here means the map (and
    the pages it has touched, which count in RSS) is released as soon as the tensor is dropped.
    """
    with safe_open(checkpoint.path(name), framework="pt") as handle:
        return handle.get_tensor(name)
