"""A checkpoint folder as the converter reads it: config.json, the weight files it names, its tokenizer.

Only the weight files a transformers loader would read are opened (the single file, an index's
shards, or a complete shard set; safetensors before `.bin`), so `training_args.bin`, optimizer
states and stray copies beside them are never read. Every bad file is a UserError naming it.
"""

import pickle
import re
from pathlib import Path

import mlx.core as mx

from fastvlm_mlx.errors import UserError
from fastvlm_mlx.load import read_json, read_tokenizer

# (single file, index, shard names) in the order transformers looks for them.
WEIGHT_SOURCES = (
    ("model.safetensors", "model.safetensors.index.json", r"model-(\d{5})-of-(\d{5})\.safetensors"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json", r"pytorch_model-(\d{5})-of-(\d{5})\.bin"),
)
SOURCE_FIX = "restore it from the checkpoint's source"  # for config files that are not JSON objects
TOKENIZER_FIX = "copy the checkpoint's tokenizer files (tokenizer.json, or vocab.json + merges.txt) next to it"


def weight_files(src: Path) -> list[Path]:
    """The weight files of the checkpoint in `src`, by the transformers file-name rules."""
    for single, index, shard_name in WEIGHT_SOURCES:
        if (src / single).is_file():
            return [src / single]
        if (src / index).is_file():
            return _indexed_files(src / index)
        shards = _shard_set(src, shard_name)
        if shards:
            return shards
    raise UserError(
        f"{src} has no weights: expected model.safetensors, model-0000K-of-0000N.safetensors, "
        "pytorch_model.bin or pytorch_model-0000K-of-0000N.bin; download the full checkpoint"
    )


def _indexed_files(index: Path) -> list[Path]:
    weight_map = read_json(index, SOURCE_FIX).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index} has no weight_map of tensor name -> file; re-download it")
    names = sorted(set(weight_map.values()))
    outside = [n for n in names if Path(n).name != n or n in (".", "..")]
    if outside:
        raise UserError(f"{index} names {outside[0]!r}, not a file beside it; re-download the index")
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise UserError(f"{index} names {', '.join(missing)}, missing from {index.parent}; download the missing shards")
    return [index.parent / n for n in names]


def _shard_set(src: Path, pattern: str) -> list[Path]:
    shards = {p: re.fullmatch(pattern, p.name) for p in src.iterdir() if p.is_file()}
    shards = {p: (int(m[1]), int(m[2])) for p, m in shards.items() if m}
    if not shards:
        return []
    totals = {total for _, total in shards.values()}
    expected = {(i, total) for total in totals for i in range(1, total + 1)}
    missing = sorted(expected - set(shards.values()))
    if len(totals) > 1 or missing:
        shown = ", ".join(f"{i} of {total}" for i, total in missing) or f"sets of {sorted(totals)}"
        raise UserError(f"{src} has an incomplete shard set (missing {shown}); download every shard")
    return sorted(shards)


def read_weights(files: list[Path]) -> dict[str, mx.array]:
    """All tensors of `files` by name; a name in two files is an error (the folder mixes checkpoints)."""
    weights = {}
    for path in files:
        part = _read_safetensors(path) if path.suffix == ".safetensors" else _read_bin(path)
        twice = weights.keys() & part.keys()
        if twice:
            raise UserError(f"{path} repeats {min(twice)!r} from another weight file; the folder mixes checkpoints")
        weights.update(part)
    return weights


def _read_safetensors(path: Path) -> dict[str, mx.array]:
    with path.open("rb") as f:
        if f.read(64).startswith(b"version https://git-lfs"):
            raise UserError(f"{path} is a Git LFS pointer, not the weights; run `git lfs pull` in {path.parent}")
    try:
        return mx.load(str(path))
    except RuntimeError as error:
        reason = str(error).splitlines()[0][:160] if str(error) else "unreadable"
        raise UserError(f"cannot read {path} ({reason}); it is truncated or not safetensors, re-download it") from None


def _read_bin(path: Path) -> dict[str, mx.array]:
    try:
        import torch  # only the legacy pickle format needs torch
    except ImportError:
        raise UserError(f"reading {path.name} needs torch: pip install 'fastvlm-mlx[torch]'") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        kind = type(error).__name__
        raise UserError(f"cannot read {path} as PyTorch weights ({kind}); it is corrupt or not a state dict") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict of tensors; is it a weight file?")
    return {str(k): mx.array(v.float().numpy()) for k, v in state.items()}


def tokenizer_length(src: Path) -> int:
    """len(tokenizer) for the tokenizer files in `src` (what the reference runtime resizes to)."""
    if (src / "vocab.json").is_file() and not (src / "merges.txt").is_file() and not (src / "tokenizer.json").is_file():
        raise UserError(f"{src} has vocab.json but no merges.txt; {TOKENIZER_FIX}")
    if not any((src / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        raise UserError(f"{src} has no tokenizer vocabulary; {TOKENIZER_FIX}")
    try:
        return len(read_tokenizer(src)._tokenizer)
    except UserError as error:  # it names the broken file; its fix ("re-run convert") is for converted models
        reason = str(error).split("; ")[0]
    except (OSError, ValueError, TypeError, KeyError, ImportError) as error:
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
    raise UserError(f"cannot load the tokenizer in {src} ({reason}); {TOKENIZER_FIX}") from None


def check_vocabulary(src: Path, tokens: int, rows: int, token_ids: tuple[int, ...], truncates: bool) -> None:
    """The tokenizer must fit an embedding of `rows` rows and know the config's token ids. Where the
    embedding is cut to the tokenizer's length (Apple's layout, as its runtime does), a tokenizer
    of half the rows or fewer is taken for a wrong or incomplete one."""
    least = rows // 2 if truncates else 0
    if not least < tokens <= rows:
        raise UserError(
            f"the tokenizer in {src} has {tokens} tokens but the embedding has {rows} rows "
            f"(expected more than {least} and at most {rows}); its files are incomplete or from another model: "
            f"{TOKENIZER_FIX}"
        )
    unknown = [i for i in token_ids if i >= tokens]
    if unknown:
        raise UserError(
            f"config.json in {src} uses token id {unknown[0]}, beyond its tokenizer's {tokens} tokens; {TOKENIZER_FIX}"
        )
