"""One layer in memory gives the in-memory default path's output, tensor for tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from prunenet import layerwise
from prunenet.analysis.layer_calls import run_layer
from prunenet.analysis.sequential import SequentialCut, analysis_text
from prunenet.errors import PruneNetError
from prunenet.io.models import load_model
from prunenet.io.saving import REPORT_FILE
from prunenet.io.stream.checkpoint import INDEX_FILE
from prunenet.layerwise import LazyModel, layerwise_prune, layerwise_text
from prunenet.pipeline import prune_and_save, scorer_planner
from prunenet.scoring.heuristics import SelfGenScorer
from tests.conftest import ALL_MODEL_TYPES, FFN_WIDTH, SMALL_SELFGEN, tiny_model, tiny_tokenizer


def _saved(tmp_path: Path, model_type: str, dtype: torch.dtype = torch.float32) -> Path:
    folder = tmp_path / f"dense-{model_type}"
    tiny_model(model_type).to(dtype).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _both(tmp_path: Path, folder: Path, refit: str, dtype=torch.float32, ratio: float = 0.3):
    planner = scorer_planner(SelfGenScorer(), analysis="sequential")
    model, tokenizer = load_model(str(folder), dtype=dtype)
    in_memory = tmp_path / "in-memory"
    prune_and_save(
        model, tokenizer, planner, [ratio], [in_memory], refit=refit, selfgen=SMALL_SELFGEN
    )
    layerwise = tmp_path / "layerwise"
    report = layerwise_prune(
        folder, layerwise, planner, ratio, refit=refit, selfgen=SMALL_SELFGEN, dtype=dtype,
        tokenizer=tokenizer,
    )  # fmt: skip
    return in_memory, layerwise, report


@pytest.mark.parametrize("model_type", ALL_MODEL_TYPES)
def test_layerwise_output_equals_in_memory_for_every_adapter(tmp_path, model_type, no_disk_cache):
    folder = _saved(tmp_path, model_type)
    in_memory, layerwise, _ = _both(tmp_path, folder, refit="lsq")
    expected, _ = load_model(str(in_memory))
    got, _ = load_model(str(layerwise))
    assert type(got) is type(expected)
    want = expected.state_dict()
    have = got.state_dict()
    assert have.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(have[name], tensor), name
    ids = torch.randint(4, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(got(ids).logits, expected(ids).logits)


def test_layerwise_report_and_config_match_in_memory(tmp_path, no_disk_cache):
    folder = _saved(tmp_path, "llama")
    in_memory, layerwise, report = _both(tmp_path, folder, refit="lsq")
    want = json.loads((in_memory / REPORT_FILE).read_text())
    have = json.loads((layerwise / REPORT_FILE).read_text())
    for key in ("ffn_widths_after", "params_before", "params_after", "target_ratio"):
        assert have[key] == want[key], key
    # Everything but the wall seconds per stage, which no two runs share.
    have_log, want_log = have["scorer"]["sequential"], want["scorer"]["sequential"]
    assert (
        set(have_log.pop("seconds"))
        == set(want_log.pop("seconds"))
        == {"forward", "scores", "refit"}
    )
    assert have_log == want_log
    assert len(report.scorer["layerwise"]["layer_seconds"]) == 2
    config_want = json.loads((in_memory / "config.json").read_text())
    config_have = json.loads((layerwise / "config.json").read_text())
    assert config_have == config_want
    assert (layerwise / "tokenizer.json").is_file()


def test_layerwise_writes_one_shard_per_layer_and_an_index(tmp_path, no_disk_cache):
    folder = _saved(tmp_path, "llama")
    _, layerwise, _ = _both(tmp_path, folder, refit="none")
    index = json.loads((layerwise / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [
        "model-layer-00000.safetensors",
        "model-layer-00001.safetensors",
        "model-outer.safetensors",
    ]
    total = 0
    for shard in shards:
        with safe_open(layerwise / shard, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a handle is not a mapping)
                assert index["weight_map"][name] == shard
                tensor = handle.get_tensor(name)
                total += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == total


def test_a_bf16_checkpoint_stays_bf16_layer_by_layer(tmp_path, no_disk_cache):
    folder = _saved(tmp_path, "llama", torch.bfloat16)
    in_memory, layerwise, _ = _both(tmp_path, folder, refit="lsq", dtype=torch.bfloat16)
    got, _ = load_model(str(layerwise), dtype="auto")
    expected, _ = load_model(str(in_memory), dtype="auto")
    assert {t.dtype for t in got.state_dict().values()} == {torch.bfloat16}
    for name, tensor in expected.state_dict().items():
        assert torch.equal(got.state_dict()[name], tensor), name


def test_lazy_model_holds_no_layer_weights_until_asked(tmp_path):
    folder = _saved(tmp_path, "llama")
    lazy = LazyModel(folder, torch.float32)
    devices = {p.device.type for p in lazy.layers[0].parameters()}
    assert devices == {"meta"}
    assert lazy.model.get_input_embeddings().weight.device.type == "cpu"
    layer = lazy.load_layer(0)
    dense = tiny_model("llama").model.layers[0]
    want = dense.state_dict()
    assert layer.state_dict().keys() == want.keys()
    for name, have in layer.state_dict().items():
        assert torch.equal(have, want[name]), name
    lazy.release_layer(0)
    assert {p.device.type for p in lazy.layers[0].parameters()} == {"meta"}


def test_cached_text_is_found_without_loading_the_model(tmp_path, monkeypatch):
    """The text key is the in-memory path's weights fingerprint, read one tensor at a time."""
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PRUNENET_NO_CACHE", raising=False)
    folder = _saved(tmp_path, "qwen2", torch.bfloat16)
    model, _ = load_model(str(folder), dtype=torch.bfloat16)
    written = analysis_text(model, SMALL_SELFGEN)  # the in-memory path caches it

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded although its text is cached")

    monkeypatch.setattr(layerwise, "load_model", must_not_load)
    for compute in (torch.bfloat16, torch.float32):  # the key is the stored dtype's weights
        lazy = LazyModel(folder, torch.bfloat16, compute)
        assert torch.equal(layerwise_text(lazy, SMALL_SELFGEN), written)


