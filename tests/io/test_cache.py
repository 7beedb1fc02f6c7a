"""The on-disk analysis cache: computed once per weights and settings, never trusted blindly."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import safetensors.torch
import torch

import prunenet.allocation.sensitivity
import prunenet.analysis.selfgen
import prunenet.io.cache as cache_module
from prunenet.allocation.sensitivity import auto_allocation
from prunenet.analysis.selfgen import _encode_activations, cache_settings, collect_activations
from prunenet.io.cache import (
    CacheWarning,
    Info,
    Tensors,
    _entry_key,
    _write_entry,
    entry_path,
    memoize,
    stored_tensor,
    weights_fingerprint,
)
from prunenet.scoring.heuristics import MagnitudeScorer
from tests.conftest import SMALL_SELFGEN, tiny_model


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path))
    monkeypatch.delenv("PRUNENET_NO_CACHE", raising=False)
    return tmp_path / "analysis"


class Counter:
    """A `compute` callable that counts its calls and returns a fresh tensor each time."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict:
        self.calls += 1
        return {"value": torch.arange(4.0) * self.calls}


def encode_value(value: dict) -> tuple[Tensors, Info]:
    return {"value": value["value"]}, {}


def decode_value(tensors: Tensors, info: Info) -> dict:
    return {"value": stored_tensor(tensors, "value", torch.float32, (4,))}


def remember(kind: str, model: torch.nn.Module, settings: dict, compute: Counter) -> dict:
    """`memoize` with the codec of `Counter`'s values."""
    return memoize(kind, model, settings, compute, encode=encode_value, decode=decode_value)


