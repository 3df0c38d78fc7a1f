"""The instruction-aware pruner (CDPruner): what its DPP keeps, its relevance score against the
PyTorch twin, and the pipeline ranking an image's tokens by the question (cache keys, chats, errors)."""

import mlx.core as mx
import numpy as np
import pytest

from fastvlm_mlx.errors import UserError
from fastvlm_mlx.features import VisionSettings, image_features, relevance
from pruners import PrunerError, prune

N, D = 256, 48


def clustered(num_clusters: int, seed: int = 0) -> tuple[mx.array, np.ndarray]:
    """N tokens around `num_clusters` random directions (well apart in 48 dimensions)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_clusters, D))
    labels = rng.integers(num_clusters, size=N)
    labels[:num_clusters] = np.arange(num_clusters)
    tokens = centres[labels] + 0.01 * rng.normal(size=(N, D))
    return mx.array(tokens[None].astype(np.float32)), labels


def test_uniform_relevance_keeps_one_token_per_cluster():
    tokens, labels = clustered(8)
    kept = prune("cdpruner", tokens, 8 / N, scores=mx.zeros((1, N)))
    assert sorted(labels[np.array(kept.indices[0])]) == list(range(8))


def test_relevance_chooses_which_clusters_are_kept():
    tokens, labels = clustered(8)
    wanted = labels < 4
    kept = prune("cdpruner", tokens, 4 / N, scores=mx.array(wanted[None].astype(np.float32)))
    assert sorted(labels[np.array(kept.indices[0])]) == [0, 1, 2, 3]  # one of each relevant cluster, no other


def test_once_every_direction_is_held_the_most_relevant_fill_the_rest():
    """Identical tokens span one direction: after the first, the rest go by relevance alone."""
    rng = np.random.default_rng(1)
    tokens = mx.broadcast_to(mx.array(rng.normal(size=(1, 1, D)).astype(np.float32)), (1, N, D))
    scores = rng.permutation(N).astype(np.float32)[None] / N
    kept = prune("cdpruner", tokens, 0.125, scores=mx.array(scores))
    assert np.array_equal(np.array(kept.indices[0]), np.sort(np.argsort(scores[0])[-32:]))


def test_relevance_is_the_negated_mean_cosine_scaled_to_unit_range():
    torch = pytest.importorskip("torch")
    from bench.torch_pruners import torch_relevance

    rng = np.random.default_rng(2)
    image, text = rng.normal(size=(2, N, 32)).astype(np.float32), rng.normal(size=(5, 32)).astype(np.float32)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    closeness = -(unit(image) @ unit(text).T).mean(-1)
    low, high = closeness.min(-1, keepdims=True), closeness.max(-1, keepdims=True)
    expected = (closeness - low) / (high - low + 1e-6)
    mine = np.array(relevance(mx.array(image), mx.array(text)))
    np.testing.assert_allclose(mine, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mine, torch_relevance(torch.from_numpy(image), torch.from_numpy(text)), atol=1e-6)
    assert mine.min() == 0 and mine.max() == pytest.approx(1, abs=1e-5)


def test_without_relevance_it_is_refused():
    tokens, _ = clustered(4)
    with pytest.raises(PrunerError, match="relevance"):
        prune("cdpruner", tokens, 0.5)


@pytest.fixture(scope="module")
def tiny(tiny_mlx):
    from fastvlm_mlx.load import load_model

    return load_model(tiny_mlx)


def settings_for(model, tokenizer, question: str) -> VisionSettings:
    settings = VisionSettings.resolve(model.config, None, "cdpruner", 0.125)
    return settings.for_prompt(tokenizer, question)


def test_the_question_decides_the_kept_tokens_and_the_cache_key(tiny, image_path):
    from fastvlm_mlx.features import VisionCache

    model, tokenizer = tiny
    cache = VisionCache()
    first = image_features(model, image_path, settings_for(model, tokenizer, "what color is it?"), cache)
    other = image_features(model, image_path, settings_for(model, tokenizer, "is the square big?"), cache)
    again = image_features(model, image_path, settings_for(model, tokenizer, "what color is it?"), cache)
    assert first.key != other.key and (cache.misses, cache.hits) == (2, 1)
    assert np.array_equal(np.array(again.kept), np.array(first.kept)) and again.vision_s == 0
    assert not np.array_equal(np.array(other.kept), np.array(first.kept))  # another question, other tokens


def test_other_pruners_ignore_the_question(tiny):
    model, tokenizer = tiny
    settings = VisionSettings.resolve(model.config, None, "divprune", 0.5)
    assert settings.for_prompt(tokenizer, "what color is it?") is settings


def test_no_question_text_is_a_clear_error(tiny, image_path):
    model, tokenizer = tiny
    with pytest.raises(UserError, match="no text"):
        settings_for(model, tokenizer, "")
    bare = VisionSettings.resolve(model.config, None, "cdpruner", 0.125)  # never told the question
    with pytest.raises(UserError, match="for_prompt"):
        image_features(model, image_path, bare)


def test_generate_and_chat_rank_by_the_first_question(tiny, image_path):
    from fastvlm_mlx import ChatSession, generate

    model, tokenizer = tiny
    options = dict(pruner="cdpruner", keep_ratio=0.125, max_tokens=4)
    alone = generate(model, tokenizer, image_path, "what color is it?", **options)
    chat = ChatSession(model, tokenizer, image_path, pruner="cdpruner", keep_ratio=0.125)
    assert chat.ask("what color is it?", max_tokens=4).token_ids == alone.token_ids
    expected = settings_for(model, tokenizer, "what color is it?").instruction
    chat.ask("and its shape?", max_tokens=4)
    assert chat.settings.instruction == expected and chat.features.key[-1] == expected
    chat.reset()  # a new conversation ranks by its own first question
    chat.ask("and its shape?", max_tokens=4)
    assert chat.settings.instruction == settings_for(model, tokenizer, "and its shape?").instruction
