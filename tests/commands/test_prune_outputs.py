"""`prunenet prune` and what it writes around its outputs: an unusable cache, several folders
under one `--out` (resumable after an interruption)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunenet.cli import main
from prunenet.io.cache import CacheWarning

QUICK = ("--selfgen-sequences", "8", "--selfgen-length", "12")


def _prune(model: Path, out: Path, *extra: str) -> int:
    return main(["prune", "--model", str(model), "--out", str(out), *QUICK, *extra])


def test_a_cache_path_that_is_a_file_warns_and_the_run_succeeds(
    tiny_model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cache").write_text("a file")
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PRUNENET_NO_CACHE", raising=False)
    with pytest.warns(CacheWarning, match="Going on without the cache"):
        assert _prune(tiny_model_folder, tmp_path / "out", "--ratio", "0.5") == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert (tmp_path / "cache").read_text() == "a file"
