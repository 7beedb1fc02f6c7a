"""Output folders that are complete or absent, written by one run at a time.

Why this module is long (over 400 lines): the lock, the staging folder, the atomic rename and
the clean-up after a killed run are one protocol; each step relies on what the others did.

What a user can rely on at `--out`:

- **One run per destination.** A run holds an exclusive lock (`flock` on `.NAME.lock` beside
  `out`) from its first check to its last rename; a second run to the same destination exits 2
  at once, saying which process holds it. The lock file is removed on release. It is created
  exclusively with mode 0600 and never through a symlink: a `.NAME.lock` that is a link, a
  hard link or a file holding anything but a pid is refused and left untouched.
- **Complete or absent.** Everything is written into a staging sibling `.NAME.partial-XXXXXXXX`
  and renamed into place at the end, on the same filesystem. Just before that rename the
  destination is checked again: a folder that appeared meanwhile is never silently replaced.
- **Replacing is atomic where the OS allows it.** With `--overwrite`, Linux's
  `renameat2(RENAME_EXCHANGE)` swaps the old and the new folder in one step, so at every instant
  either the old or the new model is at `out`. Elsewhere (or on filesystems without it) the
  documented fallback is two renames, old -> `.NAME.previous-XXXXXXXX` then new -> `out`; if
  the second fails, the run moves its own backup back. If the run is killed between them, the
  old model stays at `.NAME.previous-XXXXXXXX` and every later run to that destination says so;
  such a folder is never moved into `out` automatically (nothing proves it is the model that
  was there: a stray one would fill `out` with junk).
- **`--overwrite` replaces only what PruneNet wrote.** An existing `out` is replaced only if it
  is a real folder (not a link) holding `config.json` (a model folder; `pareto.json` for
  `prunenet pareto`) and is not the current folder, one above it, the home folder or `/`,
  however spelled; `--out ""` is refused. Anything else exits 2 before any work.
- **Several folders, one container.** A run that writes one subfolder per amount holds `out`
  as their container (`check_output_container`): it may exist, it is never replaced, and each
  subfolder is written as above (resuming such runs: `prunenet.io.resume`).
- **Names that fit.** An `out` whose name plus the longest name derived from it
  (`.NAME.previous-XXXXXXXX`, 19 bytes more) exceeds the filesystem's name limit is refused
  before any work, not when the finished output is renamed.
- **No leftovers.** SIGINT and SIGTERM (the CLI turns SIGTERM into KeyboardInterrupt) remove the
  staging folder. SIGKILL cannot be caught, so the next run to the same destination, holding the
  lock, removes the killed run's staging folders and says so.
- **Normal permissions.** `mkdtemp` creates 0700 folders and `save_pretrained` writes its
  weights through a 0600 temporary file; the published folder and every folder in it get the
  mode a plain `mkdir` would (0777 minus the umask), every file the mode a plain `open` would
  (0666 minus the umask; 0777 minus it for an executable one).

The checks an output path passes before any work are `prunenet.io.output_checks`'.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from prunenet.errors import PruneNetError
from prunenet.io.model_card import render_model_card, write_model_card
from prunenet.io.output_checks import (
    _SUFFIX,
    MODEL_MARKER,
    PARTIAL,
    PREVIOUS,
    _sibling_kind,
    check_output_container,
    check_output_path,
    check_replaceable,
    output_path,
)
from prunenet.io.remote_code import MODELING_FILE, write_remote_code

try:  # POSIX; without it (Windows) runs are not locked against each other
    import fcntl
except ImportError:  # pragma: no cover - not reachable on Linux/macOS
    fcntl = None

REPORT_FILE = "prunenet_report.json"
REQUEST_FILE = "prunenet_request.json"  # prunenet.request.REQUEST_FILE: the resolved request
# An `atomic_file` temporary this old is stale even if a process has its writer's pid.
STALE_PARTIAL_SECONDS = 3600
# Locks this process holds, by absolute destination, with the file that makes an existing
# destination replaceable: nested writers of the same run reuse them.
_HELD: dict[Path, tuple[int, str]] = {}


@contextmanager
def hold_output(
    out: str | Path,
    overwrite: bool,
    replaces: str | None = None,
    subfolders: Sequence[str] | None = None,
) -> Iterator[Path]:
    """Own the destination `out` for the duration: lock it, clear what killed runs left behind.

    Re-entrant within one process (the CLI holds it for a whole run, the writer again inside).

    :param out: the destination folder (`check_output_path`).
    :param overwrite: the user asked to replace an existing `out`.
    :param replaces: the file an existing `out` must hold to be replaced (default
        `config.json`, or what the outer holder of `out` said).
    :param subfolders: for a run that writes several folders into `out`: their names (`out`
        is then checked as their container, `check_output_container`).
    """
    held = _HELD.get(output_path(out).absolute())
    if held is not None:
        yield check_output_path(out, overwrite, replaces or held[1]).absolute()
        return
    replaces = replaces or MODEL_MARKER
    if subfolders is not None:
        out = check_output_container(out, overwrite, subfolders).absolute()
    else:
        out = check_output_path(out, overwrite, replaces).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    descriptor = _lock(out)
    _HELD[out] = (descriptor, replaces)
    try:
        for line in clean_stale_siblings(out):
            print(f"prunenet: {line}", file=sys.stderr)
        yield out
    finally:
        del _HELD[out]
        _unlock(out, descriptor)


@contextmanager
def atomic_directory(
    out: str | Path, overwrite: bool, replaces: str | None = None
) -> Iterator[Path]:
    """Yield a staging folder beside `out`; on success it becomes `out`, on error it vanishes.

    :param out: the destination folder.
    :param overwrite: allow replacing an existing `out` (atomically where the OS can) if it is
        a folder holding `replaces` (`check_replaceable`).
    :param replaces: the file that marks a replaceable folder (default `config.json`).
    """
    with hold_output(out, overwrite, replaces) as out:
        replaces = _HELD[out][1]
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.{PARTIAL}-", dir=out.parent))
        try:
            yield staging
            _set_default_mode(staging)
            _publish(staging, out, overwrite, replaces)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                raise PruneNetError(
                    f"Writing {out} failed: {error.strerror} ({error.filename or out}). Nothing "
                    "was written there; free space or choose another --out."
                ) from None
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


@contextmanager
def atomic_file(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    The one atomic writer for single files (policy checkpoints, cache entries): a reader sees
    the old file or the new one, never half of one, and a failed write leaves nothing behind.

    :param path: the destination file; its folder is created if needed.
    :param mode: permission bits for the new file (default: 0666 minus the umask, like `open`).
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid in the name lets a later reader remove what a killed writer left.
    prefix = f".{path.name}.{PARTIAL}-{os.getpid()}-"
    handle, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        with open(staging, "rb+") as written:
            os.fsync(written.fileno())  # a crash after the rename never leaves an empty file
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        staging.chmod(mode)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def remove_stale_partial_files(
    folder: Path, max_age_seconds: float = STALE_PARTIAL_SECONDS
) -> list[Path]:
    """Remove the temporaries of `atomic_file` writers in `folder` that are gone: the pid in
    the name is no running process (a SIGKILL mid-write), or the file is older than
    `max_age_seconds` (a writer's pid reused, or a name from before pids were recorded).

    A writer whose temporary is removed under it fails with an OSError, never with a wrong
    file; callers for whom the file is optional (the cache) go on without it.

    :param folder: the folder the files were written to.
    :param max_age_seconds: age past which any temporary is stale.
    :return: the removed paths.
    """
    removed = []
    now = time.time()
    pattern = re.compile(rf"\..+\.{PARTIAL}-(?:(\d+)-)?[a-z0-9_]{{{_SUFFIX}}}")
    for entry in os.scandir(folder):
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(match.group(1)) if match.group(1) else None
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue  # its writer finished meanwhile
        if age > max_age_seconds or (pid not in (None, os.getpid()) and not _running(pid)):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(Path(entry.path))
    return removed


def _running(pid: int) -> bool:
    """Whether a process `pid` exists (one of another user counts)."""
    if os.name != "posix":  # pragma: no cover - Windows' os.kill would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process, or a pid we cannot ask about
        return True
    return True


def clean_stale_siblings(out: Path) -> list[str]:
    """Remove staging folders of killed runs; report (never move) a previous model a killed
    replace moved aside.

    Only call while holding the destination's lock: then no live run owns these siblings.
    :return: one line per action, for the user.
    """
    actions = []
    for sibling in sorted(out.parent.iterdir()):
        kind = _sibling_kind(out, sibling.name)
        if kind == PARTIAL and sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
            actions.append(f"removed {sibling.name}, left in {out.parent} by a killed run")
        elif kind == PREVIOUS:
            # Whatever it holds, it is never moved into `out`: nothing proves this run's
            # predecessor made it, and a folder appearing at `out` would fail this run late.
            actions.append(
                f"left {sibling} as it is: the folder a killed --overwrite moved aside (the "
                f"model it replaced), or not PruneNet's. It is never moved back into {out}; "
                "rename it back or delete it yourself."
            )
    return actions


def _lock(out: Path) -> int:
    path = out.with_name(f".{out.name}.lock")
    while True:
        descriptor = _open_lock_file(path)
        if descriptor is None:
            continue  # removed between our two opens: start again
        if fcntl is None:  # pragma: no cover
            return descriptor
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "?"
            os.close(descriptor)
            raise PruneNetError(
                f"Another prunenet run (pid {holder}) is writing {out}. Wait for it to finish, "
                "or choose another --out."
            ) from None
        # The previous holder unlinks the file as it releases: if it did so between our open
        # and our flock, we locked an orphan inode and must start again on the new file.
        try:
            current = os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(descriptor).st_ino:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
            return descriptor
        os.close(descriptor)


def _open_lock_file(path: Path) -> int | None:
    """A descriptor of the lock file at `path`, never of anything a link points to.

    A new lock file is created exclusively (`O_EXCL`); an existing one (left by a killed run)
    is opened without following a symlink (`O_NOFOLLOW`) and used only if it is a plain file
    with one name holding at most a pid, so a planted link, hard link or other file is never
    truncated or written. None if the file vanished between the two opens.
    """
    flags = os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as error:
        raise PruneNetError(
            f"Cannot create the lock file {path} ({error.strerror}); choose a writable --out."
        ) from None
    try:
        descriptor = os.open(path, flags | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.ELOOP or os.path.islink(path):
            target = os.readlink(path) if os.path.islink(path) else "?"
            reason = f"is a symbolic link (to {target})"
        else:
            reason = f"cannot be opened ({error.strerror})"
        raise _foreign_lock(path, reason) from None
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1:
        os.close(descriptor)
        kind = "has other names (hard links)" if stat.S_ISREG(status.st_mode) else "is no file"
        raise _foreign_lock(path, kind)
    content = os.pread(descriptor, 64, 0)
    if not re.fullmatch(rb"\d{0,20}\n?", content):
        os.close(descriptor)
        raise _foreign_lock(path, "holds something other than a process id")
    return descriptor


def _foreign_lock(path: Path, reason: str) -> PruneNetError:
    return PruneNetError(
        f"The lock file {path} {reason}, so it is not a PruneNet lock; it was left untouched. "
        "Remove it if it is not needed, or choose another --out."
    )


def _unlock(out: Path, descriptor: int) -> None:
    # Unlink while still holding the lock, so a waiting run never locks a file about to vanish.
    out.with_name(f".{out.name}.lock").unlink(missing_ok=True)
    os.close(descriptor)


def _publish(staging: Path, out: Path, overwrite: bool, replaces: str) -> None:
    """Rename `staging` to `out`, re-checking the destination at the last moment."""
    if os.path.lexists(out):
        if not overwrite:
            raise PruneNetError(
                f"{out} appeared while this run was working (not by another prunenet run, "
                "which would hold the lock); it was left as it is and this run's output was "
                "discarded. Choose another --out or pass --overwrite."
            )
        check_replaceable(out, replaces)  # it may have changed since the run began
        if _renameat2(staging, out, _RENAME_EXCHANGE):
            shutil.rmtree(staging)  # now holds the previous model
            return
        previous = out.with_name(staging.name.replace(f".{PARTIAL}-", f".{PREVIOUS}-"))
        out.rename(previous)  # a kill right here leaves `previous`, reported by later runs
        try:
            staging.rename(out)
        except BaseException:
            previous.rename(out)  # this run's own backup: put the old model back
            raise
        shutil.rmtree(previous, ignore_errors=True)
        return
    if not _renameat2(staging, out, _RENAME_NOREPLACE):
        staging.rename(out)


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux `renameat2`; False where the C library or filesystem lacks it (use the fallback)."""
    function = getattr(_libc(), "renameat2", None)
    if function is None:
        return False
    result = function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    if code == errno.EEXIST:
        raise PruneNetError(
            f"{target} appeared while this run was working; it was left as it is and this "
            "run's output was discarded. Choose another --out or pass --overwrite."
        )
    raise OSError(code, os.strerror(code), str(target))


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:  # pragma: no cover - no C library to load (exotic platforms)
            _LIBC = False
    return _LIBC or None


_LIBC = None


def _set_default_mode(folder: Path) -> None:
    """Give `folder` and everything in it the modes a plain `mkdir` and `open` would: writers
    such as `save_pretrained` and `mkstemp` leave temporary files at 0600, which another user
    or a serving process could not read."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue  # chmod would change the link's target, which is not ours
            executable = os.stat(path).st_mode & 0o111
            os.chmod(path, (0o777 if name in folders or executable else 0o666) & ~umask)


def save_pruned(
    model, tokenizer, out: str | Path, report, overwrite: bool = False, record: dict | None = None
) -> Path:
    """Save model, tokenizer, report, request and card atomically: nothing appears at `out`
    unless all succeed.

    :param model: a `transformers` model (`save_pretrained`).
    :param tokenizer: its tokenizer, or None (then the folder has none).
    :param out: the destination folder.
    :param report: what the run did (`prunenet.core.compress.PruneReport`, any `to_dict()`).
    :param overwrite: replace an existing `out`.
    :param record: how the folder was made (`prunenet.request.request_record`, with the
        source's `base_model` and `license`), written as `prunenet_request.json` and rendered
        into the model card; None (a bare library call of the pipeline): the card says only
        what the report says.
    """
    out = Path(out).expanduser()
    with atomic_directory(out, overwrite) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_remote_code(staging)  # after the tokenizer: it drops any auto_map but our own
        write_records(staging, report.to_dict(), record)
    return out


def write_records(folder: Path, report: dict, record: dict | None) -> None:
    """The files that say what a pruned folder is: `prunenet_report.json`,
    `prunenet_request.json` (when there is a request) and the model card `README.md`. Called
    last, in the staging folder, so the card knows whether the folder needs its modeling file.

    :param folder: the staging folder (model files already written).
    :param report: the report's dict (`PruneReport.to_dict()`).
    :param record: how it was made (`save_pruned`), or None.
    """
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2))
    record = record or {}
    if record:
        public = {k: v for k, v in record.items() if k not in ("base_model", "license")}
        (folder / REQUEST_FILE).write_text(json.dumps(public, indent=2) + "\n")
    card = render_model_card(
        report,
        source=str(record.get("model") or "a model"),
        base_model=record.get("base_model"),
        license=record.get("license"),
        command=record.get("command"),
        request=record.get("request"),
        needs_remote_code=(folder / MODELING_FILE).is_file(),
    )
    write_model_card(folder, card)


def save_model_folder(
    model, tokenizer, out: str | Path, files: dict[str, str], overwrite: bool = False
) -> Path:
    """Save model, tokenizer and extra text files atomically (`atomic_directory`): the one
    writer of every PruneNet output folder.

    A model whose layers have different FFN widths or head counts also gets the modeling file
    that lets plain transformers load it with `trust_remote_code=True`
    (`prunenet.io.remote_code`); other folders are exactly what `save_pretrained` writes.

    :param model: a `transformers` model (`save_pretrained`).
    :param tokenizer: its tokenizer, or None (then the folder has none).
    :param out: the destination folder.
    :param files: file name -> text, written beside the model (reports).
    :param overwrite: replace an existing `out`.
    """
    out = Path(out).expanduser()
    with atomic_directory(out, overwrite) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name, text in files.items():
            (staging / name).write_text(text)
        write_remote_code(staging)  # last: it also drops any auto_map but PruneNet's own
    return out
