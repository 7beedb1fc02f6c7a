"""What `--overwrite` may replace, command by command: a folder PruneNet wrote, nothing of the
user's. Each refusal exits 2 before the model is read (the model paths here do not exist)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunenet.cli import main

MISSING_MODEL = "/no/such/model"


def _exit_code(*argv: str) -> int:
    try:
        return main(list(argv))
    except SystemExit as exit_:
        return exit_.code


def _users_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "thesis.tex").write_text("my thesis")
    return path


def _prune(out: str, *extra: str) -> int:
    return _exit_code("prune", "--model", MISSING_MODEL, "--ratio", "0.5", "--scorer", "random",
                      "--out", out, "--overwrite", *extra)  # fmt: skip


def _recover(out: str) -> int:
    return _exit_code("recover", "--model", MISSING_MODEL, "--teacher", MISSING_MODEL,
                      "--out", out, "--overwrite")  # fmt: skip


def _pareto(out: str) -> int:
    return _exit_code("pareto", "--model", MISSING_MODEL, "--remove-params", "0.2",
                      "--strategies", "uniform", "--out", out, "--overwrite")  # fmt: skip


COMMANDS = {"prune": _prune, "recover": _recover, "pareto": _pareto}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("out", ["", ".", "./"])
def test_overwrite_of_the_current_folder_exits_2_and_keeps_its_files(
    command: str, out: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    work = _users_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    assert COMMANDS[command](out) == 2
    error = capsys.readouterr().err
    assert "--out is empty" in error if out == "" else "the current folder" in error
    assert sorted(p.name for p in work.iterdir()) == ["thesis.tex"]


@pytest.mark.parametrize("command", COMMANDS)
def test_overwrite_of_a_folder_of_other_files_exits_2_and_keeps_them(
    command: str, tmp_path: Path, capsys
) -> None:
    out = _users_folder(tmp_path / "repo")
    assert COMMANDS[command](str(out)) == 2
    assert "--overwrite never replaces other folders" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


@pytest.mark.parametrize("command", COMMANDS)
def test_overwrite_of_a_regular_file_exits_2_and_keeps_it(
    command: str, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "thesis.tex"
    out.write_text("my thesis")
    assert COMMANDS[command](str(out)) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert out.read_text() == "my thesis"


def test_overwrite_of_the_home_folder_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    home = _users_folder(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert _prune("~") == 2
    assert "the home folder" in capsys.readouterr().err
    assert sorted(p.name for p in home.iterdir()) == ["thesis.tex"]


def test_overwrite_of_a_folder_above_the_current_one_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    parent = _users_folder(tmp_path / "parent")
    (parent / "config.json").write_text("{}")  # even one that looks like a model folder
    monkeypatch.chdir(_users_folder(parent / "child"))
    assert _prune("..") == 2
    assert "a folder above the current one" in capsys.readouterr().err
    assert (parent / "child" / "thesis.tex").read_text() == "my thesis"


def test_overwrite_of_root_exits_2(capsys) -> None:
    assert _prune("/") == 2
    assert "the root folder" in capsys.readouterr().err


def test_a_245_character_out_name_exits_2_before_the_model_is_read(tmp_path: Path, capsys) -> None:
    code = _exit_code("prune", "--model", MISSING_MODEL, "--ratio", "0.5", "--scorer", "random",
                      "--out", str(tmp_path / ("m" * 245)))  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err
    assert "at most 236 bytes" in error and "does not exist" not in error


def test_a_dangling_symlink_out_exits_2_before_the_model_is_read(tmp_path: Path, capsys) -> None:
    (tmp_path / "out").symlink_to(tmp_path / "missing-target")
    code = _exit_code("prune", "--model", MISSING_MODEL, "--ratio", "0.5", "--scorer", "random",
                      "--out", str(tmp_path / "out"))  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err
    assert "missing-target, which does not exist" in error
    assert "appeared while this run was working" not in error
