"""FastVLM (FastViTHD -> MLP projector -> Qwen2) in MLX."""

from fastvlm_mlx.cpu import arrange_blas_preload, blas_in_use

__version__ = "0.1.0"
arrange_blas_preload()  # the optimized BLAS must load before mlx does; nothing else happens at import


def __getattr__(name: str):
    if name == "BLAS":  # the BLAS in use, once mlx is loaded
        return blas_in_use()
    raise AttributeError(f"module 'fastvlm_mlx' has no attribute {name!r}")
