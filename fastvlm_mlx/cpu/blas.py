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
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#define FEW_ROWS 8
#define AHEAD 512  /* floats of W's rows prefetched ahead of the tile */
#define FEW_ROWS_MIN_WEIGHTS (1 << 16)
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

/* A few rows times a weight matrix (batched decoding: x @ W.T with 2-8 rows): OpenBLAS's gemm
   runs it at half the memory bandwidth, so each helper thread reads its share of W's rows once
   and takes the dot products with every row of x. */
typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
static inline v16 load16(const float* p) { v16 v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline float hsum(v16 v) {
  v8 lo8, hi8; __builtin_memcpy(&lo8, &v, 32); __builtin_memcpy(&hi8, (char*)&v + 32, 32); v8 s8 = lo8 + hi8;
  v4 lo4, hi4; __builtin_memcpy(&lo4, &s8, 16); __builtin_memcpy(&hi4, (char*)&s8 + 16, 16); v4 s4 = lo4 + hi4;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* c[i][j] for i < mr, j < nr (at most 8 and 4; at most 24 accumulators are used: 4x4, or 8x3):
   alpha * a_i . b_j + beta * c (c unread when beta is 0) */
static inline __attribute__((always_inline)) void tile(int mr, int nr, int k, float alpha, const float* a, int lda,
    const float* b, int ldb, float beta, float* c, int ldc) {
  v16 acc[8][4] = {{{0}}};
  int t = 0;
  for (; t + 16 <= k; t += 16) {
    v16 bv[4];
    for (int j = 0; j < nr; ++j) {
      bv[j] = load16(b + (long)j * ldb + t);
      __builtin_prefetch(b + (long)j * ldb + t + AHEAD, 0, 0);
    }
    for (int i = 0; i < mr; ++i) {
      v16 av = load16(a + (long)i * lda + t);
      for (int j = 0; j < nr; ++j) acc[i][j] += av * bv[j];
    }
  }
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) {
      float s = hsum(acc[i][j]);
      for (int u = t; u < k; ++u) s += a[(long)i * lda + u] * b[(long)j * ldb + u];
      float* out = c + (long)i * ldc + j;
      *out = beta == 0 ? alpha * s : alpha * s + beta * *out;
    }
}

static struct { int m, n, k, lda, ldb, ldc, parts; float alpha, beta; const float *a, *b; float* c; } job;

#define TILE(MR, NR) tile(MR, NR, job.k, job.alpha, a, job.lda, b, job.ldb, job.beta, c, job.ldc)
static void columns(int part) {  /* the part-th share of the columns, in multiples of 16 */
  int share = ((job.n + job.parts - 1) / job.parts + 15) / 16 * 16, j0 = part * share;
  int j1 = j0 + share < job.n ? j0 + share : job.n;
  /* a tile: up to 4 rows of x with 4 of W, or 5-8 of x with 3 of W (at most 24 accumulators in registers) */
  int wide = job.m <= 4 ? 4 : 3;
  for (int j = j0; j < j1; j += wide) {
    int nr = j1 - j < wide ? j1 - j : wide;
    const float* b = job.b + (long)j * job.ldb;
    const float* a = job.a;
    float* c = job.c + j;
    if (nr < wide) tile(job.m, nr, job.k, job.alpha, a, job.lda, b, job.ldb, job.beta, c, job.ldc);
    else switch (job.m) {
      case 8: TILE(8, 3); break; case 7: TILE(7, 3); break; case 6: TILE(6, 3); break; case 5: TILE(5, 3); break;
      case 4: TILE(4, 4); break; case 3: TILE(3, 4); break; default: TILE(2, 4);
    }
  }
}

#define MAX_HELPERS 7
static pthread_mutex_t one_call = PTHREAD_MUTEX_INITIALIZER, mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t go = PTHREAD_COND_INITIALIZER, done = PTHREAD_COND_INITIALIZER;
static long generation;
static int helpers = -1, pending;  /* helpers: -1 until started, per process */

static void* helper(void* arg) {  /* sleeps until the next product, runs its share */
  int part = (int)(long)arg;
  long seen = 0;
  pthread_mutex_lock(&mu);
  for (;;) {
    while (generation == seen) pthread_cond_wait(&go, &mu);
    seen = generation;
    pthread_mutex_unlock(&mu);
    columns(part);
    pthread_mutex_lock(&mu);
    if (--pending == 0) pthread_cond_signal(&done);
  }
  return 0;
}

static void forked_child(void) {  /* a forked child has no helpers and may inherit held locks */
  pthread_mutex_init(&one_call, 0); pthread_mutex_init(&mu, 0);
  pthread_cond_init(&go, 0); pthread_cond_init(&done, 0);
  helpers = -1; generation = 0;
}

static void start_helpers(void) {  /* one per CPU this process may use, but the caller's */
  cpu_set_t set;
  int cpus = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1, wanted = cpus - 1;
  static int registered;
  if (!registered) registered = pthread_atfork(0, 0, forked_child) == 0;
  helpers = 0;
  for (int i = 0; i < wanted && i < MAX_HELPERS; ++i) {
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int failed = pthread_create(&thread, &attr, helper, (void*)(long)(i + 1));
    pthread_attr_destroy(&attr);
    if (failed) break;
    ++helpers;
  }
}

static int few_rows_on = 1;
void fastvlm_few_rows(int on) { few_rows_on = on; }  /* off: OpenBLAS's gemm, for benchmarks (bench.decode_batch) */

static void few_rows(int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
                     float beta, float* c, int ldc) {
  pthread_mutex_lock(&one_call);
  if (helpers < 0) start_helpers();
  job.m = m; job.n = n; job.k = k; job.alpha = alpha; job.beta = beta;
  job.a = a; job.lda = lda; job.b = b; job.ldb = ldb; job.c = c; job.ldc = ldc; job.parts = helpers + 1;
  pthread_mutex_lock(&mu);
  pending = helpers;
  ++generation;
  pthread_cond_broadcast(&go);
  pthread_mutex_unlock(&mu);
  columns(0);
  pthread_mutex_lock(&mu);
  while (pending) pthread_cond_wait(&done, &mu);
  pthread_mutex_unlock(&mu);
  pthread_mutex_unlock(&one_call);
}

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
  if (few_rows_on && o == 101 && ta == 111 && tb == 112 && m <= FEW_ROWS && (long)n * k >= FEW_ROWS_MIN_WEIGHTS) {
    few_rows(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  scipy_cblas_sgemm(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
#ifdef __cplusplus
}
#endif
"""

BLAS_IN_USE = "platform default"
_SHIM_IN_USE: list[str] = []  # the loaded shim's path, once loaded


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
    shim = build(_SHIM, "cblas-shim", ("-march=native", "-pthread")) if found else None
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
    _SHIM_IN_USE[:] = [shim]
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


def use_few_rows_kernel(on: bool) -> bool:
    """Turn the shim's 2-8-row kernel on (the default) or off (OpenBLAS's gemm instead), for A/B
    benchmarks; False when no shim is loaded."""
    if not _SHIM_IN_USE:
        return False
    ctypes.CDLL(_SHIM_IN_USE[0]).fastvlm_few_rows(int(on))
    return True


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
