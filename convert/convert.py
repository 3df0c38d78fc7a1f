"""Convert an Apple (`llava_qwen2`), transformers (`fast_vlm`) or mlx-vlm FastVLM checkpoint to MLX.

read (source) -> rename (keymap) -> fold BatchNorm and layer scale -> conv layouts -> tie/vocab
rules -> check every parameter -> cast -> publish at OUT without losing anything (replace).
"""

import json
import math
import shutil
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from convert import keymap, mlx_vlm, replace
from convert.source import SOURCE_FIX, check_vocabulary, read_weights, tokenizer_length, weight_files
from fastvlm_mlx.config import FastVLMConfig, VisionConfig, check_image_size
from fastvlm_mlx.errors import UserError
from fastvlm_mlx.load import SIDE_FILES, WEIGHTS_FILE, check_fields, check_values, check_weights, read_json
from fastvlm_mlx.model import FastVLM
from fastvlm_mlx.quantize import BITS, GROUP_SIZES, quantize_model
from pruners import check

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
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
EMBED = "language_model.model.embed_tokens.weight"
# FastVlmConfig's default image_seq_length: save_pretrained writes it whether or not anyone set it
# (the shipped easy-VQA checkpoint has it beside a 128-pixel processor), so it says nothing.
DEFAULT_IMAGE_SEQ_LENGTH = 576
DEFAULT_IMAGE_SIZE = 1024  # FastVLM's published resolution


def read_config(src: Path) -> dict:
    if not (src / "config.json").is_file():
        raise UserError(f"{src} has no config.json; pass a FastVLM checkpoint directory")
    return read_json(src / "config.json", SOURCE_FIX)


def vision_config(architecture: str, model_args: dict) -> VisionConfig:
    if architecture not in VISION_PRESETS:
        raise UserError(f"unsupported vision tower {architecture!r}; supported: {', '.join(VISION_PRESETS)}")
    if model_args.get("inference_mode") is False:
        raise UserError(
            "train-form (non-reparameterized) vision weights are not supported; export with inference_mode=True"
        )
    values = {**VISION_PRESETS[architecture], **model_args}
    check_fields(VisionConfig, values, Path("config.json"), "vision_config.model_args.")
    return VisionConfig.from_dict(values)


def text_config(text: dict, vocab_size: int, tied: bool) -> dict:
    """mlx-lm qwen2 ModelArgs fields from a Qwen2 config (transformers 4 or 5 style)."""
    args = {k: text[k] for k in TEXT_FIELDS if text.get(k) is not None}
    args.setdefault("num_key_value_heads", args["num_attention_heads"])
    rope = text.get("rope_parameters") or {}
    args.setdefault("rope_theta", rope.get("rope_theta", 1e6))
    if rope.get("rope_type", "default") != "default" or text.get("rope_scaling"):
        raise UserError("RoPE scaling is not supported by this converter; FastVLM's Qwen2 uses default RoPE")
    return {"model_type": "qwen2", **args, "vocab_size": vocab_size, "tie_word_embeddings": tied}


def check_text_fields(text: dict) -> None:
    """The Qwen2 fields we read are present and positive numbers (the tokenizer loader reads them too)."""
    for name in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads"):
        if name not in text:
            raise UserError(f"config.json lacks the LLM's {name}; is this a FastVLM checkpoint?")
    for name in TEXT_FIELDS:
        value = text.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf
        ):
            raise UserError(f"config.json: {name} is {json.dumps(value)[:40]}, not a positive number; fix it")


def eos_ids(src: Path, raw: dict, text: dict) -> tuple[int, ...]:
    ids = [raw.get("eos_token_id"), text.get("eos_token_id")]
    gen = src / "generation_config.json"
    if gen.is_file():
        ids.append(read_json(gen, SOURCE_FIX).get("eos_token_id"))
    flat = [i for x in ids for i in (x if isinstance(x, list) else [x]) if isinstance(i, int) and i >= 0]
    return tuple(dict.fromkeys(flat))


