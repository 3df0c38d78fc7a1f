"""The pruner registry, the shared result type and the keep-count rule."""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx


class PrunerError(ValueError):
    """A pruner name or keep ratio that cannot be used; the message lists what is valid."""


class Pruned(NamedTuple):
    tokens: mx.array  # (B, k, D) kept or merged tokens, in their original spatial order
    indices: mx.array  # (B, k) int32, ascending: the source token each output stands at
    sources: mx.array  # (B, N) int32: the output slot each source token fed, -1 if dropped


# fn(tokens (B, N, D), k, scores (B, N) or None, grid (h, w), seed) -> Pruned; `scores` are the attention
# each token received (`needs_scores`) or its relevance to the prompt (`needs_prompt`), else None.
PrunerFn = Callable[[mx.array, int, mx.array | None, tuple[int, int], int], Pruned]


@dataclass(frozen=True)
class Pruner:
    name: str
    fn: PrunerFn
    needs_scores: bool  # needs attention received from the vision tower's last attention block
    merges: bool  # outputs are averages of several source tokens
    needs_prompt: bool = False  # needs each token's relevance to the prompt's text (instruction-aware)


PRUNERS: dict[str, Pruner] = {}


def register(name: str, needs_scores: bool = False, merges: bool = False, needs_prompt: bool = False):
    def add(fn: PrunerFn) -> PrunerFn:
        PRUNERS[name] = Pruner(name, fn, needs_scores, merges, needs_prompt)
        return fn

    return add


def get_pruner(name: str) -> Pruner:
    if name not in PRUNERS:
        raise PrunerError(f"unknown pruner {name!r}; choose one of: {', '.join(sorted(PRUNERS))}")
    return PRUNERS[name]


def check(name: str, keep_ratio: float) -> Pruner:
    """Validate a pruner name and keep ratio up front, before any expensive work."""
    keep_count(1, keep_ratio)
    return get_pruner(name)


def needs_scores(name: str | None, keep_ratio: float) -> bool:
    """Whether running `name` at `keep_ratio` needs attention scores from the vision tower.

    Never at ratio 1: nothing is pruned, so the tower keeps its fused attention."""
    return name is not None and check(name, keep_ratio).needs_scores and keep_ratio < 1


def needs_prompt(name: str | None, keep_ratio: float) -> bool:
    """Whether running `name` at `keep_ratio` needs each token's relevance to the prompt (never at ratio 1)."""
    return name is not None and check(name, keep_ratio).needs_prompt and keep_ratio < 1


def keep_count(num_tokens: int, keep_ratio: float) -> int:
    """k = max(1, round(keep_ratio * N)), for a keep ratio in (0, 1]."""
    if not isinstance(keep_ratio, int | float) or not 0 < keep_ratio <= 1:
        raise PrunerError(f"keep ratio must be in (0, 1], got {keep_ratio!r}; e.g. 0.5 keeps half the tokens")
    return max(1, round(keep_ratio * num_tokens))


def square_grid(num_tokens: int) -> tuple[int, int]:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise PrunerError(f"{num_tokens} tokens do not form a square grid; pass grid=(h, w)")
    return side, side


def identity(tokens: mx.array) -> Pruned:
    B, N, _ = tokens.shape
    positions = mx.broadcast_to(mx.arange(N, dtype=mx.int32), (B, N))
    return Pruned(tokens, positions, positions)


def prune(
    name: str,
    tokens: mx.array,
    keep_ratio: float,
    scores: mx.array | None = None,
    grid: tuple[int, int] | None = None,
    seed: int = 0,
) -> Pruned:
    """Prune tokens (B, N, D) to k = max(1, round(keep_ratio * N)) with the named method.

    `keep_ratio = 1` returns the tokens untouched. `scores` (B, N) is the attention each
    token received, needed by methods with `needs_scores`, or for methods with `needs_prompt`
    each token's relevance to the prompt (`fastvlm_mlx.features.prompt_relevance`).
    """
    pruner = get_pruner(name)
    N = tokens.shape[1]
    k = keep_count(N, keep_ratio)
    grid = grid or square_grid(N)
    if grid[0] * grid[1] != N:
        raise PrunerError(f"grid {grid} does not hold {N} tokens")
    if k == N:  # before the scores check: at ratio 1 the pipeline asks the tower for none (`needs_scores`)
        return identity(tokens)
    if (pruner.needs_scores or pruner.needs_prompt) and (scores is None or scores.shape != tokens.shape[:2]):
        what = "relevance-to-the-prompt scores" if pruner.needs_prompt else "attention scores"
        raise PrunerError(f"pruner {name!r} needs {what} of shape {tokens.shape[:2]}")
    return pruner.fn(tokens, k, scores, grid, seed)
