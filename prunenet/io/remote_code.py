"""Let plain transformers load pruned folders whose layers have different widths or head counts.

transformers 5.24 cannot build these folders from their config (prunenet.io.loading says why),
so `prunenet.load_pruned` builds them. For users without PruneNet, the folder writer
(`prunenet.io.saving.save_model_folder`) also puts a small modeling file into such folders
(`modeling_prunenet.py`, a copy of `prunenet/io/modeling_prunenet.py`) and registers it in
config.json's `auto_map`, so that

    AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)

works with torch and transformers alone and gives the same logits. Running that file is the
user's explicit choice (`trust_remote_code=True`); `load_pruned` never runs it.

The file knows no architecture. What it must do is recorded here, in config.json's
`prunenet_structure` block, by building the model exactly as `load_pruned` does, on the meta
device: once at the homogeneous build values (the widest FFN, the most heads), then narrowed
through the architecture adapter (`narrow_to_widths`, `narrow_heads`). The block lists what the
narrowing changed: parameter shapes, integer module attributes (`out_features`, GPT-2's `nf`,
cached head counts) and modules given their layer's config (Phi-3's attention). So every layout
the adapters cut (Linear, GPT-2 Conv1D, Phi-3's fused gate/up and q/k/v) is covered by the same
few lines of the file, and a new adapter needs nothing here.

Folders whose layers all agree get neither the file nor the block: plain `from_pretrained` loads
them without remote code. The exception is heads removed from architectures that derive the
head size from the head count (OPT, GPT-2, GPT-NeoX, Falcon, Phi with qk_layernorm): no config
field says "fewer heads of the same size", so even a uniform cut gets the file, and the block
records the narrowed projections and the cached counts their forwards read (`num_heads`,
GPT-2's `split_size`, Falcon's `num_kv_heads`).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from prunenet.core.arch import adapter_for
from prunenet.core.heads import narrow_heads
from prunenet.errors import PruneNetError
from prunenet.io import modeling_prunenet
from prunenet.io.loading import (
    concrete_class,
    drop_remote_code,
    homogeneous_values,
    make_homogeneous,
    narrow_to_widths,
    recorded_structure,
)
from prunenet.io.trust import NO_REMOTE_CODE, strip_remote_code

MODELING_FILE = Path(modeling_prunenet.__file__).name
MODELING_MODULE = MODELING_FILE.removesuffix(".py")
STRUCTURE_KEY = modeling_prunenet.STRUCTURE_KEY
AUTO_CLASS = "AutoModelForCausalLM"
CONFIG_FILE = "config.json"


def write_remote_code(folder: str | Path) -> bool:
    """Give a saved model folder the modeling file, `auto_map` and `prunenet_structure` when its
    layers differ from what its config builds (`loading.recorded_structure`); remove them (if a
    previous save left them) when they do not.

    First every remote-code entry that is not PruneNet's own is removed from every JSON file of
    the folder (`trust.strip_remote_code`): an output never points at its input's code, so a
    user who loads it with `trust_remote_code=True` runs PruneNet's modeling file or nothing.
    So writers call this last, once every file is in the folder.

    :param folder: a folder `save_pretrained` has just written (config.json present).
    :return: whether the folder now carries the modeling file.
    """
    folder = Path(folder)
    strip_remote_code(folder)
    config_file = folder / CONFIG_FILE
    saved = json.loads(config_file.read_text())
    config = AutoConfig.from_pretrained(str(folder), **NO_REMOTE_CODE)
    structure = layer_structure(config)
    updated = drop_remote_code(copy.deepcopy(saved))
    if structure is None:
        (folder / MODELING_FILE).unlink(missing_ok=True)
    else:
        updated[STRUCTURE_KEY] = structure
        auto_map = updated.setdefault("auto_map", {})
        auto_map[AUTO_CLASS] = f"{MODELING_MODULE}.{_model_class(config).__name__}"
        shutil.copyfile(modeling_prunenet.__file__, folder / MODELING_FILE)
    if updated != saved:  # a folder nothing applies to stays byte for byte as transformers wrote it
        # The format transformers writes (PreTrainedConfig.to_json_string).
        config_file.write_text(json.dumps(updated, indent=2, sort_keys=True) + "\n")
    return structure is not None


def layer_structure(config) -> dict | None:
    """What `modeling_prunenet.py` must do to build this model: config.json's
    `prunenet_structure` block (the module docstring of modeling_prunenet describes it), or None
    when the config alone builds every layer (the same FFN width and head counts, not recorded
    apart).

    :param config: the saved model's config (per-layer values in `per_layer_config`).
    """
    recorded = recorded_structure(config)
    if recorded is None:
        return None
    widths, head_counts = recorded
    adapter = adapter_for(config)
    build_values = homogeneous_values(config, widths, head_counts)
    build_config = copy.deepcopy(config)
    make_homogeneous(build_config, build_values)
    with torch.device("meta"):  # shapes only: nothing is allocated, even for a 70B model
        model = _model_class(config)(build_config)
    built = _snapshot(model)
    narrow_to_widths(model, widths)
    if head_counts is not None:
        narrow_heads(model, head_counts)
    narrowed = _snapshot(model)
    return {
        "format": modeling_prunenet.FORMAT,
        "config": adapter.width_field.rpartition(".")[0],
        "build": build_values,
        "tensors": {
            path: list(shape)
            for path, shape in narrowed.shapes.items()
            if built.shapes.get(path) != shape
        },
        "attributes": {
            path: value
            for path, value in narrowed.integers.items()
            if built.integers.get(path) != value
        },
        "layer_configs": {
            path: _layer_index(path, adapter.layers)
            for path, module_config in narrowed.configs.items()
            if built.configs.get(path) is not module_config
        },
    }


class _Snapshot(NamedTuple):
    """What narrowing can change in a model: parameter shapes, integer module attributes, and
    the config object each module holds (the objects themselves, compared by identity)."""

    shapes: dict[str, tuple[int, ...]]
    integers: dict[str, int]
    configs: dict[str, object]


def _snapshot(model: torch.nn.Module) -> _Snapshot:
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    integers, configs = {}, {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for key, value in vars(module).items():
            if type(value) is int:  # not bool: flags are never cut
                integers[prefix + key] = value
        if "config" in vars(module):
            configs[name] = vars(module)["config"]
    return _Snapshot(shapes, integers, configs)


def _layer_index(path: str, layers: str) -> int:
    """The decoder layer a module with its own config sits in: config_fields.bind_layer_configs,
    the one code that gives a module another config, gives it its layer's per_layer_config[i]."""
    if not path.startswith(f"{layers}."):
        raise PruneNetError(
            f"Narrowing gave {path}, outside the decoder layers {layers}, a config of its own; "
            "prunenet.io.remote_code cannot record that. Please report it."
        )
    return int(path.removeprefix(f"{layers}.").split(".")[0])


def _model_class(config) -> type:
    """The transformers class the folder was saved from (`architectures`, as `save_pretrained`
    records it), or the causal-LM class transformers maps the config to."""
    for name in getattr(config, "architectures", None) or ():
        candidate = getattr(transformers, name, None)
        if isinstance(candidate, type) and issubclass(candidate, transformers.PreTrainedModel):
            return candidate
    return concrete_class(AutoModelForCausalLM, config)
