"""Atomic writes of model folders: a half-written model never appears at the output path."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prunenet.errors import PruneNetError


def check_output_path(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output unless the user said `--overwrite`; fail before any work."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise PruneNetError(
            f"Output path {out} already exists. Choose another --out or pass --overwrite."
        )
    if out.exists() and not out.is_dir():
        raise PruneNetError(f"Output path {out} exists and is not a folder; remove it first.")
    return out


@contextmanager
def atomic_directory(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a staging folder beside `out`; on success it replaces `out`, on error it vanishes.

    The staging folder is a sibling, so the final rename stays on one filesystem and is atomic.
    An existing `out` is moved aside first and deleted only after the new folder is in place.
    """
    out = check_output_path(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = None
    if out.exists():
        previous = out.with_name(f".{out.name}.previous-{staging.name.rsplit('-', 1)[-1]}")
        out.rename(previous)
    staging.rename(out)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
