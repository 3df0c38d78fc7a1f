"""Visual-token pruners: pure MLX functions on FastViTHD's output tokens, and their registry.

`prune("divprune", tokens, keep_ratio=0.25)` returns `Pruned(tokens, indices, sources)`.
"""

from pruners import merging, selection  # noqa: F401  (registers the methods)
from pruners.registry import (
    PRUNERS,
    Pruned,
    Pruner,
    PrunerError,
    check,
    get_pruner,
    identity,
    keep_count,
    needs_prompt,
    needs_scores,
    prune,
)

__all__ = [
    "PRUNERS",
    "Pruned",
    "Pruner",
    "PrunerError",
    "check",
    "get_pruner",
    "identity",
    "keep_count",
    "needs_prompt",
    "needs_scores",
    "prune",
]
