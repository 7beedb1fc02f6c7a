"""PPO training: checkpoint metadata, atomic best-checkpoint saving, reproducibility, refusals."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from stable_baselines3 import PPO

from prunenet.analysis.features import FEATURE_VERSION, model_layer_data
from prunenet.errors import PruneNetError
from prunenet.rl.checkpoint import METADATA_FILE, TrainingInterrupted, read_metadata
from prunenet.rl.observation import observation_for
from prunenet.rl.ppo import train as train_module
from prunenet.rl.ppo.checkpoint import WEIGHTS_FILE, load_policy
from prunenet.rl.ppo.train import (
    BestCheckpointCallback,
    TrainConfig,
    evaluate_policy,
    evaluation_ratios,
    train_policy,
)
from tests.conftest import FFN_WIDTH, tiny_model
from tests.conftest import SMALL_SELFGEN as SMALL


@pytest.fixture(scope="module")
def layer_data():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRUNENET_NO_CACHE", "1")
        return model_layer_data(tiny_model("llama"), "selfgen", SMALL)


def _config(out: Path, **overrides) -> TrainConfig:
    settings = {"timesteps": 16, "eval_every": 8, "hidden": 8, "ratios": (0.2, 0.4), "seed": 3}
    return TrainConfig(model="tiny-llama", out=str(out), **{**settings, **overrides})


@pytest.fixture(scope="module")
def trained(layer_data, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("trained")
    config = _config(folder / "policy.zip")
    return config, train_policy(config, layer_data=layer_data), folder


def test_a_tiny_run_writes_a_checkpoint_with_complete_metadata(trained) -> None:
    config, result, _ = trained
    metadata = read_metadata(result.checkpoint)
    assert metadata["feature_version"] == FEATURE_VERSION
    assert metadata["feature_set"] == "selfgen"
    assert metadata["reward"] == "function"
    assert metadata["ratios"] == [0.2, 0.4]
    assert metadata["source_model"] == "tiny-llama"
    assert metadata["seed"] == 3
    assert metadata["algo"] == "ppo"
    assert metadata["step"] == result.best_step
    assert metadata["eval_reward"] == pytest.approx(result.best_reward)


def test_the_best_checkpoint_is_the_only_file_left_in_its_folder(trained) -> None:
    _, result, folder = trained
    assert [p.name for p in folder.iterdir()] == ["policy.zip"]
    with zipfile.ZipFile(result.checkpoint) as archive:
        assert archive.testzip() is None
        assert {"data", "policy.pth", WEIGHTS_FILE, METADATA_FILE} <= set(archive.namelist())


def test_the_checkpoint_records_the_policy_shape_in_plain_json(trained) -> None:
    _, result, _ = trained
    metadata = read_metadata(result.checkpoint)
    assert metadata["format"] == 2 and metadata["policy_kwargs"] == {"hidden": 8}


def test_the_checkpoint_still_loads_with_sb3_ppo_load_and_scores_the_same(
    trained, layer_data
) -> None:
    _, result, _ = trained
    observation = observation_for(layer_data[0].features, 0.3, 0.0)
    ours, _ = load_policy(result.checkpoint, FFN_WIDTH)
    sb3 = PPO.load(result.checkpoint, device="cpu")
    assert torch.equal(sb3.policy.row_scores(observation), ours.row_scores(observation))


def test_the_result_reports_the_best_of_the_evaluation_history(trained) -> None:
    _, result, _ = trained
    steps = [step for step, _, _ in result.history]
    assert steps == [8, 16]  # every 8 steps; the last one evaluates the final policy
    best = max(result.history, key=lambda entry: entry[2])
    assert result.best_reward == best[2] and result.best_step == best[0]
    assert 0.0 < result.seconds_to_best <= result.seconds


def test_the_saved_checkpoint_scores_its_recorded_evaluation_reward(trained, layer_data) -> None:
    config, result, _ = trained
    policy, _ = load_policy(result.checkpoint, FFN_WIDTH)
    reward = evaluate_policy(policy, layer_data, evaluation_ratios(config), config.reward)
    assert reward == pytest.approx(result.best_reward, abs=1e-6)


def test_training_is_reproducible_for_a_seed(trained, layer_data, tmp_path: Path) -> None:
    config, result, _ = trained
    again = train_policy(_config(tmp_path / "again.zip"), layer_data=layer_data)
    assert [entry[2] for entry in again.history] == [entry[2] for entry in result.history]
    first = load_policy(result.checkpoint, FFN_WIDTH)[0].state_dict()
    second = load_policy(again.checkpoint, FFN_WIDTH)[0].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_partial_files(
    trained, layer_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "policy.zip"
    out.write_bytes(Path(trained[1].checkpoint).read_bytes())
    before = out.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(train_module, "write_policy_members", fail)
    with pytest.raises(OSError, match="disk full"):
        train_policy(_config(out, overwrite=True), layer_data=layer_data)
    assert [p.name for p in tmp_path.iterdir()] == ["policy.zip"]
    assert out.read_bytes() == before


def test_weights_features_with_the_ks_reward_train_too(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PRUNENET_NO_CACHE", "1")
    data = model_layer_data(tiny_model("llama"), "weights", SMALL)
    config = _config(tmp_path / "ks.zip", feature_set="weights", reward="ks", timesteps=8)
    result = train_policy(config, layer_data=data)
    metadata = read_metadata(result.checkpoint)
    assert (metadata["feature_set"], metadata["reward"]) == ("weights", "ks")
    assert result.best_reward > 0


def test_evaluation_ratios_are_the_ends_and_middle_of_the_range() -> None:
    assert evaluation_ratios(TrainConfig(model="m", out="p.zip", ratios=(0.1, 0.5))) == [
        0.1,
        0.3,
        0.5,
    ]
    assert evaluation_ratios(TrainConfig(model="m", out="p.zip", ratios=(0.3, 0.3))) == [0.3]


def test_explicit_evaluation_ratios_override_the_range() -> None:
    config = TrainConfig(model="m", out="p.zip", ratios=(0.1, 0.5), eval_ratios=(0.25,))
    assert evaluation_ratios(config) == [0.25]


# ----- refusals (before any model is loaded: the model path does not exist) ---------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ratios": (0.5, 0.1)}, "is empty: low must be <= high"),
        ({"ratios": (0.0, 0.5)}, "outside \\(0, 1\\)"),
        ({"ratios": (0.2, 1.2)}, "outside \\(0, 1\\)"),
        ({"ratios": ("low", "high")}, "not a number"),
        ({"timesteps": 0}, "--timesteps must be positive"),
        ({"reward": "perplexity"}, "Unknown reward"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(
    tmp_path: Path, overrides: dict, message: str
) -> None:
    config = _config(tmp_path / "policy.zip", **overrides)
    config.model = str(tmp_path / "no-such-model")
    with pytest.raises(PruneNetError, match=message):
        train_policy(config)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_checkpoint_is_refused_before_the_model_is_loaded(tmp_path: Path) -> None:
    out = tmp_path / "policy.zip"
    out.write_bytes(b"a previous run")
    config = _config(out)
    config.model = str(tmp_path / "no-such-model")
    with pytest.raises(PruneNetError, match="already exists. Pass --overwrite"):
        train_policy(config)
    assert out.read_bytes() == b"a previous run"


def test_overwrite_replaces_an_existing_checkpoint(layer_data, tmp_path: Path) -> None:
    out = tmp_path / "policy.zip"
    with zipfile.ZipFile(out, "w") as archive:  # a previous run's checkpoint
        archive.writestr("prunenet.json", "{}")
    train_policy(_config(out, overwrite=True, timesteps=8), layer_data=layer_data)
    assert read_metadata(out)["step"] == 8


def test_a_folder_as_checkpoint_path_is_refused_even_with_overwrite(tmp_path: Path) -> None:
    (tmp_path / "policy.zip").mkdir()
    with pytest.raises(PruneNetError, match="is a folder"):
        train_policy(_config(tmp_path / "policy.zip", overwrite=True))


def test_a_checkpoint_path_not_ending_in_zip_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path / "policy.pt")
    config.model = str(tmp_path / "no-such-model")
    with pytest.raises(PruneNetError, match="must end in .zip"):
        train_policy(config)


# ----- Ctrl-C ------------------------------------------------------------------------------------


def _interrupt_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Ctrl-C as SB3 would see it: KeyboardInterrupt from inside a training step."""
    on_step = BestCheckpointCallback._on_step

    def interrupted(self) -> bool:
        if self.num_timesteps == step:
            raise KeyboardInterrupt
        return on_step(self)

    monkeypatch.setattr(BestCheckpointCallback, "_on_step", interrupted)


