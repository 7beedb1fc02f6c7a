"""The size-agnostic row-scoring policy, its exploration distribution and its checkpoint format."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from envs.ffn_prune import FFNPruneEnv, observation_for
from prunenet.errors import PruneNetError
from prunenet.features import FEATURE_VERSION, model_layer_data
from prunenet.policy import (
    METADATA_FILE,
    FeatureSpaceGaussian,
    RowScoringPolicy,
    load_policy,
    read_metadata,
    spaces_for,
    write_metadata,
)
from tests.conftest import FFN_WIDTH, tiny_model
from tests.conftest import SMALL_SELFGEN as SMALL

METADATA = {"algo": "ppo", "feature_set": "selfgen", "reward": "function", "seed": 0}


@pytest.fixture(scope="module")
def layer_data():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRUNENET_NO_CACHE", "1")
        return model_layer_data(tiny_model("llama"), "selfgen", SMALL)


@pytest.fixture(scope="module")
def checkpoint(layer_data, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PPO]:
    """A PPO agent trained for a few steps on a tiny llama, saved with PruneNet metadata."""
    env = FFNPruneEnv(layer_data=[layer_data])
    agent = PPO(
        RowScoringPolicy, env, n_steps=8, batch_size=4, n_epochs=2, seed=0,
        policy_kwargs={"hidden": 8}, device="cpu",
    )  # fmt: skip
    agent.learn(total_timesteps=8)
    path = tmp_path_factory.mktemp("policy") / "policy.zip"
    agent.save(path)
    write_metadata(path, METADATA)
    return path, agent


def _policy(width: int = FFN_WIDTH, feature_set: str = "selfgen", seed: int = 0):
    torch.manual_seed(seed)
    return RowScoringPolicy(*spaces_for(width, feature_set), lambda _: 1e-3, hidden=8)


def _observation(width: int = FFN_WIDTH, seed: int = 0, columns: int = 8) -> np.ndarray:
    features = torch.randn(width, columns, generator=torch.Generator().manual_seed(seed))
    return observation_for(features, ratio=0.3, depth=0.5)


def _rewrite_metadata(source: Path, target: Path, **changes) -> Path:
    """A copy of the zip `source` whose prunenet.json has `changes` applied."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        for item in original.infolist():
            content = original.read(item.filename)
            if item.filename == METADATA_FILE:
                content = json.dumps({**json.loads(content), **changes}).encode()
            copy.writestr(item, content)
    return target


# ----- size agnosticism and equivariance ---------------------------------------------------------


def test_deterministic_action_for_permuted_rows_is_the_same_permutation_of_the_scores() -> None:
    policy = _policy()
    observation = _observation()
    order = np.random.default_rng(0).permutation(FFN_WIDTH)
    action, _ = policy.predict(observation, deterministic=True)
    permuted_action, _ = policy.predict(observation[order], deterministic=True)
    assert np.unique(action).size == FFN_WIDTH  # the scores tell the rows apart
    assert torch.allclose(torch.as_tensor(permuted_action), torch.as_tensor(action[order]))
    assert torch.allclose(
        policy.row_scores(observation[order]), policy.row_scores(observation)[order]
    )


def test_the_critic_is_invariant_to_the_row_order() -> None:
    policy = _policy()
    observation = _observation()
    order = np.random.default_rng(1).permutation(FFN_WIDTH)
    with torch.no_grad():
        value = policy.predict_values(torch.as_tensor(observation)[None])
        permuted = policy.predict_values(torch.as_tensor(observation[order])[None])
    assert torch.allclose(value, permuted, atol=1e-6)


def test_policy_parameters_do_not_depend_on_the_row_count() -> None:
    narrow, wide = _policy(FFN_WIDTH).state_dict(), _policy(4 * FFN_WIDTH).state_dict()
    assert {k: v.shape for k, v in narrow.items()} == {k: v.shape for k, v in wide.items()}
    assert all(torch.equal(narrow[k], wide[k]) for k in narrow)  # same seed, same weights


def test_row_scores_are_deterministic_and_ignore_the_rng() -> None:
    policy, observation = _policy(), _observation()
    torch.manual_seed(1)
    first = policy.row_scores(observation)
    torch.manual_seed(2)
    assert torch.equal(first, policy.row_scores(observation))


# ----- FeatureSpaceGaussian ----------------------------------------------------------------------


def _distribution(rows: int = 20, basis_columns: int = 4, batch: int = 3):
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(batch, rows, generator=generator)
    basis = torch.randn(batch, rows, basis_columns, generator=generator)
    log_std = torch.tensor(-0.3, requires_grad=True)
    return FeatureSpaceGaussian(rows).proba_distribution(mean, log_std, basis), mean, basis, log_std


def test_log_prob_of_a_sampled_action_is_the_normal_log_density_of_its_noise() -> None:
    distribution, mean, basis, log_std = _distribution()
    torch.manual_seed(0)
    noise = distribution.distribution.rsample()  # the draw `sample` makes from the same seed
    torch.manual_seed(0)
    action = distribution.sample()
    assert torch.allclose(action, mean + (basis @ noise.unsqueeze(-1)).squeeze(-1), atol=1e-6)

    expected = torch.distributions.Normal(0.0, log_std.exp()).log_prob(noise).sum(-1)
    assert expected.shape == (3,)
    assert torch.allclose(distribution.log_prob(action.detach()), expected, atol=1e-4)


