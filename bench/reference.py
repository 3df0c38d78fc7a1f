"""The PyTorch reference side: pick a device, or build both sides from the same random weights at a
real FastVLM size (checkpoints of either layout load with `convert.torch_model.load_reference`)."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import synthetic
from convert.convert import convert
from fastvlm_mlx.errors import UserError

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
