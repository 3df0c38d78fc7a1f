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
# tanh(h) on [-7.9, 7.9] as h * P(h^2) / Q(h^2) (Eigen's float32 fit, lowest power first). SiLU(x) =
# x sigmoid(x) = x/2 (1 + tanh(x/2)) = x/2 + u P'(u) / Q'(u) with u = x^2, the halvings folded in.
# Beyond |x| = 2 * 7.9, float32 tanh is exactly +-1: SiLU is x or 0.
_TANH_P = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08)
_TANH_P += (-8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
_SILU_P = tuple(c / (4 * 4**i) for i, c in enumerate(_TANH_P))
_SILU_Q = tuple(c / 4**i for i, c in enumerate(_TANH_Q))
_SILU_TAIL = 2 * 7.90531110763549805
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
    """Erf GELU to ~1.5e-6 absolute, as a graph to fuse (inside other compiled functions).
    Computed in float32 (x^8 overflows float16)."""
    x32 = x.astype(mx.float32)
    u = x32 * x32
    inner = 0.5 * x32 + u * (polynomial(_GELU_P, u) / polynomial(_GELU_Q, u))
    return mx.where(x32 > _GELU_TAIL, x32, mx.where(x32 < -_GELU_TAIL, 0.0, inner)).astype(x.dtype)


# Not shapeless: MLX then emits a generic strided loop, ~5x slower on CPU.
gelu = mx.compile(exact_gelu)


@mx.compile
def silu_mul(gate: mx.array, x: mx.array) -> mx.array:
    """SiLU(gate) * x (SwiGLU): SiLU to ~3e-6 absolute for |gate| < 16 and exact beyond, times
    x; float32 inside."""
    g = gate.astype(mx.float32)
    u = g * g
    silu = 0.5 * g + u * (polynomial(_SILU_P, u) / polynomial(_SILU_Q, u))
    silu = mx.where(g > _SILU_TAIL, g, mx.where(g < -_SILU_TAIL, 0.0, silu))
    return (silu * x.astype(mx.float32)).astype(x.dtype)


def _exp_nonpositive(t: mx.array) -> mx.array:
    """exp(t) for float32 t <= 0 (-inf included) to < 1.5e-6 absolute: what softmax needs."""
    t = mx.where(t < -40.0, -40.0, t)
    p = polynomial(_EXP_TAYLOR, t)
    for _ in range(4):
        p = p * p
    return mx.where(t <= -40.0, 0.0, p)


exp_nonpositive = mx.compile(_exp_nonpositive)


@mx.compile
def _shifted_exp(scores: mx.array, row_max: mx.array) -> mx.array:
    """exp(scores - row_max) in one loop (the broadcast max makes it a strided kernel)."""
    return _exp_nonpositive(scores - row_max)


def _row_max(scores: mx.array) -> mx.array:
    """Max over the last axis, keepdims. MLX's CPU row max is a scalar loop; reducing 16-wide
    column blocks first (a vectorized strided reduce) halves it. Same values."""
    *lead, S = scores.shape
    if S % 16 or S < 64:
        return scores.max(axis=-1, keepdims=True)
    return scores.reshape(*lead, S // 16, 16).max(axis=-2).max(axis=-1, keepdims=True)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None = None) -> mx.array:
    """Softmax attention over q (B, H, L, d), k and v (B, Hk, S, d) with H a multiple of Hk.

    mask: None, "causal" (the L queries are the last L of the S positions), or a boolean (True
    attends) or additive array that broadcasts to (B, H, L, S) with its head axis 1 or H: (L, S), or a
    batch's (B, 1, L, S) or (B, H, L, S), as mlx-lm's caches make them; other sizes are refused.
    The query heads that share a key head are stacked into one GEMM's rows (no broadcast copies
    of k and v). Scores and softmax are float32; max-shifted scores go through `exp_nonpositive`,
    and the normalization comes after @ v, with the row sums from that GEMM (MLX's CPU row sum is
    a scalar loop).
    """
    B, H, L, d = q.shape
    Hk, S = k.shape[1], k.shape[2]
    groups = H // Hk  # grouped-query attention: query head h reads key head h // groups
    scores = ((q * scale).reshape(B, Hk, groups * L, d) @ k.swapaxes(-1, -2)).astype(mx.float32)
    if isinstance(mask, str):
        mask = mx.arange(S)[None] <= mx.arange(S - L, S)[:, None]
    if mask is not None:
        if mask.ndim > 2:  # (B or 1, H or 1, L or 1, S), to the scores' grouped heads (B, Hk, groups, L, S)
            mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
            if mask.ndim != 4 or mask.shape[1] not in (1, H):
                raise ValueError(f"attention takes (L, S) masks or a batch's (B, 1 or H, L, S), not {mask.shape}")
            per_head = mask.shape[1] == H
            mask = mask.reshape(mask.shape[0], Hk if per_head else 1, groups if per_head else 1, *mask.shape[2:])
        lowest = mx.finfo(mx.float32).min  # a fully masked row stays finite, as in mx.fast
        grouped = scores.reshape(B, Hk, groups, L, S)
        grouped = mx.where(mask, grouped, lowest) if mask.dtype == mx.bool_ else grouped + mask.astype(mx.float32)
        scores = grouped.reshape(B, Hk, groups * L, S)
    weights = _shifted_exp(scores, _row_max(scores))
    # the row sums come out of the same GEMM as weights @ v, as a column of ones in v
    v = v.astype(mx.float32)
    out = weights @ mx.concatenate([v, mx.ones((*v.shape[:-1], 1), mx.float32)], axis=-1)
    out = out[..., :d] / out[..., d:]
    return out.reshape(B, H, L, d).astype(q.dtype)
