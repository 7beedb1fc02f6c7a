"""PruneNet: calibration-free structured pruning of LLM FFNs with a reusable RL policy."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["PruneRequest", "load_pruned", "prune"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import prunenet` (and the CLI's --help) does not pay for importing transformers.
    if name == "load_pruned":
        from prunenet.io.loading import load_pruned

        return load_pruned
    if name == "prune":
        from prunenet.runner import prune

        return prune
    if name == "PruneRequest":
        from prunenet.request import PruneRequest

        return PruneRequest
    raise AttributeError(f"module 'prunenet' has no attribute {name!r}")
