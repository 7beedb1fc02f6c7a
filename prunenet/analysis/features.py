"""Per-row features of every FFN layer: what the policy sees.

Two feature sets share one layout. `weights` reads only the weights (so it also works when
streaming a checkpoint that never fits in memory). `selfgen` adds activation statistics on text
the model generated itself (`prunenet.analysis.selfgen`); it is the default because on
SmolLM2 the weights alone did not predict which neurons matter. Every feature is log-scaled
where positive and standardised within its layer, so the policy sees scale-free inputs and one
checkpoint transfers across layers, widths and models.

`FEATURE_VERSION` changes whenever the meaning or order of features changes; policy
checkpoints record it and are refused by a different version.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from prunenet.analysis.refit_statistics import RefitStatistics, collect_refit_statistics
from prunenet.analysis.selfgen import LayerActivations, SelfGenConfig, collect_activations
from prunenet.analysis.spectral import output_energy, row_spectral_stats, singular_values
from prunenet.core.arch import FFNWeights, adapter_for, decoder_layers
from prunenet.core.surgery import ffn_weights
from prunenet.errors import PruneNetError

FEATURE_VERSION = 1
SPECTRAL_RANK = 32

WEIGHT_FEATURES = ("input_norm", "output_norm", "leverage", "top_alignment")
ACTIVATION_FEATURES = ("act_rms", "act_mean_abs", "act_outlier", "act_rms_x_output_norm")
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "weights": WEIGHT_FEATURES,
    "selfgen": WEIGHT_FEATURES + ACTIVATION_FEATURES,
}
CONTEXT_FEATURES = ("ratio", "depth")


@dataclass
class LayerData:
    """Everything the environment and the scorers need about one layer.

    :param features: `d_ff x F` standardised row features (no context columns).
    :param ffn: the layer's neuron-first weights (for spectral rewards).
    :param activations: activation statistics on self-generated text, if collected.
    :param refit: what a ridge refit of any kept set achieves on held-out self-generated text
        (`prunenet.analysis.refit_statistics`), if collected (the `refit` reward needs it).
    """

    features: torch.Tensor
    ffn: FFNWeights
    activations: LayerActivations | None
    refit: RefitStatistics | None = None

    @cached_property
    def output_energy(self) -> float:
        """Energy of the unpruned FFN output on the activation sample (reward denominator)."""
        return output_energy(self.activations.sample, self.ffn.output.float())

    @cached_property
    def input_spectra(self) -> list[torch.Tensor]:
        """Singular values of each unpruned FFN input projection (the KS reward's reference)."""
        return [singular_values(w) for w in self.ffn.inputs]


def feature_names(feature_set: str) -> tuple[str, ...]:
    if feature_set not in FEATURE_SETS:
        raise PruneNetError(
            f"Unknown feature set {feature_set!r}; choose one of {', '.join(FEATURE_SETS)}."
        )
    return FEATURE_SETS[feature_set]


def model_layer_data(
    model: nn.Module,
    feature_set: str = "selfgen",
    selfgen: SelfGenConfig | None = None,
    collect: bool | None = None,
    refit_text: SelfGenConfig | None = None,
) -> list[LayerData]:
    """Features for every layer of `model`.

    :param collect: also collect self-generated activations (needed by the `selfgen` feature
        set and by function-preservation rewards); defaults to whether the feature set needs them.
    :param refit_text: also collect refit statistics on this self-generated text (the `refit`
        reward's; `prunenet.analysis.refit_statistics.refit_text`); None collects none.
    """
    names = feature_names(feature_set)
    needs_activations = any(n in ACTIVATION_FEATURES for n in names)
    collect = needs_activations if collect is None else collect or needs_activations
    activations = collect_activations(model, selfgen) if collect else None
    refits = collect_refit_statistics(model, refit_text) if refit_text is not None else None
    adapter = adapter_for(model.config)
    layers = decoder_layers(model)
    data = []
    for index, layer in enumerate(layers):
        ffn = ffn_weights(layer, adapter)
        acts = activations[index] if activations else None
        refit = refits[index] if refits else None
        data.append(LayerData(layer_features(ffn, acts, feature_set), ffn, acts, refit))
    return data


def layer_features(
    ffn: FFNWeights, activations: LayerActivations | None, feature_set: str
) -> torch.Tensor:
    """`d_ff x F` standardised features of one layer, in `FEATURE_SETS[feature_set]` order."""
    names = feature_names(feature_set)
    raw = weight_feature_values(ffn)
    if any(n in ACTIVATION_FEATURES for n in names):
        if activations is None:
            raise PruneNetError(f"Feature set {feature_set!r} needs self-generated activations.")
        raw.update(activation_feature_values(activations, raw["output_norm"]))
    columns = [standardise(raw[name]) for name in names]
    return torch.stack(columns, dim=1)


def weight_feature_values(ffn: FFNWeights) -> dict[str, torch.Tensor]:
    inputs = [w.float() for w in ffn.inputs]
    input_norm = sum(w.pow(2).sum(dim=1) for w in inputs).sqrt()
    rank = min(SPECTRAL_RANK, *inputs[0].shape)
    leverage, alignment = row_spectral_stats(inputs[0], rank)
    return {
        "input_norm": input_norm,
        "output_norm": ffn.output.float().norm(dim=0),
        "leverage": leverage,
        "top_alignment": alignment,
    }


def activation_feature_values(
    activations: LayerActivations, output_norm: torch.Tensor
) -> dict[str, torch.Tensor]:
    return {
        "act_rms": activations.rms,
        "act_mean_abs": activations.mean_abs,
        "act_outlier": activations.max_abs / activations.rms.clamp_min(1e-12),
        "act_rms_x_output_norm": activations.rms * output_norm,
    }


def standardise(values: torch.Tensor) -> torch.Tensor:
    """log(positive values), then zero mean and unit variance within the layer."""
    logged = values.float().clamp_min(1e-12).log()
    centred = logged - logged.mean()
    return centred / centred.std().clamp_min(1e-6)
