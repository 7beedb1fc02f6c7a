"""Gymnasium environments for PruneNet, registered on import.

`gym.make("envs:PruneNet/FFNPrune-v0", model="smollm2-135m")` imports this package and builds
the environment (Gymnasium 1.x has no plugin entry points);
`gym.make("envs:PruneNet/Strategy-v0", context=StrategyContext(model, tokens))` the per-layer
strategy environment.
"""

from gymnasium.envs.registration import register, registry

from envs.ffn_prune import FFNPruneEnv
from envs.strategy import StrategyEnv

ENV_ID = "PruneNet/FFNPrune-v0"
STRATEGY_ENV_ID = "PruneNet/Strategy-v0"

if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="envs.ffn_prune:FFNPruneEnv")

if STRATEGY_ENV_ID not in registry:
    register(id=STRATEGY_ENV_ID, entry_point="envs.strategy:StrategyEnv")

__all__ = ["ENV_ID", "STRATEGY_ENV_ID", "FFNPruneEnv", "StrategyEnv"]
