"""Gymnasium environments for PruneNet, registered on import.

`gym.make("envs:PruneNet/FFNPrune-v0", model="smollm2-135m")` imports this package and builds
the environment (Gymnasium 1.x has no plugin entry points).
"""

from gymnasium.envs.registration import register, registry

from envs.ffn_prune import FFNPruneEnv

ENV_ID = "PruneNet/FFNPrune-v0"

if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="envs.ffn_prune:FFNPruneEnv")

__all__ = ["ENV_ID", "FFNPruneEnv"]
