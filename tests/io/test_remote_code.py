"""Pruned folders whose layers differ load with plain transformers, on a machine without PruneNet.

PruneNet's folder writer puts `modeling_prunenet.py` and an `auto_map` entry into such folders
(prunenet/io/remote_code.py), so `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)` builds them with torch and transformers alone. The loads run in one
child interpreter in which `import prunenet` fails (one torch + transformers start-up for every
folder keeps the module fast); the parent compares its logits with the in-memory pruned models.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.dynamic_module_utils import get_imports

from prunenet import load_pruned
from prunenet.core.compress import prune_model
from prunenet.core.config_fields import ffn_width, ffn_widths, head_shapes
from prunenet.core.depth import drop_layers
from prunenet.core.ratios import uniform_keep
from prunenet.io import modeling_prunenet
from prunenet.io.remote_code import MODELING_FILE, STRUCTURE_KEY
from prunenet.io.saving import save_model_folder, save_pruned
from tests.conftest import ALL_MODEL_TYPES, logits_of, sample_input_ids, tiny_model, tiny_tokenizer
from tests.core.test_depth import pruned_unevenly as four_layers_pruned_unevenly
from tests.io.test_loading import heads_unevenly, prune_unevenly

# Per-layer FFN widths for every adapter (the issue names llama, qwen2, gemma3, gpt2, phi3, opt:
# Linear, Conv1D and fused gate/up layouts), and per-layer head counts (with uneven FFN widths)
# for GQA models with separate and fused q/k/v projections and a multimodal one.
FFN_CASES = ALL_MODEL_TYPES
HEAD_CASES = ["llama", "qwen2", "phi3", "gemma3"]
DEPTH_CASE = "llama-layer-dropped"
MARKED = "llama-marked"  # a copy of the llama folder whose modeling file carries a marker
MARKER = "\nLOADED_FROM_THE_FOLDER = True\n"
NEW_TOKENS = 4

CHILD = """
import json, sys, traceback
sys.modules["prunenet"] = None  # this interpreter behaves as if PruneNet were not installed
try:
    import prunenet
except ImportError:
    prunenet_importable = False
else:
    prunenet_importable = True
import torch
import transformers
from transformers import AutoModelForCausalLM

job = json.loads(open(sys.argv[1]).read())
input_ids = torch.load(job["input_ids"])
mask = torch.ones_like(input_ids)
tensors, facts = {}, {}

def load(case, folder):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    module = sys.modules[type(model).__module__]
    with torch.no_grad():
        logits = model(input_ids).logits
    generated = model.generate(
        input_ids, attention_mask=mask, max_new_tokens=job["new_tokens"], do_sample=False
    )
    again = folder + "-saved-again"
    model.save_pretrained(again)
    reloaded = AutoModelForCausalLM.from_pretrained(again, trust_remote_code=True)
    with torch.no_grad():
        again_logits = reloaded(input_ids).logits
    tensors[case] = {"logits": logits, "generated": generated, "again_logits": again_logits}
    facts[case] = {
        "class": type(model).__name__,
        "is_transformers_class": isinstance(model, getattr(transformers, type(model).__name__)),
        "module_file": module.__file__,
        "marker": getattr(module, "LOADED_FROM_THE_FOLDER", False),
    }


for case, folder in job["folders"].items():
    try:
        load(case, folder)
    except Exception:  # one broken case must not hide the others
        facts[case] = {"error": traceback.format_exc()}
