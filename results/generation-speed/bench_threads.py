"""1 vs 2 (or more) torch threads for the two kinds of work a prune run spends its time on: a
SmolLM2-135M decoder layer's forward on 32 x 256 tokens (generation, capture, the cut's layer
runs) and a float32 1536 x 1536 Gram of 16k rows (the statistics and the refit), each with the
machine as it is and with a competing process busy on one core (docs/scale.md, "Threads and
generation speed").

Each case runs in its own process; the table shows the median of `--repeats` timings per
process and of `--runs` processes, with the 1-minute load average at the start.

    .venv/bin/python results/generation-speed/bench_threads.py --threads 1,2 --runs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BUSY = "import torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\nwhile True: a @ a\n"


def measure(threads: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from prunenet.core.arch import decoder_layers
    from prunenet.io.models import load_model

    model, _ = load_model("smollm2-135m")
    layer = decoder_layers(model)[0]
    hidden = torch.randn(32, 256, model.config.hidden_size)
    positions = torch.arange(256).expand(32, 256)
    rotary = model.model.rotary_emb(hidden, positions)
    rows = torch.randn(16384, 1536)

    def timed(work) -> float:
        work()  # warm
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            work()
            times.append(time.perf_counter() - begin)
        return statistics.median(times)

    with torch.no_grad():
        forward = timed(lambda: layer(hidden, position_embeddings=rotary))
        gram = timed(lambda: rows.T @ rows)
    return {"layer_s": forward, "gram_s": gram}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # threads, in a child
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.repeats)))
        return
    rows: dict = {}
    for run in range(args.runs):
        for condition in ("as is", "1 core busy"):
            busy = None
            if condition != "as is":
                busy = subprocess.Popen([sys.executable, "-c", BUSY])
                time.sleep(2)
            try:
                for threads in map(int, args.threads.split(",")):
                    load = os.getloadavg()[0]
                    out = subprocess.run(
                        [sys.executable, __file__, "--one", str(threads), "--repeats",
                         str(args.repeats)],
                        capture_output=True, text=True, check=True,
                    )  # fmt: skip
                    result = {**json.loads(out.stdout.strip().splitlines()[-1]), "load": load}
                    print(json.dumps({"run": run, "condition": condition, "threads": threads,
                                      **result}), flush=True)  # fmt: skip
                    rows.setdefault((condition, threads), []).append(result)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    print("\n| machine | threads | layer forward 32x256 s | Gram 16k x 1536 s | load avg |")
    print("|---|---|---|---|---|")
    for (condition, threads), results in rows.items():
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        print(f"| {condition} | {threads} | {med['layer_s']:.3f} | {med['gram_s']:.3f} | "
              f"{med['load']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