def test_uncached_text_is_written_by_the_loaded_model(tmp_path, no_disk_cache):
    folder = _saved(tmp_path, "llama")
    model, _ = load_model(str(folder))
    lazy = LazyModel(folder, torch.float32)
    assert torch.equal(layerwise_text(lazy, SMALL_SELFGEN), analysis_text(model, SMALL_SELFGEN))


def test_computed_in_float32_stored_in_bf16(tmp_path, no_disk_cache):
    """Each cut layer is rounded to the stored dtype before it runs: the hidden states the next
    layer is cut on are what the saved bf16 layer computes (in float32)."""
    folder = _saved(tmp_path, "llama", torch.bfloat16)
    planner = scorer_planner(SelfGenScorer(), analysis="sequential")
    out = tmp_path / "out"
    report = layerwise_prune(
        folder, out, planner, 0.3, refit="lsq", selfgen=SMALL_SELFGEN, dtype=torch.bfloat16,
        compute_dtype=torch.float32,
    )  # fmt: skip
    assert report.scorer["layerwise"]["compute_dtype"] == "float32"
    saved, _ = load_model(str(out), dtype="auto")
    assert {t.dtype for t in saved.state_dict().values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    lazy = LazyModel(folder, torch.bfloat16, torch.float32)
    tokens = layerwise_text(lazy, SMALL_SELFGEN)
    cut = SequentialCut(lazy.model, "lsq", tokens, stored_dtype=torch.bfloat16)
    layer = lazy.load_layer(0)
    before = cut.hidden
    keep = cut(0, layer, torch.arange(FFN_WIDTH, dtype=torch.float32), FFN_WIDTH // 2)
    assert keep.numel() == FFN_WIDTH // 2
    for name, parameter in layer.named_parameters():
        assert parameter.dtype == torch.float32
        assert torch.equal(parameter, parameter.to(torch.bfloat16).float()), name
    assert torch.equal(cut.hidden, run_layer(layer, before, cut.layer_kwargs[0]))


@pytest.mark.parametrize("model_type", ["llama", "opt", "gemma3_text", "gpt2"])
def test_streamed_text_equals_the_resident_models_and_holds_no_layer_after(
    tmp_path, model_type, no_disk_cache
):
    """Layers read from the shards before each step's use give the same tokens."""
    folder = _saved(tmp_path, model_type)
    resident = layerwise.write_text(LazyModel(folder, torch.float32), SMALL_SELFGEN, "resident")
    lazy = LazyModel(folder, torch.float32)
    loads = []
    original = lazy.load_layer
    lazy.load_layer = lambda index: loads.append(index) or original(index)
    streamed = layerwise.write_text(lazy, SMALL_SELFGEN, "streamed")
    assert torch.equal(streamed, resident)
    assert len(loads) == len(lazy.layers) * (SMALL_SELFGEN.length - 1)  # every layer, every step
    for layer in lazy.layers:
        assert all(p.device.type == "meta" for p in layer.parameters())


def test_the_text_route_is_resident_when_the_checkpoint_fits_and_streamed_when_not(
    tmp_path, monkeypatch
):
    folder = _saved(tmp_path, "llama")
    lazy = LazyModel(folder, torch.float32)
    size = layerwise.checkpoint_bytes(folder)
    monkeypatch.setattr(layerwise, "available_memory_bytes", lambda: int(size / 0.81))
    assert layerwise.choose_text_route(lazy) == "streamed"
    monkeypatch.setattr(layerwise, "available_memory_bytes", lambda: int(size / 0.79))
    assert layerwise.choose_text_route(lazy) == "resident"
    assert layerwise.choose_text_route(lazy, "streamed") == "streamed"
    with pytest.raises(PruneNetError, match="Unknown text route"):
        layerwise.choose_text_route(lazy, "swap")


def test_a_streamed_text_is_recorded_in_the_report(tmp_path, monkeypatch, no_disk_cache):
    folder = _saved(tmp_path, "llama")
    monkeypatch.setattr(layerwise, "available_memory_bytes", lambda: 1)
    planner = scorer_planner(SelfGenScorer(), analysis="sequential")
    report = layerwise_prune(folder, tmp_path / "out", planner, 0.3, selfgen=SMALL_SELFGEN)
    assert report.scorer["layerwise"]["text_route"] == "streamed"
