"""The PyTorch reference side: pick a device, load a checkpoint of either layout, or build both
sides from the same random weights at a real FastVLM size."""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import synthetic
from convert import keymap
from convert.convert import convert, vision_config
from fastvlm_mlx.errors import UserError

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SYNTHETIC_PROMPT = "Describe the image in detail, listing every object you can see and its colour."


def pick_device(name: str = "auto") -> torch.device:
    """auto = mps, then cuda, then cpu; an explicit device must be available."""
    available = {
        "mps": torch.backends.mps.is_available(),
        "cuda": torch.cuda.is_available(),
        "cpu": True,
    }
    if name == "auto":
        return torch.device(next(d for d, ok in available.items() if ok))
    if name not in available:
        raise UserError(f"unknown torch device {name!r}; choose auto, mps, cuda or cpu")
    if not available[name]:
        raise UserError(f"torch device {name!r} is not available here; use --torch-device auto or cpu")
    return torch.device(name)


def load_reference(src: str | Path, device: torch.device, dtype: str, vocab_size: int | None = None):
    """transformers FastVlmForConditionalGeneration from a `fast_vlm` or Apple `llava_qwen2` checkpoint.

    `vocab_size` trims the output head like the converter does for original checkpoints.
    """
    from transformers import FastVlmForConditionalGeneration

    src = Path(src)
    if not (src / "config.json").is_file():
        raise UserError(f"{src} has no config.json; --reference takes the checkpoint the MLX model came from")
    raw = json.loads((src / "config.json").read_text())
    if raw.get("model_type") == "fast_vlm":
        model = FastVlmForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    elif raw.get("model_type") == "llava_qwen2":
        model = _from_original(src, raw)
    else:
        raise UserError(f"{src}: --reference must be a fast_vlm or llava_qwen2 checkpoint")
    if vocab_size is not None and vocab_size < model.get_output_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab_size)
    return model.to(device=device, dtype=TORCH_DTYPES[dtype]).eval()


def _from_original(src: Path, raw: dict):
    """Apple's layout through the converter's key map into a transformers model (strict load)."""
    from safetensors.torch import load_file
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration

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
    config = FastVlmConfig(
        vision_config=dict(
            model_type="timm_wrapper",
            architecture="fastvit_mci3",
            hidden_size=vision.num_features,
            do_pooling=False,
            model_args=dict(inference_mode=True),
        ),
        text_config=dict(
            model_type="qwen2",
            num_key_value_heads=raw.get("num_key_value_heads"),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=raw.get("rope_theta", 1e6),
            vocab_size=weights["model.language_model.embed_tokens.weight"].shape[0],
            tie_word_embeddings=tied,
            **text,
        ),
        image_token_index=raw.get("image_token_index", 151646),
        tie_word_embeddings=tied,
    )
    model = FastVlmForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"{src}: {len(missing)} missing / {len(unexpected)} unexpected reference weights")
    if tied:
        model.tie_weights()
    return model


def synthetic_checkpoint(size: str, workdir: Path) -> tuple[Path, Path]:
    """(transformers dir, converted MLX dir) with random weights at a real FastVLM size; cached."""
    hf_dir, mlx_dir = workdir / f"synthetic-{size}", workdir / f"synthetic-{size}-mlx"
    if not (hf_dir / "model.safetensors").is_file():
        tokenizer = synthetic.make_tokenizer(hf_dir, [SYNTHETIC_PROMPT] * 10, vocab_size=400)
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        model = synthetic.build_reference({}, synthetic.TEXT_ARCHS[size], image_id, seed=0)
        synthetic.save_checkpoint(model, tokenizer, hf_dir, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    if not (mlx_dir / "model.safetensors").is_file():
        convert(hf_dir, mlx_dir, force=True)
    return hf_dir, mlx_dir


def noise_image(path: Path, size: int = 1024) -> Path:
    """A fixed random RGB image (timings do not depend on content)."""
    if not path.is_file():
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path
