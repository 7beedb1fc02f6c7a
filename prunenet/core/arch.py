"""Architecture adapters: the only place that knows where FFN and attention weights live.

Every supported `config.model_type` maps to one `Adapter` row in `ADAPTERS`. An adapter names
the decoder-layer list, the FFN input projections (whose rows are the FFN neurons), the output
projection (whose columns are the same neurons), the weight layout, and the config field that
holds the FFN width. Scorers see every FFN through the same `FFNWeights` view (rows = neurons),
and the compressor cuts every layout through `cut_ffn`, so no other module branches on the
architecture.

Attention heads are described the same way, by the adapter's `attention` row (`Attention`):
where q/k/v and the output projection live, how a fused projection orders its rows, and which
config fields hold the head counts and the head size. `qkv_row_heads` turns that into "which
head owns each row", and `cut_attention` / `head_weights` work from it for every layout, so
`prunenet.core.heads` and `prunenet.analysis.head_scores` never branch on the architecture.
Per-layer values (FFN widths, head counts) are written by one function, `set_layer_values`.

Where the modeling code sizes heads from the head count (OPT, GPT-2, GPT-NeoX and Falcon derive
head_dim = hidden_size / num_attention_heads; Phi with `qk_layernorm` sizes its q/k norms that
way), the architecture's count fields must keep the counts the layers are *built* with, or a
reload would build bigger heads. There the kept counts go into PruneNet's own fields
(`prunenet_kept_num_attention_heads`, ...: `RECORDED_PREFIX` + the field), per layer like any
other value, and the modules are narrowed after they are built (`prunenet.load_pruned`, or the
folder's `modeling_prunenet.py` with `trust_remote_code=True`): `counts_recorded_apart`.

Why this module is long (over 400 lines): it is the one place that knows architectures (the
design card's rule); the FFN and attention rows, and the few functions that read layouts from
them, would scatter those facts if split.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers.integrations.heterogeneity.configuration_utils import (
    AmbiguousGlobalPerLayerAttributeError,
)

from prunenet.errors import PruneNetError

Layout = Literal["linear", "conv1d", "fused_gate_up"]
BiasSupport = Literal["always", "if_flag", "switchable", "never"]
QKVLayout = Literal["separate", "fused", "grouped"]
KVHeads = Literal["field", "all", "falcon"]
Count = Literal["heads", "kv", "group", "width"]

# Where head counts are recorded when the architecture's own fields must keep the built counts
# (`counts_recorded_apart`): this prefix + the architecture's field name.
RECORDED_PREFIX = "prunenet_kept_"
# Attention-module attributes that cache a head count, and what each holds (`Count`): query
# heads, KV heads, query heads per KV head, or query heads x head_dim. Set after a cut where the
# module has them.
_COUNT_ATTRIBUTES = (("num_key_value_groups", "group"), ("num_key_value_heads", "kv"),
                     ("num_heads", "heads"))  # fmt: skip


@dataclass(frozen=True)
class Attention:
    """Where one architecture keeps its attention heads.

    Query head h belongs to KV group h // (heads / kv_heads), as transformers' `repeat_kv`
    expands them; the output projection's inputs are the heads' outputs, head after head
    (columns h * head_dim ... (h + 1) * head_dim - 1), in every supported layout.

    :param projections: dotted paths from a layer to the q, k and v projections (`separate`),
        or to the one fused projection (`fused`, `grouped`).
    :param output: dotted path from a layer to the output projection (o_proj / dense / c_proj).
    :param module: dotted path from a layer to the attention module, whose cached head counts
        (`num_key_value_groups`, ...) must follow a cut.
    :param layout: how the projections order their output rows: `separate` (three modules,
        head after head), `fused` (one module: all query heads, then all keys, then all values;
        Phi-3, GPT-2), `grouped` (one module, per KV group: its query heads, its key, its value;
        GPT-NeoX and Falcon, where multi-head attention is the case of one query per group).
    :param conv1d: the projections store weights in x out (GPT-2's Conv1D).
    :param kv_heads: where the KV head count comes from: `field` (`kv_heads_field`), `all`
        (multi-head attention: one KV head per query head), `falcon` (`num_kv_heads` with
        `new_decoder_architecture`, else one with `multi_query`, else one per query head).
    :param heads_field: config field with the number of query heads.
    :param kv_heads_field: config field with the number of KV heads.
    :param head_dim_field: config field the modeling code reads the head size from, or None
        when it always derives it as hidden_size / heads: then the count fields keep the built
        counts and the kept counts are recorded apart (`counts_recorded_apart`).
    :param derives_with: config flags that, when true, make the modeling code size something
        from hidden_size / heads even though `head_dim_field` exists (Phi's `qk_layernorm`):
        counts are then recorded apart too.
    :param count_attributes: attention-module attributes that cache a head count (`Count`
        says which); the forward reads them, so a cut updates those the module has.
    :param blocked_by: config flags that, when true, make head removal impossible (the reason
        is in `blocked_reason`).
    :param blocked_reason: why `blocked_by` blocks removal.
    :param reads_counts_at_runtime: the attention forward reads the head count from its
        config (Phi-3), so with per-layer counts each attention module gets its layer's config.
    """

    projections: tuple[str, ...]
    output: str
    module: str
    layout: QKVLayout = "separate"
    conv1d: bool = False
    kv_heads: KVHeads = "field"
    heads_field: str = "num_attention_heads"
    kv_heads_field: str = "num_key_value_heads"
    head_dim_field: str | None = "head_dim"
    derives_with: tuple[str, ...] = ()
    count_attributes: tuple[tuple[str, Count], ...] = _COUNT_ATTRIBUTES
    blocked_by: tuple[str, ...] = ()
    blocked_reason: str = ""
    reads_counts_at_runtime: bool = False


@dataclass(frozen=True)
class Adapter:
    """Where one architecture keeps its FFN.

    :param layers: dotted path from the model to the list of decoder layers.
    :param inputs: dotted paths from a layer to each FFN input projection (gate, up / fc1).
    :param output: dotted path from a layer to the FFN output projection (down / fc2).
    :param width_field: dotted path into the config of the FFN width (d_ff).
    :param layout: how weights are stored: `linear` (nn.Linear, out x in), `conv1d` (GPT-2's
        Conv1D, in x out), `fused_gate_up` (Phi-3: one Linear holding gate rows then up rows).
    :param default_width: d_ff when the config leaves the width field empty, as a multiple of
        the hidden size (GPT-2's `n_inner=None` means 4 x n_embd).
    :param learned_positions: positions come from a learned table (GPT-2, OPT), so no sequence
        may be longer than the table; rotary models extrapolate past their nominal maximum.
    :param output_bias: whether the output projection can carry a bias that plain
        `from_pretrained` reloads (a refit's intercept goes there): `always` (it has one),
        `if_flag` (it has one when the config field `bias_flag` is true; the flag also gives
        attention biases, so PruneNet never switches it on), `switchable` (`bias_flag` gives
        biases to the FFN projections only, so PruneNet may switch it on, with zero biases on
        the input projections), `never` (the modeling code hard-codes no bias: a refit of this
        architecture has no intercept).
    :param bias_flag: the config field behind `if_flag` and `switchable`.
    :param attention: where the attention heads live (`Attention`); None for an architecture
        whose heads PruneNet does not know.
    """

    layers: str
    inputs: tuple[str, ...]
    output: str
    width_field: str
    layout: Layout = "linear"
    default_width: int | None = None
    learned_positions: bool = False
    output_bias: BiasSupport = "never"
    bias_flag: str | None = None
    attention: Attention | None = None


# Aligned by hand so each architecture reads as one row.
# fmt: off
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GQA_ATTENTION = Attention(_QKV, "self_attn.o_proj", "self_attn")
_GATED = Adapter("model.layers", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
                 "intermediate_size", attention=_GQA_ATTENTION)

# Llama's `mlp_bias` puts biases on gate, up and down and nowhere else (transformers 5.24);
# Mistral, Qwen2/3, Gemma 1-3 and Phi-3 hard-code bias=False on their FFN projections.
# Qwen2, Phi and Phi-3 declare no `head_dim` field but read `getattr(config, "head_dim", ...)`
# (attention and rotary embedding alike), so an explicit value is honoured and saved.
# Heads recorded apart (no `head_dim_field`, or Phi's `qk_layernorm`), what each attention
# forward reads after a cut: OPT reshapes by its cached `num_heads` (and a derived `head_dim`,
# unchanged); GPT-2 splits c_attn's output by `split_size` and reshapes with -1; GPT-NeoX
# reshapes with -1 and reads no count; Falcon reshapes by `num_heads` and `num_kv_heads` in all
# three layouts (multi-query, multi-head, new_decoder_architecture), but its ALiBi variant
# builds per-head biases from the config's count at the model level; Phi's q/k norms are
# hidden_size / num_attention_heads wide and shared by every head.
ADAPTERS: dict[str, Adapter] = {
    "llama": replace(_GATED, output_bias="switchable", bias_flag="mlp_bias"),
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "gemma": _GATED,
    "gemma2": _GATED,
    "gemma3_text": _GATED,
    "gemma3": Adapter("model.language_model.layers", ("mlp.gate_proj", "mlp.up_proj"),
                      "mlp.down_proj", "text_config.intermediate_size",
                      attention=_GQA_ATTENTION),
    "phi": Adapter("model.layers", ("mlp.fc1",), "mlp.fc2", "intermediate_size",
                   output_bias="always",
                   attention=Attention(_QKV, "self_attn.dense", "self_attn",
                                       derives_with=("qk_layernorm",))),
    "phi3": Adapter("model.layers", ("mlp.gate_up_proj",), "mlp.down_proj", "intermediate_size",
                    layout="fused_gate_up",
                    attention=Attention(("self_attn.qkv_proj",), "self_attn.o_proj",
                                        "self_attn", layout="fused",
                                        reads_counts_at_runtime=True)),
    "opt": Adapter("model.decoder.layers", ("fc1",), "fc2", "ffn_dim", learned_positions=True,
                   output_bias="if_flag", bias_flag="enable_bias",
                   attention=Attention(("self_attn.q_proj", "self_attn.k_proj",
                                        "self_attn.v_proj"), "self_attn.out_proj", "self_attn",
                                       kv_heads="all", head_dim_field=None)),
    "gpt2": Adapter("transformer.h", ("mlp.c_fc",), "mlp.c_proj", "n_inner", layout="conv1d",
                    default_width=4, learned_positions=True, output_bias="always",
                    attention=Attention(("attn.c_attn",), "attn.c_proj", "attn", layout="fused",
                                        conv1d=True, kv_heads="all", head_dim_field=None,
                                        count_attributes=(*_COUNT_ATTRIBUTES,
                                                          ("split_size", "width")))),
    "gpt_neox": Adapter("gpt_neox.layers", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h",
                        "intermediate_size", output_bias="always",
                        attention=Attention(("attention.query_key_value",), "attention.dense",
                                            "attention", layout="grouped", kv_heads="all",
                                            head_dim_field=None)),
    "falcon": Adapter("transformer.h", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h",
                      "ffn_hidden_size", default_width=4, output_bias="if_flag", bias_flag="bias",
                      attention=Attention(("self_attention.query_key_value",),
                                          "self_attention.dense", "self_attention",
                                          layout="grouped", kv_heads="falcon",
                                          kv_heads_field="num_kv_heads", head_dim_field=None,
                                          count_attributes=(*_COUNT_ATTRIBUTES,
                                                            ("num_kv_heads", "kv")),
                                          blocked_by=("alibi",),
                                          blocked_reason="its ALiBi biases are built for "
                                          "num_attention_heads heads, one slope per head "
                                          "position, so the kept heads would get other "
                                          "heads' slopes")),
}
# fmt: on


@dataclass
class FFNWeights:
    """One layer's FFN seen neuron-first: `inputs[k][i]` and `output[:, i]` belong to neuron i."""

    inputs: list[torch.Tensor]  # each d_ff x d_model
    output: torch.Tensor  # d_model x d_ff

    @property
    def width(self) -> int:
        return self.output.shape[1]


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(config) -> Adapter:
    """The adapter for a config, or a clear error naming the supported types."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise PruneNetError(
            f"Unsupported architecture model_type={model_type!r}. PruneNet supports: "
            f"{', '.join(supported_model_types())}. Add an Adapter row in prunenet/arch.py "
            "to support another one."
        )
    return ADAPTERS[model_type]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(_get(model, adapter_for(model.config).layers))


# Config fields that bound the positions a model can see, by the names architectures use.
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx")


def max_positions(config) -> int | None:
    """The longest sequence the model can process: its position table's size for architectures
    with learned positions, None for the others (they have no hard limit).

    :param config: a `transformers` config (a multimodal one's text config is looked at too).
    """
    if not adapter_for(config).learned_positions:
        return None
    for owner in (getattr(config, "text_config", None), config):
        for field in _POSITION_FIELDS:
            value = getattr(owner, field, None) if owner is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def ffn_width(config) -> int:
    """d_ff when every layer has the same width; a clear error when layers differ."""
    widths = ffn_widths(config)
    if len(set(widths)) != 1:
        raise PruneNetError(
            f"This model's layers have different FFN widths ({widths}), so there is no single "
            "d_ff; read them per layer with prunenet.core.arch.ffn_widths(config)."
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
    `prunenet.load_pruned` builds those models (see prunenet/loading.py). Per-layer head counts
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


def decoder_config(config):
    """The config that describes the decoder layers: the config itself, or a multimodal
    model's text config (where the adapter's width field lives)."""
    return _config_owner(config, adapter_for(config).width_field)[0]


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


# ----- attention heads --------------------------------------------------------------------------


class HeadShape(NamedTuple):
    """One layer's attention: query heads, KV heads, and the size of every head.

    :param num_heads: query heads.
    :param num_kv_heads: key/value heads; query head h uses KV head h // group_size.
    :param head_dim: the size of one head (rows per head in q, k and v).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads


@dataclass
class HeadWeights:
    """One layer's attention weights seen head-first (detached views or copies, not modules).

    :param query: per query head, its head_dim x d_model rows of the query projection.
    :param key: per KV head, its head_dim x d_model key rows.
    :param value: per KV head, its head_dim x d_model value rows.
    :param output: per query head, its d_model x head_dim columns of the output projection.
    """

    query: list[torch.Tensor]
    key: list[torch.Tensor]
    value: list[torch.Tensor]
    output: list[torch.Tensor]


def attention_adapter(config) -> Attention:
    """The architecture's `Attention` row, or a clear error where PruneNet has none."""
    adapter = adapter_for(config)
    if adapter.attention is None:
        raise PruneNetError(
            f"PruneNet does not know where {config.model_type} keeps its attention heads; add "
            "an Attention row to its Adapter in prunenet/core/arch.py."
        )
    return adapter.attention


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


def counts_recorded_apart(config) -> bool:
    """Whether this model's kept head counts live in PruneNet's own fields
    (`RECORDED_PREFIX` + field) rather than the architecture's.

    True where the modeling code sizes heads from hidden_size / heads (no `head_dim_field`, or
    a `derives_with` flag is on): the architecture's fields then keep the counts the layers are
    built with, so the derived head size stays right. Such folders reload with
    `prunenet.load_pruned` or, without PruneNet, with `trust_remote_code=True`; plain
    `from_pretrained` stops at the first narrowed weight.

    :param config: a supported model's config.
    """
    attention = attention_adapter(config)
    owner = decoder_config(config)
    return attention.head_dim_field is None or any(
        getattr(owner, flag, False) for flag in attention.derives_with
    )


def built_head_counts(config) -> list[tuple[int, int]]:
    """Per decoder layer, the (query heads, KV heads) the modeling code builds from this config:
    the kept counts, except where they are recorded apart (`counts_recorded_apart`).

    :param config: a supported model's config.
    """
    attention = attention_adapter(config)
    return [_built_counts(c, attention) for c in _layer_configs(decoder_config(config))]


def head_removal_blocker(config) -> str | None:
    """Why this model's attention heads cannot be removed (a sentence), or None if they can.

    :param config: a supported model's config.
    """
    attention = attention_adapter(config)
    owner = decoder_config(config)
    active = [flag for flag in attention.blocked_by if getattr(owner, flag, False)]
    if active:
        return f"{config.model_type} with {', '.join(active)}: {attention.blocked_reason}"
    return None


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
    heads_field, kv_field = attention.heads_field, _kv_field(owner, attention)
    if apart:
        heads_field, kv_field = _recorded_fields(owner, attention)
    else:
        setattr(owner, attention.head_dim_field, head_dims.pop())
    values = {heads_field: [int(heads) for heads, _ in counts]}
    if kv_field is not None:
        values[kv_field] = [int(kv) for _, kv in counts]
    else:
        implied = [(heads, _kv_heads(owner, attention, heads, None)) for heads, _ in counts]
        if [(int(h), int(kv)) for h, kv in counts] != implied:
            raise PruneNetError(
                f"{config.model_type} (as configured) has {_implied_kv_text(owner, attention)}; "
                f"it cannot keep {counts} (query heads, KV heads)."
            )
    set_layer_values(config, values)
    if apart and [tuple(c) for c in counts] == built_head_counts(config):
        for field in values:  # nothing removed: the architecture's own fields say it all
            owner.__dict__.pop(field, None)


def attention_modules(layer: nn.Module, adapter: Adapter) -> tuple[list[nn.Module], nn.Module]:
    """One layer's q/k/v (or fused qkv) projection modules and its output projection."""
    attention = adapter.attention
    return [_get(layer, path) for path in attention.projections], _get(layer, attention.output)


def qkv_row_heads(
    attention: Attention, shape: HeadShape
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Which head owns each output row of each projection, for every layout.

    :param attention: the architecture's `Attention` row.
    :param shape: the layer's heads.
    :return: per projection in `attention.projections`, (role, head): role 0 for query rows,
        1 for key rows, 2 for value rows; head is the query head index for query rows and the
        KV head index for key and value rows.
    """
    size, group = shape.head_dim, shape.group_size

    def block(role: int, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        owners = heads.repeat_interleave(size)
        return torch.full_like(owners, role), owners

    # Index math is on the CPU: models are built on the meta device inside from_pretrained.
    queries = torch.arange(shape.num_heads, device="cpu")
    kvs = torch.arange(shape.num_kv_heads, device="cpu")
    if attention.layout == "separate":
        return [block(0, queries), block(1, kvs), block(2, kvs)]
    if attention.layout == "fused":
        blocks = [block(0, queries), block(1, kvs), block(2, kvs)]
    else:  # grouped: per KV group, its query heads, then its key, then its value
        blocks = []
        for kv in range(shape.num_kv_heads):
            blocks.append(block(0, queries[kv * group : (kv + 1) * group]))
            blocks += [block(1, kvs[kv : kv + 1]), block(2, kvs[kv : kv + 1])]
    return [(torch.cat([r for r, _ in blocks]), torch.cat([h for _, h in blocks]))]


def head_weights(layer: nn.Module, adapter: Adapter, shape: HeadShape) -> HeadWeights:
    """Head-first views of one layer's attention weights (`HeadWeights`).

    :param layer: a decoder layer.
    :param adapter: its adapter (with an `attention` row).
    :param shape: the layer's heads.
    """
    attention = adapter.attention
    projections, output = attention_modules(layer, adapter)
    by_role: dict[int, dict[int, torch.Tensor]] = {0: {}, 1: {}, 2: {}}
    for module, (roles, heads) in zip(projections, qkv_row_heads(attention, shape), strict=True):
        weight = _rows_first(module.weight.detach(), attention.conv1d)
        for role, head in torch.unique(torch.stack([roles, heads]), dim=1).T.tolist():
            rows = ((roles == role) & (heads == head)).nonzero().flatten()
            by_role[role][head] = weight[rows.to(weight.device)]
    columns = _rows_first(output.weight.detach(), attention.conv1d)
    size = shape.head_dim
    return HeadWeights(
        query=[by_role[0][h] for h in range(shape.num_heads)],
        key=[by_role[1][h] for h in range(shape.num_kv_heads)],
        value=[by_role[2][h] for h in range(shape.num_kv_heads)],
        output=[columns[:, h * size : (h + 1) * size] for h in range(shape.num_heads)],
    )


def cut_attention(
    layer: nn.Module,
    adapter: Adapter,
    shape: HeadShape,
    keep_kv: torch.Tensor,
    keep_query: torch.Tensor,
) -> HeadShape:
    """Keep only the KV heads `keep_kv` and query heads `keep_query` of one layer, in place.

    Cuts the query/key/value rows (and their biases) of every projection layout and the output
    projection's columns, and updates the attention module's cached counts. It does not check
    the grouping: `prunenet.core.heads.cut_heads` validates and then calls this.

    :param layer: a decoder layer.
    :param adapter: its adapter.
    :param shape: the layer's heads before the cut.
    :param keep_kv: sorted KV head indices to keep.
    :param keep_query: sorted query head indices to keep (global, 0..num_heads-1).
    :return: the layer's heads after the cut.
    """
    attention = adapter.attention
    projections, output = attention_modules(layer, adapter)
    keep_kv, keep_query = keep_kv.cpu().long(), keep_query.cpu().long()
    neuron_dim = 1 if attention.conv1d else 0
    for module, (roles, heads) in zip(projections, qkv_row_heads(attention, shape), strict=True):
        kept = torch.where(roles == 0, torch.isin(heads, keep_query), torch.isin(heads, keep_kv))
        _cut_neurons(module, kept.nonzero().flatten(), neuron_dim=neuron_dim, bias=True)
    within = torch.arange(shape.head_dim, device="cpu")
    columns = (keep_query[:, None] * shape.head_dim + within).flatten()
    _cut_neurons(output, columns, neuron_dim=1 - neuron_dim, bias=False)
    after = HeadShape(len(keep_query), len(keep_kv), shape.head_dim)
    module = _get(layer, attention.module)
    values = {
        "heads": after.num_heads,
        "kv": after.num_kv_heads,
        "group": after.group_size,
        "width": after.num_heads * after.head_dim,
    }
    for name, count in attention.count_attributes:
        if isinstance(getattr(module, name, None), int):  # counts the forward reads
            setattr(module, name, values[count])
    return after


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
    return heads, _kv_heads(layer_config, attention, heads, _kv_field(layer_config, attention))


def _kv_field(layer_config, attention: Attention) -> str | None:
    """The config field holding the KV head count, or None where the layout implies it."""
    if attention.kv_heads == "field":
        return attention.kv_heads_field
    if attention.kv_heads == "falcon" and getattr(layer_config, "new_decoder_architecture", False):
        return attention.kv_heads_field
    return None


def _recorded_fields(layer_config, attention: Attention) -> tuple[str, str | None]:
    """PruneNet's own fields for the kept (query, KV) counts (`counts_recorded_apart`)."""
    kv_field = _kv_field(layer_config, attention)
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
    if attention.kv_heads == "falcon" and getattr(layer_config, "multi_query", False):
        return 1
    return heads


def _implied_kv_text(layer_config, attention: Attention) -> str:
    if attention.kv_heads == "falcon" and getattr(layer_config, "multi_query", False):
        return "one KV head shared by every query head"
    return "one KV head per query head"


def _layer_configs(owner) -> list:
    if getattr(owner, "is_heterogeneous", False):
        return [owner.per_layer_config[i] for i in range(owner.num_hidden_layers)]
    return [owner] * owner.num_hidden_layers


def _rows_first(weight: torch.Tensor, conv1d: bool) -> torch.Tensor:
    return weight.T if conv1d else weight


def ffn_weights(layer: nn.Module, adapter: Adapter) -> FFNWeights:
    """Neuron-first views of a layer's FFN weights (no copies)."""
    inputs = [_get(layer, path).weight for path in adapter.inputs]
    output = _get(layer, adapter.output).weight
    if adapter.layout == "conv1d":
        inputs = [w.T for w in inputs]
        output = output.T
    elif adapter.layout == "fused_gate_up":
        inputs = list(inputs[0].chunk(2, dim=0))
    return FFNWeights(inputs=[w.detach() for w in inputs], output=output.detach())


def ffn_modules(layer: nn.Module, adapter: Adapter) -> tuple[list[nn.Module], nn.Module]:
    """The FFN's input projection modules and output projection module of one layer."""
    return [_get(layer, p) for p in adapter.inputs], _get(layer, adapter.output)


def cut_ffn(layer: nn.Module, adapter: Adapter, keep: torch.Tensor) -> None:
    """Keep only neurons `keep` (sorted indices) in one layer's FFN, in place."""
    inputs, output = ffn_modules(layer, adapter)
    keep = keep.to(torch.long)
    for module in inputs:
        rows = keep
        if adapter.layout == "fused_gate_up":
            half = module.weight.shape[0] // 2
            rows = torch.cat([keep, keep + half])
        _cut_neurons(module, rows, neuron_dim=1 if adapter.layout == "conv1d" else 0, bias=True)
    _cut_neurons(output, keep, neuron_dim=0 if adapter.layout == "conv1d" else 1, bias=False)


def can_store_output_bias(config) -> bool:
    """Whether a refit's intercept can live in this model's FFN output projections, in a folder
    that plain `from_pretrained` reloads (`Adapter.output_bias` says how per architecture)."""
    adapter = adapter_for(config)
    if adapter.output_bias == "if_flag":
        return bool(getattr(config, adapter.bias_flag, False))
    return adapter.output_bias != "never"


def enable_output_biases(model: nn.Module) -> None:
    """Give every FFN projection a bias where the architecture needs a config switch for it.

    A `switchable` flag (Llama's `mlp_bias`) makes `from_pretrained` expect biases on every FFN
    projection of every layer, so all of them get one: zero on the input projections (the
    function is unchanged) and zero on the output projection until a refit fills it in. Does
    nothing where the biases already exist; refuses where none can be stored.
    """
    adapter = adapter_for(model.config)
    if not can_store_output_bias(model.config):
        raise PruneNetError(
            f"{model.config.model_type} models cannot store an FFN output bias that plain "
            "from_pretrained reloads; refit them without an intercept (--refit lsq)."
        )
    if adapter.output_bias != "switchable" or getattr(model.config, adapter.bias_flag):
        return
    for layer in decoder_layers(model):
        inputs, output = ffn_modules(layer, adapter)
        for module in (*inputs, output):
            weight = module.weight
            module.bias = nn.Parameter(
                torch.zeros(module.out_features, dtype=weight.dtype, device=weight.device)
            )
    setattr(model.config, adapter.bias_flag, True)


def added_bias_parameters(model: nn.Module) -> tuple[int, int]:
    """Parameters `enable_output_biases` would add: (per kept FFN row, per layer); (0, 0)
    where the biases exist already or no switch is needed. Budgets count them.

    :param model: the model about to be refitted with an intercept.
    """
    adapter = adapter_for(model.config)
    if adapter.output_bias != "switchable" or getattr(model.config, adapter.bias_flag, False):
        return 0, 0
    if not can_store_output_bias(model.config):
        return 0, 0
    inputs, output = ffn_modules(decoder_layers(model)[0], adapter)
    return len(inputs), output.out_features


def ffn_output_bias(layer: nn.Module, adapter: Adapter) -> torch.Tensor | None:
    """The FFN output projection's bias (d_model), or None when it has none."""
    bias = getattr(_get(layer, adapter.output), "bias", None)
    return None if bias is None else bias.detach()


def set_ffn_output(
    layer: nn.Module, adapter: Adapter, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Overwrite one layer's FFN output projection in place, after its rows were cut.

    :param layer: a decoder layer, already cut to `weight.shape[1]` neurons.
    :param adapter: the layer's adapter.
    :param weight: the new neuron-first output weights, d_model x kept (any float dtype).
    :param bias: the new output bias (d_model), or None to leave the bias as it is.
    """
    module = _get(layer, adapter.output)
    stored = weight.T if adapter.layout == "conv1d" else weight
    if stored.shape != module.weight.shape:
        raise PruneNetError(
            f"Refitted output weights {tuple(weight.shape)} do not fit the cut layer's "
            f"{tuple(module.weight.shape)} (layout {adapter.layout})."
        )
    with torch.no_grad():
        module.weight.copy_(stored.to(module.weight.dtype))
        if bias is not None:
            if getattr(module, "bias", None) is None:
                raise PruneNetError("This output projection has no bias to write into.")
            module.bias.copy_(bias.to(module.bias.dtype))


def _cut_neurons(module: nn.Module, index: torch.Tensor, neuron_dim: int, bias: bool) -> None:
    weight = module.weight.data.index_select(neuron_dim, index.to(module.weight.device))
    module.weight = nn.Parameter(weight.contiguous(), requires_grad=module.weight.requires_grad)
    if bias and getattr(module, "bias", None) is not None:
        module.bias = nn.Parameter(module.bias.data[index.to(module.bias.device)].contiguous())
    # Keep the module's own shape attributes truthful (repr, and Conv1D's forward uses nf).
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif hasattr(module, "nf"):  # transformers' Conv1D: weight is (nx, nf)
        module.nx, module.nf = module.weight.shape


def _get(root, dotted: str):
    for part in dotted.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def _config_owner(config, dotted: str):
    *parents, field = dotted.split(".")
    owner = config
    for part in parents:
        owner = getattr(owner, part)
    return owner, field


def _has_per_layer_values(owner, field: str) -> bool:
    return bool(getattr(owner, "is_heterogeneous", False)) and field in owner.per_layer_attributes


def _width_in(config, field: str, adapter: Adapter) -> int:
    width = getattr(config, field, None)
    if width is None and adapter.default_width is not None:
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        width = adapter.default_width * hidden
    return int(width)


def layer_shell(tensors: dict[str, torch.Tensor], roles: dict[str, tuple[int, str, str]]):
    """A bare module tree shaped like one decoder layer's FFN, holding the given tensors.

    `arch.ffn_weights` and `arch.cut_ffn` walk module paths and read `.weight`/`.bias`, so on
    this shell they do exactly what they do on the loaded model.
    """
    root = nn.Module()
    for name, (_, path, param) in roles.items():
        module = root
        for part in path.split("."):
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(param, nn.Parameter(tensors[name], requires_grad=False))
    return root


def shell_tensors(shell: nn.Module, roles: dict[str, tuple[int, str, str]]):
    tensors = {}
    for name, (_, path, param) in roles.items():
        module = shell
        for part in path.split("."):
            module = getattr(module, part)
        tensors[name] = getattr(module, param).detach()
    return tensors
