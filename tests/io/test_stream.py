"""Stream pruning: same result as in-memory pruning, bounded reads, clear errors, no debris."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from prunenet.cli import main
from prunenet.core.compress import count_parameters, prune_model, select_keep_indices
from prunenet.core.config_fields import ffn_widths
from prunenet.core.ratios import keep_count, uniform_keep
from prunenet.errors import PruneNetError
from prunenet.io.loading import drop_remote_code
from prunenet.io.stream.checkpoint import INDEX_FILE
from prunenet.scoring.base import Scorer
from prunenet.scoring.heuristics import MagnitudeScorer, RandomScorer
from prunenet.stream import stream_prune
from tests.conftest import FFN_WIDTH, logits_of, tiny_model, tiny_tokenizer

RATIO = 0.3
SHARD_SIZE = "4KB"  # tiny models are ~30 KB: several shards, and layers split across them


def save_sharded(model_type: str, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    tiny_model(model_type).to(dtype).save_pretrained(folder, max_shard_size=SHARD_SIZE)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """model_type -> a sharded tiny checkpoint, built once per module. Treat as read-only."""
    cache: dict[tuple[str, torch.dtype], Path] = {}

    def get(model_type: str, dtype: torch.dtype = torch.float32) -> Path:
        if (model_type, dtype) not in cache:
            folder = tmp_path_factory.mktemp(f"{model_type}-{str(dtype)[6:]}")
            cache[model_type, dtype] = save_sharded(model_type, folder, dtype)
        return cache[model_type, dtype]

    return get


def prune_in_memory(source: Path, out: Path, scorer: Scorer):
    model = AutoModelForCausalLM.from_pretrained(source)
    report = prune_model(
        model, scorer.score_model(model, ratio=RATIO), uniform_keep(ffn_widths(model.config), RATIO)
    )
    model.save_pretrained(out)
    return model, report


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            names = handle.keys()  # a safe_open handle is not a mapping: no `in handle`
            tensors.update({name: handle.get_tensor(name).clone() for name in names})
    return tensors


def assert_same_tensors(expected: dict, actual: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def no_output_left(out: Path) -> bool:
    """Neither the folder nor a staging sibling (`.out.partial-*`) survives a failure."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


@pytest.mark.parametrize("model_type", ["llama", "opt", "gpt2", "phi3"])
def test_stream_pruning_matches_in_memory_pruning(checkpoints, tmp_path, model_type):
    source = checkpoints(model_type)
    assert len(list(source.glob("*.safetensors"))) >= 3
    reference, _ = prune_in_memory(source, tmp_path / "memory", MagnitudeScorer())

    stream_prune(source, tmp_path / "stream", MagnitudeScorer(), RATIO)

    assert_same_tensors(load_tensors(tmp_path / "memory"), load_tensors(tmp_path / "stream"))
    assert config_of(tmp_path / "stream") == config_of(tmp_path / "memory")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    assert torch.equal(logits_of(reloaded), logits_of(reference.eval()))


def test_stream_keeps_shard_grouping_and_side_files(checkpoints, tmp_path):
    source = checkpoints("llama")

    stream_prune(source, tmp_path / "out", RandomScorer(seed=5), RATIO)

    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert index["weight_map"] == json.loads((source / INDEX_FILE).read_text())["weight_map"]
    written = load_tensors(tmp_path / "out")
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in written.values())
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in written.values())
    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        assert (tmp_path / "out" / name).read_bytes() == (source / name).read_bytes()


def test_stream_preserves_bfloat16_and_matches_in_memory(checkpoints, tmp_path):
    source = checkpoints("llama", torch.bfloat16)
    prune_in_memory(source, tmp_path / "memory", RandomScorer(seed=1))

    stream_prune(source, tmp_path / "stream", RandomScorer(seed=1), RATIO)

    streamed = load_tensors(tmp_path / "stream")
    assert {t.dtype for t in streamed.values()} == {torch.bfloat16}
    assert_same_tensors(load_tensors(tmp_path / "memory"), streamed)
    assert config_of(tmp_path / "stream") == config_of(tmp_path / "memory")


