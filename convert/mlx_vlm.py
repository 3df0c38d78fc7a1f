"""Folders written by mlx-vlm's converter (the mlx-community FastVLM models).

Their config.json is Apple's `llava_qwen2` one, so `describe_source` reads it as for Apple's
checkpoints. The weights differ: mlx-vlm's names (renamed by `keymap.mlx_vlm_to_hf`), tensors
already in MLX layouts (spatial convs OHWI, 1x1 convs (O, 1, 1, I), layer scales (1, 1, C)),
ConvFFN BatchNorms unfolded (the converter's folds work on any layout with out-channels first),
and the LLM and projector possibly quantized by MLX's affine quantization, which is ours: the
quantized tensors are kept as they are.
"""

import json
import struct
from functools import partial
from pathlib import Path

import mlx.core as mx

from convert import keymap
from fastvlm_mlx.config import VisionConfig
from fastvlm_mlx.errors import UserError
from fastvlm_mlx.quantize import BITS, GROUP_SIZES

MLX_VLM_PREFIXES = ("vision_tower.vision_model.", "language_model.model.", "mm_projector.")
PROJECTOR_SCALES = "mm_projector.0.scales"


def tensor_names(path: Path) -> set[str]:
    """The tensor names in a safetensors file's header (nothing else is read)."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(size, 100_000_000)))
    except (OSError, struct.error, ValueError):
        return set()  # not safetensors: the reader names the problem later
    return set(header) - {"__metadata__"} if isinstance(header, dict) else set()


def written_by_mlx_vlm(files: list[Path]) -> set[str] | None:
    """All tensor names when `files` are an mlx-vlm FastVLM checkpoint, else None."""
    names = set().union(*(tensor_names(f) for f in files if f.suffix == ".safetensors"))
    return names if names and all(n.startswith(MLX_VLM_PREFIXES) for n in names) else None


def to_hf(vision: VisionConfig):
    return partial(keymap.mlx_vlm_to_hf, vision=vision)


def quantization(raw: dict, names: set[str]) -> dict | None:
    """Our quantization record for mlx-vlm's `quantization` field: uniform affine 4 or 8 bits only."""
    spec = raw.get("quantization")
    if spec is None:
        return None
    per_layer = sorted(k for k in spec if k not in ("bits", "group_size", "mode")) if isinstance(spec, dict) else []
    if not isinstance(spec, dict) or per_layer or spec.get("mode", "affine") != "affine":
        raise UserError(
            f"config.json quantization {json.dumps(spec)[:80]}: only uniform affine quantization is supported "
            "(no mixed-bit recipes, no mxfp4/nvfp4); take the bf16 or an affine 4/8-bit model"
        )
    if spec.get("bits") not in BITS or spec.get("group_size") not in GROUP_SIZES:
        raise UserError(
            f"config.json quantization: {spec.get('bits')}-bit, group size {spec.get('group_size')}; "
            f"supported are {BITS} bits with group sizes {GROUP_SIZES}"
        )
    return dict(bits=spec["bits"], group_size=spec["group_size"], projector=PROJECTOR_SCALES in names)


def apply_conv_layouts(weights: dict[str, mx.array]) -> None:
    """mlx-vlm's convs are OHWI already, as ours; its 1x1 convs (O, 1, 1, I) become our (O, I)."""
    for key, value in weights.items():
        layout = keymap.conv_layout(key)
        if layout == "pointwise":
            weights[key] = value.reshape(value.shape[0], value.shape[-1])
        elif layout is None and value.ndim == 4:
            raise UserError(f"4-D weight {key} is not in the converter's conv lists; unsupported layout")