def test_a_sample_lies_in_mean_plus_the_span_of_the_basis() -> None:
    distribution, mean, basis, _ = _distribution()
    torch.manual_seed(3)
    deviation = (distribution.sample() - mean).detach()
    coefficients = torch.linalg.lstsq(basis, deviation.unsqueeze(-1)).solution
    residual = deviation - (basis @ coefficients).squeeze(-1)
    assert deviation.norm() > 0.1
    assert residual.norm() < 1e-4 * deviation.norm()


def test_log_prob_and_entropy_have_the_basis_dimension_not_the_row_count() -> None:
    small, *_ = _distribution(rows=20)
    large, mean, _, log_std = _distribution(rows=2000)
    single = torch.distributions.Normal(0.0, log_std.exp()).entropy()
    assert torch.allclose(small.entropy(), 4 * single)
    assert torch.allclose(large.entropy(), 4 * single)
    assert torch.equal(large.mode(), mean)


def test_log_prob_has_gradients_for_mean_and_log_std() -> None:
    distribution, mean, _, log_std = _distribution()
    mean.requires_grad_(True)
    torch.manual_seed(0)
    action = distribution.sample().detach()
    distribution.log_prob(action).sum().backward()
    assert log_std.grad is not None and torch.isfinite(log_std.grad)
    assert mean.grad is not None and mean.grad.abs().sum() > 0


# ----- checkpoints -------------------------------------------------------------------------------


def test_one_checkpoint_loads_and_scores_ffns_of_two_different_widths(checkpoint) -> None:
    path, _ = checkpoint
    for width in (FFN_WIDTH, 40):
        policy, metadata = load_policy(path, width)
        assert policy.observation_space.shape[0] == width
        scores = policy.row_scores(_observation(width))
        assert scores.shape == (width,) and torch.all(torch.isfinite(scores))
        assert metadata["feature_set"] == "selfgen"


def test_a_loaded_policy_reproduces_the_trained_agents_scores(checkpoint, layer_data) -> None:
    path, agent = checkpoint
    policy, _ = load_policy(path, FFN_WIDTH)
    observation = observation_for(layer_data[0].features, 0.3, 0.0)
    assert torch.equal(policy.row_scores(observation), agent.policy.row_scores(observation))
    assert not policy.training


def test_metadata_round_trips_with_format_and_feature_version(checkpoint) -> None:
    metadata = read_metadata(checkpoint[0])
    assert metadata == {"format": 1, "feature_version": FEATURE_VERSION, **METADATA}


def test_a_checkpoint_from_another_feature_version_is_refused(checkpoint, tmp_path: Path) -> None:
    other = _rewrite_metadata(
        checkpoint[0], tmp_path / "old.zip", feature_version=FEATURE_VERSION + 1
    )
    with pytest.raises(PruneNetError, match=f"feature version {FEATURE_VERSION + 1}.*Re-train"):
        read_metadata(other)
    with pytest.raises(PruneNetError, match="feature version"):
        load_policy(other, FFN_WIDTH)


def test_random_bytes_are_refused_as_a_corrupt_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "noise.zip"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(PruneNetError, match="corrupt or not a zip file"):
        load_policy(path, FFN_WIDTH)


def test_a_truncated_checkpoint_is_refused(checkpoint, tmp_path: Path) -> None:
    data = checkpoint[0].read_bytes()
    path = tmp_path / "truncated.zip"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PruneNetError, match="corrupt or not a zip file"):
        load_policy(path, FFN_WIDTH)


def test_a_checkpoint_with_damaged_members_is_refused(checkpoint, tmp_path: Path) -> None:
    data = bytearray(checkpoint[0].read_bytes())
    data[200:400] = bytes(b ^ 0xFF for b in data[200:400])  # inside the first member
    path = tmp_path / "damaged.zip"
    path.write_bytes(bytes(data))
    with pytest.raises(PruneNetError, match="could not be read"):
        load_policy(path, FFN_WIDTH)


def test_a_zip_without_prunenet_metadata_is_refused(checkpoint, tmp_path: Path) -> None:
    path = tmp_path / "plain_sb3.zip"
    checkpoint[1].save(path)  # SB3's own archive, no prunenet.json
    with pytest.raises(PruneNetError, match="not a PruneNet policy checkpoint"):
        load_policy(path, FFN_WIDTH)


def test_metadata_without_an_sb3_policy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "metadata_only.zip"
    with zipfile.ZipFile(path, "w") as archive:
        metadata = {"feature_version": FEATURE_VERSION, **METADATA}
        archive.writestr(METADATA_FILE, json.dumps(metadata))
    with pytest.raises(PruneNetError, match="no SB3 policy inside"):
        load_policy(path, FFN_WIDTH)


def test_a_missing_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PruneNetError, match="does not exist.*prunenet train"):
        load_policy(tmp_path / "missing.zip", FFN_WIDTH)


def test_a_checkpoint_of_another_network_shape_is_refused(checkpoint, tmp_path: Path) -> None:
    """Weights that do not fit the network (here: another feature set's column count)."""
    other = _rewrite_metadata(checkpoint[0], tmp_path / "weights.zip", feature_set="weights")
    with pytest.raises(PruneNetError, match="does not match this PruneNet's policy network"):
        load_policy(other, FFN_WIDTH)


def test_loading_leaves_the_original_checkpoint_untouched(checkpoint, tmp_path: Path) -> None:
    copy = tmp_path / "copy.zip"
    shutil.copy(checkpoint[0], copy)
    load_policy(copy, 40)
    assert copy.read_bytes() == checkpoint[0].read_bytes()
