"""CPU versions of the model's modules, and `swap_modules`: the one place a model is switched
onto them.

Each class here subclasses a model module (ours, or mlx-lm's Qwen2 attention and MLP), keeps
its parameters and overrides only `__call__`; `swap_modules` changes the class of each such
module of one model instance, nothing else (no other model, no other package's globals).
Off the CPU every override hands back to the model's own `__call__`.
"""

import functools

import mlx.core as mx
from mlx_lm.models import qwen2

from fastvlm_mlx import model, vision
from fastvlm_mlx.cpu.conv import grouped_conv
from fastvlm_mlx.cpu.fastmath import attention, exact_gelu, gelu, silu_mul


def cpu_only(method):
    """Run `method` on the CPU, the model's own method of that name (the base class's) elsewhere."""

    @functools.wraps(method)
    def dispatch(self, *args, **kwargs):
        if mx.default_device() != mx.cpu:
            return getattr(super(type(self), self), method.__name__)(*args, **kwargs)
        return method(self, *args, **kwargs)

    return dispatch


def _conv(conv, x: mx.array, activate: bool = False) -> mx.array:
    return grouped_conv(x, conv.weight, conv.get("bias"), conv.stride[0], activate)


class ConvAct(vision.ConvAct):
    @cpu_only
    def __call__(self, x):
        return _conv(self.reparam_conv, x, activate=True) if self.grouped else gelu(self.reparam_conv(x))


class PointwiseAct(vision.PointwiseAct):
    @cpu_only
    def __call__(self, x):
        return gelu(self.reparam_conv(x))


class DepthwiseConv(vision.DepthwiseConv):
    @cpu_only
    def __call__(self, x):
        return _conv(self.reparam_conv, x)


@mx.compile
def _bias_gelu(h: mx.array, bias: mx.array) -> mx.array:
    return exact_gelu(h + bias)


@mx.compile
def _add_bias(x: mx.array, y: mx.array, bias: mx.array) -> mx.array:
    return x + y + bias


class ConvMlp(vision.ConvMlp):
    @cpu_only
    def __call__(self, x):
        """The biases ride in the GELU and residual loops (nn.Linear would first copy them into
        each output, an extra pass over the largest arrays of the tower)."""
        h = _bias_gelu(_conv(self.conv, x) @ self.fc1.weight.T, self.fc1.bias)
        return _add_bias(x, h @ self.fc2.weight.T, self.fc2.bias)


class Attention(vision.Attention):
    @cpu_only
    def attend(self, q, k, v):
        return attention(q, k, v, self.scale)


class FinalConv(vision.FinalConv):
    @cpu_only
    def __call__(self, x):
        return gelu(self.se(_conv(self.reparam_conv, x)))


class Projector(model.Projector):
    @cpu_only
    def __call__(self, x):
        return self.linear_2(gelu(self.linear_1(x)))


class Qwen2Attention(model.Attention):
    """Prefill through `fastmath.attention` (MLX's CPU exp is a scalar loop: ~0.2 s of a 0.5B
    model's 286-token prefill; a batch's prefill of 8 x 15 positions over 300-position caches, as
    the server's, 0.49 -> 0.13 s in attention). Decode steps (which would recompile the exp for
    every new length, for no gain at one query a row) and quantized KV caches keep the model's
    own path. RoPE goes through `model.rotate`, so the positions a cache carries hold here too."""

    @cpu_only
    def __call__(self, x, mask=None, cache=None):
        B, L, _ = x.shape
        if L == 1 or hasattr(cache, "bits"):
            return super().__call__(x, mask, cache)
        queries = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        queries, keys = model.rotate(self.rope, queries, cache), model.rotate(self.rope, keys, cache)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        out = attention(queries, keys, values, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class Qwen2MLP(qwen2.MLP):
    """SwiGLU through `fastmath.silu_mul` (MLX's CPU sigmoid is a scalar loop)."""

    @cpu_only
    def __call__(self, x):
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


_CPU_MODULES = (ConvAct, PointwiseAct, DepthwiseConv, ConvMlp, Attention, FinalConv, Projector)
# model class -> ours. A bare mlx-lm Qwen2's attention switches too; switched back it becomes the model's
# `Attention`, which is mlx-lm's own whenever the cache carries no positions.
SWAPS = {qwen2.Attention: Qwen2Attention} | {
    swap.__mro__[1]: swap for swap in (*_CPU_MODULES, Qwen2Attention, Qwen2MLP)
}


def swap_modules(root) -> int:
    """Switch every module of `root` that has a CPU version onto it; returns how many."""
    swapped = 0
    for _, module in root.named_modules():
        if type(module) in SWAPS:
            module.__class__ = SWAPS[type(module)]
            swapped += 1
    return swapped


def unswap_modules(root) -> None:
    """Back to the model's own modules (MLX's ops everywhere)."""
    originals = {swap: plain for plain, swap in SWAPS.items()}
    for _, module in root.named_modules():
        if type(module) in originals:
            module.__class__ = originals[type(module)]
