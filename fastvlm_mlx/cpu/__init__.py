"""The CPU backend: what makes MLX's CPU path fast, in one room, switched onto a model by
`use_cpu_backend(model)` (load_model does it when the model runs on the CPU). Metal and CUDA
never see any of it: the model code (`vision.py`, `model.py`) is MLX's own ops.

What each piece buys, FastVLM-0.5B at 1024² on a 2-core AMD EPYC (AVX-512), fp32:
- `blas`: OpenBLAS (pip's scipy-openblas32, AVX-512 kernels) instead of the reference BLAS that
  MLX's Linux wheel links (~35x slower GEMM); one-row products go to its gemv, 2-7 rows times a
  weight matrix to the shim's threaded kernel (batch-2 decode step 145 -> 97 ms). Loaded just
  before the first `import mlx.core`: the only thing importing `fastvlm_mlx` arranges.
- `jit`: MLX's kernel builds with `-march=native` and unit-stride loops (`gxx.py`), in a private
  kernel folder; a buffer cache that keeps freed buffers (tower 5.1 -> 3.8 s with the rewrite).
- `native`: a C depthwise-conv kernel (7x7 over 128x128x192: MLX's conv2d 238 ms, ours 3 ms).
- `fastmath`: GELU, SiLU, exp and softmax attention as vectorizable polynomials (MLX's CPU erf,
  exp and sigmoid are scalar calls; stage-3 attention 85 -> 38 ms, SwiGLU 9.6 -> 0.8 ms).
- `modules`: CPU versions of the model's modules that use the above, swapped in per model.

Everything built, rewritten or cached lives in one private folder (`private.py`). Without a
C compiler the model runs on MLX's own ops and the BLAS is MKL. FASTVLM_MLX_CPU_BACKEND=0 turns
the whole backend off (MLX's own ops, BLAS and flags); MLX's kernel cache still goes to the
private folder, since that is about safety, not speed.
"""

import importlib.abc
import os
import sys

ENV = "FASTVLM_MLX_CPU_BACKEND"


def enabled() -> bool:
    """False when FASTVLM_MLX_CPU_BACKEND is 0, off, false or no."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


class _BlasBeforeMLX(importlib.abc.MetaPathFinder):
    """Runs the BLAS preload when `mlx.core` is first imported, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name == "mlx.core":
            sys.meta_path.remove(self)
            from fastvlm_mlx.cpu.blas import load_optimized_blas

            load_optimized_blas()
        return None


def arrange_blas_preload() -> None:
    """Make the optimized BLAS load right before mlx (Linux, backend on); warns if too late."""
    if not sys.platform.startswith("linux") or not enabled():
        return
    if "mlx.core" in sys.modules:
        from fastvlm_mlx.cpu.blas import load_optimized_blas

        load_optimized_blas()  # only warns: mlx is already linked to its own BLAS
    elif not any(isinstance(f, _BlasBeforeMLX) for f in sys.meta_path):
        sys.meta_path.insert(0, _BlasBeforeMLX())


def blas_in_use() -> str:
    from fastvlm_mlx.cpu import blas

    return blas.BLAS_IN_USE


def prepare() -> None:
    """Process-wide, once: a private kernel folder for MLX and, with the backend on, the g++
    wrapper and the buffer cache."""
    from fastvlm_mlx.cpu import jit

    jit.private_kernel_folder(native=enabled())
    if enabled():
        jit.keep_freed_buffers()


def use_cpu_backend(model) -> bool:
    """Switch `model`'s modules onto their CPU versions when MLX runs on the CPU, the backend is
    on and a C compiler is there (MLX's compile needs g++); True when switched."""
    import shutil

    import mlx.core as mx

    prepare()
    if not enabled() or mx.default_device() != mx.cpu or shutil.which("g++") is None:
        return False
    from fastvlm_mlx.cpu.modules import swap_modules

    return swap_modules(model) > 0


def describe() -> str:
    """One line for --version: BLAS and kernel flags."""
    from fastvlm_mlx.cpu import jit

    if not enabled():
        return f"CPU backend off ({ENV}=0)"
    flags = "-march=native" if jit.native_jit() else "MLX's own flags"
    return f"BLAS: {blas_in_use()}, CPU kernels: {flags}"
