#!/bin/bash
# Runs the Gemma benchmarks of issue 13 one after another, after the SmolLM2 run ends.
cd /work/main
while [ ! -f results/structures-smollm2-c/zero-shot/end_ts ]; do sleep 20; done
run() {  # $1 = out dir, rest = args
  d=$1; shift
  date +%s > $d/start_ts
  nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmark_quality.py "$@" --out-dir $d > $d/run.log 2>&1
  echo "rc=$?" >> $d/run.log
  date +%s > $d/end_ts
}
run results/structures-gemma3-zero-shot --model gemma3-270m --methods policy+seq+lsq --remove-params 0.1,0.2 --limit 50 --selfgen-sequences 64 --selfgen-length 128 --ppl-windows 8 --speed-rounds 2
[ -f results/structures-gemma3-b/STOP ] && exit 0
run results/structures-gemma3-b/layers-0.3 --model gemma3-270m --methods policy+seq+lsq+layers --remove-params 0.3 --zero-shot-tasks '' --ppl-windows 8 --speed-rounds 2 --selfgen-sequences 64 --selfgen-length 128
[ -f results/structures-gemma3-b/STOP ] && exit 0
run results/structures-gemma3-b/heads-layers-0.1-0.2 --model gemma3-270m --methods policy+seq+lsq+heads+layers --remove-params 0.1,0.2 --zero-shot-tasks '' --ppl-windows 8 --speed-rounds 2 --selfgen-sequences 64 --selfgen-length 128
