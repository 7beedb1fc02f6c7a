"""Layer by layer through the model being pruned: each layer sees what the pruned layers before
it really pass on; it is scored on those activations and its cut output projection refitted.

Each layer is called directly on the hidden states the already-cut layers produced
(`prunenet.analysis.layer_calls`), once: it is scored, cut and refitted from inside its own
forward (its FFN block's forward replaced for the call, or a hook on the FFN output projection
where the FFN has no block of its own), and what it passes on is the cut layer's output.
The text is the model's own (`prunenet.analysis.selfgen`), never a dataset.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from prunenet.analysis.layer_calls import (
    attention_in_chunks,
    capture_layer_inputs,
    ffn_block,
    ffn_inputs_by_blocks,
    replaced_forward,
    run_layer,
)
from prunenet.analysis.selfgen import (
    LayerActivations,
    SelfGenConfig,
    layer_activations,
    overflow_hint,
    own_text,
)
from prunenet.core.arch import FFNWeights, adapter_for, can_store_output_bias, decoder_layers
from prunenet.core.compress import select_keep_indices
from prunenet.core.memory import page_out_replaced, tensor_ranges
from prunenet.core.moments import BLOCK_ROWS, Moments, affine
from prunenet.core.refit import check_refit, refit_aware_scores, refit_moments
from prunenet.core.surgery import (
    cut_ffn,
    enable_output_biases,
    ffn_modules,
    ffn_output_bias,
    ffn_weights,
    set_ffn_output,
)
from prunenet.errors import PruneNetError

# Self-generated text for sequential analysis and the refit, chosen from the measured curve
# (`scripts/benchmark_selfgen_budget.py`, docs/results.md, token budget): quality had
# not saturated at 64 x 128 tokens; at 32k tokens more sequences helped encyclopedic text and
# longer ones book text (positions a 512-token input reaches), and 256 x 256 (64k tokens) is the
# first budget at least 25% below last round's default on every domain, for about twice the
# time of 128 x 256. A quarter of the sequences is held out: the ridge is chosen on it and
# scores never see it.
ANALYSIS_SELFGEN = SelfGenConfig(sequences=256, length=256, seed=0)
HELD_OUT_FRACTION = 0.25
SAMPLE_ROWS = SelfGenConfig().kept_tokens  # activation rows a scorer's statistics carry

# score(ffn weights, activation statistics, layer index, layer count) -> row scores
LayerScore = Callable[[FFNWeights, LayerActivations, int, int], torch.Tensor]


@dataclass
class SequentialLog:
    """What the layer-by-layer cut did: where scores came from, the ridge and held-out errors.

    :param scored: `sequential` (each layer scored on the already-cut model's activations) or
        `plan` (scores given beforehand).
    :param refit: `none`, `bias` or `lsq`.
    """

    scored: str
    refit: str
    sequences: int
    held_out_sequences: int
    intercept: bool
    layers: list[dict] = field(default_factory=list)
    # Wall seconds per stage over all layers: the layer forwards, scoring, cut and refit.
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "seconds": {stage: round(value, 3) for stage, value in self.seconds.items()},
            "scored": self.scored,
            "mode": self.refit,
            "sequences": self.sequences,
            "held_out_sequences": self.held_out_sequences,
            "intercept": self.intercept,
            "layers": self.layers,
        }


class SequentialCut:
    """A `cut` for `prunenet.core.compress.prune_model` that walks the model layer by layer.

    Layer i sees the hidden states that went through the already-cut (and refitted) layers
    0..i-1. There, optionally, its rows are scored (`scorer.score_activations` on those
    activations, not the dense model's), the top rows are kept, and its output projection is
    refitted (`refit` bias or lsq) to reproduce the dense layer's FFN output on them. Its output
    then feeds layer i+1. Layers must be cut in order, each once, and the model must be the
    dense one at creation.

    :param model: the dense model that is about to be cut (it is modified: with an intercept on
        a `switchable` architecture, every FFN projection gets a zero bias first).
    :param refit: `none`, `bias` or `lsq` (`prunenet.core.refit`).
    :param tokens: sequences x length ids the dense model wrote (`analysis_text`); the last
        `held_out_fraction` of the sequences is held out.
    :param score: `score(ffn weights, activation statistics, layer index, layer count)` scores
        each layer as it is reached (e.g. a `Scorer.score_activations` with the ratio bound);
        None uses the scores given to the cut.
    :param held_out_fraction: share of the sequences held out to choose the ridge on.
    :param stored_dtype: the dtype the cut layers will be saved in, when the model computes in
        a wider one (`prunenet.layerwise`: float16 weights computed in float32): each cut layer
        is rounded to it before it runs, so later layers see what the saved model computes.
    """

    def __init__(
        self,
        model: nn.Module,
        refit: str,
        tokens: torch.Tensor,
        score: LayerScore | None = None,
        held_out_fraction: float = HELD_OUT_FRACTION,
        select: str = "top",
        stored_dtype: torch.dtype | None = None,
    ) -> None:
        self.adapter = adapter_for(model.config)
        self.stored_dtype = stored_dtype
        self.refit = check_refit(refit)
        self.score = score
        self.select = check_select(select, refit)
        self.intercept = refit != "none" and can_store_output_bias(model.config)
        if refit == "bias" and not self.intercept:
            raise PruneNetError(
                f"--refit bias adds an FFN output bias, which {model.config.model_type} models "
                "cannot store (plain from_pretrained would drop it); use --refit lsq, which "
                "refits these models without an intercept, or --refit none."
            )
        held_sequences = held_out_sequences(tokens.shape[0], held_out_fraction)
        self._held_rows = held_sequences * tokens.shape[1]
        if self.intercept:
            enable_output_biases(model)  # zero biases: the model still computes the same
        self.layers = decoder_layers(model)
        self.hidden, self.layer_kwargs = capture_layer_inputs(model, tokens)
        self._length = tokens.shape[1]
        scored = "sequential" if score is not None else "plan"
        self.log = SequentialLog(scored, refit, tokens.shape[0], held_sequences, self.intercept)
        self._next = 0
        parts = (["score"] if score else []) + ([f"refit {refit}"] if refit != "none" else [])
        what = ", ".join(parts)
        self._bar = tqdm(total=len(self.layers), desc=f"cut ({what or 'plan'})", unit="layer",
                         leave=False)  # fmt: skip

    def __call__(
        self, index: int, layer: nn.Module, scores: torch.Tensor | None, kept: int
    ) -> torch.Tensor:
        if index != self._next or layer is not self.layers[index]:
            raise PruneNetError(f"SequentialCut cuts layers in order; got layer {index}.")
        # One pass through the layer, the cut made inside it. Where the FFN is a block of its
        # own (Llama's `mlp`), that block's forward is replaced for this call: it computes the
        # activations a block of rows at a time (its wide intermediates never exist for all
        # rows), then scores, cuts and refits the layer and returns the cut FFN's output.
        # Elsewhere (OPT) a hook on the output projection does the same from its full input.
        # Running the layer once to read the activations and again once cut cost a second
        # forward per layer.
        _, output = ffn_modules(layer, self.adapter)
        block = ffn_block(layer, self.adapter)
        done: dict = {}

        def cut_from(module, acts, out):
            started = time.perf_counter()
            done["keep"], kept_output = self._cut_here(index, layer, module, acts, out, scores,
                                                       kept)  # fmt: skip
            done["seconds"] = time.perf_counter() - started
            return kept_output

        def hook(module, inputs, dense):
            if done:  # an output projection called twice per layer is not one we know
                raise PruneNetError(f"Layer {index}'s FFN output projection ran twice.")
            return cut_from(module, inputs[0], dense)

        own = None if block is None else block.forward
        dense_ranges = tensor_ranges(layer)

        def blockwise(hidden_states):
            acts = ffn_inputs_by_blocks(own, output, hidden_states, BLOCK_ROWS)
            kept_output = cut_from(output, acts, _output_room(acts, hidden_states.shape[-1]))
            return kept_output.reshape(*hidden_states.shape[:-1], kept_output.shape[-1])

        with contextlib.ExitStack() as route:
            # All sequences' attention at once held ~670 MB of temporaries (docs/method.md).
            route.enter_context(attention_in_chunks(layer, self.adapter, self.hidden))
            if block is not None:
                route.enter_context(replaced_forward(block, blockwise))
            else:
                route.callback(output.register_forward_hook(hook).remove)
            started = time.perf_counter()
            self.hidden = run_layer(layer, self.hidden, self.layer_kwargs[index])
        if not done:
            raise PruneNetError(f"Layer {index}'s FFN output projection never ran.")
        self._add_seconds("forward", time.perf_counter() - started - done["seconds"])
        # The dense weights this layer replaced leave the process's memory now rather than at
        # its end: kept, they raised the peak by ~300 MB by the last layer.
        page_out_replaced(dense_ranges, layer)
        self._next += 1
        self._bar.update(1)
        if self._next == len(self.layers):
            self._bar.close()
        return done["keep"]

    def _cut_here(self, index, layer, module, acts, out, scores, kept):
        """Score, cut and refit `layer` from inside its output projection's forward: `acts`
        are that projection's inputs (sequences x positions x d_ff); `out` receives the cut
        projection's output (the dense output's memory, where there is one).
        Returns the kept rows and the cut (refitted) projection's output on `acts`."""
        started = time.perf_counter()
        flat = acts.reshape(-1, acts.shape[-1])
        check_finite(flat, f"layer {index}'s FFN activations", layer)
        fit_rows = flat.shape[0] - self._held_rows
        weights = ffn_weights(layer, self.adapter)
        if self.select == "refit-aware":  # its own ranking: the scorer's would go unused
            scores = refit_aware_scores(
                self._without_start(flat[:fit_rows].float()), weights.output, kept,
                intercept=self.intercept,
            )  # fmt: skip
        elif self.score is not None:
            # Scores never see the held-out rows: they judge the ridge and the rewards.
            stats = layer_activations(flat[:fit_rows].float(), kept_tokens=SAMPLE_ROWS, seed=0)
            scores = self.score(weights, stats, index, len(self.layers))
        if scores is None:
            raise PruneNetError(f"No scores for layer {index} and no scorer to compute them.")
        keep = select_keep_indices(scores, kept)
        self._add_seconds("scores", time.perf_counter() - started)
        started = time.perf_counter()
        entry: dict = {}
        if self.refit == "none":
            cut_ffn(layer, self.adapter, keep)
        else:
            dense_weight = weights.output.clone()
            dense_bias = ffn_output_bias(layer, self.adapter)
            dense_bias = None if dense_bias is None else dense_bias.clone()
            cut_ffn(layer, self.adapter, keep)
            result = self._refit(acts, dense_weight, dense_bias, keep)
            set_ffn_output(layer, self.adapter, result.weight, result.bias)
            entry = {
                "ridge": result.ridge,
                "held_error_cut": result.held_error_cut,
                "held_error_refit": result.held_error_refit,
            }
        self.log.layers.append(entry)
        if self.stored_dtype is not None:
            # The rest of the layer ran on weights already in this dtype (only the refit made
            # new ones), so rounding here gives what the saved model computes.
            with torch.no_grad():
                for parameter in layer.parameters():
                    parameter.copy_(parameter.to(self.stored_dtype))
        # Block by block: a whole kept-activation copy at once was a quarter of a gigabyte at
        # the default text.
        kept_output = out if out.is_contiguous() else torch.empty_like(out)
        rows, index = kept_output.view(-1, out.shape[-1]), keep.to(acts.device)
        for start in range(0, flat.shape[0], BLOCK_ROWS):
            block = flat[start : start + BLOCK_ROWS].index_select(1, index)  # 2-D: 5x the 3-D speed
            rows[start : start + BLOCK_ROWS] = module.forward(block)
        self._add_seconds("refit", time.perf_counter() - started)
        return keep, kept_output

    def _refit(self, acts, weight, bias, keep):
        """The refit from the kept columns' moments on the fit and held-out sequences, without
        each sequence's start-token row; the first sequence's is anchored (reproduced exactly).

        Every self-generated sequence starts with the same token at the same position, so its
        row is the same in all of them; in several SmolLM2 layers it carries "massive"
        activations (up to 99.9% of the layer's activation energy, 3e5 x the median row). Left
        in, it sets the ridge's scale and dominates the fit, and the other tokens' outputs are
        reproduced worse than by the plain cut (docs/method.md, refit; docs/results.md, ablation).
        """
        sequences = acts.reshape(-1, self._length, acts.shape[-1])
        held = self._held_rows // self._length
        fit = Moments.of_blocks(sequences[:-held, 1:], weight, bias, keep)
        held_out = Moments.of_blocks(sequences[-held:, 1:], weight, bias, keep)
        # A bias moves every token alike: the start token's output cannot be pinned, but its
        # massive row no longer sets the other tokens' mean.
        anchor = None
        if self.refit == "lsq":
            row = sequences[0, 0].double()
            anchor = (
                row,
                affine(row[None], weight.double(), None if bias is None else bias.double())[0],
            )
        return refit_moments(weight, bias, keep, fit, held_out, mode=self.refit,
                             intercept=self.intercept, anchor=anchor)  # fmt: skip

    def _add_seconds(self, stage: str, seconds: float) -> None:
        self.log.seconds[stage] = self.log.seconds.get(stage, 0.0) + seconds

    def _without_start(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` (whole sequences, one row per token) without each sequence's first row."""
        return rows.reshape(-1, self._length, rows.shape[-1])[:, 1:].reshape(-1, rows.shape[-1])


def _output_room(acts: torch.Tensor, width: int) -> torch.Tensor:
    """Where the cut FFN's output (rows x `width`) is written: the front of the activations'
    own memory when it fits there, else new memory.

    `_cut_here` writes output block k after it has copied activation block k, and output rows
    up to the end of block k occupy at most the activations' rows up to the end of block k
    when `width` <= d_ff: nothing is overwritten before it is read. A separate output was
    another 151 MB on top of the activations' 403 MB at the default text (SmolLM2-135M).
    """
    rows, d_ff = acts.numel() // acts.shape[-1], acts.shape[-1]
    if width <= d_ff and acts.is_contiguous():
        return acts.view(-1)[: rows * width].view(rows, width)
    return acts.new_empty(rows, width)


def check_finite(values: torch.Tensor, what: str, module: nn.Module) -> torch.Tensor:
    """`values` if every entry is finite, else an error that names the dtype to use instead.

    The layers run in the checkpoint's dtype (`prunenet prune --dtype`). float16 stops at
    65504, and the "massive" activations some models carry (SmolLM2's hidden states reach
    ~25k in float16, over a third of it) can overflow it in other models; an inf or NaN
    here would turn every score and the refit's Gram into NaN without a word.

    :param values: activations (any float dtype).
    :param what: what they are, for the message.
    :param module: the module that computed them (its dtype is named).
    """
    blocks = values.reshape(-1, values.shape[-1]).split(BLOCK_ROWS)  # no whole-size mask
    if not all(bool(torch.isfinite(block).all()) for block in blocks):
        dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
        raise PruneNetError(
            f"In {dtype}, {what} on the self-generated text are not finite (inf or NaN). "
            f"{overflow_hint(dtype)}"
        )
    return values


SELECTIONS = ("top", "refit-aware")


def check_select(select: str, refit: str) -> str:
    """`select` if it names a row selection (`SELECTIONS`) that works with `refit`."""
    if select not in SELECTIONS:
        raise PruneNetError(f"Unknown selection {select!r}; choose one of {', '.join(SELECTIONS)}.")
    if select == "refit-aware" and refit != "lsq":
        raise PruneNetError(
            "--select refit-aware chooses the rows the lsq refit repairs best; use it with "
            f"--refit lsq (got --refit {refit})."
        )
    return select


def held_out_sequences(count: int, fraction: float = HELD_OUT_FRACTION) -> int:
    """How many of `count` self-generated sequences are held out (the last ones): at least
    one, and at least one left to fit on.

    :param count: sequences written.
    :param fraction: share held out.
    """
    held = max(1, round(count * fraction))
    if held >= count:
        raise PruneNetError(
            f"Sequential analysis and the refit need at least 2 self-generated sequences, "
            f"got {count}."
        )
    return held


def analysis_text(model: nn.Module, selfgen: SelfGenConfig = ANALYSIS_SELFGEN) -> torch.Tensor:
    """The self-generated text sequential analysis and the refit run on (cached on disk);
    generate it once to prune at several ratios.

    :param model: the dense model.
    :param selfgen: how much text it writes.
    """
    announce_text(selfgen)
    return own_text(model, selfgen)


def announce_text(selfgen: SelfGenConfig) -> None:
    """Say on stderr what the analysis is about to do (the text takes minutes on a CPU).

    :param selfgen: how much text the model writes.
    """
    print(
        f"sequential analysis: the model writes {selfgen.sequences} x {selfgen.length} tokens "
        "of its own text (minutes on a CPU the first time; cached), then each layer is cut in "
        "turn",
        file=sys.stderr,
        flush=True,
    )
