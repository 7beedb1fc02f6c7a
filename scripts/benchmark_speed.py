"""Prune speed side by side: this working tree against a base commit, cold and warm cache.

Runs `prunenet prune --model MODEL COMMAND` as a child process for each side (`base`: a
temporary `git worktree` of --base; `new`: a copy of this working tree taken at the start,
uncommitted and untracked files included, so edits made meanwhile are not measured),
same Python and packages, and measures each run alone: wall seconds, user and system CPU
seconds and peak RSS (`os.wait4` on the child), the stage breakdown its
`prunenet_report.json` records (load, own text and whether it was generated or read from the
cache, cut, save; "n/a" for a side that does not record it) and, with --eval, perplexity on
the three evaluation texts (`prunenet eval`, 16 windows of 512 tokens, the same evaluator for
both sides). Cold = a fresh empty PRUNENET_CACHE; warm = a second run on the cache its cold
run filled (each side has its own cache, since their texts may differ). Sides alternate, and
their order flips every repeat. Prints Markdown tables (medians, then every run) under a
header saying how it was measured, and the ratios new/base of wall time and peak RSS:

    python scripts/benchmark_speed.py --base HEAD --out-dir results/speed   # default command
    python scripts/benchmark_speed.py --no-base --modes cold --no-eval     # this tree alone

An alias model (`smollm2-135m`) is converted once before the runs (not timed; the cold cache
is the analysis cache, not the converted weights).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prunenet.errors import PruneNetError
from prunenet.evaluation.perplexity import DEFAULT_PPL_WINDOWS, DEFAULT_SEQLEN, PPL_TASKS
from prunenet.io.models import ALIASES, resolve_model_path
from prunenet.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
MODES = ("cold", "warm")
REPORT_FILE = "prunenet_report.json"
REQUEST_FILE = "prunenet_request.json"
# The child runs the CLI of the tree PYTHONPATH names, and refuses to run another tree's
# (an editable install elsewhere would otherwise be measured instead).
LAUNCH = (
    "import importlib.util, os, sys\n"
    "found = getattr(importlib.util.find_spec('prunenet'), 'origin', None) or 'nowhere'\n"
    "tree = os.path.realpath(os.environ['PRUNENET_BENCH_TREE'])\n"
    "if not os.path.realpath(found).startswith(tree + os.sep):\n"
    "    sys.exit(f'benchmark_speed: prunenet would come from {found}, not {tree}')\n"
    "from prunenet.cli import main\n"
    "sys.exit(main())\n"
)


class RunFailed(Exception):
    """A child run exited non-zero (its log tail is the message)."""


@dataclass
class Run:
    """One timed `prunenet prune` child.

    :param index: 1-based order of the run.
    :param repeat: 1-based repeat.
    :param side: `base` or `new`.
    :param mode: `cold`, `warm`, or `fill` (an untimed cache fill for warm-only benchmarks).
    """

    index: int
    repeat: int
    side: str
    mode: str
    argv: list[str] = field(default_factory=list)
    out: str = ""
    log: str = ""
    wall_seconds: float = 0.0
    user_seconds: float = 0.0
    system_seconds: float = 0.0
    peak_rss_bytes: int = 0
    stages: dict[str, float] | None = None
    stage_peak_mb: dict[str, float] | None = None
    text: str | None = None
    cut_parts: dict[str, float] | None = None
    report_seconds: float | None = None
    threads: int | None = None
    folders: list[str] = field(default_factory=list)
    weights_sha256: str | None = None
    perplexity: dict[str, float] | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias or local model folder")
    parser.add_argument(
        "--command",
        default="--ratio 0.3",
        help="the prune arguments after `prunenet prune` (--model and --out are added)",
    )
    base = parser.add_mutually_exclusive_group(required=True)
    base.add_argument("--base", help="the commit to compare with (any git revision)")
    base.add_argument("--no-base", action="store_true", help="measure this working tree alone")
    parser.add_argument("--modes", default="cold,warm", help="cold, warm or cold,warm")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side and mode")
    parser.add_argument(
        "--threads", type=int, default=None, help="--threads for every prune (default: theirs)"
    )
    parser.add_argument(
        "--eval",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="perplexity of every distinct output on the three texts (default: on)",
    )
    parser.add_argument("--ppl-windows", type=int, default=DEFAULT_PPL_WINDOWS)
    parser.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN)
    parser.add_argument(
        "--out-dir",
        default=None,
        help="keep the outputs, logs, JSON and Markdown here (absent or empty; default: a "
        "temporary folder, removed)",
    )
    return parser.parse_args(argv)


# ----- checks, before any run -----------------------------------------------------------------


def git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if done.returncode:
        raise PruneNetError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def resolve_base(rev: str) -> str:
    """The full commit id of `rev`, or a clear error."""
    done = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if done.returncode or not done.stdout.strip():
        raise PruneNetError(
            f"--base {rev!r} is not a commit of {ROOT}; give a revision git knows (HEAD, "
            "HEAD~1, a hash, a branch)."
        )
    return done.stdout.strip()


def parse_modes(text: str) -> list[str]:
    modes = [part.strip() for part in text.split(",") if part.strip()]
    if not modes or any(mode not in MODES for mode in modes) or len(set(modes)) != len(modes):
        raise PruneNetError(f"--modes {text!r}: give cold, warm or cold,warm.")
    return [mode for mode in MODES if mode in modes]  # cold first: warm reads what it filled


def parse_command(text: str, threads: int | None) -> list[str]:
    """The prune arguments, checked against this tree's parser (a typo exits 2 now)."""
    try:
        command = shlex.split(text)
    except ValueError as error:
        raise PruneNetError(f"--command {text!r}: {error}") from None
    for token in command:
        if token.split("=")[0] in ("--model", "--out"):
            raise PruneNetError(f"--command must not name {token.split('=')[0]}: it is added.")
        if threads is not None and token.split("=")[0] == "--threads":
            raise PruneNetError("Give --threads once: to the benchmark or in --command.")
    if threads is not None:
        command += ["--threads", str(threads)]
    from prunenet.cli import build_parser

    try:
        build_parser().parse_args(["prune", "--model", "m", "--out", "o", *command])
    except SystemExit:  # argparse said what is wrong on stderr
        raise PruneNetError(f"--command {text!r} is refused by `prunenet prune`.") from None
    return command


