"""Load an optimized BLAS before MLX on Linux.

MLX's Linux CPU wheel links a reference BLAS (~35x slower f32 GEMM). Loading MKL or
OpenBLAS with RTLD_GLOBAL *before* `mlx.core` is first imported makes MLX's `cblas_*`
calls resolve to it. This module must not import mlx.
"""

import ctypes
import glob
import os
import sys
import sysconfig
import warnings

_CANDIDATES = (
    ("mkl", "libmkl_rt.so*"),  # pip `mkl` puts it in <prefix>/lib
    ("openblas", "libopenblas*.so*"),
)
_SYSTEM_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")

BLAS_IN_USE = "platform default"


def _search_dirs() -> list[str]:
    prefixes = {sys.prefix, sys.base_prefix, sysconfig.get_config_var("prefix") or ""}
    return [os.path.join(p, "lib") for p in prefixes if p] + list(_SYSTEM_DIRS)


def _find_library() -> tuple[str, str] | None:
    for name, pattern in _CANDIDATES:
        for directory in _search_dirs():
            for path in sorted(glob.glob(os.path.join(directory, pattern))):
                yield name, path


def load_optimized_blas() -> str:
    """Preload the first BLAS that loads; returns a description of the BLAS in use."""
    global BLAS_IN_USE
    if not sys.platform.startswith("linux") or os.environ.get("FASTVLM_MLX_NO_BLAS"):
        return BLAS_IN_USE
    if "mlx.core" in sys.modules:
        warnings.warn(
            "mlx was imported before fastvlm_mlx, so the optimized BLAS could not be "
            "loaded and CPU matmuls are ~35x slower; import fastvlm_mlx first.",
            stacklevel=3,
        )
        BLAS_IN_USE = "reference (mlx imported too early)"
        return BLAS_IN_USE
    for name, path in _find_library():
        try:
            if name == "mkl":
                # MKL's sequential layer avoids OpenMP runtimes clashing with torch's.
                os.environ.setdefault("MKL_THREADING_LAYER", "GNU")
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        BLAS_IN_USE = f"{name} ({path})"
        return BLAS_IN_USE
    BLAS_IN_USE = "reference (no MKL or OpenBLAS found; pip install mkl)"
    return BLAS_IN_USE
