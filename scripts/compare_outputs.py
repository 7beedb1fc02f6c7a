"""Same bytes before and after a change: run `prunenet prune` commands with an earlier commit and
with this checkout, and compare every safetensors file they write.

    python scripts/compare_outputs.py --base 0fc6931 --model smollm2-135m \
        --command "--ratio 0.3" --command "--remove-params 0.2 --strategy ramp"

The earlier commit is checked out into a temporary git worktree and run with this checkout's
Python environment (its code first on PYTHONPATH). Both trees share one analysis cache, so the
model's own text is written once (by the base) and the comparison measures the cut, not the text.
Prints one line per command: SAME, or DIFF with the differing files, and each side's wall time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the earlier commit (any git revision)")
    parser.add_argument("--model", required=True, help="model folder or built-in alias")
    parser.add_argument("--command", action="append", required=True,
                        help="prune options after --model (repeatable)")  # fmt: skip
    parser.add_argument("--work", default=None, help="folder for outputs (default: a temp dir)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="prunenet-compare-"))
    base = work / "base-tree"
    if not base.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base),
                        args.base], check=True, capture_output=True)  # fmt: skip
    env = {**os.environ, "PRUNENET_CACHE": str(work / "cache")}
    print(f"base {args.base} vs this checkout; model {args.model}; outputs in {work}")
    same = True
    for index, options in enumerate(args.command):
        outputs, seconds = {}, {}
        for side, tree in (("base", base), ("this", ROOT)):
            out = work / f"{side}-{index}"
            argv = [sys.executable, "-m", "prunenet.cli", "prune", "--model", args.model,
                    *shlex.split(options), "--out", str(out), "--overwrite"]  # fmt: skip
            start = time.perf_counter()
            done = subprocess.run(argv, cwd=tree, env={**env, "PYTHONPATH": str(tree)},
                                  capture_output=True, text=True)  # fmt: skip
            seconds[side] = time.perf_counter() - start
            if done.returncode != 0:
                print(f"FAIL  {options}: {side} exited {done.returncode}\n{done.stderr[-2000:]}")
                return 1
            outputs[side] = hashes(out)
        differing = sorted(
            name for name in outputs["base"].keys() | outputs["this"].keys()
            if outputs["base"].get(name) != outputs["this"].get(name)
        )  # fmt: skip
        verdict = "SAME" if outputs["base"] and not differing else f"DIFF {differing}"
        same &= verdict == "SAME"
        print(f"{verdict:5} {options}  ({len(outputs['this'])} safetensors files; base "
              f"{seconds['base']:.1f} s, this {seconds['this']:.1f} s)")  # fmt: skip
    return 0 if same else 1


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every safetensors file under `folder`, by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*.safetensors"))
    }


if __name__ == "__main__":
    sys.exit(main())
