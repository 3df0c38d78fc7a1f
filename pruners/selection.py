"""Pruners that keep a subset of the tokens unchanged."""

import mlx.core as mx

from pruners.ops import cosine_similarity, select, top_k_sorted
from pruners.registry import Pruned, register

_MASK32 = 0xFFFFFFFF


@register("norm")
def norm(tokens: mx.array, k: int, scores, grid, seed) -> Pruned:
    """The k tokens with the largest L2 norm."""
    return select(tokens, top_k_sorted(mx.linalg.norm(tokens, axis=-1), k))


@register("attention", needs_scores=True)
def attention(tokens: mx.array, k: int, scores: mx.array, grid, seed) -> Pruned:
    """Top-k of attention received: the k tokens that receive the most attention in the tower's
    last attention block, averaged over heads and queries.

    ATS-style (Fayyaz et al. 2022, arXiv 2111.15667), not ATS itself: ATS samples tokens by
    their CLS-attention-weighted significance (inverse-transform sampling, adaptive count);
    FastViTHD has no CLS token, and this keeps a fixed k deterministically.
    """
    return select(tokens, top_k_sorted(scores, k))


def hash_scores(num_tokens: int, seed: int) -> mx.array:
    """(N,) uint32 pseudo-random scores: a bijective integer hash of (seed, token position).

    Integer arithmetic only, so the PyTorch baseline reproduces it bit for bit; a bijection,
    so scores never tie.
    """
    x = mx.arange(num_tokens, dtype=mx.uint32) ^ mx.array((seed * 0x9E3779B9 + 0x632BE5AB) & _MASK32, dtype=mx.uint32)
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B)):  # "lowbias32"
        x = (x ^ (x >> shift)) * mx.array(multiplier, dtype=mx.uint32)
    return x ^ (x >> 16)


@register("random")
def random_tokens(tokens: mx.array, k: int, scores, grid, seed: int) -> Pruned:
    """k tokens drawn uniformly without replacement; the draw depends only on the seed and
    the grid, so an image gets the same tokens alone or in a batch."""
    B, N, _ = tokens.shape
    return select(tokens, top_k_sorted(mx.broadcast_to(hash_scores(N, seed), (B, N)), k))


@register("divprune")
def divprune(tokens: mx.array, k: int, scores, grid, seed) -> Pruned:
    """Max-min diversity selection (DivPrune, Alvar et al. 2025, arXiv 2503.02175).

    Greedy farthest-point selection in cosine distance: start from the token farthest from its
    nearest neighbour, then repeatedly add the token farthest from everything chosen. The k
    greedy steps are lazy array ops (no host syncs), each over all N tokens at once.
    """
    B, N, _ = tokens.shape
    distance = 1 - cosine_similarity(tokens, tokens)  # (B, N, N)
    positions = mx.arange(N)
    self_pairs = positions[:, None] == positions
    nearest = mx.where(self_pairs, mx.inf, distance).min(axis=-1)  # (B, N) distance to nearest other token
    picked = mx.argmax(nearest, axis=-1)  # (B,)
    chosen, picks = picked[:, None] == positions, [picked]
    to_chosen = mx.take_along_axis(distance, picked[:, None, None], axis=1)[:, 0]  # (B, N)
    for _ in range(k - 1):
        picked = mx.argmax(mx.where(chosen, -mx.inf, to_chosen), axis=-1)
        chosen, picks = chosen | (picked[:, None] == positions), [*picks, picked]
        to_chosen = mx.minimum(to_chosen, mx.take_along_axis(distance, picked[:, None, None], axis=1)[:, 0])
    return select(tokens, mx.sort(mx.stack(picks, axis=1), axis=-1).astype(mx.int32))


CDPRUNER_THETA = 0.5  # the official default: relevance r in [0, 1] weighs a token by exp(theta / (2 (1 - theta)) r)
SPENT = 1e-4  # a token whose direction the chosen ones already hold but this share of (squared) is spent


@register("cdpruner", needs_prompt=True)
def cdpruner(tokens: mx.array, k: int, relevance: mx.array, grid, seed) -> Pruned:
    """Instruction-aware diversity (CDPruner, Zhang et al. 2025, arXiv 2506.10967).

    A determinantal point process whose kernel is the tokens' cosine similarity conditioned on
    their relevance to the prompt, L = diag(q) S diag(q) with q = exp(theta / (2 (1 - theta)) r),
    and its greedy MAP (Chen et al. 2018's incremental Cholesky): each step keeps the token that
    adds the most log-determinant, i.e. relevant and unlike the tokens kept so far. `relevance`
    (B, N) in [0, 1] comes from `fastvlm_mlx.features.prompt_relevance`.

    Deviation from the official code: once the kept tokens span a token's direction (its share
    of new volume is under SPENT), it is no longer ranked by that numerical residue; such tokens
    fill the remaining places in order of relevance (the official greedy divides by the residue
    there, so its late picks are rounding noise when k exceeds the features' rank).
    """
    B, N, _ = tokens.shape
    quality = mx.exp(CDPRUNER_THETA / (2 * (1 - CDPRUNER_THETA)) * relevance)  # (B, N), in [1, e^0.5]
    kernel = quality[:, :, None] * cosine_similarity(tokens, tokens) * quality[:, None, :]  # (B, N, N)
    gains = quality * quality  # the kernel's diagonal: each token's log-det gain while nothing is kept
    positions, chosen, picks, directions = mx.arange(N), mx.zeros((B, N), dtype=mx.bool_), [], None
    for _ in range(k):
        usable = gains > SPENT * quality * quality
        rank = mx.where(chosen, -mx.inf, mx.where(usable, gains, quality - 10))  # spent ones last, by relevance
        picked = mx.argmax(rank, axis=-1)  # (B,)
        row = mx.take_along_axis(kernel, picked[:, None, None], axis=1)[:, 0]  # (B, N)
        if directions is not None:  # minus what the kept tokens' directions already explain
            row = row - (mx.take_along_axis(directions, picked[:, None, None], axis=2) * directions).sum(axis=1)
        gain = mx.take_along_axis(gains, picked[:, None], axis=1)  # (B, 1)
        step = mx.where(mx.take_along_axis(usable, picked[:, None], axis=1), row / mx.sqrt(gain), 0)
        directions = step[:, None] if directions is None else mx.concatenate([directions, step[:, None]], axis=1)
        gains = gains - step * step
        chosen, picks = chosen | (picked[:, None] == positions), [*picks, picked]
    return select(tokens, mx.sort(mx.stack(picks, axis=1), axis=-1).astype(mx.int32))
