"""The size-agnostic row-scoring policy, its exploration distribution and its checkpoint format."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import pathlib
import pickle
import shutil
import zipfile
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import stable_baselines3.common.save_util as save_util
import torch
from stable_baselines3 import PPO

from envs.ffn_prune import FFNPruneEnv
from prunenet.analysis.features import FEATURE_VERSION, model_layer_data
from prunenet.cli import main as cli_main
from prunenet.errors import PruneNetError
from prunenet.rl.checkpoint import (
    CHECKPOINT_FORMAT,
    METADATA_FILE,
    read_metadata,
    read_state_dict,
)
from prunenet.rl.observation import observation_for, spaces_for
from prunenet.rl.ppo.checkpoint import (
    LEGACY_WEIGHTS_FILE,
    SB3_DATA_FILE,
    WEIGHTS_FILE,
    load_policy,
    resave_checkpoint,
    write_policy_members,
)
from prunenet.rl.ppo.policy import FeatureSpaceGaussian, RowScoringPolicy
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
    write_policy_members(path, METADATA, agent.policy)
    return path, agent


@pytest.fixture(scope="module")
def legacy_checkpoint(checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same agent as a format-1 checkpoint: SB3's zip and metadata, no policy.safetensors."""
    path, agent = checkpoint
    legacy = tmp_path_factory.mktemp("legacy") / "legacy.zip"
    agent.save(legacy)
    metadata = {"format": 1, "feature_version": FEATURE_VERSION, **METADATA}
    with zipfile.ZipFile(legacy, "a") as archive:
        archive.writestr(METADATA_FILE, json.dumps(metadata))
    return legacy


class RunsCode:
    """Unpickling this creates `marker`: stands in for any code a crafted checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _sb3_serialized(value: object) -> dict:
    """`value` as SB3's `data_to_json` stores what plain JSON cannot hold: a cloudpickle."""
    encoded = base64.b64encode(cloudpickle.dumps(value)).decode()
    return {":type:": str(type(value)), ":serialized:": encoded}


def _replace_members(source: Path, target: Path, replacements: dict[str, bytes | None]) -> Path:
    """A copy of the zip `source` with members replaced (bytes) or left out (None)."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        for item in original.infolist():
            if item.filename not in replacements:
                copy.writestr(item, original.read(item.filename))
        for name, content in replacements.items():
            if content is not None:
                copy.writestr(name, content)
    return target


def _data_with_payload_in_every_key(checkpoint: Path, marker: Path) -> bytes:
    """SB3's `data` member of `checkpoint`, every value replaced by a code-running cloudpickle."""
    with zipfile.ZipFile(checkpoint) as archive:
        keys = json.loads(archive.read(SB3_DATA_FILE))
    assert "policy_kwargs" in keys
    return json.dumps({key: _sb3_serialized(RunsCode(marker)) for key in keys}).encode()


def _torch_payload(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(RunsCode(marker), buffer)
    return buffer.getvalue()


PICKLE_PAYLOADS = {
    "torch.save of an object": _torch_payload,
    "a raw pickle": lambda marker: pickle.dumps(RunsCode(marker)),
}


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
    assert metadata == {
        "format": CHECKPOINT_FORMAT,
        "feature_version": FEATURE_VERSION,
        **METADATA,
        "policy_kwargs": {"hidden": 8},
    }


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
    with pytest.raises(PruneNetError, match="corrupt"):
        load_policy(path, FFN_WIDTH)


@pytest.mark.parametrize("member", [WEIGHTS_FILE, LEGACY_WEIGHTS_FILE])
def test_a_checkpoint_with_damaged_members_is_refused(
    checkpoint, legacy_checkpoint, tmp_path: Path, member: str
) -> None:
    """Bytes flipped inside the member the loader reads (new format: safetensors; old: SB3's)."""
    source = checkpoint[0] if member == WEIGHTS_FILE else legacy_checkpoint
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        start = archive.getinfo(member).header_offset
    name_length = int.from_bytes(data[start + 26 : start + 28], "little")
    extra_length = int.from_bytes(data[start + 28 : start + 30], "little")
    first = start + 30 + name_length + extra_length + 100  # inside the member's content
    data[first : first + 200] = bytes(b ^ 0xFF for b in data[first : first + 200])
    path = tmp_path / "damaged.zip"
    path.write_bytes(bytes(data))
    with pytest.raises(PruneNetError, match="could not be read"):
        load_policy(path, FFN_WIDTH)


def test_a_zip_without_prunenet_metadata_is_refused(checkpoint, tmp_path: Path) -> None:
    path = tmp_path / "plain_sb3.zip"
    checkpoint[1].save(path)  # SB3's own archive, no prunenet.json
    with pytest.raises(PruneNetError, match="not a PruneNet policy checkpoint"):
        load_policy(path, FFN_WIDTH)


def test_metadata_without_a_policy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "metadata_only.zip"
    with zipfile.ZipFile(path, "w") as archive:
        metadata = {"feature_version": FEATURE_VERSION, **METADATA}
        archive.writestr(METADATA_FILE, json.dumps(metadata))
    with pytest.raises(PruneNetError, match="no policy inside.*policy.safetensors.*SB3"):
        load_policy(path, FFN_WIDTH)


def test_a_missing_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PruneNetError, match="does not exist.*prunenet train"):
        load_policy(tmp_path / "missing.zip", FFN_WIDTH)


