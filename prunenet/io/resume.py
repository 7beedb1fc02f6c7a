"""Runs that write several folders under one `--out` are resumable.

A run with several amounts (`--ratio 0.2,0.4`, a `--remove-params` list, `--requests`) writes
one subfolder per amount, each atomically (`prunenet.io.saving.atomic_directory`): complete or
absent. If the run is interrupted, the subfolders finished before the interruption stay, and a
rerun of the same command skips every subfolder that is already complete for the same request
and writes only the others.

A subfolder counts as complete for a request when it is a real folder (not a link) holding
`config.json`, its weights (`model.safetensors`, or an index and every shard it names),
`prunenet_report.json`, and a `prunenet_request.json` that records the same model, the same
resolved request for that amount (every option but `threads`, which never changes the result)
and the same PruneNet version. Any other existing subfolder is refused before any work, unless
`--overwrite` is given and it is a folder PruneNet may replace (`check_replaceable`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from prunenet.errors import PruneNetError
from prunenet.io.output_checks import MODEL_MARKER, check_replaceable
from prunenet.io.saving import REPORT_FILE, REQUEST_FILE

SKIPPED = "skipped (already complete)"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Request fields that never change what is written, so a resumed run may differ in them.
_NOT_COMPARED = ("threads",)


def folders_to_write(
    folders: Sequence[Path], records: Sequence[dict], overwrite: bool
) -> list[int]:
    """Which of a run's folders still have to be written, refusing before any work what may
    not be replaced.

    :param folders: the run's output folders, one per amount.
    :param records: what each folder would record (`prunenet_request.json`), same order.
    :param overwrite: the user asked to replace existing folders PruneNet wrote.
    :return: the indices of the folders to write (the others are complete: skip them).
    """
    todo = []
    for index, (folder, record) in enumerate(zip(folders, records, strict=True)):
        if not folder.is_symlink() and not folder.exists():
            todo.append(index)
            continue
        difference = difference_from(folder, record)
        if difference is None:
            continue
        if not overwrite:
            raise PruneNetError(
                f"{folder} already exists and is not this request's finished output "
                f"({difference}). Pass --overwrite to replace it, or choose another --out."
            )
        check_replaceable(folder)
        todo.append(index)
    return todo


def difference_from(folder: Path, record: dict) -> str | None:
    """None if `folder` is a complete output of the request `record` describes, else what
    differs or is missing, in a few words.

    :param folder: an existing output folder.
    :param record: the record (`prunenet.request.request_record`) its run would write.
    """
    if folder.is_symlink() or not folder.is_dir():
        return "not a folder"
    missing = [name for name in (MODEL_MARKER, REPORT_FILE, REQUEST_FILE)
               if not (folder / name).is_file()]  # fmt: skip
    if missing:
        return f"no {', '.join(missing)}"
    if not _has_weights(folder):
        return "its weights are missing"
    stored = _read_json(folder / REQUEST_FILE)
    if not isinstance(stored, dict):
        return f"an unreadable {REQUEST_FILE}"
    if stored.get("model") != record.get("model"):
        return f"made from model {stored.get('model')!r}, not {record.get('model')!r}"
    version = (record.get("versions") or {}).get("prunenet")
    if (stored.get("versions") or {}).get("prunenet") != version:
        return f"made by another PruneNet version than {version}"
    options = _compared(stored.get("request"))
    wanted = _compared(record.get("request"))
    changed = sorted(key for key in options.keys() | wanted.keys()
                     if options.get(key) != wanted.get(key))  # fmt: skip
    if changed:
        shown = ", ".join(f"{key} {options.get(key)!r} there, {wanted.get(key)!r} now"
                          for key in changed[:3])  # fmt: skip
        return f"made by another request: {shown}"
    return None


def finished_line(folders: Sequence[Path], records: Sequence[dict]) -> str:
    """What an interrupted multi-folder run says: which folders are finished, which are not,
    and that rerunning resumes.

    :param folders: all the run's output folders.
    :param records: what each records (`folders_to_write`).
    """
    done = [str(f) for f, r in zip(folders, records, strict=True) if difference_from(f, r) is None]
    left = [str(f) for f, r in zip(folders, records, strict=True) if str(f) not in done]
    finished = ", ".join(done) if done else "none"
    return (
        f"finished before the interruption (complete, kept): {finished}; not written: "
        f"{', '.join(left) or 'none'}. Rerun the same command to resume: finished folders "
        "are skipped."
    )


def _has_weights(folder: Path) -> bool:
    if (folder / WEIGHTS_FILE).is_file():
        return True
    index = _read_json(folder / WEIGHTS_INDEX)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        return False
    shards = set(index["weight_map"].values())
    return bool(shards) and all(
        isinstance(name, str) and "/" not in name and (folder / name).is_file() for name in shards
    )


def _compared(request) -> dict:
    if not isinstance(request, dict):
        return {}
    # Through JSON, so tuples and lists (and ints and floats that JSON equates) compare equal.
    normal = json.loads(json.dumps(request, default=str))
    return {key: value for key, value in normal.items() if key not in _NOT_COMPARED}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
