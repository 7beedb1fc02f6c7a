"""The strategy policy: training writes a pickle-free checkpoint, loading gives the same
strategies, the same seed trains the same policy, damaged or foreign files are refused."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from prunenet.allocation.strategy import STRUCTURES, StrategyContext, observation_size
from prunenet.errors import PruneNetError
from prunenet.rl.strategy import (
    BUNDLED_STRATEGY,
    METADATA,
    WEIGHTS,
    StrategyTrainConfig,
    load_strategy_policy,
    propose,
    train_strategy,
)
from tests.conftest import ROOMY_GQA, start_token_text, tiny_model

QUICK = StrategyTrainConfig(timesteps=64, eval_every=4, seed=1)


@pytest.fixture(scope="module")
def context() -> StrategyContext:
    return StrategyContext(tiny_model("llama", **ROOMY_GQA), start_token_text())


@pytest.fixture(scope="module")
def checkpoint(context, tmp_path_factory):
    path = tmp_path_factory.mktemp("strategy") / "policy.zip"
    metadata = train_strategy(context, QUICK, path, model_name="tiny")
    return path, metadata


def test_the_checkpoint_holds_only_json_and_safetensors(checkpoint) -> None:
    path, metadata = checkpoint
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == sorted([METADATA, WEIGHTS])
        header = json.loads(archive.read(METADATA))
    assert header["model"] == "tiny" and header["best_step"] == metadata["best_step"]
    assert header["history"][0]["step"] == 0  # the untrained policy was evaluated first


def test_loading_gives_back_the_policy_that_was_evaluated_best(context, checkpoint) -> None:
    path, metadata = checkpoint
    policy, loaded = load_strategy_policy(path)
    scores = [np.log10(context.kl(propose(policy, context, b))) for b in (0.1, 0.2, 0.3)]
    assert float(np.mean(scores)) == pytest.approx(loaded["mean_log10_kl"], rel=1e-9)
    assert loaded["mean_log10_kl"] == min(h["mean_log10_kl"] for h in metadata["history"])


def test_the_same_seed_trains_the_same_policy(context, checkpoint, tmp_path) -> None:
    path, _ = checkpoint
    again = tmp_path / "again.zip"
    train_strategy(context, QUICK, again, model_name="tiny")
    first, _ = load_strategy_policy(path)
    second, _ = load_strategy_policy(again)
    pairs = zip(first.network.state_dict().items(), second.network.state_dict().items(),
                strict=True)  # fmt: skip
    for (name, a), (_, b) in pairs:
        assert torch.equal(a, b), name


def test_proposals_meet_the_budget_for_any_request(context, checkpoint) -> None:
    policy, _ = load_strategy_policy(checkpoint[0])
    for budget in (0.05, 0.17, 0.33):
        strategy = propose(policy, context, budget, STRUCTURES)
        goal = round(budget * context.costs.dense)
        assert goal <= strategy.params_removed < goal + max(context.costs.per_row)


def _rewrite(source, target, metadata=None, extra=None) -> None:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            data = old.read(name)
            if name == METADATA and metadata is not None:
                data = json.dumps({**json.loads(data), **metadata}).encode()
            new.writestr(name, data)
        for name, data in (extra or {}).items():
            new.writestr(name, data)


@pytest.mark.parametrize(
    "metadata, message",
    [({"kind": "row-policy"}, "not a PruneNet strategy"),
     ({"descriptors": ["depth"]}, "other layer descriptors"),
     ({"hidden": "64"}, "malformed"),
     ({"hidden": 32}, "do not match")],
)  # fmt: skip
def test_foreign_or_inconsistent_checkpoints_are_refused(checkpoint, tmp_path, metadata, message):
    bad = tmp_path / "bad.zip"
    _rewrite(checkpoint[0], bad, metadata)
    with pytest.raises(PruneNetError, match=message):
        load_strategy_policy(bad)


def test_a_pickle_inside_the_zip_is_never_opened(checkpoint, tmp_path) -> None:
    # A member that would run code if unpickled: loading must ignore it (and still work).
    bad = tmp_path / "with-pickle.zip"
    payload = b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR."
    _rewrite(checkpoint[0], bad, extra={"policy.pth": payload, "data": payload})
    load_strategy_policy(bad)
    assert not (tmp_path / "pwned").exists()


def test_a_file_that_is_not_a_zip_is_refused(tmp_path) -> None:
    bad = tmp_path / "policy.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(PruneNetError, match="could not be read"):
        load_strategy_policy(bad)


def test_make_strategy_refuses_an_unknown_kind_or_a_policy_kind_without_a_policy(context):
    from prunenet.rl.strategy import make_strategy

    for kind in ("greedy", "policy"):
        with pytest.raises(PruneNetError, match="Unknown strategy"):
            make_strategy(kind, context, 0.2)
    assert make_strategy("ramp", context, 0.2).source == "ramp"


def test_a_policy_trained_on_the_ramp_base_records_it_and_proposes_corrections_of_the_ramp(
    context, tmp_path
) -> None:
    path = tmp_path / "ramp.zip"
    config = StrategyTrainConfig(timesteps=64, eval_every=4, seed=1, base="ramp",
                                 structures=("ffn",))  # fmt: skip
    metadata = train_strategy(context, config, path, model_name="tiny")
    policy, loaded = load_strategy_policy(path)
    assert policy.base == "ramp" and loaded["base"] == "ramp"
    assert loaded["observation_size"] == observation_size("ramp") == observation_size() + 1
    strategy = propose(policy, context, 0.2, ("ffn",))
    ramp = context.best_ramp(0.2)
    assert strategy.extra == {"base": "ramp", "slope": ramp.extra["slope"], "base_kl": ramp.kl}
    # The untrained policy proposes small corrections: its strategy is the ramp's, or near it.
    assert metadata["history"][0]["step"] == 0
    goal = round(0.2 * context.costs.dense)
    assert goal <= strategy.params_removed < goal + max(context.costs.per_row)


def test_a_checkpoint_with_an_unknown_base_is_refused(checkpoint, tmp_path) -> None:
    bad = tmp_path / "bad.zip"
    _rewrite(checkpoint[0], bad, {"base": "greedy"})
    with pytest.raises(PruneNetError, match="malformed"):
        load_strategy_policy(bad)


def test_a_checkpoint_from_before_the_ramp_base_loads_as_uniform(checkpoint, tmp_path) -> None:
    old = tmp_path / "old.zip"
    with zipfile.ZipFile(checkpoint[0]) as archive:
        header = json.loads(archive.read(METADATA))
    header.pop("base")
    with zipfile.ZipFile(checkpoint[0]) as source, zipfile.ZipFile(old, "w") as target:
        target.writestr(METADATA, json.dumps(header))
        target.writestr(WEIGHTS, source.read(WEIGHTS))
    policy, _ = load_strategy_policy(old)
    assert policy.base == "uniform"


def test_the_bundled_policy_loads_on_the_ramp_base_and_answers_another_model(context) -> None:
    # Its descriptors do not depend on size: the SmolLM2 policy proposes for any model.
    policy, metadata = load_strategy_policy(BUNDLED_STRATEGY)
    assert policy.base == "ramp" and metadata["model"] == "smollm2-135m"
    strategy = propose(policy, context, 0.2, ("ffn",))
    goal = round(0.2 * context.costs.dense)
    assert goal <= strategy.params_removed < goal + max(context.costs.per_row)
