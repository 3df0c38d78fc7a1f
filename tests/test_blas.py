"""The BLAS that MLX's matmuls go through on Linux: OpenBLAS behind the cblas shim when a C
compiler is there, giving numpy's values for every gemm MLX calls (one output row: OpenBLAS's
gemv; 2-8 rows times a weight matrix: the shim's threaded kernel); MKL when asked."""

import os
import shutil
import subprocess
import sys

import pytest

LINUX = sys.platform.startswith("linux")

GEMMS = """
import numpy as np, fastvlm_mlx, mlx.core as mx
print(fastvlm_mlx.BLAS)
rng = np.random.default_rng(0)
worst = 0.0
for dtype in (np.float32, np.float64, np.complex64):
    # 2-8 rows with n * k >= 65536 take the shim's own kernel: tails of k (not a multiple of 16) and n
    shapes = [(1, 7, 5), (1, 900, 300), (37, 53, 29), (300, 96, 200), (2, 1000, 300), (3, 333, 257)]
    for m, k, n in shapes + [(5, 17, 4000), (7, 64, 1030), (4, 896, 4864), (8, 700, 100)]:
        a, b = rng.standard_normal((m, k)), rng.standard_normal((n, k))
        if dtype == np.complex64:
            a, b = a + 1j * rng.standard_normal((m, k)), b + 1j * rng.standard_normal((n, k))
        a, b = a.astype(dtype), b.astype(dtype)
        wide = a.astype(np.complex128 if dtype == np.complex64 else np.float64)
        with mx.stream(mx.cpu):  # both layouts of b: one row of output takes the shim's gemv path
            got = [np.array(mx.array(a) @ mx.array(b).T), np.array(mx.array(a) @ mx.array(np.ascontiguousarray(b.T)))]
            if dtype == np.float32:  # alpha and beta: C = 0.5 a b^T + 2 C
                c = rng.standard_normal((m, n)).astype(dtype)
                out = np.array(mx.addmm(mx.array(c), mx.array(a), mx.array(b).T, alpha=0.5, beta=2.0))
                got.append((out - 2 * c) / 0.5)
        for g in got:
            worst = max(worst, float(np.abs(g - wide @ b.T).max() / np.abs(wide @ b.T).max()))
print(worst)
"""

# The shim's kernel called straight (ctypes drops the GIL): from 4 threads at once, and in a
# forked child after its helper threads started (a child has none; it must not wait for them).
SHIM_THREADS = """
import ctypes, os, re, signal, threading, numpy as np, fastvlm_mlx, mlx.core  # mlx: the BLAS preload
shim = ctypes.CDLL(re.search(r"via (.+)\\)$", fastvlm_mlx.BLAS).group(1))
P, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
shim.cblas_sgemm.argtypes = [I] * 6 + [F, P, I, P, I, F, P, I]

def product(m, n, k, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32)
    c = np.full((m, n), np.nan, np.float32)  # beta 0: never read
    shim.cblas_sgemm(101, 111, 112, m, n, k, 1.0, a.ctypes.data, k, b.ctypes.data, k, 0.0, c.ctypes.data, n)
    want = a.astype(np.float64) @ b.T
    return float(np.abs(c - want).max() / np.abs(want).max())

errors = []
def worker(t):
    errors.extend(product(2 + (t + i) % 6, 1000 + 37 * i, 300 + t, 10 * t + i) for i in range(20))
threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
pid = os.fork()
if pid == 0:
    signal.alarm(20)  # a child left waiting for helpers dies here instead of hanging
    os._exit(0 if product(3, 5000, 200, 1) < 1e-5 else 3)
_, status = os.waitpid(pid, 0)
print(len(errors), max(errors), os.waitstatus_to_exitcode(status))
"""


def skip_without_a_compiler() -> None:
    from fastvlm_mlx.cpu import native

    if native.build("int probe(void) { return 1; }\n", "probe") is None:
        pytest.skip("no C compiler or no private cache folder here")


def run(env_extra: dict) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTVLM_MLX_")}
    out = subprocess.run([sys.executable, "-c", GEMMS], env=env | env_extra, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.skipif(not LINUX, reason="BLAS preloading is Linux-only")
def test_openblas_behind_the_shim_gives_numpys_products():
    skip_without_a_compiler()
    blas, worst = run({})
    assert blas.startswith("openblas (") and "via" in blas
    assert float(worst) < 1e-5  # float32 sums of up to 96 terms, relative to the largest


@pytest.mark.skipif(not LINUX, reason="BLAS preloading is Linux-only")
def test_the_shims_few_rows_kernel_from_threads_and_after_fork():
    skip_without_a_compiler()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTVLM_MLX_")}
    out = subprocess.run([sys.executable, "-c", SHIM_THREADS], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    count, worst, child = out.stdout.split()
    assert int(count) == 80 and float(worst) < 1e-5 and child == "0"


@pytest.mark.skipif(not LINUX or not os.path.exists(os.path.join(sys.prefix, "lib")), reason="Linux venvs")
def test_mkl_when_asked():
    if not [f for f in os.listdir(os.path.join(sys.prefix, "lib")) if f.startswith("libmkl_rt")]:
        pytest.skip("no MKL here")
    blas, worst = run({"FASTVLM_MLX_BLAS": "mkl"})
    assert blas.startswith("mkl (") and float(worst) < 1e-5


@pytest.mark.skipif(not LINUX, reason="BLAS preloading is Linux-only")
def test_the_users_openblas_coretype_is_left_as_it_was():
    code = "import os, fastvlm_mlx; print(os.environ.get('OPENBLAS_CORETYPE'))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTVLM_MLX_")}
    for value in ("Haswell", None):
        env = {k: v for k, v in env.items() if k != "OPENBLAS_CORETYPE"}
        env |= {"OPENBLAS_CORETYPE": value} if value else {}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == str(value)


def test_native_libraries_are_built_only_in_a_private_folder(tmp_path, monkeypatch):
    from fastvlm_mlx.cpu import native, private

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(private, "_FOLDER", [])
    source = "int answer(void) { return 42; }\n"
    built = native.build(source, "answer")
    assert built and os.path.dirname(built) == str(tmp_path / "fastvlm-mlx" / private.cpu_key())
    assert __import__("ctypes").CDLL(built).answer() == 42
    assert native.build("this is not C", "broken") is None
    os.chmod(tmp_path / "fastvlm-mlx", 0o777)  # others could plant a library there: not used
    monkeypatch.setattr(private, "_FOLDER", [])
    elsewhere = native.build(source, "answer")
    assert elsewhere is None or not elsewhere.startswith(str(tmp_path))


@pytest.mark.skipif(not LINUX, reason="BLAS preloading is Linux-only")
def test_decode_batch_bench_times_the_kernel_on_and_off(tiny_mlx, tmp_path):
    import json

    skip_without_a_compiler()
    command = [sys.executable, "-m", "bench.decode_batch", "--model", str(tiny_mlx), "--batches", "1,3"]
    command += ["--steps", "2", "--rounds", "2", "--context", "8", "--out", str(tmp_path)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    written = json.loads((tmp_path / "decode-batch-mlx.json").read_text())
    for batch in ("1", "3"):
        for mode in ("on", "off"):
            runs = written["step_ms"][batch][mode]["runs"]
            assert len(runs) == 2 and all(t > 0 for t in runs)
    assert (tmp_path / "decode-batch-mlx.png").stat().st_size > 1000
    assert "kernel" in out.stdout and "OpenBLAS" in out.stdout
