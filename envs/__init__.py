"""Gymnasium environments for PruneNet (registered on import)."""
