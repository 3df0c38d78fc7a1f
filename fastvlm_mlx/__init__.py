"""FastVLM (FastViTHD -> MLP projector -> Qwen2) in MLX."""

from fastvlm_mlx.blas import load_optimized_blas

__version__ = "0.1.0"
BLAS = load_optimized_blas()  # before anything imports mlx
