"""Disk cache for per-model analyses (self-generated activations, layer sensitivity).

These analyses depend only on the model's weights and a few settings, and they dominate the
cost of pruning at a new ratio, so they are computed once per model and reused: a new ratio
then takes seconds. Entries are keyed by a fingerprint of the weights themselves (shapes, sums
and a strided sample of every parameter), never by a path, so a model pruned or edited in memory
never reads an entry of the model it came from. `PRUNENET_NO_CACHE=1` turns the cache off.

An entry is one file, `<cache>/analysis/<kind>-<24 hex digits of sha256(key)>.safetensors`:
its tensors are the value's tensors, named by the caller's `encode`, and its safetensors
metadata holds two strings: `prunenet.entry`, a JSON object with the full key (format version,
kind, weights fingerprint, settings) and the caller's JSON-able `info` (structure, plain
numbers), and `prunenet.sha256`, a checksum over that JSON text and every tensor's name, dtype,
shape and bytes.

What is trusted: nothing in an entry can run code. Reading uses only `json` and `safetensors`
(never pickle or `torch.load`), so a planted file can at worst hold wrong numbers. An entry is
used only if it parses, its checksum matches, its recorded key equals this lookup's key (the file
name holds only a hash prefix), and the caller's `decode` accepts its names, shapes, dtypes and
values (finite where finite ones are expected). Anything else is recomputed and replaced, with a
one-line `CacheWarning` naming the entry and the reason. The checksum detects corruption
(flipped bytes, truncation), not tampering: whoever can write the folder can write a consistent
entry with wrong numbers. So the `analysis` folder is kept at mode 0700, a folder owned by
another user is not used at all, and entries are written atomically with mode 0600. Pickled
`.pt` entries of older versions are never read.

The cache only saves time, so an unusable one never stops a run: a `PRUNENET_CACHE` that is a
file, a read-only folder or a full disk gets one `CacheWarning` per process and the run goes on
computing (entries that can be read still are). A writer killed mid-write (SIGKILL) leaves a
`.NAME.partial-PID-XXXXXXXX` temporary; the first cache use of a later process removes those
whose writer is gone or that are over an hour old.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import safetensors.torch
import torch
from torch import nn

from prunenet.io.models import prunenet_cache_dir
from prunenet.io.saving import atomic_file, remove_stale_partial_files

CACHE_FORMAT = 2  # 1 was pickled `.pt` files
ENTRY_SUFFIX = ".safetensors"
T = TypeVar("T")
Tensors = dict[str, torch.Tensor]
Info = dict[str, Any]  # JSON-able: str keys; str, int, float, bool, None, lists and dicts

# Per process: cache folders warned about as unusable (once each), folders writes failed in
# (reads from them go on), folders whose stale temporaries were removed.
_WARNED: set[Path] = set()
_NOT_WRITABLE: set[Path] = set()
_SWEPT: set[Path] = set()
# Open `watch_lookups` blocks: each gets (kind, read from an entry) for every `memoize` call.
_WATCHERS: list[list[tuple[str, bool]]] = []

_ENTRY_FIELD = "prunenet.entry"
_CHECKSUM_FIELD = "prunenet.sha256"


class CacheWarning(UserWarning):
    """A cache entry was not used (and was recomputed), or the cache folder is unusable."""


class CacheEntryError(ValueError):
    """A stored entry does not hold what its reader expects; `decode` hooks raise it."""


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weights_fingerprint(model: nn.Module) -> str:
    """Content hash of a model's parameters: names, shapes, sums, and the raw bytes of
    an evenly strided sample of ~4k values each (so reordered rows also change the key)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            flat = parameter.detach().flatten()
            # The sum of the raw bits as integers: exact, so any thread count gives the same key
            # (a float sum's last bits depend on the reduction order: a prune on every core and
            # a recover on one thread missed each other's text).
            ints = _SAME_WIDTH_INT[flat.element_size()]
            total = flat.contiguous().view(ints).sum(dtype=torch.int64).item()
            sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes()
            digest.update(f"{name}:{tuple(parameter.shape)}:{total!r};".encode())
            digest.update(sample)
    return digest.hexdigest()