def test_a_checkpoint_of_another_network_shape_is_refused(checkpoint, tmp_path: Path) -> None:
    """Weights that do not fit the network (here: another feature set's column count)."""
    other = _rewrite_metadata(checkpoint[0], tmp_path / "weights.zip", feature_set="weights")
    with pytest.raises(PruneNetError, match="do not match this PruneNet's policy network"):
        load_policy(other, FFN_WIDTH)


def test_loading_leaves_the_original_checkpoint_untouched(checkpoint, tmp_path: Path) -> None:
    copy = tmp_path / "copy.zip"
    shutil.copy(checkpoint[0], copy)
    load_policy(copy, 40)
    assert copy.read_bytes() == checkpoint[0].read_bytes()


# ----- the checkpoint format: nothing pickled, nothing unpickled --------------------------------


def test_a_new_checkpoint_holds_its_weights_as_safetensors_and_its_shape_in_metadata(
    checkpoint,
) -> None:
    path, agent = checkpoint
    state = read_state_dict(path, WEIGHTS_FILE)
    assert state.keys() == agent.policy.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in agent.policy.state_dict().items())
    assert read_metadata(path)["policy_kwargs"] == {"hidden": 8}


def test_a_new_checkpoint_still_loads_with_sb3_ppo_load(checkpoint, layer_data) -> None:
    """SB3's members are kept, so a user who trusts the file can still use SB3 directly."""
    path, agent = checkpoint
    loaded = PPO.load(path, device="cpu")
    observation = observation_for(layer_data[0].features, 0.3, 0.0)
    assert torch.equal(loaded.policy.row_scores(observation), agent.policy.row_scores(observation))