def rename(weights: dict[str, mx.array], to_hf: Callable | None) -> dict[str, mx.array]:
    """Source keys -> MLX keys; every key is mapped or explicitly dropped, none twice."""
    out = {}
    for key, value in weights.items():
        try:
            hf = to_hf(key) if to_hf else key
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
    for module in ("language_model.model.embed_tokens", "language_model.lm_head"):
        for key in (f"{module}.{part}" for part in ("weight", "scales", "biases")):  # quantized: by rows too
            if key in weights:
                if weights[key].shape[0] < size:
                    raise UserError(f"tokenizer has {size} tokens but {key} has only {weights[key].shape[0]} rows")
                weights[key] = weights[key][:size]


def describe_source(src: Path, raw: dict) -> tuple[VisionConfig, dict, bool, Callable | None, dict]:
    """Vision config, Qwen2 fields, tie flag, key map to transformers names (None: already those)
    and the FastVLMConfig fields read from the source."""
    model_type = raw.get("model_type")
    if model_type not in ("llava_qwen2", "fast_vlm"):
        raise UserError(f"{src}: model_type {model_type!r} is not a FastVLM checkpoint (llava_qwen2 or fast_vlm)")
    vision = source_vision(raw)
    if model_type == "llava_qwen2":
        check_original_options(raw)
        text, tied, to_hf = raw, raw.get("tie_word_embeddings", True), partial(keymap.original_to_hf, vision=vision)
        fields = dict(preprocess_mode=original_preprocess_mode(raw), max_context=original_max_context(raw))
        image_token = raw.get("image_token_index", -200)
    else:
        text, to_hf = _section(raw, "text_config"), None
        tied = bool(raw.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
        fields = dict(preprocess_mode="crop")
        image_token = raw.get("image_token_index", raw.get("image_token_id", 151646))
    check_text_fields(text)
    if not isinstance(tied, bool) or isinstance(image_token, bool) or not isinstance(image_token, int):
        raise UserError(f"{src}/config.json: tie_word_embeddings must be true/false and image_token_index an integer")
    fields.update(image_size=image_size(src, raw, vision), image_token_id=image_token, source_layout=model_type)
    return vision, text, tied, to_hf, fields


def _section(raw: dict, name: str) -> dict:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise UserError(f"config.json: {name} must be a JSON object, not {type(value).__name__}; fix it")
    return value


def source_vision(raw: dict) -> VisionConfig:
    """The vision tower's config from either layout's config.json."""
    model_type = raw.get("model_type")
    if model_type == "llava_qwen2":
        return vision_config(ORIGINAL_TOWERS[_original_tower(raw)[0]], {})
    if model_type != "fast_vlm":
        raise UserError(f"model_type {model_type!r} is not a FastVLM checkpoint (llava_qwen2 or fast_vlm)")
    vision = _section(raw, "vision_config")
    return vision_config(vision.get("architecture", "fastvit_mci3"), _section(vision, "model_args"))


def _original_tower(raw: dict) -> tuple[str, int]:
    """`mm_vision_tower` "mobileclip_l_1024" -> ("mobileclip_l", 1024): the tower and its input side."""
    tower = raw.get("mm_vision_tower")
    name, _, size = tower.rpartition("_") if isinstance(tower, str) else ("", "", "")
    if name not in ORIGINAL_TOWERS or not size.isdigit():
        raise UserError(f"unsupported mm_vision_tower {tower!r}; supported: mobileclip_l_<size>")
    return name, int(size)


def check_original_options(raw: dict) -> None:
    """Options of Apple's LLaVA code that would make its runtime differ from ours: refused, never ignored.

    Absent fields mean what Apple's loader makes of them (`mm_use_im_patch_token` defaults to true,
    `mm_projector_type` to "linear")."""
    fix = "set it to false in config.json if the checkpoint was trained without it, as Apple's are"
    if raw.get("mm_use_im_start_end", False) is not False:
        raise UserError("mm_use_im_start_end (image wrapped in <im_start>/<im_end> tokens) is not supported")
    if "mm_use_im_patch_token" not in raw:
        raise UserError(f"config.json has no mm_use_im_patch_token, which Apple's loader reads as true; {fix}")
    if raw["mm_use_im_patch_token"] is not False:
        raise UserError("mm_use_im_patch_token (an extra <im_patch> token and logit) is not supported")
    if raw.get("mm_projector_type", "linear") != "mlp2x_gelu":
        shown = raw.get("mm_projector_type", "linear (absent)")
        raise UserError(f"mm_projector_type {shown!r} is not supported; FastVLM's projector is mlp2x_gelu")
    ratio = raw.get("image_aspect_ratio")
    if isinstance(ratio, str) and ratio.startswith("anyres"):
        raise UserError(f"image_aspect_ratio {ratio!r} (tiled high-resolution input) is not supported; use pad")


def original_preprocess_mode(raw: dict) -> str:
    """Apple's process_images: "pad" pads to a square first; any other value (or none) runs its CLIP
    processor directly, i.e. shortest-edge resize + centre crop."""
    return "pad" if raw.get("image_aspect_ratio") == "pad" else "crop"


def original_max_context(raw: dict) -> int | None:
    limit = raw.get("tokenizer_model_max_length")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"config.json: tokenizer_model_max_length is {limit!r}, not a positive integer; fix it")
    return limit