def memoize(
    kind: str,
    model: nn.Module,
    settings: dict,
    compute: Callable[[], T],
    encode: Callable[[T], tuple[Tensors, Info]],
    decode: Callable[[Tensors, Info], T],
) -> T:
    """`compute()`, or its stored result for the same model weights, kind and settings.

    :param kind: what is stored (`"activations"`, `"sensitivity"`); starts the file name.
    :param model: the model whose weights key the entry.
    :param settings: every other input of `compute` (JSON-able); part of the key.
    :param compute: computes the value when no usable entry exists.
    :param encode: splits a value into CPU-storable tensors and JSON-able info (no NaN/inf).
    :param decode: rebuilds the value from a verified entry's tensors and info, checking their
        names, shapes, dtypes and values against what the caller expects; it raises (e.g.
        `CacheEntryError`, see `stored_tensor`) for an entry that does not fit, which is then
        recomputed.
    """
    if os.environ.get("PRUNENET_NO_CACHE"):
        return _noted(kind, False, compute())
    key = _entry_key(kind, model, settings)
    folder = _private_folder()
    if folder is None:
        return _noted(kind, False, compute())
    path = folder / _entry_name(kind, key)
    if os.path.exists(path):
        try:
            return _noted(kind, True, decode(*_read_entry(path, key)))
        except Exception as error:  # whatever is wrong with an entry, it is recomputed
            reason = " ".join(f"{type(error).__name__}: {error}".split())
            warnings.warn(f"prunenet cache: recomputing {path}: {reason}", CacheWarning, 2)
    value = compute()
    if folder not in _NOT_WRITABLE:
        tensors, info = encode(value)
        try:
            _write_entry(path, key, tensors, info)
        except OSError as error:  # read-only, full, or a quota: the value is still good
            _NOT_WRITABLE.add(folder)
            _warn_unusable(folder, f"cannot write to it ({error.strerror or error})")
    return _noted(kind, False, value)


@contextlib.contextmanager
def watch_lookups() -> Iterator[list[tuple[str, bool]]]:
    """Collect `(kind, read from the cache)` for every `memoize` call inside the block, so a
    timing can say whether a stage computed its value or read it (`prunenet.stages`).
    """
    lookups: list[tuple[str, bool]] = []
    _WATCHERS.append(lookups)
    try:
        yield lookups
    finally:
        _WATCHERS.remove(lookups)


def _noted(kind: str, read: bool, value: T) -> T:
    for lookups in _WATCHERS:
        lookups.append((kind, read))
    return value


def entry_path(kind: str, model: nn.Module, settings: dict) -> Path:
    """Where `memoize(kind, model, settings, ...)` stores its entry (for inspection and tests)."""
    key = _entry_key(kind, model, settings)
    return prunenet_cache_dir() / "analysis" / _entry_name(kind, key)


def stored_tensor(
    tensors: Tensors,
    name: str,
    dtype: torch.dtype,
    shape: tuple[int | None, ...],
    finite: bool = True,
) -> torch.Tensor:
    """`tensors[name]` if it has the expected dtype and shape, else `CacheEntryError`.

    A helper for `decode` hooks.

    :param dtype: the dtype the value was stored with.
    :param shape: the expected shape; `None` in a dimension accepts any size.
    :param finite: also reject NaN and infinite values.
    """
    if name not in tensors:
        raise CacheEntryError(f"tensor {name!r} is missing")
    tensor = tensors[name]
    if tensor.dtype != dtype:
        raise CacheEntryError(f"tensor {name!r} is {tensor.dtype}, expected {dtype}")
    if len(tensor.shape) != len(shape) or any(
        want is not None and have != want for have, want in zip(tensor.shape, shape, strict=True)
    ):
        raise CacheEntryError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
    if finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise CacheEntryError(f"tensor {name!r} holds non-finite values")
    return tensor


def _entry_key(kind: str, model: nn.Module, settings: dict) -> str:
    return json.dumps(
        {"format": CACHE_FORMAT, "kind": kind, "model": weights_fingerprint(model), **settings},
        sort_keys=True,
        default=str,
    )


