"""The vision tower's own ops against MLX's reference ops: grouped conv, erf GELU, exp and attention."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from fastvlm_mlx import vision
from fastvlm_mlx.config import VisionConfig
from fastvlm_mlx.vision import FastViT, gelu, grouped_conv


@pytest.mark.parametrize(
    "c_in, c_out, k, stride, size",
    [(6, 6, 3, 1, 9), (6, 6, 7, 1, 16), (4, 8, 7, 2, 16), (5, 5, 3, 2, 11), (4, 8, 3, 1, 6), (3, 6, 7, 2, 7)],
)
def test_grouped_conv_matches_conv2d(c_in, c_out, k, stride, size):
    x = mx.random.normal((2, size, size + 2, c_in), key=mx.random.key(0))
    weight = mx.random.normal((c_out, k, k, 1), key=mx.random.key(1))
    ref = mx.conv2d(x, weight, stride=stride, padding=k // 2, groups=c_in)
    bias = mx.random.normal((c_out,), key=mx.random.key(2))
    mine = grouped_conv(x, weight, bias, stride=stride)
    assert mine.shape == ref.shape
    assert mx.abs(mine - (ref + bias)).max().item() <= 1e-5 * mx.abs(ref).max().item()
    activated = grouped_conv(x, weight, bias, stride=stride, activate=True)
    assert mx.abs(activated - nn.gelu(ref + bias)).max().item() <= 1e-5 * mx.abs(ref).max().item()


def test_split_across_cpu_streams_is_exact(monkeypatch):
    """Rows split over CPU streams give the same bits as one fused loop over the whole image."""
    x = mx.random.normal((1, 20, 18, 8), key=mx.random.key(3))
    weight, bias = mx.random.normal((8, 7, 7, 1), key=mx.random.key(4)), mx.zeros((8,))
    monkeypatch.setattr(vision, "_STREAMS", [mx.new_stream(mx.cpu) for _ in range(3)])
    split = grouped_conv(x, weight, bias)
    monkeypatch.setattr(vision, "_STREAMS", [mx.default_stream(mx.cpu)])
    assert mx.array_equal(split, grouped_conv(x, weight, bias)).item()


def test_gelu_matches_exact_gelu_over_the_real_line():
    x = np.concatenate([np.linspace(-12, 12, 1_000_001), np.geomspace(12, 1e30, 1000), -np.geomspace(12, 1e30, 1000)])
    x = mx.array(x.astype(np.float32))
    assert mx.abs(gelu(x) - nn.gelu(x)).max().item() < 2e-6
    tails = mx.array([0.0, 1e30, -1e30, 5.66, -5.66, 5.66 * 2, -5.66 * 2])
    assert mx.array_equal(gelu(tails), nn.gelu(tails)).item()
    assert mx.isnan(gelu(mx.array([float("nan")]))).item()


def test_tower_batches_and_sizes():
    """Batched input gives each image's own tokens; sizes that are multiples of 64 work."""
    mx.random.seed(0)
    tower = FastViT(VisionConfig(layers=(1, 1, 1, 1, 1), embed_dims=(8, 16, 32, 64, 128)))
    pixels = mx.random.uniform(shape=(2, 192, 128, 3))
    tokens, scores = tower(pixels, with_scores=True)
    assert tokens.shape == (2, 6, 256) and scores.shape == (2, 6)
    single, _ = tower(pixels[1:])
    assert mx.allclose(tokens[1:], single, atol=1e-5).item()


def test_exp_for_softmax_is_within_1e6_absolute():
    t = mx.concatenate([mx.linspace(-100, 0, 1_000_001), mx.array([-float("inf")])])
    assert mx.abs(vision._exp_nonpositive(t) - mx.exp(t)).max().item() < 1.5e-6
    assert vision._exp_nonpositive(mx.array([-float("inf"), -41.0])).tolist() == [0.0, 0.0]


def test_cpu_attention_matches_fused_attention():
    q, k, v = (mx.random.normal((2, 3, 70, 16), key=mx.random.key(i)) * 2 for i in range(3))
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25)
    assert mx.abs(vision.cpu_attention(q, k, v, 0.25) - expected).max().item() < 1e-5
