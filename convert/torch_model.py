"""FastVLM checkpoints of either layout as a transformers `FastVlmForConditionalGeneration` (torch).

The PyTorch reference for the benchmark and the source of the Core ML export.
"""

from pathlib import Path

import torch

from convert import keymap
from convert.convert import vision_config
from fastvlm_mlx.config import VisionConfig
from fastvlm_mlx.errors import UserError, naming
from fastvlm_mlx.load import read_json

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_reference(src: str | Path, device: torch.device, dtype: str, vocab_size: int | None = None):
    """transformers FastVlmForConditionalGeneration from a `fast_vlm` or Apple `llava_qwen2` checkpoint.

    `vocab_size` trims the output head like the converter does for original checkpoints.
    """
    from transformers import FastVlmForConditionalGeneration

    src = Path(src)
    if not (src / "config.json").is_file():
        raise UserError(f"{src} has no config.json; --reference takes the checkpoint the MLX model came from")
    raw = read_json(src / "config.json")
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type == "fast_vlm":
        with naming(src):  # damaged weights, wrongly typed config fields
            model = FastVlmForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    elif model_type == "llava_qwen2":
        model = _from_original(src, raw)
    else:
        raise UserError(f"{src}: --reference must be a fast_vlm or llava_qwen2 checkpoint")
    if vocab_size is not None and vocab_size < model.get_output_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab_size)
    return model.to(device=device, dtype=TORCH_DTYPES[dtype]).eval()


def fastvlm_config(vision_args: dict, text_args: dict, image_token_id: int, tied: bool):
    """transformers FastVlmConfig: timm `fastvit_mci3` (with `vision_args` overrides) and a Qwen2 LLM."""
    from transformers import FastVlmConfig

    vision = VisionConfig.from_dict(vision_args)
    text_defaults = dict(rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768, eos_token_id=None)
    return FastVlmConfig(
        vision_config=dict(
            model_type="timm_wrapper",
            architecture="fastvit_mci3",
            hidden_size=vision.num_features,
            do_pooling=False,
            model_args=dict(inference_mode=True, **vision_args),
        ),
        text_config=dict(model_type="qwen2", **{**text_defaults, **text_args}),
        image_token_index=image_token_id,
        tie_word_embeddings=tied,
    )


def _from_original(src: Path, raw: dict):
    """Apple's layout through the converter's key map into a transformers model (strict load)."""
    from safetensors.torch import load_file
    from transformers import FastVlmForConditionalGeneration

    vision = vision_config("fastvit_mci3", {})
    weights = {}
    for f in sorted(src.glob("*.safetensors")):
        for key, value in load_file(f).items():
            hf = keymap.original_to_hf(key, vision)
            if hf is not None:
                weights[hf] = value.float()
    tied = raw.get("tie_word_embeddings", True)
    if tied:
        weights.pop("lm_head.weight", None)
    text = {k: raw[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")}
    text.update(
        num_key_value_heads=raw.get("num_key_value_heads"),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=raw.get("rope_theta", 1e6),
        vocab_size=weights["model.language_model.embed_tokens.weight"].shape[0],
        tie_word_embeddings=tied,
    )
    config = fastvlm_config({}, text, raw.get("image_token_index", 151646), tied)
    model = FastVlmForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"{src}: {len(missing)} missing / {len(unexpected)} unexpected reference weights")
    if tied:
        model.tie_weights()
    return model


def last_attention(model) -> torch.nn.Module:
    """The vision tower's last attention token mixer (timm fastvit `Attention`)."""
    return [m for m in model.model.vision_tower.modules() if type(m).__name__ == "Attention"][-1]


def attention_received(attention: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, N): attention each token receives in `attention` for its input x (B, C, H, W),
    averaged over heads and queries (explicit softmax, as the MLX tower's scored block)."""
    B, C, H, W = x.shape
    qkv = attention.qkv(x.flatten(2).transpose(1, 2)).reshape(B, H * W, 3, attention.num_heads, -1)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4)
    return ((q * attention.scale) @ k.transpose(-1, -2)).softmax(-1).mean(dim=(1, 2))
