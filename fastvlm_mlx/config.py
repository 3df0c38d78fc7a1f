"""Dataclass configs for the converted MLX model directory."""

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from fastvlm_mlx.errors import UserError

# FastViTHD's peak memory grows with the 4th power of the side (stage-3 attention over
# (side/32)^2 tokens): float32 on a CPU, 0.7 GiB at 1024 and 3.8 GiB at 2048 (measured, weights
# included); 4096 would need over 25 GiB for each stage-3 attention matrix alone.
MAX_IMAGE_SIZE = 2048


def _known(cls, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}


@dataclass
class VisionConfig:
    """FastViT "MCi" family; defaults are FastViTHD (timm `fastvit_mci3`)."""

    layers: tuple[int, ...] = (2, 12, 24, 4, 2)
    embed_dims: tuple[int, ...] = (96, 192, 384, 768, 1536)
    mlp_ratios: tuple[float, ...] = (4.0, 4.0, 4.0, 4.0, 4.0)
    token_mixers: tuple[str, ...] = ("repmixer", "repmixer", "repmixer", "attention", "attention")
    downsamples: tuple[bool, ...] = (False, True, True, True, True)
    pos_embs: tuple[bool, ...] = (False, False, False, True, True)
    head_dim: int = 32
    cls_ratio: float = 2.0
    se_ratio: float = 0.0625
    norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "VisionConfig":
        return cls(**_known(cls, values))

    @property
    def num_features(self) -> int:
        return int(self.embed_dims[-1] * self.cls_ratio)

    @property
    def stride(self) -> int:
        """Total downsampling: /4 stem, /2 per downsampling stage, /1 final conv."""
        return 4 * 2 ** sum(self.downsamples)


def check_image_size(size: int, stride: int = 64) -> int:
    """`size` if it is a usable input side for a tower of this stride, else a UserError with the fix."""
    if isinstance(size, bool) or not isinstance(size, int) or size % stride or not stride <= size <= MAX_IMAGE_SIZE:
        raise UserError(
            f"image size {size!r} is not usable: give a multiple of the vision tower's stride {stride} "
            f"between {stride} and {MAX_IMAGE_SIZE} (FastViTHD needs about 3.8 GiB at 2048, float32)"
        )
    return size


@dataclass
class FastVLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: dict[str, Any] = field(default_factory=dict)  # mlx-lm qwen2 ModelArgs fields
    image_size: int = 1024
    preprocess_mode: str = "pad"  # "pad" (original predict.py) or "crop" (transformers)
    image_token_id: int = 151646
    eos_token_ids: tuple[int, ...] = (151645,)
    source_layout: str = "fast_vlm"
    quantization: dict[str, Any] | None = None  # {"bits", "group_size", "projector"}; vision stays float
    pruner: str | None = None  # applied by default when generating; None = keep every visual token
    keep_ratio: float = 1.0
    keep_positions: bool = False  # by default, kept visual tokens keep their unpruned RoPE positions (GAP)
    # Apple's `tokenizer_model_max_length`: its runtime cuts the merged text + image sequence to
    # this many positions. None: no limit beyond the LLM's own max_position_embeddings.
    max_context: int | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FastVLMConfig":
        known = _known(cls, values)
        known["vision"] = VisionConfig.from_dict(values.get("vision", {}))
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "fastvlm_mlx", **asdict(self)}
