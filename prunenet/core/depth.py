"""Depth pruning: remove whole decoder layers (as ShortGPT and SLEB do), in place and reloadable.

Removing a layer is more than deleting a module. Every kept layer carries its position: the
attention modules' `layer_idx` selects the layer's slot in the KV cache, and the config holds
the layer count, the per-layer attention types (`layer_types`) and PruneNet's own per-layer FFN
widths (`per_layer_config`). `drop_layers` renumbers and slices all of them, so the model keeps
computing what the dense model computes with the dropped layers skipped, generation with a cache
works, and the saved folder reloads with plain `from_pretrained` (or `prunenet.load_pruned` when
the kept layers have different FFN widths).

Which layers to drop is not decided here; `prunenet.analysis.influence` scores them.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from torch import nn

from prunenet.core.arch import _config_owner, _get, adapter_for, decoder_layers
from prunenet.core.config_fields import ffn_widths, set_ffn_widths
from prunenet.errors import PruneNetError

# Architecture facts about per-layer state, read from transformers 5.24's modeling and
# configuration files for the 14 supported model types (kept here rather than in arch.py's
# Adapter rows because only depth pruning needs them).
#
# Config lists with one entry per layer. `layer_types` is Qwen2/3's and Gemma 2/3's attention
# type per layer (sliding or full); `mlp_layer_types` is the same idea for MLPs (no supported
# architecture sets it yet, but the config base class validates it against the layer count too).
PER_LAYER_LISTS = ("layer_types", "mlp_layer_types")
# Module attributes holding a layer's own position (in the kept layers' submodules). Every
# supported architecture stores it as `layer_idx` (on the attention module; Gemma 3 also on the
# decoder layer), and it indexes the KV cache, so a stale value breaks generation.
LAYER_INDEX_ATTRIBUTES = ("layer_idx",)
# Config flags under which what a layer computes depends on its position, not only on its
# weights, fixed when the module is built: GPT-2's `scale_attn_by_inverse_layer_idx` divides the
# attention scale by layer_idx + 1 in `__init__`. A moved layer would compute differently once
# reloaded, so such models are refused rather than silently changed.
POSITION_DEPENDENT_FLAGS = {"gpt2": ("scale_attn_by_inverse_layer_idx",)}
# Model attributes derived from `layer_types` when the model is built (Qwen2/3's
# `has_sliding_layers`), recomputed so the in-memory model matches a rebuilt one.
SLIDING_FLAG = "has_sliding_layers"


def drop_layers(model: nn.Module, drop: Sequence[int]) -> None:
    """Remove the decoder layers `drop` from `model` in place and update its config.

    The kept layers keep their weights and order; each is renumbered to its new position
    (`layer_idx`, for the KV cache), and the config's layer count, per-layer attention types,
    `max_window_layers` and `per_layer_config` overrides (FFN widths and any others) describe
    the kept layers only. Every check runs before anything changes: a refusal leaves the model
    untouched.

    :param model: a model of a supported architecture (`prunenet.core.arch`).
    :param drop: indices of the layers to remove (any order, each once, in 0..layers-1; at least
        one layer must stay). An empty sequence changes nothing.
    """
    adapter = adapter_for(model.config)
    layers = decoder_layers(model)
    dropped = _checked_drop(drop, len(layers))
    if not dropped:
        return
    kept = [index for index in range(len(layers)) if index not in dropped]
    owner, width_field = _config_owner(model.config, adapter.width_field)
    _check_position_independent(model.config, kept)
    widths = ffn_widths(model.config)
    # Renumbering is checked for every layer before the first one is changed.
    renumbering = [_index_holders(layers[old], old) for old in kept]

    *parent_path, list_name = adapter.layers.split(".")
    parent = _get(model, ".".join(parent_path)) if parent_path else model
    setattr(parent, list_name, nn.ModuleList([layers[old] for old in kept]))
    for new, holders in enumerate(renumbering):
        for module, attribute in holders:
            setattr(module, attribute, new)

    # Overrides are keyed by the old layer numbers: cleared here, written afresh below.
    overrides = _per_layer_overrides(owner)
    if overrides:
        owner.per_layer_config = None
    for field in PER_LAYER_LISTS:
        values = getattr(owner, field, None)
        if isinstance(values, (list, tuple)) and len(values) == len(layers):
            setattr(owner, field, [values[old] for old in kept])
    _update_max_window_layers(owner, kept)
    owner.num_hidden_layers = len(kept)
    # Without overrides the one global FFN width is still right (and is left as written, e.g.
    # GPT-2's n_inner=None).
    if overrides:
        _rewrite_overrides(model.config, owner, overrides, kept, widths, width_field)
    _refresh_sliding_flags(model, owner)


def layer_parameters(model: nn.Module, index: int) -> int:
    """Parameters decoder layer `index` holds (each counted once): what dropping it removes.

    :param model: a model of a supported architecture.
    :param index: the layer's position, in 0..layers-1.
    """
    layers = decoder_layers(model)
    _checked_drop([index], len(layers), allow_all=True)
    return sum(parameter.numel() for parameter in layers[index].parameters())


def _checked_drop(drop: Sequence[int], count: int, allow_all: bool = False) -> set[int]:
    indices = []
    for index in drop:
        if isinstance(index, bool) or not hasattr(index, "__index__"):
            raise PruneNetError(f"Layer index {index!r} is not a whole number.")
        indices.append(operator.index(index))  # numpy and 0-d torch integers too
    for index in indices:
        if not 0 <= index < count:
            raise PruneNetError(
                f"There is no layer {index}: the model has {count} decoder layers, numbered "
                f"0..{count - 1}."
            )
    dropped = set(indices)
    if len(dropped) != len(indices):
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        raise PruneNetError(f"Layers {repeated} are listed more than once; list each layer once.")
    if not allow_all and len(dropped) == count:
        raise PruneNetError(
            f"Cannot drop all {count} decoder layers; keep at least one (drop at most {count - 1})."
        )
    return dropped


def _check_position_independent(config, kept: list[int]) -> None:
    moved = [old for new, old in enumerate(kept) if new != old]
    flags = POSITION_DEPENDENT_FLAGS.get(config.model_type, ())
    active = [flag for flag in flags if getattr(config, flag, False)]
    if moved and active:
        raise PruneNetError(
            f"This {config.model_type} model sets {', '.join(active)}, which makes each layer's "
            f"attention depend on its position; layers {moved} would move and compute differently "
            "once reloaded. Drop only the last layers, or switch the flag off before training."
        )


def _per_layer_overrides(owner) -> dict[int, dict]:
    """The config's per-layer overrides by layer, as `save_pretrained` writes them."""
    if not getattr(owner, "is_heterogeneous", False):
        return {}
    written = owner.to_dict().get("per_layer_config") or {}
    return {int(layer): dict(values) for layer, values in written.items()}


