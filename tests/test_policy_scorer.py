"""Scoring with a trained policy: deterministic means, any FFN width, weights-only streaming."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from stable_baselines3 import PPO

from envs.ffn_prune import FFNPruneEnv
from prunenet.arch import adapter_for, decoder_layers, ffn_weights
from prunenet.errors import PruneNetError
from prunenet.features import model_layer_data
from prunenet.policy import RowScoringPolicy, write_metadata
from prunenet.policy_scorer import PolicyScorer
from prunenet.selfgen import SelfGenConfig
from tests.conftest import FFN_WIDTH, tiny_model
from tests.conftest import SMALL_SELFGEN as SMALL


@pytest.fixture(autouse=True)
def _small_uncached_selfgen(monkeypatch: pytest.MonkeyPatch) -> None:
    """No disk cache, and the scorer's self-generated text shrunk to SMALL (speed only)."""
    monkeypatch.setenv("PRUNENET_NO_CACHE", "1")
    monkeypatch.setattr(
        "prunenet.policy_scorer.SelfGenConfig",
        lambda seed=0: SelfGenConfig(SMALL.sequences, SMALL.length, seed, SMALL.kept_tokens),
    )


def _save_policy(folder: Path, feature_set: str, reward: str) -> Path:
    """An untrained PPO policy for `feature_set`, saved as a PruneNet checkpoint."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRUNENET_NO_CACHE", "1")
        layer_data = model_layer_data(tiny_model("llama"), feature_set, SMALL)
    env = FFNPruneEnv(layer_data=[layer_data], feature_set=feature_set, reward=reward)
    agent = PPO(RowScoringPolicy, env, n_steps=8, batch_size=8, seed=0, policy_kwargs={"hidden": 8})
    path = folder / f"{feature_set}.zip"
    agent.save(path)
    metadata = {"algo": "ppo", "feature_set": feature_set, "reward": reward, "seed": 0}
    write_metadata(path, {**metadata, "ratios": [0.1, 0.5], "source_model": "tiny"})
    return path


@pytest.fixture(scope="module")
def selfgen_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_policy(tmp_path_factory.mktemp("selfgen"), "selfgen", "function")


@pytest.fixture(scope="module")
def weights_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_policy(tmp_path_factory.mktemp("weights"), "weights", "ks")


def test_score_model_scores_models_of_two_different_ffn_widths(selfgen_checkpoint) -> None:
    scorer = PolicyScorer(selfgen_checkpoint)
    for width in (FFN_WIDTH, 40):
        model = tiny_model("llama", intermediate_size=width)
        scores = scorer.score_model(model, ratio=0.3)
        assert len(scores) == len(decoder_layers(model))
        assert all(s.shape == (width,) and torch.all(torch.isfinite(s)) for s in scores)
        assert all(s.unique().numel() == width for s in scores)


def test_the_same_call_twice_gives_identical_scores(selfgen_checkpoint) -> None:
    scorer, model = PolicyScorer(selfgen_checkpoint), tiny_model("llama")
    first = scorer.score_model(model, ratio=0.3)
    second = scorer.score_model(model, ratio=0.3)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_scores_do_not_depend_on_the_global_rng(selfgen_checkpoint) -> None:
    """Fresh scorers, so the self-generated text is sampled again under another global seed."""
    torch.manual_seed(1)
    first = PolicyScorer(selfgen_checkpoint).score_model(tiny_model("llama"), ratio=0.3)
    torch.manual_seed(2)
    torch.rand(17)
    second = PolicyScorer(selfgen_checkpoint).score_model(tiny_model("llama"), ratio=0.3)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_scores_follow_the_model(selfgen_checkpoint) -> None:
    scorer = PolicyScorer(selfgen_checkpoint)
    first = scorer.score_model(tiny_model("llama"), ratio=0.3)
    other = scorer.score_model(tiny_model("llama", seed=99), ratio=0.3)
    assert not torch.equal(first[0], other[0])


def test_a_ratio_is_required(selfgen_checkpoint) -> None:
    with pytest.raises(PruneNetError, match="pass ratio="):
        PolicyScorer(selfgen_checkpoint).score_model(tiny_model("llama"))


def test_a_selfgen_policy_refuses_to_score_one_layer_at_a_time(selfgen_checkpoint) -> None:
    model = tiny_model("llama")
    ffn = ffn_weights(decoder_layers(model)[0], adapter_for(model.config))
    with pytest.raises(PruneNetError, match="--features weights"):
        PolicyScorer(selfgen_checkpoint).score_layer(ffn, 0, 2, ratio=0.3)


def test_a_weights_policy_scores_layer_by_layer_as_it_scores_the_model(weights_checkpoint) -> None:
    scorer = PolicyScorer(weights_checkpoint)
    assert scorer.weights_only
    model = tiny_model("llama")
    layers = decoder_layers(model)
    whole = scorer.score_model(model, ratio=0.3)
    for index, layer in enumerate(layers):
        ffn = ffn_weights(layer, adapter_for(model.config))
        assert torch.equal(scorer.score_layer(ffn, index, len(layers), ratio=0.3), whole[index])


def test_describe_records_the_checkpoint_and_its_training_settings(selfgen_checkpoint) -> None:
    described = PolicyScorer(selfgen_checkpoint).describe()
    assert described["scorer"] == "policy"
    assert described["checkpoint"] == str(selfgen_checkpoint)
    assert described["feature_set"] == "selfgen" and described["reward"] == "function"
    assert described["ratios"] == [0.1, 0.5] and described["source_model"] == "tiny"


def test_a_missing_checkpoint_is_refused_when_the_scorer_is_built(tmp_path: Path) -> None:
    with pytest.raises(PruneNetError, match="does not exist"):
        PolicyScorer(tmp_path / "missing.zip")
