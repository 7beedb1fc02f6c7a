"""Malformed PPO policy zips (`--policy CKPT`): each is refused with a PruneNetError that names the
problem, before the network is built, and `prunenet prune` exits 2 without reading the model."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

from prunenet.analysis.features import FEATURE_SETS, FEATURE_VERSION
from prunenet.cli import main
from prunenet.errors import PruneNetError
from prunenet.rl.checkpoint import CHECKPOINT_FORMAT, METADATA_FILE
from prunenet.rl.observation import spaces_for
from prunenet.rl.ppo import checkpoint as ppo_checkpoint
from prunenet.rl.ppo.checkpoint import WEIGHTS_FILE, load_policy
from prunenet.rl.ppo.policy import RowScoringPolicy, state_shapes
from tests.conftest import FFN_WIDTH

METADATA = {"format": CHECKPOINT_FORMAT, "feature_version": FEATURE_VERSION, "algo": "ppo",
            "feature_set": "selfgen", "policy_kwargs": {"hidden": 8}}  # fmt: skip


def _state(hidden: int = 8) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    policy = RowScoringPolicy(*spaces_for(1, "selfgen"), lambda _: 0.0, hidden=hidden)
    return {name: tensor.clone() for name, tensor in policy.state_dict().items()}


def _zip(path: Path, metadata: object = METADATA, weights: bytes | dict | None = None) -> Path:
    """A checkpoint with `metadata` (JSON, or raw bytes) and `weights` (tensors, or raw bytes;
    default: a fresh hidden-8 policy's)."""
    weights = _state() if weights is None else weights
    with zipfile.ZipFile(path, "w") as archive:
        raw = metadata if isinstance(metadata, bytes) else json.dumps(metadata).encode()
        archive.writestr(METADATA_FILE, raw)
        if isinstance(weights, dict):
            weights = safetensors.torch.save(weights)
        archive.writestr(WEIGHTS_FILE, weights)
    return path


def _refused(path: Path, match: str) -> None:
    with pytest.raises(PruneNetError, match=match):
        load_policy(path, FFN_WIDTH)


def test_a_well_formed_checkpoint_loads(tmp_path: Path) -> None:
    """Control: the files below differ from this one only in what each test breaks."""
    policy, _ = load_policy(_zip(tmp_path / "good.zip"), FFN_WIDTH)
    assert policy.hidden == 8


@pytest.mark.parametrize("columns_of", sorted(FEATURE_SETS))
@pytest.mark.parametrize("hidden", [5, 8])
def test_state_shapes_are_those_of_the_built_network(columns_of: str, hidden: int) -> None:
    spaces = spaces_for(3, columns_of)
    policy = RowScoringPolicy(*spaces, lambda _: 0.0, hidden=hidden)
    built = {name: tuple(tensor.shape) for name, tensor in policy.state_dict().items()}
    assert state_shapes(spaces[0].shape[-1], hidden) == built


def test_a_file_that_is_not_a_zip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.zip"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    _refused(path, "corrupt or not a zip file")


def test_metadata_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    _refused(_zip(tmp_path / "p.zip", b'{"algo": "\xff\xfe"}'), "corrupt.*UnicodeDecodeError")


def test_metadata_nested_too_deep_for_the_parser_is_refused(tmp_path: Path) -> None:
    _refused(_zip(tmp_path / "p.zip", b"[" * 100_000), "corrupt.*RecursionError")


def test_metadata_that_is_not_a_json_object_is_refused(tmp_path: Path) -> None:
    _refused(_zip(tmp_path / "p.zip", [METADATA]), "JSON list, not an object")


def test_weights_that_are_not_safetensors_are_refused(tmp_path: Path) -> None:
    _refused(_zip(tmp_path / "p.zip", weights=b"\x08" + b"\0" * 64), "not a valid safetensors")


@pytest.mark.parametrize("hidden", [-5, 0, True, 10**6, 30000, "8", 8.0, None])
def test_a_bad_hidden_width_is_refused_before_any_network_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hidden: object
) -> None:
    monkeypatch.setattr(ppo_checkpoint, "RowScoringPolicy", _never_built)
    metadata = {**METADATA, "policy_kwargs": {"hidden": hidden}}
    _refused(_zip(tmp_path / "p.zip", metadata), "hidden.*a whole number from 1 to 4,096")


def test_missing_weights_are_refused_naming_them(tmp_path: Path) -> None:
    state = _state()
    del state["mlp_extractor.mix.0.weight"]
    _refused(_zip(tmp_path / "p.zip", weights=state), "missing mlp_extractor.mix.0.weight")


def test_unexpected_weights_are_refused_naming_them(tmp_path: Path) -> None:
    state = {**_state(), "extra.weight": torch.zeros(2)}
    _refused(_zip(tmp_path / "p.zip", weights=state), "unexpected extra.weight")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(tmp_path: Path, value: float) -> None:
    state = _state()
    state["action_net.weight"][0, 0] = value
    _refused(_zip(tmp_path / "p.zip", weights=state), "action_net.weight hold NaN or infinite")


def test_integer_weights_are_refused(tmp_path: Path) -> None:
    state = _state()
    state["value_net.bias"] = torch.zeros(1, dtype=torch.int64)
    _refused(_zip(tmp_path / "p.zip", weights=state), "value_net.bias are not floating-point")


def test_weights_of_another_width_than_declared_are_refused_before_any_network_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ppo_checkpoint, "RowScoringPolicy", _never_built)
    metadata = {**METADATA, "policy_kwargs": {"hidden": 16}}
    expected = (
        r"do not match this PruneNet's policy network \(hidden=16.*\(8, 10\), expected \(16, 10\)"
    )
    _refused(_zip(tmp_path / "p.zip", metadata), expected)


def test_a_long_list_of_problems_is_cut_to_a_few_names(tmp_path: Path) -> None:
    state = {f"junk.{index}": torch.zeros(1) for index in range(500)}
    with pytest.raises(PruneNetError) as refused:
        load_policy(_zip(tmp_path / "p.zip", weights=state), FFN_WIDTH)
    assert "... (10 more)" in str(refused.value) and "... (497 more)" in str(refused.value)
    assert len(str(refused.value)) < 1000


def _never_built(*args, **kwargs):
    raise AssertionError("the network must not be built from a checkpoint that is refused")


@pytest.mark.parametrize(
    ("metadata", "weights", "message"),
    [
        ({**METADATA, "policy_kwargs": {"hidden": 30000}}, None, "hidden=30000"),
        (b"\xff\xfe{", None, "corrupt"),
        (METADATA, {"log_std": torch.tensor(float("nan"))}, "missing"),
    ],
)
def test_prune_with_a_malformed_policy_exits_2_before_reading_the_model(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    metadata: object,
    weights: dict | None,
    message: str,
) -> None:
    policy = _zip(tmp_path / "p.zip", metadata, weights)
    out = tmp_path / "out"
    # No model folder exists: the policy must be refused before the model is looked for.
    argv = ["prune", "--model", str(tmp_path / "absent"), "--ratio", "0.3", "--policy",
            str(policy), "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not out.exists()
