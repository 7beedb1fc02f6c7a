"""Time one `prunenet prune` request against N requests in one run (issue 14's target: 64
folders in at most 3x the wall time of one request).

Both runs are the real command in a subprocess, with the same options, the same cached
self-generated text (written first, untimed, if it is not cached yet) and the same threads:

    one request:  prunenet prune --model M --remove-params B --out OUT/single
    N requests:   prunenet prune --model M --requests OUT/requests.txt --out OUT/many

The second run shares one analysis of the dense model (`--many-analysis shared`, the default
here; prune itself cuts each request on its own unless asked); `--many-analysis sequential`
times the per-request path instead. Each wall time
runs from starting the process to its exit: loading the model, the analysis, every cut and
every save. The N folders are really written; each appears only complete (atomic writes), so a
watcher records when each appears, checks its report (parameters removed >= its budget) and,
with `--delete-written` (automatic when the disk cannot hold all N), deletes it then, keeping
the `--keep` budgets. The machine's load (1-minute load average, before, during and after) is
printed with the figures, and everything goes to OUT/benchmark.json.

    python scripts/benchmark_requests.py --model smollm2-135m --requests 64 --out-dir /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPORT = "prunenet_report.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budget", type=float, default=0.2, help="the single request's budget")
    parser.add_argument("--requests", type=int, default=64, help="N, the requests of the batch")
    parser.add_argument("--first", type=float, default=0.05, help="the batch's smallest budget")
    parser.add_argument("--step", type=float, default=0.005, help="between the batch's budgets")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--selfgen-sequences", type=int, default=None, help="default: prune's")
    parser.add_argument("--selfgen-length", type=int, default=None, help="default: prune's")
    parser.add_argument(
        "--many-analysis",
        default="shared",
        choices=("shared", "sequential"),
        help="--analysis of the batch run (default shared)",
    )
    parser.add_argument("--keep", default="0.1,0.2,0.3", help="batch budgets whose folders stay")
    parser.add_argument("--delete-written", choices=("auto", "yes", "no"), default="auto")
    parser.add_argument("--skip-single", action="store_true", help="time the batch only")
    parser.add_argument("--out-dir", required=True, type=Path)
    args = parser.parse_args()

    budgets = [round(args.first + i * args.step, 6) for i in range(args.requests)]
    if budgets[0] <= 0 or budgets[-1] >= 1:
        parser.error(f"budgets {budgets[0]}..{budgets[-1]} leave (0, 1)")
    keep = {round(float(b), 6) for b in args.keep.split(",") if b}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    common = ["--model", args.model, "--threads", str(args.threads)]
    if args.selfgen_sequences:
        common += ["--selfgen-sequences", str(args.selfgen_sequences)]
    if args.selfgen_length:
        common += ["--selfgen-length", str(args.selfgen_length)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    prunenet = [str(Path(sys.executable).with_name("prunenet"))]

    text_seconds = write_text(args, env)
    print(f"text: cached (making sure took {text_seconds:.1f} s, untimed)", flush=True)
    results: dict = {"protocol": protocol(args, budgets, common)}

    if not args.skip_single:
        single = args.out_dir / "single"
        shutil.rmtree(single, ignore_errors=True)
        command = [*prunenet, "prune", *common, "--remove-params", str(args.budget),
                   "--out", str(single)]  # fmt: skip
        results["single"] = timed(command, env, args.out_dir / "single.log")
        results["single"]["report"] = summary(single / REPORT, args.budget)
        print(f"one request ({args.budget}): {results['single']['wall_s']:.1f} s", flush=True)

    many = args.out_dir / "many"
    shutil.rmtree(many, ignore_errors=True)
    requests = args.out_dir / "requests.txt"
    requests.write_text("".join(f"{b}\n" for b in budgets))
    command = [*prunenet, "prune", *common, "--requests", str(requests), "--out", str(many)]
    command += ["--analysis", args.many_analysis]
    delete = args.delete_written == "yes" or (
        args.delete_written == "auto" and not room_for(args.model, budgets, args.out_dir)
    )
    watcher = Watcher(many, budgets, keep, delete)
    watcher.start()
    results["many"] = timed(command, env, args.out_dir / "many.log")
    watcher.finish()
    results["many"].update(watcher.record())
    print_figures(results, args)
    (args.out_dir / "benchmark.json").write_text(json.dumps(results, indent=2))
    ok = results["many"]["returncode"] == 0 and watcher.count == len(budgets)
    return 0 if ok else 1


def write_text(args, env) -> float:
    """Write (or find cached) the model's own text with prune's settings, outside the timing."""
    code = (
        "import sys, torch; torch.set_num_threads(int(sys.argv[2]));"
        "from prunenet.analysis.selfgen import SelfGenConfig;"
        "from prunenet.analysis.sequential import ANALYSIS_SELFGEN, analysis_text;"
        "from prunenet.io.models import load_model;"
        "m, _ = load_model(sys.argv[1], dtype='auto', device='cpu');"
        "n = int(sys.argv[3]) or ANALYSIS_SELFGEN.sequences;"
        "l = int(sys.argv[4]) or ANALYSIS_SELFGEN.length;"
        "analysis_text(m, SelfGenConfig(sequences=n, length=l, seed=0))"
    )
    start = time.perf_counter()
    sizes = [str(args.selfgen_sequences or 0), str(args.selfgen_length or 0)]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    command = [sys.executable, "-c", code, args.model, str(args.threads), *sizes]
    subprocess.run(command, env=env, check=True, **quiet)
    return time.perf_counter() - start


def timed(command: list[str], env: dict, log: Path) -> dict:
    """Run `command`, its output to `log`; wall, CPU and load average around it."""
    load_before = os.getloadavg()[0]
    samples: list[float] = []
    usage = os.times()
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        while process.poll() is None:
            samples.append(os.getloadavg()[0])
            time.sleep(5)
    wall = time.perf_counter() - start
    after = os.times()
    return {
        "command": " ".join(command),
        "returncode": process.returncode,
        "wall_s": wall,
        "cpu_s": (after.children_user - usage.children_user)
        + (after.children_system - usage.children_system),
        "load_1min_before": load_before,
        "load_1min_during_mean": sum(samples) / max(len(samples), 1),
        "load_1min_after": os.getloadavg()[0],
    }


class Watcher(threading.Thread):
    """Counts each request's folder when it appears (complete: writes are atomic), checks its
    report, and deletes it when asked (except the kept budgets)."""

    def __init__(self, out: Path, budgets, keep, delete: bool) -> None:
        super().__init__(daemon=True)
        self.out, self.budgets, self.keep, self.delete = out, budgets, keep, delete
        self.seen: dict[str, float] = {}
        self.reports: dict[str, dict] = {}
        self.start_time = time.perf_counter()
        self._done = threading.Event()

    @property
    def count(self) -> int:
        return len(self.seen)

    def run(self) -> None:
        while not self._done.is_set():
            self.scan()
            time.sleep(0.2)

    def finish(self) -> None:
        self._done.set()
        self.join()
        self.scan()

    def scan(self) -> None:
        if not self.out.is_dir():
            return
        for folder in sorted(self.out.iterdir()):
            name = folder.name
            if name in self.seen or not name.startswith("params-") or not folder.is_dir():
                continue
            self.seen[name] = time.perf_counter() - self.start_time
            budget = float(name.removeprefix("params-"))
            self.reports[name] = summary(folder / REPORT, budget)
            if self.delete and round(budget, 6) not in self.keep:
                shutil.rmtree(folder)

    def record(self) -> dict:
        times = sorted(self.seen.values())
        return {
            "folders_written": self.count,
            "folders_deleted_after_writing": self.delete,
            "first_folder_s": times[0] if times else None,
            "last_folder_s": times[-1] if times else None,
            "budgets_met": all(r["met"] for r in self.reports.values()),
            "reports": self.reports,
        }


def summary(report: Path, budget: float) -> dict:
    """What a folder's report says about its budget."""
    data = json.loads(report.read_text())
    removed = data["params_before"] - data["params_after"]
    fraction = removed / data["params_before"]
    met = fraction >= budget - 1e-12
    analysis = data["scorer"].get("analysis")
    return {"budget": budget, "params_removed": removed, "fraction": fraction, "met": met,
            "analysis": analysis}  # fmt: skip


