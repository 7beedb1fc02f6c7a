"""Which folders of a several-folder run count as finished for a request (`prunenet.io.resume`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunenet.errors import PruneNetError
from prunenet.io.resume import difference_from, finished_line, folders_to_write
from prunenet.io.saving import REPORT_FILE, REQUEST_FILE

RECORD = {
    "model": "smollm2-135m",
    "request": {"ratio": [0.2], "seed": 0, "threads": 1},
    "command": "prunenet prune --model smollm2-135m --ratio 0.2,0.4 --out out",
    "versions": {"prunenet": "0.1.0"},
}


def _finished(folder: Path, record: dict = RECORD, weights: str = "model.safetensors") -> Path:
    folder.mkdir(parents=True)
    for name in ("config.json", REPORT_FILE):
        (folder / name).write_text("{}")
    (folder / REQUEST_FILE).write_text(json.dumps(record))
    (folder / weights).write_bytes(b"weights")
    return folder


def test_a_folder_with_the_same_request_is_complete(tmp_path: Path) -> None:
    assert difference_from(_finished(tmp_path / "ratio-0.20"), RECORD) is None


def test_another_command_line_or_thread_count_is_the_same_request(tmp_path: Path) -> None:
    other = {**RECORD, "command": "prunenet prune ... --threads 4",
             "request": {**RECORD["request"], "threads": 4}}  # fmt: skip
    assert difference_from(_finished(tmp_path / "ratio-0.20", other), RECORD) is None


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"model": "other-model"}, "made from model 'other-model'"),
        ({"request": {**RECORD["request"], "seed": 3}}, "seed 3 there, 0 now"),
        ({"versions": {"prunenet": "0.0.9"}}, "another PruneNet version"),
    ],
)
def test_a_folder_of_another_request_is_not_complete(
    tmp_path: Path, change: dict, said: str
) -> None:
    folder = _finished(tmp_path / "ratio-0.20", {**RECORD, **change})
    assert said in difference_from(folder, RECORD)


def test_a_folder_without_its_weights_is_not_complete(tmp_path: Path) -> None:
    folder = _finished(tmp_path / "ratio-0.20")
    (folder / "model.safetensors").unlink()
    assert difference_from(folder, RECORD) == "its weights are missing"


def test_sharded_weights_count_only_with_every_shard(tmp_path: Path) -> None:
    folder = _finished(tmp_path / "ratio-0.20", weights="model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}  # fmt: skip
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert difference_from(folder, RECORD) == "its weights are missing"
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"weights")
    assert difference_from(folder, RECORD) is None


def test_a_link_to_a_complete_folder_is_not_complete(tmp_path: Path) -> None:
    (tmp_path / "ratio-0.20").symlink_to(_finished(tmp_path / "elsewhere"))
    assert difference_from(tmp_path / "ratio-0.20", RECORD) == "not a folder"


def test_folders_to_write_skips_complete_ones_and_keeps_absent_ones(tmp_path: Path) -> None:
    folders = [_finished(tmp_path / "ratio-0.20"), tmp_path / "ratio-0.40"]
    assert folders_to_write(folders, [RECORD, RECORD], overwrite=False) == [1]


def test_an_incomplete_folder_is_refused_without_overwrite_and_replaced_with_it(
    tmp_path: Path,
) -> None:
    folder = _finished(tmp_path / "ratio-0.20", {**RECORD, "model": "other-model"})
    with pytest.raises(PruneNetError, match="not this request's finished output"):
        folders_to_write([folder], [RECORD], overwrite=False)
    assert folders_to_write([folder], [RECORD], overwrite=True) == [0]


def test_a_folder_of_other_files_is_refused_even_with_overwrite(tmp_path: Path) -> None:
    folder = tmp_path / "ratio-0.20"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(PruneNetError, match="never replaces other folders"):
        folders_to_write([folder], [RECORD], overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine"


def test_the_interruption_line_names_finished_and_unwritten_folders(tmp_path: Path) -> None:
    folders = [_finished(tmp_path / "ratio-0.20"), tmp_path / "ratio-0.40"]
    line = finished_line(folders, [RECORD, RECORD])
    assert f"(complete, kept): {folders[0]}; not written: {folders[1]}." in line
    assert "Rerun the same command to resume" in line
