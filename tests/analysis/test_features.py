"""Per-row features: layout, scale-freeness, row-permutation equivariance and clear errors."""

from __future__ import annotations

import pytest
import torch

from prunenet.analysis.features import (
    ACTIVATION_FEATURES,
    FEATURE_SETS,
    WEIGHT_FEATURES,
    feature_names,
    layer_features,
    model_layer_data,
    standardise,
)
from prunenet.analysis.selfgen import LayerActivations
from prunenet.core.arch import FFNWeights, adapter_for, decoder_layers
from prunenet.core.surgery import ffn_weights
from prunenet.errors import PruneNetError
from tests.conftest import FFN_WIDTH, tiny_model
from tests.conftest import SMALL_SELFGEN as SMALL

pytestmark = pytest.mark.usefixtures("no_disk_cache")


def _first_layer(model_type: str = "llama"):
    model = tiny_model(model_type)
    data = model_layer_data(model, "selfgen", SMALL)
    return model, data[0]


def test_feature_sets_are_weights_then_activation_features() -> None:
    assert feature_names("weights") == WEIGHT_FEATURES
    assert feature_names("selfgen") == WEIGHT_FEATURES + ACTIVATION_FEATURES


def test_unknown_feature_set_is_refused_with_the_known_ones_listed() -> None:
    with pytest.raises(PruneNetError, match="Unknown feature set 'nope'.*weights"):
        feature_names("nope")


@pytest.mark.parametrize("feature_set", sorted(FEATURE_SETS))
def test_model_layer_data_gives_one_standardised_feature_matrix_per_layer(
    feature_set: str,
) -> None:
    model = tiny_model("llama")
    data = model_layer_data(model, feature_set, SMALL)
    assert len(data) == len(decoder_layers(model))
    for layer in data:
        assert layer.features.shape == (FFN_WIDTH, len(FEATURE_SETS[feature_set]))
        assert torch.all(torch.isfinite(layer.features))
        assert torch.allclose(layer.features.mean(0), torch.zeros(1), atol=1e-5)
        assert torch.allclose(layer.features.std(0), torch.ones(1), atol=1e-4)


def test_weights_feature_set_collects_no_activations_unless_asked() -> None:
    model = tiny_model("llama")
    assert model_layer_data(model, "weights", SMALL)[0].activations is None
    assert model_layer_data(model, "weights", SMALL, collect=True)[0].activations is not None


def test_selfgen_features_without_activations_are_refused() -> None:
    _, layer = _first_layer()
    with pytest.raises(PruneNetError, match="needs self-generated activations"):
        layer_features(layer.ffn, None, "selfgen")


def test_features_are_scale_free() -> None:
    """Scaling a layer's weights (e.g. another model's init scale) leaves its features alone."""
    _, layer = _first_layer()
    scaled_ffn = FFNWeights([3.0 * w for w in layer.ffn.inputs], 0.5 * layer.ffn.output)
    scaled = layer_features(scaled_ffn, None, "weights")
    assert torch.allclose(scaled, layer_features(layer.ffn, None, "weights"), atol=1e-4)


def test_permuting_ffn_rows_permutes_the_features() -> None:
    _, layer = _first_layer()
    order = torch.randperm(FFN_WIDTH, generator=torch.Generator().manual_seed(0))
    ffn = FFNWeights([w[order] for w in layer.ffn.inputs], layer.ffn.output[:, order])
    acts = layer.activations
    permuted_acts = LayerActivations(
        acts.rms[order], acts.mean_abs[order], acts.max_abs[order], acts.sample[:, order]
    )
    permuted = layer_features(ffn, permuted_acts, "selfgen")
    assert torch.allclose(permuted, layer.features[order], atol=1e-4)


def test_activation_product_feature_is_rms_times_output_column_norm() -> None:
    _, layer = _first_layer()
    column = feature_names("selfgen").index("act_rms_x_output_norm")
    expected = standardise(layer.activations.rms * layer.ffn.output.norm(dim=0))
    assert torch.allclose(layer.features[:, column], expected, atol=1e-5)


def test_a_dead_neuron_gives_finite_features() -> None:
    model = tiny_model("llama")
    layer = decoder_layers(model)[0]
    with torch.no_grad():
        layer.mlp.gate_proj.weight[3] = 0.0
        layer.mlp.up_proj.weight[3] = 0.0
        layer.mlp.down_proj.weight[:, 3] = 0.0
    ffn = ffn_weights(layer, adapter_for(model.config))
    data = model_layer_data(model, "selfgen", SMALL)
    assert torch.all(torch.isfinite(layer_features(ffn, data[0].activations, "selfgen")))
    assert torch.all(torch.isfinite(data[0].features))


def test_features_of_a_bf16_layer_are_float32_and_equal_those_of_its_exact_values() -> None:
    # The policy sees float32 features whatever dtype the model runs in: the weight features
    # upcast before any product (norms of bf16 rows summed in bf16 would lose digits).
    model, layer = _first_layer()
    weights = layer.ffn
    low = FFNWeights([w.bfloat16() for w in weights.inputs], weights.output.bfloat16())
    exact = FFNWeights([w.float() for w in low.inputs], low.output.float())
    features = layer_features(low, layer.activations, "selfgen")
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, layer_features(exact, layer.activations, "selfgen"))
