"""Checks on an output path, made before any expensive work: is it free (or replaceable), is its
name short enough, is its parent writable, is there disk space.

What `--overwrite` may replace is decided here (`check_replaceable`), and nowhere else: only a
real folder PruneNet (or `save_pretrained`) wrote, never the current folder, one above it, the
home folder or `/`. `prunenet.io.saving` writes the folders these checks admit.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from prunenet.errors import PruneNetError

# Characters `mkdtemp` adds to the staging and backup names the writer derives from `out`.
_SUFFIX = 8
PARTIAL = "partial"
PREVIOUS = "previous"
# Kept free beyond the output's own size: the filesystem's metadata, the tokenizer, reports.
FREE_SPACE_MARGIN = 64 * 2**20
MODEL_MARKER = "config.json"


def check_output_path(out: str | Path, overwrite: bool, replaces: str = MODEL_MARKER) -> Path:
    """Refuse an existing output unless the user said `--overwrite` and it is a folder
    `--overwrite` may replace (`check_replaceable`); fail before any work.

    Also refuses a destination whose parent cannot be created or written, so a read-only or
    mistyped location fails now and not after minutes of scoring.

    :param out: the destination folder.
    :param overwrite: the user asked to replace an existing `out`.
    :param replaces: the file an existing `out` must hold to be replaced (`config.json`: a
        model folder; a pareto folder holds `pareto.json`).
    """
    out = output_path(out)
    check_name_length(out)
    _refuse_dangling_link(out)
    if os.path.lexists(out) and not overwrite:
        raise PruneNetError(
            f"Output path {out} already exists. Choose another --out or pass --overwrite."
        )
    if overwrite:
        check_replaceable(out, replaces)
    check_writable_parent(out)
    return out


def check_output_container(out: str | Path, overwrite: bool, subfolders: Sequence[str]) -> Path:
    """Check `out` for a run that writes one subfolder per amount into it; fail before any work.

    `out` itself is never replaced, so it may exist: empty or holding only these subfolders
    (and their lock and staging names), a run to resume (`prunenet.io.resume`); with
    `--overwrite`, holding anything else too (it is left as it is). The subfolders are checked
    one by one (`prunenet.io.resume.folders_to_write`).

    :param out: the folder the subfolders go into.
    :param overwrite: the user asked to replace existing subfolders PruneNet wrote.
    :param subfolders: the names of the subfolders this run writes.
    """
    out = output_path(out)
    check_name_length(out)
    _refuse_dangling_link(out)
    if overwrite:
        protected = _protected_folder(out)
        if protected:
            raise PruneNetError(
                f"--out {out} is {protected}; --overwrite is never used on it (an unset shell "
                "variable in --out is the usual cause). Give the output folder's own path."
            )
    if os.path.lexists(out):
        if not out.is_dir():
            raise PruneNetError(
                f"Output path {out} exists and is not a folder; a run with several amounts "
                "writes one subfolder per amount into a folder. Choose another --out."
            )
        others = sorted(
            entry.name for entry in out.iterdir() if not _belongs_to(entry.name, subfolders)
        )
        if others and not overwrite:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise PruneNetError(
                f"Output path {out} already exists and holds other things than this run's "
                f"subfolders ({shown}). Choose another --out, or pass --overwrite to write "
                "into it anyway (what is there is left as it is)."
            )
    check_writable_parent(out / "subfolder")  # the folder itself, or its nearest ancestor
    return out


def _belongs_to(name: str, subfolders: Sequence[str]) -> bool:
    """Whether `name` in a run's `--out` is one of its subfolders or their lock or staging."""
    for sub in subfolders:
        if name in (sub, f".{sub}.lock") or _sibling_kind(Path(sub), name) is not None:
            return True
    return False


def _refuse_dangling_link(out: Path) -> None:
    if out.is_symlink() and not out.exists():
        raise PruneNetError(
            f"Output path {out} is a symbolic link to {os.readlink(out)}, which does not "
            "exist; PruneNet writes a real folder and never through a link. Remove the link "
            "or choose another --out."
        )


def output_path(out: str | Path) -> Path:
    """`out` as a path, refusing the empty string (which `Path` would read as the current
    folder: an unset shell variable in `--out "$DIR"`)."""
    if str(out) == "":
        raise PruneNetError(
            "--out is empty (an unset shell variable?); give the output folder's path."
        )
    return Path(out).expanduser()


