"""Load a converted MLX model directory (config.json, model.safetensors, tokenizer files)."""

import json
import math
import os
import struct
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from fastvlm_mlx.config import FastVLMConfig, VisionConfig, check_image_size
from fastvlm_mlx.cpu import use_cpu_backend
from fastvlm_mlx.errors import UserError, naming
from fastvlm_mlx.model import FastVLM
from fastvlm_mlx.preprocess import MODES
from fastvlm_mlx.quantize import BITS, GROUP_SIZES, quantize_model

WEIGHTS_FILE = "model.safetensors"
STAGE_FIELDS = ("layers", "embed_dims", "mlp_ratios", "token_mixers", "downsamples", "pos_embs")
VOCABULARY_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))  # any one will do
SIDE_FILES = (  # the tokenizer's files and generation settings, kept beside the weights
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
RECONVERT = "re-run `fastvlm-mlx convert` to write it again"
# The small models that ship with the package, by the name `--model` and `load()` take; each
# folder's mlx/ is the converted model, hf/ the transformers checkpoint it came from.
SHIPPED_MODELS = {
    "easyvqa": "the easy-VQA model (bench/train_easyvqa.py)",
    "mosaic": "the mosaic testbed model, trained on all tokens (bench/train_mosaic.py)",
    "mosaic-tuned": "the mosaic model after a pruning-aware fine-tune (bench/train_mosaic.py --tuned-out)",
}
DEFAULT_MODEL = "easyvqa"
MODELS_FOLDER = Path(__file__).parent / "models"
EMBEDDED_MODEL = MODELS_FOLDER / DEFAULT_MODEL


def embedded_model(part: str = "mlx", name: str = DEFAULT_MODEL) -> Path:
    """A shipped model's converted directory ("mlx") or its transformers source ("hf")."""
    if name not in SHIPPED_MODELS:
        raise UserError(f"no shipped model {name!r}; the shipped models are {', '.join(SHIPPED_MODELS)}")
    path = MODELS_FOLDER / name / part
    if not (path / "config.json").is_file():
        raise UserError(
            f"the {name} model is missing from this install ({path}); it is {SHIPPED_MODELS[name]}: "
            "train it, or pass --model DIR"
        )
    return path


def read_json(path: Path, object_fix: str | None = None):
    """The parsed JSON file; unreadable or malformed files are UserErrors that name it. With
    `object_fix`, a file that holds anything but a JSON object is one too, ending in that fix."""
    with naming(path):
        data = json.loads(path.read_bytes().decode("utf-8"))
    if object_fix is not None and not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object; {object_fix}")
    return data


def read_config(model_dir: str | Path) -> FastVLMConfig:
    """A converted model's config.json, every field checked against its annotated type."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{model_dir} has no config.json; pass a directory made by `fastvlm-mlx convert SRC OUT`")
    config = read_json(config_path, RECONVERT)
    model_type = config.get("model_type")
    if model_type != "fastvlm_mlx":
        raise UserError(
            f"{model_dir} is not a converted fastvlm-mlx model (model_type {model_type!r}); "
            f"convert it first: fastvlm-mlx convert {model_dir} OUT"
        )
    check_fields(FastVLMConfig, config, config_path)
    check_fields(VisionConfig, config.get("vision", {}), config_path, "vision.")
    check_fields(qwen2.ModelArgs, config.get("text", {}), config_path, "text.")
    config = FastVLMConfig.from_dict(config)
    check_values(config, config_path)
    return config


def check_fields(cls, values: dict[str, Any], where: Path, prefix: str = "") -> None:
    """Every field of dataclass `cls` in `values` has its annotated type; required ones are present."""
    hints = get_type_hints(cls)
    for spec in fields(cls):
        if spec.name not in values:
            if spec.default is MISSING and spec.default_factory is MISSING:
                raise UserError(f"{where}: field {prefix}{spec.name} is missing; re-run `fastvlm-mlx convert`")
            continue
        value, annotation = values[spec.name], hints[spec.name]
        if not _has_type(value, annotation):
            shown = str(annotation).replace("typing.", "").replace("tuple[", "list[").replace(", ...]", "]")
            shown = getattr(annotation, "__name__", shown) if get_origin(annotation) is None else shown
            raise UserError(
                f"{where}: field {prefix}{spec.name} is {json.dumps(value)[:40]}, not of type {shown}; "
                "fix it or re-run `fastvlm-mlx convert`"
            )


def check_values(config: FastVLMConfig, where: Path, fix: str = RECONVERT) -> None:
    """What the types allow but the model cannot run: mismatched stage lists, unknown modes, sizes
    that are not positive or do not divide (heads, head_dim, groups). `fix` ends each message."""
    vision = config.vision
    stages = {name: len(getattr(vision, name)) for name in STAGE_FIELDS}
    if len(set(stages.values())) != 1:
        shown = ", ".join(f"{name} {n}" for name, n in stages.items())
        raise UserError(f"{where}: the vision stage lists differ in length ({shown}); {fix}")
    _check_sizes(config, where, fix)
    _check_divisions(config, where, fix)
    for name, value, allowed in (
        ("preprocess_mode", (config.preprocess_mode,), MODES),
        ("vision.token_mixers", vision.token_mixers, ("repmixer", "attention")),
    ):
        for unknown in set(value) - set(allowed):
            raise UserError(f"{where}: field {name} has {unknown!r}; choose one of {', '.join(allowed)}")
    quant = config.quantization
    if quant is not None and not (
        quant.get("bits") in BITS
        and quant.get("group_size") in GROUP_SIZES
        and isinstance(quant.get("projector"), bool)
    ):
        raise UserError(
            f"{where}: field quantization is {json.dumps(quant)[:60]}; expected null or "
            f'{{"bits": 4 or 8, "group_size": 32, 64 or 128, "projector": true or false}}'
        )
    if not 0 < config.keep_ratio <= 1:
        raise UserError(f"{where}: field keep_ratio is {config.keep_ratio}; expected a number in (0, 1]")
    try:
        check_image_size(config.image_size, vision.stride)
    except UserError as error:
        raise UserError(f"{where}: field image_size: {error}") from None


def _size_fields(cls) -> list[str]:
    """The fields of dataclass `cls` that hold sizes: every int, float or tuple of them."""
    hints = get_type_hints(cls)
    return [f.name for f in fields(cls) if hints[f.name] in (int, float, tuple[int, ...], tuple[float, ...])]


def _check_sizes(config: FastVLMConfig, where: Path, fix: str) -> None:
    """Every size of the vision tower and the LLM, and max_context, is a positive finite number."""
    sections = (("vision.", VisionConfig, vars(config.vision)), ("text.", qwen2.ModelArgs, config.text))
    sizes = [("max_context", config.max_context)]
    for prefix, cls, values in sections:
        for name in _size_fields(cls):
            value = values.get(name)
            items = enumerate(value) if isinstance(value, tuple | list) else [(None, value)]
            sizes += [(f"{prefix}{name}" + ("" if i is None else f"[{i}]"), item) for i, item in items]
    for name, value in sizes:
        if value is not None and not 0 < value < math.inf:
            raise UserError(f"{where}: field {name} is {value}; expected a positive number; {fix}")


def _check_divisions(config: FastVLMConfig, where: Path, fix: str) -> None:
    """Sizes that must divide: attention heads, grouped convolutions, hidden units that round to none."""
    vision, text = config.vision, config.text
    checks = [
        (f"vision.embed_dims[{i}] {dim} is not a multiple of vision.head_dim {vision.head_dim}", dim % vision.head_dim)
        for i, (dim, mixer) in enumerate(zip(vision.embed_dims, vision.token_mixers, strict=True))
        if mixer == "attention"
    ]
    checks += [
        (f"vision.mlp_ratios[{i}] {ratio} leaves embed_dims[{i}] {dim} no hidden units", int(dim * ratio) < 1)
        for i, (dim, ratio) in enumerate(zip(vision.embed_dims, vision.mlp_ratios, strict=True))
    ]
    last, features = vision.embed_dims[-1], vision.num_features
    heads, kv_heads = text.get("num_attention_heads", 1), text.get("num_key_value_heads", 1)
    checks += [
        (f"vision.cls_ratio {vision.cls_ratio} makes {features} features, not a multiple of {last}", features % last),
        (
            f"vision.se_ratio {vision.se_ratio} leaves the squeeze-excite layer no units",
            int(features * vision.se_ratio) < 1,
        ),
        (
            f"text.hidden_size {text.get('hidden_size')} is not a multiple of text.num_attention_heads {heads}",
            text.get("hidden_size", 0) % heads,
        ),
        (
            f"text.num_attention_heads {heads} is not a multiple of text.num_key_value_heads {kv_heads}",
            heads % kv_heads,
        ),
    ]
    for message, wrong in checks:
        if wrong:
            raise UserError(f"{where}: field {message}; {fix}")


def _has_type(value, annotation) -> bool:
    """`value` as JSON gives it (lists for tuples, dicts for nested dataclasses) fits `annotation`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is Any:
        return True
    if origin in (Union, UnionType):
        return any(_has_type(value, arg) for arg in args)
    if origin is tuple:  # tuple[X, ...]
        return isinstance(value, list | tuple) and all(_has_type(item, args[0]) for item in value)
    if origin is dict or is_dataclass(annotation):
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


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


def safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor names -> {dtype, shape, data_offsets}, after checking that the file is whole:
    8-byte header length + JSON header + the data the header points at = the file's size."""
    with naming(path), path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        (header_size,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (size,)
        if header_size > size - 8:
            raise _incomplete(path, f"{size} bytes, too short for its header")
        try:
            header = json.loads(f.read(header_size).decode("utf-8"))
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            raise _incomplete(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _incomplete(path, "its header is not a JSON object")
    header.pop("__metadata__", None)
    ends = [_data_end(entry) for entry in header.values()]
    if None in ends:
        raise _incomplete(path, "a tensor entry lacks dtype, shape or data offsets")
    if 8 + header_size + max(ends, default=0) != size:
        raise _incomplete(path, f"{size} bytes, but its header describes {8 + header_size + max(ends, default=0)}")
    return header


def _data_end(entry) -> int | None:
    """Where a header entry's data ends, or None when the entry is malformed."""
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return None
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        return None
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(n, int) for n in offsets):
        return None
    return offsets[1] if 0 <= offsets[0] <= offsets[1] else None


def _incomplete(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a whole safetensors file ({why}); {RECONVERT}")


def read_weights(path: Path) -> dict[str, mx.array]:
    """The arrays of a safetensors file whose header checks out (see `safetensors_header`)."""
    safetensors_header(path)
    try:
        return mx.load(str(path))
    except RuntimeError as error:  # mx.load's one error class for unreadable files
        raise UserError(f"{path}: {error}; {RECONVERT}") from None


def load_model(model_dir: str | Path | None = None) -> tuple[FastVLM, TokenizerWrapper]:
    """Build the model from its config, load and check its weights, load the tokenizer.

    Without a directory, the embedded easy-VQA model is loaded. On the CPU the model is
    switched onto the CPU backend (`fastvlm_mlx.cpu.use_cpu_backend`)."""
    model_dir = embedded_model() if model_dir is None else Path(model_dir)
    config = read_config(model_dir)
    weights_path = model_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise UserError(f"{model_dir} has no {WEIGHTS_FILE}; {RECONVERT}")
    model = FastVLM(config)
    if config.quantization:
        quantize_model(model, config.quantization)
    weights = read_weights(weights_path)
    check_weights(model, weights, str(weights_path))
    model.load_weights(list(weights.items()))
    model.eval()
    mx.eval(model.parameters())
    use_cpu_backend(model)
    return model, read_tokenizer(model_dir, list(config.eos_token_ids))


def read_tokenizer(model_dir: Path, eos_token_ids: list[int] | None = None) -> TokenizerWrapper:
    """mlx-lm's tokenizer loader, without transformers' warning about our config.json's model_type.

    Missing or unreadable tokenizer files are UserErrors that name them."""
    from transformers.utils import logging

    model_dir = Path(model_dir)
    if not any(all((model_dir / name).is_file() for name in names) for names in VOCABULARY_FILE_SETS):
        raise UserError(f"{model_dir} has no tokenizer (tokenizer.json); {RECONVERT}")
    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return load_tokenizer(model_dir, eos_token_ids=eos_token_ids)
    except Exception:
        _blame_tokenizer_files(model_dir)  # a UserError when one of them is broken
        raise
    finally:
        logging.set_verbosity(previous)


def _blame_tokenizer_files(model_dir: Path) -> None:
    """After a failed load: raise a UserError naming the tokenizer file that cannot be read, if any."""
    from tokenizers import Tokenizer

    for name in ("tokenizer_config.json", "special_tokens_map.json", "vocab.json"):
        if (model_dir / name).is_file():
            read_json(model_dir / name)
    path = model_dir / "tokenizer.json"
    if path.is_file():
        try:
            Tokenizer.from_file(str(path))
        except Exception as error:
            if type(error) is not Exception:  # the tokenizers library raises plain Exception for bad files
                raise
            raise UserError(f"{path} is not a tokenizer file ({error}); {RECONVERT}") from None
