"""The BLAS that MLX's matmuls go through on Linux: OpenBLAS behind the cblas shim when a C
compiler is there, giving numpy's values for every gemm MLX calls; MKL when asked."""

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
    for m, k, n in [(1, 7, 5), (1, 900, 300), (37, 53, 29), (300, 96, 200)]:
        a, b = rng.standard_normal((m, k)), rng.standard_normal((n, k))
        if dtype == np.complex64:
            a, b = a + 1j * rng.standard_normal((m, k)), b + 1j * rng.standard_normal((n, k))
        a, b = a.astype(dtype), b.astype(dtype)
        wide = a.astype(np.complex128 if dtype == np.complex64 else np.float64)
        with mx.stream(mx.cpu):  # both layouts of b: one row of output takes the shim's gemv path
            got = [np.array(mx.array(a) @ mx.array(b).T), np.array(mx.array(a) @ mx.array(np.ascontiguousarray(b.T)))]
        for g in got:
            worst = max(worst, float(np.abs(g - wide @ b.T).max() / np.abs(wide @ b.T).max()))
print(worst)
"""


def run(env_extra: dict) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTVLM_MLX_")}
    out = subprocess.run([sys.executable, "-c", GEMMS], env=env | env_extra, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.skipif(not LINUX, reason="BLAS preloading is Linux-only")
def test_openblas_behind_the_shim_gives_numpys_products():
    from fastvlm_mlx.cpu import native

    if native.build("int probe(void) { return 1; }\n", "probe") is None:
        pytest.skip("no C compiler or no private cache folder here")
    blas, worst = run({})
    assert blas.startswith("openblas (") and "via" in blas
    assert float(worst) < 1e-5  # float32 sums of up to 96 terms, relative to the largest


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
