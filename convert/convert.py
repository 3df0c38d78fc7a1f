"""Convert an Apple (`llava_qwen2`) or transformers (`fast_vlm`) FastVLM checkpoint to MLX.

load -> rename (keymap) -> fold BatchNorm and layer scale -> conv layouts -> tie/vocab
rules -> check every parameter -> cast -> write atomically.
"""

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from convert import keymap
from fastvlm_mlx.config import FastVLMConfig, VisionConfig
from fastvlm_mlx.errors import UserError
from fastvlm_mlx.load import WEIGHTS_FILE, check_weights, read_tokenizer
from fastvlm_mlx.model import FastVLM
from fastvlm_mlx.quantize import BITS, GROUP_SIZES, quantize_model
from pruners import check

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "generation_config.json",
)
TEXT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "max_position_embeddings",
    "rope_theta",
)
# timm architectures of the FastViT MCi family that FastVLM uses, as VisionConfig fields.
VISION_PRESETS = {
    "fastvit_mci3": {},
    "fastvit_mci4": {"layers": (2, 12, 24, 4, 4), "embed_dims": (128, 256, 512, 1024, 2048)},
}
ORIGINAL_TOWERS = {"mobileclip_l": "fastvit_mci3"}  # mm_vision_tower prefix -> architecture
BN_EPS = 1e-5


def read_source(src: Path) -> tuple[dict, dict[str, mx.array]]:
    """config.json and all weights (safetensors, sharded or not; .bin via torch)."""
    if not (src / "config.json").is_file():
        raise UserError(f"{src} has no config.json; pass a FastVLM checkpoint directory")
    config = json.loads((src / "config.json").read_text())
    files = sorted(src.glob("*.safetensors"))
    if files:
        weights = {}
        for f in files:
            weights.update(mx.load(str(f)))
        return config, weights
    bins = sorted(src.glob("*.bin"))
    if not bins:
        raise UserError(f"{src} has no *.safetensors or *.bin weights; download the full checkpoint")
    import torch  # only the legacy pickle format needs torch

    weights = {}
    for f in bins:
        for k, v in torch.load(f, map_location="cpu", weights_only=True).items():
            weights[k] = mx.array(v.float().numpy())
    return config, weights


def vision_config(architecture: str, model_args: dict) -> VisionConfig:
    if architecture not in VISION_PRESETS:
        raise UserError(f"unsupported vision tower {architecture!r}; supported: {', '.join(VISION_PRESETS)}")
    if model_args.get("inference_mode") is False:
        raise UserError(
            "train-form (non-reparameterized) vision weights are not supported; export with inference_mode=True"
        )
    return VisionConfig.from_dict({**VISION_PRESETS[architecture], **model_args})


def text_config(text: dict, vocab_size: int, tied: bool) -> dict:
    """mlx-lm qwen2 ModelArgs fields from a Qwen2 config (transformers 4 or 5 style)."""
    args = {k: text[k] for k in TEXT_FIELDS if text.get(k) is not None}
    args.setdefault("num_key_value_heads", args["num_attention_heads"])
    rope = text.get("rope_parameters") or {}
    args.setdefault("rope_theta", rope.get("rope_theta", 1e6))
    if rope.get("rope_type", "default") != "default" or text.get("rope_scaling"):
        raise UserError("RoPE scaling is not supported by this converter; FastVLM's Qwen2 uses default RoPE")
    return {"model_type": "qwen2", **args, "vocab_size": vocab_size, "tie_word_embeddings": tied}


def eos_ids(src: Path, raw: dict, text: dict) -> tuple[int, ...]:
    ids = [raw.get("eos_token_id"), text.get("eos_token_id")]
    gen = src / "generation_config.json"
    if gen.is_file():
        ids.append(json.loads(gen.read_text()).get("eos_token_id"))
    flat = [i for x in ids for i in (x if isinstance(x, list) else [x]) if isinstance(i, int)]
    return tuple(dict.fromkeys(flat))


