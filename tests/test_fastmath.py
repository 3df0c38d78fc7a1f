"""GELU, exp and attention written for MLX's CPU, against MLX's own ops."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import activations, base, qwen2
from mlx_lm.models.cache import make_prompt_cache

from fastvlm_mlx.cpu import fastmath, modules


def test_gelu_matches_exact_gelu_over_the_real_line():
    x = np.concatenate([np.linspace(-12, 12, 1_000_001), np.geomspace(12, 1e30, 1000), -np.geomspace(12, 1e30, 1000)])
    x = mx.array(x.astype(np.float32))
    assert mx.abs(fastmath.gelu(x) - nn.gelu(x)).max().item() < 2e-6
    tails = mx.array([0.0, 1e30, -1e30, 5.66, -5.66, 5.66 * 2, -5.66 * 2])
    assert mx.array_equal(fastmath.gelu(tails), nn.gelu(tails)).item()
    assert mx.isnan(fastmath.gelu(mx.array([float("nan")]))).item()


def test_exp_for_softmax_is_within_1e6_absolute():
    t = mx.concatenate([mx.linspace(-100, 0, 1_000_001), mx.array([-float("inf")])])
    assert mx.abs(fastmath.exp_nonpositive(t) - mx.exp(t)).max().item() < 1.5e-6
    assert fastmath.exp_nonpositive(mx.array([-float("inf"), -41.0])).tolist() == [0.0, 0.0]


def test_silu_mul_matches_silu_times_x_over_the_real_line():
    g = mx.array(np.concatenate([np.linspace(-40, 40, 1_000_001), [1e30, -1e30, 15.82, -15.82]]).astype(np.float32))
    x = mx.random.normal(g.shape, key=mx.random.key(0))
    assert mx.abs(fastmath.silu_mul(g, x) - nn.silu(g) * x).max().item() < 1e-5  # |x| < 6: 2e-6 on SiLU
    assert mx.isnan(fastmath.silu_mul(mx.array([float("nan")]), mx.array([1.0]))).item()
    half = fastmath.silu_mul(g.astype(mx.bfloat16), x.astype(mx.bfloat16))
    assert half.dtype == mx.bfloat16 and mx.isfinite(half).all().item()


MASKS = ["bool", "additive", "bool (B, 1, L, S)", "additive (B, 1, L, S)", "bool (B, H, L, S)", "additive (B, H, L, S)"]
MASKS += ["bool (1, 1, L, S)", "bool (B, 1, 1, S)", "bool (H, L, S)"]


@pytest.mark.parametrize("heads, kv_heads, L, S", [(3, 3, 70, 70), (6, 2, 9, 9), (6, 2, 4, 11), (4, 1, 1, 13)])
@pytest.mark.parametrize("mask", [None, "causal", *MASKS])
def test_attention_matches_fused_attention(heads, kv_heads, L, S, mask):
    """(L, S) masks, those a batch's rows differ by (a batch cache's left padding: (B, 1, L, S),
    (B, H, L, S)), and the broadcasting ones mx.fast takes too."""
    q = mx.random.normal((2, heads, L, 16), key=mx.random.key(0)) * 2
    k, v = (mx.random.normal((2, kv_heads, S, 16), key=mx.random.key(i)) * 2 for i in (1, 2))
    if mask not in (None, "causal"):
        named = mask.partition(" ")[2] or "(L, S)"
        shape = tuple({"B": 2, "H": heads, "L": L, "S": S}.get(n, 1) for n in named.strip("()").split(", "))
        attends = mx.random.uniform(shape=shape, key=mx.random.key(3)) > 0.3
        attends = attends | (mx.arange(S) == 0)  # every query attends somewhere
        mask = attends if mask.startswith("bool") else mx.where(attends, 0.0, -1e9)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    assert mx.abs(fastmath.attention(q, k, v, 0.25, mask) - expected).max().item() < 1e-5


def test_attention_refuses_a_mask_it_cannot_place():
    """Masks of the wrong head count or sizes: refused, as mx.fast refuses them (a batch mask of 6
    query rows for 2 heads x 3 once passed: the reshape spread its rows over the key heads)."""
    q, k = mx.zeros((2, 6, 3, 8)), mx.zeros((2, 2, 5, 8))
    for shape in [(2, 2, 3, 5), (2, 3, 5), (1, 2, 2, 3, 5)]:  # 2 heads of 6; 2 heads, 3-D; 5-D
        with pytest.raises(ValueError, match="masks"):
            fastmath.attention(q, k, k, 0.5, mx.ones(shape, dtype=mx.bool_))
    for shape in [(2, 1, 6, 5), (2, 1, 3, 4), (4, 5)]:
        with pytest.raises(ValueError):
            mx.fast.scaled_dot_product_attention(q, k, k, scale=0.5, mask=mx.ones(shape, dtype=mx.bool_))
        with pytest.raises(ValueError):
            mx.eval(fastmath.attention(q, k, k, 0.5, mx.ones(shape, dtype=mx.bool_)))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_stays_finite_and_close(dtype):
    x = mx.linspace(-12, 12, 10_001)
    assert mx.abs(fastmath.gelu(x.astype(dtype)).astype(mx.float32) - nn.gelu(x)).max().item() < 0.07
    q, k, v = (mx.random.normal((1, 4, 40, 16), key=mx.random.key(i)) * 3 for i in range(3))
    exact = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")
    half = [a.astype(dtype) for a in (q, k, v)]
    got = fastmath.attention(*half, 0.25, "causal")
    theirs = mx.fast.scaled_dot_product_attention(*half, scale=0.25, mask="causal")
    assert got.dtype == dtype

    def error(out):
        return mx.abs(out.astype(mx.float32) - exact).max().item()

    assert error(got) <= 1.2 * error(theirs) + 1e-3  # no worse than MLX's own in that precision


TINY_QWEN2 = qwen2.ModelArgs(
    model_type="qwen2",
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=96,
    num_attention_heads=4,
    rms_norm_eps=1e-6,
    vocab_size=50,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)


def test_qwen2_prefill_is_routed_through_our_attention_with_the_same_logits(monkeypatch):
    """A prefill in two chunks (the second one's causal mask is offset by the cache), then decode
    steps: the same logits as mlx-lm's own attention and SwiGLU, and the prefill really ran our
    attention (the decode steps mlx-lm's), every MLP our SwiGLU. Only the swapped model changes:
    mlx-lm's module globals and another Qwen2 in the process keep mlx-lm's classes."""
    if mx.default_device() != mx.cpu:
        pytest.skip("routed on the CPU only")
    mx.random.seed(0)
    model, other = qwen2.Model(TINY_QWEN2), qwen2.Model(TINY_QWEN2)
    ids = mx.array([[1, 5, 9, 2, 7, 7, 3, 11, 4]])

    def run():
        cache = make_prompt_cache(model)
        logits = [model(ids[:, :4], cache=cache), model(ids[:, 4:7], cache=cache)]
        logits += [model(ids[:, i : i + 1], cache=cache) for i in range(7, 9)]
        return mx.concatenate(logits, axis=1)

    expected = run()
    calls, mlps = [], []
    ours, our_swiglu = modules.attention, modules.silu_mul
    monkeypatch.setattr(modules, "attention", lambda *a: calls.append(a[0].shape) or ours(*a))
    monkeypatch.setattr(modules, "silu_mul", lambda *a: mlps.append(a[0].shape[1]) or our_swiglu(*a))
    assert modules.swap_modules(model) == 4  # two attention and two MLP modules
    assert mx.abs(run() - expected).max().item() < 1e-4
    assert calls == [(1, 4, 4, 16)] * 2 + [(1, 4, 3, 16)] * 2  # two layers, two prefill chunks, no decode
    assert mlps == [4, 4, 3, 3, 1, 1, 1, 1]
    assert qwen2.scaled_dot_product_attention is base.scaled_dot_product_attention
    assert qwen2.swiglu is activations.swiglu
    assert {type(m) for _, m in other.named_modules()} & set(modules.SWAPS.values()) == set()


def test_a_batched_prefill_over_merged_caches_runs_our_attention_with_the_same_logits(monkeypatch):
    """The server's batched prefill: prompts of different lengths in their own caches, merged into one
    left-padded BatchKVCache, their next chunks right-padded (mlx-lm's 4-D masks, one offset per row):
    the same logits at every real position as mlx-lm's own attention, and ours really ran."""
    if mx.default_device() != mx.cpu:
        pytest.skip("routed on the CPU only")
    from mlx_lm.models.cache import BatchKVCache

    mx.random.seed(1)
    model = qwen2.Model(TINY_QWEN2)
    prompts, chunks = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]], [[2, 6, 4], [3], [3, 8]]
    width = max(map(len, chunks))

    def run():
        caches = []
        for prompt in prompts:
            cache = make_prompt_cache(model)
            model(mx.array([prompt]), cache=cache)
            caches.append(cache)
        merged = [BatchKVCache.merge(list(layer)) for layer in zip(*caches, strict=True)]
        for c in merged:
            c.prepare(right_padding=[width - len(chunk) for chunk in chunks])
        return model(mx.array([chunk + [0] * (width - len(chunk)) for chunk in chunks]), cache=merged)

    expected = run()
    calls = []
    ours = modules.attention
    monkeypatch.setattr(modules, "attention", lambda *a: calls.append(getattr(a[4], "shape", a[4])) or ours(*a))
    modules.swap_modules(model)
    got = run()
    assert calls == ["causal"] * 6 + [(3, 1, width, 7 + width)] * 2  # the prompts alone, then the batch
    for row, chunk in enumerate(chunks):
        assert mx.abs(got[row, : len(chunk)] - expected[row, : len(chunk)]).max().item() < 1e-4
