"""`fastvlm-mlx info`: the facts of a converted model directory, read without loading the weights."""

import math
from pathlib import Path

from fastvlm_mlx.errors import UserError
from fastvlm_mlx.load import RECONVERT, WEIGHTS_FILE, read_config, safetensors_header

COMPONENTS = ("vision_tower", "projector", "language_model")


def model_info(model_dir: str | Path) -> dict:
    """Sizes per component, dtype, quantization, pruning and visual-token counts of a converted model."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{model_dir} has no {WEIGHTS_FILE}; {RECONVERT}")
    bits = (config.quantization or {}).get("bits")
    components = {name: {"parameters": 0, "bytes": 0} for name in COMPONENTS}
    dtypes = set()
    for key, entry in safetensors_header(weights).items():
        part = components.get(key.split(".")[0])
        if part is None:
            raise UserError(f"{weights}: unexpected parameter {key}; {RECONVERT}")
        start, end = entry["data_offsets"]
        part["bytes"] += end - start
        count = math.prod(entry["shape"])
        if key.endswith((".scales", ".biases")) and bits:
            continue  # quantization metadata, not parameters
        part["parameters"] += count * 32 // bits if entry["dtype"] == "U32" and bits else count
        dtypes.add(entry["dtype"])
    side = math.ceil(config.image_size / config.vision.stride)
    tokens = side * side
    kept = max(1, round(config.keep_ratio * tokens)) if config.pruner else tokens
    return {
        "model": str(model_dir),
        "source_layout": config.source_layout,
        "dtypes": sorted(dtypes),
        "quantization": config.quantization,
        "components": components,
        "parameters": sum(c["parameters"] for c in components.values()),
        "size_on_disk_mb": sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file()) / 1e6,
        "image_size": config.image_size,
        "preprocess_mode": config.preprocess_mode,
        "visual_tokens": {"grid": [side, side], "before": tokens, "after": kept},
        "pruning": {"pruner": config.pruner, "keep_ratio": config.keep_ratio} if config.pruner else None,
        "text": {k: config.text.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
        "vision": {"layers": list(config.vision.layers), "embed_dims": list(config.vision.embed_dims)},
    }


def format_info(info: dict) -> str:
    quant, pruning = info["quantization"], info["pruning"]
    quantized = "none"
    if quant:
        quantized = f"{quant['bits']}-bit, group {quant['group_size']}, LLM" + (" + projector" * quant["projector"])
    lines = [
        f"model          {info['model']} ({info['source_layout']} checkpoint)",
        f"parameters     {info['parameters'] / 1e6:.2f} M, {info['size_on_disk_mb']:.1f} MB on disk",
    ]
    for name, part in info["components"].items():
        lines.append(f"  {name:<15}{part['parameters'] / 1e6:9.2f} M  {part['bytes'] / 1e6:9.1f} MB")
    lines += [
        f"dtype          {', '.join(info['dtypes'])}",
        f"quantization   {quantized}",
        f"image          {info['image_size']}px, {info['preprocess_mode']} preprocessing",
        f"visual tokens  {info['visual_tokens']['before']} ({'x'.join(map(str, info['visual_tokens']['grid']))} grid)"
        + f" -> {info['visual_tokens']['after']} after pruning",
        "pruning        " + (f"{pruning['pruner']} at keep ratio {pruning['keep_ratio']:g}" if pruning else "none"),
        f"text           hidden {info['text']['hidden_size']}, {info['text']['num_hidden_layers']} layers,"
        + f" vocab {info['text']['vocab_size']}",
        f"vision         layers {info['vision']['layers']}, dims {info['vision']['embed_dims']}",
    ]
    return "\n".join(lines)
