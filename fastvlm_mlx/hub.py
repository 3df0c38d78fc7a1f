"""Models the way users have them: a converted folder, a checkpoint folder, or a Hugging Face repo id.

`resolve_model(path_or_id)` gives the converted folder that `load_model` reads:
- None: the shipped easy-VQA model; a shipped model's name (`mosaic`, see load.SHIPPED_MODELS):
  that model, unless a folder of that name exists (a path always means the folder);
- a converted folder (config.json with model_type fastvlm_mlx): itself;
- a checkpoint folder (Apple's `llava_qwen2`, transformers' `fast_vlm`, or an mlx-community folder
  written by mlx-vlm): converted once into the model cache and reused while its files are unchanged;
- otherwise an `org/name` Hugging Face repo id, fetched by huggingface_hub into its own cache
  (`HF_HUB_OFFLINE=1`: that cache only, no network), then as a folder above.

The model cache is `$XDG_CACHE_HOME/fastvlm-mlx/models` (default `~/.cache/...`). It is used only
when it is private: ours, mode 0700, and nobody else can change a folder on the way to it; a
planted model would otherwise be loaded as ours. Each entry is named by a hash of the content of
every file the converter reads, the conversion settings and our version.
"""

import fcntl
import hashlib
import json
import os
import re
import stat
import tempfile
from pathlib import Path

from fastvlm_mlx import __version__
from fastvlm_mlx.cpu.private import existing_ancestor, safe_path
from fastvlm_mlx.errors import UserError, naming
from fastvlm_mlx.load import SHIPPED_MODELS, SIDE_FILES, embedded_model, load_model

SOURCE_TYPES = ("llava_qwen2", "fast_vlm")
# What a checkpoint repo holds that the converter reads (no .bin pickles, archives or Core ML packages).
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer.model"]
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
CONVERTER_READS = ("config.json", "preprocessor_config.json", *SIDE_FILES)
HASH_CHUNK = 1 << 24


def load(path_or_id: str | Path | None = None, *, dtype: str = "float32"):
    """(model, tokenizer) from a converted folder, a checkpoint folder (converted once, cached), a
    Hugging Face repo id (`apple/FastVLM-0.5B`), a shipped model's name (`"mosaic"`), or, with no
    argument, the shipped easy-VQA model."""
    return load_model(resolve_model(path_or_id, dtype=dtype))


def resolve_model(path_or_id: str | Path | None, *, dtype: str = "float32") -> Path:
    """The converted folder for `path_or_id` (see the module docstring)."""
    if path_or_id is None:
        return embedded_model()
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return _converted(path, dtype)
    if isinstance(path_or_id, str) and path_or_id in SHIPPED_MODELS:
        return embedded_model(name=path_or_id)
    if isinstance(path_or_id, str) and REPO_ID.fullmatch(path_or_id) and ".." not in path_or_id:
        return _converted(download(path_or_id), dtype)
    raise UserError(
        f"no model folder {path_or_id} (and it is neither a shipped model, {', '.join(SHIPPED_MODELS)}, "
        "nor a Hugging Face repo id like apple/FastVLM-0.5B)"
    )


def _converted(folder: Path, dtype: str) -> Path:
    """`folder` itself if converted, else its conversion in the model cache (made now if missing)."""
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(f"{folder} has no config.json; give a FastVLM model folder or a Hugging Face repo id")
    with naming(config):
        raw = json.loads(config.read_bytes().decode("utf-8"))
    if not isinstance(raw, dict) or raw.get("model_type") not in SOURCE_TYPES:
        return folder  # converted, or not a model: load_model says which
    return convert_once(folder, dtype)


def convert_once(src: Path, dtype: str = "float32") -> Path:
    """The cached conversion of checkpoint `src`, converting it (once, under a lock) if needed."""
    from convert.convert import convert  # the runtime needs the converter only here

    cache = models_folder()
    entry = cache / source_key(src, dtype, cache)
    if (entry / "config.json").is_file():
        return entry
    with open(cache / f"{entry.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits, then finds the entry made
        if not (entry / "config.json").is_file():
            convert(src, entry, dtype=dtype)
    return entry


def source_key(src: Path, dtype: str, cache: Path) -> str:
    """A hash of the content of every file the converter reads from `src`, and of how it converts."""
    from convert.source import weight_files

    files = [src / name for name in CONVERTER_READS if (src / name).is_file()] + weight_files(src)
    digest = hashlib.sha256(f"fastvlm-mlx {__version__} {dtype}".encode())
    for path in sorted(files):
        digest.update(f"\n{path.name} {file_digest(path, cache)}".encode())
    return digest.hexdigest()[:32]


def file_digest(path: Path, cache: Path) -> str:
    """sha256 of a file's content. Hugging Face cache files are links to blobs named by their hash,
    which is used as is; other digests are kept in the cache by (path, size, mtime, inode)."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", real.name):
        return real.name
    info = real.stat()
    signature = f"{real}\0{info.st_size}\0{info.st_mtime_ns}\0{info.st_ino}"
    memo = cache / "digests" / hashlib.sha256(signature.encode()).hexdigest()
    if memo.is_file():
        return memo.read_text()
    digest = hashlib.sha256()
    with naming(path), real.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    memo.parent.mkdir(mode=0o700, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=memo.parent)  # a name of its own: others may write the same memo
    with os.fdopen(fd, "w") as f:
        f.write(digest.hexdigest())
    os.replace(partial, memo)
    return digest.hexdigest()


def models_folder() -> Path:
    """The private model cache, made if missing; a UserError when it cannot be private."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    folder = Path(os.path.realpath(base / "fastvlm-mlx" / "models"))  # a link others re-point is not followed later
    if not safe_path(existing_ancestor(str(folder))):  # nothing is made where others could change it
        raise UserError(
            f"the model cache {folder} is not private: it lies in a folder others can change; "
            "set XDG_CACHE_HOME to a folder of your own"
        )
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(folder)
    except OSError as error:
        raise UserError(f"cannot make the model cache {folder} ({error.strerror}); set XDG_CACHE_HOME") from None
    private = stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077
    if not (private and safe_path(str(folder))):
        raise UserError(
            f"the model cache {folder} is not private to you (it or a folder above it can be changed by "
            "another user); set XDG_CACHE_HOME to a folder of your own, or convert by hand: fastvlm-mlx convert SRC OUT"
        )
    return folder


def download(repo_id: str) -> Path:
    """The repo's files in huggingface_hub's cache (downloaded unless `HF_HUB_OFFLINE=1`)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise UserError(
            f"{repo_id} is not in the local Hugging Face cache and it cannot be downloaded now (offline, "
            "HF_HUB_OFFLINE=1 or no network); download it once online, or give a model folder"
        ) from None
    except (HfHubHTTPError, HFValidationError) as error:
        raise UserError(f"cannot get {repo_id} from the Hugging Face Hub: {str(error).splitlines()[0]}") from None
