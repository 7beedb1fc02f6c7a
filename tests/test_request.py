"""The request object: one place for every option's default, validation before any model is
read, and a JSON form that replays."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from prunenet.errors import PruneNetError
from prunenet.request import (
    UNSUPPORTED,
    PruneRequest,
    available_cores,
    default_of,
    field_names,
    read_request_file,
    threads_to_use,
)


def _refused(**fields) -> str:
    with pytest.raises(PruneNetError) as error:
        PruneRequest(**fields).validate()
    return str(error.value)


def test_the_default_request_is_the_documented_default_path() -> None:
    request = PruneRequest(ratio=(0.3,)).validate()

    assert (request.strategy, request.scorer, request.route) == ("uniform", "policy", "auto")
    assert (request.text_sequences, request.text_length, request.seed) == (256, 256, 0)
    assert default_of("threads") == request.threads is None  # every usable core, when run


def test_exactly_one_amount_is_required() -> None:
    assert "got none" in _refused()
    assert "got ratio, remove_params" in _refused(ratio=(0.2,), remove_params=(0.2,))


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, 1.5, True])
def test_parameter_shares_outside_zero_one_are_refused_in_parameter_terms(value) -> None:
    message = _refused(remove_params=(value,))

    assert "share of ALL parameters" in message and "(0, 1)" in message


def test_duplicate_amounts_are_refused_with_a_short_message() -> None:
    message = _refused(
        remove_params=tuple([0.2] * 10_000 + [round(0.01 * k, 2) for k in range(1, 9)])
    )

    assert "more than once" in message
    assert len(message) < 300


@pytest.mark.parametrize(
    "field, value",
    [("seed", 2**70), ("seed", -1), ("text_length", 1), ("text_sequences", 0), ("threads", 0),
     ("seed", True), ("text_length", 2.5)],
)  # fmt: skip
def test_out_of_range_integers_name_the_valid_range(field: str, value) -> None:
    message = _refused(ratio=(0.3,), **{field: value})

    assert field in message and "must be an integer from" in message


@pytest.mark.parametrize(
    "fields, reason",
    [
        (dict(ratio=(0.3,), route="stream", refit="lsq"), "stream + refit"),
        (dict(ratio=(0.3,), route="stream"), "stream + activation scorer"),
        (dict(remove_params=(0.2,), route="layerwise", structures=("ffn", "layers")),
         "stream/layerwise + remove-params beyond ffn"),
        (dict(remove_params=(0.2,), route="stream", scorer="magnitude",
              structures=("ffn", "heads")), "stream/layerwise + remove-params beyond ffn"),
        (dict(ratio=(0.3,), route="layerwise", strategy="auto"), "stream/layerwise + strategy"),
        (dict(ratio=(0.3,), route="layerwise", scorer="magnitude"),
         "layerwise + weights-only scorer"),
        (dict(ratio=(0.3,), route="layerwise", device="cuda"), "layerwise + device"),
        (dict(remove_params=(0.2,), structures=("ffn", "heads"), analysis="shared"),
         "shared + not ffn/uniform"),
        (dict(remove_params=(0.2,), structures=("ffn", "layers"), strategy="ramp"),
         "ramp + heads/layers"),
        (dict(target_speedup=1.2, strategy="auto"), "target-speedup + strategy"),
    ],
)  # fmt: skip
def test_each_unsupported_combination_is_refused_with_its_one_line_reason(fields, reason) -> None:
    assert UNSUPPORTED[reason] in _refused(**fields)


def test_strategies_belong_to_their_amount() -> None:
    assert "use it with --remove-params" in _refused(ratio=(0.3,), strategy="ramp")
    assert "--ratio only" in _refused(remove_params=(0.2,), strategy="auto")
    assert "needs --remove-params" in _refused(ratio=(0.3,), structures=("ffn", "heads"))


def test_a_checkpoint_path_is_the_policy_strategy_with_that_file() -> None:
    request = PruneRequest(remove_params=(0.2,), strategy="my/strategy.zip").validate()

    assert request.strategy_name == "policy"
    assert request.strategy_checkpoint == "my/strategy.zip"
    assert PruneRequest(remove_params=(0.2,), strategy="policy").strategy_checkpoint is None


def test_unknown_names_are_refused_with_the_choices() -> None:
    assert "choose uniform, auto, ramp, policy, search" in _refused(ratio=(0.3,), strategy="ramps")
    assert "choose from ffn, heads, layers" in _refused(remove_params=(0.2,), structures=("mlp",))


def test_the_json_form_replays_the_same_request(tmp_path: Path) -> None:
    request = PruneRequest(remove_params=(0.1, 0.2), structures=("ffn", "heads"), seed=7)
    path = tmp_path / "request.json"
    path.write_text(json.dumps({"model": "smollm2-135m", "request": request.to_dict()}))

    replayed, model = read_request_file(path)

    assert replayed == request
    assert model == "smollm2-135m"


def test_a_flat_config_file_with_a_typo_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "request.json"
    path.write_text(json.dumps({"remove_params": [0.2], "stratgey": "ramp"}))

    with pytest.raises(PruneNetError, match="Unknown request option.*stratgey"):
        read_request_file(path)


@pytest.mark.parametrize("content", [b"\xff\xfe not json", b"[1, 2]", b"{"])
def test_an_unreadable_config_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "request.json"
    path.write_bytes(content)

    with pytest.raises(PruneNetError, match="--config"):
        read_request_file(path)


def test_rare_options_are_request_fields() -> None:
    assert set(PruneRequest.RARE) <= set(field_names())


# ----- threads --------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity here")
def test_no_thread_count_means_every_core_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads_to_use(PruneRequest().threads) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("setting", "expected"), [("3", 3), (" 5 ", 5), ("0", None), ("x", None)])
def test_no_thread_count_follows_a_whole_positive_omp_num_threads(
    monkeypatch: pytest.MonkeyPatch, setting: str, expected: int | None
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", setting)
    assert threads_to_use(None) == (expected or available_cores())


def test_an_explicit_thread_count_wins_over_omp_num_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads_to_use(4) == 4


def test_an_explicit_thread_count_wins_over_the_core_count() -> None:
    assert threads_to_use(3) == 3


def test_the_core_count_is_the_machines_where_the_system_reports_no_affinity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert available_cores() == 6


def test_a_request_without_a_thread_count_validates_and_replays_from_json(tmp_path: Path) -> None:
    request = PruneRequest(ratio=(0.3,)).validate()
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request.to_dict()))

    replayed, _ = read_request_file(path)

    assert replayed.threads is None and replayed == request
