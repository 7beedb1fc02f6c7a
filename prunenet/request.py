"""One pruning request: every decision a `prunenet prune` run makes, and THE defaults.

`PruneRequest` is what a user asks for: how much (a share of FFN rows, a share of all
parameters, or a speed-up), what may go (FFN rows, attention heads, whole layers), how much
where (the strategy), which rows (the scorer), the refit, the self-generated text, the memory
route and the device. Its field defaults are the defaults of the library and of the CLI alike:
`prunenet prune` only turns flags into a request (`--config FILE` reads one from JSON), and
`prunenet.prune(model, out, request)` runs the same request from Python. The request is written
into every output folder (`prunenet_request.json`, `prunenet.io.saving.write_records`, with
the defaults resolved), so anyone can
see how a folder was made and replay it with `prunenet prune --config`.

Messages name the options as the CLI spells them (`--remove-params` is the field
`remove_params`): most users meet them there, and the mapping is one-to-one.

`validate` refuses, before any model is read, every combination that cannot work, with one
line saying why; `UNSUPPORTED` lists those combinations for the documentation and the tests.

Why this module is long (over 400 lines): every option, its default, its range and the reason
each combination is refused sit together, so the one place that defines an option also checks it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunenet.errors import PruneNetError

# How much per layer. With a share of FFN rows: uniform, or auto (more rows where the model's
# own output changes least). With a share of parameters: uniform, ramp, policy (the bundled
# strategy policy, or a checkpoint's path), search.
RATIO_STRATEGIES = ("uniform", "auto")
BUDGET_STRATEGIES = ("uniform", "ramp", "policy", "search")
STRATEGIES = ("uniform", "auto", "ramp", "policy", "search")
SCORERS = ("policy", "selfgen", "magnitude", "random")
STRUCTURES = ("ffn", "heads", "layers")
REFITS = ("none", "bias", "lsq")
ANALYSES = ("oneshot", "sequential", "shared")
ROUTES = ("auto", "memory", "stream", "layerwise")
TEXT_ROUTES = ("auto", "resident", "streamed")
DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# Seeds feed torch, numpy and Python generators; numpy takes at most 2**32 - 1.
MAX_SEED = 2**32 - 1
# The smallest text that ran on every route (2 sequences of the start token and one sampled
# token); useful texts are far larger (docs/results.md, the token-budget table).
MIN_TEXT_SEQUENCES = 2
MIN_TEXT_LENGTH = 2
FORMAT = 1
# Echo at most this many values of a list in a message.
_ECHOED = 5

# Combinations that cannot work, one line each: (what, why). The matrix test walks them.
UNSUPPORTED = {
    "stream + refit": "--route stream reads weights only, and a refit fits each layer on "
    "activations of the model's own text, which needs the model in memory",
    "stream + activation scorer": "--route stream never runs the model, and this scorer reads "
    "its activations, which needs the model; score with magnitude or random, or use --route "
    "layerwise for the default path in bounded memory",
    "stream/layerwise + remove-params beyond ffn": "a parameter budget is split between FFN "
    "rows, heads and layers by the whole model's KL on its own text, which needs the model in "
    "memory; FFN rows alone (--structures ffn, the default) are counted from the config",
    "stream/layerwise + strategy": "per-layer strategies are measured on the whole model's "
    "outputs, which needs the model in memory",
    "layerwise + weights-only scorer": "--route layerwise exists to run the activation-based "
    "default path; weights-only scorers use --route stream",
    "layerwise + device": "--route layerwise runs on the CPU",
    "shared + not ffn/uniform": "--analysis shared describes the dense model's FFNs, so it "
    "cuts FFN rows with the same amount in every layer",
    "ramp + heads/layers": "the ramp spreads FFN rows over the layers and cuts nothing else",
    "target-speedup + strategy": "the speed search times uniform cuts of the whole model",
}


@dataclass(frozen=True)
class PruneRequest:
    """What to prune and how; the defaults are PruneNet's defaults.

    Exactly one amount is given: `ratio`, `remove_params` or `target_speedup`.

    :param ratio: fractions of FFN rows to remove from every layer, in (0, 1); one output
        folder per value (`ratio-0.30`, ... when there are several).
    :param remove_params: fractions of ALL parameters to remove, in (0, 1), split between
        `structures`; one folder per value (`params-0.20`, ...).
    :param target_speedup: a batch-1 prefill speed-up over the dense model (> 1): the smallest
        FFN ratio timed that fast is pruned.
    :param structures: what may go with `remove_params`: `ffn`, `heads`, `layers`.
    :param strategy: how much where. With `ratio`: `uniform` (the same share of every layer;
        loads with plain transformers) or `auto` (more where the model's own output changes
        least). With `remove_params`: `uniform`, `ramp` (FFN rows rising with depth), `policy`
        (the bundled strategy policy) or `search` (best of `search_evaluations` random
        strategies); a path to a strategy-policy checkpoint means `policy` with that file.
    :param scorer: which rows go: `policy` (the bundled PPO row policy), `selfgen`,
        `magnitude`, `random`, or a path to a `prunenet train` checkpoint.
    :param refit: `lsq`, `bias` or `none`; None: `lsq` in memory and layer by layer, `none`
        when streaming weights only.
    :param analysis: `sequential`, `oneshot` or `shared`; None: `sequential` for scorers that
        read activations, `oneshot` for weights-only scorers and streaming.
    :param text_sequences: self-generated sequences (a quarter held out for the refit's ridge).
    :param text_length: tokens per self-generated sequence (start token included).
    :param seed: seeds sampling, random scores and searches; the same seed gives the same model.
    :param route: `memory`, `stream` (weights only, one layer at a time), `layerwise` (the
        default path with one decoder layer in memory), or `auto` (memory, or stream/layerwise
        when the checkpoint is larger than half of the available RAM).
    :param device: where the model runs in memory (`cpu`, `cuda`, ...).
    :param dtype: dtype of the run and of the saved folder; `auto` keeps the checkpoint's own.
    :param threads: torch CPU threads; None: `OMP_NUM_THREADS` when set, else every core this
        process may use (`threads_to_use`), resolved when the request runs and recorded
        resolved.
    :param max_layer_ratio: `auto` strategy: never remove more than this share of one layer.
    :param search_evaluations: `search` strategy: strategies measured per request.
    :param compute_dtype: `layerwise` route: the dtype layers compute in (None: `dtype`).
    :param text_route: `layerwise` route: how the text is written when not cached.
    """

    ratio: tuple[float, ...] | None = None
    remove_params: tuple[float, ...] | None = None
    target_speedup: float | None = None
    structures: tuple[str, ...] = ("ffn",)
    strategy: str = "uniform"
    scorer: str = "policy"
    refit: str | None = None
    analysis: str | None = None
    text_sequences: int = 256
    text_length: int = 256
    seed: int = 0
    route: str = "auto"
    device: str = "cpu"
    dtype: str = "auto"
    threads: int | None = None
    max_layer_ratio: float = 0.6
    search_evaluations: int = 32
    compute_dtype: str | None = None
    text_route: str = "auto"
    # Options a user rarely needs (a class attribute, not a field): `--config` only, so the
    # CLI's --help stays short.
    RARE = ("analysis", "max_layer_ratio", "search_evaluations", "compute_dtype", "text_route")

    def __post_init__(self) -> None:
        # Lists from JSON or Python become tuples, so requests compare and hash by value.
        for name in ("ratio", "remove_params", "structures"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
            elif isinstance(value, (int, float)) and name != "structures":
                object.__setattr__(self, name, (float(value),))
        if isinstance(self.structures, str):
            object.__setattr__(self, "structures", parse_structure_names(self.structures))

    # ----- what the request amounts to ------------------------------------------------------

    @property
    def amounts(self) -> tuple[float, ...]:
        """One value per output folder (a speed target is one folder)."""
        if self.remove_params is not None:
            return self.remove_params
        if self.ratio is not None:
            return self.ratio
        return (math.nan,)

    @property
    def strategy_name(self) -> str:
        """The strategy, with a checkpoint path read as `policy`."""
        return self.strategy if self.strategy in STRATEGIES else "policy"

    @property
    def strategy_checkpoint(self) -> str | None:
        """A strategy-policy checkpoint's path (None: the bundled one, or no policy)."""
        return None if self.strategy in STRATEGIES else self.strategy

    @property
    def scorer_checkpoint(self) -> str | None:
        """A row-policy checkpoint's path (None: a named scorer)."""
        return None if self.scorer in SCORERS else self.scorer

    def replace(self, **changes: Any) -> PruneRequest:
        """A copy with `changes` (field name -> value); unknown names are refused.

        :param changes: new values.
        """
        unknown = sorted(set(changes) - set(field_names()))
        if unknown:
            raise PruneNetError(_unknown_fields(unknown))
        return dataclasses.replace(self, **changes)

    # ----- validation -----------------------------------------------------------------------

    def validate(self) -> PruneRequest:
        """Refuse values and combinations that cannot work, with the reason and the fix, before
        any model is read. Returns the request itself.

        Checks what needs no model: ranges, names, and the combinations in `UNSUPPORTED`.
        Whether a model can give a budget (`allocation.structures.check_budget`) is checked
        once it is loaded.
        """
        given = [n for n in ("ratio", "remove_params", "target_speedup") if getattr(self, n)]
        if len(given) != 1:
            raise PruneNetError(
                "Say how much to remove with exactly one of --ratio (share of FFN rows), "
                f"--remove-params (share of all parameters) or --target-speedup; got "
                f"{', '.join(given) or 'none'}."
            )
        if self.ratio is not None:
            _check_fractions("ratio", "share of FFN rows removed from every layer", self.ratio)
        if self.remove_params is not None:
            _check_fractions("remove_params", "share of ALL parameters removed",
                             self.remove_params)  # fmt: skip
        if self.target_speedup is not None and not (
            isinstance(self.target_speedup, (int, float)) and 1 < self.target_speedup < 100
        ):
            raise PruneNetError(
                f"--target-speedup {self.target_speedup!r} must be above 1 (e.g. 1.2 for "
                "a 20% faster prefill)."
            )
        self._check_names()
        self._check_numbers()
        self._check_combinations()
        return self

    def _check_names(self) -> None:
        _check_choice("structures", self.structures, STRUCTURES, many=True)
        if not self.structures:
            raise PruneNetError(f"structures is empty; name some of {', '.join(STRUCTURES)}.")
        if self.strategy not in STRATEGIES and not _looks_like_file(self.strategy):
            raise PruneNetError(
                f"Unknown strategy {self.strategy!r}; choose {', '.join(STRATEGIES)} or give "
                "the path of a strategy-policy checkpoint (.zip)."
            )
        if self.scorer not in SCORERS and not _looks_like_file(self.scorer):
            raise PruneNetError(
                f"Unknown scorer {self.scorer!r}; choose {', '.join(SCORERS)} or give the path "
                "of a `prunenet train` checkpoint (.zip)."
            )
        _check_choice("refit", self.refit, REFITS)
        _check_choice("analysis", self.analysis, ANALYSES)
        _check_choice("route", self.route, ROUTES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        _check_choice("text_route", self.text_route, TEXT_ROUTES)

    def _check_numbers(self) -> None:
        _check_int("seed", self.seed, 0, MAX_SEED)
        if self.threads is not None:
            _check_int("threads", self.threads, 1, 4096)
        _check_int("text_sequences", self.text_sequences, MIN_TEXT_SEQUENCES, 1 << 20,
                   "the smallest that runs; a quarter is held out for the refit")  # fmt: skip
        _check_int("text_length", self.text_length, MIN_TEXT_LENGTH, 1 << 20,
                   "the start token plus at least one sampled token")  # fmt: skip
        _check_int("search_evaluations", self.search_evaluations, 1, 100_000)
        if not (isinstance(self.max_layer_ratio, (int, float)) and 0 < self.max_layer_ratio <= 0.6):
            raise PruneNetError(
                f"--max-layer-ratio {self.max_layer_ratio!r} is not in (0, 0.6]: the share of "
                "one layer's FFN rows the auto strategy may remove (its layer measurements "
                "stop at 0.6)."
            )

    def _check_combinations(self) -> None:
        strategy = self.strategy_name
        budget = self.remove_params is not None
        if budget and strategy == "auto":
            raise PruneNetError(
                "--strategy auto spreads a share of FFN rows by layer sensitivity and works "
                "with --ratio only; for a share of parameters (--remove-params) choose "
                f"{', '.join(BUDGET_STRATEGIES)}."
            )
        if not budget and strategy not in RATIO_STRATEGIES:
            raise PruneNetError(
                f"--strategy {strategy} decides per-layer amounts for a share of parameters: "
                f"use it with --remove-params F, or with --ratio use "
                f"{' or '.join(RATIO_STRATEGIES)}."
            )
        if not budget and self.structures != ("ffn",):
            raise PruneNetError(
                f"--structures {','.join(self.structures)} needs --remove-params: --ratio is a "
                "share of FFN rows and removes nothing else. Use --remove-params F --structures "
                f"{','.join(self.structures)}."
            )
        if strategy != "uniform" and "ffn" not in self.structures:
            raise PruneNetError(
                f"--strategy {strategy} decides per-layer FFN amounts (the FFN meets the budget "
                "exactly): include ffn in --structures."
            )
        if strategy == "ramp" and self.structures != ("ffn",):
            raise PruneNetError(f"--strategy ramp with heads or layers: "
                                f"{UNSUPPORTED['ramp + heads/layers']}; drop them from "
                                "--structures or use --strategy uniform, policy or "
                                "search.")  # fmt: skip
        if self.target_speedup is not None and (strategy != "uniform" or self.route in
                                                ("stream", "layerwise")):  # fmt: skip
            raise PruneNetError(
                f"--target-speedup: {UNSUPPORTED['target-speedup + strategy']}; use --strategy "
                "uniform with --route memory or auto, or give --ratio."
            )
        if self.analysis == "shared":
            if self.route in ("stream", "layerwise"):
                raise PruneNetError(
                    "--analysis shared keeps every layer's statistics of the dense model in "
                    "memory; drop --route stream/layerwise, or use --analysis sequential with "
                    "--route layerwise."
                )
            if self.structures != ("ffn",) or strategy != "uniform":
                raise PruneNetError(
                    f"{UNSUPPORTED['shared + not ffn/uniform']} (--structures ffn --strategy "
                    "uniform); for heads, layers or per-layer strategies use --analysis "
                    "sequential."
                )
        if self.route == "stream":
            self._check_stream()
        if self.route == "layerwise":
            self._check_layerwise()
        if self.route not in ("layerwise",) and self.compute_dtype is not None:
            raise PruneNetError(
                "--compute-dtype sets the dtype --route layerwise computes each layer in; in "
                "memory the model has one dtype (--dtype). Use --route layerwise or drop "
                "--compute-dtype."
            )
        if self.route != "layerwise" and self.text_route != "auto":
            raise PruneNetError(
                "--text-route says how --route layerwise writes the own text; use --route "
                "layerwise or drop --text-route."
            )

    def _check_stream(self) -> None:
        if self.remove_params is not None and self.structures != ("ffn",):
            raise PruneNetError(
                f"--route stream with --remove-params and --structures {','.join(self.structures)}"
                f": {UNSUPPORTED['stream/layerwise + remove-params beyond ffn']}; use "
                "--structures ffn, or --route memory."
            )
        if self.strategy_name != "uniform":
            raise PruneNetError(
                f"--route stream with --strategy {self.strategy_name}: "
                f"{UNSUPPORTED['stream/layerwise + strategy']}; use --route memory."
            )
        if self.refit not in (None, "none"):
            raise PruneNetError(
                f"--route stream with --refit {self.refit}: {UNSUPPORTED['stream + refit']}; "
                "use --refit none with --route stream, or --route layerwise."
            )
        if self.analysis not in (None, "oneshot"):
            raise PruneNetError(
                f"--route stream with --analysis {self.analysis}: sequential analysis runs each "
                "layer on the model's own text, which needs the model; use --analysis oneshot "
                "with a weights-only scorer, or --route layerwise."
            )
        if self.scorer in ("policy", "selfgen"):
            raise PruneNetError(
                f"--route stream with --scorer {self.scorer}: "
                f"{UNSUPPORTED['stream + activation scorer']}."
            )

    def _check_layerwise(self) -> None:
        if self.remove_params is not None and self.structures != ("ffn",):
            raise PruneNetError(
                "--route layerwise with --remove-params and --structures "
                f"{','.join(self.structures)}: "
                f"{UNSUPPORTED['stream/layerwise + remove-params beyond ffn']}; use "
                "--structures ffn, or --route memory."
            )
        if self.strategy_name != "uniform":
            raise PruneNetError(
                f"--route layerwise with --strategy {self.strategy_name}: "
                f"{UNSUPPORTED['stream/layerwise + strategy']}; use --strategy uniform."
            )
        if self.analysis in ("oneshot", "shared") or self.scorer in ("magnitude", "random"):
            raise PruneNetError(
                f"--route layerwise: {UNSUPPORTED['layerwise + weights-only scorer']} (and "
                "sequential analysis)."
            )
        if str(self.device) != "cpu":
            raise PruneNetError(f"--route layerwise: {UNSUPPORTED['layerwise + device']}; drop "
                                "--device or use --route memory.")  # fmt: skip

    # ----- JSON -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field with its value (tuples as lists), JSON-ready."""
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneRequest:
        """A request from `to_dict`'s form; unknown keys are refused (a typo must not be
        silently ignored).

        :param data: field name -> value (the `request` block of `prunenet_request.json`, or a
            flat dict of fields).
        """
        if not isinstance(data, dict):
            raise PruneNetError("A request is a JSON object of option names and values.")
        unknown = sorted(set(data) - set(field_names()))
        if unknown:
            raise PruneNetError(_unknown_fields(unknown))
        return cls(**data)


def field_names() -> list[str]:
    """The request's option names, in declaration order."""
    return [f.name for f in dataclasses.fields(PruneRequest)]


def default_of(name: str) -> Any:
    """The default of one option (for help texts: one source of truth).

    :param name: a field of `PruneRequest`.
    """
    for item in dataclasses.fields(PruneRequest):
        if item.name == name:
            return item.default if item.default is not dataclasses.MISSING else None
    raise KeyError(name)


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity where the system reports one (a
    container or `taskset` may allow fewer than the machine has), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def threads_to_use(threads: int | None) -> int:
    """The torch CPU threads a request runs with: `threads` when given, else `OMP_NUM_THREADS`
    when the environment sets it to a whole number (the convention torch and every BLAS
    follow: a job scheduler, or several processes sharing the cores, set it so that their
    threads do not outnumber the cores; two 2-thread processes on two cores ran 2-20x slower),
    else every core this process may use (`available_cores`; docs/scale.md, "Threads and
    generation speed").

    :param threads: `PruneRequest.threads`.
    """
    if threads is not None:
        return threads
    setting = os.environ.get("OMP_NUM_THREADS", "").strip()
    if setting.isdigit() and int(setting) > 0:
        return int(setting)
    return available_cores()


def read_request_file(path: str | Path) -> tuple[PruneRequest, str | None]:
    """A request from a JSON file (`--config`): either `prunenet_request.json` from an output
    folder (`{"model": ..., "request": {...}}`) or a flat object of options.

    :param path: the file.
    :return: the request and the model it names (None when it names none).
    """
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PruneNetError(f"--config {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise PruneNetError(
            f"--config {path} is not a readable JSON file ({error}); write a JSON object of "
            f'options, e.g. {{"remove_params": [0.2], "strategy": "ramp"}}.'
        ) from None
    if not isinstance(data, dict):
        raise PruneNetError(f"--config {path} must hold a JSON object of options.")
    model = data.get("model") if "request" in data else data.pop("model", None)
    body = data.get("request", data) if "request" in data else data
    if model is not None and not isinstance(model, str):
        raise PruneNetError(f"--config {path}: model must be a string.")
    try:
        return PruneRequest.from_dict(body), model
    except TypeError as error:
        raise PruneNetError(f"--config {path}: {error}") from None


def request_record(request: PruneRequest, model: str, command: str | None = None) -> dict:
    """What `prunenet_request.json` holds: the model, the resolved request, the command line
    (when the CLI made it) and the versions that ran it.

    :param request: the request, with its defaults resolved.
    :param model: the model it was run on (alias, folder or hub id).
    :param command: the command line, when there is one.
    """
    import torch
    import transformers

    from prunenet import __version__

    return {
        "format": FORMAT,
        "model": model,
        "request": request.to_dict(),
        "command": command,
        "versions": {
            "prunenet": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },  # fmt: skip
    }


def parse_structure_names(text: str) -> tuple[str, ...]:
    """`ffn,heads` (any order) as a tuple in `STRUCTURES` order.

    :param text: comma-separated names.
    """
    names = [part.strip() for part in text.split(",") if part.strip()]
    _check_choice("structures", tuple(names), STRUCTURES, many=True)
    return tuple(name for name in STRUCTURES if name in names)


def echo(values: Any) -> str:
    """A list for a message: the first few values and how many more.

    :param values: any sequence.
    """
    values = list(values)
    shown = ", ".join(str(v) for v in values[:_ECHOED])
    return shown + (f", ... ({len(values) - _ECHOED} more)" if len(values) > _ECHOED else "")


def _check_fractions(name: str, meaning: str, values: tuple[float, ...]) -> None:
    if not values:
        raise PruneNetError(f"{name} is empty; give at least one {meaning}, in (0, 1).")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))
           or not 0 < v < 1]  # fmt: skip
    if bad:
        raise PruneNetError(
            f"{name} {echo(bad)} is outside (0, 1): each value is the {meaning}, e.g. 0.2."
        )
    duplicates = sorted({v for v in values if values.count(v) > 1})
    if duplicates:
        raise PruneNetError(
            f"{name} lists {echo(duplicates)} more than once; each value writes one folder, so "
            "give each once."
        )


def _check_choice(name: str, value: Any, choices: tuple[str, ...], many: bool = False) -> None:
    if value is None:
        return
    values = value if many else (value,)
    unknown = [v for v in values if v not in choices]
    if unknown:
        raise PruneNetError(f"Unknown {name} {echo(map(repr, unknown))}; choose from "
                            f"{', '.join(choices)}.")  # fmt: skip


def _check_int(name: str, value: Any, low: int, high: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        reason = f" ({why})" if why else ""
        raise PruneNetError(f"{name} {value!r} must be an integer from {low} to {high}{reason}.")


def _looks_like_file(text: str) -> bool:
    return isinstance(text, str) and (text.endswith(".zip") or "/" in text or Path(text).exists())


def _unknown_fields(unknown: list[str]) -> str:
    return (f"Unknown request option(s) {echo(unknown)}; the options are "
            f"{', '.join(field_names())}.")  # fmt: skip
