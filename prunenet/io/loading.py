"""Load pruned folders whose layers have different FFN widths or attention-head counts.

Why a loader at all. A pruned model with per-layer widths is saved in transformers' own schema
for heterogeneous models: the width field (`intermediate_size`, `ffn_dim`, ...) holds the widest
layer and `per_layer_config` overrides the narrower layers
(prunenet.core.config_fields.set_ffn_widths).
transformers 5.23 reads and writes that schema in the config (HeterogeneousConfigMixin), but
only a few new architectures (Gemma4, Step3p7, dots3_note, ...) build their layers from
`config.per_layer_config[i]`; the MLPs of Llama, Qwen2, Gemma3, OPT, GPT-2, ... read the one
global field, and the generic layer-patching step that the mixin's docstring mentions
(`apply_heterogeneous_modeling`) is not shipped in 5.23. List-valued widths are not an option
either: only Gemma3n's config accepts a list, the others' strict configs reject it. So, in 5.23:

- plain `AutoModelForCausalLM.from_pretrained(DIR)` (without `trust_remote_code`) on such a
  folder raises `AmbiguousGlobalPerLayerAttributeError` while building the first MLP (loud,
  nothing loaded);
- forcing the global value (`allow_global_per_layer_attribute_access=True`) builds every layer
  at the widest width and the load stops with a size-mismatch error;
- `prunenet.load_pruned(DIR)` (and `prunenet.io.models.load_model`, which the CLI uses) builds the
  model at the widest width, narrows each layer's FFN modules to its recorded width through the
  architecture adapter (no per-architecture code here), then lets `from_pretrained` load the
  weights: exact logits, with every `from_pretrained` feature (dtype, sharding, tied weights).

Per-layer attention-head counts (`prunenet.core.heads.prune_heads`) are stored the same way
(`num_attention_heads` / `num_key_value_heads` overrides beside the width overrides), and no
supported attention module reads them per layer either, so `load_pruned` builds every layer with
the most KV groups and the most query heads per group of any layer, narrows each layer's heads
to its recorded counts through the adapter, and loads the weights the same way.

OPT, GPT-2, GPT-NeoX, Falcon and Phi with `qk_layernorm` size their heads from
hidden_size / num_attention_heads, so their count fields keep the built counts and the kept
counts sit in PruneNet's own fields (`prunenet.core.arch.counts_recorded_apart`). Their folders
need this narrowing even when every layer keeps the same heads: `load_pruned` builds them at
the original counts (the config's own fields) and narrows every layer.

Without PruneNet installed, these folders load with plain transformers through remote code that
PruneNet writes itself: `prunenet.io.saving.save_model_folder` puts `modeling_prunenet.py` (a
copy of prunenet/io/modeling_prunenet.py, torch and transformers only) into every non-uniform
folder, with an `auto_map` entry and a `prunenet_structure` block in config.json
(prunenet.io.remote_code records it from this module's own narrowing), so

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

builds the same transformers class with the same narrowed layers: identical logits. Running that
file is the user's explicit choice. `load_pruned` never runs it and needs no
`trust_remote_code`: it builds the model as above and drops the file's `auto_map` entry and
block from the returned config, so a plain `save_pretrained` of that model does not point at a
file it lacks (PruneNet's writer adds both again).

Folders whose layers all have the same width and head counts contain no `per_layer_config` (and
no modeling file) and reload with plain `from_pretrained`; `load_pruned` passes them straight
through. Once transformers builds these architectures from `per_layer_config` itself, the same
folders should load with plain `from_pretrained` unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.auto_factory import _get_model_class

from prunenet.core.arch import (
    ADAPTERS,
    adapter_for,
    counts_recorded_apart,
    decoder_config,
    decoder_layers,
)
from prunenet.core.config_fields import (
    RECORDED_PREFIX,
    built_head_counts,
    ffn_widths,
    head_shapes,
    set_ffn_widths,
)
from prunenet.core.heads import narrow_heads
from prunenet.core.surgery import cut_ffn, ffn_modules, ffn_weights
from prunenet.errors import PruneNetError
from prunenet.io import modeling_prunenet
from prunenet.io.trust import NO_REMOTE_CODE, SAFE_WEIGHTS, check_model_folder

# Arguments that only matter when reading config.json (the rest go to the model).
_CONFIG_ARGUMENTS = (
    "cache_dir",
    "gguf_file",
    "local_files_only",
    "revision",
    "subfolder",
    "token",
    "trust_remote_code",
)
# Arguments the non-uniform path sets itself; a caller's value would defeat its checks.
_RESERVED_ARGUMENTS = ("config", "output_loading_info", "ignore_mismatched_sizes")


def load_pruned(
    path: str | Path, model_class: type = AutoModelForCausalLM, **from_pretrained_kwargs: Any
) -> PreTrainedModel:
    """Load a model folder or hub id, including pruned ones with different widths per layer.

    :param path: a folder written by `save_pretrained` / `prunenet prune`, or a hub id.
    :param model_class: an Auto class (default `AutoModelForCausalLM`) or a concrete model class.
    :param from_pretrained_kwargs: passed to `from_pretrained` (`dtype=`, `device_map=`, ...).
        `config`, `output_loading_info` and `ignore_mismatched_sizes` are refused for
        non-uniform folders: the loader sets the config itself and never re-initialises weights.
        `trust_remote_code=True` and `use_safetensors=False` are refused: nothing PruneNet
        loads runs code (`prunenet.io.trust`).
    :return: the model, with a config whose per-layer widths and head counts match its modules
        (`save_model_folder` writes the same config.json again; plain `save_pretrained` writes
        it without the modeling file's `auto_map` entry and `prunenet_structure`).
    :raises PruneNetError: a local folder asks to run its own code or has only pickle weights.
    """
    check_model_folder(path)
    from_pretrained_kwargs = {**_safe_loading(from_pretrained_kwargs), **from_pretrained_kwargs}
    config_kwargs = {
        k: from_pretrained_kwargs[k] for k in _CONFIG_ARGUMENTS if k in from_pretrained_kwargs
    }
    config = AutoConfig.from_pretrained(str(path), **config_kwargs)
    recorded = recorded_structure(config)
    if recorded is None:
        return model_class.from_pretrained(str(path), **from_pretrained_kwargs)
    widths, head_counts = recorded
    reserved = sorted(set(_RESERVED_ARGUMENTS) & set(from_pretrained_kwargs))
    if reserved:
        raise PruneNetError(
            f"load_pruned sets {', '.join(reserved)} itself for models whose layers have "
            "different FFN widths or head counts; drop those arguments."
        )
    base_class = concrete_class(model_class, config)
    drop_remote_code(config.__dict__)  # this model is built without the file (see its docstring)
    make_homogeneous(config, homogeneous_values(config, widths, head_counts))
    model, info = _narrowing_subclass(base_class, widths, head_counts).from_pretrained(
        str(path), config=config, output_loading_info=True, **from_pretrained_kwargs
    )
    model.__class__ = base_class  # the subclass only existed to narrow layers at construction
    problems = {key: info.get(key) for key in ("missing_keys", "mismatched_keys") if info.get(key)}
    if problems:
        raise PruneNetError(
            f"{path} does not match the per-layer FFN widths or head counts in its config.json "
            f"({problems}); the weights would be partly re-initialised, so the model is not "
            "returned. Re-save the pruned model with prunenet."
        )
    return model


def narrow_to_widths(model: PreTrainedModel, widths: list[int]) -> None:
    """Cut every layer's FFN to its first `widths[i]` neurons and record the widths in the config.

    Used on a freshly built (untrained or meta-device) model, so which neurons are kept does not
    matter; the weights loaded afterwards are the pruned ones. Works for every adapter layout
    (Linear, GPT-2 Conv1D, Phi-3 fused gate/up) because it goes through `cut_ffn`.
    """
    adapter = adapter_for(model.config)
    layers = decoder_layers(model)
    if len(widths) != len(layers):
        raise PruneNetError(f"Got {len(widths)} FFN widths for a model with {len(layers)} layers.")
    for layer, width in zip(layers, widths, strict=True):
        current = ffn_weights(layer, adapter).width
        if width > current:
            raise PruneNetError(f"Cannot widen an FFN from {current} to {width} neurons.")
        if width < current:
            device = ffn_modules(layer, adapter)[1].weight.device
            cut_ffn(layer, adapter, torch.arange(width, device=device))
    set_ffn_widths(model.config, widths)


def recorded_structure(config) -> tuple[list[int], list[tuple[int, int]] | None] | None:
    """Per-layer FFN widths and, where the modeling code would not build them from the config
    (they differ between layers, or are recorded apart: `arch.counts_recorded_apart`),
    (query heads, KV heads); None for a folder plain `from_pretrained` loads (another
    architecture, or no per-layer differences).

    :param config: a model's config, as read from its folder.
    """
    if getattr(config, "model_type", None) not in ADAPTERS:
        return None
    widths = ffn_widths(config)
    head_counts = None
    if adapter_for(config).attention is not None:
        head_counts = [(shape.num_heads, shape.num_kv_heads) for shape in head_shapes(config)]
        if len(set(head_counts)) == 1 and head_counts == built_head_counts(config):
            head_counts = None
    if len(set(widths)) == 1 and head_counts is None:
        return None
    return widths, head_counts


def homogeneous_values(
    config, widths: list[int], head_counts: list[tuple[int, int]] | None
) -> dict[str, int]:
    """The decoder-config values every layer can be built with and then narrowed from: the
    widest FFN, and as many KV groups and query heads per group as any layer has (where the
    counts are recorded apart, the config's own count fields already hold the built counts,
    so only the FFN width is given).

    The query-head count (most groups x largest group) may be one the architecture's validator
    would not accept for a saved model: these values only build the model, and are never saved.

    :param config: the model's config (for its adapter).
    :param widths: every layer's FFN width (`recorded_structure`).
    :param head_counts: every layer's (query heads, KV heads), or None when all layers agree.
    :return: decoder-config field -> value.
    """
    adapter = adapter_for(config)
    values = {adapter.width_field.split(".")[-1]: max(widths)}
    if head_counts is None or counts_recorded_apart(config):
        return values
    attention = adapter.attention
    kv_heads = max(kv for _, kv in head_counts)
    per_group = max(heads // kv for heads, kv in head_counts)
    values[attention.heads_field] = kv_heads * per_group
    if attention.kv_heads == "field":
        values[attention.kv_heads_field] = kv_heads
    return values


def make_homogeneous(config, values: dict[str, int]) -> None:
    """Turn `config` into one with no per-layer overrides and the given decoder-config values
    (`homogeneous_values`), in place.

    The fields are set directly, not through `config_fields.set_ffn_widths` / `set_head_counts`,
    whose validators would check values that are only meant to build the model. PruneNet's
    own head-count fields (`arch.counts_recorded_apart`) go too: the model is built at the
    config's own counts, and narrowing records the kept counts again.

    :param config: the config to change.
    :param values: decoder-config field -> value.
    """
    owner = decoder_config(config)
    owner.per_layer_config = None  # every override is replaced by the build values below
    owner.__dict__.pop("allow_global_per_layer_attribute_access", None)
    for field in [name for name in owner.__dict__ if name.startswith(RECORDED_PREFIX)]:
        del owner.__dict__[field]
    for field, value in values.items():
        setattr(owner, field, value)


def drop_remote_code(entries: dict) -> dict:
    """Remove what PruneNet adds for loading without PruneNet (`prunenet.io.remote_code`): the
    `prunenet_structure` block and `auto_map` entries naming the modeling file, in place.

    :param entries: config.json's content, or a config's `__dict__` (its attributes).
    :return: `entries`.
    """
    entries.pop(modeling_prunenet.STRUCTURE_KEY, None)
    auto_map = entries.get("auto_map")
    if isinstance(auto_map, dict):
        prefix = f"{modeling_prunenet.__name__.rpartition('.')[2]}."
        for auto_class, reference in list(auto_map.items()):
            if isinstance(reference, str) and reference.startswith(prefix):
                del auto_map[auto_class]
        if not auto_map:
            del entries["auto_map"]
    return entries


def concrete_class(model_class: type, config) -> type:
    """The model class `model_class` stands for with this config (itself when concrete).

    :param model_class: an Auto class or a concrete model class.
    :param config: the model's config.
    """
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is None:  # already a concrete model class
        return model_class
    if type(config) not in mapping:
        raise PruneNetError(
            f"{model_class.__name__} has no model class for {type(config).__name__}; pass a "
            "concrete model class as model_class."
        )
    return _get_model_class(config, mapping)


def _safe_loading(from_pretrained_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The loading options that keep a load from running code (`prunenet.io.trust`), checked
    against the caller's: a GGUF file is read without pickle, so it needs no safetensors."""
    unsafe = [
        f"{key}={from_pretrained_kwargs[key]!r}"
        for key, safe in SAFE_WEIGHTS.items()
        if key in from_pretrained_kwargs and from_pretrained_kwargs[key] != safe
    ]
    if unsafe:
        raise PruneNetError(
            f"load_pruned never runs a model folder's code or unpickles its weights; drop "
            f"{', '.join(unsafe)}."
        )
    return NO_REMOTE_CODE if "gguf_file" in from_pretrained_kwargs else SAFE_WEIGHTS


def _narrowing_subclass(
    base_class: type, widths: list[int], head_counts: list[tuple[int, int]] | None
) -> type:
    """`base_class` whose constructor narrows each layer's FFN (and attention heads, when
    `head_counts` is given) before any weight is loaded.

    Subclassing (rather than loading into a full-width model and cutting afterwards) lets
    `from_pretrained` see the final shapes, so its own checks, dtype handling, sharded loading
    and weight tying all apply unchanged, and nothing is allocated at the full width: in
    `from_pretrained` the constructor runs on the meta device.
    """

    def __init__(self, config, *args, **kwargs) -> None:
        base_class.__init__(self, config, *args, **kwargs)
        narrow_to_widths(self, widths)
        if head_counts is not None:
            narrow_heads(self, head_counts)

    return type(
        base_class.__name__,
        (base_class,),
        {
            "__init__": __init__,
            "__module__": base_class.__module__,
            "__qualname__": base_class.__qualname__,
        },
    )
