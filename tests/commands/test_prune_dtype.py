"""`prunenet prune --dtype`: the default path keeps a bf16/fp16 checkpoint's dtype end to end.

The default path (self-generated text, sequential activations, policy scores, lsq refit) runs
its forward passes in the checkpoint's dtype and only its statistics in float32/float64, so a
bf16 checkpoint needs half of float32's memory and its pruned folder is bf16 again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from prunenet.cli import main
from prunenet.core.config_fields import ffn_width
from prunenet.core.ratios import keep_count
from prunenet.io.saving import REPORT_FILE
from tests.conftest import FFN_WIDTH, logits_of, tiny_model, tiny_tokenizer

RATIO = 0.5
SMALL_TEXT = ("--selfgen-sequences", "4", "--selfgen-length", "16")


def _prune_default(model: Path, out: Path, *extra: str) -> int:
    """The default path (`--scorer policy`, sequential analysis, lsq refit) on little text."""
    argv = ["prune", "--model", str(model), "--ratio", str(RATIO), "--out", str(out)]
    return main([*argv, *SMALL_TEXT, *extra])


def _saved_tiny_llama(folder: Path, dtype: torch.dtype) -> Path:
    tiny_model("llama").to(dtype).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved in bfloat16 (config.json says so). Treat as read-only."""
    return _saved_tiny_llama(tmp_path_factory.mktemp("tiny-llama-bf16"), torch.bfloat16)


def _stored_dtypes(folder: Path) -> set[torch.dtype]:
    """The dtype of every tensor in the folder's safetensors files."""
    dtypes = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as weights:
            names = weights.keys()  # a safe_open handle is not a mapping: no `in weights`
            dtypes |= {weights.get_tensor(name).dtype for name in names}
    return dtypes


def _config_dtype(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["dtype"]


def _kept_rows(pruned: torch.nn.Module, dense: torch.nn.Module) -> list[set[int]]:
    """Per layer, the dense rows the pruned FFN kept (gate rows are copied, never refitted)."""
    kept = []
    for pruned_layer, dense_layer in zip(pruned.model.layers, dense.model.layers, strict=True):
        distances = torch.cdist(
            pruned_layer.mlp.gate_proj.weight.float(), dense_layer.mlp.gate_proj.weight.float()
        )
        kept.append(set(distances.argmin(dim=1).tolist()))
    return kept


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_default_path_keeps_the_checkpoint_dtype_in_config_and_every_tensor(
    tmp_path: Path, dtype: torch.dtype, no_disk_cache: None
) -> None:
    folder = _saved_tiny_llama(tmp_path / "in", dtype)
    out = tmp_path / "out"
    assert _prune_default(folder, out) == 0

    name = str(dtype).removeprefix("torch.")
    assert _config_dtype(out) == name
    assert _stored_dtypes(out) == {dtype}
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["scorer"]["scorer"] == "policy"
    assert report["scorer"]["analysis"] == "sequential"
    assert report["scorer"]["sequential"]["mode"] == "lsq"


def test_bf16_output_reloads_with_plain_from_pretrained_in_bf16(
    bf16_folder: Path, tmp_path: Path, no_disk_cache: None
) -> None:
    out = tmp_path / "out"
    assert _prune_default(bf16_folder, out) == 0

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.dtype == torch.bfloat16
    assert ffn_width(reloaded.config) == keep_count(FFN_WIDTH, RATIO)
    assert reloaded.config.mlp_bias is True  # the refit's intercept, stored in bf16 too
    assert torch.isfinite(logits_of(reloaded)).all()


def test_dtype_float32_prunes_a_bf16_checkpoint_into_a_float32_folder(
    bf16_folder: Path, tmp_path: Path, no_disk_cache: None
) -> None:
    out = tmp_path / "out"
    assert _prune_default(bf16_folder, out, "--dtype", "float32") == 0

    assert _config_dtype(out) == "float32"
    assert _stored_dtypes(out) == {torch.float32}


def test_dtype_bfloat16_prunes_a_float32_checkpoint_into_a_bf16_folder(
    tiny_model_folder: Path, tmp_path: Path, no_disk_cache: None
) -> None:
    out = tmp_path / "out"
    assert _prune_default(tiny_model_folder, out, "--dtype", "bfloat16") == 0

    assert _config_dtype(out) == "bfloat16"
    assert _stored_dtypes(out) == {torch.bfloat16}


def test_bf16_run_keeps_the_rows_and_nearly_the_logits_of_the_float32_run(
    bf16_folder: Path, tmp_path: Path, no_disk_cache: None
) -> None:
    # Both runs start from the same (bf16) weights; only the arithmetic differs. bf16 keeps 8
    # significant bits (relative rounding up to 2^-8 per value), which may flip a near tie between
    # rows or a sampled token, but the pruned model must stay much closer to the float32 run
    # than pruning moved it: measured on six seeds, the same rows in every layer and a logit
    # difference 0.5-1.2% of the pruning's own change (the bound leaves 8x room).
    assert _prune_default(bf16_folder, tmp_path / "bf16") == 0
    assert _prune_default(bf16_folder, tmp_path / "fp32", "--dtype", "float32") == 0
    dense, bf16, fp32 = (
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        for folder in (bf16_folder, tmp_path / "bf16", tmp_path / "fp32")
    )

    same = [a == b for a, b in zip(_kept_rows(bf16, dense), _kept_rows(fp32, dense), strict=True)]
    assert sum(same) >= len(same) / 2
    pruning_change = (logits_of(fp32) - logits_of(dense)).norm()
    assert (logits_of(bf16) - logits_of(fp32)).norm() < 0.1 * pruning_change


def test_dtype_help_names_the_choices(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    printed = " ".join(capsys.readouterr().out.split())
    assert "--dtype {auto,float32,bfloat16,float16}" in printed


def test_unknown_dtype_exits_2_before_the_model_is_loaded(
    bf16_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_:
        _prune_default(bf16_folder, tmp_path / "out", "--dtype", "float64")
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
