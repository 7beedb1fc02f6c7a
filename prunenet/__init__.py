"""PruneNet: calibration-free structured pruning of LLM FFNs with a reusable RL policy."""

__version__ = "0.1.0"
