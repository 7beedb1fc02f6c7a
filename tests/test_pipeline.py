"""The one pruning loop: a ratio list is scored once unless the scorer observes the ratio,
every plan is applied to a copy, and prune_and_save writes one reloadable folder per ratio."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunenet.analysis import selfgen
from prunenet.analysis.selfgen import SelfGenConfig
from prunenet.core.arch import adapter_for, can_store_output_bias
from prunenet.core.compress import prune_model
from prunenet.core.config_fields import ffn_width, ffn_widths
from prunenet.core.ratios import keep_count
from prunenet.errors import PruneNetError
from prunenet.pipeline import (
    PrunePlan,
    apply_plan,
    needs_text,
    prune_and_save,
    scorer_planner,
    text_needed,
)
from prunenet.scoring.heuristics import RandomScorer, SelfGenScorer
from tests.conftest import ALL_MODEL_TYPES, FFN_WIDTH, logits_of, tiny_model, tiny_tokenizer


class CountingScorer(RandomScorer):
    """Random scores that count how often the model is scored, and with which ratios."""

    def __init__(self, ratio_aware: bool) -> None:
        super().__init__(seed=0)
        self.ratio_aware = ratio_aware
        self.ratios_seen: list[float | None] = []

    def score_model(self, model, ratio=None):
        self.ratios_seen.append(ratio)
        return super().score_model(model, ratio=ratio)


@pytest.mark.parametrize(("ratio_aware", "expected"), [(False, [0.1]), (True, [0.1, 0.3, 0.5])])
def test_a_ratio_list_is_scored_once_unless_the_scorer_observes_the_ratio(
    ratio_aware: bool, expected: list[float]
) -> None:
    scorer = CountingScorer(ratio_aware)
    plan = scorer_planner(scorer)
    model = tiny_model("llama")
    for ratio in (0.1, 0.3, 0.5):
        plan(model, ratio)
    assert scorer.ratios_seen == expected


def test_uniform_plans_keep_the_same_rows_in_every_layer() -> None:
    plan = scorer_planner(RandomScorer(seed=0))(tiny_model("llama"), 0.3)
    assert plan.layer_keep == [keep_count(FFN_WIDTH, 0.3)] * 2
    assert plan.info["allocation"] == "uniform"


def test_apply_plan_prunes_a_copy_and_leaves_the_dense_model_alone() -> None:
    model = tiny_model("llama")
    dense_logits = logits_of(model)
    plan = scorer_planner(RandomScorer(seed=0))(model, 0.5)
    pruned, report = apply_plan(model, plan, 0.5)
    assert ffn_width(pruned.config) == keep_count(FFN_WIDTH, 0.5)
    assert ffn_width(model.config) == FFN_WIDTH
    assert torch.equal(logits_of(model), dense_logits)
    assert report.target_ratio == 0.5


def test_prune_and_save_writes_one_reloadable_folder_per_ratio(tmp_path: Path) -> None:
    folders = [tmp_path / "a", tmp_path / "b"]
    planner = scorer_planner(RandomScorer(seed=0))
    reports = prune_and_save(tiny_model("llama"), tiny_tokenizer(), planner, [0.25, 0.5], folders)
    for folder, ratio, report in zip(folders, [0.25, 0.5], reports, strict=True):
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
        assert ffn_width(reloaded.config) == keep_count(FFN_WIDTH, ratio)
        assert report.seconds > 0


def test_an_unknown_allocation_is_refused() -> None:
    with pytest.raises(PruneNetError, match="Unknown allocation"):
        scorer_planner(RandomScorer(), allocation="greedy")


# ----- refit ------------------------------------------------------------------------------------

REFIT_SELFGEN = SelfGenConfig(sequences=8, length=32, seed=0)


def test_refit_none_writes_the_same_safetensors_bytes_as_a_plain_prune_model(
    tmp_path: Path,
) -> None:
    scorer = RandomScorer(seed=3)
    prune_and_save(tiny_model("llama"), None, scorer_planner(scorer), [0.3], [tmp_path / "a"],
                   refit="none")  # fmt: skip
    direct = tiny_model("llama")
    widths = ffn_widths(direct.config)
    prune_model(direct, scorer.score_model(direct), [keep_count(w, 0.3) for w in widths])
    direct.save_pretrained(tmp_path / "b")
    written = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert written == (tmp_path / "b" / "model.safetensors").read_bytes()


REFIT_CASES = [
    (model_type, refit)
    for model_type in ALL_MODEL_TYPES
    for refit in ("bias", "lsq")
    if refit == "lsq" or can_store_output_bias(tiny_model(model_type).config)
]


@pytest.mark.parametrize(("model_type", "refit"), REFIT_CASES)
def test_refitted_folders_reload_with_plain_from_pretrained_and_identical_logits(
    model_type: str, refit: str, tmp_path: Path
) -> None:
    model = tiny_model(model_type)
    widths = ffn_widths(model.config)
    scores = [torch.rand(w, generator=torch.Generator().manual_seed(0)) for w in widths]
    plan = PrunePlan(scores, [keep_count(w, 0.3) for w in widths])
    pruned, _ = apply_plan(model, plan, 0.3, refit=refit, selfgen=REFIT_SELFGEN)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits_of(reloaded), logits_of(pruned), rtol=0, atol=0)


def test_a_refit_changes_the_pruned_weights() -> None:
    model = tiny_model("llama")
    widths = ffn_widths(model.config)
    plan = PrunePlan([torch.arange(w, dtype=torch.float) for w in widths],
                     [keep_count(w, 0.3) for w in widths])  # fmt: skip
    plain, _ = apply_plan(model, plan, 0.3)
    refitted, report = apply_plan(model, plan, 0.3, refit="lsq", selfgen=REFIT_SELFGEN)
    assert not torch.equal(logits_of(plain), logits_of(refitted))
    assert report.scorer["sequential"]["intercept"] is can_store_output_bias(model.config)
    assert adapter_for(refitted.config).output_bias == "switchable" and refitted.config.mlp_bias


def test_an_unknown_refit_is_refused() -> None:
    with pytest.raises(PruneNetError, match="Unknown refit"):
        apply_plan(tiny_model("llama"), PrunePlan([], []), 0.3, refit="ols")


def test_a_refit_over_a_ratio_list_generates_its_text_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_disk_cache: None
) -> None:
    calls = []
    real = selfgen.generate_own_text

    def counting(model, config):
        calls.append(config)
        return real(model, config)

    monkeypatch.setattr(selfgen, "generate_own_text", counting)
    small = SelfGenConfig(sequences=4, length=16, seed=0)
    planner = scorer_planner(RandomScorer(seed=0))
    folders = [tmp_path / "a", tmp_path / "b"]
    prune_and_save(
        tiny_model("llama"), None, planner, [0.25, 0.5], folders, refit="lsq", selfgen=small
    )
    assert len(calls) == 1
    assert all((folder / "model.safetensors").is_file() for folder in folders)


# ----- sequential analysis ----------------------------------------------------------------------


def test_a_sequential_plan_leaves_scoring_to_the_cut() -> None:
    plan = scorer_planner(SelfGenScorer(), analysis="sequential")(tiny_model("llama"), 0.3)
    assert plan.scores is None and plan.layer_score is not None
    assert plan.info["analysis"] == "sequential"


def test_sequential_analysis_with_a_weights_only_scorer_is_refused() -> None:
    with pytest.raises(PruneNetError, match="reads only weights"):
        scorer_planner(RandomScorer(), analysis="sequential")


def test_an_unknown_analysis_is_refused() -> None:
    with pytest.raises(PruneNetError, match="Unknown analysis"):
        scorer_planner(SelfGenScorer(), analysis="twice")


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_sequentially_scored_and_refitted_folders_reload_with_identical_logits(
    model_type: str, tmp_path: Path
) -> None:
    model = tiny_model(model_type)
    plan = scorer_planner(SelfGenScorer(), analysis="sequential")(model, 0.3)
    pruned, report = apply_plan(model, plan, 0.3, refit="lsq", selfgen=REFIT_SELFGEN)
    assert report.scorer["sequential"]["scored"] == "sequential"
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits_of(reloaded), logits_of(pruned), rtol=0, atol=0)


def test_sequential_analysis_over_a_ratio_list_generates_its_text_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = selfgen.generate_own_text
    monkeypatch.setattr(selfgen, "generate_own_text", lambda m, c: calls.append(c) or real(m, c))
    planner = scorer_planner(SelfGenScorer(), analysis="sequential")
    small = SelfGenConfig(sequences=4, length=16, seed=0)
    folders = [tmp_path / "a", tmp_path / "b"]
    prune_and_save(tiny_model("llama"), None, planner, [0.25, 0.5], folders, selfgen=small)
    # One for the sequential text; SelfGenScorer's one-shot text is never written.
    assert calls == [small]


def test_a_refit_reports_the_dense_models_parameter_count_as_before() -> None:
    model = tiny_model("llama")
    dense_params = sum(p.numel() for p in model.parameters())
    widths = ffn_widths(model.config)
    plan = PrunePlan([torch.arange(w, dtype=torch.float) for w in widths],
                     [keep_count(w, 0.3) for w in widths])  # fmt: skip
    _, report = apply_plan(model, plan, 0.3, refit="lsq", selfgen=REFIT_SELFGEN)
    assert report.params_before == dense_params


@pytest.mark.parametrize("analysis", ["oneshot", "sequential", "shared"])
@pytest.mark.parametrize("refit", ["none", "lsq"])
def test_the_text_rule_before_planning_agrees_with_the_plans_own(analysis, refit) -> None:
    model = tiny_model("llama")
    plan = scorer_planner(SelfGenScorer(), analysis=analysis)(model, 0.5)
    assert text_needed(analysis, refit) == needs_text(plan, refit)
