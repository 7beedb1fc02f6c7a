"""Disk cache for per-model analyses (self-generated activations, layer sensitivity).

These analyses depend only on the model's weights and a few settings, and they dominate the
cost of pruning at a new ratio, so they are computed once per model and reused: a new ratio
then takes seconds. Entries are keyed by a fingerprint of the weights themselves (shapes, sums
and a strided sample of every parameter), never by a path, so a model pruned or edited in memory
never reads an entry of the model it came from. `PRUNENET_NO_CACHE=1` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from prunenet.models import prunenet_cache_dir

CACHE_FORMAT = 1
T = TypeVar("T")


def weights_fingerprint(model: nn.Module) -> str:
    """Content hash of a model's parameters: names, shapes, sums, and the raw bytes of
    an evenly strided sample of ~4k values each (so reordered rows also change the key)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            flat = parameter.detach().flatten()
            total = flat.sum().item()  # a different thread count may miss, never mismatch
            sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes()
            digest.update(f"{name}:{tuple(parameter.shape)}:{total!r};".encode())
            digest.update(sample)
    return digest.hexdigest()


def memoize(kind: str, model: nn.Module, settings: dict, compute: Callable[[], T]) -> T:
    """`compute()`, or its stored result for the same model weights, kind and settings."""
    if os.environ.get("PRUNENET_NO_CACHE"):
        return compute()
    key = json.dumps(
        {"format": CACHE_FORMAT, "kind": kind, "model": weights_fingerprint(model), **settings},
        sort_keys=True,
        default=str,
    )
    folder = prunenet_cache_dir() / "analysis"
    path = folder / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=False)
        except Exception:  # a damaged entry is recomputed, never trusted
            path.unlink(missing_ok=True)
    value = compute()
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_save(value, path)
    return value


def _atomic_save(value: object, path: Path) -> None:
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        torch.save(value, staging)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
