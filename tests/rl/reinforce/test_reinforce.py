"""The paper-faithful REINFORCE baseline: training, sampling, scoring, checkpoint checks."""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import zipfile

import pytest
import torch

from prunenet.cli import main as cli_main
from prunenet.core.ratios import keep_count
from prunenet.errors import PruneNetError
from prunenet.rl import rewards
from prunenet.rl.checkpoint import METADATA_FILE, TrainingInterrupted, read_metadata
from prunenet.rl.reinforce.checkpoint import (
    LEGACY_STATE_FILE,
    STATE_FILE,
    load_reinforce,
    resave_reinforce,
)
from prunenet.rl.reinforce.train import (
    discounted_returns,
    evaluate_reinforce,
    sample_rows,
    train_reinforce,
    weight_layer_data,
)
from prunenet.scoring.ppo import PolicyScorer
from prunenet.scoring.registry import load_scorer_from_checkpoint
from prunenet.scoring.reinforce import ReinforceScorer
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
            target.writestr(name, data[:10] if name == STATE_FILE else data)
    with pytest.raises(PruneNetError, match="could not be read"):
        ReinforceScorer(damaged)


# ----- the checkpoint format: nothing pickled, format-1 `.pt` read with weights_only ----------


class RunsCode:
    """Unpickling this creates `marker`: stands in for any code a crafted checkpoint could run."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _legacy_checkpoint(out, target, state_bytes: bytes | None = None):
    """`out` as format 1 wrote it: `reinforce_policy.pt` (torch.save), metadata of format 1."""
    policy, metadata = load_reinforce(out)
    if state_bytes is None:
        state_bytes = _torch_bytes(policy.state_dict())
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr(LEGACY_STATE_FILE, state_bytes)
        archive.writestr(METADATA_FILE, json.dumps({**metadata, "format": 1}))
    return target


def _torch_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _torch_payload(marker) -> bytes:
    return _torch_bytes(RunsCode(marker))


def test_a_checkpoint_holds_safetensors_weights_and_nothing_pickled(trained):
    _, out = trained
    with zipfile.ZipFile(out) as archive:
        assert sorted(archive.namelist()) == sorted([STATE_FILE, METADATA_FILE])
    assert read_metadata(out)["format"] == 2


def test_a_format_1_checkpoint_loads_and_scores_as_the_new_one(trained, tmp_path):
    _, out = trained
    legacy = _legacy_checkpoint(out, tmp_path / "legacy.zip")
    model = tiny_model("llama")
    new_scores = ReinforceScorer(out).score_model(model, ratio=0.3)
    old_scores = ReinforceScorer(legacy).score_model(model, ratio=0.3)
    assert all(torch.equal(a, b) for a, b in zip(new_scores, old_scores, strict=True))


def test_the_pt_payload_used_below_does_run_code_without_weights_only(tmp_path):
    """Control: a plain `torch.load` of the crafted `.pt` executes it."""
    marker = tmp_path / "ran"
    torch.load(io.BytesIO(_torch_payload(marker)), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (_torch_payload, "never does because a pickle can run code"),
        (lambda marker: pickle.dumps(RunsCode(marker)), "never does because a pickle can run code"),
        (lambda marker: b"not a torch file at all", "not plain tensors|damaged"),
        (lambda marker: b"", "damaged or not a torch file"),
        (lambda marker: _torch_bytes([1, 2]), "holds list, not a dict of named tensors"),
    ],
    ids=["torch.save payload", "raw pickle payload", "garbage", "empty", "not a state dict"],
)
def test_an_unusable_format_1_pt_is_refused_without_running_anything(
    trained, tmp_path, content, message
):
    _, out = trained
    marker = tmp_path / "ran"
    evil = _legacy_checkpoint(out, tmp_path / "evil.zip", content(marker))
    with pytest.raises(PruneNetError, match=message):
        ReinforceScorer(evil)
    assert not marker.exists()


def test_resaving_a_format_1_checkpoint_keeps_its_weights_and_metadata(trained, tmp_path):
    _, out = trained
    legacy = _legacy_checkpoint(out, tmp_path / "legacy.zip")
    converted = tmp_path / "converted.zip"
    resave_reinforce(legacy, converted)
    with zipfile.ZipFile(converted) as archive:
        assert LEGACY_STATE_FILE not in archive.namelist()
    assert read_metadata(converted) == {**read_metadata(legacy), "format": 2}
    before, _ = load_reinforce(legacy)
    after, _ = load_reinforce(converted)
    assert all(torch.equal(v, after.state_dict()[k]) for k, v in before.state_dict().items())


def test_ctrl_c_reports_the_best_checkpoint_saved_so_far(layer_data, tmp_path, monkeypatch):
    out = tmp_path / "rf.zip"
    calls = []

    def evaluate_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return 1.0

    monkeypatch.setattr("prunenet.rl.reinforce.train.evaluate_reinforce", evaluate_then_interrupt)
    with pytest.raises(TrainingInterrupted) as interrupted:
        train_reinforce(layer_data, 0.3, episodes=5, out=out, progress=False)
    assert (interrupted.value.checkpoint, interrupted.value.step) == (str(out), 1)
    assert "episode 1" in interrupted.value.summary()
    assert read_metadata(out)["episode"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["rf.zip"]


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


def test_cli_trains_the_baseline_with_the_refit_reward(tiny_model_folder, tmp_path):
    out = tmp_path / "rf.zip"
    argv = ["train", "--model", str(tiny_model_folder), "--out", str(out), "--algo",
            "reinforce", "--ratios", "0.25", "--episodes", "2", "--reward", "refit"]  # fmt: skip
    assert cli_main(argv) == 0
    metadata = read_metadata(out)
    assert metadata["reward"] == "refit" and 0 < metadata["eval_reward"] <= 1


def test_cli_refuses_an_existing_out_unless_overwrite(tiny_model_folder, tmp_path, capsys):
    out = tmp_path / "rf.zip"
    out.write_bytes(b"a previous run")
    argv = ["train", "--model", str(tmp_path / "no-such-model"), "--out", str(out),
            "--algo", "reinforce", "--ratios", "0.25"]  # fmt: skip
    assert cli_main(argv) == 2  # refused before the (missing) model is looked at
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"a previous run"
    argv[2] = str(tiny_model_folder)
    with zipfile.ZipFile(out, "w") as archive:  # now a previous run's checkpoint
        archive.writestr("prunenet.json", "{}")
    assert cli_main([*argv, "--episodes", "1", "--overwrite"]) == 0
    assert read_metadata(out)["ratio"] == 0.25


def test_cli_asks_for_one_ratio(tiny_model_folder, tmp_path, capsys):
    argv = ["train", "--model", str(tiny_model_folder), "--out", str(tmp_path / "rf.zip"),
            "--algo", "reinforce", "--ratios", "0.1:0.5"]  # fmt: skip
    assert cli_main(argv) == 2
    assert "--ratios 0.3:0.3" in capsys.readouterr().err
