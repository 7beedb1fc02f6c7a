"""`prunenet prune --requests FILE` with many budgets: one shared analysis, one folder each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.modeling_utils import PreTrainedModel

from prunenet.analysis.shared import SHARED_HINT_REQUESTS
from prunenet.cli import main
from prunenet.io.saving import REPORT_FILE
from tests.conftest import FFN_WIDTH, NUM_LAYERS, tiny_model

pytestmark = pytest.mark.usefixtures("no_disk_cache")

BUDGETS = (0.05, 0.1, 0.15, 0.2)
LINES = "\n".join(map(str, BUDGETS))


def _prune(model: Path, out: Path, *extra: str) -> int:
    argv = ["prune", "--model", str(model), "--out", str(out), "--selfgen-sequences", "8",
            "--selfgen-length", "12"]  # fmt: skip
    try:
        return main([*argv, *extra])
    except SystemExit as exit_:
        return exit_.code


def _requests(tmp_path: Path, text: str) -> str:
    path = tmp_path / "requests.txt"
    path.write_text(text)
    return str(path)


def _weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def test_many_requests_share_one_analysis_and_meet_every_budget(
    tiny_model_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    file = _requests(tmp_path, LINES)
    assert _prune(tiny_model_folder, out, "--requests", file, "--analysis", "shared") == 0
    dense = tiny_model("llama").num_parameters()
    row = 3 * (2 * 16 + 1)  # parameters of one FFN row with the refit's biases (16 = hidden)
    for budget in BUDGETS:
        folder = out / f"params-{budget:.2f}"
        report = json.loads((folder / REPORT_FILE).read_text())
        assert report["scorer"]["analysis"] == "shared"
        split = report["structures"]
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
        removed = dense - reloaded.num_parameters()
        assert removed == split["params_removed"]
        # At least the budget, and at most one FFN row per layer more.
        assert budget * dense <= removed + 0.5 < budget * dense + NUM_LAYERS * row
        assert report["scorer"]["shared"]["mode"] == "lsq"


def test_each_shared_request_equals_the_same_request_alone(
    tiny_model_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "many"
    file = _requests(tmp_path, json.dumps(BUDGETS))
    assert _prune(tiny_model_folder, out, "--requests", file, "--analysis", "shared") == 0
    # A middle request (cut from a copy) and the last one (cut in place).
    for budget in (BUDGETS[1], BUDGETS[-1]):
        alone = tmp_path / f"alone-{budget}"
        code = _prune(
            tiny_model_folder, alone, "--remove-params", str(budget), "--analysis", "shared"
        )
        assert code == 0
        shared, single = _weights(out / f"params-{budget:.2f}"), _weights(alone)
        assert shared.keys() == single.keys()
        for name, tensor in single.items():
            assert tensor.equal(shared[name]), name
        assert single["model.layers.0.mlp.down_proj.weight"].shape[1] < FFN_WIDTH


def test_few_requests_keep_the_sequential_path(tiny_model_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _prune(tiny_model_folder, out, "--requests", _requests(tmp_path, "0.1\n0.2\n")) == 0
    report = json.loads((out / "params-0.10" / REPORT_FILE).read_text())
    assert report["scorer"]["analysis"] == "sequential"


def test_many_requests_are_cut_sequentially_unless_shared_is_asked_for(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # Shared costs code perplexity at every measured budget, so it is a hint, not a default.
    assert len(BUDGETS) >= SHARED_HINT_REQUESTS
    out = tmp_path / "out"
    assert _prune(tiny_model_folder, out, "--requests", _requests(tmp_path, LINES)) == 0
    assert (
        '--analysis shared ("analysis": "shared" in --config) answers all of them'
        in capsys.readouterr().err
    )
    for budget in BUDGETS:
        report = json.loads((out / f"params-{budget:.2f}" / REPORT_FILE).read_text())
        assert report["scorer"]["analysis"] == "sequential"


def test_few_requests_get_no_hint(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert _prune(tiny_model_folder, out, "--requests", _requests(tmp_path, "0.1\n0.2\n")) == 0
    assert "--analysis shared" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no budgets"),
        ("# nothing\n\n", "holds no budgets"),
        ("0.1\n1.5\n", "1.5"),
        ("0.1\nhalf\n", "half"),
        ("0.1\n0.1\n", "more than once"),
        ("[0.1, ", "not a JSON list"),
        ('[{"budget": 0.1}]', "holds no budgets"),
    ],
)
def test_a_bad_requests_file_exits_2_before_the_model_is_read(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, text, message
) -> None:
    assert _prune(tiny_model_folder, tmp_path / "out", "--requests", _requests(tmp_path, text)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--structures", "ffn,layers"), "--structures ffn --strategy uniform"),
        (("--strategy", "ramp"), "--structures ffn --strategy uniform"),
        (("--stream",), "drop --route stream"),
    ],
)
def test_shared_analysis_refuses_what_it_cannot_cut_before_any_work(
    tiny_model_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra, message
) -> None:
    code = _prune(tiny_model_folder, tmp_path / "out", "--remove-params", "0.1", "--analysis",
                  "shared", *extra)  # fmt: skip
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_crash_while_saving_one_request_leaves_only_the_complete_folders(
    tiny_model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = PreTrainedModel.save_pretrained
    saves = []

    def crash_on_the_third(self, folder, *args, **kwargs):
        saves.append(folder)
        real_save(self, folder, *args, **kwargs)
        if len(saves) == 3:
            raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash_on_the_third)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        _prune(tiny_model_folder, out, "--requests", _requests(tmp_path, LINES), "--analysis",
               "shared")  # fmt: skip
    # The two requests saved before stay, complete; the third left no folder and no staging.
    assert sorted(p.name for p in out.iterdir()) == ["params-0.05", "params-0.10"]
    assert all((out / name / REPORT_FILE).is_file() for name in ("params-0.05", "params-0.10"))
