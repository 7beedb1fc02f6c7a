"""One analysis of the dense model, shared by many requests: each request is then a selection
and a small ridge solve per layer.

The default path (`prunenet.analysis.sequential`) walks the model once per request: layer i is
scored and refitted on the activations of the model whose layers 0..i-1 are already cut *for
that request*, so nothing but the text can be shared between two budgets. Here the dense model
is walked once, on the same self-generated text, and every layer keeps what the requests need:

- the scorer's statistics of its FFN activations on the fit rows (`layer_activations`, as the
  sequential path passes them to `Scorer.score_activations`), and
- the refit's moments: float64 Grams of `[acts, 1]` on the fit rows and on the held-out rows
  and the start token's row (`prunenet.analysis.refit_statistics.RefitStatistics`). The dense
  target `acts @ W.T + b` is linear in `[acts, 1]`, so its cross moments follow from the Grams.

The ridge of each layer is chosen once, on the held-out rows, for a reference keep set
(`refit_statistics.choose_ridge`: the 70% of rows with the most output energy), and the fit and
held-out Grams are then added, as the sequential refit refits on all rows with the ridge it
chose. A request then costs, per layer, one scoring call on the stored statistics, the top rows,
and one Cholesky solve of the kept block with the start token's row reproduced exactly
(`prunenet.core.refit.gram_refit`: the refit algebra of the sequential cut, from moments).

What differs from the default path, and is measured in docs/strategies.md ("Many requests at
once"):
every layer is scored and refitted on the dense model's activations, not on those of the cut
model before it, and the ridge is chosen per layer, not per layer and request.
Memory on SmolLM2-135M: two (d_ff + 1)^2 float64 matrices per layer while its ridge is chosen,
one for all rows afterwards (0.6 GB for 30 layers), and 6 MB of scorer statistics per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from prunenet.analysis.layer_calls import attention_in_chunks, capture_layer_inputs, run_layer
from prunenet.analysis.refit_statistics import RefitStatistics, choose_ridge
from prunenet.analysis.selfgen import LayerActivations, layer_activations
from prunenet.analysis.sequential import (
    HELD_OUT_FRACTION,
    SAMPLE_ROWS,
    LayerScore,
    check_finite,
    held_out_sequences,
)
from prunenet.core.arch import adapter_for, can_store_output_bias, decoder_layers
from prunenet.core.compress import select_keep_indices
from prunenet.core.refit import add_to_gram, check_refit, gram_refit
from prunenet.core.surgery import (
    cut_ffn,
    enable_output_biases,
    ffn_modules,
    ffn_output_bias,
    ffn_weights,
    set_ffn_output,
)
from prunenet.errors import PruneNetError

# With at least this many requests and no --analysis, `prunenet prune --requests` says that
# --analysis shared exists. It is not chosen by itself: it is a speed trade, worse than the
# sequential cut on code at every measured budget (docs/strategies.md, 'Many requests at once').
SHARED_HINT_REQUESTS = 4
# Token rows per float64 Gram update (bounds the float64 copy: 8192 x 1537 x 8 B = 100 MB).
GRAM_CHUNK_ROWS = 8192


@dataclass
class SharedRefit:
    """One layer's refit moments on every row (fit and held out, the start token's left out).

    :param gram: `(d_ff + 1) x (d_ff + 1)` float64 `sum x x'` with `x = [acts, 1]`.
    :param cross: `(d_ff + 1) x d_model` `sum x' y`, y the dense FFN output (`gram @ output.T`).
    :param output: `d_model x (d_ff + 1)` dense output weights with the bias as the last column.
    :param anchor: the start token's activation row (d_ff), reproduced exactly.
    :param intercept: whether the refit fits an output bias.
    :param ridge: relative ridge (x the mean diagonal of the centred kept Gram).
    """

    gram: torch.Tensor
    cross: torch.Tensor
    output: torch.Tensor
    anchor: torch.Tensor
    intercept: bool
    ridge: float

    @classmethod
    def of(cls, statistics: RefitStatistics) -> SharedRefit:
        """From a layer's fit and held-out statistics, their ridge chosen: every row added."""
        gram = statistics.fit_gram
        if statistics.held_gram is not None:
            gram = gram + statistics.held_gram
        return cls(gram, gram @ statistics.output.T, statistics.output, statistics.anchor,
                   statistics.intercept, statistics.ridge)  # fmt: skip

    @property
    def width(self) -> int:
        return self.gram.shape[0] - 1


