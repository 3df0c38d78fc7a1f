"""The CPU settings: MLX's kernel builds get -march=native, other g++ calls do not; freed
buffers are kept."""

import os
import platform
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest

from fastvlm_mlx import cpu

MACROS = ["-dM", "-E", "-x", "c++", "/dev/null"]


def macros(compiler: str, *args: str) -> set[str]:
    out = subprocess.run([compiler, *args, *MACROS], capture_output=True, text=True, check=True).stdout
    return set(out.splitlines())


@pytest.mark.skipif(platform.machine() != "x86_64", reason="checks x86 ISA macros")
def test_only_mlx_kernel_builds_get_native_flags():
    if not cpu.use_native_jit():
        pytest.skip("no g++ here")
    first, *rest = os.environ["PATH"].split(os.pathsep)
    wrapper, real = shutil.which("g++"), shutil.which("g++", path=os.pathsep.join(rest))
    assert wrapper == os.path.join(first, "g++") and real is not None
    kernel_build = ["-fPIC", "-shared", "-I", "/nowhere/mlx/include"]
    assert macros(wrapper, *kernel_build) == macros(real, "-march=native", *kernel_build)
    assert macros(wrapper, "-fPIC", "-shared") == macros(real, "-fPIC", "-shared")


@pytest.mark.parametrize("opt_out", [True, False])
def test_opting_out_keeps_path(opt_out):
    if shutil.which("g++") is None or not sys.platform.startswith("linux"):
        pytest.skip("no g++ here")
    code = (
        "import os; from fastvlm_mlx import cpu; print(cpu.use_native_jit(), 'fastvlm-mlx-jit' in os.environ['PATH'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTVLM_MLX_NO_NATIVE_JIT"}
    path = [p for p in env["PATH"].split(os.pathsep) if "fastvlm-mlx-jit" not in p]  # ours, from other tests
    env["PATH"] = os.pathsep.join(path)
    env = dict(env, FASTVLM_MLX_NO_NATIVE_JIT="1") if opt_out else env
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(not opt_out)] * 2


def test_freed_buffers_are_kept_on_the_cpu():
    if mx.default_device() != mx.cpu:
        pytest.skip("CPU only")
    cpu.keep_freed_buffers()
    limit = mx.set_cache_limit(0)
    mx.set_cache_limit(limit)
    assert limit == cpu.CACHE_LIMIT > 32 << 20
