"""The CPU backend's grouped conv against MLX's conv2d (the C depthwise kernel too), and its
split across CPU streams."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from fastvlm_mlx.config import VisionConfig
from fastvlm_mlx.cpu import conv, native
from fastvlm_mlx.cpu.conv import grouped_conv
from fastvlm_mlx.vision import FastViT


@pytest.mark.parametrize(
    "c_in, c_out, k, stride, size",
    [(6, 6, 3, 1, 9), (6, 6, 7, 1, 16), (4, 8, 7, 2, 16), (5, 5, 3, 2, 11), (4, 8, 3, 1, 6), (3, 6, 7, 2, 7)]
    + [(16, 32, 7, 2, 16), (32, 32, 3, 1, 9)],  # the C kernel on the CPU: two filters per channel, one
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


@pytest.mark.parametrize(
    "batch, height, width, channels, k, stride",
    [(2, 9, 21, 16, 3, 1), (1, 16, 19, 32, 7, 1), (1, 17, 30, 48, 7, 2), (2, 5, 4, 16, 7, 1), (1, 12, 40, 16, 3, 2)],
)
def test_native_depthwise_matches_conv2d(batch, height, width, channels, k, stride):
    """Borders (a 7x7 on a 5x4 image is all border), 8-pixel blocks and their tails, stride 2."""
    x = mx.random.normal((batch, height, width, channels), key=mx.random.key(0))
    weight = mx.random.normal((channels, k, k, 1), key=mx.random.key(1))
    bias = mx.random.normal((channels,), key=mx.random.key(2))
    if native.compiler() is None:
        pytest.skip("no C compiler here")
    mine = native.depthwise(x, weight, bias, stride, threads=3)
    assert mine is not None, "the C depthwise kernel did not build"
    ref = mx.conv2d(x, weight, stride=stride, padding=k // 2, groups=channels) + bias
    assert mine.shape == ref.shape
    assert mx.abs(mine - ref).max().item() <= 1e-5 * mx.abs(ref).max().item()
    assert native.depthwise(x.astype(mx.float16), weight, bias, stride, threads=1) is None  # float32 only
    assert native.depthwise(x[..., :12], weight[:12], bias[:12], stride, threads=1) is None  # C % 16


def test_split_across_cpu_streams_is_exact(monkeypatch):
    """Rows split over CPU streams give the same bits as one fused loop over the whole image."""
    x = mx.random.normal((1, 20, 18, 8), key=mx.random.key(3))
    weight, bias = mx.random.normal((8, 7, 7, 1), key=mx.random.key(4)), mx.zeros((8,))
    streams = [mx.new_stream(mx.cpu) for _ in range(3)]
    monkeypatch.setattr(conv, "cpu_streams", lambda: streams)
    split = grouped_conv(x, weight, bias)
    monkeypatch.setattr(conv, "cpu_streams", lambda: [])
    assert mx.array_equal(split, grouped_conv(x, weight, bias)).item()


def test_a_thread_never_uses_another_threads_streams():
    """The streams are made per thread: a model first run in a worker thread (the server's engine)
    and then in the main thread works in both (MLX refuses a stream another thread made)."""
    import threading

    run = lambda lo, hi: mx.full((1, hi - lo, 3), float(lo))  # noqa: E731
    results = []
    worker = threading.Thread(target=lambda: results.append(mx.eval(conv._by_rows(8, run)) or len(conv.cpu_streams())))
    worker.start()
    worker.join()
    here = conv._by_rows(8, run)
    mx.eval(here)
    assert here.shape == (1, 8, 3) and results == [len(conv.cpu_streams())]


def test_tower_batches_and_sizes():
    """Batched input gives each image's own tokens; sizes that are multiples of 64 work."""
    mx.random.seed(0)
    tower = FastViT(VisionConfig(layers=(1, 1, 1, 1, 1), embed_dims=(8, 16, 32, 64, 128)))
    pixels = mx.random.uniform(shape=(2, 192, 128, 3))
    tokens, scores = tower(pixels, with_scores=True)
    assert tokens.shape == (2, 6, 256) and scores.shape == (2, 6)
    single, _ = tower(pixels[1:])
    assert mx.allclose(tokens[1:], single, atol=1e-5).item()
