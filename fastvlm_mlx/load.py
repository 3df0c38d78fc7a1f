"""Load a converted MLX model directory (config.json, model.safetensors, tokenizer files)."""

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from fastvlm_mlx.config import FastVLMConfig
from fastvlm_mlx.cpu import use_cpu_backend
from fastvlm_mlx.errors import UserError
from fastvlm_mlx.model import FastVLM
from fastvlm_mlx.quantize import quantize_model

WEIGHTS_FILE = "model.safetensors"
# The small easy-VQA model that ships with the package (bench/train_easyvqa.py makes it):
# mlx/ is the converted model, hf/ the transformers checkpoint it came from.
EMBEDDED_MODEL = Path(__file__).parent / "models" / "easyvqa"


def embedded_model(part: str = "mlx") -> Path:
    """The shipped model's converted directory ("mlx") or its transformers source ("hf")."""
    path = EMBEDDED_MODEL / part
    if not (path / "config.json").is_file():
        raise UserError(f"the embedded easy-VQA model is missing from this install ({path}); pass --model DIR")
    return path


def read_config(model_dir: str | Path) -> FastVLMConfig:
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{model_dir} has no config.json; pass a directory made by `fastvlm-mlx convert SRC OUT`")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "fastvlm_mlx":
        raise UserError(
            f"{model_dir} is not a converted fastvlm-mlx model (model_type {config.get('model_type')!r}); "
            f"convert it first: fastvlm-mlx convert {model_dir} OUT"
        )
    return FastVLMConfig.from_dict(config)


def check_weights(model: FastVLM, weights: dict[str, mx.array], where: str) -> None:
    """Every parameter present once with the right shape, and nothing extra."""
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    missing = sorted(expected.keys() - weights.keys())
    extra = sorted(weights.keys() - expected.keys())
    wrong = [
        f"{k} {tuple(weights[k].shape)} != {tuple(s)}"
        for k, s in expected.items()
        if k in weights and weights[k].shape != s
    ]
    for label, items in (("missing", missing), ("unexpected", extra), ("mis-shaped", wrong)):
        if items:
            shown = ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
            raise UserError(f"{where}: {len(items)} {label} parameter(s): {shown}; re-run `fastvlm-mlx convert`")


def load_model(model_dir: str | Path | None = None) -> tuple[FastVLM, TokenizerWrapper]:
    """Build the model from its config, load and check its weights, load the tokenizer.

    Without a directory, the embedded easy-VQA model is loaded. On the CPU the model is
    switched onto the CPU backend (`fastvlm_mlx.cpu.use_cpu_backend`)."""
    model_dir = embedded_model() if model_dir is None else Path(model_dir)
    config = read_config(model_dir)
    weights_path = model_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise UserError(f"{model_dir} has no {WEIGHTS_FILE}; re-run `fastvlm-mlx convert` to write it")
    model = FastVLM(config)
    if config.quantization:
        quantize_model(model, config.quantization)
    weights = mx.load(str(weights_path))
    check_weights(model, weights, str(weights_path))
    model.load_weights(list(weights.items()))
    model.eval()
    mx.eval(model.parameters())
    use_cpu_backend(model)
    return model, read_tokenizer(model_dir, list(config.eos_token_ids))


def read_tokenizer(model_dir: Path, eos_token_ids: list[int] | None = None) -> TokenizerWrapper:
    """mlx-lm's tokenizer loader, without transformers' warning about our config.json's model_type."""
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return load_tokenizer(Path(model_dir), eos_token_ids=eos_token_ids)
    finally:
        logging.set_verbosity(previous)
