"""The on-disk analysis cache: computed once per weights and settings, never trusted blindly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prunenet.cache import memoize, weights_fingerprint
from prunenet.selfgen import SelfGenConfig, collect_activations
from tests.conftest import tiny_model


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


def test_memoize_computes_once_and_reuses_the_stored_result(cache_dir: Path) -> None:
    model, compute = tiny_model("llama"), Counter()
    first = memoize("test", model, {"n": 1}, compute)
    second = memoize("test", model, {"n": 1}, compute)
    assert compute.calls == 1
    assert torch.equal(first["value"], second["value"])
    assert len(list(cache_dir.glob("test-*.pt"))) == 1


def test_memoize_recomputes_for_other_settings_or_kind(cache_dir: Path) -> None:
    model, compute = tiny_model("llama"), Counter()
    memoize("test", model, {"n": 1}, compute)
    memoize("test", model, {"n": 2}, compute)
    memoize("other", model, {"n": 1}, compute)
    assert compute.calls == 3


def test_a_model_with_changed_weights_gets_a_different_key(cache_dir: Path) -> None:
    model, compute = tiny_model("llama"), Counter()
    before = weights_fingerprint(model)
    memoize("test", model, {}, compute)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 0.5
    assert weights_fingerprint(model) != before
    memoize("test", model, {}, compute)
    assert compute.calls == 2
    assert len(list(cache_dir.glob("test-*.pt"))) == 2


def test_equal_weights_share_a_key_across_model_objects(cache_dir: Path) -> None:
    compute = Counter()
    memoize("test", tiny_model("llama"), {}, compute)
    memoize("test", tiny_model("llama"), {}, compute)
    assert compute.calls == 1
    assert weights_fingerprint(tiny_model("llama")) != weights_fingerprint(tiny_model("llama", 7))


def test_a_damaged_cache_file_is_recomputed_and_replaced(cache_dir: Path) -> None:
    model, compute = tiny_model("llama"), Counter()
    memoize("test", model, {}, compute)
    (entry,) = cache_dir.glob("test-*.pt")
    entry.write_bytes(b"not a torch file")

    value = memoize("test", model, {}, compute)
    assert compute.calls == 2
    assert torch.equal(value["value"], torch.arange(4.0) * 2)
    assert torch.equal(torch.load(entry, weights_only=False)["value"], value["value"])


def test_prunenet_no_cache_disables_the_cache(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRUNENET_NO_CACHE", "1")
    model, compute = tiny_model("llama"), Counter()
    memoize("test", model, {}, compute)
    memoize("test", model, {}, compute)
    assert compute.calls == 2
    assert not cache_dir.exists() or not any(cache_dir.iterdir())


def test_cache_leaves_no_staging_files_behind(cache_dir: Path) -> None:
    memoize("test", tiny_model("llama"), {}, Counter())
    assert [p.name for p in cache_dir.iterdir() if p.name.startswith(".")] == []


def test_cached_activations_equal_freshly_computed_ones(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, config = tiny_model("llama"), SelfGenConfig(sequences=2, length=16, kept_tokens=16)
    collect_activations(model, config)  # fills the cache
    cached = collect_activations(model, config)
    monkeypatch.setenv("PRUNENET_NO_CACHE", "1")
    fresh = collect_activations(model, config)
    assert len(list(cache_dir.glob("activations-*.pt"))) == 1
    for a, b in zip(cached, fresh, strict=True):
        assert torch.equal(a.rms, b.rms) and torch.equal(a.sample, b.sample)
