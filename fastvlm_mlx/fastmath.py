"""GELU, exp and softmax attention written for MLX's CPU backend.

MLX's CPU erf and exp are scalar library calls (so are softmax and the CPU fallback of
`mx.fast.scaled_dot_product_attention`). Written as polynomials and selects under `mx.compile`,
they become one vectorized loop each. Two MLX limits shape the code: a fused kernel holds at
most 11 levels of ops (constants count), and min/max test for NaN, which stops GCC from
vectorizing, so tails use `where`.
"""

import math

import mlx.core as mx

# erf(z) on [-4, 4] as z * P(z^2) / Q(z^2) (Eigen's float32 fit, lowest power first).
_ERF_P = (-1.60960333262415e-02, -2.95459980854025e-03, -7.34990630326855e-04, -5.69250639462346e-05)
_ERF_P += (-2.10102402082508e-06, 2.77068142495902e-08, -2.72614225801306e-10)
_ERF_Q = (-1.42647390514189e-02, -7.37332916720468e-03, -1.68282697438203e-03, -2.13374055278905e-04)
_ERF_Q += (-1.45660718464996e-05,)
# GELU(x) = x/2 (1 + erf(x / sqrt 2)) = x/2 + u P'(u) / Q'(u) with u = x^2, the 1/sqrt 2 and 1/2
# folded into the coefficients. Beyond |x| = 4 sqrt 2, float32 erf is exactly +-1: GELU is x or 0.
_GELU_P = tuple(0.5 * c / (2**0.5 * 2**i) for i, c in enumerate(_ERF_P))
_GELU_Q = tuple(c / 2**i for i, c in enumerate(_ERF_Q))
_GELU_TAIL = 4 * 2**0.5
# exp(t) for t <= 0 as P(t)^16, P the degree-7 Taylor polynomial of exp(t / 16); 0 below -40.
_EXP_TAYLOR = tuple(1 / (math.factorial(i) * 16**i) for i in range(8))


def polynomial(coeffs: tuple[float, ...], t: mx.array) -> mx.array:
    """Estrin's scheme (lowest power first): a shallow graph."""
    terms = [coeffs[i] + coeffs[i + 1] * t for i in range(0, len(coeffs) - 1, 2)]
    terms += [coeffs[-1]] if len(coeffs) % 2 else []
    power = t * t
    while len(terms) > 1:
        pairs = range(0, len(terms) - 1, 2)
        terms = [terms[i] + terms[i + 1] * power for i in pairs] + ([terms[-1]] if len(terms) % 2 else [])
        power = power * power
    return terms[0]


def exact_gelu(x: mx.array) -> mx.array:
    """Erf GELU to ~1.5e-6 absolute, as a graph to fuse (inside other compiled functions)."""
    u = x * x
    inner = 0.5 * x + u * (polynomial(_GELU_P, u) / polynomial(_GELU_Q, u))
    return mx.where(x > _GELU_TAIL, x, mx.where(x < -_GELU_TAIL, 0.0, inner))


# Not shapeless: MLX then emits a generic strided loop, ~5x slower on CPU.
gelu = mx.compile(exact_gelu)


@mx.compile
def exp_nonpositive(t: mx.array) -> mx.array:
    """exp(t) for t <= 0 (-inf included) to < 1.5e-6 absolute: what softmax needs."""
    t = mx.where(t < -40.0, -40.0, t)
    p = polynomial(_EXP_TAYLOR, t)
    for _ in range(4):
        p = p * p
    return mx.where(t <= -40.0, 0.0, p)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """Softmax attention over q (B, H, L, d), k and v (B, Hk, S, d) with H a multiple of Hk.

    mask: None, "causal" (the L queries are the last L of the S positions), a boolean array
    (True attends) or an additive one, broadcastable to (L, S). Max-shifted scores go through
    `exp_nonpositive`; the normalization comes after @ v, on the small side.
    """
    B, H, L, d = q.shape
    groups = H // k.shape[1]
    if groups > 1:  # grouped-query attention: each key head serves `groups` query heads
        q, k, v = q.reshape(B, -1, groups, L, d), k[:, :, None], v[:, :, None]
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if isinstance(mask, str):
        S = scores.shape[-1]
        mask = mx.arange(S)[None] <= mx.arange(S - L, S)[:, None]
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask
    weights = exp_nonpositive(scores - scores.max(axis=-1, keepdims=True))
    out = (weights @ v) / weights.sum(axis=-1, keepdims=True)
    return out.reshape(B, H, L, d)


def use_for_mlx_lm_qwen2() -> None:
    """Route mlx-lm's Qwen2 attention through `attention` on the CPU (prefill of a 0.5B model
    spends ~0.2 s in scalar exp otherwise). Elsewhere, and for quantized KV caches, attention
    sinks or masks of other shapes, mlx-lm's own function runs. Idempotent."""
    from mlx_lm.models import base, qwen2

    if getattr(qwen2.scaled_dot_product_attention, "routed_by_fastvlm_mlx", False):
        return

    def routed(queries, keys, values, cache, scale, mask, sinks=None):
        plain_mask = mask is None or isinstance(mask, str) or mask.ndim <= 2
        if mx.default_device() != mx.cpu or sinks is not None or hasattr(cache, "bits") or not plain_mask:
            return base.scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks)
        return attention(queries, keys, values, scale, mask)

    routed.routed_by_fastvlm_mlx = True
    qwen2.scaled_dot_product_attention = routed
