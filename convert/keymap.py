"""The one key map: checkpoint names -> MLX names, plus the explicit conv-layout lists.

Original (`llava_qwen2`) keys are first renamed to transformers (`fast_vlm`) keys, then
transformers keys to MLX keys; mlx-vlm's keys are renamed to original ones first. Renames are
ordered (prefix, replacement) pairs.
"""

import re

from fastvlm_mlx.config import VisionConfig

ORIGINAL_VISION = "model.vision_tower.vision_tower.model."
HF_VISION = "model.vision_tower.timm_model."

# Original -> transformers, outside the vision tower.
ORIGINAL_TO_HF = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)

# Original (mci.py) -> timm names inside the vision tower; `network.N` is handled by
# `network_index_map` because its numbering depends on the stage layout.
ORIGINAL_VISION_RENAMES = (
    (r"^patch_embed\.", "stem."),
    (r"\.layer_scale(_[12])?$", r".layer_scale\1.gamma"),
    (r"\.convffn\.", ".mlp."),
    (r"\.proj\.0\.lkb_reparam\.", ".proj.0.reparam_conv."),
    (r"^conv_exp\.", "final_conv."),
    (r"\.se\.reduce\.", ".se.fc1."),
    (r"\.se\.expand\.", ".se.fc2."),
)
ORIGINAL_VISION_DROPPED = (r"^head\.", r"num_batches_tracked$")

# mlx-vlm's FastVLM names (mlx-community folders) -> original names. Its tensors are already in
# MLX layouts (convs OHWI, layer scales (1, 1, C)) and its BatchNorms unfolded; see convert.mlx_vlm.
MLX_VLM_TO_ORIGINAL = (
    ("vision_tower.vision_model.patch_embed.blocks.", ORIGINAL_VISION + "patch_embed."),
    ("vision_tower.vision_model.", ORIGINAL_VISION),
    ("mm_projector.", "model.mm_projector."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)

# transformers -> MLX module paths.
HF_TO_MLX = (
    (HF_VISION, "vision_tower."),
    ("model.multi_modal_projector.", "projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
HF_DROPPED = (r"num_batches_tracked$", r"rotary_emb\.inv_freq$")

# 1x1 convs that MLX runs as Linear over channels: (O, I, 1, 1) -> (O, I).
POINTWISE_CONVS = (
    r"^vision_tower\.stem\.2\.reparam_conv\.weight$",
    r"^vision_tower\.stages\.\d+\.downsample\.proj\.1\.reparam_conv\.weight$",
    r"^vision_tower\.stages\.\d+\.blocks\.\d+\.mlp\.fc[12]\.weight$",
    r"^vision_tower\.final_conv\.se\.fc[12]\.weight$",
)
# Spatial convs: PyTorch OIHW -> MLX OHWI.
SPATIAL_CONVS = (
    r"^vision_tower\.stem\.[01]\.reparam_conv\.weight$",
    r"^vision_tower\.stages\.\d+\.downsample\.proj\.0\.reparam_conv\.weight$",
    r"^vision_tower\.stages\.\d+\.pos_emb\.reparam_conv\.weight$",
    r"^vision_tower\.stages\.\d+\.blocks\.\d+\.token_mixer\.reparam_conv\.weight$",
    r"^vision_tower\.stages\.\d+\.blocks\.\d+\.mlp\.conv\.weight$",
    r"^vision_tower\.final_conv\.reparam_conv\.weight$",
)


def network_index_map(vision: VisionConfig) -> dict[int, str]:
    """Original `network.N` index -> timm stage path (PatchEmbed sits after stage i there)."""
    table, n = {}, 0
    for i in range(len(vision.layers)):
        for part, present in (("downsample", vision.downsamples[i]), ("pos_emb", vision.pos_embs[i]), ("blocks", True)):
            if present:
                table[n] = f"stages.{i}.{part}"
                n += 1
    return table


def _rename_prefix(key: str, table) -> str | None:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def original_to_hf(key: str, vision: VisionConfig) -> str | None:
    """Original checkpoint key -> transformers key, or None for keys that are dropped."""
    if not key.startswith(ORIGINAL_VISION):
        renamed = _rename_prefix(key, ORIGINAL_TO_HF)
        if renamed is None:
            raise KeyError(key)
        return renamed
    name = key[len(ORIGINAL_VISION) :]
    if any(re.search(p, name) for p in ORIGINAL_VISION_DROPPED):
        return None
    for pattern, replacement in ORIGINAL_VISION_RENAMES:
        name = re.sub(pattern, replacement, name)
    stages = network_index_map(vision)
    name = re.sub(r"^network\.(\d+)\.", lambda m: stages[int(m.group(1))] + ".", name)
    return HF_VISION + name


def mlx_vlm_to_hf(key: str, vision: VisionConfig) -> str | None:
    """mlx-vlm checkpoint key -> transformers key (through the original name), None when dropped."""
    original = _rename_prefix(key, MLX_VLM_TO_ORIGINAL)
    if original is None:
        raise KeyError(key)
    return original_to_hf(original, vision)


def hf_to_original(key: str, vision: VisionConfig) -> str:
    """Inverse of `original_to_hf` (used to build original-layout test checkpoints)."""
    if not key.startswith(HF_VISION):
        return _rename_prefix(key, [(new, old) for old, new in ORIGINAL_TO_HF])
    name = key[len(HF_VISION) :]
    network = {path: n for n, path in network_index_map(vision).items()}
    name = re.sub(r"^(stages\.\d+\.(?:downsample|pos_emb|blocks))\.", lambda m: f"network.{network[m.group(1)]}.", name)
    for old, new in (
        (r"^stem\.", "patch_embed."),
        (r"\.layer_scale(_[12])?\.gamma$", r".layer_scale\1"),
        (r"\.mlp\.", ".convffn."),
        (r"\.proj\.0\.reparam_conv\.", ".proj.0.lkb_reparam."),
        (r"^final_conv\.", "conv_exp."),
        (r"\.se\.fc1\.", ".se.reduce."),
        (r"\.se\.fc2\.", ".se.expand."),
    ):
        name = re.sub(old, new, name)
    return ORIGINAL_VISION + name


def hf_to_mlx(key: str) -> str | None:
    """transformers key -> MLX parameter path (before folding), or None if dropped."""
    if any(re.search(p, key) for p in HF_DROPPED):
        return None
    renamed = _rename_prefix(key, HF_TO_MLX)
    if renamed is None:
        raise KeyError(key)
    return renamed


def conv_layout(key: str) -> str | None:
    """'pointwise', 'spatial' or None for an MLX key, from the explicit lists above."""
    if any(re.match(p, key) for p in POINTWISE_CONVS):
        return "pointwise"
    if any(re.match(p, key) for p in SPATIAL_CONVS):
        return "spatial"
    return None
