"""Attention-head removal, GQA-aware: query heads within KV groups, and whole KV groups.

A layer with H query heads and K KV heads has K groups of G = H / K query heads; query head h
reads KV head h // G. Two cuts keep that structure valid:

- removing query heads *within* groups, the same number from every group (H stays a multiple
  of K, so `num_key_value_groups` is still a whole number);
- removing a whole KV group: its key and value heads and all G query heads that read them.

Removing a head is, functionally, zeroing its block of output-projection columns: the head's
output is then multiplied by zero. The cut computes exactly that function with fewer weights
(tests/core/test_heads.py and test_heads_derived.py check it through each model's forward pass).

Where the heads live (separate q/k/v, Phi-3's fused q|k|v, GPT-2's Conv1D, GPT-NeoX and
Falcon's per-group interleaving) is described by `prunenet.core.arch.Attention`; this module
never branches on the architecture.

Support in transformers 5.24, per architecture:

| model_type | layout | reload after uniform cut | per-layer counts |
|---|---|---|---|
| llama, gemma2, gemma3_text, gemma3 | separate | plain `from_pretrained` | `load_pruned` (1) |
| mistral, qwen2, qwen3, gemma | separate | plain `from_pretrained` | `load_pruned` |
| phi (qk_layernorm off) | separate | plain `from_pretrained` | `load_pruned` |
| phi3 | fused q, k, v | plain `from_pretrained` | `load_pruned` (2) |
| opt, phi with qk_layernorm | separate | `load_pruned` (3) | `load_pruned` (3) |
| gpt2 | Conv1D fused q, k, v | `load_pruned` (3) | `load_pruned` (3) |
| gpt_neox, falcon (5) | grouped | `load_pruned` (3) | `load_pruned` (3) |
| falcon with alibi | grouped | raises (4) | raises (4) |

Every `load_pruned` folder also loads without PruneNet with `trust_remote_code=True`
(`prunenet.io.remote_code`).
(1) Their config validators check `hidden_size % num_attention_heads == 0` (so only such counts
are accepted, even with an explicit `head_dim`) and read the field globally, which transformers
refuses on a heterogeneous config: PruneNet saves these configs with
`allow_global_per_layer_attribute_access` (see `config_fields.set_layer_values`).
(2) Phi-3's attention forward reads `config.num_attention_heads`, so each attention module is
given its own layer's config (`config_fields.bind_layer_configs`).
(3) Their modeling code derives the head size as hidden_size / num_attention_heads (Phi sizes
its q/k norms that way), and no config field can say otherwise: the config keeps the built
counts, the kept ones are recorded apart (`prunenet_kept_num_attention_heads`, ...;
`arch.counts_recorded_apart`), and even a uniform cut needs the narrowing loader. Plain
`from_pretrained` stops at a size mismatch.
(4) Falcon's ALiBi biases are built per head position from the config's count at the model
level, so the kept heads would get other heads' slopes. Its heads can still be scored
(`prunenet.analysis.head_scores`).
(5) All three Falcon layouts: multi-query (one KV head), multi-head, and
new_decoder_architecture (grouped, `num_kv_heads`).

Qwen2, Phi and Phi-3 declare no `head_dim` field but read `getattr(config, "head_dim", ...)`;
`prune_heads` writes `head_dim` explicitly (wherever counts are not recorded apart), so the
reloaded heads keep their size.
Per-layer counts share `per_layer_config` with per-layer FFN widths: both coexist.

Why this module is long (over 400 lines): the checks that keep a GQA grouping valid, the cut,
the selection by score and the parameter costs are one job (removing heads) and are read
together.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn

from prunenet.core.arch import Adapter, HeadShape, adapter_for, decoder_layers, head_removal_blocker
from prunenet.core.compress import count_parameters
from prunenet.core.config_fields import bind_layer_configs, head_shapes, set_head_counts
from prunenet.core.surgery import attention_modules, cut_attention, qkv_row_heads
from prunenet.errors import PruneNetError


class HeadKeep(NamedTuple):
    """The heads one layer keeps.

    :param kv: KV head indices to keep (0..num_kv_heads-1); a KV head left out is removed with
        its whole group of query heads.
    :param query: query head indices to keep (global, 0..num_heads-1); each must belong to a
        kept KV group, and every kept group must keep the same number.
    """

    kv: torch.Tensor
    query: torch.Tensor


@dataclass(frozen=True)
class HeadCosts:
    """Parameters one head holds in a layer: what removing it saves.

    :param per_query_head: its query rows (and biases) plus its output-projection columns.
    :param per_kv_head: its key and value rows (and biases); removing a KV group saves this
        plus `group_size` x `per_query_head`.
    """

    per_query_head: int
    per_kv_head: int


@dataclass
class HeadReport:
    """What `prune_heads` did: every layer's heads before and after, and the parameters."""

    shapes_before: list[HeadShape]
    shapes_after: list[HeadShape]
    params_before: int
    params_after: int

    def to_dict(self) -> dict:
        data = asdict(self)
        data["shapes_before"] = [shape._asdict() for shape in self.shapes_before]
        data["shapes_after"] = [shape._asdict() for shape in self.shapes_after]
        return data