def test_stream_keeps_the_top_scored_rows_and_bias_entries(checkpoints, tmp_path):
    """Checked against the source tensors directly, not against another pruning code path."""
    source = checkpoints("opt")
    original = load_tensors(source)

    stream_prune(source, tmp_path / "out", MagnitudeScorer(), RATIO)

    pruned = load_tensors(tmp_path / "out")
    for layer in range(2):
        prefix = f"model.decoder.layers.{layer}"
        fc1 = original[f"{prefix}.fc1.weight"]
        keep = select_keep_indices(fc1.float().norm(dim=1), keep_count(FFN_WIDTH, RATIO))
        assert torch.equal(pruned[f"{prefix}.fc1.weight"], fc1[keep])
        assert torch.equal(pruned[f"{prefix}.fc1.bias"], original[f"{prefix}.fc1.bias"][keep])
        assert torch.equal(
            pruned[f"{prefix}.fc2.weight"], original[f"{prefix}.fc2.weight"][:, keep]
        )
        assert torch.equal(pruned[f"{prefix}.fc2.bias"], original[f"{prefix}.fc2.bias"])


def test_stream_reads_checkpoints_saved_without_the_model_prefix(checkpoints, tmp_path):
    """Base-model checkpoints name tensors `decoder.layers...` instead of `model.decoder...`."""
    source = checkpoints("opt")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((source / "config.json").read_bytes())
    save_file({k.removeprefix("model."): v for k, v in load_tensors(source).items()},
              bare / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    stream_prune(source, tmp_path / "prefixed", MagnitudeScorer(), RATIO)

    stream_prune(bare, tmp_path / "out", MagnitudeScorer(), RATIO)

    expected = {k.removeprefix("model."): v for k, v in load_tensors(tmp_path / "prefixed").items()}
    assert_same_tensors(expected, load_tensors(tmp_path / "out"))
    assert not (tmp_path / "out" / INDEX_FILE).exists()  # a single file stays a single file


def test_stream_report_counts_parameters_from_tensor_shapes(checkpoints, tmp_path):
    source = checkpoints("llama")
    model, memory_report = prune_in_memory(source, tmp_path / "memory", MagnitudeScorer())

    report = stream_prune(source, tmp_path / "out", MagnitudeScorer(), RATIO)

    assert (report.params_before, report.params_after) == (
        memory_report.params_before,
        count_parameters(model),
    )
    assert report.ffn_ratio == pytest.approx(1 - keep_count(FFN_WIDTH, RATIO) / FFN_WIDTH)
    saved = json.loads((tmp_path / "out" / "prunenet_report.json").read_text())
    assert saved["params_removed_fraction"] == pytest.approx(report.params_removed_fraction)
    assert len(saved["layer_seconds"]) == 2


def test_truncated_shard_fails_clearly_and_leaves_no_output(checkpoints, tmp_path):
    broken = copy_checkpoint(checkpoints("llama"), tmp_path / "broken")
    shard = sorted(broken.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])

    with pytest.raises(PruneNetError, match=rf"{shard.name}.*truncated"):
        stream_prune(broken, tmp_path / "out", MagnitudeScorer(), RATIO)
    assert no_output_left(tmp_path / "out")


def test_index_naming_a_missing_shard_fails_clearly_and_leaves_no_output(checkpoints, tmp_path):
    broken = copy_checkpoint(checkpoints("llama"), tmp_path / "broken")
    missing = sorted(broken.glob("*.safetensors"))[-1]
    missing.unlink()

    with pytest.raises(PruneNetError, match=rf"names the shard {missing.name}.*does not exist"):
        stream_prune(broken, tmp_path / "out", MagnitudeScorer(), RATIO)
    assert no_output_left(tmp_path / "out")


