"""Quantize the LLM (and optionally the projector) with MLX's affine quantization; the vision tower stays float."""

from typing import Any

import mlx.nn as nn

from fastvlm_mlx.errors import UserError

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)


def quantize_model(model: nn.Module, quantization: dict[str, Any]) -> None:
    """Swap every Linear/Embedding of the language model (and projector, if asked) for a quantized one."""
    bits, group_size = quantization["bits"], quantization["group_size"]
    prefixes = ("language_model.", "projector.") if quantization.get("projector") else ("language_model.",)
    chosen = {
        path: module
        for path, module in model.named_modules()
        if path.startswith(prefixes) and hasattr(module, "to_quantized")
    }
    uneven = sorted({m.weight.shape[-1] for m in chosen.values() if m.weight.shape[-1] % group_size})
    if uneven:
        raise UserError(
            f"input sizes {uneven} are not multiples of group size {group_size}; pick a smaller --group-size"
        )
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=lambda path, _: path in chosen)