facts["prunenet_importable"] = prunenet_importable
facts["prunenet_modules"] = sorted(
    name for name, module in sys.modules.items()
    if name.split(".")[0] == "prunenet" and module is not None
)
torch.save(tensors, job["tensors"])
open(job["facts"], "w").write(json.dumps(facts))
"""


def pruned_cases() -> dict[str, Callable[[], PreTrainedModel]]:
    cases = {model_type: (lambda t=model_type: prune_unevenly(t)[0]) for model_type in FFN_CASES}
    for model_type in HEAD_CASES:
        cases[f"{model_type}-heads"] = lambda t=model_type: heads_unevenly(t, ffn="after")
    cases[DEPTH_CASE] = widths_then_a_layer_dropped
    return cases


def widths_then_a_layer_dropped() -> PreTrainedModel:
    """A four-layer Llama with uneven FFN widths whose widest layer is then dropped."""
    model = four_layers_pruned_unevenly([21, 24, 15, 18])
    drop_layers(model, [1])
    return model


@pytest.fixture(scope="module")
def loads(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every case pruned, saved with PruneNet's writer, and loaded in a child without PruneNet.

    :return: per case, the in-memory model's logits and greedy tokens ("expected"), what the
        child computed ("tensors") and observed ("facts"), the folders, and the modules cache.
    """
    root = tmp_path_factory.mktemp("remote-code")
    input_ids = sample_input_ids()
    expected, folders = {}, {}
    for case, build in pruned_cases().items():
        folders[case] = root / case
        expected[case] = save_and_expect(build(), folders[case], input_ids)
    folders[MARKED] = root / MARKED
    shutil.copytree(folders["llama"], folders[MARKED])
    with open(folders[MARKED] / MODELING_FILE, "a") as file:
        file.write(MARKER)
    tensors, facts = load_without_prunenet(root, folders, input_ids)
    return {
        "expected": expected,
        "tensors": tensors,
        "facts": facts,
        "folders": folders,
        "modules_cache": root / "hf-modules",
    }


def save_and_expect(model, folder: Path, input_ids: torch.Tensor) -> dict:
    """Save `model` as PruneNet does and return what a reload must reproduce: its logits on
    `input_ids` and its greedy continuation of them."""
    save_model_folder(model, tiny_tokenizer(), folder, {})
    with torch.no_grad():
        generated = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    return {"logits": logits_of(model, input_ids), "generated": generated}


