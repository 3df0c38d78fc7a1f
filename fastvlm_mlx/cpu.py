"""Settings that make MLX's CPU backend much faster on Linux; `tune_cpu` applies them (no effect
on Metal or CUDA). `load_model` calls it; so do the benchmarks that build models themselves.

- Kernel compiler flags. `mx.compile` turns elementwise graphs into C++ that MLX builds with
  `g++ -O3` for the baseline ISA (SSE2 on x86-64): GCC then leaves selects scalar and uses
  4-wide vectors at best. A `g++` wrapper put first on this process's PATH adds `-march=native`
  to MLX's own kernel builds and gives strided kernels a vectorizable unit-stride loop
  (`gxx.py`); every other g++ call passes through unchanged. MLX caches built kernels in
  $TMPDIR/mlx by name only, so kernels found there that the wrapper did not build are deleted
  once, to be rebuilt. FASTVLM_MLX_NO_NATIVE_JIT=1 keeps MLX's own flags and loops for kernels
  built from then on (delete $TMPDIR/mlx to rebuild those already built). Built kernels suit
  this machine's CPU only: do not share $TMPDIR/mlx between different machines.
- Buffer cache. MLX's CPU allocator keeps at most 32 MB of freed buffers, so every larger
  intermediate comes back as fresh pages from the OS and page faults dominate elementwise
  work (`x * 2` on a 50 MB array: 22 ms, 3 ms with the cache). Raised to a quarter of the
  memory this process may use, at most 4 GiB.
"""

import atexit
import contextlib
import os
import platform
import shlex
import shutil
import sys
import tempfile

_WRAPPER_PREFIX = "fastvlm-mlx-jit-"
_WRAPPER = """#!/bin/sh
# fastvlm-mlx: shared-library builds go through gxx.py, which changes MLX's kernel builds in
# {folder} only; any other g++ call is unchanged.
case "$*" in
  *-shared*.cpp*) exec {python} -I -S {script} {real} {folder} "$@" ;;
esac
exec {real} "$@"
"""
_MAX_CACHE = 4 << 30

NATIVE_JIT = False
CACHE_LIMIT = None  # bytes, once tune_cpu raised it


def use_native_jit() -> bool:
    """Put the g++ wrapper first on PATH (Linux x86-64/arm64 with g++); True when in place."""
    global NATIVE_JIT
    if NATIVE_JIT or os.environ.get("FASTVLM_MLX_NO_NATIVE_JIT"):
        return NATIVE_JIT
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "aarch64"):
        return False
    path = os.environ.get("PATH", os.defpath).split(os.pathsep)
    path = [p for p in path if not os.path.basename(p).startswith(_WRAPPER_PREFIX)]  # a parent's wrapper
    real = shutil.which("g++", path=os.pathsep.join(path))
    if real is None:
        return False
    folder = tempfile.mkdtemp(prefix=_WRAPPER_PREFIX)
    wrapper = os.path.join(folder, "g++")
    with open(wrapper, "w") as f:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gxx.py")
        quoted = map(shlex.quote, (real, sys.executable, script, kernel_folder()))
        f.write(_WRAPPER.format(**dict(zip(("real", "python", "script", "folder"), quoted, strict=True))))
    os.chmod(wrapper, 0o755)
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))
    os.environ["PATH"] = os.pathsep.join([folder, *path])
    NATIVE_JIT = True
    _drop_stale_kernels()
    return True


def kernel_folder() -> str:
    """Where MLX keeps its built CPU kernels (std::filesystem::temp_directory_path's rule)."""
    import mlx.core as mx

    tmp = next((os.environ[v] for v in ("TMPDIR", "TMP", "TEMP", "TEMPDIR") if os.environ.get(v)), "/tmp")
    return os.path.join(tmp, "mlx", mx.__version__, "cpu")


def _drop_stale_kernels() -> None:
    """Delete cached kernels that were not built through the wrapper: MLX finds them by name
    only and would never rebuild them. Only once the wrapper has built a kernel in this folder
    (its WORKS file): were MLX's build command to change so that the wrapper no longer sees it,
    nothing would be rebuilt in vain."""
    from fastvlm_mlx.gxx import BUILT, WORKS

    folder = kernel_folder()
    names = os.listdir(folder) if os.path.isfile(os.path.join(folder, WORKS)) else []
    for name in names:
        if not (name.startswith("lib") and name.endswith(".so")):
            continue
        try:
            with open(os.path.join(folder, name[3:-3] + ".cpp")) as f:
                if f.read(len(BUILT)) == BUILT:
                    continue
        except OSError:
            pass  # no source: rebuild
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, name))


def _usable_memory() -> int:
    """Physical memory, or the cgroup's limit when lower (containers)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit) as f:
                memory = min(memory, int(f.read().strip()))
        except (OSError, ValueError):  # missing, or "max"
            continue
    return memory


def keep_freed_buffers() -> None:
    """On the CPU, let MLX's allocator keep freed buffers (never lowers a limit already set)."""
    import mlx.core as mx

    global CACHE_LIMIT
    if CACHE_LIMIT is not None or mx.default_device() != mx.cpu or not hasattr(os, "sysconf"):
        return  # once per process: reading the limit (set_cache_limit(0)) also empties the cache
    current = mx.set_cache_limit(0)
    CACHE_LIMIT = max(current, min(_usable_memory() // 4, _MAX_CACHE))
    mx.set_cache_limit(CACHE_LIMIT)


def tune_cpu() -> None:
    use_native_jit()
    keep_freed_buffers()
