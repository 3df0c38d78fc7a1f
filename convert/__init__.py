"""Checkpoint conversion. Importing fastvlm_mlx first preloads the optimized BLAS before mlx loads."""

import fastvlm_mlx  # noqa: F401
