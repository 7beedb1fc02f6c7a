"""Build a PruneNet model whose layers have different FFN widths or head counts, without PruneNet.

PruneNet copies this file, unchanged, into every output folder whose layers differ, and points
config.json's `auto_map` at it, so plain transformers can load the folder:

    AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)

It imports only torch and transformers and knows no architecture. The model class is the
transformers class that `auto_map` names after the dot ("modeling_prunenet.LlamaForCausalLM"):
this module answers that name with a subclass whose constructor does what config.json's
`prunenet_structure` block says, and nothing else:

- `config` and `build`: the decoder config to change (a dotted path from the model's config, ""
  for the config itself) and the values every layer is first built with (the widest FFN, the
  most heads), with that config's `per_layer_config` set aside while the layers are built;
- `tensors`: parameter path -> shape; each listed parameter is then cut to its shape (its first
  rows and columns: the saved weights replace the values right after);
- `attributes`: module path + "." + name -> the integer the module must hold after the cut
  (`out_features`, a cached head count, ...);
- `layer_configs`: module path -> layer index, for modules that read their layer's values
  from their config at run time; they get `per_layer_config[index]`.

Inside `from_pretrained` the constructor runs on the meta device, so the cut allocates nothing
and the weights are loaded at their final shapes by transformers itself (dtype, device_map,
sharding and tied weights as for any model). The loaded model is an instance of the transformers
class in all but its constructor: `generate` works, and `save_pretrained` writes a folder that
loads the same way (transformers copies this file along).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn

STRUCTURE_KEY = "prunenet_structure"
FORMAT = 1

_CLASSES: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """The narrowing subclass of transformers' model class `name` (what `auto_map` names)."""
    base = None if name.startswith("_") else getattr(transformers, name, None)
    if not (isinstance(base, type) and issubclass(base, transformers.PreTrainedModel)):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _CLASSES:
        members = {
            "__init__": _narrowing_init(base),
            "from_pretrained": classmethod(_checked_from_pretrained(base)),
            "is_custom_code": classmethod(_uses_transformers_modeling),
            "__module__": __name__,
            "__qualname__": name,
        }
        _CLASSES[name] = type(name, (base,), members)
    return _CLASSES[name]


def _uses_transformers_modeling(cls) -> bool:
    # Every module is transformers' own (only the constructor cuts some), so transformers must
    # treat the class as its own where it asks: above all, it then renames checkpoint keys the
    # way it does for the base class (GPT-NeoX's `embed_out` -> `lm_head`), which it skips for
    # custom code. The class stays remote code for save_pretrained, which copies this file.
    return False


def _checked_from_pretrained(base: type):
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = base.from_pretrained.__func__(cls, *args, output_loading_info=True, **kwargs)
        # transformers re-initialises missing weights with a warning; in a pruned model that
        # would silently replace pruned layers, so it is an error here.
        if info.get("missing_keys"):
            raise ValueError(
                f"The checkpoint lacks {sorted(info['missing_keys'])}, which this model needs; "
                "they would be randomly initialised, so the model is not returned. Save the "
                "model again with PruneNet."
            )
        return (model, info) if wants_info else model

    return from_pretrained


def _narrowing_init(base: type):
    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        structure = _structure(config)
        owner = _config_at(config, structure["config"])
        set_aside = _build_homogeneously(owner, structure["build"])
        try:
            base.__init__(self, config, *args, **kwargs)
        finally:
            # The same config object is shared by the model's modules and saved by
            # save_pretrained, so it must describe the layers as they are after the cut.
            _restore(owner, set_aside)
        _cut(self, structure, owner)

    return __init__


def _structure(config) -> dict:
    structure = getattr(config, STRUCTURE_KEY, None)
    if not isinstance(structure, dict):
        raise ValueError(
            f"config.json has no {STRUCTURE_KEY!r} block, which this modeling file needs; load "
            "the folder with prunenet.load_pruned, or save the model again with PruneNet."
        )
    if structure.get("format") != FORMAT:
        raise ValueError(
            f"config.json's {STRUCTURE_KEY!r} has format {structure.get('format')!r}; this "
            f"modeling file reads format {FORMAT}. Save the model again with PruneNet."
        )
    return structure


def _config_at(config, dotted: str):
    for part in filter(None, dotted.split(".")):
        config = getattr(config, part)
    return config


def _build_homogeneously(owner, build: dict[str, int]) -> tuple[dict[str, Any], Any]:
    """Give `owner` the build values and no per-layer overrides; return what to put back."""
    saved = owner.to_dict()  # global values, readable even for per-layer fields
    stored_as = getattr(owner, "attribute_map", {})  # to_dict names aliased fields by their target
    global_values = {field: saved[stored_as.get(field, field)] for field in build}
    set_aside = (global_values, saved.get("per_layer_config"))
    owner.per_layer_config = None
    for field, value in build.items():
        setattr(owner, field, value)
    return set_aside


def _restore(owner, set_aside: tuple[dict[str, Any], Any]) -> None:
    global_values, per_layer = set_aside
    for field, value in global_values.items():
        setattr(owner, field, value)
    if per_layer:
        owner.per_layer_config = per_layer


@torch.no_grad()
def _cut(model: nn.Module, structure: dict, owner) -> None:
    for path, shape in structure["tensors"].items():
        module_path, _, name = path.rpartition(".")
        module = model.get_submodule(module_path)
        built = getattr(module, name)
        if built.dim() != len(shape) or any(
            size > length for size, length in zip(shape, built.shape, strict=True)
        ):
            raise ValueError(
                f"{path} was built with shape {tuple(built.shape)} and cannot be cut to "
                f"{tuple(shape)}; config.json's {STRUCTURE_KEY!r} does not match this model."
            )
        cut = built.data
        for dim, size in enumerate(shape):
            cut = cut.narrow(dim, 0, size)
        setattr(module, name, nn.Parameter(cut.contiguous(), requires_grad=built.requires_grad))
    for path, value in structure["attributes"].items():
        module_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(module_path), name, value)
    for path, index in structure["layer_configs"].items():
        model.get_submodule(path).config = owner.per_layer_config[index]
