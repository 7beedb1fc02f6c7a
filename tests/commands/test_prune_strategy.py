"""`prunenet prune --strategy policy|search` and `--requests`: per-layer amounts end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import prunenet.allocation.strategy as strategy_module
from prunenet.allocation.strategy import StrategyContext
from prunenet.cli import main
from prunenet.io.loading import load_pruned
from prunenet.io.saving import REPORT_FILE
from prunenet.rl.strategy import StrategyTrainConfig, train_strategy
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("no_disk_cache")


def _prune(model: Path, out: Path, *extra: str) -> int:
    argv = ["prune", "--model", str(model), "--scorer", "magnitude", "--out", str(out),
            "--selfgen-sequences", "4", "--selfgen-length", "12"]  # fmt: skip
    try:
        return main([*argv, *extra])
    except SystemExit as exit_:
        return exit_.code


def test_search_writes_a_per_layer_folder_with_exact_parameter_arithmetic(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    code = _prune(tiny_model_folder, out, "--remove-params", "0.2", "--strategy", "search",
                  "--search-evaluations", "4")  # fmt: skip
    assert code == 0
    report = json.loads((out / REPORT_FILE).read_text())
    strategy = report["structures"]
    assert strategy["source"] == "search" and strategy["extra"]["evaluations"] == 4
    reloaded = load_pruned(out)
    dense = tiny_model("llama")
    assert reloaded.num_parameters() == dense.num_parameters() - strategy["params_removed"]
    assert strategy["removed_fraction"] >= 0.2
    printed = capsys.readouterr().out
    assert "self-gen KL" in printed and "search strategy per layer" in printed


def test_ramp_chooses_a_slope_by_kl_and_cuts_only_ffn_rows(
    tiny_model_folder, tmp_path, monkeypatch
) -> None:
    def no_descriptors(self):  # only the policy reads them; they cost minutes on a real model
        raise AssertionError("ramp computed layer descriptors")

    monkeypatch.setattr(StrategyContext, "_describe", no_descriptors)
    out = tmp_path / "out"
    assert _prune(tiny_model_folder, out, "--remove-params", "0.2", "--strategy", "ramp") == 0
    strategy = json.loads((out / REPORT_FILE).read_text())["structures"]
    assert (
        strategy["source"] == "ramp" and strategy["extra"]["slope"] in strategy["extra"]["slopes"]
    )
    assert strategy["layers"] == [] and not any(strategy["query_heads"])


def test_a_requests_file_writes_one_folder_per_budget(tiny_model_folder, tmp_path) -> None:
    requests = tmp_path / "requests.txt"
    requests.write_text("# budgets\n0.1\n\n0.2\n")
    out = tmp_path / "out"
    code = _prune(tiny_model_folder, out, "--requests", str(requests), "--strategy", "search",
                  "--search-evaluations", "2")  # fmt: skip
    assert code == 0
    for budget in ("0.10", "0.20"):
        report = json.loads((out / f"params-{budget}" / REPORT_FILE).read_text())
        assert report["structures"]["target"] == float(budget)


def test_a_json_requests_file_with_the_uniform_split_works_too(tiny_model_folder, tmp_path):
    requests = tmp_path / "requests.json"
    requests.write_text("[0.1, 0.15]")
    assert _prune(tiny_model_folder, tmp_path / "out", "--requests", str(requests)) == 0
    assert (tmp_path / "out" / "params-0.15" / REPORT_FILE).is_file()


@pytest.mark.parametrize("base", ["uniform", "ramp"])
def test_a_strategy_policy_checkpoint_decides_the_amounts(tiny_model_folder, tmp_path, base):
    model = load_pruned(tiny_model_folder)
    context = StrategyContext(model, torch.randint(3, 60, (16, 12)))
    checkpoint = tmp_path / "strategy.zip"
    # The tiny model's FFN rows can give 33.8% of it: the range stays below that.
    config = StrategyTrainConfig(timesteps=16, eval_every=2, budget_range=(0.05, 0.3), base=base)
    train_strategy(context, config, checkpoint)
    out = tmp_path / "out"
    code = _prune(tiny_model_folder, out, "--remove-params", "0.2", "--strategy", "policy",
                  "--strategy-policy", str(checkpoint))  # fmt: skip
    assert code == 0
    record = json.loads((out / REPORT_FILE).read_text())["structures"]
    assert record["source"] == "policy"
    # A ramp-based policy's folder says which ramp it corrected.
    assert (record["extra"].get("base") == "ramp") == (base == "ramp")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--ratio", "0.3", "--strategy", "search"), "use it with --remove-params"),
        (("--remove-params", "0.2", "--strategy-policy", "x.zip"), "only read with"),
        (("--remove-params", "0.2", "--strategy", "policy", "--strategy-policy", "no.zip"),
         "could not be read"),
        (("--remove-params", "0.2", "--strategy", "search", "--structures", "layers"),
         "include ffn"),
        (("--requests", "missing.txt"), "cannot read"),
        (("--remove-params", "0.2", "--strategy", "ramp", "--structures", "ffn,layers"),
         "cuts nothing else"),
    ],
)  # fmt: skip
def test_bad_strategy_requests_exit_2_before_any_work(
    tiny_model_folder, tmp_path, capsys, extra, message, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert _prune(tiny_model_folder, tmp_path / "out", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _texts_written(monkeypatch) -> list[torch.Tensor]:
    """Every own text generated from now on (every module that generates one is watched)."""
    import prunenet.allocation.sensitivity as sensitivity
    import prunenet.analysis.selfgen as selfgen

    written: list[torch.Tensor] = []
    generate = selfgen.generate_own_text

    def counted(*args, **kwargs):
        written.append(generate(*args, **kwargs))
        return written[-1]

    for module in (selfgen, sensitivity):
        monkeypatch.setattr(module, "generate_own_text", counted)
    return written


def test_a_strategy_run_writes_one_text_that_the_strategy_and_the_cut_both_read(
    tiny_model_folder, tmp_path, monkeypatch
) -> None:
    written, read_by_strategy = _texts_written(monkeypatch), []
    context = strategy_module.StrategyContext.__init__

    def spy(self, model, tokens, *args, **kwargs):
        read_by_strategy.append(tokens)
        context(self, model, tokens, *args, **kwargs)

    monkeypatch.setattr(strategy_module.StrategyContext, "__init__", spy)
    code = _prune(tiny_model_folder, tmp_path / "out", "--remove-params", "0.2",
                  "--strategy", "search", "--search-evaluations", "2")  # fmt: skip
    assert code == 0
    assert len(written) == 1 and len(read_by_strategy) == 1
    assert torch.equal(read_by_strategy[0], strategy_module.strategy_tokens(written[0]))


def test_an_auto_run_writes_one_text_that_the_sensitivity_and_the_cut_both_read(
    tiny_model_folder, tmp_path, monkeypatch
) -> None:
    import prunenet.allocation.sensitivity as sensitivity

    written, read_by_sensitivity = _texts_written(monkeypatch), []
    measure = sensitivity.run_text_sensitivity

    def spy(model, scorer, tokens, *args, **kwargs):
        read_by_sensitivity.append(tokens)
        return measure(model, scorer, tokens, *args, **kwargs)

    monkeypatch.setattr(sensitivity, "run_text_sensitivity", spy)
    assert _prune(tiny_model_folder, tmp_path / "out", "--ratio", "0.3", "--strategy", "auto") == 0
    assert len(written) == 1 and len(read_by_sensitivity) == 1
    assert torch.equal(read_by_sensitivity[0], written[0])
