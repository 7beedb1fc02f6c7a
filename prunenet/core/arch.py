"""Architecture adapters: the only place that knows where FFN and attention weights live.

Every supported `config.model_type` maps to one `Adapter` row in `ADAPTERS`. An adapter names
the decoder-layer list, the FFN input projections (whose rows are the FFN neurons), the output
projection (whose columns are the same neurons), the weight layout, and the config field that
holds the FFN width. Attention heads are described the same way, by the adapter's `attention`
row (`Attention`): where q/k/v and the output projection live, how a fused projection orders its
rows, and which config fields hold the head counts and the head size.

This module holds those rows and the read-only facts drawn from them (the decoder layers, the
config that describes them, the longest sequence, whether heads can be removed, whether an FFN
output bias can be stored). Two modules act on the rows, so no other module branches on the
architecture:

- `prunenet.core.surgery` reads and cuts weights. Scorers see every FFN through the same
  `FFNWeights` view (rows = neurons) and every layout is cut by `cut_ffn`; `qkv_row_heads`
  turns an `Attention` row into "which head owns each row", and `cut_attention` /
  `head_weights` work from it, so `prunenet.core.heads` and `prunenet.analysis.head_scores`
  never branch on the architecture.
- `prunenet.core.config_fields` reads and writes the config's per-layer values (FFN widths,
  head counts), all written by one function, `set_layer_values`.

Where the modeling code sizes heads from the head count (OPT, GPT-2, GPT-NeoX and Falcon derive
head_dim = hidden_size / num_attention_heads; Phi with `qk_layernorm` sizes its q/k norms that
way), the architecture's count fields must keep the counts the layers are *built* with, or a
reload would build bigger heads. There the kept counts go into PruneNet's own fields
(`prunenet_kept_num_attention_heads`, ...: `config_fields.RECORDED_PREFIX` + the field), per
layer like any other value, and the modules are narrowed after they are built
(`prunenet.load_pruned`, or the folder's `modeling_prunenet.py` with `trust_remote_code=True`):
`counts_recorded_apart`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
from torch import nn

from prunenet.errors import PruneNetError

Layout = Literal["linear", "conv1d", "fused_gate_up"]
BiasSupport = Literal["always", "if_flag", "switchable", "never"]
QKVLayout = Literal["separate", "fused", "grouped"]
KVHeads = Literal["field", "all", "falcon"]
Count = Literal["heads", "kv", "group", "width"]

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


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(config) -> Adapter:
    """The adapter for a config, or a clear error naming the supported types."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise PruneNetError(
            f"Unsupported architecture model_type={model_type!r}. PruneNet supports: "
            f"{', '.join(supported_model_types())}. Add an Adapter row in prunenet/core/arch.py "
            "to support another one."
        )
    return ADAPTERS[model_type]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(_get(model, adapter_for(model.config).layers))


def decoder_config(config):
    """The config that describes the decoder layers: the config itself, or a multimodal
    model's text config (where the adapter's width field lives)."""
    return _config_owner(config, adapter_for(config).width_field)[0]


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


def attention_adapter(config) -> Attention:
    """The architecture's `Attention` row, or a clear error where PruneNet has none."""
    adapter = adapter_for(config)
    if adapter.attention is None:
        raise PruneNetError(
            f"PruneNet does not know where {config.model_type} keeps its attention heads; add "
            "an Attention row to its Adapter in prunenet/core/arch.py."
        )
    return adapter.attention


def counts_recorded_apart(config) -> bool:
    """Whether this model's kept head counts live in PruneNet's own fields
    (`config_fields.RECORDED_PREFIX` + field) rather than the architecture's.

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


def kv_heads_field(layer_config, attention: Attention) -> str | None:
    """The config field that holds one layer's KV head count, or None where the layout implies
    the count (`implied_kv_heads`).

    :param layer_config: one decoder layer's config.
    :param attention: the architecture's `Attention` row.
    """
    if attention.kv_heads == "field":
        return attention.kv_heads_field
    if attention.kv_heads == "falcon" and getattr(layer_config, "new_decoder_architecture", False):
        return attention.kv_heads_field
    return None


def implied_kv_heads(layer_config, attention: Attention, heads: int) -> tuple[int, str]:
    """The KV heads of a layer with `heads` query heads where no field holds the count
    (`kv_heads_field` is None), and that rule in words: one KV head shared by every query head
    (Falcon's `multi_query`), else one per query head (multi-head attention).

    :param layer_config: one decoder layer's config.
    :param attention: the architecture's `Attention` row.
    :param heads: the layer's query heads.
    """
    if attention.kv_heads == "falcon" and getattr(layer_config, "multi_query", False):
        return 1, "one KV head shared by every query head"
    return heads, "one KV head per query head"


def can_store_output_bias(config) -> bool:
    """Whether a refit's intercept can live in this model's FFN output projections, in a folder
    that plain `from_pretrained` reloads (`Adapter.output_bias` says how per architecture)."""
    adapter = adapter_for(config)
    if adapter.output_bias == "if_flag":
        return bool(getattr(config, adapter.bias_flag, False))
    return adapter.output_bias != "never"


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
