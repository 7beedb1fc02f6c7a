"""Atomic output folders: a complete folder or none, and an existing one only with consent."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from prunenet.core.compress import prune_model
from prunenet.core.config_fields import ffn_widths
from prunenet.core.ratios import uniform_keep
from prunenet.errors import PruneNetError
from prunenet.io import saving
from prunenet.io.output_checks import check_free_space, check_output_container, check_output_path
from prunenet.io.saving import atomic_directory, hold_output, save_pruned
from prunenet.scoring.heuristics import RandomScorer
from tests.conftest import tiny_model, tiny_tokenizer


class SaveFailed(RuntimeError):
    """Raised by the tests' sabotaged save to simulate a crash halfway through writing."""


def _existing_output(parent: Path) -> Path:
    """A model folder a previous run wrote (config.json makes it one)."""
    out = parent / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "old.txt").write_text("previous run")
    return out


def _users_folder(path: Path) -> Path:
    """A folder of the user's files (no config.json), as a thesis or a repository would be."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "thesis.tex").write_text("my thesis")
    return path


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
    assert (tmp_path / "out").read_text() == "not a folder"


# ----- what --overwrite may replace: a model folder, nothing else -----------------------------


def test_overwrite_refuses_an_empty_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(_users_folder(tmp_path / "work"))
    with pytest.raises(PruneNetError, match="--out is empty"):
        check_output_path("", overwrite=True)
    assert (tmp_path / "work" / "thesis.tex").read_text() == "my thesis"


@pytest.mark.parametrize("spelling", [".", "./", "../work", "{cwd}", "{link}"])
def test_overwrite_refuses_the_current_folder_however_spelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelling: str
) -> None:
    work = _users_folder(tmp_path / "work")
    (work / "config.json").write_text("{}")  # even one that looks like a model folder
    (tmp_path / "link").symlink_to(work)
    monkeypatch.chdir(work)
    out = spelling.format(cwd=work, link=tmp_path / "link")
    with pytest.raises(PruneNetError, match="the current folder"):
        check_output_path(out, overwrite=True)
    with pytest.raises(PruneNetError, match="the current folder"), atomic_directory(out, True):
        pass
    assert (work / "thesis.tex").read_text() == "my thesis"


def test_overwrite_refuses_a_folder_above_the_current_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    (tmp_path / "a" / "config.json").write_text("{}")
    monkeypatch.chdir(deep)
    with pytest.raises(PruneNetError, match="a folder above the current one"):
        check_output_path("..", overwrite=True)
    assert (tmp_path / "a" / "config.json").is_file()


def test_overwrite_refuses_the_root_folder() -> None:
    with pytest.raises(PruneNetError, match="the root folder"):
        check_output_path("/", overwrite=True)


def test_overwrite_refuses_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = _users_folder(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PruneNetError, match="the home folder"):
        check_output_path("~", overwrite=True)
    assert (home / "thesis.tex").read_text() == "my thesis"


def test_overwrite_refuses_a_folder_that_is_not_a_model_folder(tmp_path: Path) -> None:
    out = _users_folder(tmp_path / "out")
    with pytest.raises(PruneNetError, match="without config.json"):
        check_output_path(out, overwrite=True)
    with pytest.raises(PruneNetError, match="without config.json"), atomic_directory(out, True):
        pass
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_overwrite_refuses_a_symlink_to_a_model_folder(tmp_path: Path) -> None:
    model = _existing_output(tmp_path)
    (tmp_path / "link").symlink_to(model)
    with pytest.raises(PruneNetError, match="symbolic link"):
        check_output_path(tmp_path / "link", overwrite=True)
    assert (model / "old.txt").read_text() == "previous run"


def test_a_pareto_folder_is_replaced_only_as_a_pareto_folder(tmp_path: Path) -> None:
    out = _existing_output(tmp_path)  # a model folder: not what a pareto run may replace
    with pytest.raises(PruneNetError, match="without pareto.json"):
        check_output_path(out, overwrite=True, replaces="pareto.json")
    (out / "pareto.json").write_text("{}")
    with atomic_directory(out, overwrite=True, replaces="pareto.json") as staging:
        (staging / "pareto.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["pareto.json"]


def test_a_folder_that_stops_being_a_model_folder_during_the_run_is_kept(tmp_path: Path) -> None:
    out = _existing_output(tmp_path)
    refused = pytest.raises(PruneNetError, match="without config.json")
    with refused, atomic_directory(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("this run")
        (out / "config.json").unlink()
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_out_name_too_long_for_the_writers_derived_names_is_refused(tmp_path: Path) -> None:
    out = tmp_path / ("m" * 245)  # fits the 255-byte limit itself, its backup name does not
    with pytest.raises(PruneNetError, match=r"at most 236 bytes"):
        check_output_path(out, overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_the_longest_accepted_out_name_is_written_and_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(saving, "_renameat2", lambda source, target, flags: False)
    out = tmp_path / ("m" * 236)
    for run in ("first", "second"):  # the second replaces the first through `.NAME.previous-`
        with atomic_directory(out, overwrite=True) as staging:
            (staging / "config.json").write_text(run)
    assert (out / "config.json").read_text() == "second"


def test_a_parent_folder_name_too_long_to_create_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PruneNetError, match="Cannot create the folder"):
        check_output_path(tmp_path / ("d" * 300) / "out", overwrite=False)


def test_missing_parent_folders_are_created(tmp_path: Path) -> None:
    with atomic_directory(tmp_path / "a" / "b" / "out", overwrite=False) as staging:
        (staging / "f").write_text("x")
    assert (tmp_path / "a" / "b" / "out" / "f").exists()


def test_save_pruned_failing_midway_leaves_no_folder_and_no_staging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model("llama")
    report = prune_model(
        model, RandomScorer().score_model(model), uniform_keep(ffn_widths(model.config), 0.5)
    )
    real_save = type(model).save_pretrained

    def save_then_crash(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)  # weights are on disk when the crash comes
        assert any(Path(folder).iterdir())
        raise SaveFailed("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", save_then_crash)
    with pytest.raises(SaveFailed):
        save_pruned(model, tiny_tokenizer(), tmp_path / "out", report)
    assert list(tmp_path.iterdir()) == []


# ----- the folder of a run with several amounts ----------------------------------------------


def test_a_container_may_exist_when_it_holds_only_the_runs_subfolders(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "ratio-0.20").mkdir(parents=True)
    (out / ".ratio-0.40.partial-abcd1234").mkdir()  # a killed run's staging, cleaned later
    assert check_output_container(out, False, ["ratio-0.20", "ratio-0.40"]) == out


def test_a_container_holding_other_files_is_refused_without_overwrite(tmp_path: Path) -> None:
    out = _users_folder(tmp_path / "out")
    with pytest.raises(PruneNetError, match=r"holds other things .* \(thesis.tex\)"):
        check_output_container(out, False, ["ratio-0.20", "ratio-0.40"])
    assert check_output_container(out, True, ["ratio-0.20", "ratio-0.40"]) == out
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_a_container_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("a file")
    with pytest.raises(PruneNetError, match="is not a folder"):
        check_output_container(tmp_path / "out", True, ["ratio-0.20"])


def test_overwrite_into_the_current_folder_as_a_container_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PruneNetError, match="the current folder"):
        check_output_container(".", True, ["ratio-0.20"])
    with pytest.raises(PruneNetError, match="--out is empty"):
        check_output_container("", False, ["ratio-0.20"])


def test_holding_a_container_locks_it_and_never_replaces_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with hold_output(out, overwrite=True, subfolders=["ratio-0.20"]):
        assert (tmp_path / ".out.lock").is_file()
        with atomic_directory(out / "ratio-0.20", overwrite=True) as staging:
            (staging / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["ratio-0.20"]


# ----- one run per destination, nothing left behind ---------------------------------------------


def test_a_second_holder_of_the_same_destination_is_refused_while_the_first_holds_it(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_UNTIL_FLAG, str(out), str(tmp_path / "flag")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        refused = pytest.raises(PruneNetError, match=rf"Another prunenet run \(pid {holder.pid}\)")
        with refused, hold_output(out, overwrite=False):
            pass
    finally:
        (tmp_path / "flag").touch()
        holder.wait(timeout=60)
    assert holder.returncode == 0
    with hold_output(out, overwrite=False):  # free again once the holder is done
        pass


def test_released_lock_leaves_no_lock_file(tmp_path: Path) -> None:
    with hold_output(tmp_path / "out", overwrite=False):
        assert (tmp_path / ".out.lock").is_file()
    assert list(tmp_path.iterdir()) == []


def test_a_planted_lock_symlink_is_refused_and_its_target_left_untouched(tmp_path: Path) -> None:
    target = tmp_path / "thesis.tex"
    target.write_text("my thesis")
    (tmp_path / ".out.lock").symlink_to(target)
    refused = pytest.raises(PruneNetError, match=r"\.out\.lock is a symbolic link \(to .*thesis")
    with refused, hold_output(tmp_path / "out", overwrite=False):
        pass
    assert target.read_text() == "my thesis"
    assert (tmp_path / ".out.lock").is_symlink()


def test_a_planted_dangling_lock_symlink_creates_no_file(tmp_path: Path) -> None:
    (tmp_path / ".out.lock").symlink_to(tmp_path / "created-through-the-link")
    with pytest.raises(PruneNetError, match="symbolic link"), hold_output(tmp_path / "out", False):
        pass
    assert not (tmp_path / "created-through-the-link").exists()


def test_a_lock_path_hard_linked_to_another_file_is_refused_untouched(tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("12")  # even content that looks like a pid
    os.link(target, tmp_path / ".out.lock")
    with pytest.raises(PruneNetError, match="hard links"), hold_output(tmp_path / "out", False):
        pass
    assert target.read_text() == "12"


def test_a_lock_path_holding_other_content_is_refused_untouched(tmp_path: Path) -> None:
    planted = tmp_path / ".out.lock"
    planted.write_text("not a pid")
    refused = pytest.raises(PruneNetError, match="other than a process id")
    with refused, hold_output(tmp_path / "out", overwrite=False):
        pass
    assert planted.read_text() == "not a pid"


def test_the_lock_file_of_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / ".out.lock").write_text("999999\n")  # its holder is gone, so is its flock
    with hold_output(tmp_path / "out", overwrite=False):
        assert (tmp_path / ".out.lock").read_text() == f"{os.getpid()}\n"
    assert list(tmp_path.iterdir()) == []


def test_a_new_lock_file_is_private(tmp_path: Path) -> None:
    with hold_output(tmp_path / "out", overwrite=False):
        assert stat.S_IMODE((tmp_path / ".out.lock").stat().st_mode) == 0o600


def test_destination_that_appears_during_the_run_is_kept_and_the_run_fails(tmp_path: Path) -> None:
    out = tmp_path / "out"
    refused = pytest.raises(PruneNetError, match="appeared while this run was working")
    with refused, atomic_directory(out, overwrite=False) as staging:
        (staging / "new.txt").write_text("this run")
        out.mkdir()
        (out / "other.txt").write_text("someone else")
    assert sorted(p.name for p in out.iterdir()) == ["other.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_published_folder_has_the_mode_of_a_plain_mkdir(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out", overwrite=False) as staging:
            (staging / "f").write_text("x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_published_files_have_the_mode_of_a_plain_open(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out", overwrite=False) as staging:
            handle, name = tempfile.mkstemp(dir=staging)  # 0600, like a writer's temporary file
            os.close(handle)
            (staging / "sub").mkdir(mode=0o700)
            (staging / "sub" / "f").write_text("x")
            (staging / "sub" / "f").chmod(0o600)
    finally:
        os.umask(umask)
    out = tmp_path / "out"
    assert stat.S_IMODE((out / Path(name).name).stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "sub").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "sub" / "f").stat().st_mode) == 0o644


def test_saved_model_weights_are_readable_like_the_other_files(tmp_path: Path) -> None:
    model = tiny_model("llama")
    report = prune_model(
        model, RandomScorer().score_model(model), uniform_keep(ffn_widths(model.config), 0.5)
    )
    umask = os.umask(0o022)
    try:
        save_pruned(model, tiny_tokenizer(), tmp_path / "out", report)
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes["model.safetensors"] == 0o644
    assert set(modes.values()) == {0o644}


def test_stale_staging_folder_of_a_killed_run_is_removed_by_the_next_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    stale = tmp_path / ".out.partial-abcd1234"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    with atomic_directory(tmp_path / "out", overwrite=False) as staging:
        (staging / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert ".out.partial-abcd1234" in capsys.readouterr().err


def test_staging_folders_of_another_destination_are_left_alone(tmp_path: Path) -> None:
    other = tmp_path / ".out.partial-x.partial-abcd1234"  # belongs to destination "out.partial-x"
    other.mkdir()
    with atomic_directory(tmp_path / "out", overwrite=False):
        pass
    assert other.is_dir()


def test_a_stray_previous_folder_is_never_moved_into_an_absent_output(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    stray = tmp_path / ".out.previous-abcd1234"
    stray.mkdir()
    (stray / "junk.txt").write_text("not the model")
    with atomic_directory(tmp_path / "out", overwrite=False) as staging:
        (staging / "new.txt").write_text("this run")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new.txt"]
    assert (stray / "junk.txt").read_text() == "not the model"
    assert "never moved back" in capsys.readouterr().err


def test_a_failed_second_rename_of_the_fallback_puts_this_runs_backup_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(saving, "_renameat2", lambda source, target, flags: False)
    out = _existing_output(tmp_path)
    real_rename = Path.rename

    def staging_cannot_move(self, target):
        if ".partial-" in self.name:
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", staging_cannot_move)
    with pytest.raises(OSError), atomic_directory(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new run")
    assert (out / "old.txt").read_text() == "previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_without_rename_exchange_falls_back_to_two_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(saving, "_renameat2", lambda source, target, flags: False)
    out = _existing_output(tmp_path)
    with atomic_directory(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new run")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2 is Linux's")
def test_replace_swaps_old_and_new_in_one_rename_on_linux(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _existing_output(tmp_path)
    real_rename = Path.rename

    def no_plain_rename_of_out(self, target):
        assert Path(self) != out, "the old model was moved away instead of swapped"
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", no_plain_rename_of_out)
    with atomic_directory(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new run")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]


def test_unwritable_destination_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(PruneNetError, match="is a file, not a folder"):
        check_output_path(tmp_path / "file" / "out", overwrite=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_folder_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o555)
    with pytest.raises(PruneNetError, match="not writable"):
        check_output_path(parent / "out", overwrite=False)


def test_lock_file_that_cannot_be_created_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_only_filesystem(path, flags, mode=0o777):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(saving.os, "open", read_only_filesystem)
    refused = pytest.raises(PruneNetError, match="Read-only file system")
    with refused, hold_output(tmp_path / "out", overwrite=False):
        pass


def test_full_disk_while_writing_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    refused = pytest.raises(PruneNetError, match="No space left")
    with refused, atomic_directory(tmp_path / "out", overwrite=False):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_a_dangling_symlink_out_is_refused_up_front_naming_its_target(tmp_path: Path) -> None:
    (tmp_path / "out").symlink_to(tmp_path / "gone")
    for overwrite in (False, True):
        with pytest.raises(PruneNetError, match=r"symbolic link to .*gone, which does not exist"):
            check_output_path(tmp_path / "out", overwrite)
    assert not (tmp_path / "gone").exists()


def test_a_full_disk_message_gives_the_real_size_of_a_small_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(saving.shutil, "disk_usage", lambda path: usage._replace(free=10**6))
    with pytest.raises(PruneNetError) as refused:
        check_free_space(tmp_path / "out", 22_224)  # a tiny model's weights
    assert "needs about 22.2 kB" in str(refused.value)
    assert "67.1 MB with a safety margin, but only 1.0 MB are free" in str(refused.value)


def test_free_space_check_refuses_an_output_larger_than_the_disk(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(PruneNetError, match="free some space"):
        check_free_space(tmp_path / "out", free * 2)
    check_free_space(tmp_path / "out", 1)


# Holds `hold_output(argv[1])` until the file argv[2] exists; prints "holding" once it holds it.
_HOLD_UNTIL_FLAG = """
import sys, time
from pathlib import Path
from prunenet.io.saving import hold_output
with hold_output(sys.argv[1], overwrite=False):
    print("holding", flush=True)
    while not Path(sys.argv[2]).exists():
        time.sleep(0.02)
"""
