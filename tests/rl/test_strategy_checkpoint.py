"""Malformed strategy-policy zips (`--strategy-policy CKPT`): refused with a PruneNetError naming
the problem before the network is built, and `prunenet prune` exits 2 without reading the model.
Built from the bundled policy, so nothing is trained here."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import safetensors.torch
import torch
from stable_baselines3.common.policies import ActorCriticPolicy

from prunenet.allocation.strategy import BASES, observation_size
from prunenet.cli import main
from prunenet.errors import PruneNetError
from prunenet.rl import strategy as strategy_module
from prunenet.rl.strategy import (
    BUNDLED_STRATEGY,
    METADATA,
    WEIGHTS,
    _network_kwargs,
    _state_shapes,
    load_strategy_policy,
)

with zipfile.ZipFile(BUNDLED_STRATEGY) as _archive:
    HEADER = json.loads(_archive.read(METADATA))
    STATE = safetensors.torch.load(_archive.read(WEIGHTS))


def _zip(path: Path, metadata: object = None, weights: bytes | dict | None = None) -> Path:
    """The bundled policy with its metadata (a dict of changes, other JSON, or raw bytes) or its
    weights (tensors, or raw bytes) replaced."""
    if metadata is None or isinstance(metadata, dict):
        metadata = {**HEADER, **(metadata or {})}
    raw = metadata if isinstance(metadata, bytes) else json.dumps(metadata).encode()
    weights = STATE if weights is None else weights
    if isinstance(weights, dict):
        weights = safetensors.torch.save(weights)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(METADATA, raw)
        archive.writestr(WEIGHTS, weights)
    return path


def _refused(path: Path, match: str) -> None:
    with pytest.raises(PruneNetError, match=match):
        load_strategy_policy(path)


@pytest.fixture
def never_built(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the network must not be built from a checkpoint that is refused")

    monkeypatch.setattr(strategy_module, "ActorCriticPolicy", fail)


def test_a_rewritten_copy_of_the_bundled_policy_loads(tmp_path: Path) -> None:
    """Control: the files below differ from this one only in what each test breaks."""
    policy, metadata = load_strategy_policy(_zip(tmp_path / "good.zip"))
    assert policy.base == "ramp" and metadata["hidden"] == 64


@pytest.mark.parametrize("base", BASES)
def test_state_shapes_are_those_of_the_built_network(base: str) -> None:
    network = ActorCriticPolicy(
        gym.spaces.Box(-np.inf, np.inf, (observation_size(base),), np.float32),
        gym.spaces.Box(-1.0, 1.0, (3,), np.float32),
        lambda _: 0.0,
        **_network_kwargs(5, -1.0),
    )
    built = {name: tuple(tensor.shape) for name, tensor in network.state_dict().items()}
    assert _state_shapes(observation_size(base), 5) == built


def test_a_file_that_is_not_a_zip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.zip"
    path.write_bytes(b"not a zip")
    _refused(path, "could not be read.*scripts/train_strategy.py")


def test_metadata_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    _refused(_zip(tmp_path / "p.zip", b"\xff\xfe{"), "could not be read.*UnicodeDecodeError")


def test_metadata_nested_too_deep_for_the_parser_is_refused(tmp_path: Path) -> None:
    _refused(_zip(tmp_path / "p.zip", b"[" * 100_000), "could not be read.*RecursionError")


def test_metadata_that_is_not_a_json_object_is_refused(tmp_path: Path) -> None:
    _refused(_zip(tmp_path / "p.zip", [HEADER]), "not a PruneNet strategy policy")


def test_weights_that_are_not_safetensors_are_refused(tmp_path: Path) -> None:
    _refused(_zip(tmp_path / "p.zip", weights=b"garbage" * 10), "not a valid safetensors file")


def test_a_zip_without_weights_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(METADATA, json.dumps(HEADER))
    _refused(path, "could not be read.*KeyError")


@pytest.mark.usefixtures("never_built")
@pytest.mark.parametrize("hidden", [-5, 0, True, 10**6, 30000, "64", 64.0, None])
def test_a_bad_hidden_width_is_refused_before_any_network_is_built(
    tmp_path: Path, hidden: object
) -> None:
    path = _zip(tmp_path / "p.zip", {"hidden": hidden})
    _refused(path, "malformed network description: .*hidden.*a whole number from 1 to 4,096")


@pytest.mark.parametrize("log_std", [float("nan"), float("inf"), True, "-1", None])
def test_a_bad_log_std_init_is_refused(tmp_path: Path, log_std: object) -> None:
    path = _zip(tmp_path / "p.zip", {"log_std_init": log_std})
    _refused(path, "malformed network description: log_std_init=.*not a finite number")


@pytest.mark.usefixtures("never_built")
def test_weights_of_another_width_than_declared_are_refused_before_any_network_is_built(
    tmp_path: Path,
) -> None:
    path = _zip(tmp_path / "p.zip", {"hidden": 32})
    _refused(
        path, r"do not match a strategy network with hidden=32.*\(64, 14\), expected \(32, 14\)"
    )


def test_missing_weights_are_refused_naming_them(tmp_path: Path) -> None:
    state = {name: tensor for name, tensor in STATE.items() if name != "action_net.bias"}
    _refused(_zip(tmp_path / "p.zip", weights=state), "missing action_net.bias")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path: Path, value: float) -> None:
    state = {**STATE, "log_std": torch.full((3,), value)}
    _refused(_zip(tmp_path / "p.zip", weights=state), "log_std hold NaN or infinite")


@pytest.mark.parametrize(
    ("metadata", "weights", "message"),
    [
        ({"hidden": 30000}, None, "hidden=30000"),
        (b"\xff\xfe{", None, "UnicodeDecodeError"),
        (None, {**STATE, "log_std": torch.full((3,), float("nan"))}, "NaN"),
        (None, b"garbage", "not a valid safetensors file"),
    ],
)
def test_prune_with_a_malformed_strategy_policy_exits_2_before_reading_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture, metadata, weights, message: str
) -> None:
    policy = _zip(tmp_path / "p.zip", metadata, weights)
    out = tmp_path / "out"
    # No model folder exists: the policy must be refused before the model is looked for.
    argv = ["prune", "--model", str(tmp_path / "absent"), "--remove-params", "0.2", "--strategy",
            "policy", "--strategy-policy", str(policy), "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not out.exists()


def test_a_member_declaring_more_bytes_than_any_checkpoint_has_is_refused_unread(
    tmp_path: Path,
) -> None:
    path = _zip(tmp_path / "p.zip")
    data = bytearray(path.read_bytes())
    start = data.index(b"PK\x01\x02")  # the first central header: prunenet.json
    data[start + 24 : start + 28] = (2**31).to_bytes(4, "little")  # its uncompressed size
    path.write_bytes(bytes(data))
    _refused(path, "could not be read.*declares 2147483648 bytes")
