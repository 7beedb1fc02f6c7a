"""Architecture adapters: every supported model type has a row, the row matches the modules the
modeling code builds (FFN, attention heads, output bias), and the README's table says what the
rows say."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunenet.core.arch import (
    ADAPTERS,
    adapter_for,
    can_store_output_bias,
    decoder_layers,
    supported_model_types,
)
from prunenet.core.config_fields import head_shapes
from prunenet.core.surgery import attention_modules, ffn_modules
from prunenet.errors import PruneNetError
from tests.conftest import ALL_MODEL_TYPES, HIDDEN_SIZE, TINY_CONFIGS, tiny_config, tiny_model


def test_every_adapter_has_a_tiny_test_config() -> None:
    assert set(TINY_CONFIGS) == set(ADAPTERS)


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_tiny_model_reports_the_adapters_model_type(model_type: str) -> None:
    assert tiny_model(model_type).config.model_type == model_type


def test_unknown_model_type_error_lists_the_supported_types() -> None:
    config = tiny_config("llama")
    config.model_type = "not-a-real-architecture"
    with pytest.raises(PruneNetError, match="not-a-real-architecture") as error:
        adapter_for(config)
    for model_type in supported_model_types():
        assert model_type in str(error.value)


def architecture_table_rows() -> list[str]:
    """The README's supported-architectures table, one Markdown row per adapter."""
    rows = []
    for model_type, adapter in sorted(ADAPTERS.items()):
        width = f"`{adapter.width_field}`"
        if adapter.default_width is not None:
            width += f" (unset: {adapter.default_width} x hidden)"
        cells = [
            f"`{model_type}`",
            f"`{adapter.layers}`",
            ", ".join(f"`{path}`" for path in adapter.inputs),
            f"`{adapter.output}`",
            width,
            adapter.layout,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def test_readme_lists_every_adapter_as_the_code_defines_it() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    missing = [row for row in architecture_table_rows() if row not in readme]
    assert not missing, "README architecture table is out of date; regenerate with:\n" + "\n".join(
        architecture_table_rows()
    )


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_every_adapter_knows_its_attention_heads_and_they_match_the_modules(
    model_type: str,
) -> None:
    model = tiny_model(model_type)
    adapter = adapter_for(model.config)
    assert adapter.attention is not None
    for layer, shape in zip(decoder_layers(model), head_shapes(model.config), strict=True):
        projections, output = attention_modules(layer, adapter)
        out_dim = 1 if adapter.attention.conv1d else 0  # Conv1D stores in x out
        rows = sum(m.weight.shape[out_dim] for m in projections)
        assert rows == (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
        assert output.weight.numel() == shape.num_heads * shape.head_dim * HIDDEN_SIZE


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_output_bias_support_matches_what_the_modeling_code_builds(model_type: str) -> None:
    model = tiny_model(model_type)
    adapter = adapter_for(model.config)
    _, output = ffn_modules(decoder_layers(model)[0], adapter)
    has_bias = getattr(output, "bias", None) is not None
    if adapter.output_bias == "switchable":
        # The flag is off by default: no bias yet, but one can be switched on.
        assert not has_bias and can_store_output_bias(model.config)
    else:
        assert has_bias == can_store_output_bias(model.config)
