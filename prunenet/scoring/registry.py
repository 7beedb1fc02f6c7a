"""Scorers by name, and the right scorer for a trained checkpoint.

Kept apart from the `Scorer` base class so that the policy scorers (`prunenet.rl`) can subclass
it without an import circle: this module imports every scorer, no scorer imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prunenet.errors import PruneNetError
from prunenet.rl.checkpoint import read_metadata
from prunenet.scoring.base import Scorer
from prunenet.scoring.heuristics import MagnitudeScorer, RandomScorer, SelfGenScorer
from prunenet.scoring.ppo import PolicyScorer
from prunenet.scoring.reinforce import ReinforceScorer


def load_scorer_from_checkpoint(checkpoint: str, device: str = "cpu") -> Scorer:
    """The right scorer for a `prunenet train` checkpoint, by its metadata's `algo`.

    :param checkpoint: path of the zip; its metadata is validated first (`read_metadata`).
    :param device: where the policy runs.
    """
    algo = read_metadata(checkpoint)["algo"]
    if algo == "ppo":
        return PolicyScorer(checkpoint, device)
    if algo == "reinforce":
        return ReinforceScorer(checkpoint, device)
    raise PruneNetError(
        f"Checkpoint {checkpoint} was trained with algo {algo!r}, which this PruneNet cannot "
        "score with (known: ppo, reinforce). Re-train it with `prunenet train`."
    )


BUNDLED_POLICY = Path(__file__).resolve().parents[1] / "policies" / "smollm2-135m-ppo.zip"


def bundled_policy_scorer(seed: int = 0) -> Scorer:
    """The PPO policy that ships with PruneNet (`--scorer policy`, the default).

    Trained with `prunenet train --model smollm2-135m --timesteps 1800 --seed 0` (selfgen
    features, function reward, ratios 0.1:0.5). It is size-agnostic, so it scores any supported
    model; its quality was measured on SmolLM2-135M (docs/results.md). `seed` is unused: the
    policy's scores are deterministic and its self-generated text uses the seed it was trained with.
    """
    return PolicyScorer(str(BUNDLED_POLICY))


# CLI name -> factory taking the run's seed (scorers that ignore randomness ignore it).
SCORERS: dict[str, Callable[[int], Scorer]] = {
    MagnitudeScorer.name: lambda seed: MagnitudeScorer(),
    RandomScorer.name: RandomScorer,
    SelfGenScorer.name: SelfGenScorer,
    "policy": bundled_policy_scorer,
}


def make_scorer(name: str, seed: int = 0) -> Scorer:
    """Build a scorer by its CLI name."""
    if name not in SCORERS:
        raise PruneNetError(f"Unknown scorer {name!r}. Choose one of: {', '.join(SCORERS)}.")
    return SCORERS[name](seed)
