"""Heads removed from architectures that size every head from hidden_size / num_attention_heads.

OPT, GPT-2, GPT-NeoX and Falcon (multi-query, multi-head and new_decoder_architecture layouts)
derive head_dim from the head count, and Phi with `qk_layernorm` sizes its q/k norms that way, so
no config field can say "fewer heads of the same size". Their config keeps the built counts and
the kept counts are recorded apart (`prunenet_kept_*`, prunenet.core.arch.counts_recorded_apart);
the folders reload with `prunenet.load_pruned` and, in a Python without PruneNet, with
`trust_remote_code=True`, with identical logits, for the same cut in every layer and for
per-layer cuts. Plain `from_pretrained` stops loudly. Falcon with ALiBi still refuses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from prunenet import load_pruned
from prunenet.allocation.structures import parse_structures
from prunenet.cli import main
from prunenet.core.arch import adapter_for, counts_recorded_apart, decoder_config, decoder_layers
from prunenet.core.config_fields import RECORDED_PREFIX, head_shapes
from prunenet.core.heads import HeadKeep, head_costs, prune_heads
from prunenet.core.surgery import head_weights
from prunenet.errors import PruneNetError
from prunenet.io.remote_code import MODELING_FILE, STRUCTURE_KEY
from prunenet.io.saving import save_model_folder
from tests.conftest import logits_of, sample_input_ids, tiny_tokenizer
from tests.core.test_heads import FALCON_LAYOUTS, gqa_model
from tests.io.test_remote_code import load_without_prunenet, save_and_expect

# case -> (model_type, config overrides on top of gqa_model's 4 query heads).
CASES = {
    "opt": ("opt", {}),
    "gpt2": ("gpt2", {}),
    "gpt_neox": ("gpt_neox", {}),
    "falcon-multi-query": ("falcon", FALCON_LAYOUTS["multi_query"]),
    "falcon-multi-head": ("falcon", FALCON_LAYOUTS["multi_head"]),
    "falcon-new-decoder": ("falcon", FALCON_LAYOUTS["new_decoder_architecture"]),
    "phi-qk-layernorm": ("phi", {"qk_layernorm": True}),
}
CUTS = ("uniform", "per-layer")
# (query heads, KV heads) per layer after each cut; every layer starts with 4 query heads.
KEPT = {
    "opt": {"uniform": [(2, 2), (2, 2)], "per-layer": [(4, 4), (1, 1)]},
    "gpt2": {"uniform": [(2, 2), (2, 2)], "per-layer": [(4, 4), (1, 1)]},
    "gpt_neox": {"uniform": [(2, 2), (2, 2)], "per-layer": [(4, 4), (1, 1)]},
    "falcon-multi-query": {"uniform": [(2, 1), (2, 1)], "per-layer": [(4, 1), (1, 1)]},
    "falcon-multi-head": {"uniform": [(2, 2), (2, 2)], "per-layer": [(4, 4), (1, 1)]},
    "falcon-new-decoder": {"uniform": [(2, 2), (2, 2)], "per-layer": [(4, 2), (2, 1)]},
    "phi-qk-layernorm": {"uniform": [(2, 2), (2, 2)], "per-layer": [(4, 2), (2, 1)]},
}


def dense(case: str) -> PreTrainedModel:
    model_type, overrides = CASES[case]
    return gqa_model(model_type, **overrides)


def keeps(case: str, cut: str) -> list[HeadKeep | None]:
    """`uniform`: in both layers, the second half of every KV group's query heads where groups
    hold several, else every other KV group; `per-layer`: layer 0 keeps everything, layer 1
    only its last KV group (with only its last query head where there is a single group)."""
    shape = head_shapes(dense(case).config)[0]
    size = shape.group_size
    if cut == "uniform":
        if size > 1:
            kv = torch.arange(shape.num_kv_heads)
            query = torch.tensor([h for h in range(shape.num_heads) if h % size >= size // 2])
        else:
            kv = query = torch.arange(1, shape.num_heads, 2)
        return [HeadKeep(kv, query)] * 2
    last = shape.num_kv_heads - 1
    query = torch.arange(last * size, (last + 1) * size)
    if shape.num_kv_heads == 1:
        query = query[-1:]
    return [None, HeadKeep(torch.tensor([last]), query)]


def pruned(case: str, cut: str) -> PreTrainedModel:
    model = dense(case)
    prune_heads(model, keeps(case, cut))
    return model


def masked(case: str, cut: str) -> PreTrainedModel:
    """The dense model with every removed head's output-projection columns zeroed."""
    model = dense(case)
    adapter = adapter_for(model.config)
    for layer, shape, kept in zip(
        decoder_layers(model), head_shapes(model.config), keeps(case, cut), strict=True
    ):
        if kept is None:
            continue
        weights = head_weights(layer, adapter, shape)
        with torch.no_grad():
            for head in set(range(shape.num_heads)) - set(kept.query.tolist()):
                weights.output[head].zero_()  # a view of the output projection's weight
    return model