def test_ctrl_c_keeps_the_best_checkpoint_so_far_and_says_where_it_is(
    layer_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "policy.zip"
    _interrupt_at_step(monkeypatch, 12)  # after the evaluation at step 8
    with pytest.raises(TrainingInterrupted) as interrupted:
        train_policy(_config(out), layer_data=layer_data)
    assert (interrupted.value.checkpoint, interrupted.value.step) == (str(out), 8)
    assert "(step 8, eval reward" in interrupted.value.summary()
    assert str(out) in interrupted.value.summary()
    assert read_metadata(out)["step"] == 8
    assert load_policy(out, FFN_WIDTH)[0] is not None
    assert [p.name for p in tmp_path.iterdir()] == ["policy.zip"]


def test_ctrl_c_before_the_first_evaluation_reports_that_nothing_was_saved(
    layer_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "policy.zip"
    _interrupt_at_step(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted) as interrupted:
        train_policy(_config(out), layer_data=layer_data)
    assert interrupted.value.checkpoint is None
    assert "no checkpoint was saved yet" in interrupted.value.summary()
    assert list(tmp_path.iterdir()) == []


# ----- the real model ----------------------------------------------------------------------------


def _mean_function_reward(layer_data, layer_scores, ratio: float) -> float:
    from prunenet.core.compress import select_keep_indices
    from prunenet.core.ratios import keep_count
    from prunenet.rl.rewards import function_reward

    rewards = [
        function_reward(layer, select_keep_indices(scores, keep_count(layer.ffn.width, ratio)))
        for layer, scores in zip(layer_data, layer_scores, strict=True)
    ]
    return sum(rewards) / len(rewards)


@pytest.mark.real_model
def test_smollm2_policy_keeps_the_ffn_function_better_than_magnitude_and_random(
    tmp_path: Path,
) -> None:
    from prunenet.io.models import load_model
    from prunenet.scoring.heuristics import MagnitudeScorer, RandomScorer

    model, _ = load_model("smollm2-135m")
    layer_data = model_layer_data(model, "selfgen")
    config = TrainConfig(model="smollm2-135m", out=str(tmp_path / "policy.zip"), timesteps=600)
    result = train_policy(config, layer_data=layer_data)
    policy, _ = load_policy(result.checkpoint, model.config.intermediate_size)

    baselines = {
        "magnitude": MagnitudeScorer().score_model(model),
        "random": RandomScorer(0).score_model(model),
        "selfgen heuristic": [
            layer.activations.rms * layer.ffn.output.float().norm(dim=0) for layer in layer_data
        ],
    }
    for ratio in (0.2, 0.3):
        learned = evaluate_policy(policy, layer_data, [ratio], "function")
        others = {n: _mean_function_reward(layer_data, s, ratio) for n, s in baselines.items()}
        listed = ", ".join(f"{name} {value:.4f}" for name, value in others.items())
        print(f"ratio {ratio}: policy {learned:.4f}, {listed}")
        assert learned > others["magnitude"]
        assert learned > others["random"]


def test_history_has_one_entry_per_evaluated_step(trained) -> None:
    _, result, _ = trained
    steps = [step for step, _, _ in result.history]
    assert len(steps) == len(set(steps))