def test_missing_ffn_tensor_fails_clearly_and_leaves_no_output(checkpoints, tmp_path):
    broken = copy_checkpoint(checkpoints("llama"), tmp_path / "broken")
    index = json.loads((broken / INDEX_FILE).read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (broken / INDEX_FILE).write_text(json.dumps(index))

    with pytest.raises(PruneNetError, match=r"Missing FFN tensor 'model.layers.1.mlp.up_proj"):
        stream_prune(broken, tmp_path / "out", MagnitudeScorer(), RATIO)
    assert no_output_left(tmp_path / "out")


def test_scorer_that_needs_a_forward_pass_is_refused(checkpoints, tmp_path):
    class ActivationScorer(Scorer):
        name = "activations"
        weights_only = False

    with pytest.raises(PruneNetError, match="weights_only=False.*cannot run in stream mode"):
        stream_prune(checkpoints("llama"), tmp_path / "out", ActivationScorer(), RATIO)
    assert no_output_left(tmp_path / "out")


def test_stream_gives_the_scorer_each_layers_target_ratio(checkpoints, tmp_path):
    """A policy observes the ratio it prunes for; streaming must pass it like score_model."""

    class RatioRecorder(MagnitudeScorer):
        seen: list = []

        def score_layer(self, ffn, layer_index, num_layers, ratio=None):
            self.seen.append((layer_index, num_layers, ratio))
            return super().score_layer(ffn, layer_index, num_layers)

    scorer = RatioRecorder()
    stream_prune(checkpoints("llama"), tmp_path / "out", scorer, RATIO, layer_ratios=[0.25, 0.5])

    assert sorted(scorer.seen) == [(0, 2, 0.25), (1, 2, 0.5)]


def test_stream_with_per_layer_ratios_matches_in_memory_pruning(checkpoints, tmp_path):
    source = checkpoints("llama")
    model = AutoModelForCausalLM.from_pretrained(source)
    keep = [keep_count(FFN_WIDTH, 0.25), keep_count(FFN_WIDTH, 0.5)]
    prune_model(model, MagnitudeScorer().score_model(model), keep, target_ratio=RATIO)
    model.save_pretrained(tmp_path / "memory")

    stream_prune(source, tmp_path / "stream", MagnitudeScorer(), RATIO, layer_ratios=[0.25, 0.5])

    assert_same_tensors(load_tensors(tmp_path / "memory"), load_tensors(tmp_path / "stream"))
    streamed = config_of(tmp_path / "stream")
    # The streamed folder also carries the modeling file that loads it without prunenet.
    assert "AutoModelForCausalLM" in streamed["auto_map"]
    assert (tmp_path / "stream" / "modeling_prunenet.py").is_file()
    assert drop_remote_code(streamed) == config_of(tmp_path / "memory")


def test_cli_stream_writes_a_reloadable_folder(checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prune", "--model", str(checkpoints("gpt2")), "--ratio", "0.3", "--stream"]
    args += ["--scorer", "magnitude"]

    assert main([*args, "--out", str(out)]) == 0

    assert "streaming safetensors layer by layer" in capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.n_inner == keep_count(4 * 16, 0.3)


def test_cli_switches_to_stream_when_the_checkpoint_would_crowd_ram(
    checkpoints, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("prunenet.stream.available_memory_bytes", lambda: 1000)
    args = ["prune", "--model", str(checkpoints("llama")), "--ratio", "0.2,0.4"]
    args += ["--scorer", "magnitude"]

    assert main([*args, "--out", str(tmp_path / "out")]) == 0

    assert "switching to --route stream" in capsys.readouterr().out
    for ratio in (0.2, 0.4):
        config = config_of(tmp_path / "out" / f"ratio-{ratio:.2f}")
        assert config["intermediate_size"] == keep_count(FFN_WIDTH, ratio)


def test_cli_stream_refuses_a_scorer_that_needs_the_model_in_memory(checkpoints, tmp_path, capsys):
    args = ["prune", "--model", str(checkpoints("llama")), "--ratio", "0.3", "--stream"]

    assert main([*args, "--scorer", "selfgen", "--out", str(tmp_path / "out")]) == 2

    assert "never runs the model" in capsys.readouterr().err
    assert no_output_left(tmp_path / "out")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_device_cuda_without_a_gpu_is_a_clear_error(checkpoints, tmp_path, capsys):
    args = ["prune", "--model", str(checkpoints("llama")), "--ratio", "0.3", "--stream"]

    assert (
        main([*args, "--scorer", "magnitude", "--device", "cuda", "--out", str(tmp_path / "out")])
        == 2
    )

    assert "sees no CUDA GPU" in capsys.readouterr().err
    assert no_output_left(tmp_path / "out")


def copy_checkpoint(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_stream_with_a_weights_only_policy_matches_in_memory_pruning(checkpoints, tmp_path):
    """A policy trained on weights-only features streams, bit for bit like in-memory pruning."""
    from prunenet.rl.ppo.train import TrainConfig, train_policy
    from prunenet.scoring.ppo import PolicyScorer

    source = checkpoints("llama")
    checkpoint = tmp_path / "policy.zip"
    config = TrainConfig(model=str(source), out=str(checkpoint), timesteps=8, eval_every=4,
                         feature_set="weights", reward="ks")  # fmt: skip
    train_policy(config)
    scorer = PolicyScorer(str(checkpoint))
    assert scorer.weights_only
    prune_in_memory(source, tmp_path / "memory", scorer)

    stream_prune(source, tmp_path / "stream", scorer, RATIO)

    assert_same_tensors(load_tensors(tmp_path / "memory"), load_tensors(tmp_path / "stream"))
