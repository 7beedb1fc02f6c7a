"""Nothing PruneNet reads runs code: what a model folder may ask for, and what is refused.

A model folder can make transformers run Python of its own in two ways:

- remote code: an `auto_map` entry in config.json or tokenizer_config.json names a class in a
  `.py` file beside the weights (or in another hub repo), which transformers imports when the
  caller passes `trust_remote_code=True`, or, when the caller passes nothing, after asking
  "Do you wish to run the custom code? [y/N]" on stdin (so `yes |` or a stray `y` runs it);
- pickle: `pytorch_model.bin` (and `.pt`, `.pth`, `.ckpt`, `.pkl`) are unpickled, and a pickle
  can call any function.

PruneNet does neither. Every transformers load passes `trust_remote_code=False`
(`NO_REMOTE_CODE`) and model loads also `use_safetensors=True` (`SAFE_WEIGHTS`), so transformers
never asks and never unpickles. Before any work, `check_model_folder` refuses (a
`PruneNetError`, exit 2) a local folder that asks for remote code or holds only pickle weights,
with a message saying why and what to do; a hub id is checked the same way by transformers
itself, and `remote_code_error` words its refusal the same.

PruneNet's own entry is accepted: per-layer-width outputs carry
`"auto_map": {"AutoModelForCausalLM": "modeling_prunenet.<Class>"}` so plain transformers can
load them with `trust_remote_code=True` (`prunenet.io.remote_code`). PruneNet itself never runs
that file (`load_pruned` builds the model from the config), so a planted copy stays inert.

Outputs never carry an input's remote code: `strip_remote_code` removes every `auto_map` (and
`custom_pipelines`) entry that is not PruneNet's own from every JSON file of a written folder,
and the writers copy no `.py` file of the input.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prunenet.errors import PruneNetError
from prunenet.io import modeling_prunenet

# Keyword arguments every transformers `from_pretrained` / `from_config` call passes.
NO_REMOTE_CODE = {"trust_remote_code": False}
# Model loads also read safetensors only (never pickle, whatever else the folder holds).
SAFE_WEIGHTS = {**NO_REMOTE_CODE, "use_safetensors": True}

# The files whose `auto_map` PruneNet's loads read (AutoConfig, AutoModel*, AutoTokenizer).
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")
# Keys through which a folder names code of its own (`custom_pipelines`: for `pipeline()`).
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")
# Weight formats that are unpickled when read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

OWN_AUTO_CLASS = "AutoModelForCausalLM"
_OWN_REFERENCE = re.compile(
    rf"{re.escape(modeling_prunenet.__name__.rpartition('.')[2])}\.[A-Za-z_][A-Za-z0-9_]*"
)


def check_model_folder(path: str | Path) -> None:
    """Refuse a local model folder that asks to run its own code or has only pickle weights.

    Reads a few small JSON files and the file names, so it runs before any expensive work.
    A path that is not a local folder (a hub id) is left to transformers, which refuses remote
    code and pickle weights too (`NO_REMOTE_CODE`, `SAFE_WEIGHTS`).

    :param path: the model folder (or a hub id: nothing is checked).
    :raises PruneNetError: the folder asks for remote code, or its weights are only pickles.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return
    refuse_remote_code(folder, str(path))
    refuse_pickle_weights(folder)