def rename(weights: dict[str, mx.array], to_hf) -> dict[str, mx.array]:
    """Source keys -> MLX keys; every key is mapped or explicitly dropped, none twice."""
    out = {}
    for key, value in weights.items():
        try:
            hf = to_hf(key)
            mlx_key = hf and keymap.hf_to_mlx(hf)
        except KeyError:
            raise UserError(f"unexpected checkpoint key {key!r}; is this a FastVLM checkpoint?") from None
        if mlx_key is None:
            continue
        if mlx_key in out:
            raise UserError(f"two checkpoint keys map to {mlx_key!r}; the checkpoint mixes layouts")
        out[mlx_key] = value.astype(mx.float32) if mx.issubdtype(value.dtype, mx.floating) else value
    return out


def fold_batchnorm(weights: dict[str, mx.array]) -> None:
    """ConvFFN depthwise conv (no bias) + BatchNorm -> conv with bias (exact in eval)."""
    for key in [k for k in weights if k.endswith(".mlp.conv.conv.weight")]:
        base = key[: -len("conv.weight")]
        gamma, beta = weights.pop(base + "bn.weight"), weights.pop(base + "bn.bias")
        mean, var = weights.pop(base + "bn.running_mean"), weights.pop(base + "bn.running_var")
        scale = gamma / mx.sqrt(var + BN_EPS)
        weights[base + "weight"] = weights.pop(key) * scale[:, None, None, None]
        weights[base + "bias"] = beta - mean * scale


def fold_layer_scale(weights: dict[str, mx.array]) -> None:
    """y = x + ls * f(x) with f ending in a linear layer: scale that layer's rows instead."""
    targets = {
        ".layer_scale.gamma": ".mlp.fc2",
        ".layer_scale_1.gamma": ".token_mixer.proj",
        ".layer_scale_2.gamma": ".mlp.fc2",
    }
    for key in [k for k in weights if ".layer_scale" in k]:
        suffix = next(s for s in targets if key.endswith(s))
        layer = key[: -len(suffix)] + targets[suffix]
        gamma = weights.pop(key).reshape(-1)
        w = weights[layer + ".weight"]
        weights[layer + ".weight"] = w * gamma.reshape((-1,) + (1,) * (w.ndim - 1))
        weights[layer + ".bias"] = weights[layer + ".bias"] * gamma


def apply_conv_layouts(weights: dict[str, mx.array]) -> None:
    for key, value in weights.items():
        layout = keymap.conv_layout(key)
        if layout == "pointwise":
            weights[key] = value.reshape(value.shape[:2])
        elif layout == "spatial":
            weights[key] = value.transpose(0, 2, 3, 1)
        elif value.ndim == 4:
            raise UserError(f"4-D weight {key} is not in the converter's conv lists; unsupported layout")


def tie_embeddings(weights: dict[str, mx.array], tied: bool) -> None:
    """Obey the config's tie flag (the reference does), checking a stored head against it."""
    embed_key, head_key = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"
    if not tied:
        if head_key not in weights:
            raise UserError("config says tie_word_embeddings=false but the checkpoint has no lm_head.weight")
        return
    head = weights.pop(head_key, None)
    if head is not None and not (head.shape == weights[embed_key].shape and mx.array_equal(head, weights[embed_key])):
        message = "lm_head.weight differs from embed_tokens but the config ties them; using embed_tokens"
        warnings.warn(message, stacklevel=2)


def truncate_vocab(weights: dict[str, mx.array], size: int) -> None:
    """The original runtime resizes embeddings to len(tokenizer) after loading."""
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        if key in weights:
            if weights[key].shape[0] < size:
                raise UserError(f"tokenizer has {size} tokens but {key} has only {weights[key].shape[0]} rows")
            weights[key] = weights[key][:size]


def tokenizer_length(src: Path) -> int:
    return len(read_tokenizer(src)._tokenizer)