def room_for(model: str, budgets, out_dir: Path) -> bool:
    """Whether the disk holds every folder at once (dense size x (1 - budget), float32 guess
    from the model folder's safetensors)."""
    from prunenet.io.models import resolve_model_path

    folder = Path(resolve_model_path(model))
    dense = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    need = sum(dense * (1 - b) for b in budgets) * 1.1
    return shutil.disk_usage(out_dir).free > need


def protocol(args, budgets, common) -> dict:
    import torch

    import prunenet

    return {
        "model": args.model,
        "single_budget": args.budget,
        "batch_budgets": budgets,
        "options": common,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "prunenet": getattr(prunenet, "__version__", "?"),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def print_figures(results: dict, args) -> None:
    many = results["many"]
    print(f"model {args.model}; options {' '.join(results['protocol']['options'])}; "
          f"{results['protocol']['cpus']} CPUs; text cached before both runs")  # fmt: skip
    rows = []
    if "single" in results:
        s = results["single"]
        rows.append(("1 request", s["wall_s"], s["cpu_s"], s["load_1min_during_mean"], 1))
    rows.append((f"{args.requests} requests", many["wall_s"], many["cpu_s"],
                 many["load_1min_during_mean"], many["folders_written"]))  # fmt: skip
    print(f"{'run':<14} {'wall s':>9} {'cpu s':>9} {'load (1 min, mean)':>19} {'folders':>8}")
    for name, wall, cpu, load, folders in rows:
        print(f"{name:<14} {wall:>9.1f} {cpu:>9.1f} {load:>19.2f} {folders:>8}")
    print(f"first folder after {many['first_folder_s']:.1f} s, last after "
          f"{many['last_folder_s']:.1f} s; budgets met: {many['budgets_met']}; folders deleted "
          f"after writing: {many['folders_deleted_after_writing']}")  # fmt: skip
    if "single" in results:
        ratio = many["wall_s"] / results["single"]["wall_s"]
        print(f"ratio {args.requests} requests / 1 request: {ratio:.2f}x (target <= 3x)")
        results["ratio"] = ratio


if __name__ == "__main__":
    sys.exit(main())