def prune_heads(model: nn.Module, keep: Sequence[HeadKeep | tuple | None]) -> HeadReport:
    """Remove attention heads from every layer, in place, and record the counts in the config.

    Equal counts in every layer are written to the global config fields (`num_attention_heads`,
    `num_key_value_heads`, and `head_dim`, always explicit), so plain
    `AutoModelForCausalLM.from_pretrained` reloads the saved folder. Different counts go into
    `per_layer_config` beside any per-layer FFN widths, and `prunenet.load_pruned` reloads them.
    Where the modeling code derives the head size from the count (OPT, GPT-2, GPT-NeoX, Falcon,
    Phi with qk_layernorm), the counts go into PruneNet's own fields instead
    (`config_fields.set_head_counts`) and every such folder reloads with `prunenet.load_pruned`.
    Every input is checked before the first cut: a refusal leaves the model untouched.

    :param model: a model of an architecture whose heads can be removed (module docstring).
    :param keep: per decoder layer, a `HeadKeep` (or a `(kv, query)` pair), or None to keep
        every head of that layer.
    :return: the heads before and after, and the parameter counts.
    :raises PruneNetError: an architecture whose heads cannot be removed, a keep list of the
        wrong length, an invalid grouping (`check_keep`), or counts the config rejects.
    """
    blocker = head_removal_blocker(model.config)
    if blocker is not None:
        raise PruneNetError(f"Cannot remove attention heads from {blocker}.")
    adapter = adapter_for(model.config)
    layers = decoder_layers(model)
    before = head_shapes(model.config)
    if len(keep) != len(layers):
        raise PruneNetError(
            f"Got {len(keep)} head selections for a model with {len(layers)} layers."
        )
    keeps = [
        keep_all(shape) if kept is None else check_keep(shape, HeadKeep(*kept), layer=index)
        for index, (shape, kept) in enumerate(zip(before, keep, strict=True))
    ]
    counts = [(len(kept.query), len(kept.kv)) for kept in keeps]
    set_head_counts(copy.deepcopy(model.config), counts)  # the config's own checks, up front
    params_before = count_parameters(model)
    after = [
        cut_attention(layer, adapter, shape, kept.kv, kept.query)
        for layer, shape, kept in zip(layers, before, keeps, strict=True)
    ]
    set_head_counts(model.config, counts)
    bind_layer_configs(model)
    return HeadReport(before, after, params_before, count_parameters(model))


def cut_heads(layer: nn.Module, adapter: Adapter, shape: HeadShape, keep: HeadKeep) -> HeadShape:
    """Remove one layer's heads outside `keep`, in place (weights only: the caller records the
    new counts in the config; `prune_heads` does both for a whole model).

    :param layer: a decoder layer.
    :param adapter: its architecture's adapter.
    :param shape: the layer's heads before the cut (`config_fields.head_shapes(config)[i]`).
    :param keep: the heads to keep (`HeadKeep`), checked by `check_keep`.
    :return: the layer's heads after the cut.
    """
    if adapter.attention is None:
        raise PruneNetError(
            "Cannot remove attention heads from this architecture: its adapter has no "
            "Attention row."
        )
    kept = check_keep(shape, HeadKeep(*keep))
    return cut_attention(layer, adapter, shape, kept.kv, kept.query)


