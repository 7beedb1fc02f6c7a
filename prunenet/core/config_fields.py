"""The config's per-layer values: FFN widths and attention head counts, read and written so
that a reload builds the shapes a cut left.

Values that differ by layer are stored the way transformers 5 describes heterogeneous models:
the field holds the largest value and `per_layer_config` overrides the layers that differ
(`set_layer_values`, the one writer). Where the architecture's count fields must keep the built
counts (`prunenet.core.arch.counts_recorded_apart`), the kept counts go into PruneNet's own
fields, `RECORDED_PREFIX` + the field. Which fields hold what comes from the adapter row
(`prunenet.core.arch`); this module knows no architecture itself. Weights are cut by
`prunenet.core.surgery`, and callers record the new shapes here.
"""

from __future__ import annotations

from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers.integrations.heterogeneity.configuration_utils import (
    AmbiguousGlobalPerLayerAttributeError,
)

from prunenet.core.arch import (
    Adapter,
    Attention,
    HeadShape,
    _config_owner,
    _get,
    adapter_for,
    attention_adapter,
    counts_recorded_apart,
    decoder_config,
    decoder_layers,
    head_removal_blocker,
    implied_kv_heads,
    kv_heads_field,
)
from prunenet.errors import PruneNetError

# Where head counts are recorded when the architecture's own fields must keep the built counts
# (`counts_recorded_apart`): this prefix + the architecture's field name.
RECORDED_PREFIX = "prunenet_kept_"


def ffn_width(config) -> int:
    """d_ff when every layer has the same width; a clear error when layers differ."""
    widths = ffn_widths(config)
    if len(set(widths)) != 1:
        raise PruneNetError(
            f"This model's layers have different FFN widths ({widths}), so there is no single "
            "d_ff; read them per layer with prunenet.core.config_fields.ffn_widths(config)."
        )
    return widths[0]


def ffn_widths(config) -> list[int]:
    """d_ff of every layer, from the width field or its per-layer overrides.

    Layers of different widths are stored the way transformers 5 describes heterogeneous models:
    the width field holds the widest layer and `per_layer_config` overrides the others (see
    `set_ffn_widths`).
    """
    adapter = adapter_for(config)
    owner, field = _config_owner(config, adapter.width_field)
    if _has_per_layer_values(owner, field):
        layer_configs = [owner.per_layer_config[i] for i in range(owner.num_hidden_layers)]
    else:
        layer_configs = [owner] * owner.num_hidden_layers
    return [_width_in(layer_config, field, adapter) for layer_config in layer_configs]


def set_ffn_width(config, width: int) -> None:
    """Record one new FFN width for every layer so `from_pretrained` builds matching shapes."""
    owner, _ = _config_owner(config, adapter_for(config).width_field)
    set_ffn_widths(config, [width] * owner.num_hidden_layers)


def set_ffn_widths(config, widths: list[int]) -> None:
    """Record each layer's FFN width in the config.

    Equal widths go in the architecture's width field, which every transformers version reads.
    Different widths use transformers' own schema for heterogeneous models: the width field
    holds the widest layer and `per_layer_config` (`{layer: {field: width}}`) the narrower ones.
    That keeps the saved config.json standard and self-describing, and makes plain
    `from_pretrained` fail loudly (no layer is silently built at the wrong width); in
    transformers 5.23 the Llama/Qwen2/Gemma3/OPT modules do not yet read per-layer values, so
    `prunenet.load_pruned` builds those models (see prunenet/io/loading.py). Per-layer head counts
    already in the config are kept (`set_layer_values`).
    """
    field = adapter_for(config).width_field.split(".")[-1]
    set_layer_values(config, {field: widths})


