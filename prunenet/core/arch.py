"""Architecture adapters: the only place that knows where FFN weights live.

Every supported `config.model_type` maps to one `Adapter` row in `ADAPTERS`. An adapter names
the decoder-layer list, the FFN input projections (whose rows are the FFN neurons), the output
projection (whose columns are the same neurons), the weight layout, and the config field that
holds the FFN width. Scorers see every FFN through the same `FFNWeights` view (rows = neurons),
and the compressor cuts every layout through `cut_ffn`, so no other module branches on the
architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from prunenet.errors import PruneNetError

Layout = Literal["linear", "conv1d", "fused_gate_up"]
BiasSupport = Literal["always", "if_flag", "switchable", "never"]


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


# Aligned by hand so each architecture reads as one row.
# fmt: off
_GATED = Adapter("model.layers", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
                 "intermediate_size")

# Llama's `mlp_bias` puts biases on gate, up and down and nowhere else (transformers 5.24);
# Mistral, Qwen2/3, Gemma 1-3 and Phi-3 hard-code bias=False on their FFN projections.
ADAPTERS: dict[str, Adapter] = {
    "llama": replace(_GATED, output_bias="switchable", bias_flag="mlp_bias"),
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "gemma": _GATED,
    "gemma2": _GATED,
    "gemma3_text": _GATED,
    "gemma3": Adapter("model.language_model.layers", ("mlp.gate_proj", "mlp.up_proj"),
                      "mlp.down_proj", "text_config.intermediate_size"),
    "phi": Adapter("model.layers", ("mlp.fc1",), "mlp.fc2", "intermediate_size",
                   output_bias="always"),
    "phi3": Adapter("model.layers", ("mlp.gate_up_proj",), "mlp.down_proj", "intermediate_size",
                    layout="fused_gate_up"),
    "opt": Adapter("model.decoder.layers", ("fc1",), "fc2", "ffn_dim", learned_positions=True,
                   output_bias="if_flag", bias_flag="enable_bias"),
    "gpt2": Adapter("transformer.h", ("mlp.c_fc",), "mlp.c_proj", "n_inner", layout="conv1d",
                    default_width=4, learned_positions=True, output_bias="always"),
    "gpt_neox": Adapter("gpt_neox.layers", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h",
                        "intermediate_size", output_bias="always"),
    "falcon": Adapter("transformer.h", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h",
                      "ffn_hidden_size", default_width=4, output_bias="if_flag", bias_flag="bias"),
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
    `prunenet.load_pruned` builds those models (see prunenet/loading.py).
    """
    adapter = adapter_for(config)
    owner, field = _config_owner(config, adapter.width_field)
    widths = [int(width) for width in widths]
    if len(widths) != owner.num_hidden_layers:
        raise PruneNetError(
            f"Got {len(widths)} FFN widths for a model with {owner.num_hidden_layers} layers."
        )
    if getattr(owner, "is_heterogeneous", False):
        others = set(owner.per_layer_attributes) - {field}
        if others:
            raise PruneNetError(
                f"The config already varies {sorted(others)} per layer; PruneNet only writes "
                f"per-layer {field!r} and would not merge with other per-layer settings."
            )
        owner.per_layer_config = None  # drop old width overrides before the global value moves
    widest = max(widths)
    setattr(owner, field, widest)
    if len(set(widths)) == 1:
        return
    if not isinstance(getattr(type(owner), "per_layer_config", None), property):
        raise PruneNetError(
            "Layers with different FFN widths need a transformers version with per-layer "
            "configs (`per_layer_config`, as in 5.23); upgrade transformers or use one ratio "
            "for all layers."
        )
    owner.per_layer_config = {i: {field: w} for i, w in enumerate(widths) if w != widest}


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