def load_without_prunenet(
    root: Path, folders: dict[str, Path], input_ids: torch.Tensor
) -> tuple[dict, dict]:
    """Load every folder with `trust_remote_code=True` in one child interpreter where `import
    prunenet` fails (`CHILD`), its modules cache under root / "hf-modules".

    :return: per case, what the child computed (logits, greedy tokens, logits after saving and
        loading again) and what it observed (or the error it hit); the facts also say whether
        PruneNet was importable there.
    """
    torch.save(input_ids, root / "input_ids.pt")
    job = {
        "folders": {case: str(folder) for case, folder in folders.items()},
        "input_ids": str(root / "input_ids.pt"),
        "new_tokens": NEW_TOKENS,
        "tensors": str(root / "tensors.pt"),
        "facts": str(root / "facts.json"),
    }
    (root / "job.json").write_text(json.dumps(job))
    (root / "child.py").write_text(CHILD)
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(root / "hf-modules"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "OMP_NUM_THREADS": "1",
    }
    # -I: no current folder or PYTHONPATH on sys.path, so nothing finds the checkout by accident.
    child = subprocess.run(
        [sys.executable, "-I", str(root / "child.py"), str(root / "job.json")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr[-4000:]
    tensors = torch.load(root / "tensors.pt", weights_only=True)
    return tensors, json.loads((root / "facts.json").read_text())


def loaded(loads: dict, case: str) -> dict:
    """What the child computed for `case`, after checking that it loaded at all."""
    assert "error" not in loads["facts"][case], loads["facts"][case]["error"]
    return loads["tensors"][case]


@pytest.mark.parametrize("case", FFN_CASES)
def test_per_layer_ffn_widths_load_without_prunenet_with_identical_logits(case, loads):
    assert torch.equal(loaded(loads, case)["logits"], loads["expected"][case]["logits"])


@pytest.mark.parametrize("case", [f"{model_type}-heads" for model_type in HEAD_CASES])
def test_per_layer_head_counts_load_without_prunenet_with_identical_logits(case, loads):
    assert torch.equal(loaded(loads, case)["logits"], loads["expected"][case]["logits"])


def test_per_layer_widths_after_dropping_a_layer_load_without_prunenet(loads):
    logits = loaded(loads, DEPTH_CASE)["logits"]
    assert torch.equal(logits, loads["expected"][DEPTH_CASE]["logits"])


def test_the_child_could_not_import_prunenet(loads):
    assert loads["facts"]["prunenet_importable"] is False
    assert loads["facts"]["prunenet_modules"] == []


def test_the_modeling_file_is_run_from_the_folder(loads):
    loaded(loads, MARKED)
    facts = loads["facts"][MARKED]
    assert facts["marker"] is True  # only the folder's copy of the file has the marker
    assert Path(facts["module_file"]).is_relative_to(loads["modules_cache"])
    assert loads["facts"]["llama"]["marker"] is False


@pytest.mark.parametrize("case", ["llama", "gemma3", "gpt2", "phi3-heads"])
def test_the_loaded_model_is_the_transformers_class(case, loads):
    loaded(loads, case)
    facts = loads["facts"][case]
    assert facts["is_transformers_class"] is True
    config = json.loads((loads["folders"][case] / "config.json").read_text())
    assert facts["class"] == config["architectures"][0]


@pytest.mark.parametrize("case", ["llama", "gemma3", "gpt2", "phi3-heads"])
def test_generate_gives_the_in_memory_models_tokens(case, loads):
    assert torch.equal(loaded(loads, case)["generated"], loads["expected"][case]["generated"])


@pytest.mark.parametrize("case", ["llama", "gemma3", "gpt2", "phi3-heads"])
def test_save_pretrained_of_the_loaded_model_loads_the_same_way_again(case, loads):
    assert torch.equal(loaded(loads, case)["again_logits"], loads["expected"][case]["logits"])
    first = loads["folders"][case]
    again = first.with_name(f"{case}-saved-again")
    assert (again / MODELING_FILE).read_bytes() == (first / MODELING_FILE).read_bytes()
    first_config = json.loads((first / "config.json").read_text())
    assert without_dtypes(json.loads((again / "config.json").read_text())) == without_dtypes(
        first_config
    )


def without_dtypes(config: dict) -> dict:
    """config.json without `dtype` entries: from_pretrained also records the loading dtype in
    sub-configs (Gemma3's text and vision configs), with or without the modeling file."""
    return {
        key: without_dtypes(value) if isinstance(value, dict) else value
        for key, value in config.items()
        if key != "dtype"
    }


def test_config_json_maps_the_auto_class_to_the_folders_file(loads):
    config = json.loads((loads["folders"]["gpt2"] / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_prunenet.GPT2LMHeadModel"}
    structure = config[STRUCTURE_KEY]
    assert structure["build"] == {"n_inner": 61}  # widest layer: 64 - 3
    assert structure["tensors"]["transformer.h.1.mlp.c_fc.weight"] == [16, 57]  # Conv1D: in x out


def test_the_folders_file_is_prunenets_template_and_imports_only_torch_and_transformers(loads):
    written = loads["folders"]["phi3-heads"] / MODELING_FILE
    assert written.read_bytes() == Path(modeling_prunenet.__file__).read_bytes()
    assert set(get_imports(written)) <= {"__future__", "typing", "torch", "transformers"}


def test_a_uniform_folder_is_exactly_what_save_pretrained_writes(tmp_path):
    model = tiny_model("qwen2")
    scores = [torch.rand(ffn_width(model.config))] * 2
    report = prune_model(model, scores, uniform_keep(ffn_widths(model.config), 0.25))
    save_pruned(model, None, tmp_path / "pruned", report)
    model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "pruned" / MODELING_FILE).exists()
    written = (tmp_path / "pruned" / "config.json").read_text()
    assert written == (tmp_path / "plain" / "config.json").read_text()
    assert "auto_map" not in json.loads(written)


def test_load_pruned_still_loads_these_folders_without_remote_code(loads):
    reloaded = load_pruned(loads["folders"]["llama-heads"])
    assert type(reloaded).__module__.startswith("transformers.models.")
    assert torch.equal(logits_of(reloaded), loads["expected"]["llama-heads"]["logits"])
    assert [(s.num_heads, s.num_kv_heads) for s in head_shapes(reloaded.config)] == [(4, 2), (2, 1)]
    # Built without the file, so the model must not save a folder that points at one.
    assert not hasattr(reloaded.config, "auto_map")
    assert not hasattr(reloaded.config, STRUCTURE_KEY)


def test_plain_from_pretrained_without_trust_remote_code_still_refuses(loads):
    # transformers prefers its own class unless asked for the folder's code.
    with pytest.raises(RuntimeError, match="per-layer attribute|mismatch"):
        AutoModelForCausalLM.from_pretrained(loads["folders"]["qwen2"])


def test_saving_a_load_pruned_model_with_prunenet_writes_the_file_again(loads, tmp_path):
    first = loads["folders"]["phi3-heads"]
    save_model_folder(load_pruned(first), None, tmp_path / "again", {})
    assert (tmp_path / "again" / MODELING_FILE).read_bytes() == (first / MODELING_FILE).read_bytes()
    first_config = json.loads((first / "config.json").read_text())
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == first_config


def test_the_file_refuses_a_checkpoint_with_missing_weights(loads, tmp_path):
    # The class is used from PruneNet's template here: the same code, without a child process.
    folder = tmp_path / "llama"
    shutil.copytree(loads["folders"]["llama"], folder)
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="randomly initialised"):
        modeling_prunenet.LlamaForCausalLM.from_pretrained(folder)


def test_the_file_refuses_a_config_without_its_structure_block():
    config = tiny_model("llama").config
    with pytest.raises(ValueError, match="load_pruned"):
        modeling_prunenet.LlamaForCausalLM(config)


def test_the_file_names_only_transformers_model_classes():
    with pytest.raises(AttributeError):
        modeling_prunenet.AutoConfig  # noqa: B018 - a transformers name, but not a model class


# ----- an input's remote code never reaches an output ------------------------------------------

# The input's code, beside the output's files: it fails loudly if anything resolves it.
FOREIGN_CODE = "raise RuntimeError('the input model\\'s own remote code ran')\n"
FOREIGN_AUTO_MAP = {
    "AutoConfig": "foreign.ForeignConfig",
    "AutoModelForCausalLM": "foreign.ForeignModel",
    "AutoTokenizer": [None, "someone/repo--foreign.ForeignTokenizer"],
}

LOAD_WITH_TRUST = """
import sys
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
folder = sys.argv[1]
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
print(type(config).__module__, type(model).__module__, type(tokenizer).__module__)
"""


@pytest.fixture(scope="module")
def output_of_foreign_input(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A per-layer-width model whose config and tokenizer carry an input's `auto_map`, saved by
    PruneNet's writer, with the input's code placed beside it; then loaded with
    `trust_remote_code=True` in a child (offline, so a hub reference fails loudly too).

    :return: the folder and the child's output (the modules of config, model and tokenizer).
    """
    folder = tmp_path_factory.mktemp("foreign") / "out"
    model, _ = prune_unevenly("llama")
    model.config.auto_map = dict(FOREIGN_AUTO_MAP)
    tokenizer = tiny_tokenizer()
    tokenizer.init_kwargs["auto_map"] = {"AutoTokenizer": FOREIGN_AUTO_MAP["AutoTokenizer"]}
    save_model_folder(model, tokenizer, folder, {})
    (folder / "foreign.py").write_text(FOREIGN_CODE)
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(folder.parent / "hf-modules"),
        "HF_HUB_OFFLINE": "1",
    }
    child = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_WITH_TRUST, str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-4000:]
    return folder, child.stdout


def test_per_layer_width_output_keeps_only_prunenet_own_auto_map_entry(output_of_foreign_input):
    folder, _ = output_of_foreign_input
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_prunenet.LlamaForCausalLM"}
    assert "auto_map" not in json.loads((folder / "tokenizer_config.json").read_text())


def test_output_of_a_foreign_input_loads_with_trust_remote_code_without_its_code(
    output_of_foreign_input,
):
    _, modules = output_of_foreign_input
    config_module, model_module, tokenizer_module = modules.split()
    assert config_module.startswith("transformers.models.llama")
    assert model_module.endswith(".modeling_prunenet")  # PruneNet's own file, nothing else
    assert tokenizer_module.startswith("transformers.")