def set_layer_values(config, values: dict[str, list[int]]) -> None:
    """Record per-layer values of decoder config fields (FFN width, head counts), merged with
    the per-layer values the config already holds for other fields.

    Each field's global value is its largest per-layer value, and `per_layer_config`
    (`{layer: {field: value}}`) overrides the layers that differ; equal values leave no
    override, and a config with no override at all is an ordinary homogeneous config.

    Some configs' own validators (Llama, Gemma 2/3: `hidden_size % num_attention_heads`) read a
    per-layer field globally, which transformers refuses on a heterogeneous config, so such a
    config could be neither saved nor reloaded. Only then is the config's
    `allow_global_per_layer_attribute_access` switched on (and saved with it): the validator
    then checks the largest value, and plain `from_pretrained` still fails loudly, at the first
    weight whose size differs from the global one.

    :param config: a supported model's config (a multimodal one's decoder config is written).
    :param values: field name (in the decoder config) -> one value per decoder layer.
    :raises PruneNetError: a list of the wrong length, or values the config's validators reject.
    """
    owner = decoder_config(config)
    count = owner.num_hidden_layers
    for name, layer_values_of_field in values.items():
        if len(layer_values_of_field) != count:
            raise PruneNetError(
                f"Got {len(layer_values_of_field)} values of {name!r} for a model with {count} "
                "layers."
            )
    per_layer = {name: [int(v) for v in vals] for name, vals in values.items()}
    skips: list[list[str]] = [[] for _ in range(count)]
    if getattr(owner, "is_heterogeneous", False):
        # The overrides are rewritten below, relative to the new globals: read every layer's
        # resolved value of the other per-layer fields first, so none is lost.
        layer_configs = [owner.per_layer_config[i] for i in range(count)]
        for name in sorted(set(owner.per_layer_attributes) - set(per_layer)):
            per_layer[name] = [getattr(layer_config, name) for layer_config in layer_configs]
        skips = [list(getattr(layer_config, "skip", None) or []) for layer_config in layer_configs]
        owner.per_layer_config = None
    for name in values:
        setattr(owner, name, max(per_layer[name]))
    overrides: dict[int, dict] = {}
    for name, layer_values_of_field in per_layer.items():
        global_value = getattr(owner, name)
        for index, value in enumerate(layer_values_of_field):
            if value != global_value:
                overrides.setdefault(index, {})[name] = value
    for index, skip in enumerate(skips):
        if skip:
            overrides.setdefault(index, {})["skip"] = skip
    owner.__dict__.pop("allow_global_per_layer_attribute_access", None)
    if overrides:
        if not isinstance(getattr(type(owner), "per_layer_config", None), property):
            raise PruneNetError(
                f"Layers with different {sorted(values)} need a transformers version with "
                "per-layer configs (`per_layer_config`, as in 5.23); upgrade transformers or "
                "use the same value for all layers."
            )
        owner.per_layer_config = overrides
    _validate(owner)


def _validate(owner) -> None:
    validate = getattr(owner, "validate", None)
    if validate is None:
        return
    try:
        try:
            validate()
        except AmbiguousGlobalPerLayerAttributeError:
            owner.allow_global_per_layer_attribute_access = True  # see set_layer_values
            validate()
    except (StrictDataclassError, ValueError, TypeError) as error:
        raise PruneNetError(
            f"transformers' {type(owner).__name__} rejects these per-layer values: {error}"
        ) from error


def head_shapes(config) -> list[HeadShape]:
    """Every decoder layer's `HeadShape`, from the global fields or their per-layer overrides
    (and, where counts are recorded apart, from PruneNet's own count fields).

    :param config: a supported model's config.
    """
    attention = attention_adapter(config)
    owner = decoder_config(config)
    apart = counts_recorded_apart(config)
    shapes = []
    for layer_config in _layer_configs(owner):
        built = _built_counts(layer_config, attention)
        head_dim = None
        if attention.head_dim_field is not None:
            head_dim = getattr(layer_config, attention.head_dim_field, None)
        if head_dim is None:  # what the modeling code falls back on
            head_dim = layer_config.hidden_size // built[0]
        heads, kv = built
        if apart:
            recorded_heads, recorded_kv = _recorded_fields(layer_config, attention)
            heads = int(getattr(layer_config, recorded_heads, heads))
            kv = _kv_heads(layer_config, attention, heads, recorded_kv)
        shapes.append(HeadShape(heads, kv, int(head_dim)))
    return shapes


def built_head_counts(config) -> list[tuple[int, int]]:
    """Per decoder layer, the (query heads, KV heads) the modeling code builds from this config:
    the kept counts, except where they are recorded apart (`counts_recorded_apart`).

    :param config: a supported model's config.
    """
    attention = attention_adapter(config)
    return [_built_counts(c, attention) for c in _layer_configs(decoder_config(config))]


