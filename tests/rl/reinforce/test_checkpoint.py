"""Malformed REINFORCE baseline zips: refused with a PruneNetError naming the problem before the
policy is built, and `prunenet prune --policy` exits 2 without reading the model."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

from prunenet.cli import main
from prunenet.errors import PruneNetError
from prunenet.rl.checkpoint import METADATA_FILE
from prunenet.rl.reinforce import checkpoint as reinforce_checkpoint
from prunenet.rl.reinforce.checkpoint import STATE_FILE, load_reinforce, save_reinforce
from prunenet.rl.reinforce.policy import RowLogitPolicy, state_shapes
from tests.conftest import FFN_WIDTH, HIDDEN_SIZE


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.zip"
    save_reinforce(RowLogitPolicy(HIDDEN_SIZE, FFN_WIDTH), path, {"ratio": 0.3})
    return path


def _rewrite(source: Path, target: Path, metadata: dict | None = None, state=None) -> Path:
    """A copy of `source` with keys of prunenet.json changed (None values removed) or its
    tensors replaced (a dict of tensors, or raw bytes)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        header = json.loads(old.read(METADATA_FILE))
        for key, value in (metadata or {}).items():
            header[key] = value
            if value is None:
                del header[key]
        new.writestr(METADATA_FILE, json.dumps(header))
        if isinstance(state, dict):
            state = safetensors.torch.save(state)
        new.writestr(STATE_FILE, old.read(STATE_FILE) if state is None else state)
    return target


def _never_built(*args, **kwargs):
    raise AssertionError("the policy must not be built from a checkpoint that is refused")


def test_a_well_formed_checkpoint_loads(good: Path) -> None:
    """Control: the files below differ from this one only in what each test breaks."""
    policy, _ = load_reinforce(good)
    assert (policy.d_model, policy.d_ff) == (HIDDEN_SIZE, FFN_WIDTH)


def test_state_shapes_are_those_of_the_built_policy() -> None:
    built = {name: tuple(t.shape) for name, t in RowLogitPolicy(7, 3).state_dict().items()}
    assert state_shapes(7) == built


@pytest.mark.parametrize("key", ["d_model", "d_ff"])
@pytest.mark.parametrize("value", [-5, 0, True, 10**9, "16", 16.5, None])
def test_a_bad_size_is_refused_before_the_policy_is_built(
    good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, value: object
) -> None:
    monkeypatch.setattr(reinforce_checkpoint, "RowLogitPolicy", _never_built)
    bad = _rewrite(good, tmp_path / "bad.zip", {key: value})
    with pytest.raises(PruneNetError, match=f"{key}.*a whole number from 1 to 1,048,576"):
        load_reinforce(bad)


def test_weights_of_another_width_than_declared_are_refused_before_the_policy_is_built(
    good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reinforce_checkpoint, "RowLogitPolicy", _never_built)
    bad = _rewrite(good, tmp_path / "bad.zip", {"d_model": 4096})
    with pytest.raises(PruneNetError, match=r"linear.weight is \(1, 16\), expected \(1, 4096\)"):
        load_reinforce(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(good: Path, tmp_path: Path, value: float) -> None:
    state = {"linear.weight": torch.zeros(1, HIDDEN_SIZE), "linear.bias": torch.tensor([value])}
    with pytest.raises(PruneNetError, match="linear.bias hold NaN or infinite"):
        load_reinforce(_rewrite(good, tmp_path / "bad.zip", state=state))


def test_missing_weights_are_refused_naming_them(good: Path, tmp_path: Path) -> None:
    state = {"linear.weight": torch.zeros(1, HIDDEN_SIZE)}
    with pytest.raises(PruneNetError, match="missing linear.bias"):
        load_reinforce(_rewrite(good, tmp_path / "bad.zip", state=state))


def test_weights_that_are_not_safetensors_are_refused(good: Path, tmp_path: Path) -> None:
    with pytest.raises(PruneNetError, match="not a valid safetensors"):
        load_reinforce(_rewrite(good, tmp_path / "bad.zip", state=b"\xff" * 32))


def test_prune_with_a_malformed_baseline_exits_2_before_reading_the_model(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = _rewrite(good, tmp_path / "bad.zip", {"d_model": 10**9})
    out = tmp_path / "out"
    argv = ["prune", "--model", str(tmp_path / "absent"), "--ratio", "0.3", "--policy", str(bad),
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "d_model=1000000000, which is not a whole number" in error
    assert not out.exists()
