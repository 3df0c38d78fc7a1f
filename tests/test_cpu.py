"""The CPU settings: MLX's kernel builds get -march=native, other g++ calls do not; freed
buffers are kept."""

import os
import platform
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest

import fastvlm_mlx

MACROS = ["-dM", "-E", "-x", "c++", "/dev/null"]


def macros(compiler: str, *args: str) -> set[str]:
    out = subprocess.run([compiler, *args, *MACROS], capture_output=True, text=True, check=True).stdout
    return set(out.splitlines())


@pytest.mark.skipif(not fastvlm_mlx.NATIVE_JIT, reason="no g++ wrapper on this platform")
@pytest.mark.skipif(platform.machine() != "x86_64", reason="checks x86 ISA macros")
def test_only_mlx_kernel_builds_get_native_flags():
    wrapper = shutil.which("g++")
    real = shutil.which("g++", path=os.pathsep.join(os.environ["PATH"].split(os.pathsep)[1:]))
    assert wrapper != real and os.path.dirname(wrapper) in os.environ["PATH"].split(os.pathsep)[0]
    kernel_build = ["-fPIC", "-shared", "-I", "/nowhere/mlx/include"]
    assert macros(wrapper, *kernel_build) == macros(real, "-march=native", *kernel_build)
    assert macros(wrapper, "-fPIC", "-shared") == macros(real, "-fPIC", "-shared")
    assert "#define __AVX__ 1" not in macros(wrapper, "-fPIC", "-shared")


def test_opting_out_keeps_path():
    code = "import os, fastvlm_mlx; print(fastvlm_mlx.NATIVE_JIT, 'fastvlm-mlx-jit' in os.environ['PATH'])"
    env = dict(os.environ, FASTVLM_MLX_NO_NATIVE_JIT="1", PATH=os.defpath)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_freed_buffers_are_kept_on_the_cpu():
    if mx.default_device() != mx.cpu:
        pytest.skip("CPU only")
    limit = mx.set_cache_limit(0)
    mx.set_cache_limit(limit)
    assert limit > 32 << 20
