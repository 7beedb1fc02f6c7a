"""One request, one pipeline: the library and the CLI write the same bytes, and every
combination of strategy x structures x route x refit either works or is refused up front with
its one-line reason (`prunenet.request.UNSUPPORTED`)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

import prunenet
from prunenet.cli import main
from prunenet.core.config_fields import ffn_widths
from prunenet.errors import PruneNetError
from prunenet.io.model_card import MARKER
from prunenet.io.saving import REQUEST_FILE
from prunenet.request import UNSUPPORTED, PruneRequest, available_cores
from tests.conftest import tiny_model, tiny_tokenizer

TEXT = ("--text", "8x16")
SMALL = dict(text_sequences=8, text_length=16)


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny saved models of three layouts: gated Linear (Llama), Conv1D (GPT-2), OPT."""
    folders = {}
    for model_type in ("llama", "gpt2", "opt"):
        folder = tmp_path_factory.mktemp(f"runner-{model_type}")
        tiny_model(model_type).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        folders[model_type] = folder
    return folders


def test_cli_and_library_write_the_same_bytes(model_folders, tmp_path: Path) -> None:
    folder = model_folders["llama"]
    argv = ["prune", "--model", str(folder), "--ratio", "0.5", *TEXT, "--out"]
    assert main([*argv, str(tmp_path / "cli")]) == 0

    prunenet.prune(str(folder), tmp_path / "library", PruneRequest(ratio=(0.5,), **SMALL))

    cli, library = tmp_path / "cli", tmp_path / "library"
    assert (cli / "model.safetensors").read_bytes() == (library / "model.safetensors").read_bytes()
    cli_record = json.loads((cli / REQUEST_FILE).read_text())
    library_record = json.loads((library / REQUEST_FILE).read_text())
    assert cli_record["request"] == library_record["request"]
    assert cli_record["command"].startswith("prunenet prune --model")
    assert library_record["command"] is None


def test_a_folder_replays_from_its_request_file(model_folders, tmp_path: Path) -> None:
    folder = model_folders["llama"]
    prunenet.prune(str(folder), tmp_path / "first", ratio=(0.25,), **SMALL)

    config = tmp_path / "first" / REQUEST_FILE
    assert main(["prune", "--config", str(config), "--out", str(tmp_path / "again")]) == 0

    first, again = tmp_path / "first", tmp_path / "again"
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()


def test_every_folder_has_a_model_card_huggingface_hub_loads(model_folders, tmp_path) -> None:
    prunenet.prune(str(model_folders["llama"]), tmp_path / "out", ratio=(0.5,), **SMALL)

    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.library_name == "transformers"
    assert "prunenet" in card.data.tags
    assert MARKER in card.text and "50.0%" in card.text


def test_a_list_of_amounts_records_each_folder_as_its_own_request(model_folders, tmp_path) -> None:
    prunenet.prune(str(model_folders["llama"]), tmp_path / "out", ratio=(0.25, 0.5), **SMALL)

    for name, ratio in (("ratio-0.25", 0.25), ("ratio-0.50", 0.5)):
        record = json.loads((tmp_path / "out" / name / REQUEST_FILE).read_text())
        assert record["request"]["ratio"] == [ratio]


def test_library_defaults_are_the_cli_defaults(model_folders, tmp_path: Path) -> None:
    prunenet.prune(str(model_folders["llama"]), tmp_path / "out", ratio=(0.5,), **SMALL)

    record = json.loads((tmp_path / "out" / REQUEST_FILE).read_text())["request"]
    assert (record["analysis"], record["refit"], record["route"]) == ("sequential", "lsq", "memory")