def _rewrite_overrides(
    config, owner, overrides: dict[int, dict], kept: list[int], widths: list[int], width_field: str
) -> None:
    """Write the kept layers' per-layer overrides under their new numbers."""
    if {field for layer in overrides.values() for field in layer} <= {width_field}:
        # Only FFN widths vary (PruneNet's own schema): set_ffn_widths also moves the widest
        # kept layer's width into the global field when the widest layer was dropped.
        set_ffn_widths(config, [widths[old] for old in kept])
        return
    # Other per-layer settings (e.g. attention heads) move with their layers unchanged, so every
    # kept layer keeps exactly the values it had.
    moved = {new: overrides[old] for new, old in enumerate(kept) if old in overrides}
    owner.per_layer_config = moved or None


def _index_holders(layer: nn.Module, old: int) -> list[tuple[nn.Module, str]]:
    """The (module, attribute) pairs inside `layer` that hold its position `old`."""
    holders = []
    for name, module in layer.named_modules():
        for attribute in LAYER_INDEX_ATTRIBUTES:
            value = getattr(module, attribute, None)
            if value is None or isinstance(value, bool):
                continue  # OPT/Falcon/GPT-2 allow layer_idx=None (no cache slot)
            if value != old:
                # Numbering we do not understand (e.g. layers shared between positions):
                # renumbering it blindly could point two layers at one cache slot.
                raise PruneNetError(
                    f"Layer {old} has {name or 'itself'}.{attribute}={value!r}, not its position; "
                    "drop_layers cannot renumber this model."
                )
            holders.append((module, attribute))
    return holders


def _update_max_window_layers(owner, kept: list[int]) -> None:
    """Keep Qwen2/3's `max_window_layers` consistent with the sliced `layer_types`.

    It means "layers below this index use full attention, the rest the sliding window", and is
    only read to build `layer_types` when a config has none (saved configs always have them,
    so reloading never reads it). Counting the kept layers below the old boundary gives the
    boundary among the kept layers, so the two fields keep telling the same story.
    """
    boundary = getattr(owner, "max_window_layers", None)
    if isinstance(boundary, int) and not isinstance(boundary, bool):
        owner.max_window_layers = sum(1 for old in kept if old < boundary)


def _refresh_sliding_flags(model: nn.Module, owner) -> None:
    layer_types = getattr(owner, "layer_types", None)
    if layer_types is None:
        return
    for module in model.modules():
        if isinstance(getattr(module, SLIDING_FLAG, None), bool):
            setattr(module, SLIDING_FLAG, "sliding_attention" in layer_types)