@dataclass
class SharedLayer:
    """What every request needs from one dense layer.

    :param activations: the scorer's statistics of the layer's FFN activations on the fit rows.
    :param refit: the refit's moments (None with `--refit none`).
    """

    activations: LayerActivations
    refit: SharedRefit | None


@dataclass
class SharedAnalysis:
    """The dense model's analysis, shared by every request (`shared_analysis`).

    :param layers: one entry per decoder layer.
    :param refit: `none`, `bias` or `lsq`.
    :param intercept: whether the refit fits an output bias (the architecture stores one).
    :param sequences: self-generated sequences analysed.
    :param held_out_sequences: of which held out (the ridge's choice; never scored).
    """

    layers: list[SharedLayer]
    refit: str
    intercept: bool
    sequences: int
    held_out_sequences: int

    def to_dict(self) -> dict:
        """What the report records about the analysis (ridges per layer)."""
        return {
            "mode": self.refit,
            "sequences": self.sequences,
            "held_out_sequences": self.held_out_sequences,
            "intercept": self.intercept,
            "ridge_reference_keep": "top 70% of rows by rms activation x output column norm",
            "ridges": [None if layer.refit is None else layer.refit.ridge for layer in self.layers],
        }


@torch.no_grad()
def shared_analysis(
    model: nn.Module,
    tokens: torch.Tensor,
    refit: str = "lsq",
    held_out_fraction: float = HELD_OUT_FRACTION,
) -> SharedAnalysis:
    """Walk the dense `model` once on its own text and keep each layer's scoring statistics and
    refit moments (module docstring). The model is not modified.

    :param model: the dense model.
    :param tokens: sequences x length ids it wrote (`prunenet.analysis.sequential.analysis_text`);
        the last `held_out_fraction` of the sequences is held out, as `SequentialCut` holds it.
    :param refit: `none`, `bias` or `lsq`.
    :param held_out_fraction: share of the sequences held out.
    """
    check_refit(refit)
    intercept = refit != "none" and can_store_output_bias(model.config)
    if refit == "bias" and not intercept:
        raise PruneNetError(
            f"--refit bias adds an FFN output bias, which {model.config.model_type} models "
            "cannot store (plain from_pretrained would drop it); use --refit lsq, which "
            "refits these models without an intercept, or --refit none."
        )
    adapter = adapter_for(model.config)
    held_sequences = held_out_sequences(tokens.shape[0], held_out_fraction)
    length = tokens.shape[1]
    held_rows = held_sequences * length
    hidden, layer_kwargs = capture_layer_inputs(model, tokens)
    layers = []
    walk = zip(decoder_layers(model), layer_kwargs, strict=True)
    for layer, arguments in tqdm(walk, total=len(layer_kwargs), desc="shared analysis (dense)",
                                 unit="layer", leave=False):  # fmt: skip
        captured: list[torch.Tensor] = []
        output_module = ffn_modules(layer, adapter)[1]
        handle = output_module.register_forward_pre_hook(
            lambda module, inputs, store=captured: store.append(
                inputs[0].reshape(-1, inputs[0].shape[-1])
            )
        )
        try:
            with attention_in_chunks(layer, adapter, hidden):
                hidden = run_layer(layer, hidden, arguments)  # the dense output feeds the next
        finally:
            handle.remove()
        acts = check_finite(captured[0].float(), "an FFN's activations", layer)
        fit, held = acts[:-held_rows], acts[-held_rows:]
        statistics = layer_activations(fit, kept_tokens=SAMPLE_ROWS, seed=0)
        moments = None
        if refit != "none":
            moments = _refit_moments(layer, adapter, fit, held, length, intercept)
            if refit == "lsq":
                choose_ridge(moments)
            moments = SharedRefit.of(moments)  # the solve refits on all rows, as lsq does
        layers.append(SharedLayer(statistics, moments))
        del acts, fit, held
        captured.clear()
    return SharedAnalysis(layers, refit, intercept, tokens.shape[0], held_sequences)


def _refit_moments(layer, adapter, fit, held, length, intercept) -> RefitStatistics:
    """Fit and held-out Grams of `[acts, 1]` without the start token's rows, and its row."""
    weight = ffn_weights(layer, adapter).output.detach().double().cpu()
    bias = ffn_output_bias(layer, adapter)
    bias = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else (
        bias.detach().double().cpu()
    )  # fmt: skip
    output = torch.cat([weight, bias[:, None]], dim=1)
    anchor = fit[0].double().cpu()
    grams = [_gram(_without_start(rows, length)) for rows in (fit, held)]
    return RefitStatistics(grams[0], grams[1], output, intercept, anchor)