def counts(model: PreTrainedModel) -> list[tuple[int, int]]:
    return [(shape.num_heads, shape.num_kv_heads) for shape in head_shapes(model.config)]


PARAMETRIZED = pytest.mark.parametrize(
    ("case", "cut"), [(case, cut) for case in CASES for cut in CUTS]
)


# ----- the cut ----------------------------------------------------------------------------------


@PARAMETRIZED
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_cut_computes_what_zeroing_the_removed_heads_computes(
    case: str, cut: str, attention: str
) -> None:
    """Eager attention reads the modules' cached counts (`num_heads`, `num_kv_heads`, ...)
    where SDPA infers some from the shapes, so a stale count shows in one of the two."""
    model, reference = dense(case), masked(case, cut)
    model.set_attn_implementation(attention)
    reference.set_attn_implementation(attention)
    prune_heads(model, keeps(case, cut))
    assert counts(model) == KEPT[case][cut]
    assert not torch.allclose(logits_of(reference), logits_of(dense(case)), atol=1e-3)
    torch.testing.assert_close(logits_of(model), logits_of(reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_the_config_keeps_the_built_counts_and_records_the_kept_ones_apart(case: str) -> None:
    model = pruned(case, "uniform")
    owner = decoder_config(model.config)
    assert counts_recorded_apart(model.config)
    assert owner.num_attention_heads == 4  # so hidden_size / heads is still the head size
    assert getattr(owner, f"{RECORDED_PREFIX}num_attention_heads") == 2
    assert {shape.head_dim for shape in head_shapes(model.config)} == {4}  # 16 / 4
    assert not getattr(owner, "is_heterogeneous", False)


@pytest.mark.parametrize("case", CASES)
def test_parameters_removed_are_the_removed_heads_costs(case: str) -> None:
    model = dense(case)
    adapter = adapter_for(model.config)
    before = head_shapes(model.config)
    costs = [
        head_costs(layer, adapter, shape)
        for layer, shape in zip(decoder_layers(model), before, strict=True)
    ]
    report = prune_heads(model, keeps(case, "per-layer"))
    removed = sum(
        (shape.num_heads - heads) * cost.per_query_head
        + (shape.num_kv_heads - kv) * cost.per_kv_head
        for shape, cost, (heads, kv) in zip(before, costs, counts(model), strict=True)
    )
    assert removed > 0
    assert report.params_before - report.params_after == removed
    assert model.num_parameters() == report.params_after


def test_keeping_every_head_records_nothing_apart(tmp_path: Path) -> None:
    model = dense("opt")
    prune_heads(model, [None, None])
    assert not any(name.startswith(RECORDED_PREFIX) for name in model.config.to_dict())
    save_model_folder(model, None, tmp_path / "out", {})
    assert not (tmp_path / "out" / MODELING_FILE).exists()


def test_pruning_again_counts_from_the_kept_heads(tmp_path: Path) -> None:
    model = pruned("gpt2", "uniform")  # heads 1 and 3 of 4 kept
    save_model_folder(model, None, tmp_path / "first", {})
    again = load_pruned(tmp_path / "first")
    keep = HeadKeep(torch.tensor([1]), torch.tensor([1]))  # of the 2 now left
    prune_heads(again, [keep, None])
    assert counts(again) == [(1, 1), (2, 2)]
    save_model_folder(again, None, tmp_path / "second", {})
    assert torch.equal(logits_of(load_pruned(tmp_path / "second")), logits_of(again))


# ----- saved folders ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every case and cut pruned and saved with PruneNet's writer, and loaded in a child
    interpreter without PruneNet (`trust_remote_code=True`).

    :return: the folders, the in-memory models' logits and greedy tokens, and the child's.
    """
    root = tmp_path_factory.mktemp("heads-derived")
    input_ids = sample_input_ids()
    paths, expected = {}, {}
    for case in CASES:
        for cut in CUTS:
            name = f"{case}-{cut}"
            paths[name] = root / name
            expected[name] = save_and_expect(pruned(case, cut), paths[name], input_ids)
    tensors, facts = load_without_prunenet(root, paths, input_ids)
    return {"paths": paths, "expected": expected, "tensors": tensors, "facts": facts}


@PARAMETRIZED
def test_folders_reload_with_load_pruned_with_identical_logits(case, cut, folders) -> None:
    name = f"{case}-{cut}"
    reloaded = load_pruned(folders["paths"][name])
    in_memory = pruned(case, cut)
    assert type(reloaded) is type(in_memory)
    assert counts(reloaded) == KEPT[case][cut]
    assert reloaded.num_parameters() == in_memory.num_parameters()
    assert torch.equal(logits_of(reloaded), folders["expected"][name]["logits"])


@PARAMETRIZED
def test_folders_load_without_prunenet_with_identical_logits(case, cut, folders) -> None:
    name = f"{case}-{cut}"
    assert "error" not in folders["facts"][name], folders["facts"][name]["error"]
    assert folders["facts"]["prunenet_modules"] == []
    assert folders["facts"][name]["is_transformers_class"] is True
    loaded, expected = folders["tensors"][name], folders["expected"][name]
    assert torch.equal(loaded["logits"], expected["logits"])
    assert torch.equal(loaded["generated"], expected["generated"])  # through the KV cache
    assert torch.equal(loaded["again_logits"], expected["logits"])  # after save_pretrained


@pytest.mark.parametrize("case", CASES)
def test_plain_from_pretrained_stops_at_the_narrowed_weights(case, folders) -> None:
    # No config field says "fewer heads of the same size": transformers builds all the heads.
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(folders["paths"][f"{case}-uniform"])


@pytest.mark.parametrize(
    ("case", "attribute", "value"),
    [
        ("opt", "model.decoder.layers.1.self_attn.num_heads", 2),
        ("gpt2", "transformer.h.1.attn.split_size", 8),  # c_attn's output splits into q, k, v
        ("falcon-multi-head", "transformer.h.1.self_attention.num_kv_heads", 2),
    ],
)
def test_the_structure_block_records_the_counts_each_forward_reads(
    case, attribute, value, folders
) -> None:
    folder = folders["paths"][f"{case}-uniform"]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_prunenet.")
    assert config[STRUCTURE_KEY]["attributes"][attribute] == value
    assert config["num_attention_heads" if case != "gpt2" else "n_head"] == 4


# ----- the command line, and what still refuses -------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_prune_removes_heads_of_these_architectures_under_a_parameter_budget(
    case: str, tmp_path: Path
) -> None:
    model = dense(case)
    model.save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    out = tmp_path / "out"
    argv = ["prune", "--model", str(tmp_path / "dense"), "--scorer", "magnitude", "--out",
            str(out), "--remove-params", "0.05", "--structures", "heads",
            "--selfgen-sequences", "4"]  # fmt: skip
    assert main(argv) == 0
    split = json.loads((out / "prunenet_report.json").read_text())["structures"]
    assert split["query_heads"] or split["kv_groups"]
    assert (out / MODELING_FILE).exists()
    reloaded = load_pruned(out)
    assert reloaded.num_parameters() == model.num_parameters() - split["params_removed"]
    assert sum(heads for heads, _ in counts(reloaded)) < 4 * len(counts(reloaded))


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_prune_with_ffn_and_heads_no_longer_refuses(model_type: str, tmp_path: Path) -> None:
    gqa_model(model_type).save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    argv = ["prune", "--model", str(tmp_path / "dense"), "--scorer", "magnitude", "--out",
            str(tmp_path / "out"), "--remove-params", "0.2", "--structures", "ffn,heads",
            "--selfgen-sequences", "4"]  # fmt: skip
    assert main(argv) == 0
    split = json.loads((tmp_path / "out" / "prunenet_report.json").read_text())["structures"]
    reloaded = load_pruned(tmp_path / "out")
    assert (
        reloaded.num_parameters()
        == gqa_model(model_type).num_parameters() - split["params_removed"]
    )


def test_falcon_with_alibi_is_refused_before_analysis() -> None:
    config = gqa_model("falcon", alibi=True).config
    with pytest.raises(PruneNetError, match="falcon with alibi: its ALiBi biases"):
        parse_structures("ffn,heads", config)