def test_loading_never_unpickles_or_calls_sb3_loaders(
    checkpoint, legacy_checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("load_policy must not unpickle")

    for module, name in [
        (save_util, "load_from_zip_file"),
        (save_util, "json_to_data"),
        (PPO, "load"),
        (cloudpickle, "loads"),
        (cloudpickle, "load"),
        (pickle, "loads"),
        (pickle, "load"),
    ]:
        monkeypatch.setattr(module, name, forbidden)
    for path in (checkpoint[0], legacy_checkpoint):
        assert load_policy(path, FFN_WIDTH)[0].row_scores(_observation()).shape == (FFN_WIDTH,)


def test_a_format_1_checkpoint_loads_with_the_same_scores(
    checkpoint, legacy_checkpoint, layer_data
) -> None:
    observation = observation_for(layer_data[0].features, 0.3, 0.0)
    new, _ = load_policy(checkpoint[0], FFN_WIDTH)
    legacy, metadata = load_policy(legacy_checkpoint, FFN_WIDTH)
    assert metadata["format"] == 1 and legacy.hidden == 8
    assert torch.equal(legacy.row_scores(observation), new.row_scores(observation))


def test_resaving_a_format_1_checkpoint_keeps_its_scores_metadata_and_sb3_members(
    legacy_checkpoint, layer_data, tmp_path: Path
) -> None:
    converted = tmp_path / "converted.zip"
    resave_checkpoint(legacy_checkpoint, converted)
    with zipfile.ZipFile(legacy_checkpoint) as old, zipfile.ZipFile(converted) as new:
        kept = [name for name in old.namelist() if name != METADATA_FILE]
        assert all(old.read(name) == new.read(name) for name in kept)
        assert WEIGHTS_FILE in new.namelist()
    before, after = read_metadata(legacy_checkpoint), read_metadata(converted)
    assert after == {**before, "format": CHECKPOINT_FORMAT, "policy_kwargs": {"hidden": 8}}
    observation = observation_for(layer_data[0].features, 0.3, 0.0)
    scores = [
        load_policy(p, FFN_WIDTH)[0].row_scores(observation) for p in (legacy_checkpoint, converted)
    ]
    assert torch.equal(*scores)


def test_the_payload_used_below_does_run_code_when_sb3_unpickles_it(tmp_path: Path) -> None:
    """Control: the crafted `data` really executes under SB3's own loader (json_to_data)."""
    marker = tmp_path / "ran"
    save_util.json_to_data(json.dumps({"policy_kwargs": _sb3_serialized(RunsCode(marker))}))
    assert marker.exists()


@pytest.mark.parametrize("payload", PICKLE_PAYLOADS)
def test_the_torch_payloads_used_below_do_run_code_without_weights_only(
    tmp_path: Path, payload: str
) -> None:
    """Control: the crafted `policy.pth` contents execute under a plain `torch.load`."""
    marker = tmp_path / "ran"
    data = PICKLE_PAYLOADS[payload](marker)
    with contextlib.suppress(RuntimeError):  # a raw pickle runs first, then fails torch's checks
        torch.load(io.BytesIO(data), weights_only=False)
    assert marker.exists()


def test_a_new_checkpoint_with_code_in_every_sb3_data_key_loads_without_running_it(
    checkpoint, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    data = _data_with_payload_in_every_key(checkpoint[0], marker)
    evil = _replace_members(checkpoint[0], tmp_path / "evil.zip", {SB3_DATA_FILE: data})
    policy, _ = load_policy(evil, FFN_WIDTH)
    expected, _ = load_policy(checkpoint[0], FFN_WIDTH)
    assert torch.equal(policy.row_scores(_observation()), expected.row_scores(_observation()))
    assert not marker.exists()


def test_a_format_1_checkpoint_with_code_in_every_sb3_data_key_is_refused_without_running_it(
    legacy_checkpoint, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    data = _data_with_payload_in_every_key(legacy_checkpoint, marker)
    evil = _replace_members(legacy_checkpoint, tmp_path / "evil.zip", {SB3_DATA_FILE: data})
    with pytest.raises(PruneNetError, match="never does because a pickle can run code"):
        load_policy(evil, FFN_WIDTH)
    assert not marker.exists()


def test_format_1_policy_kwargs_stored_as_a_cloudpickle_are_refused_without_running_them(
    legacy_checkpoint, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    with zipfile.ZipFile(legacy_checkpoint) as archive:
        data = json.loads(archive.read(SB3_DATA_FILE))
    data["policy_kwargs"] = _sb3_serialized(RunsCode(marker))
    evil = _replace_members(
        legacy_checkpoint, tmp_path / "evil.zip", {SB3_DATA_FILE: json.dumps(data).encode()}
    )
    with pytest.raises(PruneNetError, match="policy_kwargs.*cloudpickle.*would need unpickling"):
        load_policy(evil, FFN_WIDTH)
    assert not marker.exists()


@pytest.mark.parametrize("payload", PICKLE_PAYLOADS)
def test_a_pickle_payload_as_sb3_policy_weights_is_refused_without_running_it(
    legacy_checkpoint, tmp_path: Path, payload: str
) -> None:
    marker = tmp_path / "ran"
    content = PICKLE_PAYLOADS[payload](marker)
    evil = _replace_members(
        legacy_checkpoint, tmp_path / "evil.zip", {LEGACY_WEIGHTS_FILE: content}
    )
    with pytest.raises(PruneNetError, match="never does because a pickle can run code"):
        load_policy(evil, FFN_WIDTH)
    assert not marker.exists()


def test_a_pickle_payload_as_policy_safetensors_is_refused_without_running_it(
    checkpoint, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    content = _torch_payload(marker)
    evil = _replace_members(checkpoint[0], tmp_path / "evil.zip", {WEIGHTS_FILE: content})
    with pytest.raises(PruneNetError, match="not a valid safetensors file"):
        load_policy(evil, FFN_WIDTH)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ([1, 2, 3], "prunenet.json that is a JSON list, not an object"),
        ("selfgen", "prunenet.json that is a JSON str, not an object"),
        ({"algo": "ppo"}, "has no 'feature_set'"),
        ({"algo": "ppo", "feature_set": "pixels"}, "names 'pixels'.*one of weights, selfgen"),
        ({"algo": "reinforce", "feature_set": "selfgen"}, "a reinforce policy reads.*weights-raw"),
        ({"feature_set": "selfgen"}, "has no 'algo'"),
        ({"algo": "sac", "feature_set": "selfgen"}, "names the algo 'sac'.*known: ppo, reinforce"),
        ({**METADATA, "format": 3}, "format 3, newer than this PruneNet reads"),
        ({**METADATA, "format": "2"}, "invalid format '2'"),
        ({**METADATA, "policy_kwargs": [8]}, "policy_kwargs.*JSON list, not an object"),
        (
            {**METADATA, "policy_kwargs": {"hidden": "8"}},
            "hidden='8', which is not a whole number from 1 to 4,096",
        ),
        (
            {**METADATA, "policy_kwargs": {"hidden": True}},
            "hidden=True, which is not a whole number",
        ),
        ({**METADATA, "policy_kwargs": {"hidden": 0}}, "hidden=0, which is not a whole number"),
        ({**METADATA, "policy_kwargs": {"net_arch": 8}}, "'net_arch'.*only reads hidden"),
    ],
)
def test_unusable_metadata_is_refused_with_a_reason(
    tmp_path: Path, metadata: object, message: str
) -> None:
    if isinstance(metadata, dict):
        metadata = {"feature_version": FEATURE_VERSION, **metadata}
    path = tmp_path / "policy.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(METADATA_FILE, json.dumps(metadata))
    with pytest.raises(PruneNetError, match=message):
        read_metadata(path)
    with pytest.raises(PruneNetError, match=message):
        load_policy(path, FFN_WIDTH)


@pytest.mark.parametrize("content", [b"\xff\xfe{not json", b'{"algo": '])
def test_metadata_that_is_not_json_is_refused_as_corrupt(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "policy.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(METADATA_FILE, content)
    with pytest.raises(PruneNetError, match="corrupt"):
        read_metadata(path)


def test_a_new_checkpoint_without_policy_kwargs_is_refused(checkpoint, tmp_path: Path) -> None:
    with zipfile.ZipFile(checkpoint[0]) as archive:
        metadata = json.loads(archive.read(METADATA_FILE))
    del metadata["policy_kwargs"]
    path = _replace_members(
        checkpoint[0], tmp_path / "no_kwargs.zip", {METADATA_FILE: json.dumps(metadata).encode()}
    )
    with pytest.raises(PruneNetError, match="no 'policy_kwargs'.*shape is unknown"):
        load_policy(path, FFN_WIDTH)


# ----- through the command line ------------------------------------------------------------------


@pytest.fixture
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "cache"))


@pytest.mark.usefixtures("_private_cache")
def test_prune_refuses_a_format_1_policy_carrying_code_with_exit_2_and_runs_nothing(
    legacy_checkpoint, tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "ran"
    data = _data_with_payload_in_every_key(legacy_checkpoint, marker)
    evil = _replace_members(legacy_checkpoint, tmp_path / "evil.zip", {SB3_DATA_FILE: data})
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(tiny_model_folder), "--ratio", "0.3", "--policy", str(evil),
            "--out", str(out)]  # fmt: skip
    assert cli_main(argv) == 2
    assert "a pickle can run code" in capsys.readouterr().err
    assert not marker.exists() and not out.exists()


@pytest.mark.usefixtures("_private_cache")
def test_prune_with_a_new_policy_whose_sb3_data_carries_code_prunes_without_running_it(
    checkpoint, tiny_model_folder: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    data = _data_with_payload_in_every_key(checkpoint[0], marker)
    evil = _replace_members(checkpoint[0], tmp_path / "evil.zip", {SB3_DATA_FILE: data})
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(tiny_model_folder), "--ratio", "0.3", "--policy", str(evil),
            "--out", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    assert (out / "config.json").is_file()
    assert not marker.exists()
