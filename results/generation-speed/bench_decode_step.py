"""Milliseconds per decode step of SmolLM2-135M (float32) with a 256-slot StaticCache, by batch
size: the median of 20 steps (cache positions 4-24; the attention reads all 256 slots at every
step, so later positions cost the same). Used for the idle table in docs/scale.md.

    .venv/bin/python results/generation-speed/bench_decode_step.py 2 43,64,86,128,172

Arguments: torch threads, comma-separated batch sizes. Peak RSS is the process's, cumulative
over the batches run so far.
"""

import resource
import sys
import time

import torch
from transformers import StaticCache

from prunenet.io.models import load_model

torch.set_num_threads(int(sys.argv[1]))
model, _ = load_model("smollm2-135m")
for batch in [int(b) for b in sys.argv[2].split(",")]:
    cache = StaticCache(config=model.config, max_cache_len=256)  # sized by the first call
    ids = torch.full((batch, 1), 1)
    times = []
    with torch.inference_mode():
        for pos in range(24):
            start = time.perf_counter()
            out = model(ids, past_key_values=cache, cache_position=torch.tensor([pos]),
                        use_cache=True)
            ids = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - start)
    ms = sorted(times[4:])[len(times[4:]) // 2] * 1000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"batch {batch}: {ms:.0f} ms/step, {batch / ms * 1000:.0f} tok/s, peak RSS {peak:.2f} GB")
