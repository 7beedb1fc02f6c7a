"""Scale benchmark: prune synthetic LLaMA-2-7B-shaped checkpoints with bounded memory.

For each layer count (4, 8, 16, 32 by default) this script
1. writes a random checkpoint with LLaMA-2-7B shapes (hidden 4096, FFN 11008, vocab 32000,
   32 heads) in fp16, shard by shard with safetensors (so generating it is memory-bounded too),
   in HF naming with a `model.safetensors.index.json`, in a separate process (see `generate`);
2. evicts those files from the page cache (fsync + POSIX_FADV_DONTNEED, no root needed), so the
   run reads from disk like a fresh download would;
3. runs `prunenet prune --stream` (weights only, `--path stream`) or the default path one
   layer at a time (`--layerwise`: own text, sequential policy scores, lsq refit; `--path
   layerwise`, with an empty analysis cache so the text is written too) in a subprocess and
   measures its wall time, its peak RSS
   (`ru_maxrss` from `os.wait4`, which counts touched memory-mapped file pages as well as heap,
   cross-checked with the `VmHWM` high-water mark sampled from /proc) and how the RSS splits
   into anonymous memory and mapped file pages;
4. reads the per-layer times from the run's `prunenet_report.json` (layerwise: writing the
   text, then per layer reading, cutting = scoring + refit + running the layer, and writing),
   checks the output's shapes, and deletes both folders.

Random weights are fine for a cost measurement: the work does not depend on the values.

    .venv/bin/python scripts/benchmark_scale.py                  # 4, 8, 16, 32 layers
    .venv/bin/python scripts/benchmark_scale.py --layers 4 --keep  # one small run, keep files
    .venv/bin/python scripts/benchmark_scale.py --path layerwise --layers 4,8  # default path
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prunenet.core.ratios import keep_count
from prunenet.tables import format_table, markdown_table

REPO = Path(__file__).resolve().parent.parent

HIDDEN, FFN, VOCAB, HEADS = 4096, 11008, 32000, 32
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="prunenet-scale-", dir=args.workdir))
    print(describe(args, workdir), flush=True)
    rows = []
    try:
        for layers in args.layers:
            for path in args.path:
                rows.append(run_one(args, workdir, layers, path))
                print(format_table(HEADERS, [rows[-1]]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n" + describe(args, workdir))
    print(format_table(HEADERS, rows))
    print("\n" + markdown_table(HEADERS, rows))


# "wall" is the whole subprocess, including ~10 s of Python/torch/transformers imports;
# "stream_prune" is the pruning itself as the run's report times it.
# "prune s" is the pruning itself as the run's report times it; "text s" the layerwise path's
# own-text writing (resident: the model loaded once in its dtype; streamed: every layer read at
# every token); "read / cut / write s/layer" its
# per-layer split (stream: read + score + cut of the FFN in "cut", the rest is copying).
HEADERS = ["path", "layers", "checkpoint GB", "output GB", "shards", "generate s", "wall s",
           "prune s", "s/layer", "text s", "text route", "read s/layer", "cut s/layer",
           "write s/layer", "peak RSS MB", "VmHWM MB", "peak anon MB", "peak file-mapped MB",
           "FFN rows removed", "params removed"]  # fmt: skip
PATHS = ("stream", "layerwise")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="4,8,16,32", help="comma list of layer counts")
    parser.add_argument("--ratio", type=float, default=0.3, help="fraction of FFN rows removed")
    parser.add_argument("--path", default="stream", help="comma list of: stream, layerwise")
    parser.add_argument("--scorer", default="magnitude", help="scorer of the stream path")
    parser.add_argument("--selfgen-sequences", type=int, default=8, help="layerwise own text")
    parser.add_argument("--selfgen-length", type=int, default=64, help="layerwise own text")
    parser.add_argument(
        "--compute-dtype", default=None, choices=sorted(DTYPES) + ["float32"],
        help="layerwise: compute each layer in this dtype (saved in --dtype); default --dtype",
    )  # fmt: skip
    parser.add_argument(
        "--text-route", default="auto", choices=["auto", "resident", "streamed"],
        help="layerwise: how the own text is written (prune --text-route)",
    )  # fmt: skip
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--shard-gb", type=float, default=2.0, help="max input shard size")
    parser.add_argument("--device", default="cpu", help="scoring device passed to --device")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads")
    parser.add_argument("--workdir", default=None, help="where the temp folders go")
    parser.add_argument("--no-cold", action="store_true", help="keep the files in page cache")
    parser.add_argument("--keep", action="store_true", help="do not delete the checkpoints")
    args = parser.parse_args()
    args.layers = [int(n) for n in args.layers.split(",")]
    args.path = args.path.split(",")
    if not set(args.path) <= set(PATHS):
        parser.error(f"--path takes a comma list of {', '.join(PATHS)}")
    return args


def describe(args: argparse.Namespace, workdir: Path) -> str:
    return "\n".join(
        [
            f"model: LLaMA-2-7B shapes (hidden {HIDDEN}, FFN {FFN}, vocab {VOCAB}, {HEADS} heads,"
            f" untied lm_head), random {args.dtype} weights, shards <= {args.shard_gb} GB",
            f"pruning --ratio {args.ratio}: stream = --stream --scorer {args.scorer} --device "
            f"{args.device}; layerwise = --layerwise (policy, sequential, refit lsq, computed "
            f"in {args.compute_dtype or args.dtype}) on {args.selfgen_sequences} x "
            f"{args.selfgen_length} tokens of own text (text route {args.text_route}); "
            f"{args.threads} torch/OpenMP thread(s)",
            f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
            f"{_meminfo('MemTotal') / 2**30:.0f} GiB RAM, load average "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; torch {torch.__version__}; "
            f"page cache {'warm' if args.no_cold else 'cold (input evicted before each run)'}",
            f"workdir: {workdir}",
        ]
    )


def run_one(args: argparse.Namespace, workdir: Path, layers: int, path: str) -> list:
    source = workdir / f"llama2-7b-shapes-{layers}L"
    out = workdir / f"pruned-{layers}L-{path}"
    start = time.perf_counter()
    shards = len(list(source.glob("*.safetensors")))
    if not shards:
        shards = generate(source, layers, args.dtype, args.shard_gb)
    generate_seconds = time.perf_counter() - start
    if not args.no_cold:
        evict_from_page_cache(source)
    cache = workdir / f"cache-{layers}L-{path}"  # empty: the layerwise text is written and timed
    wall, maxrss, hwm, peak_anon, peak_file = prune_in_subprocess(args, source, out, path, cache)
    report = json.loads((out / "prunenet_report.json").read_text())
    check_output(out, layers, keep_count(FFN, args.ratio))
    split = report.get("scorer", {}).get("layerwise")
    if split is None:  # stream: the FFN's read + score + cut per layer
        split = {"text_seconds": None, "cut_seconds": report["layer_seconds"]}
    row = [
        path,
        layers,
        f"{folder_bytes(source) / 1e9:.2f}",
        f"{folder_bytes(out) / 1e9:.2f}",
        shards,
        f"{generate_seconds:.0f}",
        f"{wall:.1f}",
        f"{report['seconds']:.1f}",
        f"{report['seconds'] / layers:.2f}",
        "" if split["text_seconds"] is None else f"{split['text_seconds']:.1f}",
        split.get("text_route", ""),
        *(_per_layer(split.get(f"{part}_seconds"), layers) for part in ("read", "cut", "write")),
        f"{maxrss / 2**20:.0f}",
        f"{hwm / 2**20:.0f}",
        f"{peak_anon / 2**20:.0f}",
        f"{peak_file / 2**20:.0f}",
        f"{100 * report['ffn_ratio']:.1f}%",
        f"{100 * report['params_removed_fraction']:.1f}%",
    ]
    if not args.keep:
        if path == args.path[-1]:
            shutil.rmtree(source)
        shutil.rmtree(out)
        shutil.rmtree(cache, ignore_errors=True)
    return row


def _per_layer(seconds: list[float] | None, layers: int) -> str:
    return "" if seconds is None else f"{sum(seconds) / layers:.2f}"


def generate(folder: Path, layers: int, dtype: str, shard_gb: float) -> int:
    """Write the checkpoint in a fresh interpreter and return its shard count.

    Linux carries a process's peak RSS across fork and exec into the child's `ru_maxrss`, so
    if this process held a 2 GB shard while generating, every pruning subprocess it starts
    afterwards would report at least 2 GB. Generating elsewhere keeps this process small.
    """
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(write_checkpoint, (folder, layers, DTYPES[dtype], shard_gb))


def write_checkpoint(folder: Path, layers: int, dtype: torch.dtype, shard_gb: float) -> int:
    """A Llama checkpoint in HF naming and order, one shard in memory at a time."""
    folder.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": str(dtype).removeprefix("torch."),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(0)
    limit = int(shard_gb * 1e9)
    groups: list[list[str]] = []  # tensor names of each written part, in order
    current: dict[str, torch.Tensor] = {}
    size = 0
    for name, shape in tensor_shapes(layers):
        nbytes = math.prod(shape) * dtype.itemsize
        if current and size + nbytes > limit:
            groups.append(save_part(folder, len(groups) + 1, current))
            current, size = {}, 0
        current[name] = random_tensor(name, shape, dtype, generator)
        size += nbytes
    groups.append(save_part(folder, len(groups) + 1, current))
    del current
    weight_map, total_size = {}, 0
    for number, names in enumerate(groups, start=1):
        final = folder / f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        (folder / f"part-{number}.safetensors").rename(final)
        weight_map.update({name: final.name for name in names})
        total_size += sum(math.prod(s) for n, s in tensor_shapes(layers) if n in names)
    index = {"metadata": {"total_size": total_size * dtype.itemsize}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return len(groups)


def save_part(folder: Path, number: int, tensors: dict[str, torch.Tensor]) -> list[str]:
    save_file(tensors, folder / f"part-{number}.safetensors", metadata={"format": "pt"})
    return list(tensors)


def random_tensor(name: str, shape, dtype: torch.dtype, generator) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype)
    if name.endswith("norm.weight"):
        return tensor.fill_(1.0)
    return tensor.normal_(0.0, 0.02, generator=generator)


def tensor_shapes(layers: int):
    """(name, shape) in the order `save_pretrained` writes a LlamaForCausalLM."""
    yield "model.embed_tokens.weight", (VOCAB, HIDDEN)
    for i in range(layers):
        prefix = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{prefix}.self_attn.{proj}.weight", (HIDDEN, HIDDEN)
        yield f"{prefix}.mlp.gate_proj.weight", (FFN, HIDDEN)
        yield f"{prefix}.mlp.up_proj.weight", (FFN, HIDDEN)
        yield f"{prefix}.mlp.down_proj.weight", (HIDDEN, FFN)
        yield f"{prefix}.input_layernorm.weight", (HIDDEN,)
        yield f"{prefix}.post_attention_layernorm.weight", (HIDDEN,)
    yield "model.norm.weight", (HIDDEN,)
    yield "lm_head.weight", (VOCAB, HIDDEN)


def evict_from_page_cache(folder: Path) -> None:
    """Drop these files' cached pages (only theirs), so the run reads them from disk."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def prune_in_subprocess(
    args, source: Path, out: Path, path: str, cache: Path
) -> tuple[float, int, int, int, int]:
    """Wall seconds, ru_maxrss, and the sampled VmHWM, peak anonymous and file-mapped RSS.

    All in bytes. VmHWM is the kernel's own high-water mark of the child after exec, so
    sampling cannot miss its peak; anonymous / file-mapped peaks are sampled every 50 ms.
    """
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "PRUNENET_CACHE": str(cache)}  # fmt: skip
    env.pop("PRUNENET_NO_CACHE", None)
    command = [sys.executable, "-m", "prunenet.cli", "prune", "--model", str(source),
               "--ratio", str(args.ratio), "--threads", threads, "--out", str(out)]  # fmt: skip
    if path == "stream":
        command += ["--scorer", args.scorer, "--stream", "--device", args.device]
    else:
        command += ["--layerwise", "--selfgen-sequences", str(args.selfgen_sequences),
                    "--selfgen-length", str(args.selfgen_length)]  # fmt: skip
        if args.compute_dtype:
            command += ["--compute-dtype", args.compute_dtype]
        command += ["--text-route", args.text_route]
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=REPO)
    hwm = peak_anon = peak_file = 0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        memory = _memory_status(process.pid)
        hwm = max(hwm, memory["VmHWM:"])
        peak_anon = max(peak_anon, memory["RssAnon:"])
        peak_file = max(peak_file, memory["RssFile:"])
        time.sleep(0.05)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"prune failed with exit code {process.returncode}")
    return wall, usage.ru_maxrss * 1024, hwm, peak_anon, peak_file


def check_output(out: Path, layers: int, kept: int) -> None:
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == kept, config["intermediate_size"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    expected = {"gate_proj": (kept, HIDDEN), "up_proj": (kept, HIDDEN), "down_proj": (HIDDEN, kept)}
    for layer in (0, layers - 1):
        for proj, shape in expected.items():
            name = f"model.layers.{layer}.mlp.{proj}.weight"
            with safe_open(out / index["weight_map"][name], framework="pt") as handle:
                assert tuple(handle.get_slice(name).get_shape()) == shape, name


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")


def _memory_status(pid: int) -> dict[str, int]:
    values = {"VmHWM:": 0, "RssAnon:": 0, "RssFile:": 0}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, *rest = line.split()
                if key in values:
                    values[key] = int(rest[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return values


def _meminfo(field: str) -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    main()
