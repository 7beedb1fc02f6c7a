"""Pruned models whose layers have different FFN widths or attention-head counts: saved,
reloaded, identical logits.

transformers 5.23 stores per-layer widths (`per_layer_config`) but the supported architectures'
MLPs read one global width, so these folders reload through `prunenet.load_pruned`
(prunenet/loading.py explains why); plain `from_pretrained` must fail loudly, never load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from prunenet import load_pruned
from prunenet.core.compress import prune_model
from prunenet.core.config_fields import ffn_width, ffn_widths, head_shapes
from prunenet.core.heads import HeadKeep, prune_heads
from prunenet.core.ratios import uniform_keep
from prunenet.errors import PruneNetError
from prunenet.io.loading import drop_remote_code
from prunenet.io.models import load_model
from prunenet.io.saving import save_pruned
from tests.conftest import ALL_MODEL_TYPES, logits_of, tiny_model, tiny_tokenizer
from tests.core.test_heads import REMOVABLE, gqa_model

NAMED_IN_THE_ISSUE = ["llama", "qwen2", "gemma3_text", "opt"]


def prune_unevenly(model_type: str):
    """A tiny model with layer 0 cut by 3 rows and layer 1 by 7, chosen by random scores."""
    model = tiny_model(model_type)
    width = ffn_width(model.config)
    generator = torch.Generator().manual_seed(7)
    scores = [torch.rand(width, generator=generator) for _ in range(2)]
    report = prune_model(model, scores, [width - 3, width - 7], target_ratio=0.2)
    return model, report


def saved_unevenly(model_type: str, folder: Path):
    model, report = prune_unevenly(model_type)
    save_pruned(model, tiny_tokenizer(), folder, report)
    return model, report


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_nonuniform_model_reloads_with_identical_logits(model_type, tmp_path):
    pruned, report = saved_unevenly(model_type, tmp_path / "out")
    reloaded = load_pruned(tmp_path / "out")
    assert ffn_widths(reloaded.config) == report.ffn_widths_after
    assert len(set(report.ffn_widths_after)) == 2
    assert type(reloaded) is type(pruned)  # no PruneNet class leaks into the model or config
    assert torch.equal(logits_of(reloaded), logits_of(pruned))


@pytest.mark.parametrize("model_type", NAMED_IN_THE_ISSUE)
def test_plain_from_pretrained_fails_loudly_instead_of_reinitialising(model_type, tmp_path):
    pruned, _ = saved_unevenly(model_type, tmp_path / "out")
    try:
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    except RuntimeError as error:  # 5.23: AmbiguousGlobalPerLayerAttributeError
        assert "per-layer attribute" in str(error)
    else:  # a transformers that builds layers from per_layer_config must load them exactly
        assert torch.equal(logits_of(plain), logits_of(pruned))


def test_forcing_the_global_width_stops_at_a_size_mismatch(tmp_path):
    saved_unevenly("llama", tmp_path / "out")
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(
            tmp_path / "out", allow_global_per_layer_attribute_access=True
        )


def test_config_keeps_the_widest_layer_globally_and_overrides_the_rest(tmp_path):
    saved_unevenly("llama", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    widest = ffn_width(tiny_model("llama").config) - 3
    assert config["intermediate_size"] == widest
    assert config["per_layer_config"] == {"1": {"intermediate_size": widest - 4}}


def test_a_reloaded_model_saves_the_same_config(tmp_path):
    saved_unevenly("opt", tmp_path / "out")
    load_pruned(tmp_path / "out").save_pretrained(tmp_path / "again")
    first = json.loads((tmp_path / "out" / "config.json").read_text())
    second = json.loads((tmp_path / "again" / "config.json").read_text())
    # Plain save_pretrained has no modeling file to point at, so it writes no auto_map for one;
    # PruneNet's writer adds both again (tests/io/test_remote_code.py).
    assert second == drop_remote_code(first)


def test_uniform_widths_write_no_per_layer_config_and_load_plainly(tmp_path):
    model = tiny_model("qwen2")
    width = ffn_width(model.config)
    report = prune_model(
        model, [torch.rand(width)] * 2, uniform_keep(ffn_widths(model.config), 0.25)
    )
    save_pruned(model, None, tmp_path / "out", report)
    assert "per_layer_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(logits_of(plain), logits_of(model))


def test_pruning_a_nonuniform_model_again_is_refused_clearly():
    model, _ = prune_unevenly("llama")
    scores = [torch.rand(width) for width in ffn_widths(model.config)]
    with pytest.raises(PruneNetError, match="different FFN widths"):
        prune_model(model, scores, uniform_keep(ffn_widths(model.config), 0.1))


def test_load_model_reads_nonuniform_folders_transparently(tmp_path):
    pruned, _ = saved_unevenly("gemma3_text", tmp_path / "out")
    model, tokenizer = load_model(str(tmp_path / "out"))
    assert torch.equal(logits_of(model), logits_of(pruned))
    assert tokenizer("w5 w6")["input_ids"]


def test_missing_weights_are_an_error_not_a_silent_reinit(tmp_path):
    saved_unevenly("llama", tmp_path / "out")
    weights_file = tmp_path / "out" / "model.safetensors"
    weights = load_file(weights_file)
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, weights_file, metadata={"format": "pt"})
    with pytest.raises(PruneNetError, match="re-initialised"):
        load_pruned(tmp_path / "out")


def test_a_config_that_disagrees_with_the_weights_is_an_error(tmp_path):
    saved_unevenly("llama", tmp_path / "out")
    config_file = tmp_path / "out" / "config.json"
    config = json.loads(config_file.read_text())
    config["per_layer_config"]["1"]["intermediate_size"] -= 1
    config_file.write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="mismatch"):
        load_pruned(config_file.parent)


def test_load_pruned_refuses_arguments_that_would_defeat_its_checks(tmp_path):
    saved_unevenly("llama", tmp_path / "out")
    with pytest.raises(PruneNetError, match="ignore_mismatched_sizes"):
        load_pruned(tmp_path / "out", ignore_mismatched_sizes=True)


def test_load_pruned_honours_dtype(tmp_path):
    _, report = saved_unevenly("llama", tmp_path / "out")
    model = load_pruned(tmp_path / "out", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert ffn_widths(model.config) == report.ffn_widths_after


# ----- per-layer attention-head counts (prunenet.core.heads), alone and with FFN widths --------


def heads_unevenly(model_type: str, ffn: str | None = None):
    """A tiny 4-head / 2-KV-group model whose layer 1 loses KV group 0 (and its query heads);
    `ffn` = "before" / "after" also cuts the FFNs unevenly before / after the heads."""
    model = gqa_model(model_type)
    width = ffn_width(model.config)
    generator = torch.Generator().manual_seed(7)
    scores = [torch.rand(width, generator=generator) for _ in range(2)]
    if ffn == "before":
        prune_model(model, scores, [width - 3, width - 7])
    prune_heads(model, [None, HeadKeep(torch.tensor([1]), torch.tensor([2, 3]))])
    if ffn == "after":
        prune_model(model, scores, [width - 3, width - 7])
    return model


@pytest.mark.parametrize("model_type", REMOVABLE)
@pytest.mark.parametrize(
    "ffn", [None, "before", "after"], ids=["heads", "ffn-then-heads", "heads-then-ffn"]
)
def test_per_layer_head_counts_reload_with_identical_logits(model_type, ffn, tmp_path):
    pruned = heads_unevenly(model_type, ffn)
    pruned.save_pretrained(tmp_path / "out")
    reloaded = load_pruned(tmp_path / "out")
    assert [(s.num_heads, s.num_kv_heads) for s in head_shapes(reloaded.config)] == [(4, 2), (2, 1)]
    assert ffn_widths(reloaded.config) == ffn_widths(pruned.config)
    assert type(reloaded) is type(pruned)
    assert torch.equal(logits_of(reloaded), logits_of(pruned))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi3", "gemma3"])
def test_plain_from_pretrained_refuses_per_layer_head_counts_loudly(model_type, tmp_path):
    heads_unevenly(model_type).save_pretrained(tmp_path / "out")
    # 5.24: AmbiguousGlobalPerLayerAttributeError, or (configs saved with global access, see
    # config_fields.set_layer_values) a size mismatch at the first narrower weight; never a
    # silent load.
    with pytest.raises(RuntimeError, match="per-layer attribute|mismatch"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_head_overrides_sit_beside_width_overrides_in_config_json(tmp_path):
    heads_unevenly("qwen2", ffn="before").save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["head_dim"] == 4  # explicit: Qwen2 would derive 16 / 2 = 8 for layer 1
    assert config["per_layer_config"]["1"] == {
        "intermediate_size": config["intermediate_size"] - 4,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }


def test_a_reloaded_per_layer_head_model_saves_the_same_config(tmp_path):
    heads_unevenly("llama", ffn="after").save_pretrained(tmp_path / "out")
    load_pruned(tmp_path / "out").save_pretrained(tmp_path / "again")
    first = json.loads((tmp_path / "out" / "config.json").read_text())
    second = json.loads((tmp_path / "again" / "config.json").read_text())
    assert second == first