def set_head_counts(config, counts: list[tuple[int, int]]) -> None:
    """Record each layer's (query heads, KV heads) in the config, and the head size explicitly.

    The head size is written first because several architectures derive it from
    hidden_size / num_attention_heads when the field is unset: with fewer heads the reloaded
    model would otherwise be built with bigger heads. Equal counts in every layer go in the
    global fields (plain `from_pretrained` reloads them); different counts are per-layer
    overrides (`set_layer_values`; `prunenet.load_pruned` reloads them). Where the head size
    cannot be written (`counts_recorded_apart`), the architecture's fields are left alone and
    the counts go into PruneNet's own fields instead, the same way (global, or per layer);
    counts equal to the built ones remove those fields again.

    :param config: a supported model's config, describing the layers before the cut.
    :param counts: per decoder layer, (num_heads, num_kv_heads) after the cut.
    :raises PruneNetError: for an architecture whose heads cannot be removed, or counts its
        config rejects.
    """
    blocker = head_removal_blocker(config)
    if blocker is not None:
        raise PruneNetError(f"Cannot record removed attention heads for {blocker}.")
    attention = attention_adapter(config)
    owner = decoder_config(config)
    head_dims = {shape.head_dim for shape in head_shapes(config)}
    if len(head_dims) != 1:
        raise PruneNetError(f"Layers have different head sizes {sorted(head_dims)}.")
    apart = counts_recorded_apart(config)
    heads_field, kv_field = attention.heads_field, kv_heads_field(owner, attention)
    if apart:
        heads_field, kv_field = _recorded_fields(owner, attention)
    else:
        setattr(owner, attention.head_dim_field, head_dims.pop())
    values = {heads_field: [int(heads) for heads, _ in counts]}
    if kv_field is not None:
        values[kv_field] = [int(kv) for _, kv in counts]
    else:
        implied = [implied_kv_heads(owner, attention, int(heads)) for heads, _ in counts]
        if [int(kv) for _, kv in counts] != [kv for kv, _ in implied]:
            raise PruneNetError(
                f"{config.model_type} (as configured) has {implied[0][1]}; "
                f"it cannot keep {counts} (query heads, KV heads)."
            )
    set_layer_values(config, values)
    if apart and [tuple(c) for c in counts] == built_head_counts(config):
        for field in values:  # nothing removed: the architecture's own fields say it all
            owner.__dict__.pop(field, None)


def bind_layer_configs(model: nn.Module) -> None:
    """Give each attention module its own layer's config where the forward reads head counts
    from the config (`Attention.reads_counts_at_runtime`, Phi-3); elsewhere do nothing.

    A heterogeneous config refuses global reads of per-layer fields, and the global value would
    be wrong for narrower layers anyway; transformers' `per_layer_config[i]` is that layer's
    resolved config. A homogeneous config is shared again by every module.

    :param model: a model of a supported architecture.
    """
    attention = adapter_for(model.config).attention
    if attention is None or not attention.reads_counts_at_runtime:
        return
    owner = decoder_config(model.config)
    heterogeneous = getattr(owner, "is_heterogeneous", False)
    for index, layer in enumerate(decoder_layers(model)):
        module = _get(layer, attention.module)
        module.config = owner.per_layer_config[index] if heterogeneous else owner


def _built_counts(layer_config, attention: Attention) -> tuple[int, int]:
    """(query heads, KV heads) the modeling code builds from one layer's config."""
    heads = int(getattr(layer_config, attention.heads_field))
    return heads, _kv_heads(layer_config, attention, heads, kv_heads_field(layer_config, attention))


def _recorded_fields(layer_config, attention: Attention) -> tuple[str, str | None]:
    """PruneNet's own fields for the kept (query, KV) counts (`counts_recorded_apart`)."""
    kv_field = kv_heads_field(layer_config, attention)
    return (
        RECORDED_PREFIX + attention.heads_field,
        None if kv_field is None else RECORDED_PREFIX + kv_field,
    )


def _kv_heads(layer_config, attention: Attention, heads: int, kv_field: str | None) -> int:
    """KV heads of a layer with `heads` query heads: from `kv_field` (falling back on the
    architecture's field when a recorded one is unset), else as the layout implies."""
    if kv_field is not None:
        kv = getattr(layer_config, kv_field, None)
        if kv is None and kv_field.startswith(RECORDED_PREFIX):
            kv = getattr(layer_config, kv_field.removeprefix(RECORDED_PREFIX), None)
        return heads if kv is None else int(kv)
    return implied_kv_heads(layer_config, attention, heads)[0]


def _layer_configs(owner) -> list:
    if getattr(owner, "is_heterogeneous", False):
        return [owner.per_layer_config[i] for i in range(owner.num_hidden_layers)]
    return [owner] * owner.num_hidden_layers


def _has_per_layer_values(owner, field: str) -> bool:
    return bool(getattr(owner, "is_heterogeneous", False)) and field in owner.per_layer_attributes


def _width_in(config, field: str, adapter: Adapter) -> int:
    width = getattr(config, field, None)
    if width is None and adapter.default_width is not None:
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        width = adapter.default_width * hidden
    return int(width)