def check_base_options(commit: str, command: list[str]) -> None:
    """Refuse an option the base's `prunenet prune` does not have (read from its sources at
    `commit`, without checking it out), so a new option fails before the new side runs."""
    text = subprocess.run(
        ["git", "-C", str(ROOT), "grep", "-h", "-o", "-E", "['\"]--[a-z0-9-]+['\"]", commit,
         "--", "prunenet/commands", "prunenet/cli.py"],
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    known = {line.split(":")[-1].strip("'\"") for line in text.splitlines()}
    if not known:  # a layout this check does not know: the base run says it, at once
        return
    for token in command:
        if not token.startswith("--"):
            continue
        name = token.split("=")[0]
        plain = "--" + name.removeprefix("--no-")
        if not any(option.startswith(name) or option == plain for option in known):
            raise PruneNetError(
                f"--command uses {name}, which `prunenet prune` at base {commit[:10]} does not "
                "have; choose a command both sides take, or another --base."
            )


def resolve_model(spec: str) -> Path:
    """A local model folder (an alias converted now, untimed)."""
    if spec not in ALIASES and not (Path(spec).expanduser() / "config.json").is_file():
        raise PruneNetError(
            f"--model {spec!r} is neither a local model folder (with config.json) nor a "
            f"built-in alias ({', '.join(ALIASES)})."
        )
    return Path(resolve_model_path(spec)).resolve()


def prepare_out_dir(text: str | None) -> Path | None:
    if text is None:
        return None
    out = Path(text).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PruneNetError(f"--out-dir {out} exists and is not an empty folder; choose a new one.")
    out.mkdir(parents=True, exist_ok=True)
    return out


# ----- measuring --------------------------------------------------------------------------------


def child_env(tree: Path, cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PRUNENET_NO_CACHE", None)  # cold and warm are about the cache
    env.update(PYTHONPATH=str(tree), PRUNENET_CACHE=str(cache), PRUNENET_BENCH_TREE=str(tree))
    return env


def measure(run: Run, tree: Path, cache: Path) -> None:
    """Run `run.argv` in `tree` with `cache`; fill the run's resource use (this child alone)."""
    argv = [sys.executable, "-P", "-c", LAUNCH, *run.argv]
    start = time.perf_counter()
    with open(run.log, "wb") as log:
        child = subprocess.Popen(argv, env=child_env(tree, cache), stdout=log, stderr=log)
        _, status, usage = os.wait4(child.pid, 0)
    run.wall_seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    run.user_seconds, run.system_seconds = usage.ru_utime, usage.ru_stime
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    run.peak_rss_bytes = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    if child.returncode:
        tail = Path(run.log).read_text(errors="replace").strip().splitlines()[-15:]
        raise RunFailed(
            f"{run.side} {run.mode} run exited {child.returncode} (log {run.log}):\n"
            + "\n".join(tail)
        )
    read_outputs(run)


def read_outputs(run: Run) -> None:
    """Stages and weights of a finished run's output folder(s)."""
    reports = sorted(Path(run.out).rglob(REPORT_FILE))
    run.folders = [str(path.parent) for path in reports]
    digest = hashlib.sha256()
    for folder in run.folders:
        for path in sorted(Path(folder).glob("*.safetensors")):
            with open(path, "rb") as weights:
                for block in iter(lambda: weights.read(1 << 24), b""):
                    digest.update(block)
    run.weights_sha256 = digest.hexdigest()
    if not reports:
        return
    request = reports[0].parent / REQUEST_FILE  # the threads it ran with, where recorded
    if request.is_file():
        run.threads = (json.loads(request.read_text()).get("request") or {}).get("threads")
    data = [json.loads(path.read_text()) for path in reports]
    run.report_seconds = sum(report.get("seconds") or 0.0 for report in data)
    stages = [report.get("stages") or {} for report in data]
    if all(stage.get("seconds") for stage in stages):
        # load, text and the like are done once per run and repeated in every folder's report.
        seconds = dict(stages[0]["seconds"])
        for stage in ("cut", "save"):
            seconds[stage] = sum(s["seconds"].get(stage, 0.0) for s in stages)
        run.stages, run.text = seconds, stages[0].get("text")
        # The last folder's report holds the whole run's high-water marks.
        run.stage_peak_mb = stages[-1].get("peak_rss_mb")
    parts: dict[str, float] = {}
    for report in data:
        logged = ((report.get("scorer") or {}).get("sequential") or {}).get("seconds")
        for name, value in (logged if isinstance(logged, dict) else {}).items():
            total = sum(value) if isinstance(value, list) else value
            if isinstance(total, int | float):
                parts[name] = parts.get(name, 0.0) + total
    run.cut_parts = parts or None


def evaluate(folder: str, out: Path, args: argparse.Namespace, tree: Path) -> dict[str, float]:
    """Perplexity on the three texts, `prunenet eval`'s protocol, with `tree`'s code."""
    json_path = out / "eval.json"
    threads = args.threads or os.cpu_count() or 1
    argv = [sys.executable, "-P", "-c", LAUNCH, "eval", "--model", folder,
            "--tasks", ",".join(PPL_TASKS), "--ppl-windows", str(args.ppl_windows),
            "--seqlen", str(args.seqlen), "--speed-rounds", "0", "--threads", str(threads),
            "--no-update-card", "--json", str(json_path)]  # fmt: skip
    with open(out / "eval.log", "wb") as log:
        done = subprocess.run(argv, env=child_env(tree, out / "cache"), stdout=log, stderr=log)
    if done.returncode:
        raise RunFailed(f"prunenet eval of {folder} exited {done.returncode} (log {out}/eval.log)")
    return json.loads(json_path.read_text())["perplexity"]


def snapshot(folder: Path) -> Path:
    """A copy of this working tree's files as they are now (tracked and untracked, not
    ignored), so that edits made while the benchmark runs are not measured halfway."""
    names = git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for name in filter(None, names):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is listed too
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
    return folder


def schedule(sides: list[str], modes: list[str], repeats: int) -> list[tuple[int, str, str]]:
    """(repeat, side, mode) in run order: per repeat, each mode for every side (a side's warm
    run after its cold one), the sides' order flipped every repeat."""
    order = []
    for repeat in range(1, repeats + 1):
        turn = sides if repeat % 2 else sides[::-1]
        for mode in modes:
            order += [(repeat, side, mode) for side in turn]
    return order


def benchmark(args: argparse.Namespace, work: Path, out_dir: Path | None) -> dict:
    modes = parse_modes(args.modes)
    if args.repeats < 1:
        raise PruneNetError("--repeats must be at least 1.")
    if args.threads is not None and args.threads < 1:
        raise PruneNetError("--threads must be at least 1.")
    base = None if args.no_base else resolve_base(args.base)
    command = parse_command(args.command, args.threads)
    if base is not None:
        check_base_options(base, command)
    model = resolve_model(args.model)
    header = describe(args, model, command, base)
    trees = {"new": snapshot(work / "new-tree")}
    if base is not None:
        trees["base"] = work / "base-tree"
        git("worktree", "add", "--detach", str(trees["base"]), base)
    sides = [side for side in ("base", "new") if side in trees]
    runs_dir = (out_dir or work) / "runs"
    caches: dict[str, Path] = {}
    plan = schedule(sides, modes, args.repeats)
    if "cold" not in modes:  # warm alone: each side fills its cache once first
        plan = [(0, side, "fill") for side in sides] + plan
    runs = []
    for index, (repeat, side, mode) in enumerate(plan, start=1):
        if mode != "warm":
            caches[side] = work / f"cache-{side}-{index}"
            caches[side].mkdir()
        folder = runs_dir / f"{index:02d}-{side}-{mode}"
        folder.mkdir(parents=True)
        run = Run(index, repeat, side, mode, out=str(folder / "model"), log=str(folder / "log"))
        run.argv = ["prune", "--model", str(model), *command, "--out", run.out]
        print(f"[{index}/{len(plan)}] {side} {mode} (repeat {repeat}): started", file=sys.stderr,
              flush=True)  # fmt: skip
        measure(run, trees[side], caches[side])
        print(
            f"[{index}/{len(plan)}] {side} {mode}: {run.wall_seconds:.1f} s wall, "
            f"{run.user_seconds:.1f} s user, {run.system_seconds:.1f} s sys, peak RSS "
            f"{run.peak_rss_bytes / 1e9:.2f} GB",
            file=sys.stderr,
            flush=True,
        )
        runs.append(run)
    if args.eval:
        evaluate_runs(runs, args, work, trees["new"])
    return {"header": header, "runs": [asdict(run) for run in runs]}


def evaluate_runs(runs: list[Run], args: argparse.Namespace, work: Path, tree: Path) -> None:
    """Each distinct output once (equal weights give equal perplexities), by `tree`'s eval."""
    done: dict[str, dict[str, float]] = {}
    for run in runs:
        if run.mode == "fill" or not run.folders:
            continue
        if run.weights_sha256 not in done:
            print(f"evaluating {run.folders[0]} ({run.side} {run.mode})", file=sys.stderr,
                  flush=True)  # fmt: skip
            out = work / f"eval-{run.index}"
            out.mkdir()
            done[run.weights_sha256] = evaluate(run.folders[0], out, args, tree)
        run.perplexity = done[run.weights_sha256]


# ----- the header and the tables ----------------------------------------------------------------


def describe(args: argparse.Namespace, model: Path, command: list[str], base: str | None) -> dict:
    import torch

    head = git("rev-parse", "HEAD")
    # Changed and untracked files the snapshot holds beside HEAD (`snapshot`).
    changed = [line[3:] for line in git("status", "--porcelain").splitlines()]
    cpu = "unknown CPU"
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "model": args.model,
        "model_folder": str(model),
        "command": shlex.join(["prunenet", "prune", "--model", args.model, *command]),
        "threads": args.threads,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "load_average_at_start": list(os.getloadavg()),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "base": {"commit": base, "subject": git("log", "-1", "--format=%s", base)}
        if base
        else None,
        "new": {
            "commit": head,
            "changed_files": changed,
            "subject": git("log", "-1", "--format=%s", head),
        },  # fmt: skip
        "modes": parse_modes(args.modes),
        "repeats": args.repeats,
        "eval": {"tasks": list(PPL_TASKS), "windows": args.ppl_windows, "seqlen": args.seqlen}
        if args.eval
        else None,
    }


def short(subject: str, width: int = 72) -> str:
    return subject if len(subject) <= width else subject[: width - 3] + "..."


def header_lines(header: dict) -> list[str]:
    base = header["base"]
    new = header["new"]
    threads = header["threads"] or "each side's default"
    load = " ".join(f"{value:.2f}" for value in header["load_average_at_start"])
    lines = [
        f"`{header['command']}` ({header['model_folder']}), threads: {threads}"
        + (f", OMP_NUM_THREADS={header['omp_num_threads']}" if header["omp_num_threads"] else ""),
        f"{header['cpu']}, {header['cores']} logical cores ({header['cores_usable']} usable); "
        f"load average at start {load}; {header['date']}; Python {header['python']}, torch "
        f"{header['torch']}",
        f"new: the working tree as it was at the start: {new['commit'][:10]} "
        f"({short(new['subject'])}) + {len(new['changed_files'])} changed or new file(s)",
    ]
    if base:
        lines.append(f"base: {base['commit'][:10]} ({short(base['subject'])})")
    lines.append(
        f"{', '.join(header['modes'])}; {header['repeats']} repeat(s), sides alternated (order "
        "flipped every repeat); cold = empty PRUNENET_CACHE, warm = the cache its cold run "
        "filled; wall, user/sys CPU and peak RSS of each prune process alone (wait4)"
    )
    if header["eval"]:
        lines.append(
            f"perplexity: `prunenet eval` (this tree) on {', '.join(header['eval']['tasks'])}, "
            f"{header['eval']['windows']} windows x {header['eval']['seqlen']} tokens"
        )
    return lines


STAGES = ("load", "text", "cut", "save")
HEADERS = ["side", "mode", "runs", "threads", "wall s", "user s", "sys s", "peak RSS GB", "load s",
           "text s", "cut s", "cut parts s", "save s", "other s", *PPL_TASKS]  # fmt: skip


def seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def row(side: str, mode: str, runs: list[dict], label: str) -> list[str]:
    """One table row: medians over `runs` (one run: its own numbers)."""
    staged = [run for run in runs if run["stages"]]

    def stage(name: str) -> str:
        values = [run["stages"][name] for run in staged if name in run["stages"]]
        text = seconds(median(values)) if values else "n/a"
        if name == "text" and values:
            sources = sorted({run["text"] for run in staged})
            text += f" ({'/'.join(sources)})"
        return text

    parts = "n/a"
    logged = [run["cut_parts"] for run in runs if run["cut_parts"]]
    if logged:
        parts = " / ".join(
            f"{name} {seconds(median([p[name] for p in logged if name in p]))}"
            for name in logged[0]
        )
    other = [run["wall_seconds"] - sum(run["stages"].values()) for run in staged]
    ppl = []
    for task in PPL_TASKS:
        values = [run["perplexity"][task] for run in runs if run["perplexity"]]
        ppl.append(f"{median(values):.3f}" if values else "n/a")
    threads = sorted({str(run["threads"] or "n/a") for run in runs})
    return [
        side,
        mode,
        label,
        "/".join(threads),
        seconds(median([run["wall_seconds"] for run in runs])),
        seconds(median([run["user_seconds"] for run in runs])),
        seconds(median([run["system_seconds"] for run in runs])),
        f"{median([run['peak_rss_bytes'] for run in runs]) / 1e9:.2f}",
        stage("load"),
        stage("text"),
        stage("cut"),
        parts,
        stage("save"),
        seconds(median(other)) if len(staged) == len(runs) else "n/a",
        *ppl,
    ]


def ratios(record: dict) -> list[str]:
    """new/base of median wall and peak RSS per mode, and whether the weights agree."""
    lines = []
    runs = [run for run in record["runs"] if run["mode"] != "fill"]
    for mode in record["header"]["modes"]:
        by_side = {
            side: [run for run in runs if run["side"] == side and run["mode"] == mode]
            for side in ("base", "new")
        }
        if not by_side["base"] or not by_side["new"]:
            continue
        wall = {s: median([r["wall_seconds"] for r in by_side[s]]) for s in by_side}
        rss = {s: median([r["peak_rss_bytes"] for r in by_side[s]]) for s in by_side}
        hashes = {s: {r["weights_sha256"] for r in by_side[s]} for s in by_side}
        same = hashes["base"] == hashes["new"] and len(hashes["new"]) == 1
        lines.append(
            f"{mode}: new/base wall {wall['new'] / wall['base']:.2f}x "
            f"({seconds(wall['new'])} s vs {seconds(wall['base'])} s), peak RSS "
            f"{rss['new'] / rss['base']:.2f}x; output weights {'the same' if same else 'differ'}"
        )
    return lines


def render(record: dict) -> str:
    runs = record["runs"]
    summary = []
    for side in ("base", "new"):
        for mode in record["header"]["modes"]:
            chosen = [run for run in runs if run["side"] == side and run["mode"] == mode]
            if chosen:
                summary.append(row(side, mode, chosen, str(len(chosen))))
    every = [row(run["side"], run["mode"], [run], f"#{run['index']} r{run['repeat']}")
             for run in runs]  # fmt: skip
    every_headers = ["side", "mode", "run", *HEADERS[3:]]
    parts = [
        "# Prune speed: " + record["header"]["command"],
        "",
        *(f"- {line}" for line in header_lines(record["header"])),
        "",
        "Medians:",
        "",
        markdown_table(HEADERS, summary),
        "",
        *(f"- {line}" for line in ratios(record)),
        "",
        "Every run (`other` = wall minus the recorded stages: start-up, imports, checks):",
        "",
        markdown_table(every_headers, every),
        "",
        "Peak RSS (MB) of each run when each stage ended (a high-water mark: the stage where it "
        "rises set the peak):",
        "",
        *(
            f"- {run['side']} {run['mode']} #{run['index']} r{run['repeat']}: "
            + ", ".join(f"{name} {value:,.0f}" for name, value in run["stage_peak_mb"].items())
            for run in runs
            if run.get("stage_peak_mb")
        ),
    ]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="prunenet-speed-"))
    base_tree = work / "base-tree"
    try:
        out_dir = prepare_out_dir(args.out_dir)
        record = benchmark(args, work, out_dir)
    except PruneNetError as error:
        print(f"benchmark_speed: {error}", file=sys.stderr)
        return 2
    except RunFailed as error:
        print(f"benchmark_speed: {error}", file=sys.stderr)
        return 1
    finally:
        if base_tree.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(base_tree)], capture_output=True)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)
    text = render(record)
    print(text)
    if out_dir is not None:
        (out_dir / "benchmark_speed.json").write_text(json.dumps(record, indent=2) + "\n")
        (out_dir / "benchmark_speed.md").write_text(text)
        print(f"wrote {out_dir / 'benchmark_speed.json'} and {out_dir / 'benchmark_speed.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
