"""Scoring with a trained policy: deterministic means, any FFN width, weights-only streaming."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import stable_baselines3.common.save_util as save_util
import torch
from stable_baselines3 import PPO

from envs.ffn_prune import FFNPruneEnv
from prunenet.analysis.features import model_layer_data
from prunenet.analysis.selfgen import SelfGenConfig
from prunenet.core.arch import adapter_for, decoder_layers
from prunenet.core.surgery import ffn_weights
from prunenet.errors import PruneNetError
from prunenet.rl.checkpoint import METADATA_FILE, read_metadata, read_state_dict
from prunenet.rl.ppo.checkpoint import LEGACY_WEIGHTS_FILE, WEIGHTS_FILE, write_policy_members
from prunenet.rl.ppo.policy import RowScoringPolicy
from prunenet.scoring.ppo import PolicyScorer
from prunenet.scoring.registry import BUNDLED_POLICY
from tests.conftest import FFN_WIDTH, tiny_model
from tests.conftest import SMALL_SELFGEN as SMALL


@pytest.fixture(autouse=True)
def _small_uncached_selfgen(monkeypatch: pytest.MonkeyPatch) -> None:
    """No disk cache, and the scorer's self-generated text shrunk to SMALL (speed only)."""
    monkeypatch.setenv("PRUNENET_NO_CACHE", "1")
    monkeypatch.setattr(
        "prunenet.scoring.ppo.SelfGenConfig",
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
    write_policy_members(
        path, {**metadata, "ratios": [0.1, 0.5], "source_model": "tiny"}, agent.policy
    )
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


def test_a_damaged_checkpoint_is_refused_when_the_scorer_is_built(
    selfgen_checkpoint, tmp_path: Path
) -> None:
    """Before any model is loaded: `prunenet prune --policy` fails fast."""
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(selfgen_checkpoint) as source, zipfile.ZipFile(damaged, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            target.writestr(item, data[:20] if item.filename == WEIGHTS_FILE else data)
    with pytest.raises(PruneNetError, match="could not be read"):
        PolicyScorer(damaged)


# ----- the bundled policy ------------------------------------------------------------------------


def test_the_bundled_policy_is_in_the_current_format_with_safetensors_weights() -> None:
    metadata = read_metadata(BUNDLED_POLICY)
    assert metadata["format"] == 2 and metadata["policy_kwargs"] == {"hidden": 32}
    with zipfile.ZipFile(BUNDLED_POLICY) as archive:
        assert WEIGHTS_FILE in archive.namelist()


def test_the_bundled_policy_loads_without_sb3_loaders(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("the bundled policy must load without unpickling")

    monkeypatch.setattr(save_util, "load_from_zip_file", forbidden)
    monkeypatch.setattr(save_util, "json_to_data", forbidden)
    scores = PolicyScorer(BUNDLED_POLICY).score_model(tiny_model("llama"), ratio=0.3)
    assert all(s.shape == (FFN_WIDTH,) and torch.all(torch.isfinite(s)) for s in scores)


def test_the_bundled_safetensors_weights_are_exactly_the_trained_sb3_weights() -> None:
    """The conversion copied tensors: the SB3 `policy.pth` kept in the zip holds the same ones."""
    converted = read_state_dict(BUNDLED_POLICY, WEIGHTS_FILE)
    trained = read_state_dict(BUNDLED_POLICY, LEGACY_WEIGHTS_FILE)
    assert converted.keys() == trained.keys()
    assert all(torch.equal(converted[k], trained[k]) for k in trained)
    assert all(converted[k].dtype == trained[k].dtype for k in trained)


def test_the_bundled_policy_scores_exactly_as_its_format_1_original(tmp_path: Path) -> None:
    """The bundled zip without its safetensors member is what shipped before: same scores."""
    original = tmp_path / "format1.zip"
    with zipfile.ZipFile(BUNDLED_POLICY) as source, zipfile.ZipFile(original, "w") as target:
        for item in source.infolist():
            if item.filename == METADATA_FILE:
                metadata = json.loads(source.read(item.filename))
                metadata["format"] = 1
                del metadata["policy_kwargs"]
                target.writestr(item, json.dumps(metadata))
            elif item.filename != WEIGHTS_FILE:
                target.writestr(item, source.read(item.filename))
    model = tiny_model("llama")
    bundled = PolicyScorer(BUNDLED_POLICY).score_model(model, ratio=0.3)
    legacy = PolicyScorer(original).score_model(model, ratio=0.3)
    assert all(torch.equal(a, b) for a, b in zip(bundled, legacy, strict=True))
