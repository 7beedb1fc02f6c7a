"""What a ridge refit of any kept set would achieve, without touching a token row per query.

At prune time the cut output projection is refitted by ridge least squares
(`prunenet.core.refit`), so which rows to keep is a different question from which rows are
largest: a row whose contribution the kept rows can reproduce costs little to remove. The `refit`
reward (`prunenet.rl.rewards`) asks that question for every keep set the policy proposes, so it
must be cheap. Everything the refit and its held-out error depend on is a second moment of
`x = [acts, 1]` (the output projection's inputs and an intercept column) plus the start token's
row, so one pass over the self-generated text stores, per layer and in float64, the Gram of `x`
on the fit rows and on the held-out rows, and that row. The dense target is linear in `x`
(`x @ [W, b].T`), so its products with the Grams follow from them. A query then costs one
Cholesky factorisation of the kept block and a few traces, the algebra of `refit_output`
solved from the Grams (`prunenet.core.refit.gram_refit` and `gram_error`):

    beta   = (Gc[K, K] + ridge * s * I)^-1 Cc[K]             (centred Gram and cross-product)
    beta  += the smallest correction (in that metric) that reproduces the start token's row
    error  = tr(theta' H theta) - 2 tr(B' H[K, :] theta) + tr(B' H[K, K] B)

with K the kept columns (and the intercept column, which the ridge does not penalise), `s` the
mean diagonal of the centred kept fit Gram, `B` the coefficients with the intercept appended,
`theta = [W, b].T` and H the held-out Gram. The text and split are the prune-time refit's
(`prunenet.analysis.sequential`: 64 x 128 self-generated tokens, the last quarter of the
sequences held out, the start token's row anchored: left out of both Grams and reproduced
exactly), but the activations are the dense model's, one layer at a time. The prune-time refit
chooses the ridge for each keep set on the held-out rows; here each layer's ridge is chosen once,
the same way, for a reference keep set (`choose_ridge`), so a query needs one factorisation.

Cost: two (d_ff + 1)^2 float64 matrices per layer, 1.1 GB for SmolLM2-135M (30 layers, d_ff
1536), and a query is O(kept^3). That is fine for training on a small model (the policy
transfers to other widths), not for LLaMA-7B shapes (62 GB).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import cached_property

import torch
from torch import nn

from prunenet.analysis.selfgen import SelfGenConfig, own_text
from prunenet.analysis.sequential import (
    ANALYSIS_SELFGEN,
    HELD_OUT_FRACTION,
    held_out_sequences,
)
from prunenet.core.arch import adapter_for, can_store_output_bias, decoder_layers
from prunenet.core.config_fields import ffn_widths
from prunenet.core.refit import (
    DEFAULT_RIDGE,
    RIDGE_CANDIDATES,
    add_to_gram,
    gram_error,
    gram_refit,
    lowest_error,
)
from prunenet.core.surgery import ffn_modules, ffn_output_bias, ffn_weights
from prunenet.io.cache import CacheEntryError, Info, Tensors, memoize, stored_tensor

# Sequences per forward pass while collecting (bounds the logits' memory, 200 MB on SmolLM2).
CHUNK_SEQUENCES = 8
# The reference keep set each layer's ridge is chosen for: this share of the rows with the most
# output energy (rms activation x output column norm), the middle of the training ratios.
REFERENCE_KEEP = 0.7


@dataclass
class RefitStatistics:
    """One layer's refit problem on self-generated text, ready to score keep sets.

    :param fit_gram: `(d_ff + 1) x (d_ff + 1)` float64 `sum x x'` over the fit rows, with
        `x = [acts, 1]` (so the last row and column hold the sums and the row count), the start
        token's rows left out when `anchor` is given.
    :param held_gram: the same over the held-out rows.
    :param output: `d_model x (d_ff + 1)` float64 dense output weights with the output bias as the
        last column (zeros where the layer has none): the dense output is `x @ output.T`.
    :param intercept: whether the refit fits an intercept (the architecture can store an output
        bias, `prunenet.core.arch.can_store_output_bias`), as the prune-time refit does.
    :param anchor: the start token's activation row (d_ff, float64), which the refit reproduces
        exactly instead of fitting it (`SequentialCut`'s default); None fits no anchor.
    :param ridge: relative ridge (x the mean diagonal of the centred kept Gram).
    """

    fit_gram: torch.Tensor
    held_gram: torch.Tensor
    output: torch.Tensor
    intercept: bool
    anchor: torch.Tensor | None = None
    ridge: float = DEFAULT_RIDGE

    @property
    def width(self) -> int:
        return self.fit_gram.shape[0] - 1

    @cached_property
    def fit_cross(self) -> torch.Tensor:
        """`(d_ff + 1) x d_model`: `sum x' y` over the fit rows, y the dense output."""
        return self.fit_gram @ self.output.T

    @cached_property
    def held_cross(self) -> torch.Tensor:
        """The same over the held-out rows."""
        return self.held_gram @ self.output.T

    @cached_property
    def held_energy(self) -> float:
        """`sum ||y||^2` of the dense output over the held-out rows (bias included)."""
        return float((self.output.T * self.held_cross).sum())

    def held_error(self, keep: torch.Tensor) -> float:
        """Held-out squared error of the refitted cut layer over `held_energy`.

        Equals `output_error(...) / mean(dense held output ** 2)` on the held-out rows for the
        weights `refit_output(..., held=None, intercept=self.intercept, anchor=...)` fits on the
        fit rows with relative ridge `self.ridge` (up to rounding), without a pass over any
        token row.

        :param keep: indices of the kept neurons.
        """
        keep = keep.to(torch.long).reshape(-1)
        coefficients, bias = self.solution(keep)
        error = gram_error(self.held_gram, self.held_cross, self.held_energy, keep, coefficients,
                           bias)  # fmt: skip
        return error / max(self.held_energy, 1e-300)

    def solution(self, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The refit of the cut layer on the fit rows at `self.ridge`: (coefficients kept x
        d_model, bias or None), float64 (`prunenet.core.refit.gram_refit`).

        :param keep: indices of the kept neurons.
        """
        return gram_refit(self.fit_gram, self.fit_cross, self.output, keep, self.ridge,
                          self.intercept, self.anchor)  # fmt: skip


def choose_ridge(
    statistics: RefitStatistics,
    keep: torch.Tensor | None = None,
    candidates: tuple[float, ...] = RIDGE_CANDIDATES,
) -> float:
    """The candidate ridge with the smallest held-out error for `keep`, as the prune-time refit
    chooses it (`prunenet.core.refit`); sets it on `statistics` and returns it.

    :param statistics: one layer's statistics.
    :param keep: the keep set to choose for; default `reference_keep(statistics)`.
    :param candidates: relative ridges to try.
    """
    keep = reference_keep(statistics) if keep is None else keep
    errors = []
    for ridge in candidates:
        statistics.ridge = ridge
        errors.append(statistics.held_error(keep))
    statistics.ridge = lowest_error(tuple(candidates), errors)
    return statistics.ridge


def reference_keep(statistics: RefitStatistics, share: float = REFERENCE_KEEP) -> torch.Tensor:
    """The `share` of rows with the largest rms activation x output column norm on the fit
    rows (the self-generated heuristic's score), sorted."""
    width = statistics.width
    rows = statistics.fit_gram[width, width]
    rms = (statistics.fit_gram.diagonal()[:width] / rows).clamp_min(0).sqrt()
    energy = rms * statistics.output[:, :width].norm(dim=0)
    kept = max(1, round(share * width))
    return torch.topk(energy, kept).indices.sort().values


def refit_text(seed: int = 0) -> SelfGenConfig:
    """The self-generated text the refit statistics are collected on: 64 x 128 tokens (the
    prune-time text when the refit reward was trained and measured; pinned so the committed
    reward table reproduces) with sampling seed `seed`."""
    return replace(ANALYSIS_SELFGEN, sequences=64, length=128, seed=seed)


def collect_refit_statistics(
    model: nn.Module,
    text: SelfGenConfig | None = None,
    held_out_fraction: float = HELD_OUT_FRACTION,
    ridge: float | None = None,
) -> list[RefitStatistics]:
    """Per-layer refit statistics of the dense `model` on its own text (Grams cached on disk).

    :param model: the dense model.
    :param text: the self-generated text (default `refit_text()`); the last
        `held_out_fraction` of its sequences are held out, as `SequentialCut` holds them out.
    :param held_out_fraction: share of the sequences held out.
    :param ridge: relative ridge of the refit; None chooses one per layer (`choose_ridge`).
    """
    text = text or refit_text()
    tokens = own_text(model, text)
    held = held_out_sequences(tokens.shape[0], held_out_fraction)
    widths = ffn_widths(model.config)
    grams = memoize(
        "refit-grams",
        model,
        {**asdict(text), "held_out_sequences": held, "first_token": "anchor"},
        lambda: _collect_grams(model, tokens, held),
        encode=_encode_grams,
        decode=lambda tensors, info: _decode_grams(tensors, info, widths),
    )
    adapter = adapter_for(model.config)
    intercept = can_store_output_bias(model.config)
    statistics = []
    for layer, (fit_gram, held_gram, anchor) in zip(decoder_layers(model), grams, strict=True):
        weight = ffn_weights(layer, adapter).output.detach().double().cpu()
        bias = ffn_output_bias(layer, adapter)
        bias = torch.zeros(weight.shape[0], 1, dtype=torch.float64) if bias is None else (
            bias.detach().double().cpu().unsqueeze(1)
        )  # fmt: skip
        output = torch.cat([weight, bias], dim=1)
        layer_statistics = RefitStatistics(fit_gram, held_gram, output, intercept, anchor)
        if ridge is None:
            choose_ridge(layer_statistics)
        else:
            layer_statistics.ridge = ridge
        statistics.append(layer_statistics)
    return statistics


@torch.no_grad()
def _collect_grams(
    model: nn.Module, tokens: torch.Tensor, held_sequences: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(fit Gram, held-out Gram, start token's row) of `[acts, 1]` per layer, in float64, a few
    sequences at a time (sequences are independent under causal attention, so chunks change
    nothing). Every sequence starts with the same token, so its row is the same in all of them:
    it is kept once, out of the Grams, as `SequentialCut` anchors it."""
    adapter = adapter_for(model.config)
    layers = decoder_layers(model)
    widths = ffn_widths(model.config)
    grams = [
        [torch.zeros(w + 1, w + 1, dtype=torch.float64) for _ in range(2)] for w in widths
    ]  # per layer: [fit, held]
    anchors: list[torch.Tensor | None] = [None] * len(widths)
    split = [0]  # which Gram the current chunk adds to

    def hook(module, inputs, index):
        acts = inputs[0].detach().double().cpu()  # sequences x length x d_ff
        if anchors[index] is None:
            anchors[index] = acts[0, 0].clone()
        acts = acts[:, 1:].reshape(-1, acts.shape[-1])  # without the start token's rows
        add_to_gram(grams[index][split[0]], acts)

    handles = [
        ffn_modules(layer, adapter)[1].register_forward_pre_hook(
            lambda module, inputs, index=index: hook(module, inputs, index)
        )
        for index, layer in enumerate(layers)
    ]
    fit_sequences = tokens.shape[0] - held_sequences
    try:
        for which, (begin, end) in enumerate(
            [(0, fit_sequences), (fit_sequences, tokens.shape[0])]
        ):
            split[0] = which
            for start in range(begin, end, CHUNK_SEQUENCES):
                model(tokens[start : min(start + CHUNK_SEQUENCES, end)], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [(fit, held, anchor) for (fit, held), anchor in zip(grams, anchors, strict=True)]


def _encode_grams(
    grams: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[Tensors, Info]:
    """Tensors `<layer>.fit`, `<layer>.held` and `<layer>.anchor`, and the layer count."""
    tensors = {}
    for index, (fit, held, anchor) in enumerate(grams):
        tensors[f"{index}.fit"], tensors[f"{index}.held"] = fit, held
        tensors[f"{index}.anchor"] = anchor
    return tensors, {"layers": len(grams)}


def _decode_grams(
    tensors: Tensors, info: Info, widths: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A stored entry's Grams and start rows, if they have this model's layers and widths
    (float64, finite)."""
    if info.get("layers") != len(widths):
        raise CacheEntryError(f"{info.get('layers')} layers stored, the model has {len(widths)}")
    return [
        (
            stored_tensor(tensors, f"{index}.fit", torch.float64, (width + 1, width + 1)),
            stored_tensor(tensors, f"{index}.held", torch.float64, (width + 1, width + 1)),
            stored_tensor(tensors, f"{index}.anchor", torch.float64, (width,)),
        )
        for index, width in enumerate(widths)
    ]
