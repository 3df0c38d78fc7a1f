"""load(path_or_id): converted folders, checkpoint folders converted once into a private cache,
Hugging Face repo ids from a local cache (offline), and mlx-vlm folders as mlx-community has them."""

import json
import os
import shutil
import stat

import mlx.core as mx
import pytest

import convert.convert as converter
from fastvlm_mlx import hub
from fastvlm_mlx.errors import UserError
from fastvlm_mlx.load import embedded_model

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    home = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home / "fastvlm-mlx" / "models"


@pytest.fixture
def conversions(monkeypatch):
    """The source folders converted during the test."""
    sources, convert = [], converter.convert

    def spy(src, out, **options):
        sources.append(src)
        return convert(src, out, **options)

    monkeypatch.setattr(converter, "convert", spy)
    return sources


def same_weights(a, b) -> bool:
    x, y = mx.load(str(a / "model.safetensors")), mx.load(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(mx.array_equal(x[k], y[k]) for k in x)


def test_converted_folders_and_the_default(tiny_mlx, cache_home):
    assert hub.resolve_model(None) == embedded_model()
    assert hub.resolve_model(tiny_mlx) == tiny_mlx
    assert hub.resolve_model(str(tiny_mlx)) == tiny_mlx
    assert not cache_home.exists()  # nothing to convert, nothing cached


def test_a_checkpoint_folder_is_converted_once_and_reused(tiny_hf, tiny_mlx, tmp_path, cache_home, conversions):
    src = shutil.copytree(tiny_hf[0], tmp_path / "src")
    first = hub.resolve_model(src)
    assert first.parent == cache_home and conversions == [src]
    assert same_weights(first, tiny_mlx)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    model, tokenizer = hub.load(src)  # again: found in the cache, not converted
    assert conversions == [src] and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert model.config.image_size == 1024 and tokenizer.eos_token_id is not None
    assert stat.S_IMODE(os.stat(cache_home).st_mode) == 0o700
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}, indent=1))
    assert hub.resolve_model(src) != first and len(conversions) == 2  # changed content, new conversion
    assert hub.resolve_model(src, dtype="float16") not in (first,) and len(conversions) == 3


def test_the_cache_must_be_private(tiny_hf, tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # anyone could plant a model here
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared))
    with pytest.raises(UserError, match="not private"):
        hub.resolve_model(tiny_hf[0])
    assert list(shared.iterdir()) == []  # nothing made there
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "mine"))
    (tmp_path / "mine" / "fastvlm-mlx" / "models").mkdir(parents=True, mode=0o755)
    os.chmod(tmp_path / "mine" / "fastvlm-mlx" / "models", 0o755)  # readable by others: refused too
    with pytest.raises(UserError, match="not private"):
        hub.models_folder()


def hf_cache(root, repo_id: str, files) -> None:
    """huggingface_hub's cache layout: blobs named by content hash, snapshot links, refs/main."""
    import hashlib

    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for f in files:
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))


def test_a_repo_id_resolves_offline_from_the_local_cache(
    tiny_hf, tiny_mlx, tmp_path, cache_home, monkeypatch, conversions
):
    from huggingface_hub import constants

    hub_cache = tmp_path / "hf" / "hub"
    hf_cache(hub_cache, "someone/tiny-fastvlm", [f for f in tiny_hf[0].iterdir() if f.is_file()])
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))  # what the two variables set at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder = hub.resolve_model("someone/tiny-fastvlm")
    assert folder.parent == cache_home and same_weights(folder, tiny_mlx)
    assert hub.resolve_model("someone/tiny-fastvlm") == folder and len(conversions) == 1
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        hub.resolve_model("someone/not-downloaded")
    with pytest.raises(UserError, match="no model folder"):
        hub.resolve_model("no/such/folder")


def test_a_folder_that_is_no_model_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        hub.resolve_model(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not an object"):
        hub.load(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match="not a converted fastvlm-mlx model"):
        hub.load(tmp_path / "empty")


def test_concurrent_loads_convert_once(tiny_hf, tmp_path, cache_home, conversions):
    from concurrent.futures import ThreadPoolExecutor

    src = shutil.copytree(tiny_hf[0], tmp_path / "src")
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(hub.resolve_model, [src, src]))
    assert folders[0] == folders[1] and len(conversions) == 1
