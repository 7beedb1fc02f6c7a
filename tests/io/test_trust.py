"""Nothing PruneNet reads runs code: a folder asking for its own code is refused on every load
path, even with `y` on stdin (transformers' prompt), and PruneNet's own outputs still load."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunenet.cli import main
from prunenet.errors import PruneNetError
from prunenet.io import loading, models
from prunenet.io.loading import load_pruned
from prunenet.io.models import load_model, load_tokenizer
from prunenet.io.stream import checkpoint
from prunenet.io.stream.checkpoint import load_config
from prunenet.io.trust import check_model_folder, strip_remote_code
from tests.conftest import tiny_model, tiny_tokenizer

REFUSAL = "asks to run its own Python code"
NEVER = "PruneNet never runs code"

# Imported by transformers only if it runs the folder's code: it leaves a marker file, and it
# defines the classes the folder names, so such a load would otherwise succeed.
PAYLOAD = """\
import pathlib
pathlib.Path({marker!r}).write_text("the folder's code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""

# Where the folder asks for its code: a normal Llama whose tokenizer_config.json names a
# tokenizer class of its own, or a config.json with an unknown model_type.
HOSTILE_FILES = {
    "tokenizer": (
        "tokenizer_config.json",
        {
            "tokenizer_class": "EvilTokenizer",
            "auto_map": {"AutoTokenizer": [None, "evil.EvilTokenizer"]},
        },
    ),
    "config": (
        "config.json",
        {
            "model_type": "evil",
            "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
        },
    ),
}  # fmt: skip


def hostile_folder(base: Path, kind: str) -> tuple[Path, Path]:
    """A tiny Llama folder (safetensors, tokenizer) that asks to run `evil.py`, and the marker
    file that running it would create.

    :param kind: a key of `HOSTILE_FILES`.
    """
    folder, marker = base / f"hostile-{kind}", base / f"ran-{kind}"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (folder / "evil.py").write_text(PAYLOAD.format(marker=str(marker)))
    name, changes = HOSTILE_FILES[kind]
    entries = json.loads((folder / name).read_text())
    (folder / name).write_text(json.dumps({**entries, **changes}))
    return folder, marker


@pytest.fixture(params=sorted(HOSTILE_FILES))
def hostile(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    return hostile_folder(tmp_path, request.param)


@pytest.fixture
def yes_on_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Answer `y` to every question (transformers asks on stdin before running a folder's code)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 100))


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


# ----- every command path refuses the folder before any work ---------------------------------

SMALL_TEXT = ["--selfgen-sequences", "4", "--selfgen-length", "16"]
RECOVER_QUICK = ["--steps", "2", "--eval-every", "1", "--sequences", "8"]


def _prune(model: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(model), "--ratio", "0.5", "--out", str(out), *extra]


COMMANDS = {
    "prune in memory": lambda bad, good, out: _prune(bad, out, "--scorer", "random"),
    "prune --stream": lambda bad, good, out: _prune(bad, out, "--scorer", "random", "--stream"),
    "prune --layerwise": lambda bad, good, out: _prune(bad, out, "--layerwise", *SMALL_TEXT),
    "eval": lambda bad, good, out: ["eval", "--model", str(bad), "--tasks", "ppl_lambada"],
    "recover model": lambda bad, good, out: [
        "recover", "--model", str(bad), "--teacher", str(good), "--out", str(out), *RECOVER_QUICK
    ],
    "recover teacher": lambda bad, good, out: [
        "recover", "--model", str(good), "--teacher", str(bad), "--out", str(out), *RECOVER_QUICK
    ],
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_refuses_a_folder_asking_to_run_its_own_code_even_with_y_on_stdin(
    command: str,
    hostile: tuple[Path, Path],
    tiny_model_folder: Path,
    tmp_path: Path,
    yes_on_stdin: None,
    capsys: pytest.CaptureFixture,
) -> None:
    folder, marker = hostile
    out = tmp_path / "out"
    assert _exit_code(COMMANDS[command](folder, tiny_model_folder, out)) == 2
    err = capsys.readouterr().err
    assert REFUSAL in err and NEVER in err
    assert not marker.exists()
    assert not out.exists()


def test_prune_in_a_subprocess_with_y_piped_in_refuses_without_running_the_code(
    tmp_path: Path,
) -> None:
    folder, marker = hostile_folder(tmp_path, "tokenizer")
    argv = _prune(folder, tmp_path / "out", "--scorer", "random")
    result = subprocess.run(
        [sys.executable, "-m", "prunenet.cli", *argv],
        input="y\n" * 100,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
    )
    assert result.returncode == 2, result.stderr
    assert REFUSAL in result.stderr and NEVER in result.stderr
    assert not marker.exists()


# ----- each loader refuses it, and without the up-front check still runs nothing -------------


def test_load_config_refuses_a_folder_asking_to_run_its_own_code(
    hostile: tuple[Path, Path], yes_on_stdin: None
) -> None:
    folder, marker = hostile
    with pytest.raises(PruneNetError, match=REFUSAL):
        load_config(folder)
    assert not marker.exists()


def test_load_tokenizer_refuses_a_folder_asking_to_run_its_own_code(
    hostile: tuple[Path, Path], yes_on_stdin: None
) -> None:
    folder, marker = hostile
    with pytest.raises(PruneNetError, match=REFUSAL):
        load_tokenizer(str(folder))
    assert not marker.exists()


def test_load_pruned_refuses_a_folder_asking_to_run_its_own_code(
    hostile: tuple[Path, Path], yes_on_stdin: None
) -> None:
    folder, marker = hostile
    with pytest.raises(PruneNetError, match=REFUSAL):
        load_pruned(folder)
    assert not marker.exists()


def test_loads_never_run_the_code_even_without_the_up_front_check(
    hostile: tuple[Path, Path], yes_on_stdin: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Defence in depth: every transformers load passes trust_remote_code=False, so the prompt
    # is never shown and the code never runs (a hub id is checked this way only).
    nothing = lambda *args, **kwargs: None  # noqa: E731
    for module, name in [
        (models, "check_model_folder"),
        (models, "refuse_remote_code"),
        (loading, "check_model_folder"),
    ]:
        monkeypatch.setattr(module, name, nothing)
    folder, marker = hostile
    with pytest.raises(PruneNetError, match=REFUSAL):
        load_model(str(folder))
    assert not marker.exists()


def test_load_pruned_refuses_trust_remote_code(tiny_model_folder: Path) -> None:
    with pytest.raises(PruneNetError, match="trust_remote_code=True"):
        load_pruned(tiny_model_folder, trust_remote_code=True)


# ----- what is accepted ----------------------------------------------------------------------


def _with_auto_map(tmp_path: Path, source: Path, auto_map: dict) -> Path:
    folder = tmp_path / "folder"
    folder.mkdir()
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    return folder


def test_prunenet_own_modeling_file_entry_is_accepted(
    tiny_model_folder: Path, tmp_path: Path
) -> None:
    own = {"AutoModelForCausalLM": "modeling_prunenet.LlamaForCausalLM"}
    check_model_folder(_with_auto_map(tmp_path, tiny_model_folder, own))


@pytest.mark.parametrize(
    "auto_map",
    [
        {"AutoConfig": "modeling_prunenet.LlamaConfig"},  # our module, another auto class
        {"AutoModelForCausalLM": "someone/repo--modeling_prunenet.LlamaForCausalLM"},
        {"AutoModelForCausalLM": "modeling_prunenet.LlamaForCausalLM", "AutoModel": "x.Y"},
    ],
)
def test_entries_beyond_prunenet_own_are_refused(
    auto_map: dict, tiny_model_folder: Path, tmp_path: Path
) -> None:
    with pytest.raises(PruneNetError, match=REFUSAL):
        check_model_folder(_with_auto_map(tmp_path, tiny_model_folder, auto_map))


# ----- outputs never carry an input's remote code ------------------------------------------


def test_strip_remote_code_keeps_only_prunenet_own_entry(tmp_path: Path) -> None:
    own = {"AutoModelForCausalLM": "modeling_prunenet.LlamaForCausalLM"}
    (tmp_path / "config.json").write_text(
        json.dumps({"auto_map": {**own, "AutoConfig": "x.Y"}, "custom_pipelines": {"a": {}}})
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"auto_map": ["x.T", None]}))
    assert strip_remote_code(tmp_path) == ["config.json", "tokenizer_config.json"]
    assert json.loads((tmp_path / "config.json").read_text()) == {"auto_map": own}
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {}


def test_strip_remote_code_leaves_other_files_byte_for_byte(tmp_path: Path) -> None:
    text = '{"auto_map":{"AutoModelForCausalLM":"modeling_prunenet.LlamaForCausalLM"}}'
    (tmp_path / "config.json").write_text(text)
    (tmp_path / "broken.json").write_text("{not json")
    assert strip_remote_code(tmp_path) == []
    assert (tmp_path / "config.json").read_text() == text


def foreign_but_loadable_folder(base: Path) -> Path:
    """A tiny Llama whose config, tokenizer config and another JSON file name code of their own
    that transformers never needs (it has local classes for all of them), with that code beside
    them: what gets past the up-front check only if the check is missing."""
    folder = base / "foreign"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (folder / "foreign.py").write_text("raise RuntimeError('the foreign code ran')\n")
    for name, auto_map in [
        ("config.json", {"AutoConfig": "foreign.C", "AutoModelForCausalLM": "foreign.M"}),
        ("tokenizer_config.json", {"AutoTokenizer": [None, "foreign.T"]}),
        ("processor_config.json", {"AutoProcessor": "foreign.P"}),
    ]:
        path = folder / name
        entries = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**entries, "auto_map": auto_map}))
    return folder