def image_size(src: Path, raw: dict, vision: VisionConfig) -> int:
    """The input side the checkpoint was made for, from its own fields; contradictions are errors.

    Apple's layout: the `mm_vision_tower` suffix. transformers': the processor's crop, else
    sqrt(image_seq_length) x the tower stride, else 1024."""
    crop = processor_size(src)
    crop = crop if crop is None else check_image_size(crop, vision.stride)
    if raw.get("model_type") == "llava_qwen2":
        size = check_image_size(_original_tower(raw)[1], vision.stride)
        if crop is not None and crop != size:
            raise UserError(f"{src}: preprocessor_config.json crops {crop} but mm_vision_tower says {size}; fix one")
        return size
    tokens = raw.get("image_seq_length", DEFAULT_IMAGE_SEQ_LENGTH)
    if tokens == DEFAULT_IMAGE_SEQ_LENGTH:
        return crop or DEFAULT_IMAGE_SIZE
    grid = math.isqrt(tokens) if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0 else 0
    if grid * grid != tokens:
        raise UserError(f"{src}/config.json: image_seq_length {tokens!r} is not a square grid of visual tokens; fix it")
    if crop is not None and (crop // vision.stride) ** 2 != tokens:
        raise UserError(
            f"{src}: preprocessor_config.json crops {crop} ({(crop // vision.stride) ** 2} visual tokens at stride "
            f"{vision.stride}) but config.json says image_seq_length {tokens}; fix whichever is wrong"
        )
    return check_image_size(grid * vision.stride, vision.stride)


def processor_size(src: Path) -> int | None:
    """The side of the image processor's square crop, or None without preprocessor_config.json."""
    path = src / "preprocessor_config.json"
    if not path.is_file():
        return None
    processor = read_json(path, SOURCE_FIX)
    crop, resize = processor.get("crop_size"), processor.get("size")
    sides = {crop.get("height"), crop.get("width")} if isinstance(crop, dict) else {crop}
    sides.add(resize.get("shortest_edge") if isinstance(resize, dict) else resize)
    sides.discard(None)
    if len(sides) > 1 or not all(isinstance(s, int) and not isinstance(s, bool) for s in sides):
        raise UserError(
            f"{path}: crop_size {crop!r} and size {resize!r} are not one square side; fastvlm-mlx resizes the "
            "shortest edge to the crop side and crops a square"
        )
    return sides.pop() if sides else None


def source_image_size(src: Path) -> int:
    """The input side of the checkpoint in `src` (either layout)."""
    raw = read_config(src)
    return image_size(src, raw, source_vision(raw))


def build(src: Path, dtype: str) -> tuple[FastVLMConfig, dict[str, mx.array]]:
    """Everything but writing: the MLX config and checked, cast weights."""
    raw = read_config(src)
    vision, text, tied, to_hf, fields = describe_source(src, raw)
    files = weight_files(src)
    mlx_vlm_names = mlx_vlm.written_by_mlx_vlm(files)  # mlx-community folders: MLX layouts, maybe quantized
    quantization = mlx_vlm.quantization(raw, mlx_vlm_names) if mlx_vlm_names else None
    tokens = tokenizer_length(src)  # before reading gigabytes of weights
    mapped = rename(read_weights(files), mlx_vlm.to_hf(vision) if mlx_vlm_names else to_hf)
    if EMBED not in mapped:
        raise UserError(f"{src} has no embed_tokens weight; is this a FastVLM checkpoint?")
    fold_batchnorm(mapped)
    fold_layer_scale(mapped)
    (mlx_vlm.apply_conv_layouts if mlx_vlm_names else apply_conv_layouts)(mapped)
    tie_embeddings(mapped, tied)
    eos = eos_ids(src, raw, text)
    truncates = fields["source_layout"] == "llava_qwen2"
    check_vocabulary(src, tokens, mapped[EMBED].shape[0], (*eos, fields["image_token_id"]), truncates)
    if truncates:
        truncate_vocab(mapped, tokens)
    vocab = mapped[EMBED].shape[0]
    text = text_config(text, vocab, tied)
    eos = eos or (151645,)
    config = FastVLMConfig(vision=vision, text=text, eos_token_ids=eos, quantization=quantization, **fields)
    check_values(config, src / "config.json", "fix it in the checkpoint's config.json")
    model = FastVLM(config)
    if quantization:
        quantize_model(model, quantization)
    check_weights(model, mapped, f"converting {src}")
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
    keep_positions: bool = False,
) -> Path:
    """Convert SRC to an MLX model directory OUT; OUT is replaced only with force=True.

    OUT may not be SRC, contain it or lie inside it. Whatever is at OUT is kept unless force is
    set, even if it appears while converting; with force it is swapped out so that a crash never
    leaves OUT missing (see `convert.replace`; a symlink at OUT is replaced, not followed).
    `quantize` (4 or 8 bits) quantizes the LLM (and the projector if asked); `pruner` and
    `keep_ratio` become the model's default visual-token pruning, `keep_positions` whether pruned
    visual tokens keep their unpruned RoPE positions by default.
    """
    src = Path(src)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if quantize is not None and (quantize not in BITS or group_size not in GROUP_SIZES):
        raise UserError(f"--quantize takes {BITS} bits and --group-size {GROUP_SIZES}; got {quantize}, {group_size}")
    if pruner is not None:
        check(pruner, keep_ratio)
    if not src.is_dir():
        raise UserError(f"checkpoint directory not found: {src}")
    out = replace.check_output(out, force, src=src)
    config, weights = build(src, dtype)
    config.pruner, config.keep_ratio = pruner, keep_ratio if pruner else 1.0
    config.keep_positions = bool(keep_positions)
    if quantize is not None and config.quantization:
        raise UserError(f"{src} is quantized already ({config.quantization['bits']}-bit); drop --quantize")
    if quantize is not None:
        config.quantization = dict(bits=quantize, group_size=group_size, projector=quantize_projector)
        weights = quantized_weights(config, weights)
    with replace.staged(out, force) as folder:
        write_model(folder, out, config, weights, src)
    return out


def quantized_weights(config: FastVLMConfig, weights: dict[str, mx.array]) -> dict[str, mx.array]:
    model = FastVLM(config)
    model.load_weights(list(weights.items()))
    quantize_model(model, config.quantization)
    return dict(tree_flatten(model.parameters()))


def write_model(folder: Path, out: Path, config: FastVLMConfig, weights: dict[str, mx.array], src: Path) -> None:
    """The model directory's files in `folder` (created here); `out` is where it will be published."""
    folder.mkdir()
    try:
        mx.save_safetensors(str(folder / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
    except RuntimeError as error:
        raise UserError(f"cannot write {out / WEIGHTS_FILE} ({error}); check the free space and permissions") from None
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, folder / name)