def describe_source(src: Path, raw: dict, weights: dict[str, mx.array]):
    """Config, MLX-keyed weights (torch layout) and the tie flag for either layout."""
    model_type = raw.get("model_type")
    if model_type == "llava_qwen2":
        tower = raw.get("mm_vision_tower", "")
        name, _, size = tower.rpartition("_")
        if name not in ORIGINAL_TOWERS or not size.isdigit():
            raise UserError(f"unsupported mm_vision_tower {tower!r}; supported: mobileclip_l_<size>")
        vision = vision_config(ORIGINAL_TOWERS[name], {})
        mapped = rename(weights, lambda k: keymap.original_to_hf(k, vision))
        tied = raw.get("tie_word_embeddings", True)
        fields = dict(
            image_size=int(size), preprocess_mode="pad" if raw.get("image_aspect_ratio", "pad") == "pad" else "crop"
        )
        text = raw
        image_token = raw.get("image_token_index", -200)
    elif model_type == "fast_vlm":
        vc, text = raw.get("vision_config", {}), raw.get("text_config", {})
        vision = vision_config(vc.get("architecture", "fastvit_mci3"), vc.get("model_args") or {})
        mapped = rename(weights, lambda k: k)
        tied = bool(raw.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
        fields = dict(image_size=processor_size(src), preprocess_mode="crop")
        image_token = raw.get("image_token_index", raw.get("image_token_id", 151646))
    else:
        raise UserError(f"{src}: model_type {model_type!r} is not a FastVLM checkpoint (llava_qwen2 or fast_vlm)")
    return vision, text, mapped, tied, dict(fields, image_token_id=image_token, source_layout=model_type)


def processor_size(src: Path) -> int:
    """The transformers image processor's crop size (1024 when there is no processor file)."""
    path = src / "preprocessor_config.json"
    crop = json.loads(path.read_text()).get("crop_size") if path.is_file() else None
    if isinstance(crop, dict):
        return int(crop.get("height", 1024))
    return int(crop or 1024)


def build(src: Path, dtype: str) -> tuple[FastVLMConfig, dict[str, mx.array]]:
    """Everything but writing: the MLX config and checked, cast weights."""
    raw, weights = read_source(src)
    vision, text, mapped, tied, fields = describe_source(src, raw, weights)
    fold_batchnorm(mapped)
    fold_layer_scale(mapped)
    apply_conv_layouts(mapped)
    tie_embeddings(mapped, tied)
    if fields["source_layout"] == "llava_qwen2":
        truncate_vocab(mapped, tokenizer_length(src))
    vocab = mapped["language_model.model.embed_tokens.weight"].shape[0]
    config = FastVLMConfig(
        vision=vision, text=text_config(text, vocab, tied), eos_token_ids=eos_ids(src, raw, text) or (151645,), **fields
    )
    check_weights(FastVLM(config), mapped, f"converting {src}")
    cast = DTYPES[dtype]
    return config, {k: v.astype(cast) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in mapped.items()}


def convert(
    src: str | Path,
    out: str | Path,
    dtype: str = "float32",
    force: bool = False,
    quantize: int | None = None,
    group_size: int = 64,
    quantize_projector: bool = False,
    pruner: str | None = None,
    keep_ratio: float = 1.0,
) -> Path:
    """Convert SRC to an MLX model directory OUT; OUT is replaced only with force=True.

    `quantize` (4 or 8 bits) quantizes the LLM (and the projector if asked); `pruner` and
    `keep_ratio` become the model's default visual-token pruning.
    """
    src, out = Path(src), Path(out)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if quantize is not None and (quantize not in BITS or group_size not in GROUP_SIZES):
        raise UserError(f"--quantize takes {BITS} bits and --group-size {GROUP_SIZES}; got {quantize}, {group_size}")
    if pruner is not None:
        check(pruner, keep_ratio)
    if not src.is_dir():
        raise UserError(f"checkpoint directory not found: {src}")
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    if not any((src / f).is_file() for f in TOKENIZER_FILES[:4]):
        raise UserError(f"{src} has no tokenizer files (tokenizer.json or vocab.json); copy them next to the weights")
    config, weights = build(src, dtype)
    config.pruner, config.keep_ratio = pruner, keep_ratio if pruner else 1.0
    if quantize is not None:
        config.quantization = dict(bits=quantize, group_size=group_size, projector=quantize_projector)
        weights = quantized_weights(config, weights)
    write_atomically(out, config, weights, src)
    return out


def quantized_weights(config: FastVLMConfig, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    model = FastVLM(config)
    model.load_weights(list(weights.items()))
    quantize_model(model, config.quantization)
    return dict(tree_flatten(model.parameters()))


def write_atomically(out: Path, config: FastVLMConfig, weights: dict[str, mx.array], src: Path) -> None:
    """Write into a temp dir beside OUT, then swap it in; OUT is never left half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model directory should not be
    try:
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        old = out.with_name(f".{out.name}.old") if out.exists() else None
        if old:
            out.rename(old)
        tmp.rename(out)
        if old:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
