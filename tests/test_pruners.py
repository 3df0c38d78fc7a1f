"""Pruner invariants on synthetic tokens, what each method is meant to keep, and MLX/PyTorch agreement."""

import mlx.core as mx
import numpy as np
import pytest

from pruners import PRUNERS, PrunerError, check, keep_count, prune

NAMES = sorted(PRUNERS)
RATIOS = (0.5, 0.25, 0.125, 0.3, 0.01)
N, D = 256, 48


def features(batch: int = 2, seed: int = 0) -> tuple[mx.array, mx.array]:
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(batch, N, D)).astype(np.float32)
    scores = rng.dirichlet(np.ones(N), size=batch).astype(np.float32)  # like attention received
    return mx.array(tokens), mx.array(scores)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", NAMES)
def test_exact_k_sorted_unique_and_consistent(name, ratio):
    tokens, scores = features()
    kept = prune(name, tokens, ratio, scores=scores)
    k = max(1, round(ratio * N))
    assert kept.tokens.shape == (2, k, D)
    indices, sources = np.array(kept.indices), np.array(kept.sources)
    assert indices.shape == (2, k) and sources.shape == (2, N)
    assert (np.diff(indices, axis=1) > 0).all() and indices.min() >= 0 and indices.max() < N
    assert sources.min() >= -1 and sources.max() < k
    for b in range(2):
        assert (sources[b, indices[b]] == np.arange(k)).all()  # each output stands at a token of its group
        assert set(sources[b][sources[b] >= 0]) == set(range(k))  # no empty output


@pytest.mark.parametrize("name", NAMES)
def test_outputs_are_kept_tokens_or_group_means(name):
    tokens, scores = features()
    kept = prune(name, tokens, 0.25, scores=scores)
    x, out, sources = np.array(tokens), np.array(kept.tokens), np.array(kept.sources)
    for b in range(2):
        means = np.stack([x[b][sources[b] == j].mean(axis=0) for j in range(out.shape[1])])
        if name == "visionzip":  # VisionZip's contextual token: its target + the mean of the tokens that joined it
            means = np.stack([contextual(x[b], sources[b], i, j) for j, i in enumerate(np.array(kept.indices[b]))])
        np.testing.assert_allclose(out[b], means, rtol=1e-5, atol=1e-6)
        if not PRUNERS[name].merges:
            assert (sources[b] >= 0).sum() == out.shape[1]
            assert np.array_equal(out[b], x[b][np.array(kept.indices[b])])  # bit-exact copies


def contextual(x: np.ndarray, sources: np.ndarray, target: int, slot: int) -> np.ndarray:
    others = (sources == slot) & (np.arange(len(sources)) != target)
    return x[target] + (x[others].mean(axis=0) if others.any() else 0)


@pytest.mark.parametrize("name", NAMES)
def test_keep_ratio_one_is_bit_identical(name):
    tokens, scores = features()
    assert np.array_equal(np.array(prune(name, tokens, 1.0, scores=scores).tokens), np.array(tokens))
    direct = PRUNERS[name].fn(tokens, N, scores, (16, 16), 0)  # the method itself, not the shortcut
    assert np.array_equal(np.array(direct.tokens), np.array(tokens))
    assert np.array_equal(np.array(direct.indices), np.broadcast_to(np.arange(N), (2, N)))


