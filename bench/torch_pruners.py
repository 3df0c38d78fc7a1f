"""The `pruners` methods in PyTorch, for the reference side of the benchmark.

Same algorithms, same keep count, same tie rules as the MLX versions (tests check that both
pick the same tokens on the same features). Returns (tokens (B, k, D), indices (B, k), sources (B, N)).
"""

import numpy as np
import torch

from pruners.merging import CONTEXTUAL_SHARE, pool_cells
from pruners.registry import get_pruner, keep_count, square_grid
from pruners.selection import CDPRUNER_THETA, SPENT

_MASK32 = 0xFFFFFFFF


def _top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.argsort(scores, dim=-1, stable=True)[:, -k:].sort(dim=-1).values


def _slots_of(indices: torch.Tensor, n: int) -> torch.Tensor:
    B, k = indices.shape
    slots = torch.full((B, n), -1, dtype=torch.long, device=indices.device)
    return slots.scatter(1, indices, torch.arange(k, device=indices.device).expand(B, k))


def _select(tokens, indices):
    gathered = torch.gather(tokens, 1, indices[..., None].expand(-1, -1, tokens.shape[-1]))
    return gathered, indices, _slots_of(indices, tokens.shape[1])


def _cosine(a, b):
    def unit(x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    return unit(a) @ unit(b).transpose(1, 2)


def _merge(tokens, indices, sources):
    members = (sources[..., None] == torch.arange(indices.shape[1], device=tokens.device)).to(tokens.dtype)
    return (members.transpose(1, 2) @ tokens) / members.sum(1)[..., None], indices, sources


def _nearest_sources(anchors, candidates, similarity):
    anchor_slots = _slots_of(anchors, similarity.shape[1])
    nearest = torch.gather(candidates, 1, similarity.argmax(-1))
    return torch.where(anchor_slots >= 0, anchor_slots, torch.gather(anchor_slots, 1, nearest))


def _merge_into_nearest(tokens, anchors, candidates, similarity):
    return _merge(tokens, anchors, _nearest_sources(anchors, candidates, similarity))


def _anchor_plus_mean(tokens, indices, sources):
    """Each slot's token plus the mean of the other tokens that joined it (VisionZip's contextual tokens)."""
    is_anchor = _slots_of(indices, tokens.shape[1]) >= 0
    joined = (sources[..., None] == torch.arange(indices.shape[1], device=tokens.device)) & ~is_anchor[..., None]
    joined = joined.to(tokens.dtype)
    means = (joined.transpose(1, 2) @ tokens) / joined.sum(1).clamp_min(1)[..., None]
    return _select(tokens, indices)[0] + means, indices, sources


def _hash_scores(n: int, seed: int, device) -> torch.Tensor:
    """The MLX uint32 hash in int64 arithmetic, masked to 32 bits after every multiply."""
    x = torch.arange(n, dtype=torch.int64, device=device)
    x = x ^ ((seed * 0x9E3779B9 + 0x632BE5AB) & _MASK32)
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = ((x ^ (x >> shift)) * multiplier) & _MASK32
    return x ^ (x >> 16)


def _norm(tokens, k, scores, grid, seed):
    return _select(tokens, _top_k_sorted(tokens.norm(dim=-1), k))


def _attention(tokens, k, scores, grid, seed):
    return _select(tokens, _top_k_sorted(scores, k))


def _random(tokens, k, scores, grid, seed):
    B, n, _ = tokens.shape
    return _select(tokens, _top_k_sorted(_hash_scores(n, seed, tokens.device).expand(B, n), k))


def _divprune(tokens, k, scores, grid, seed):
    n = tokens.shape[1]
    distance = 1 - _cosine(tokens, tokens)
    eye = torch.eye(n, dtype=torch.bool, device=tokens.device)
    picked = distance.masked_fill(eye, torch.inf).min(-1).values.argmax(-1)
    positions = torch.arange(n, device=tokens.device)
    chosen, picks = picked[:, None] == positions, [picked]
    to_chosen = distance[torch.arange(len(picked)), picked]
    for _ in range(k - 1):
        picked = to_chosen.masked_fill(chosen, -torch.inf).argmax(-1)
        chosen, picks = chosen | (picked[:, None] == positions), [*picks, picked]
        to_chosen = torch.minimum(to_chosen, distance[torch.arange(len(picked)), picked])
    return _select(tokens, torch.stack(picks, 1).sort(-1).values)


def _similarity(tokens, k, scores, grid, seed):
    n = tokens.shape[1]
    cos = _cosine(tokens, tokens)
    earlier = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril(-1)
    redundancy = cos.masked_fill(~earlier, -torch.inf).max(-1).values
    anchors = _top_k_sorted(-redundancy, k)
    return _merge_into_nearest(tokens, anchors, anchors, torch.gather(cos, 2, anchors[:, None].expand(-1, n, -1)))


def _pool(tokens, k, scores, grid, seed):
    B, n, _ = tokens.shape
    cells = torch.from_numpy(np.asarray(pool_cells(grid, k))).long().to(tokens.device)  # same cells as MLX
    positions = torch.arange(n, device=tokens.device)[:, None]
    first = torch.where(cells[:, None] == torch.arange(k, device=tokens.device), positions, n)
    return _merge(tokens, first.min(0).values.expand(B, k), cells.expand(B, n))


def _visionzip(tokens, k, scores, grid, seed):
    n = tokens.shape[1]
    n_ctx = min(round(k * CONTEXTUAL_SHARE), k - 1)
    n_rest = n - (k - n_ctx)
    dominant = _top_k_sorted(scores, k - n_ctx)
    is_dominant = _slots_of(dominant, n) >= 0
    rest = torch.argsort(is_dominant * n + torch.arange(n, device=tokens.device), dim=-1)[:, :n_rest]
    if n_ctx == 0:
        return _select(tokens, dominant)
    targets = rest[:, torch.arange(n_ctx) * (n_rest // n_ctx)]
    anchors = torch.cat([dominant, targets], 1).sort(-1).values
    target_tokens = torch.gather(tokens, 1, targets[..., None].expand(-1, -1, tokens.shape[-1]))
    return _anchor_plus_mean(tokens, anchors, _nearest_sources(anchors, targets, _cosine(tokens, target_tokens)))


def _cdpruner(tokens, k, relevance, grid, seed):
    B, n, _ = tokens.shape
    quality = torch.exp(CDPRUNER_THETA / (2 * (1 - CDPRUNER_THETA)) * relevance)
    kernel = quality[:, :, None] * _cosine(tokens, tokens) * quality[:, None, :]
    gains, rows = quality * quality, torch.arange(B, device=tokens.device)
    chosen, picks, directions = torch.zeros(B, n, dtype=torch.bool, device=tokens.device), [], None
    for _ in range(k):
        usable = gains > SPENT * quality * quality
        rank = torch.where(usable, gains, quality - 10).masked_fill(chosen, -torch.inf)
        picked = rank.argmax(-1)
        row = kernel[rows, picked]
        if directions is not None:
            row = row - (directions[rows, :, picked][..., None] * directions).sum(1)
        step = torch.where(usable[rows, picked][:, None], row / gains[rows, picked][:, None].sqrt(), 0)
        directions = step[:, None] if directions is None else torch.cat([directions, step[:, None]], 1)
        gains = gains - step * step
        chosen[rows, picked] = True
        picks.append(picked)
    return _select(tokens, torch.stack(picks, 1).sort(-1).values)


METHODS = {
    "norm": _norm,
    "attention": _attention,
    "random": _random,
    "divprune": _divprune,
    "similarity": _similarity,
    "pool": _pool,
    "visionzip": _visionzip,
    "cdpruner": _cdpruner,
}


def torch_prune(name: str, tokens: torch.Tensor, keep_ratio: float, scores=None, grid=None, seed: int = 0):
    """PyTorch twin of `pruners.prune`: (tokens (B, k, D), indices (B, k), sources (B, N)). `scores` are
    attention received, or relevance to the prompt for `cdpruner` (`torch_relevance`)."""
    pruner = get_pruner(name)  # same validation and error messages as the MLX side
    B, n, _ = tokens.shape
    k = keep_count(n, keep_ratio)
    if k == n:
        positions = torch.arange(n, device=tokens.device).expand(B, n)
        return tokens, positions, positions
    if (pruner.needs_scores or pruner.needs_prompt) and scores is None:
        raise ValueError(f"pruner {name!r} needs {'relevance' if pruner.needs_prompt else 'attention'} scores")
    return METHODS[name](tokens, k, scores, grid or square_grid(n), seed)


def torch_relevance(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """PyTorch twin of `fastvlm_mlx.features.relevance`: projected visual tokens (B, N, H) and the
    prompt's text embeddings (M, H) -> (B, N) in [0, 1]."""
    closeness = -_cosine(image, text[None].expand(len(image), -1, -1)).mean(-1)
    low, high = closeness.min(-1, keepdim=True).values, closeness.max(-1, keepdim=True).values
    return (closeness - low) / (high - low + 1e-6)
