"""FastVLM (FastViTHD -> MLP projector -> Qwen2) in MLX."""

from fastvlm_mlx.blas import load_optimized_blas
from fastvlm_mlx.cpu import keep_freed_buffers, use_native_jit

__version__ = "0.1.0"
BLAS = load_optimized_blas()  # before anything imports mlx
NATIVE_JIT = use_native_jit()
keep_freed_buffers()
