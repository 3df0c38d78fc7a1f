"""Visual-token pruners: pure MLX functions on FastViTHD's output tokens, and their registry.

    from pruners import prune
    kept = prune("divprune", tokens, keep_ratio=0.25)  # kept.tokens (B, k, D)
"""

from pruners import merging, selection  # noqa: F401  (registers the methods)
from pruners.registry import PRUNERS, Pruned, Pruner, PrunerError, get_pruner, keep_count, prune

__all__ = ["PRUNERS", "Pruned", "Pruner", "PrunerError", "get_pruner", "keep_count", "prune"]