def check_keep(shape: HeadShape, keep: HeadKeep, layer: int | None = None) -> HeadKeep:
    """`keep` as sorted CPU index tensors, after checking that it leaves a valid grouping.

    :param shape: the layer's heads before the cut.
    :param keep: the heads to keep.
    :param layer: the layer's index, named in error messages.
    :raises PruneNetError: indices out of range or repeated, no head left, a query head whose
        KV group is removed, or groups keeping different numbers of query heads.
    """
    where = "" if layer is None else f"Layer {layer}: "
    kv = _indices(keep.kv, shape.num_kv_heads, "KV", where)
    query = _indices(keep.query, shape.num_heads, "query", where)
    if len(kv) == 0 or len(query) == 0:
        raise PruneNetError(
            f"{where}cannot remove every attention head; keep at least one KV head and one "
            "query head (remove the whole layer instead with prunenet.core.depth)."
        )
    groups = query // shape.group_size
    orphans = sorted(set(query[~torch.isin(groups, kv)].tolist()))
    if orphans:
        raise PruneNetError(
            f"{where}query heads {orphans} read KV heads that are removed; keep their KV head "
            "or drop them too."
        )
    per_group = torch.bincount(groups, minlength=shape.num_kv_heads)[kv].tolist()
    if len(set(per_group)) != 1:
        raise PruneNetError(
            f"{where}the kept KV groups {kv.tolist()} keep {per_group} query heads; keep the "
            "same number in every kept group, so num_attention_heads stays a multiple of "
            "num_key_value_heads."
        )
    return HeadKeep(kv, query)


def keep_all(shape: HeadShape) -> HeadKeep:
    """Every head of a layer."""
    return HeadKeep(
        torch.arange(shape.num_kv_heads, device="cpu"), torch.arange(shape.num_heads, device="cpu")
    )


def keep_first(shape: HeadShape, num_heads: int, num_kv_heads: int) -> HeadKeep:
    """The first `num_kv_heads` KV groups, and the first `num_heads / num_kv_heads` query heads
    of each: the heads a freshly built model is narrowed to before pruned weights load.

    :param shape: the layer's heads before the cut.
    :param num_heads: query heads to keep.
    :param num_kv_heads: KV heads to keep.
    """
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise PruneNetError(f"{num_heads} query heads cannot be split into {num_kv_heads} groups.")
    per_group = num_heads // num_kv_heads
    if num_kv_heads > shape.num_kv_heads or per_group > shape.group_size:
        raise PruneNetError(
            f"Cannot narrow {shape.num_heads} query / {shape.num_kv_heads} KV heads to "
            f"{num_heads} / {num_kv_heads}."
        )
    # On the CPU: this runs inside from_pretrained, where new tensors default to the meta device.
    kv = torch.arange(num_kv_heads, device="cpu")
    query = (kv[:, None] * shape.group_size + torch.arange(per_group, device="cpu")).flatten()
    return HeadKeep(kv, query)


def select_heads(
    query_scores: torch.Tensor, shape: HeadShape, num_kv_heads: int, heads_per_group: int
) -> HeadKeep:
    """The best `num_kv_heads` KV groups (by the sum of their query heads' scores), and the
    best `heads_per_group` query heads within each; ties go to the lower index.

    :param query_scores: one score per query head (higher = keep), e.g. from
        `prunenet.analysis.head_scores`.
    :param shape: the layer's heads.
    :param num_kv_heads: KV groups to keep, in 1..num_kv_heads.
    :param heads_per_group: query heads to keep in each kept group, in 1..group_size.
    """
    if query_scores.numel() != shape.num_heads:
        raise PruneNetError(
            f"Got {query_scores.numel()} head scores for a layer with {shape.num_heads} heads."
        )
    if not 1 <= num_kv_heads <= shape.num_kv_heads or not 1 <= heads_per_group <= shape.group_size:
        raise PruneNetError(
            f"Cannot keep {num_kv_heads} of {shape.num_kv_heads} KV groups with "
            f"{heads_per_group} of {shape.group_size} query heads each; keep at least one of each."
        )
    grouped = query_scores.detach().float().cpu().reshape(shape.num_kv_heads, shape.group_size)
    kv = _top(grouped.sum(dim=1), num_kv_heads)
    query = torch.cat(
        [kv_head * shape.group_size + _top(grouped[kv_head], heads_per_group) for kv_head in kv]
    )
    return HeadKeep(kv, query)


