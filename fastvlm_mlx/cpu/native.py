"""Small C kernels that MLX's CPU backend lacks, built on first use with the system compiler
and cached in the private folder (`private.py`: per user, per CPU). This module must not
import mlx at import time: `blas` uses `build` before mlx is loaded.

Depthwise conv: MLX has no fast CPU kernel for it (`conv2d(groups=C)` is ~20x slower than
torch's), and a fused `mx.compile` graph of shifted multiply-adds is split into ~5 kernels by
MLX's 24-inputs-per-kernel limit, each writing a full-size partial sum. `depthwise` runs one
pass with the accumulators in registers, 8 output pixels x 16 channels at a time, on row bands
split across the cores. It syncs (the input must be evaluated), so it is used on the CPU only.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

from fastvlm_mlx.cpu import private


def compiler() -> str | None:
    """The C compiler builds use: the first of cc, gcc, clang, g++ on PATH."""
    return next(filter(None, map(shutil.which, ("cc", "gcc", "clang", "g++"))), None)


def build(source: str, name: str, flags: tuple[str, ...] = ()) -> str | None:
    """Compile C `source` into a cached shared library in the private folder: its path, or
    None (no compiler, no private folder, or the build failed)."""
    cc = compiler()
    folder = private.machine_folder() if cc else None
    if folder is None:
        return None
    try:
        key = hashlib.sha256(f"{source}{os.path.realpath(cc)}{flags}".encode()).hexdigest()[:16]
        library = os.path.join(folder, f"lib{name}-{key}.so")
        if private.owned_file(library):
            return library
        with tempfile.TemporaryDirectory(dir=folder) as work:
            src, built = os.path.join(work, f"{name}.c"), os.path.join(work, f"{name}.so")
            with open(src, "w") as f:
                f.write(source)
            language = [] if cc.endswith("++") else ["-x", "c"]
            command = [cc, "-O3", "-shared", "-fPIC", *flags, *language, src, "-o", built]
            if subprocess.run(command, capture_output=True, timeout=300).returncode != 0:
                return None
            os.chmod(built, 0o500)  # whatever the umask: owned_file accepts no group or other write
            os.replace(built, library)  # atomic: a concurrent build yields the same file
        return library
    except (OSError, subprocess.SubprocessError):  # disk full, compiler killed, ...
        return None


_DEPTHWISE = """/* fastvlm-mlx: depthwise conv, NHWC float32, zero padding, C a multiple of 16. */
#ifdef __cplusplus
extern "C" {
#endif
typedef float v16 __attribute__((vector_size(64), aligned(4)));

/* n (1 or 8) output pixels from xo on, channels c0..c0+15: taps i in [i0, i1), j in [j0, j1)
   (the ones inside the image); y0 = the input row of tap i = 0. */
static inline __attribute__((always_inline)) void pixels(
    const float* x, const float* w, const float* bias, float* out, int W, int C, int k, int s, int pad,
    int y0, int i0, int i1, int xo, int j0, int j1, int c0, const int n) {
  v16 acc[8];
  for (int p = 0; p < n; ++p) acc[p] = *(const v16*)(bias + c0);
  for (int i = i0; i < i1; ++i) {
    const float* row = x + ((long)(y0 + i) * W) * C + c0;
    for (int j = j0; j < j1; ++j) {
      v16 tap = *(const v16*)(w + (long)(i * k + j) * C + c0);
      for (int p = 0; p < n; ++p) acc[p] += *(const v16*)(row + (long)((xo + p) * s + j - pad) * C) * tap;
    }
  }
  for (int p = 0; p < n; ++p) *(v16*)(out + (long)(xo + p) * C + c0) = acc[p];
}

/* x (H, W, C), w (k, k, C), bias (C); output rows [r0, r1) of out (Ho, Wo, C). */
void depthwise(const float* x, const float* w, const float* bias, float* out, int H, int W, int C,
               int k, int s, int pad, int Wo, int r0, int r1) {
  int inner_lo = (pad + s - 1) / s, inner_hi = (W - k + pad) / s + 1;  /* pixels with every tap inside */
  for (int y = r0; y < r1; ++y) {
    int y0 = y * s - pad, i0 = y0 < 0 ? -y0 : 0, i1 = H - y0 < k ? H - y0 : k;
    float* o = out + (long)y * Wo * C;
    for (int c0 = 0; c0 < C; c0 += 16) {
      int xo = 0;
      for (; xo < Wo && xo < inner_lo; ++xo) {
        int x0 = xo * s - pad, j0 = x0 < 0 ? -x0 : 0, j1 = W - x0 < k ? W - x0 : k;
        pixels(x, w, bias, o, W, C, k, s, pad, y0, i0, i1, xo, j0, j1, c0, 1);
      }
      for (; xo + 8 <= inner_hi; xo += 8) pixels(x, w, bias, o, W, C, k, s, pad, y0, i0, i1, xo, 0, k, c0, 8);
      for (; xo < Wo; ++xo) {
        int x0 = xo * s - pad, j0 = x0 < 0 ? -x0 : 0, j1 = W - x0 < k ? W - x0 : k;
        pixels(x, w, bias, o, W, C, k, s, pad, y0, i0, i1, xo, j0, j1, c0, 1);
      }
    }
  }
}
#ifdef __cplusplus
}
#endif
"""

_LIBRARY: list = []  # [ctypes library or None], once built
_POOL: list = []
_OUT: dict = {}  # output buffers by shape, kept (~50 MB for a 1024^2 image): fresh pages cost more than the kernel
_LOCK = threading.Lock()  # one call at a time uses them


def _library():
    if not _LIBRARY:
        path = build(_DEPTHWISE, "depthwise", ("-march=native",))
        lib = ctypes.CDLL(path) if path else None
        if lib is not None:
            lib.depthwise.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 9
            lib.depthwise.restype = None
        _LIBRARY.append(lib)
    return _LIBRARY[0]


def depthwise(x, weight, bias, stride: int, threads: int):
    """Depthwise conv (padding k // 2) of x (B, H, W, C) by weight (C, k, k, 1) plus bias (C,),
    as an mx.array; None where the kernel does not apply (no compiler, not float32, C % 16)."""
    import mlx.core as mx
    import numpy as np

    B, H, W, C = x.shape
    k = weight.shape[1]
    float32 = x.dtype == weight.dtype == bias.dtype == mx.float32
    if not float32 or C % 16 or weight.shape[0] != C or (lib := _library()) is None:
        return None
    pad = k // 2
    h_out, w_out = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    x = np.ascontiguousarray(mx.contiguous(x))  # evaluates x: a sync, unlike the rest of the tower
    taps = np.ascontiguousarray(np.asarray(weight).reshape(C, k * k).T)
    bias = np.ascontiguousarray(bias)
    with _LOCK:
        out = _OUT.setdefault((B, h_out, w_out, C), np.empty((B, h_out, w_out, C), np.float32))
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(threads))
        cuts = [h_out * i // threads for i in range(threads + 1)]
        shape = (H, W, C, k, stride, pad, w_out)
        jobs = [
            _POOL[0].submit(lib.depthwise, *(a.ctypes.data for a in (x[b], taps, bias, out[b])), *shape, lo, hi)
            for b in range(B)
            for lo, hi in zip(cuts, cuts[1:], strict=False)
        ]
        for job in jobs:
            job.result()
        return mx.array(out)  # a copy: the buffer is reused by the next call of this shape