@pytest.mark.parametrize("command", ["prune in memory", "prune --stream", "prune --layerwise"])
def test_prune_output_carries_no_auto_map_and_no_code_of_its_input(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_disk_cache: None
) -> None:
    # The writers' own guarantee, with the up-front refusal switched off.
    for module in (models, loading, checkpoint):
        monkeypatch.setattr(module, "check_model_folder", lambda *args: None)
    monkeypatch.setattr(models, "refuse_remote_code", lambda *args: None)
    out = tmp_path / "out"
    assert main(COMMANDS[command](foreign_but_loadable_folder(tmp_path), None, out)) == 0
    assert not list(out.glob("*.py"))
    for path in out.glob("*.json"):
        assert "auto_map" not in json.loads(path.read_text()), path.name


# ----- pickle weights are never unpickled ------------------------------------------------------


class _RunsCodeWhenUnpickled:
    """Unpickling this calls `exec` on a line that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('unpickled')",)


def pickle_folder(base: Path, also_safetensors: bool = False) -> tuple[Path, Path]:
    """A tiny Llama folder whose `pytorch_model.bin` runs code when unpickled (and, optionally,
    the same weights as safetensors beside it), and the marker that code would create."""
    folder, marker = base / "pickled", base / "unpickled"
    model = tiny_model("llama")
    if also_safetensors:
        model.save_pretrained(folder)
    else:
        model.config.save_pretrained(folder)
    torch.save({**model.state_dict(), "payload": _RunsCodeWhenUnpickled(marker)},
               folder / "pytorch_model.bin")  # fmt: skip
    return folder, marker


@pytest.mark.parametrize("extra", [["--scorer", "random"], ["--scorer", "random", "--stream"]])
def test_prune_refuses_a_folder_with_only_pickle_weights_with_exit_2(
    extra: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder, marker = pickle_folder(tmp_path)
    assert _exit_code(_prune(folder, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert "only pickle weights (pytorch_model.bin)" in err
    assert "never unpickles" in err and "safetensors" in err
    assert not marker.exists()


def test_load_model_refuses_a_folder_with_only_pickle_weights(tmp_path: Path) -> None:
    folder, marker = pickle_folder(tmp_path)
    with pytest.raises(PruneNetError, match="PruneNet never unpickles"):
        load_model(str(folder))
    assert not marker.exists()


def test_pickle_weights_beside_safetensors_are_never_read(tmp_path: Path) -> None:
    folder, marker = pickle_folder(tmp_path, also_safetensors=True)
    load_model(str(folder))
    assert not marker.exists()


def test_load_pruned_refuses_use_safetensors_false(tiny_model_folder: Path) -> None:
    with pytest.raises(PruneNetError, match="use_safetensors=False"):
        load_pruned(tiny_model_folder, use_safetensors=False)