def refuse_remote_code(path: str | Path, source: str | None = None) -> None:
    """Refuse a local folder whose config.json or tokenizer_config.json has an `auto_map`
    entry that is not PruneNet's own (nothing is checked for a hub id).

    :param path: the model (or tokenizer) folder.
    :param source: how the user named it, for the message (default: `path`).
    :raises PruneNetError: the folder asks to run its own code (`remote_code_error`).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return
    requests = remote_code_requests(folder)
    if requests:
        raise remote_code_error(source or str(path), requests)


def remote_code_requests(folder: str | Path) -> list[str]:
    """Every `auto_map` entry of the folder's config files that is not PruneNet's own, as
    `file: auto_map class -> reference` lines (empty when there is none).

    (`custom_pipelines` names code only `pipeline()` runs, which PruneNet never calls; outputs
    drop it anyway, `strip_remote_code`.)

    :param folder: a local model folder.
    """
    found = []
    for name in REMOTE_CODE_FILES:
        entries = _json_object(Path(folder) / name)
        if "auto_map" not in entries:
            continue
        foreign = _foreign_entries("auto_map", entries["auto_map"])
        if isinstance(foreign, dict):
            found += [f"{name}: auto_map {cls} -> {ref}" for cls, ref in foreign.items()]
        elif foreign is not None:
            found.append(f"{name}: auto_map {foreign}")
    return found


def remote_code_error(source: str, requests: list[str] | None = None) -> PruneNetError:
    """The refusal of a model that asks to run its own Python code.

    :param source: the folder or hub id, as the user gave it.
    :param requests: what it asks for (`remote_code_requests`), or None when transformers
        found it (a hub id).
    """
    details = f" ({'; '.join(requests)})" if requests else ""
    return PruneNetError(
        f"{source} asks to run its own Python code{details}. PruneNet never runs code from a "
        "model folder, so it does not load this one. Use a model whose architecture "
        "transformers supports natively; if this one is such a model, remove the auto_map "
        "entry (and the tokenizer_class it names) from its config files."
    )


def is_remote_code_error(error: BaseException) -> bool:
    """Whether transformers refused to load because the model needs `trust_remote_code=True`."""
    return isinstance(error, ValueError) and "trust_remote_code=True" in str(error)


def refuse_pickle_weights(folder: str | Path) -> None:
    """Refuse a folder whose weights are pickle files only (`pytorch_model.bin`, ...).

    A folder that also has safetensors weights is fine: only those are read (`SAFE_WEIGHTS`).

    :param folder: a local model folder.
    :raises PruneNetError: no `.safetensors` file, and at least one pickle weight file.
    """
    names = [path.name for path in Path(folder).iterdir() if path.is_file()]
    if any(name.endswith(".safetensors") for name in names):
        return
    pickles = sorted(name for name in names if name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise PruneNetError(
            f"{folder} has only pickle weights ({', '.join(pickles)}) and no safetensors. "
            "Unpickling can run any code, so PruneNet never unpickles. Convert the folder to "
            "safetensors with a tool you trust (for example, in an environment you can throw "
            "away: from_pretrained, then save_pretrained), or download its safetensors version."
        )


def strip_remote_code(folder: str | Path) -> list[str]:
    """Remove every remote-code entry that is not PruneNet's own from the JSON files of a
    written folder (config.json, tokenizer_config.json, and whatever else was copied), in place.

    :param folder: a folder PruneNet is writing (its staging folder).
    :return: the names of the files that changed.
    """
    changed = []
    for path in sorted(Path(folder).glob("*.json")):
        entries = _json_object(path)
        kept = {key: _own_entries(key, entries[key]) for key in REMOTE_CODE_KEYS if key in entries}
        if all(entries[key] == own for key, own in kept.items()):
            continue  # nothing foreign: the file stays byte for byte as it was written
        for key, own in kept.items():
            if own:
                entries[key] = own
            else:
                del entries[key]
        # The format transformers writes its config files in.
        path.write_text(json.dumps(entries, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        changed.append(path.name)
    return changed


def _own_entries(key: str, value: object) -> dict:
    """The part of an `auto_map` that is PruneNet's own modeling-file entry (empty if none)."""
    if key != "auto_map" or not isinstance(value, dict):
        return {}
    reference = value.get(OWN_AUTO_CLASS)
    if isinstance(reference, str) and _OWN_REFERENCE.fullmatch(reference):
        return {OWN_AUTO_CLASS: reference}
    return {}


def _foreign_entries(key: str, value: object) -> dict | object | None:
    """What an entry asks for beyond PruneNet's own: a dict of the foreign `auto_map`
    entries, the whole value when it is not a dict (a legacy list), or None when nothing."""
    if not isinstance(value, dict):
        return value if value else None
    own = _own_entries(key, value)
    return {cls: ref for cls, ref in value.items() if cls not in own} or None


def _json_object(path: Path) -> dict:
    """A JSON file's object, or {} when it is absent or not an object: a broken file is
    reported by the load that reads it, with its own message."""
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}