def attention_parameters(layer: nn.Module, adapter: Adapter) -> int:
    """Parameters in one layer's attention projections (q, k, v or fused qkv, and output;
    biases included; per-head norms such as Qwen3's q_norm are not counted: no cut changes them).

    :param layer: a decoder layer.
    :param adapter: its adapter.
    """
    projections, output = attention_modules(layer, adapter)
    return sum(p.numel() for module in (*projections, output) for p in module.parameters())


def head_costs(layer: nn.Module, adapter: Adapter, shape: HeadShape) -> HeadCosts:
    """Parameters per query head and per KV head in one layer (`HeadCosts`), for budgets.

    :param layer: a decoder layer.
    :param adapter: its adapter.
    :param shape: the layer's heads.
    """
    attention = adapter.attention
    projections, output = attention_modules(layer, adapter)
    by_role = [0, 0, 0]
    for module, (roles, _) in zip(projections, qkv_row_heads(attention, shape), strict=True):
        per_row = module.weight.numel() // len(roles)
        per_row += 1 if getattr(module, "bias", None) is not None else 0
        for role in range(3):
            by_role[role] += int((roles == role).sum()) * per_row
    output_per_head = output.weight.numel() // shape.num_heads
    return HeadCosts(
        per_query_head=by_role[0] // shape.num_heads + output_per_head,
        per_kv_head=(by_role[1] + by_role[2]) // shape.num_kv_heads,
    )


def narrow_heads(model: nn.Module, counts: list[tuple[int, int]]) -> None:
    """Cut a freshly built model's layers to `counts[i]` = (query heads, KV heads), keeping the
    first heads (`keep_first`), and record the counts; which heads are kept does not matter
    because the pruned weights are loaded afterwards (`prunenet.load_pruned`).

    :param model: a model built from a config with at least as many heads in every layer.
    :param counts: per decoder layer, (num_heads, num_kv_heads).
    """
    adapter = adapter_for(model.config)
    layers = decoder_layers(model)
    if len(counts) != len(layers):
        raise PruneNetError(f"Got {len(counts)} head counts for a model with {len(layers)} layers.")
    for layer, shape, (heads, kv) in zip(layers, head_shapes(model.config), counts, strict=True):
        if (heads, kv) != (shape.num_heads, shape.num_kv_heads):
            kept = keep_first(shape, heads, kv)
            cut_attention(layer, adapter, shape, kept.kv, kept.query)
    set_head_counts(model.config, counts)
    bind_layer_configs(model)


def _indices(values, count: int, kind: str, where: str) -> torch.Tensor:
    indices = torch.as_tensor(values, device="cpu").flatten()
    if indices.is_floating_point() or indices.dtype == torch.bool:
        raise PruneNetError(f"{where}{kind} head indices must be whole numbers, got {values!r}.")
    indices = indices.long()
    if len(indices) and (indices.min() < 0 or indices.max() >= count):
        raise PruneNetError(
            f"{where}{kind} head indices {indices.tolist()} are outside 0..{count - 1}."
        )
    if len(indices.unique()) != len(indices):
        raise PruneNetError(f"{where}{kind} head indices {indices.tolist()} repeat a head.")
    return indices.sort().values


def _top(scores: torch.Tensor, kept: int) -> torch.Tensor:
    # A stable sort breaks ties by index, so selection never depends on the sort backend.
    return torch.argsort(scores, descending=True, stable=True)[:kept].sort().values
