"""`prunenet prune --layerwise`: the default path one decoder layer at a time, from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prunenet import runner
from prunenet.cli import main
from prunenet.io.models import load_model
from prunenet.io.saving import REPORT_FILE
from tests.conftest import tiny_model, tiny_tokenizer

SMALL_TEXT = ("--selfgen-sequences", "4", "--selfgen-length", "16")


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama-bf16")
    tiny_model("llama").to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _prune(model: Path, out: Path, *extra: str) -> int:
    argv = ["prune", "--model", str(model), "--ratio", "0.3", "--out", str(out), *SMALL_TEXT]
    return main([*argv, *extra])


def test_layerwise_cli_output_equals_the_in_memory_run(dense, tmp_path, no_disk_cache):
    assert _prune(dense, tmp_path / "memory") == 0
    assert _prune(dense, tmp_path / "layerwise", "--layerwise") == 0
    expected, _ = load_model(str(tmp_path / "memory"), dtype="auto")
    got, _ = load_model(str(tmp_path / "layerwise"), dtype="auto")
    for name, tensor in expected.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(got.state_dict()[name], tensor), name
    report = json.loads((tmp_path / "layerwise" / REPORT_FILE).read_text())
    assert report["scorer"]["scorer"] == "policy"
    assert len(report["scorer"]["layerwise"]["layer_seconds"]) == 2


def test_a_large_checkpoint_switches_to_layerwise(
    dense, tmp_path, monkeypatch, capsys, no_disk_cache
):
    monkeypatch.setattr(runner, "should_stream", lambda path: (True, 10**11, 10**10))
    assert _prune(dense, tmp_path / "out") == 0
    assert "switching to --route layerwise" in capsys.readouterr().out
    assert (tmp_path / "out" / "model-outer.safetensors").is_file()


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (("--stream",), "Pick one"),
        (("--scorer", "magnitude"), "use --route stream"),
        (("--analysis", "oneshot"), "use --route stream"),
        (("--allocation", "auto"), "use --strategy uniform"),
    ],
)
def test_layerwise_refuses_what_it_cannot_do(dense, tmp_path, capsys, extra, says):
    assert _prune(dense, tmp_path / "out", "--layerwise", *extra) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_layerwise_refuses_a_parameter_budget_beyond_ffn_rows(dense, tmp_path, capsys):
    argv = ["prune", "--model", str(dense), "--remove-params", "0.1", "--structures",
            "ffn,layers", "--layerwise"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "use --structures ffn, or --route memory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_compute_dtype_needs_layerwise(dense, tmp_path, capsys):
    assert _prune(dense, tmp_path / "out", "--compute-dtype", "float32") == 2
    assert "Use --route layerwise" in capsys.readouterr().err


def test_layerwise_computes_in_float32_and_saves_bf16(dense, tmp_path, no_disk_cache):
    out = tmp_path / "out"
    assert _prune(dense, out, "--layerwise", "--compute-dtype", "float32") == 0
    got, _ = load_model(str(out), dtype="auto")
    assert {t.dtype for t in got.state_dict().values()} == {torch.bfloat16}
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["scorer"]["layerwise"]["compute_dtype"] == "float32"


def test_text_route_needs_layerwise(dense, tmp_path, capsys):
    assert _prune(dense, tmp_path / "out", "--text-route", "streamed") == 2
    assert "use --route layerwise or drop --text-route" in capsys.readouterr().err


def test_a_streamed_text_route_is_used_and_reported(dense, tmp_path, no_disk_cache):
    out = tmp_path / "out"
    assert _prune(dense, out, "--layerwise", "--text-route", "streamed") == 0
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["scorer"]["layerwise"]["text_route"] == "streamed"