def test_the_recorded_request_names_the_threads_it_ran_with(
    model_folders, tmp_path, monkeypatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    request = PruneRequest(ratio=(0.5,), route="stream", scorer="magnitude", **SMALL)
    prunenet.prune(str(model_folders["llama"]), tmp_path / "all", request)
    prunenet.prune(str(model_folders["llama"]), tmp_path / "one", request.replace(threads=1))

    def threads(name: str) -> int:
        return json.loads((tmp_path / name / REQUEST_FILE).read_text())["request"]["threads"]

    assert (threads("all"), threads("one")) == (available_cores(), 1)


# ----- the matrix -------------------------------------------------------------------------------

STRATEGIES = ("uniform", "auto", "ramp", "policy", "search")
STRUCTURE_SETS = (("ffn",), ("ffn", "heads"), ("ffn", "layers"), ("ffn", "heads", "layers"))
ROUTES = ("memory", "stream", "layerwise")
REFITS = ("none", "bias", "lsq")
MATRIX = list(itertools.product(STRATEGIES, STRUCTURE_SETS, ROUTES, REFITS))


def _request(strategy: str, structures, route: str, refit: str) -> PruneRequest:
    """The combination as a request: a share of parameters where a strategy or structure needs
    one, a share of FFN rows otherwise; the stream route with its weights-only scorer."""
    budget = strategy in ("ramp", "policy", "search") or structures != ("ffn",)
    amount = {"remove_params": (0.1,)} if budget else {"ratio": (0.3,)}
    scorer = "magnitude" if route == "stream" else "policy"
    return PruneRequest(**amount, structures=structures, strategy=strategy, route=route,
                        refit=refit, scorer=scorer, search_evaluations=2, **SMALL)  # fmt: skip


def test_every_refused_combination_says_why_in_one_line() -> None:
    refused = 0
    for combination in MATRIX:
        try:
            _request(*combination).validate()
        except PruneNetError as error:
            refused += 1
            message = str(error)
            assert "\n" not in message, combination
            assert any(reason in message for reason in UNSUPPORTED.values()) or "strategy" in (
                message
            ), (combination, message)
    assert 0 < refused < len(MATRIX)


def _runnable() -> list[tuple]:
    runnable = []
    for combination in MATRIX:
        try:
            _request(*combination).validate()
        except PruneNetError:
            continue
        runnable.append(combination)
    return runnable


@pytest.mark.parametrize("index", range(len(_runnable())))
def test_every_accepted_combination_prunes_and_reloads(index: int, model_folders, tmp_path) -> None:
    """Each accepted combination runs on one of the three layouts (rotating), reloads with
    prunenet.load_pruned, and meets its amount; a refusal at run time (a model that cannot
    store a refit bias, heads a layout cannot lose) is one line too."""
    strategy, structures, route, refit = combination = _runnable()[index]
    model_type = ("llama", "gpt2", "opt")[index % 3]
    request = _request(*combination)
    try:
        results = prunenet.prune(str(model_folders[model_type]), tmp_path / "out", request)
    except PruneNetError as error:
        assert "\n" not in str(error), (combination, model_type)
        return
    report = results[0].report
    reloaded = prunenet.load_pruned(tmp_path / "out")
    assert ffn_widths(reloaded.config) == [w for w in report.ffn_widths_after]
    if request.remove_params is not None:
        assert report.params_removed_fraction == pytest.approx(0.1, abs=0.06), combination
    else:
        assert report.ffn_ratio == pytest.approx(0.3, abs=0.05), combination


def test_a_budget_too_small_to_remove_anything_warns(model_folders, tmp_path, capsys) -> None:
    results = prunenet.prune(
        str(model_folders["llama"]), tmp_path / "out", remove_params=(1e-7,), **SMALL
    )

    assert results[0].report.params_after == results[0].report.params_before
    assert "removes nothing" in capsys.readouterr().err


# ----- parameter budgets on the routes that never hold the whole model ---------------------------


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return prunenet.load_pruned(folder).state_dict()


def test_a_parameter_budget_layer_by_layer_writes_the_weights_the_memory_route_writes(
    model_folders, tmp_path, no_disk_cache
) -> None:
    request = PruneRequest(remove_params=(0.2,), **SMALL)
    folder = str(model_folders["llama"])
    memory = prunenet.prune(folder, tmp_path / "memory", request.replace(route="memory"))[0]
    layerwise = prunenet.prune(folder, tmp_path / "layerwise", request.replace(route="layerwise"))

    assert layerwise[0].report.structures == memory.report.structures
    assert layerwise[0].report.params_removed_fraction >= 0.2
    want, have = _state(tmp_path / "memory"), _state(tmp_path / "layerwise")
    assert have.keys() == want.keys()
    assert all(torch.equal(have[name], tensor) for name, tensor in want.items())


def test_a_parameter_budget_streamed_meets_it_with_the_memory_routes_rows(
    model_folders, tmp_path
) -> None:
    request = PruneRequest(remove_params=(0.2, 0.3), scorer="magnitude", refit="none", **SMALL)
    folder = str(model_folders["llama"])
    memory = prunenet.prune(folder, tmp_path / "memory", request.replace(route="memory"))
    stream = prunenet.prune(folder, tmp_path / "stream", request.replace(route="stream"))

    for streamed, in_memory in zip(stream, memory, strict=True):
        assert streamed.report.ffn_widths_after == in_memory.report.ffn_widths_after
        assert streamed.report.structures == in_memory.report.structures
        assert streamed.report.params_removed_fraction >= streamed.amount
    assert [path.name for path in sorted((tmp_path / "stream").iterdir())] == [
        "params-0.20", "params-0.30"
    ]  # fmt: skip