def _without_start(rows: torch.Tensor, length: int) -> torch.Tensor:
    """Token rows of whole sequences without each sequence's first row (`SequentialCut`)."""
    return rows.reshape(-1, length, rows.shape[-1])[:, 1:].reshape(-1, rows.shape[-1])


def _gram(rows: torch.Tensor) -> torch.Tensor:
    """`sum x x'` over `x = [row, 1]`, in float64, a chunk of rows at a time."""
    gram = torch.zeros(rows.shape[1] + 1, rows.shape[1] + 1, dtype=torch.float64)
    return add_to_gram(gram, rows, GRAM_CHUNK_ROWS)


class SharedCut:
    """A `cut` for `prunenet.core.compress.prune_model` that cuts a copy of the dense model to
    one request from a `SharedAnalysis`: scores from the stored statistics (or the plan's),
    top rows, and the refit solved on the stored moments.

    :param model: the copy that is about to be cut (with an intercept on a `switchable`
        architecture, every FFN projection gets a zero bias first, as `SequentialCut` does).
    :param analysis: the dense model's `SharedAnalysis`.
    :param score: `score(ffn weights, statistics, layer index, layer count)` (a scorer with the
        request's ratio bound); None uses the scores given to the cut.
    """

    def __init__(
        self, model: nn.Module, analysis: SharedAnalysis, score: LayerScore | None = None
    ) -> None:
        self.adapter = adapter_for(model.config)
        self.analysis = analysis
        self.score = score
        self.layers = decoder_layers(model)
        if len(self.layers) != len(analysis.layers):
            raise PruneNetError(
                f"The shared analysis has {len(analysis.layers)} layers, the model "
                f"{len(self.layers)}: it belongs to another model."
            )
        if analysis.intercept:
            enable_output_biases(model)  # zero biases: the model still computes the same
        self.log: list[dict] = []

    def __call__(
        self, index: int, layer: nn.Module, scores: torch.Tensor | None, kept: int
    ) -> torch.Tensor:
        shared = self.analysis.layers[index]
        if self.score is not None:
            scores = self.score(ffn_weights(layer, self.adapter), shared.activations, index,
                                len(self.layers))  # fmt: skip
        if scores is None:
            raise PruneNetError(f"No scores for layer {index} and no scorer to compute them.")
        keep = select_keep_indices(scores, kept)
        dense_bias = ffn_output_bias(layer, self.adapter)
        cut_ffn(layer, self.adapter, keep)
        entry: dict = {}
        if self.analysis.refit == "lsq":
            weight, bias = solve_refit(shared.refit, keep)
            set_ffn_output(layer, self.adapter, weight, bias)
            entry = {"ridge": shared.refit.ridge}
        elif self.analysis.refit == "bias":
            set_ffn_output(layer, self.adapter, *_bias_refit(shared.refit, keep, dense_bias))
        self.log.append(entry)
        return keep


def solve_refit(
    statistics: SharedRefit, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The lsq refit of one layer cut to `keep`, from its moments: weights d_model x kept and
    the bias (None without an intercept), float64 (`prunenet.core.refit.gram_refit` at the
    layer's ridge, the start token's row reproduced exactly).

    :param statistics: the layer's moments (`SharedLayer.refit`).
    :param keep: sorted kept indices.
    """
    coefficients, bias = gram_refit(
        statistics.gram, statistics.cross, statistics.output, keep, statistics.ridge,
        statistics.intercept, statistics.anchor,
    )  # fmt: skip
    return coefficients.T.contiguous(), bias


def _bias_refit(statistics: SharedRefit, keep: torch.Tensor, dense_bias):
    """`--refit bias` from the moments: the removed neurons' mean contribution on the fit and
    held-out rows (without the start token's), added to the output bias."""
    width = statistics.width
    removed = torch.ones(width, dtype=torch.bool)
    removed[keep.to(torch.long)] = False
    means = statistics.gram[:width, width] / statistics.gram[width, width]
    lost = statistics.output[:, :width][:, removed] @ means[removed]
    bias = lost if dense_bias is None else dense_bias.double().cpu() + lost
    return statistics.output[:, :width][:, keep.to(torch.long)], bias
