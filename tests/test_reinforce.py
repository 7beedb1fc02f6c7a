"""The paper-faithful REINFORCE baseline: training, sampling, scoring, checkpoint checks."""

from __future__ import annotations

import zipfile

import pytest
import torch

from prunenet import rewards
from prunenet.cli import main as cli_main
from prunenet.compress import keep_count
from prunenet.errors import PruneNetError
from prunenet.policy import read_metadata
from prunenet.policy_scorer import PolicyScorer, load_scorer_from_checkpoint
from prunenet.reinforce import (
    ReinforceScorer,
    discounted_returns,
    evaluate_reinforce,
    load_reinforce,
    sample_rows,
    train_reinforce,
    weight_layer_data,
)
from tests.conftest import FFN_WIDTH, HIDDEN_SIZE, tiny_model


@pytest.fixture(scope="module")
def layer_data():
    return weight_layer_data(tiny_model("llama"))


@pytest.fixture(scope="module")
def trained(layer_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reinforce") / "baseline.zip"
    result = train_reinforce(layer_data, 0.3, episodes=6, seed=0, out=out, progress=False)
    return result, out


def test_training_records_one_evaluation_per_episode(trained):
    result, _ = trained
    assert [episode for episode, _, _ in result.history] == list(range(1, 7))
    seconds = [s for _, s, _ in result.history]
    assert seconds == sorted(seconds) and seconds[0] > 0
    assert len(result.sampled_rewards) == 6


def test_best_reward_is_the_best_evaluation_and_when_it_happened(trained):
    result, _ = trained
    best = max(result.history, key=lambda point: point[2])
    assert result.best_reward == best[2]
    assert (result.best_episode, result.seconds_to_best) == (best[0], best[1])


def test_training_is_reproducible_from_the_seed(layer_data, trained):
    result, _ = trained
    again = train_reinforce(layer_data, 0.3, episodes=6, seed=0, progress=False)
    assert [r for _, _, r in again.history] == [r for _, _, r in result.history]
    assert again.sampled_rewards == result.sampled_rewards


def test_training_learns_a_reward_that_a_linear_policy_can_express(layer_data, monkeypatch):
    """Rows with a positive first weight are 'good': REINFORCE learns to keep them."""

    def good_fraction(layer, keep):
        return float((layer.ffn.inputs[0][keep, 0] > 0).float().mean())

    monkeypatch.setitem(rewards.REWARDS, "good-rows", good_fraction)
    result = train_reinforce(layer_data, 0.5, 60, seed=0, lr=0.2, reward="good-rows",
                             progress=False)  # fmt: skip
    first, last = result.sampled_rewards[:5], result.sampled_rewards[-5:]
    assert sum(last) / 5 > sum(first) / 5 + 0.1
    assert result.best_reward > result.history[0][2]


def test_sampling_picks_exactly_k_distinct_rows():
    logits = torch.randn(1000)
    generator = torch.Generator().manual_seed(0)
    for kept in (1, 700, 1000):
        rows = sample_rows(logits, kept, generator)
        assert rows.numel() == kept and rows.unique().numel() == kept
        assert int(rows.min()) >= 0 and int(rows.max()) < 1000


def test_sampling_follows_the_logits():
    logits = torch.cat([torch.full((10,), 5.0), torch.zeros(90)])
    rows = sample_rows(logits, 10, torch.Generator().manual_seed(0))
    assert (rows < 10).sum() >= 8


def test_returns_are_discounted_rewards_to_go():
    returns = discounted_returns([1.0, 2.0, 3.0], gamma=0.5)
    assert returns.tolist() == pytest.approx([1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0])


def test_scores_are_deterministic_and_match_the_evaluation(trained, layer_data):
    result, out = trained
    scorer = ReinforceScorer(out)
    model = tiny_model("llama")
    first = scorer.score_model(model, ratio=0.3)
    second = ReinforceScorer(out).score_model(model, ratio=0.3)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert [s.numel() for s in first] == [FFN_WIDTH, FFN_WIDTH]
    policy, _ = load_reinforce(out)
    assert evaluate_reinforce(policy, layer_data, 0.3) == pytest.approx(result.best_reward)


def test_checkpoint_metadata_names_the_baseline(trained):
    result, out = trained
    metadata = read_metadata(out)
    assert metadata["algo"] == "reinforce"
    assert metadata["feature_set"] == "weights-raw"
    assert metadata["ratio"] == 0.3 and metadata["seed"] == 0
    assert (metadata["d_model"], metadata["d_ff"]) == (HIDDEN_SIZE, FFN_WIDTH)
    assert metadata["episode"] == result.best_episode


def test_factory_returns_the_scorer_for_the_checkpoints_algo(trained):
    _, out = trained
    assert isinstance(load_scorer_from_checkpoint(str(out)), ReinforceScorer)
    with pytest.raises(PruneNetError, match="load_scorer_from_checkpoint"):
        PolicyScorer(str(out))


@pytest.mark.parametrize(
    ("overrides", "shape"),
    [
        ({"hidden_size": 32}, "d_model 32, d_ff 24"),
        ({"intermediate_size": 40}, "d_model 16, d_ff 40"),
    ],
)
def test_checkpoint_refuses_a_model_of_another_width(trained, overrides, shape):
    _, out = trained
    other = tiny_model("llama", **overrides)
    with pytest.raises(PruneNetError, match=f"d_model 16, d_ff 24.*{shape}.*cannot score another"):
        ReinforceScorer(out).score_model(other, ratio=0.3)


def test_damaged_checkpoint_is_refused_clearly(trained, tmp_path):
    _, out = trained
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(out) as source, zipfile.ZipFile(damaged, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            target.writestr(name, data[:10] if name.endswith(".pt") else data)
    with pytest.raises(PruneNetError, match="could not be read"):
        ReinforceScorer(damaged)


def test_training_refuses_bad_input(layer_data):
    with pytest.raises(PruneNetError, match="episodes must be positive"):
        train_reinforce(layer_data, 0.3, episodes=0)
    with pytest.raises(PruneNetError, match="outside"):
        train_reinforce(layer_data, 1.5, episodes=1)
    with pytest.raises(PruneNetError, match="no FFN layers"):
        train_reinforce([], 0.3, episodes=1)
    with pytest.raises(PruneNetError, match=r"\.zip"):
        train_reinforce(layer_data, 0.3, episodes=1, out="policy.pt")


def test_cli_trains_the_baseline_at_one_ratio(tiny_model_folder, tmp_path, capsys):
    out = tmp_path / "rf.zip"
    argv = ["train", "--model", str(tiny_model_folder), "--out", str(out), "--algo",
            "reinforce", "--ratios", "0.25", "--episodes", "2", "--seed", "3"]  # fmt: skip
    assert cli_main(argv) == 0
    assert "REINFORCE baseline" in capsys.readouterr().out
    metadata = read_metadata(out)
    assert (metadata["ratio"], metadata["seed"], metadata["gamma"]) == (0.25, 3, 0.99)
    assert metadata["reward"] == "ks"
    assert keep_count(FFN_WIDTH, metadata["ratio"]) == 18


def test_cli_asks_for_one_ratio(tiny_model_folder, tmp_path, capsys):
    argv = ["train", "--model", str(tiny_model_folder), "--out", str(tmp_path / "rf.zip"),
            "--algo", "reinforce", "--ratios", "0.1:0.5"]  # fmt: skip
    assert cli_main(argv) == 2
    assert "--ratios 0.3:0.3" in capsys.readouterr().err
