"""Surgery on a loaded model: neuron-first and head-first views of its weights, and cutting
them in place.

`ffn_weights` shows every FFN layout as `FFNWeights` (rows = neurons) and `cut_ffn` keeps the
chosen neurons; `qkv_row_heads` says which head owns each row of each attention projection, and
`head_weights` and `cut_attention` work from it for every layout. The FFN output biases where a
refit's intercept lives are added and written here too (`enable_output_biases`,
`set_ffn_output`). Module paths and layouts come from the adapter row (`prunenet.core.arch`);
callers record the new widths and head counts with `prunenet.core.config_fields`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunenet.core.arch import (
    Adapter,
    Attention,
    FFNWeights,
    HeadShape,
    _get,
    adapter_for,
    can_store_output_bias,
    decoder_layers,
)
from prunenet.errors import PruneNetError


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


def attention_modules(layer: nn.Module, adapter: Adapter) -> tuple[list[nn.Module], nn.Module]:
    """One layer's q/k/v (or fused qkv) projection modules and its output projection."""
    attention = adapter.attention
    return [_get(layer, path) for path in attention.projections], _get(layer, attention.output)


def attention_block(layer: nn.Module, adapter: Adapter) -> nn.Module | None:
    """One layer's attention module (Llama's `self_attn`), or None where the adapter has no
    attention row."""
    return None if adapter.attention is None else _get(layer, adapter.attention.module)


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


def layer_shell(tensors: dict[str, torch.Tensor], roles: dict[str, tuple[int, str, str]]):
    """A bare module tree shaped like one decoder layer's FFN, holding the given tensors.

    `ffn_weights` and `cut_ffn` walk module paths and read `.weight`/`.bias`, so on
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


def _rows_first(weight: torch.Tensor, conv1d: bool) -> torch.Tensor:
    return weight.T if conv1d else weight
