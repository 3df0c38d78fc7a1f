"""Load an optimized BLAS before MLX on Linux.

MLX's Linux CPU wheel links a reference BLAS (~35x slower f32 GEMM). A library loaded with
RTLD_GLOBAL *before* `mlx.core` is first imported takes over MLX's `cblas_*gemm` calls.

First choice: OpenBLAS from pip's `scipy-openblas32`, with its AVX-512 (SkylakeX) kernels
wherever the CPU has AVX-512, AMD's included, whatever OPENBLAS_CORETYPE says for other
OpenBLAS copies (FASTVLM_MLX_OPENBLAS_CORETYPE sets ours). MKL runs AVX2 code on AMD: 190
against 470 GFLOP/s on a 2-core AMD EPYC. The library's symbols carry a `scipy_` prefix, so a
small C shim, built once with the system compiler and cached, forwards `cblas_sgemm` & co.

Without a compiler: MKL, then a system OpenBLAS. FASTVLM_MLX_BLAS=mkl|openblas picks one.
`fastvlm_mlx.cpu` runs `load_optimized_blas` just before the first `import mlx.core`. This
module must not import mlx.
"""

import ctypes
import glob
import importlib.util
import os
import sys
import sysconfig
import warnings

from fastvlm_mlx.cpu.native import build
from fastvlm_mlx.cpu.private import cpu_info

_SYSTEM_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
_AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}  # what OpenBLAS's SkylakeX kernels use
_SHIM = """/* fastvlm-mlx: MLX's cblas_*gemm calls, forwarded to scipy-openblas32 (same arguments). */
#ifdef __cplusplus
extern "C" {
#endif
#define FORWARD(T, S, name) \\
  void scipy_##name(int, int, int, int, int, int, S, const T*, int, const T*, int, S, T*, int); \\
  void name(int o, int ta, int tb, int m, int n, int k, S alpha, const T* a, int lda, const T* b, \\
            int ldb, S beta, T* c, int ldc) { scipy_##name(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc); }
FORWARD(double, double, cblas_dgemm)
FORWARD(void, const void*, cblas_cgemm)

void scipy_cblas_sgemm(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
void scipy_cblas_sgemv(int, int, int, int, float, const float*, int, const float*, int, float, float*, int);

/* One row-major output row (a decode step's matmuls) is a matrix-vector product: OpenBLAS's
   gemv runs it 2-4x faster than its gemm. 101 = row major, 111 = no transpose, 112 = transpose. */
void cblas_sgemm(int o, int ta, int tb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc) {
  if (o == 101 && m == 1) {
    int inc = ta == 111 ? 1 : lda;
    if (beta == 0) for (int i = 0; i < n; ++i) c[i] = 0;  /* MLX's buffers may hold NaN: 0 * NaN */
    if (tb == 111) scipy_cblas_sgemv(101, 112, k, n, alpha, b, ldb, a, inc, beta, c, 1);
    else scipy_cblas_sgemv(101, 111, n, k, alpha, b, ldb, a, inc, beta, c, 1);
    return;
  }
  scipy_cblas_sgemm(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
#ifdef __cplusplus
}
#endif
"""

BLAS_IN_USE = "platform default"


def _search_dirs() -> list[str]:
    prefixes = {sys.prefix, sys.base_prefix, sysconfig.get_config_var("prefix") or ""}
    return [os.path.join(p, "lib") for p in prefixes if p] + list(_SYSTEM_DIRS)


def _first(pattern: str) -> str | None:
    paths = [p for d in _search_dirs() for p in sorted(glob.glob(os.path.join(d, pattern)))]
    return paths[0] if paths else None


def _load_scipy_openblas() -> str | None:
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = glob.glob(os.path.join(spec.submodule_search_locations[0], "lib", "libscipy_openblas*.so*"))
    shim = build(_SHIM, "cblas-shim") if found else None
    if shim is None:
        return None
    # This private copy reads OPENBLAS_CORETYPE once, as it loads; numpy's own OpenBLAS (and
    # child processes) keep seeing the user's value.
    avx512 = _AVX512 <= set((cpu_info("flags") or "").split())
    core = os.environ.get("FASTVLM_MLX_OPENBLAS_CORETYPE") or ("SkylakeX" if avx512 else None)
    users = os.environ.get("OPENBLAS_CORETYPE")
    if core:
        os.environ["OPENBLAS_CORETYPE"] = core
    try:
        openblas = ctypes.CDLL(found[0], mode=ctypes.RTLD_GLOBAL)
    finally:
        if users is None:
            os.environ.pop("OPENBLAS_CORETYPE", None)
        else:
            os.environ["OPENBLAS_CORETYPE"] = users
    ctypes.CDLL(shim, mode=ctypes.RTLD_GLOBAL)
    openblas.scipy_openblas_get_corename.restype = ctypes.c_char_p
    core = openblas.scipy_openblas_get_corename().decode()
    return f"openblas ({core} kernels, {found[0]}, via {shim})"


def _load_mkl() -> str | None:
    path = _first("libmkl_rt.so*")  # pip `mkl` puts it in <prefix>/lib
    if path is None:
        return None
    os.environ.setdefault("MKL_THREADING_LAYER", "GNU")  # no OpenMP runtime clash with torch's
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    return f"mkl ({path})"


def _load_system_openblas() -> str | None:
    path = _first("libopenblas*.so*")
    if path is None:
        return None
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    return f"openblas ({path})"


_LOADERS = {"openblas": (_load_scipy_openblas, _load_system_openblas), "mkl": (_load_mkl,)}


def load_optimized_blas() -> str:
    """Preload the first BLAS that loads; returns a description of the BLAS in use."""
    global BLAS_IN_USE
    if not sys.platform.startswith("linux"):
        return BLAS_IN_USE
    if "mlx.core" in sys.modules:
        warnings.warn(
            "mlx was imported before fastvlm_mlx, so the optimized BLAS could not be "
            "loaded and CPU matmuls are ~35x slower; import fastvlm_mlx first.",
            stacklevel=3,
        )
        BLAS_IN_USE = "reference (mlx imported too early)"
        return BLAS_IN_USE
    order = [_load_scipy_openblas, _load_mkl, _load_system_openblas]
    chosen = os.environ.get("FASTVLM_MLX_BLAS", "").lower()
    if chosen in _LOADERS:
        order = list(_LOADERS[chosen])
    for load in order:
        try:
            found = load()
        except OSError:
            continue
        if found:
            BLAS_IN_USE = found
            return BLAS_IN_USE
    BLAS_IN_USE = "reference (no OpenBLAS or MKL found; pip install scipy-openblas32 mkl)"
    return BLAS_IN_USE