@pytest.mark.parametrize("name", NAMES)
def test_batch_is_pruned_per_image(name):
    tokens, scores = features()
    both = prune(name, tokens, 0.25, scores=scores)
    for b in range(2):
        alone = prune(name, tokens[b : b + 1], 0.25, scores=scores[b : b + 1])
        assert np.array_equal(np.array(alone.indices[0]), np.array(both.indices[b]))
        np.testing.assert_allclose(np.array(alone.tokens[0]), np.array(both.tokens[b]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_and_compilable(name):
    tokens, scores = features()
    first = prune(name, tokens, 0.25, scores=scores, seed=3)
    again = prune(name, tokens, 0.25, scores=scores, seed=3)
    assert np.array_equal(np.array(first.tokens), np.array(again.tokens))
    k = keep_count(N, 0.25)
    compiled = mx.compile(lambda t, s: PRUNERS[name].fn(t, k, s, (16, 16), 3))
    assert np.array_equal(np.array(compiled(tokens, scores).indices), np.array(first.indices))


def test_random_depends_on_seed_and_covers_the_grid():
    tokens, _ = features()
    picks = [np.array(prune("random", tokens, 0.25, seed=s).indices[0]) for s in range(50)]
    assert not np.array_equal(picks[0], picks[1])
    counts = np.bincount(np.concatenate(picks), minlength=N)  # each token kept ~12.5 times in 50 draws
    assert counts.min() >= 2 and counts.max() <= 30


def test_norm_keeps_the_largest_tokens():
    tokens, _ = features(batch=1)
    scale = mx.array(np.linspace(1, 2, N, dtype=np.float32)[::-1].copy())[None, :, None]
    kept = prune("norm", tokens / mx.linalg.norm(tokens, axis=-1, keepdims=True) * scale, 0.25)
    assert np.array_equal(np.array(kept.indices[0]), np.arange(64))


def test_attention_keeps_the_most_attended_tokens():
    tokens, _ = features(batch=1)
    scores = mx.zeros((1, N)).at[:, 100:110].add(1.0)
    assert np.array_equal(np.array(prune("attention", tokens, 10 / N, scores=scores).indices[0]), np.arange(100, 110))


def test_pool_at_a_quarter_is_two_by_two_average_pooling():
    tokens, _ = features(batch=1)
    grid = np.array(tokens).reshape(16, 16, D)
    expected = grid.reshape(8, 2, 8, 2, D).mean(axis=(1, 3)).reshape(64, D)
    np.testing.assert_allclose(np.array(prune("pool", tokens, 0.25).tokens[0]), expected, rtol=1e-5, atol=1e-6)


def clustered(num_clusters: int, seed: int = 1) -> tuple[mx.array, np.ndarray]:
    """Tokens in tight clusters of different sizes, shuffled over the grid."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_clusters, D))
    labels = rng.permutation(np.repeat(np.arange(num_clusters), N // num_clusters))
    labels[: num_clusters * 2] = np.arange(num_clusters * 2) % num_clusters  # every cluster early in the scan
    tokens = centres[labels] + 0.01 * rng.normal(size=(N, D))
    return mx.array(tokens[None].astype(np.float32)), labels


@pytest.mark.parametrize("name", ["divprune", "similarity"])
def test_diversity_methods_keep_one_token_per_cluster(name):
    tokens, labels = clustered(8)
    kept = prune(name, tokens, 8 / N)
    assert sorted(labels[np.array(kept.indices[0])]) == list(range(8))
    if name == "similarity":  # and merge each cluster into its own output
        sources = np.array(kept.sources[0])
        assert all(len(set(sources[labels == c])) == 1 for c in range(8))


def test_visionzip_keeps_dominant_tokens_and_merges_the_rest():
    tokens, scores = features(batch=1)
    kept = prune("visionzip", tokens, 0.25, scores=scores)
    sources = np.array(kept.sources[0])
    dominant = np.argsort(np.array(scores[0]))[-(64 - 10) :]  # 54 dominant + 10 contextual of 64
    assert (np.bincount(sources)[sources[dominant]] == 1).all()  # alone in their slot
    slots = sources[np.sort(dominant)]
    assert np.array_equal(np.array(kept.tokens[0])[slots], np.array(tokens[0])[np.sort(dominant)])  # untouched
    assert (sources >= 0).all()  # nothing is thrown away: contextual tokens absorb the rest


@pytest.mark.parametrize("ratio", [0, -0.5, 1.5, float("nan"), "half"])
def test_ratio_outside_zero_one_is_refused(ratio):
    tokens, _ = features()
    with pytest.raises(PrunerError, match=r"\(0, 1\]"):
        prune("norm", tokens, ratio)


def test_unknown_pruner_lists_valid_names():
    with pytest.raises(PrunerError) as error:
        check("tome", 0.5)
    assert all(name in str(error.value) for name in NAMES)


def test_scored_methods_need_scores():
    tokens, _ = features()
    with pytest.raises(PrunerError, match="attention scores"):
        prune("attention", tokens, 0.5)


def test_keep_count_rule():
    assert [keep_count(256, r) for r in (1.0, 0.5, 0.25, 0.125, 0.001)] == [256, 128, 64, 32, 1]
    assert keep_count(144, 1 / 3) == 48 and keep_count(64, 0.3) == round(19.2)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", NAMES)
def test_mlx_and_torch_pick_the_same_tokens(name, ratio):
    torch = pytest.importorskip("torch")
    from bench.torch_pruners import torch_prune

    tokens, scores = features(seed=5)
    mine = prune(name, tokens, ratio, scores=scores, seed=7)
    ref = torch_prune(name, torch.from_numpy(np.array(tokens)), ratio, torch.from_numpy(np.array(scores)), seed=7)
    assert np.array_equal(np.array(mine.indices), ref[1].numpy())
    assert np.array_equal(np.array(mine.sources), ref[2].numpy())
    np.testing.assert_allclose(np.array(mine.tokens), ref[0].numpy(), rtol=1e-5, atol=1e-6)


def test_grid_must_hold_the_tokens():
    tokens, _ = features()
    with pytest.raises(PrunerError, match="grid"):
        prune("pool", tokens, 0.5, grid=(8, 8))
