"""Array building blocks the pruners share: top-k, gather, slots, cosine similarity, merging."""

import mlx.core as mx

from pruners.registry import Pruned


def top_k_sorted(scores: mx.array, k: int) -> mx.array:
    """Indices (B, k) of the k largest scores per row, in ascending (spatial) order."""
    return mx.sort(mx.argsort(scores, axis=-1)[:, -k:], axis=-1).astype(mx.int32)


def gather_tokens(tokens: mx.array, indices: mx.array) -> mx.array:
    return mx.take_along_axis(tokens, indices[..., None], axis=1)  # (B, k, D)


def slots_of(indices: mx.array, num_tokens: int) -> mx.array:
    """(B, N) int32: position of each token within `indices` (B, k), or -1 if absent."""
    B, k = indices.shape
    slots = mx.full((B, num_tokens), -1, dtype=mx.int32)
    return mx.put_along_axis(slots, indices, mx.broadcast_to(mx.arange(k, dtype=mx.int32), (B, k)), axis=1)


def select(tokens: mx.array, indices: mx.array) -> Pruned:
    """Keep the tokens at sorted `indices` (B, k)."""
    return Pruned(gather_tokens(tokens, indices), indices, slots_of(indices, tokens.shape[1]))


def cosine_similarity(a: mx.array, b: mx.array) -> mx.array:
    """(B, N, D), (B, M, D) -> (B, N, M)."""

    def unit(x):
        return x / mx.maximum(mx.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    return unit(a) @ unit(b).swapaxes(1, 2)


def merge(tokens: mx.array, indices: mx.array, sources: mx.array) -> Pruned:
    """Average each group of source tokens into its slot; slot j stands at `indices[:, j]`.

    sources (B, N) gives every token's slot (or -1 to drop it); a slot that holds only its
    own token returns that token unchanged.
    """
    k = indices.shape[1]
    members = (sources[..., None] == mx.arange(k)).astype(tokens.dtype)  # (B, N, k)
    sums = members.swapaxes(1, 2) @ tokens  # (B, k, D)
    return Pruned(sums / members.sum(axis=1)[..., None], indices, sources)


def nearest_sources(anchors: mx.array, candidates: mx.array, similarity: mx.array) -> mx.array:
    """(B, N) slot of each token: an anchor (B, k, sorted) its own, any other token its most similar candidate's.

    candidates (B, M) are anchor token indices that accept merges; similarity (B, N, M) is each
    token's similarity to them.
    """
    anchor_slots = slots_of(anchors, similarity.shape[1])
    nearest = mx.take_along_axis(candidates, mx.argmax(similarity, axis=-1).astype(mx.int32), axis=1)  # (B, N)
    joined = mx.take_along_axis(anchor_slots, nearest, axis=1)
    return mx.where(anchor_slots >= 0, anchor_slots, joined)


def merge_into_nearest(tokens: mx.array, anchors: mx.array, candidates: mx.array, similarity: mx.array) -> Pruned:
    """Anchors stay as slots; every other token is averaged into its most similar candidate's slot."""
    return merge(tokens, anchors, nearest_sources(anchors, candidates, similarity))


def anchor_plus_mean(tokens: mx.array, indices: mx.array, sources: mx.array) -> Pruned:
    """Each slot's own token plus the mean of the other tokens that joined it (VisionZip's
    contextual tokens); a slot nobody joined returns its token unchanged."""
    N, k = tokens.shape[1], indices.shape[1]
    is_anchor = slots_of(indices, N) >= 0  # (B, N)
    joined = ((sources[..., None] == mx.arange(k)) & ~is_anchor[..., None]).astype(tokens.dtype)  # (B, N, k)
    means = (joined.swapaxes(1, 2) @ tokens) / mx.maximum(joined.sum(axis=1), 1)[..., None]  # (B, k, D)
    return Pruned(gather_tokens(tokens, indices) + means, indices, sources)
