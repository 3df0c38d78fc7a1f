"""Pruners whose outputs average several source tokens."""

import math

import mlx.core as mx

from pruners.ops import (
    anchor_plus_mean,
    cosine_similarity,
    merge,
    merge_into_nearest,
    nearest_sources,
    select,
    slots_of,
    top_k_sorted,
)
from pruners.registry import Pruned, register

# VisionZip's default split of kept tokens: 54 dominant + 10 contextual out of 64.
CONTEXTUAL_SHARE = 10 / 64


@register("similarity", merges=True)
def similarity(tokens: mx.array, k: int, scores, grid, seed) -> Pruned:
    """Cosine-redundancy merging: the k least redundant tokens stay, every other token is
    averaged into the kept token it is most similar to.

    This is the earlier project's "PruMerge-lite", not PruMerge (Shang et al. 2024, arXiv
    2403.15388), which keeps the outliers of CLS attention (IQR) and merges by key similarity.
    A token's redundancy is its highest cosine similarity to any earlier token in raster order
    (a vectorized greedy keep-or-merge scan); a merged token stands at its kept token's position.
    """
    N = tokens.shape[1]
    cos = cosine_similarity(tokens, tokens)  # (B, N, N)
    earlier = mx.tril(mx.ones((N, N), dtype=mx.bool_), k=-1)
    redundancy = mx.where(earlier, cos, -mx.inf).max(axis=-1)  # token 0: -inf, always kept
    anchors = top_k_sorted(-redundancy, k)
    return merge_into_nearest(tokens, anchors, anchors, mx.take_along_axis(cos, anchors[:, None, :], axis=2))


def pool_cells(grid: tuple[int, int], k: int) -> mx.array:
    """(N,) cell id of each grid position for average pooling into exactly k cells.

    About sqrt(k) row bands; band r gets k // bands cells, the first k % bands bands one more,
    so k = 64 on 16x16 is exact 2x2 pooling and any other k still tiles the grid.
    """
    h, w = grid
    bands = min(h, k, max(round(math.sqrt(k * h / w)), -(-k // w)))
    base, extra = divmod(k, bands)
    y, x = mx.arange(h * w) // w, mx.arange(h * w) % w
    band = y * bands // h
    cells = base + (band < extra)
    return band * base + mx.minimum(band, extra) + x * cells // w


@register("pool", merges=True)
def pool(tokens: mx.array, k: int, scores, grid: tuple[int, int], seed) -> Pruned:
    """Spatial average pooling of the token grid into k cells (the baseline to beat); a cell's
    token stands at its first (top-left) grid position."""
    B, N, _ = tokens.shape
    cells = pool_cells(grid, k).astype(mx.int32)
    first = mx.where(cells[:, None] == mx.arange(k), mx.arange(N)[:, None], N).min(axis=0)  # (k,)
    anchors = mx.broadcast_to(first.astype(mx.int32), (B, k))
    return merge(tokens, anchors, mx.broadcast_to(cells, (B, N)))


@register("visionzip", needs_scores=True, merges=True)
def visionzip(tokens: mx.array, k: int, scores: mx.array, grid, seed) -> Pruned:
    """VisionZip (Yang et al. 2024, arXiv 2412.04467): dominant tokens by attention plus
    contextual tokens merged by similarity, as the official code computes them.

    The most-attended tokens stay; the rest are spread uniformly over n_ctx targets in spatial
    order, each remaining token joins its most similar target, and a contextual token is its
    target plus the mean of the tokens that joined it (the official `target + aggregated`).
    Departures: FastViTHD has no CLS token, so dominance is attention received (averaged over
    heads and queries) rather than CLS attention; similarity is cosine over output tokens, not
    the keys averaged over heads (FastViTHD's last keys are a 3x3 conv earlier); the outputs are
    in spatial order (the official code puts the contextual tokens after the dominant ones), and
    a contextual token stands at its target's position.
    """
    N = tokens.shape[1]
    n_ctx = min(round(k * CONTEXTUAL_SHARE), k - 1)
    n_rest = N - (k - n_ctx)
    dominant = top_k_sorted(scores, k - n_ctx)
    is_dominant = slots_of(dominant, N) >= 0
    rest = mx.argsort(is_dominant * N + mx.arange(N), axis=-1)[:, :n_rest].astype(mx.int32)  # spatial order
    if n_ctx == 0:
        return select(tokens, dominant)
    targets = rest[:, mx.arange(n_ctx) * (n_rest // n_ctx)]  # (B, n_ctx)
    anchors = mx.sort(mx.concatenate([dominant, targets], axis=1), axis=-1)
    similarity_to_targets = cosine_similarity(tokens, mx.take_along_axis(tokens, targets[..., None], axis=1))
    return anchor_plus_mean(tokens, anchors, nearest_sources(anchors, targets, similarity_to_targets))