def check_name_length(out: Path) -> None:
    """Refuse an `out` whose name, or a name the writer derives from it, the filesystem cannot
    hold (ENAMETOOLONG would otherwise come only when the finished output is renamed).

    The longest derived name is the fallback replace's `.NAME.previous-XXXXXXXX`; folders that
    do not exist yet are checked too.
    """
    absolute = Path(os.path.abspath(out))
    existing = absolute.parent
    while not os.path.exists(existing):  # (Path.exists raises on a name that is too long)
        existing = existing.parent
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):  # no pathconf (or no answer): the common limit
        limit = 255
    for part in absolute.relative_to(existing).parts[:-1]:
        if len(os.fsencode(part)) > limit:
            raise PruneNetError(
                f"Cannot create the folder {part[:40]}... in --out: its name is "
                f"{len(os.fsencode(part))} bytes, over this filesystem's limit of {limit}. "
                "Choose shorter names."
            )
    name = len(os.fsencode(absolute.name))
    derived = name + len(f"..{PREVIOUS}-") + _SUFFIX
    if derived > limit:
        raise PruneNetError(
            f"--out's name {absolute.name[:40]}... is {name} bytes; PruneNet also writes beside "
            f"it under names {derived - name} bytes longer (.NAME.{PREVIOUS}-XXXXXXXX), over "
            f"this filesystem's limit of {limit}. Choose a name of at most "
            f"{limit - (derived - name)} bytes."
        )


def check_replaceable(out: Path, replaces: str = MODEL_MARKER) -> None:
    """What `--overwrite` may replace: an absent `out`, or a real folder holding `replaces`
    that is not the current folder, one above it, the home folder or `/`. Everything else at
    `out` is the user's, and is refused with the reason.

    :param out: the destination.
    :param replaces: the file that marks a folder PruneNet (or `save_pretrained`) wrote.
    """
    protected = _protected_folder(out)
    if protected:
        raise PruneNetError(
            f"--out {out} is {protected}; --overwrite never replaces it (an unset shell "
            "variable in --out is the usual cause). Give the output folder's own path."
        )
    if not os.path.lexists(out):
        return
    if out.is_symlink():
        raise PruneNetError(
            f"Output path {out} is a symbolic link (to {os.readlink(out)}); --overwrite "
            "replaces only a real folder. Remove the link or choose another --out."
        )
    if not out.is_dir():
        raise PruneNetError(
            f"Output path {out} exists and is not a folder; --overwrite replaces only a folder "
            "PruneNet wrote. Remove it yourself or choose another --out."
        )
    if not (out / replaces).is_file():
        raise PruneNetError(
            f"Output path {out} is a folder without {replaces}, so not one PruneNet wrote; "
            "--overwrite never replaces other folders. Choose another --out."
        )


def _protected_folder(out: Path) -> str | None:
    """How to name `out` if it is a folder no `--overwrite` may replace, else None."""
    target = os.path.realpath(out)  # however it is spelled: `.`, `../here`, a link to it
    if target == os.path.realpath(os.sep):
        return "the root folder"
    if target == os.path.realpath(Path.home()):
        return "the home folder"
    try:
        here = os.path.realpath(os.getcwd())
    except FileNotFoundError:  # the current folder was deleted: nothing is above it
        return None
    if target == here:
        return "the current folder"
    if os.path.commonpath([target, here]) == target:
        return "a folder above the current one"
    return None


def check_writable_parent(path: str | Path) -> Path:
    """The nearest existing ancestor of `path` must be a folder this process can write to."""
    path = Path(path).expanduser().absolute()
    ancestor = path.parent
    while not os.path.exists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise PruneNetError(
            f"Cannot write {path}: {ancestor} is a file, not a folder. Choose another path."
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PruneNetError(
            f"Cannot write {path}: the folder {ancestor} is not writable by this user. Choose "
            "another path or fix the folder's permissions."
        )
    return ancestor


def check_free_space(out: str | Path, needed_bytes: int) -> None:
    """Refuse to start when the filesystem of `out` cannot hold `needed_bytes` (plus a margin)."""
    existing = check_writable_parent(out)
    free = shutil.disk_usage(existing).free
    required = int(needed_bytes * 1.02) + FREE_SPACE_MARGIN
    if free < required:
        # Sizes in a unit that shows them: a small model's output is far below 0.01 GB, and
        # the fixed margin is then most of what is missing.
        raise PruneNetError(
            f"The output needs about {format_size(needed_bytes)}, {format_size(required)} "
            f"with a safety margin, but only {format_size(free)} are free under {existing}; "
            "free some space or choose another --out."
        )


def format_size(size: int | float) -> str:
    """A byte count in the largest decimal unit that keeps it at 1 or more: `21.7 kB`."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{int(size)} bytes"


def _sibling_kind(out: Path, name: str) -> str | None:
    # mkdtemp's suffix is 8 characters of [a-z0-9_]; matching it exactly keeps the staging
    # folders of another destination (say `out.partial-x`) out of this one's cleanup.
    match = re.fullmatch(
        rf"\.{re.escape(out.name)}\.({PARTIAL}|{PREVIOUS})-[a-z0-9_]{{{_SUFFIX}}}", name
    )
    return match.group(1) if match else None
