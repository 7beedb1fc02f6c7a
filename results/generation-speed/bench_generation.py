"""Seconds per 1k tokens and peak RSS of writing SmolLM2-135M's own text, before and after the
batched sampler (docs/scale.md, "Threads and generation speed").

Every measurement runs in its own process (peak RSS is that process's `ru_maxrss`, the model
included); `--runs` repeats each and the table shows the median. Variants:

- `old`: the sampler before (all sequences in one `generate` call, `torch.multinomial`, the
  default DynamicCache), reproduced here since the code is gone.
- `dynamic` / `static`: `prunenet.analysis.selfgen.generate_own_text` with the default
  DynamicCache or transformers' StaticCache (`cache_implementation="static"`).

    .venv/bin/python results/generation-speed/bench_generation.py --runs 2 \
        --variants old,dynamic,static --texts 64x128,256x64 --threads 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def one(variant: str, sequences: int, length: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from transformers import LogitsProcessorList

    from prunenet.analysis import selfgen
    from prunenet.io.models import load_model

    model, _ = load_model("smollm2-135m")
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    config = selfgen.SelfGenConfig(sequences=sequences, length=length, seed=0)
    begin = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with torch.no_grad():
        if variant == "old":
            start = torch.full((sequences, 1), selfgen.start_token_id(model), dtype=torch.long)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                tokens = model.generate(
                    start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0,
                    top_p=1.0, temperature=1.0, max_length=length, min_length=length,
                    pad_token_id=selfgen.start_token_id(model),
                    logits_processor=LogitsProcessorList([selfgen._RefuseNaN(torch.float32)]),
                )  # fmt: skip
        else:
            cache = {"cache_implementation": "static", "disable_compile": True}
            selfgen.GENERATE_CACHE = cache if variant == "static" else {}
            tokens = selfgen.generate_own_text(model, config)
    seconds = time.perf_counter() - begin
    after = resource.getrusage(resource.RUSAGE_SELF)
    assert tokens.shape == (sequences, length)
    return {
        "seconds": seconds,
        "s_per_1k": seconds / (sequences * (length - 1)) * 1000,
        "peak_rss_mb": after.ru_maxrss / 1024,
        "rss_loaded_mb": loaded / 1024,
        "sys_s": after.ru_stime - usage.ru_stime,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="old,dynamic,static")
    parser.add_argument("--texts", default="64x128,256x64")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # variant:SxL:threads, in a child
    args = parser.parse_args()
    if args.one:
        variant, text, threads = args.one.split(":")
        sequences, length = map(int, text.split("x"))
        print(json.dumps(one(variant, sequences, length, int(threads))))
        return
    rows = {}
    cases = [(v, t, int(n)) for t in args.texts.split(",") for n in args.threads.split(",")
             for v in args.variants.split(",")]  # fmt: skip
    for run in range(args.runs):  # alternated: each repeat walks every case once
        for variant, text, threads in cases:
            out = subprocess.run([sys.executable, __file__, "--one", f"{variant}:{text}:{threads}"],
                                 capture_output=True, text=True, check=True,
                                 env={**os.environ, "TQDM_DISABLE": "1"})  # fmt: skip
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rounded = {k: round(v, 2) for k, v in result.items()}
            case = {"run": run, "variant": variant, "text": text, "threads": threads}
            print(json.dumps({**case, **rounded}), flush=True)
            rows.setdefault((variant, text, threads), []).append(result)
    print("\n| text | threads | sampler | s / 1k tokens | peak RSS MB | sys s | runs |")
    print("|---|---|---|---|---|---|---|")
    for (variant, text, threads), results in rows.items():
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        print(f"| {text} | {threads} | {variant} | {med['s_per_1k']:.2f} | "
              f"{med['peak_rss_mb']:.0f} | {med['sys_s']:.1f} | {len(results)} |")  # fmt: skip


if __name__ == "__main__":
    main()
