"""The model card (`README.md`) of every folder PruneNet writes.

A pruned folder on a hub or in a model zoo must say what it is without PruneNet: which model it
came from, what was removed and how, the command that made it, how to load it and, once
`prunenet eval` has run on it, how good it is. The card is Hugging Face's format (YAML metadata
between `---` lines, then Markdown), so `huggingface_hub.ModelCard.load` reads it and the hub
shows `base_model`, the license and the tags.

The card is rendered from the folder's own records (`prunenet_report.json`, and the request
when there is one), never from anything the user has to retype. `prunenet eval` replaces only
the part between the two evaluation markers, and only in a card PruneNet wrote (it carries
`MARKER`); a README.md of anyone else is never touched.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CARD_FILE = "README.md"
# In every card PruneNet renders: eval only updates cards that carry it.
MARKER = "<!-- prunenet:card -->"
EVALUATION_START = "<!-- prunenet:evaluation:start -->"
EVALUATION_END = "<!-- prunenet:evaluation:end -->"
NOT_EVALUATED = (
    "Not evaluated yet. `prunenet eval --model THIS_FOLDER` measures perplexity on the "
    "built-in texts (and zero-shot accuracy with `--tasks`) and writes the numbers here."
)


def render_model_card(
    report: dict,
    *,
    source: str,
    base_model: str | None = None,
    license: str | None = None,
    command: str | None = None,
    request: dict | None = None,
    needs_remote_code: bool = False,
    recovery: dict | None = None,
) -> str:
    """The card's text for a pruned folder.

    :param report: the folder's `prunenet_report.json` content (`PruneReport.to_dict()`).
    :param source: the model the run read (`--model`: an alias, a folder or a hub id).
    :param base_model: the hub id of the model it was pruned from, when known (YAML
        `base_model`; the hub links the two).
    :param license: the source's license identifier, when known; left out otherwise (a card
        must not claim a license nobody granted).
    :param command: the command line that wrote the folder, when it came from the CLI.
    :param request: the resolved request (every option with its value), when there is one.
    :param needs_remote_code: the layers differ in width or heads, so plain transformers needs
        `trust_remote_code=True` and the folder's own modeling file.
    :param recovery: `prunenet recover`'s record, when the folder is a recovered model.
    """
    tags = ["pruned", "prunenet", "structured-pruning", str(report.get("model_type", "model"))]
    front = ["---"]
    if base_model:
        front.append(f"base_model: {_yaml_string(base_model)}")
    front.append("library_name: transformers")
    if license:
        front.append(f"license: {_yaml_string(license)}")
    front.append("pipeline_tag: text-generation")
    front.append("tags:")
    front.extend(f"- {_yaml_string(tag)}" for tag in tags)
    front.append("---")
    body = [
        MARKER,
        f"# {Path(source).name or source}, pruned with PruneNet",
        "",
        _summary(report, source, base_model),
        "",
        "## What was removed",
        "",
        *_removed_table(report),
        "",
        "## How it was made",
        "",
        "PruneNet read only the model's own weights and text the model wrote itself from its "
        "start token: no dataset, no calibration text.",
        "",
    ]
    if command:
        body += ["```bash", command, "```", ""]
    if request:
        body += ["Request (every option, defaults resolved):", "", "```json",
                 json.dumps(request, indent=2, sort_keys=True), "```", ""]  # fmt: skip
    body += ["The full record is in `prunenet_report.json` beside this card.", ""]
    if recovery:
        body += ["## Recovery", "", _recovery(recovery), ""]
    body += ["## How to load it", "", *_loading(needs_remote_code), ""]
    body += ["## Evaluation", "", EVALUATION_START, NOT_EVALUATED, EVALUATION_END, ""]
    return "\n".join(front + body)


def write_model_card(folder: str | Path, text: str) -> Path:
    """Write `text` as the folder's card (the folder is a staging folder PruneNet owns).

    :param folder: the output folder being written.
    :param text: `render_model_card`'s result.
    """
    path = Path(folder) / CARD_FILE
    path.write_text(text)
    return path


def is_prunenet_card(folder: str | Path) -> bool:
    """Whether the folder's README.md is a card PruneNet wrote (and so may be updated).

    :param folder: a model folder.
    """
    path = Path(folder) / CARD_FILE
    try:
        return path.is_file() and not path.is_symlink() and MARKER in path.read_text()
    except (OSError, UnicodeDecodeError):
        return False


def with_evaluation(card: str, evaluation_markdown: str) -> str:
    """`card` with its evaluation section replaced by `evaluation_markdown`.

    :param card: a card PruneNet rendered (it holds both evaluation markers).
    :param evaluation_markdown: the new section's body (tables, how they were measured).
    """
    pattern = re.compile(re.escape(EVALUATION_START) + r".*?" + re.escape(EVALUATION_END), re.S)
    replacement = f"{EVALUATION_START}\n{evaluation_markdown.strip()}\n{EVALUATION_END}"
    if not pattern.search(card):
        return card.rstrip("\n") + f"\n\n## Evaluation\n\n{replacement}\n"
    return pattern.sub(lambda _: replacement, card, count=1)


def evaluation_markdown(record: dict) -> str:
    """The card's evaluation section from `prunenet eval`'s JSON record
    (`prunenet.commands.eval.protocol_record`): perplexity (and KL, zero-shot) with the protocol
    that defines them.

    :param record: the record `prunenet eval --json` writes.
    """
    protocol = record.get("protocol", {})
    lines = ["| text | perplexity | KL to reference |", "|---|---|---|"]
    kl = record.get("kl") or {}
    for task, value in (record.get("perplexity") or {}).items():
        reference_kl = f"{kl[task]:.4f}" if task in kl else "-"
        lines.append(f"| {task} | {value:.3f} | {reference_kl} |")
    average = record.get("zero_shot_average")
    if average is not None:
        tasks = ", ".join(protocol.get("zero_shot_tasks", []))
        limit = protocol.get("zero_shot_limit") or "all"
        lines += ["", f"Zero-shot average accuracy: {average:.4f} ({tasks}; {limit} documents "
                      "per task)."]  # fmt: skip
    lines += [
        "",
        f"Measured by `prunenet eval` on {record.get('device', '?')} with "
        f"{record.get('threads', '?')} thread(s), {record.get('created', '')}: "
        f"{protocol.get('ppl_windows') or 'all'} windows of {protocol.get('seqlen', '?')} "
        f"tokens per text, reference {record.get('reference') or 'none'}, model dtype "
        f"{record.get('model', {}).get('dtype', '?')}.",
    ]
    return "\n".join(lines)


def _summary(report: dict, source: str, base_model: str | None) -> str:
    before, after = report.get("params_before", 0), report.get("params_after", 0)
    removed = 100 * (1 - after / before) if before else 0.0
    origin = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else source
    return (
        f"A structurally pruned version of {origin}: {before:,} -> {after:,} parameters "
        f"({removed:.1f}% removed). The weights that remain are the original ones, with the "
        "FFN output projections refitted where the report says so; the folder is a normal "
        "Hugging Face model folder."
    )


def _removed_table(report: dict) -> list[str]:
    widths = report.get("ffn_widths_after") or []
    width_text = (
        f"{widths[0]} in every layer" if len(set(widths)) == 1 else
        f"{min(widths)}-{max(widths)} (per layer: {', '.join(map(str, widths))})"
    ) if widths else "-"  # fmt: skip
    structures = report.get("structures") or {}
    scorer = report.get("scorer") or {}
    rows = [
        ("parameters", f"{report.get('params_before', 0):,} -> {report.get('params_after', 0):,}"),
        ("FFN rows removed", f"{100 * report.get('ffn_ratio', 0.0):.1f}%"),
        ("FFN width", f"{report.get('ffn_width_before', '?')} -> {width_text}"),
        ("layers dropped", ", ".join(map(str, structures.get("layers", []))) or "none"),
        ("attention heads removed", _heads(structures)),
        ("row scorer", str(scorer.get("scorer", "-"))),
        ("amount per layer", str(scorer.get("allocation", scorer.get("strategy", "-")))),
        ("refit", str((scorer.get("sequential") or {}).get("mode", scorer.get("refit", "-")))),
    ]
    return ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]


def _recovery(record: dict) -> str:
    """One paragraph on `prunenet recover`'s run (its record: `prunenet_recover_report.json`)."""
    before, after = record.get("held_out_kl_before"), record.get("held_out_kl_after")
    measured = isinstance(before, (int, float)) and isinstance(after, (int, float))
    kl = (
        f" Held-out KL to the teacher on its own text: {before:.4f} -> {after:.4f}."
        if measured
        else ""
    )
    return (
        f"After pruning, `prunenet recover` distilled the teacher "
        f"({record.get('teacher', 'the dense model')}) into this model on text the teacher "
        f"wrote itself (no dataset): {record.get('steps', '?')} steps, "
        f"{record.get('train_tokens', '?')} training tokens, on {record.get('device', '?')}."
        f"{kl} Full record: `prunenet_recover_report.json`."
    )


def _heads(structures: dict) -> str:
    query, groups = structures.get("query_heads", 0), structures.get("kv_groups", 0)
    if not query and not groups:
        return "none"
    return f"{query} query heads per KV group, {groups} KV groups"


def _loading(needs_remote_code: bool) -> list[str]:
    if not needs_remote_code:
        return [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
            'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
            "```",
        ]
    return [
        "Its layers differ in FFN width or attention heads, which transformers cannot yet "
        "build from a config alone. With PruneNet installed (no remote code runs):",
        "",
        "```python",
        "import prunenet",
        "",
        'model = prunenet.load_pruned("THIS_FOLDER")',
        "```",
        "",
        "Without PruneNet, the folder's own `modeling_prunenet.py` (torch and transformers "
        "only; read it first) builds the same model:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "",
        'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER", trust_remote_code=True)',
        "```",
    ]


def _yaml_string(value: str) -> str:
    """A YAML scalar that stays a string whatever it holds (JSON strings are valid YAML)."""
    return json.dumps(str(value))
