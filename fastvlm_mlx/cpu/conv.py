"""Grouped convolutions (depthwise, or m filters per channel) for MLX's CPU backend.

MLX's CPU `conv2d(groups=C)` is ~20x slower than PyTorch's. Here: the C depthwise kernel
(`native.depthwise`, float32, C % 16 == 0) where it applies, else shifted multiply-adds fused
by `mx.compile` into one loop, split by rows across one CPU stream per core (MLX runs each
elementwise kernel on one thread). Sums are float32 whatever the input dtype.
"""

import os
import threading

import mlx.core as mx

from fastvlm_mlx.cpu import native
from fastvlm_mlx.cpu.fastmath import exact_gelu, gelu


@mx.compile
def _taps(padded: mx.array, weight: mx.array, bias: mx.array, stride: int, h_out: int, activate: bool) -> mx.array:
    """Grouped conv over an already padded input, as shifted multiply-adds fused into one loop:
    padded (B, Hp, Wp, C), weight (C * m, k, k, 1), output rows h_out, optional GELU."""
    B, _, Wp, C = padded.shape
    c_out, k = weight.shape[:2]
    w_out = (Wp - k) // stride + 1
    # taps[i, j] (C, m): output channel c * m + j reads input channel c; contiguous, so that the
    # fused loop's innermost axis has stride 1 for every input
    taps = mx.contiguous(weight.astype(mx.float32).reshape(C, c_out // C, k, k).transpose(2, 3, 0, 1))
    padded = padded[..., None]
    out = None
    for i in range(k):
        for j in range(k):
            window = padded[:, i : i + stride * (h_out - 1) + 1 : stride, j : j + stride * (w_out - 1) + 1 : stride]
            term = window * taps[i, j]  # float32: a half-precision input is promoted
            out = term if out is None else out + term
    out = out.reshape(B, h_out, w_out, c_out) + bias
    return (exact_gelu(out) if activate else out).astype(padded.dtype)


_LOCAL = threading.local()  # MLX streams belong to the thread that made them: each thread makes its own


def cpu_streams() -> list:
    """This thread's CPU streams, one per core (up to 4); none on a single core."""
    streams = getattr(_LOCAL, "streams", None)
    if streams is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        streams = _LOCAL.streams = [mx.new_stream(mx.cpu) for _ in range(min(cores, 4))]
    return streams if len(streams) > 1 else []


def _by_rows(rows: int, run, split: bool = True) -> mx.array:
    """run(lo, hi) on row bands [lo, hi) of axis 1, one band per CPU stream, concatenated;
    a single run(0, rows) when there are fewer rows than streams, or unless split."""
    streams = cpu_streams()
    if not streams or rows < len(streams) or not split:
        return run(0, rows)
    cuts = [rows * i // len(streams) for i in range(len(streams) + 1)]
    parts = []
    for stream, lo, hi in zip(streams, cuts, cuts[1:], strict=False):
        with mx.stream(stream):
            parts.append(run(lo, hi))
    return mx.concatenate(parts, axis=1)


def grouped_conv(
    x: mx.array, weight: mx.array, bias: mx.array | None = None, stride: int = 1, activate: bool = False
) -> mx.array:
    """Conv with groups == input channels plus bias, optionally GELU, on the CPU.

    x (B, H, W, C), weight (C * m, k, k, 1) as nn.Conv2d stores it; padding k // 2.
    """
    H, c_out, k = x.shape[1], weight.shape[0], weight.shape[1]
    bias = mx.zeros((c_out,), dtype=mx.float32) if bias is None else bias.astype(mx.float32)
    m = c_out // x.shape[-1]
    threads = max(1, len(cpu_streams()))
    outs = [native.depthwise(x, weight[j::m], bias[j::m], stride, threads) for j in range(m)]
    if all(out is not None for out in outs):  # the C kernel applies, once per filter
        out = outs[0] if m == 1 else mx.stack(outs, axis=-1).reshape(*outs[0].shape[:3], c_out)
        return gelu(out) if activate else out
    pad = k // 2
    h_out = (H + 2 * pad - k) // stride + 1
    padded = mx.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)])

    def band(lo: int, hi: int) -> mx.array:  # output rows [lo, hi) read input rows lo*stride ... (hi-1)*stride+k
        return _taps(padded[:, lo * stride : (hi - 1) * stride + k], weight, bias, stride, hi - lo, activate)

    return _by_rows(h_out, band, split=k > 3)  # a 3x3 band saves less than the concatenation costs
