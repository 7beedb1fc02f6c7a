"""The model card every output folder carries: Hugging Face metadata, what was removed, how to
load it, and the evaluation numbers once `prunenet eval` has run."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard

from prunenet.io.model_card import (
    EVALUATION_END,
    EVALUATION_START,
    NOT_EVALUATED,
    evaluation_markdown,
    is_prunenet_card,
    render_model_card,
    with_evaluation,
    write_model_card,
)

REPORT = {
    "model_type": "llama",
    "num_layers": 2,
    "ffn_width_before": 24,
    "ffn_widths_after": [12, 10],
    "params_before": 5968,
    "params_after": 4800,
    "ffn_ratio": 0.5417,
    "structures": {"layers": [1], "query_heads": 1, "kv_groups": 0},
    "scorer": {"scorer": "policy", "allocation": "uniform", "sequential": {"mode": "lsq"}},
}


def _card(tmp_path: Path, **kwargs) -> ModelCard:
    text = render_model_card(REPORT, source="smollm2-135m", **kwargs)
    return ModelCard.load(write_model_card(tmp_path, text))


def test_card_metadata_loads_with_huggingface_hub(tmp_path: Path) -> None:
    card = _card(tmp_path, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", license="apache-2.0")

    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.library_name == "transformers"
    assert card.data.license == "apache-2.0"
    assert {"pruned", "prunenet", "llama"} <= set(card.data.tags)


def test_card_claims_no_license_nobody_granted(tmp_path: Path) -> None:
    card = _card(tmp_path)

    assert card.data.license is None
    assert card.data.base_model is None


def test_card_body_says_what_was_removed_and_how_to_load(tmp_path: Path) -> None:
    text = render_model_card(
        REPORT, source="smollm2-135m", command="prunenet prune --ratio 0.5", needs_remote_code=True
    )

    assert "5,968 -> 4,800 parameters (19.6% removed)" in text
    assert "12-10" not in text and "10-12 (per layer: 12, 10)" in text
    assert "| layers dropped | 1 |" in text
    assert "prunenet prune --ratio 0.5" in text
    assert "prunenet.load_pruned" in text and "trust_remote_code=True" in text
    assert NOT_EVALUATED in text


def test_uniform_card_loads_with_plain_from_pretrained(tmp_path: Path) -> None:
    text = render_model_card(REPORT, source="x")

    assert "trust_remote_code" not in text
    assert "AutoModelForCausalLM.from_pretrained" in text


def test_with_evaluation_replaces_only_the_evaluation_section() -> None:
    card = render_model_card(REPORT, source="x", command="prunenet prune")
    record = {
        "perplexity": {"boolq": 45.7, "code": 12.9},
        "kl": {"boolq": 0.25},
        "protocol": {"seqlen": 512, "ppl_windows": 16},
        "device": "cpu",
        "threads": 2,
        "reference": "smollm2-135m",
        "model": {"dtype": "float32"},
    }

    updated = with_evaluation(card, evaluation_markdown(record))
    again = with_evaluation(updated, evaluation_markdown(record))

    assert NOT_EVALUATED not in updated
    assert "| boolq | 45.700 | 0.2500 |" in updated and "| code | 12.900 | - |" in updated
    assert "16 windows of 512 tokens" in updated
    assert updated.count(EVALUATION_START) == 1 and updated.count(EVALUATION_END) == 1
    assert again == updated
    assert updated.split(EVALUATION_START)[0] == card.split(EVALUATION_START)[0]


def test_only_prunenet_cards_are_recognised(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# My own notes\n")
    assert not is_prunenet_card(tmp_path)

    write_model_card(tmp_path, render_model_card(REPORT, source="x"))
    assert is_prunenet_card(tmp_path)
