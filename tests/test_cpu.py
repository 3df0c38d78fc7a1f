"""The CPU settings: MLX's kernel builds get -march=native, other g++ calls do not; freed
buffers are kept."""

import os
import platform
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest

from fastvlm_mlx import cpu, gxx


def macros(compiler: str, source: str, *args: str) -> set[str]:
    command = [compiler, *args, "-dM", "-E", "-x", "c++", source]
    return set(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines())


@pytest.mark.skipif(platform.machine() != "x86_64", reason="checks x86 ISA macros")
def test_only_mlx_kernel_builds_get_native_flags(tmp_path):
    if not cpu.use_native_jit():
        pytest.skip("no g++ here")
    first, *rest = os.environ["PATH"].split(os.pathsep)
    wrapper, real = shutil.which("g++"), shutil.which("g++", path=os.pathsep.join(rest))
    assert wrapper == os.path.join(first, "g++") and real is not None
    os.makedirs(cpu.kernel_folder(), exist_ok=True)
    kernel, elsewhere = os.path.join(cpu.kernel_folder(), f"test-{os.getpid()}.cpp"), str(tmp_path / "mine.cpp")
    for path in (kernel, elsewhere):
        open(path, "w").close()
    try:
        assert macros(wrapper, kernel, "-fPIC", "-shared") == macros(real, kernel, "-march=native", "-fPIC", "-shared")
        assert macros(wrapper, elsewhere, "-fPIC", "-shared") == macros(real, elsewhere, "-fPIC", "-shared")
        assert open(elsewhere).read() == ""  # a source outside MLX's kernel folder is not touched
    finally:
        os.remove(kernel)


def fresh_env() -> dict:
    """This process's environment without the opt-out and without a wrapper put on PATH by an
    earlier test; skips where there is no g++ on Linux."""
    if shutil.which("g++") is None or not sys.platform.startswith("linux"):
        pytest.skip("no g++ here")
    env = {k: v for k, v in os.environ.items() if k != "FASTVLM_MLX_NO_NATIVE_JIT"}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if "fastvlm-mlx-jit" not in p)
    return env


@pytest.mark.parametrize("opt_out", [True, False])
def test_opting_out_keeps_path(opt_out):
    code = (
        "import os; from fastvlm_mlx import cpu; print(cpu.use_native_jit(), 'fastvlm-mlx-jit' in os.environ['PATH'])"
    )
    env = dict(fresh_env(), FASTVLM_MLX_NO_NATIVE_JIT="1") if opt_out else fresh_env()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(not opt_out)] * 2


def test_freed_buffers_are_kept_on_the_cpu():
    if mx.default_device() != mx.cpu:
        pytest.skip("CPU only")
    cpu.keep_freed_buffers()
    limit = mx.set_cache_limit(0)
    mx.set_cache_limit(limit)
    assert limit == cpu.CACHE_LIMIT > 32 << 20


STRIDED = """
import numpy as np, fastvlm_mlx, mlx.core as mx
from fastvlm_mlx import cpu, gxx
assert cpu.use_native_jit()
rng = np.random.default_rng(0)
x, w, t = (rng.standard_normal(s, dtype=np.float32) for s in [(9, 11, 8), (8,), (8, 11)])
unit = mx.compile(lambda x, w: mx.exp(x[1:-1, 2:] * w + 0.5))  # inner stride 1 for all
strided = mx.compile(lambda x, t: x[1:-1, 2:] * t.T[2:] - 1.0)  # t.T: inner stride 11
got = [np.array(unit(mx.array(x), mx.array(w))), np.array(strided(mx.array(x), mx.array(t)))]
want = [np.exp(x[1:-1, 2:] * w + 0.5), x[1:-1, 2:] * t.T[2:] - 1.0]
print(max(float(np.abs(g - v).max() / np.abs(v).max()) for g, v in zip(got, want)))
"""


def test_strided_kernels_get_a_unit_stride_loop_and_stay_right(tmp_path):
    """A slice times a per-channel vector (inner stride 1 everywhere: the new loop) and a slice
    times a transposed input (inner stride 11: the original loop) give numpy's values."""
    env = dict(fresh_env(), TMPDIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", STRIDED], env=env, capture_output=True, text=True, check=True)
    assert float(out.stdout) < 1e-6  # relative to the largest value
    assert (tmp_path / "mlx" / mx.__version__ / "cpu" / gxx.WORKS).is_file()
    sources = [p.read_text() for p in (tmp_path / "mlx").rglob("*.cpp")]
    assert sources and all(s.startswith(gxx.BUILT) for s in sources)
    strided = [s for s in sources if "_strided_" in s]
    assert len(strided) >= 2 and all(gxx.MARK in s and "#pragma GCC ivdep" in s for s in strided)


def test_sources_the_rewrite_does_not_know_are_left_alone():
    assert gxx.unit_stride_loop("int main() { return 0; }") == "int main() { return 0; }"
    kernel = "void k_strided_1(int* shape, int64_t** strides, void** args) {\n  weird();\n}"
    assert gxx.unit_stride_loop(kernel) == kernel


def test_kernels_built_without_the_wrapper_are_dropped(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    folder = tmp_path / "mlx" / mx.__version__ / "cpu"
    folder.mkdir(parents=True)
    for name, source in [("old", "// MLX's own\n"), ("ours", gxx.BUILT + "\n"), ("lost", None)]:
        (folder / f"lib{name}.so").write_bytes(b"")
        if source is not None:
            (folder / f"{name}.cpp").write_text(source)
    cpu._drop_stale_kernels()  # the wrapper never built here (MLX's command changed?): keep all
    assert len(list(folder.glob("*.so"))) == 3
    (folder / gxx.WORKS).write_text("")
    cpu._drop_stale_kernels()
    assert sorted(p.name for p in folder.glob("*.so")) == ["libours.so"]