def _entry_name(kind: str, key: str) -> str:
    return f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:24]}{ENTRY_SUFFIX}"


def _private_folder() -> Path | None:
    """The `analysis` folder, created (or narrowed) to 0700, its stale temporaries removed;
    None (after one warning) if it cannot be used or another user owns it."""
    folder = prunenet_cache_dir() / "analysis"
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        status = folder.stat()
    except OSError as error:  # PRUNENET_CACHE is a file, or read-only, or on a full disk
        _warn_unusable(folder, f"it cannot be created or read ({error.strerror or error})")
        return None
    if hasattr(os, "getuid") and status.st_uid != os.getuid():
        # We cannot narrow its permissions, and its owner could plant consistent wrong entries.
        warnings.warn(
            f"prunenet cache: not using {folder}: it belongs to another user (uid "
            f"{status.st_uid}); set PRUNENET_CACHE to a folder of your own.",
            CacheWarning,
            3,
        )
        return None
    if stat.S_IMODE(status.st_mode) != 0o700:  # e.g. created 0755 by an older version
        try:
            os.chmod(folder, 0o700)
        except OSError as error:
            _warn_unusable(folder, f"it cannot be made private ({error.strerror or error})")
            return None
    if folder not in _SWEPT:
        _SWEPT.add(folder)
        # What writers killed mid-write (SIGKILL) left: nothing else removes it. An unreadable
        # listing only leaves them for a later run.
        with contextlib.suppress(OSError):
            remove_stale_partial_files(folder)
    return folder


def _warn_unusable(folder: Path, reason: str) -> None:
    """One warning per folder and process: the cache only saves time, so the run goes on."""
    if folder in _WARNED:
        return
    _WARNED.add(folder)
    warnings.warn(
        f"prunenet cache: not using {folder}: {reason}. Going on without the cache (it only "
        "saves time); set PRUNENET_CACHE to a writable folder, or PRUNENET_NO_CACHE=1.",
        CacheWarning,
        4,
    )


def _read_entry(path: Path, key: str) -> tuple[Tensors, Info]:
    """The verified tensors and info of the entry at `path`; raises if anything is off."""
    data = path.read_bytes()
    tensors = safetensors.torch.load(data)  # validates the header and that the bytes fit it
    header_size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
    entry_text, checksum = metadata.get(_ENTRY_FIELD), metadata.get(_CHECKSUM_FIELD)
    if not isinstance(entry_text, str) or not isinstance(checksum, str):
        raise CacheEntryError("no prunenet entry record or checksum in its metadata")
    if _checksum(entry_text, tensors) != checksum:
        raise CacheEntryError("checksum mismatch (the file was changed or damaged)")
    entry = json.loads(entry_text, parse_constant=_reject_constant)
    if not isinstance(entry, dict) or entry.get("key") != key:
        raise CacheEntryError("its recorded key is not this lookup's key")
    info = entry.get("info")
    if not isinstance(info, dict):
        raise CacheEntryError("its info is not a JSON object")
    return tensors, info


def _write_entry(path: Path, key: str, tensors: Tensors, info: Info) -> None:
    """Store an entry atomically and privately (0600), through the one atomic file writer."""
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    entry_text = json.dumps({"key": key, "info": info}, sort_keys=True, allow_nan=False)
    metadata = {_ENTRY_FIELD: entry_text, _CHECKSUM_FIELD: _checksum(entry_text, tensors)}
    data = safetensors.torch.save(tensors, metadata=metadata)
    with atomic_file(path, mode=0o600) as staging:
        staging.write_bytes(data)


def _checksum(entry_text: str, tensors: Tensors) -> str:
    """sha256 of the entry's JSON text and each tensor's name, dtype, shape and bytes."""
    encoded = entry_text.encode()
    digest = hashlib.sha256(f"{len(encoded)}:".encode() + encoded)
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        # Each JSON header is self-delimiting and fixes the byte count that follows it, so no
        # two different entries feed the digest the same stream.
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _reject_constant(name: str) -> float:
    raise CacheEntryError(f"its info holds {name}, which the cache never writes")
