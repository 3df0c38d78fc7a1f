"""MLX's CPU kernel builds: where they live, which flags they get, and the buffer cache.

- Kernel folder. `mx.compile` on the CPU writes C++ into `temp_directory_path()/mlx/<version>/cpu`,
  builds it with `g++` from PATH and later loads any library it finds there by name. A shared
  TMPDIR would let another user plant kernels that run inside our process (and their folder
  would stop our builds). `private_kernel_folder` points TMPDIR, for this process and its
  children, at a folder inside the private one (`private.py`); where there is none, MLX's
  compile is turned off (its ops then run one by one: slower, still right).
- Flags. MLX builds for the baseline ISA (SSE2 on x86-64) and writes strided loops as pointer
  bumps that GCC leaves scalar. With the backend on, a `g++` wrapper in the private folder,
  first on PATH, adds `-march=native` to builds of sources in our kernel folder and gives
  strided kernels a unit-stride innermost loop (`gxx.py`); any other g++ call passes through
  unchanged, so children that inherit the PATH lose nothing. Kernels built with and without
  the wrapper live in different folders, so neither is ever deleted to be rebuilt.
- Buffer cache. MLX's CPU allocator keeps at most 32 MB of freed buffers, so every larger
  intermediate comes back as fresh pages from the OS (`x * 2` on a 50 MB array: 22 ms, 3 ms
  with the cache). Raised to a quarter of the memory this process may use, at most 4 GiB.
"""

import contextlib
import hashlib
import os
import platform
import shlex
import shutil
import sys

from fastvlm_mlx.cpu import private

_WRAPPER = """#!/bin/sh
# fastvlm-mlx: shared-library builds go through gxx.py, which changes builds of sources in
# {folder} only; any other g++ call is unchanged.
case "$*" in
  *-shared*.cpp*) exec {python} -I -S {script} {real} {folder} "$@" ;;
esac
exec {real} "$@"
"""
_MAX_CACHE = 4 << 30

KERNEL_FOLDER: list = []  # [the TMPDIR given to MLX, or None], once chosen
CACHE_LIMIT = None  # bytes, once keep_freed_buffers raised it


def _real_gxx() -> str | None:
    """g++ from PATH, skipping our own wrapper folders."""
    root = private.machine_folder()
    path = os.environ.get("PATH", os.defpath).split(os.pathsep)
    path = [p for p in path if not (root and os.path.realpath(p).startswith(os.path.realpath(root) + os.sep))]
    return shutil.which("g++", path=os.pathsep.join(path))


def native_flags_apply() -> bool:
    """Linux on x86-64 or arm64, with a g++ to wrap."""
    linux = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64")
    return linux and _real_gxx() is not None


def _install_wrapper(kernels: str) -> bool:
    """Write the g++ wrapper into the private folder (named by its content) and put that folder
    first on PATH; True when in place."""
    real = _real_gxx()
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gxx.py")
    values = map(shlex.quote, (real, sys.executable, script, kernels))
    text = _WRAPPER.format(**dict(zip(("real", "python", "script", "folder"), values, strict=True)))
    folder = private.subfolder(f"bin-{hashlib.sha256(text.encode()).hexdigest()[:12]}")
    if folder is None:
        return False
    wrapper = os.path.join(folder, "g++")
    if not private.owned_file(wrapper):
        partial = f"{wrapper}.{os.getpid()}"
        try:
            with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o700), "w") as f:
                f.write(text)
            os.chmod(partial, 0o700)  # whatever the umask
            os.replace(partial, wrapper)
        except OSError:  # disk full, quota, read-only home: MLX's own flags instead
            with contextlib.suppress(OSError):
                os.remove(partial)
            return False
    os.environ["PATH"] = os.pathsep.join([folder, *os.environ.get("PATH", os.defpath).split(os.pathsep)])
    return True


def private_kernel_folder(native: bool) -> str | None:
    """Give MLX's kernel cache a private TMPDIR (once per process; `native`: through the g++
    wrapper where it applies). Returns the folder, or None after turning MLX's compile off."""
    import mlx.core as mx

    if KERNEL_FOLDER:
        return KERNEL_FOLDER[0]
    native = native and native_flags_apply()
    folder = private.subfolder("mlx-kernels-native" if native else "mlx-kernels")
    if folder and native and not _install_wrapper(os.path.join(folder, "mlx", mx.__version__, "cpu")):
        folder = private.subfolder("mlx-kernels")  # kernels of MLX's own flags live apart
    if folder:
        # putenv, not os.environ: MLX (C++) reads it at each build, Python's tempfile keeps the user's
        os.putenv("TMPDIR", folder)
    else:
        mx.disable_compile()  # nowhere safe to build and load kernels
    KERNEL_FOLDER.append(folder)
    return folder


def native_jit() -> bool:
    """Whether MLX's kernel builds go through the g++ wrapper in this process."""
    return bool(KERNEL_FOLDER and KERNEL_FOLDER[0] and KERNEL_FOLDER[0].endswith("-native"))


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
