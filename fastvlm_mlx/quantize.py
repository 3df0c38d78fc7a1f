"""Quantize the LLM (and optionally the projector) with MLX's affine quantization; the vision tower stays float."""

from typing import Any

import mlx.nn as nn

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)


def quantize_model(model: nn.Module, quantization: dict[str, Any]) -> None:
    """Swap Linear/Embedding layers of the language model (and projector, if asked) for quantized ones."""
    bits, group_size = quantization["bits"], quantization["group_size"]
    prefixes = ("language_model.", "projector.") if quantization.get("projector") else ("language_model.",)

    def chosen(path: str, module: nn.Module) -> bool:
        return (
            path.startswith(prefixes) and hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0
        )

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=chosen)