class TouchOnUnpickle:
    """A pickle payload that creates `path` when it is loaded: stands in for arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def legacy_entry_path(kind: str, model: torch.nn.Module, settings: dict) -> Path:
    """Where the pickled (format 1) cache stored this entry."""
    key = json.dumps(
        {"format": 1, "kind": kind, "model": weights_fingerprint(model), **settings},
        sort_keys=True,
        default=str,
    )
    name = f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"
    return entry_path(kind, model, settings).parent / name


def plant_entry(
    kind: str, model: torch.nn.Module, settings: dict, tensors: Tensors, info: Info
) -> None:
    """A consistent entry (this lookup's key, a valid checksum) holding anything: what anyone
    who can write the cache folder could make, so only `decode` stands between it and use."""
    path = entry_path(kind, model, settings)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_entry(path, _entry_key(kind, model, settings), tensors, info)


def test_memoize_computes_once_and_reuses_the_stored_result(cache_dir: Path) -> None:
    model, compute = tiny_model("llama"), Counter()
    first = remember("test", model, {"n": 1}, compute)
    second = remember("test", model, {"n": 1}, compute)
    assert compute.calls == 1
    assert torch.equal(first["value"], second["value"])
    assert list(cache_dir.iterdir()) == [entry_path("test", model, {"n": 1})]


def test_memoize_recomputes_for_other_settings_or_kind(cache_dir: Path) -> None:
    model, compute = tiny_model("llama"), Counter()
    remember("test", model, {"n": 1}, compute)
    remember("test", model, {"n": 2}, compute)
    remember("other", model, {"n": 1}, compute)
    assert compute.calls == 3


def test_a_model_with_changed_weights_gets_a_different_key(cache_dir: Path) -> None:
    model, compute = tiny_model("llama"), Counter()
    before = weights_fingerprint(model)
    remember("test", model, {}, compute)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 0.5
    assert weights_fingerprint(model) != before
    remember("test", model, {}, compute)
    assert compute.calls == 2
    assert len(list(cache_dir.glob("test-*.safetensors"))) == 2


def test_equal_weights_share_a_key_across_model_objects(cache_dir: Path) -> None:
    compute = Counter()
    remember("test", tiny_model("llama"), {}, compute)
    remember("test", tiny_model("llama"), {}, compute)
    assert compute.calls == 1
    assert weights_fingerprint(tiny_model("llama")) != weights_fingerprint(tiny_model("llama", 7))


def test_an_entry_is_a_safetensors_file_whose_metadata_records_the_full_key(
    cache_dir: Path,
) -> None:
    model = tiny_model("llama")
    remember("test", model, {"n": 1}, Counter())
    path = entry_path("test", model, {"n": 1})
    assert torch.equal(safetensors.torch.load_file(path)["value"], torch.arange(4.0))
    with safetensors.safe_open(path, "pt") as stored:
        entry = json.loads(stored.metadata()["prunenet.entry"])
    assert json.loads(entry["key"])["model"] == weights_fingerprint(model)
    assert json.loads(entry["key"])["n"] == 1


@pytest.mark.parametrize("planted", ["torch.save file", "well-formed entry"])
def test_a_planted_pickle_payload_is_never_executed_and_the_value_is_recomputed(
    cache_dir: Path, tmp_path: Path, planted: str
) -> None:
    model, compute = tiny_model("llama"), Counter()
    canary, marker = tmp_path / "canary", tmp_path / "payload-ran"
    pickle.loads(pickle.dumps(TouchOnUnpickle(canary)))
    assert canary.exists()  # the payload is live: unpickling it runs code

    path = entry_path("test", model, {})
    path.parent.mkdir(mode=0o700, parents=True)
    torch.save({"value": TouchOnUnpickle(marker)}, legacy_entry_path("test", model, {}))
    if planted == "torch.save file":  # a pickle exactly where the next lookup looks
        torch.save({"value": TouchOnUnpickle(marker)}, path)
    else:  # a consistent entry carrying the pickle bytes as a tensor and as JSON text
        pickled = pickle.dumps({"value": TouchOnUnpickle(marker)})
        payload = torch.frombuffer(bytearray(pickled), dtype=torch.uint8)
        plant_entry("test", model, {}, {"value": payload}, {"pickle": pickled.hex()})

    with pytest.warns(CacheWarning, match=path.name):
        value = remember("test", model, {}, compute)
    assert not marker.exists()
    assert compute.calls == 1
    assert torch.equal(value["value"], torch.arange(4.0))
    assert torch.equal(remember("test", model, {}, compute)["value"], torch.arange(4.0))
    assert compute.calls == 1  # the planted entry was replaced by a good one


def test_a_cache_hit_never_unpickles(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, compute = tiny_model("llama"), Counter()
    remember("test", model, {}, compute)

    def refuse(*args, **kwargs):
        raise AssertionError("the cache must not unpickle")

    for module, name in [(torch, "load"), (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(module, name, refuse)
    assert torch.equal(remember("test", model, {}, compute)["value"], torch.arange(4.0))
    assert compute.calls == 1


def test_legacy_pt_entries_are_ignored(cache_dir: Path) -> None:
    model, compute = tiny_model("llama"), Counter()
    legacy = legacy_entry_path("test", model, {})
    legacy.parent.mkdir(mode=0o700, parents=True)
    torch.save({"value": torch.full((4,), 9.0)}, legacy)
    assert torch.equal(remember("test", model, {}, compute)["value"], torch.arange(4.0))
    assert compute.calls == 1


def test_an_entry_with_flipped_bytes_is_detected_recomputed_and_replaced(cache_dir: Path) -> None:
    model, compute = tiny_model("llama"), Counter()
    remember("test", model, {}, compute)
    path = entry_path("test", model, {})
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last tensor byte: 3.0 becomes another finite float
    path.write_bytes(bytes(data))
    assert not torch.equal(safetensors.torch.load_file(path)["value"], torch.arange(4.0))

    with pytest.warns(CacheWarning, match=rf"{path.name}: .*checksum mismatch") as caught:
        value = remember("test", model, {}, compute)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert compute.calls == 2
    assert torch.equal(value["value"], torch.arange(4.0) * 2)
    assert torch.equal(remember("test", model, {}, compute)["value"], value["value"])
    assert compute.calls == 2


def test_a_truncated_entry_is_recomputed_with_a_warning(cache_dir: Path) -> None:
    model, compute = tiny_model("llama"), Counter()
    remember("test", model, {}, compute)
    path = entry_path("test", model, {})
    path.write_bytes(path.read_bytes()[:-3])

    with pytest.warns(CacheWarning, match=path.name):
        value = remember("test", model, {}, compute)
    assert compute.calls == 2
    assert torch.equal(value["value"], torch.arange(4.0) * 2)


def test_an_entry_recording_another_key_is_not_used(cache_dir: Path) -> None:
    """A hash collision stand-in: a valid entry of other settings under this lookup's name."""
    model, compute = tiny_model("llama"), Counter()
    remember("test", model, {"n": 1}, compute)
    path = entry_path("test", model, {"n": 2})
    entry_path("test", model, {"n": 1}).replace(path)

    with pytest.warns(CacheWarning, match=rf"{path.name}: .*key"):
        value = remember("test", model, {"n": 2}, compute)
    assert compute.calls == 2
    assert torch.equal(value["value"], torch.arange(4.0) * 2)


def test_an_entry_the_decoder_rejects_as_non_finite_is_recomputed(cache_dir: Path) -> None:
    model, calls = tiny_model("llama"), []

    def compute() -> dict:
        calls.append(None)
        return {"value": torch.full((4,), float("nan") if len(calls) == 1 else 1.0)}

    memoize("test", model, {}, compute, encode=encode_value, decode=decode_value)
    with pytest.warns(CacheWarning, match="non-finite"):
        value = memoize("test", model, {}, compute, encode=encode_value, decode=decode_value)
    assert len(calls) == 2
    assert torch.equal(value["value"], torch.ones(4))


def test_the_cache_folder_is_created_private(cache_dir: Path) -> None:
    remember("test", tiny_model("llama"), {}, Counter())
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700


def test_an_existing_cache_folder_is_narrowed_to_private(cache_dir: Path) -> None:
    cache_dir.mkdir(mode=0o777, parents=True)
    os.chmod(cache_dir, 0o777)
    remember("test", tiny_model("llama"), {}, Counter())
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700


def test_entries_are_written_readable_by_their_owner_only(cache_dir: Path) -> None:
    model = tiny_model("llama")
    remember("test", model, {}, Counter())
    assert stat.S_IMODE(entry_path("test", model, {}).stat().st_mode) == 0o600


def test_a_cache_folder_owned_by_another_user_is_not_used(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, compute = tiny_model("llama"), Counter()
    remember("test", model, {}, compute)
    monkeypatch.setattr(os, "getuid", lambda: cache_dir.stat().st_uid + 1)
    with pytest.warns(CacheWarning, match="belongs to another user"):
        remember("test", model, {}, compute)
    assert compute.calls == 2


def test_prunenet_no_cache_disables_the_cache(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRUNENET_NO_CACHE", "1")
    model, compute = tiny_model("llama"), Counter()
    remember("test", model, {}, compute)
    remember("test", model, {}, compute)
    assert compute.calls == 2
    assert not cache_dir.exists() or not any(cache_dir.iterdir())


def test_cache_leaves_no_staging_files_behind(cache_dir: Path) -> None:
    remember("test", tiny_model("llama"), {}, Counter())
    assert [p.name for p in cache_dir.iterdir() if p.name.startswith(".")] == []


# ----- an unusable cache: warn once and go on --------------------------------------------------


def _cache_warnings(call) -> list[str]:
    """The CacheWarnings `call()` emits, every one recorded (not Python's once-per-place)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]


def _twice(model: torch.nn.Module, compute: Counter) -> None:
    remember("a", model, {}, compute)
    remember("b", model, {}, compute)


def test_a_cache_path_that_is_a_file_warns_once_and_computes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cache").write_text("a file")
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PRUNENET_NO_CACHE", raising=False)
    compute = Counter()
    messages = _cache_warnings(lambda: _twice(tiny_model("llama"), compute))
    assert compute.calls == 2
    assert len(messages) == 1 and "Going on without the cache" in messages[0]
    assert (tmp_path / "cache").read_text() == "a file"


def test_a_cache_folder_that_cannot_be_created_warns_once_and_computes(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cache_module.os, "makedirs", read_only)
    compute = Counter()
    messages = _cache_warnings(lambda: _twice(tiny_model("llama"), compute))
    assert compute.calls == 2
    assert len(messages) == 1 and "Read-only file system" in messages[0]


@pytest.mark.parametrize(
    "failure", [(errno.EROFS, "Read-only file system"), (errno.ENOSPC, "No space left on device")]
)
def test_a_cache_that_cannot_be_written_warns_once_and_still_reads_its_entries(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch, failure: tuple[int, str]
) -> None:
    model, compute = tiny_model("llama"), Counter()
    stored = remember("stored", model, {}, compute)

    @contextmanager
    def cannot_write(path, mode=None):
        raise OSError(*failure)
        yield

    monkeypatch.setattr(cache_module, "atomic_file", cannot_write)
    messages = _cache_warnings(lambda: _twice(model, compute))
    assert compute.calls == 3  # "a" and "b" computed, "stored" not again:
    assert torch.equal(remember("stored", model, {}, compute)["value"], stored["value"])
    assert compute.calls == 3
    assert len(messages) == 1 and failure[1] in messages[0]


# ----- what killed writers leave behind -----------------------------------------------------


def test_a_partial_entry_left_by_a_writer_killed_mid_write_is_removed_on_next_use(
    cache_dir: Path,
) -> None:
    cache_dir.mkdir(mode=0o700)
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITE_UNTIL_KILLED, str(cache_dir)], stdout=subprocess.PIPE
    )
    try:
        assert writer.stdout.readline().strip() == b"writing"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    assert [p.name for p in cache_dir.iterdir()] == [
        f".test-abc.safetensors.partial-{writer.pid}-{_name_suffix(cache_dir)}"
    ]
    remember("test", tiny_model("llama"), {}, Counter())
    assert not [p for p in cache_dir.iterdir() if ".partial-" in p.name]


def test_a_fresh_partial_entry_of_a_running_writer_is_kept(cache_dir: Path) -> None:
    cache_dir.mkdir(mode=0o700)
    running = cache_dir / f".test-abc.safetensors.partial-{os.getppid()}-abcd1234"
    running.write_bytes(b"being written")
    remember("test", tiny_model("llama"), {}, Counter())
    assert running.read_bytes() == b"being written"


@pytest.mark.parametrize("name", [".x.safetensors.partial-{pid}-abcd1234",
                                  ".x.safetensors.partial-abcd1234"])  # fmt: skip
def test_a_partial_entry_older_than_an_hour_is_removed_even_if_its_pid_runs(
    cache_dir: Path, name: str
) -> None:
    cache_dir.mkdir(mode=0o700)
    old = cache_dir / name.format(pid=os.getppid())  # a pid that runs: reused, say
    old.write_bytes(b"abandoned")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    remember("test", tiny_model("llama"), {}, Counter())
    assert not old.exists()


def test_files_that_are_not_partial_entries_are_never_removed(cache_dir: Path) -> None:
    cache_dir.mkdir(mode=0o700)
    mine = cache_dir / "notes.partial-99999999-abcd1234"  # no leading dot: not a temporary
    mine.write_text("kept")
    remember("test", tiny_model("llama"), {}, Counter())
    assert mine.read_text() == "kept"


def _name_suffix(folder: Path) -> str:
    return next(folder.iterdir()).name.rsplit("-", 1)[1]


# Starts an atomic cache write into argv[1], says "writing" with half an entry on disk, waits.
_WRITE_UNTIL_KILLED = """
import sys, time
from pathlib import Path
from prunenet.io.saving import atomic_file
with atomic_file(Path(sys.argv[1]) / "test-abc.safetensors", mode=0o600) as staging:
    staging.write_bytes(b"half an entry")
    print("writing", flush=True)
    time.sleep(600)
"""


def test_cached_activations_equal_computed_ones_without_computing_again(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, calls = tiny_model("llama"), []
    compute = prunenet.analysis.selfgen._collect_activations
    monkeypatch.setattr(
        prunenet.analysis.selfgen,
        "_collect_activations",
        lambda *args: calls.append(1) or compute(*args),
    )
    computed = collect_activations(model, SMALL_SELFGEN)
    cached = collect_activations(model, SMALL_SELFGEN)
    assert len(calls) == 1
    assert len(list(cache_dir.glob("activations-*.safetensors"))) == 1
    assert len(cached) == len(computed)
    for a, b in zip(cached, computed, strict=True):
        assert torch.equal(a.rms, b.rms) and torch.equal(a.mean_abs, b.mean_abs)
        assert torch.equal(a.max_abs, b.max_abs) and torch.equal(a.sample, b.sample)


def test_a_consistent_activations_entry_with_wrong_shapes_is_recomputed(cache_dir: Path) -> None:
    """The decoder checks the layout against the model: a checksum alone vouches for nothing."""
    model, settings = tiny_model("llama"), cache_settings(SMALL_SELFGEN)
    computed = collect_activations(model, SMALL_SELFGEN)
    tensors, info = _encode_activations(computed)
    tensors["1.rms"] = tensors["1.rms"][:-1]
    plant_entry("activations", model, settings, tensors, info)
    with pytest.warns(CacheWarning, match=r"'1.rms' has shape"):
        recomputed = collect_activations(model, SMALL_SELFGEN)
    assert torch.equal(recomputed[1].rms, computed[1].rms)


def test_cached_sensitivity_curves_equal_computed_ones_without_measuring_again(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, measured, allocated = tiny_model("llama"), [], []
    measure, allocate = (
        prunenet.allocation.sensitivity.layer_sensitivity,
        prunenet.allocation.sensitivity.allocate_rows,
    )

    def counted_measure(*args, **kwargs):
        measured.append(None)
        return measure(*args, **kwargs, text=SMALL_SELFGEN, progress=False)

    def recorded_allocate(curves, *args, **kwargs):
        allocated.append(curves)
        return allocate(curves, *args, **kwargs)

    monkeypatch.setattr(prunenet.allocation.sensitivity, "layer_sensitivity", counted_measure)
    monkeypatch.setattr(prunenet.allocation.sensitivity, "allocate_rows", recorded_allocate)
    first = auto_allocation(model, MagnitudeScorer(), 0.3)
    second = auto_allocation(model, MagnitudeScorer(), 0.3)
    assert len(measured) == 1
    assert first == second
    computed, cached = allocated
    assert cached == computed
    for a, b in zip(cached, computed, strict=True):
        assert torch.equal(torch.tensor(a.costs), torch.tensor(b.costs))
        assert tuple(a.ratios) == tuple(b.ratios)


def test_the_weights_fingerprint_is_the_same_at_any_thread_count() -> None:
    """A float sum's last bits depend on how many threads reduce it; the key must not."""
    from prunenet.io.cache import weights_fingerprint

    model = torch.nn.Linear(4096, 512)
    with torch.no_grad():
        model.weight.normal_(generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        keys = set()
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            keys.add(weights_fingerprint(model))
    finally:
        torch.set_num_threads(threads)
    assert len(keys) == 1
    with torch.no_grad():
        model.weight[0, 0] += 1e-3
    assert weights_fingerprint(model) not in keys
