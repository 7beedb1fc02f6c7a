"""Atomic output folders: a complete folder or none, and an existing one only with consent."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunenet.compress import prune_model, save_pruned
from prunenet.errors import PruneNetError
from prunenet.saving import atomic_directory, check_output_path
from prunenet.scorers import RandomScorer
from tests.conftest import tiny_model, tiny_tokenizer


class SaveFailed(RuntimeError):
    """Raised by the tests' sabotaged save to simulate a crash halfway through writing."""


def _existing_output(parent: Path) -> Path:
    out = parent / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    return out


def test_successful_write_appears_at_the_output_path_and_leaves_no_staging(tmp_path: Path) -> None:
    with atomic_directory(tmp_path / "out", overwrite=False) as staging:
        (staging / "weights.bin").write_text("data")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "weights.bin").read_text() == "data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_while_writing_leaves_no_output_and_no_staging(tmp_path: Path) -> None:
    with pytest.raises(SaveFailed), atomic_directory(tmp_path / "out", overwrite=False) as staging:
        (staging / "half-written.bin").write_text("data")
        raise SaveFailed
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_without_overwrite(tmp_path: Path) -> None:
    out = _existing_output(tmp_path)
    with pytest.raises(PruneNetError, match="--overwrite"):
        check_output_path(out, overwrite=False)
    assert (out / "old.txt").exists()


def test_existing_output_is_replaced_with_overwrite(tmp_path: Path) -> None:
    out = _existing_output(tmp_path)
    with atomic_directory(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new run")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_overwrite_keeps_the_previous_output(tmp_path: Path) -> None:
    out = _existing_output(tmp_path)
    with pytest.raises(SaveFailed), atomic_directory(out, overwrite=True):
        raise SaveFailed
    assert (out / "old.txt").read_text() == "previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_path_that_is_a_file_is_refused_even_with_overwrite(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(PruneNetError, match="not a folder"):
        check_output_path(tmp_path / "out", overwrite=True)


def test_missing_parent_folders_are_created(tmp_path: Path) -> None:
    with atomic_directory(tmp_path / "a" / "b" / "out", overwrite=False) as staging:
        (staging / "f").write_text("x")
    assert (tmp_path / "a" / "b" / "out" / "f").exists()


def test_save_pruned_failing_midway_leaves_no_folder_and_no_staging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model("llama")
    report = prune_model(model, RandomScorer().score_model(model), 0.5)
    real_save = type(model).save_pretrained

    def save_then_crash(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)  # weights are on disk when the crash comes
        assert any(Path(folder).iterdir())
        raise SaveFailed("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", save_then_crash)
    with pytest.raises(SaveFailed):
        save_pruned(model, tiny_tokenizer(), tmp_path / "out", report)
    assert list(tmp_path.iterdir()) == []
