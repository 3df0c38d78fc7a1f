"""FastVLM (FastViTHD -> MLP projector -> Qwen2) in MLX.

    from fastvlm_mlx import load, generate, stream_generate, ChatSession

The names below load lazily: importing the package loads neither mlx nor the model.
"""

import sys
from importlib import import_module
from types import ModuleType

from fastvlm_mlx.cpu import arrange_blas_preload, blas_in_use

__version__ = "0.1.0"
arrange_blas_preload()  # the optimized BLAS must load before mlx does; nothing else happens at import

# public name -> the module that defines it
API = {
    "load": "fastvlm_mlx.hub",
    "generate": "fastvlm_mlx.generate",
    "stream_generate": "fastvlm_mlx.generate",
    "GenerationResponse": "fastvlm_mlx.generate",
    "GenerationResult": "fastvlm_mlx.generate",
    "ChatSession": "fastvlm_mlx.chat",
    "VisionCache": "fastvlm_mlx.features",
}
__all__ = [*API, "BLAS"]


def __getattr__(name: str):
    if name == "BLAS":  # the BLAS in use, once mlx is loaded
        return blas_in_use()
    if name in API:
        value = globals()[name] = getattr(import_module(API[name]), name)
        return value
    raise AttributeError(f"module 'fastvlm_mlx' has no attribute {name!r}")


class _Package(ModuleType):
    """`fastvlm_mlx.generate` and `fastvlm_mlx.load` stay the API functions: importing the submodules of
    those names would otherwise rebind them to the modules (the import system sets them on the package)."""

    def __setattr__(self, name: str, value) -> None:
        if name in API and isinstance(value, ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
