"""mlx-vlm's FastVLM folders (the mlx-community models) load as ours from the same Apple checkpoint.

mlx-vlm hard-codes FastViTHD, so the checkpoint has the full tower (random, O(1) activations) with a
tiny Qwen2, at 256 pixels (16 visual tokens) to keep generation short. Two sources of the layout:
one written here by mlx-vlm's documented rules (always runs), and mlx-vlm's own converter, pinned
in the `mlx-vlm` extra (runs where it is installed, as in CI).
"""

import importlib.util
import json
import re
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest

from convert.convert import convert
from fastvlm_mlx import generate, load
from fastvlm_mlx.config import VisionConfig

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow
MLX_VLM = "0.7.10"
# mlx-vlm's sanitize: these 4-D weights OIHW -> OHWI, layer scales (C, 1, 1) -> (1, 1, C).
TRANSPOSED = (".reparam_conv.weight", ".conv.weight", ".fc1.weight", ".fc2.weight", ".lkb_reparam.weight")
TRANSPOSED += (".reduce.weight", ".expand.weight")


@pytest.fixture(scope="module")
def apple(torch_ref, tmp_path_factory):
    """An Apple-layout checkpoint as Apple's training writes it (the CLIP head.proj included)."""
    from tests.conftest import CORPUS, TINY_TEXT

    root = tmp_path_factory.mktemp("apple")
    tokenizer = torch_ref.make_tokenizer(root / "hf", CORPUS, vocab_size=300)
    text = dict(TINY_TEXT, vocab_size=len(tokenizer))
    reference = torch_ref.build_reference({}, text, tokenizer.convert_tokens_to_ids("<image>"), seed=2)
    torch_ref.save_checkpoint(reference, tokenizer, root / "hf", tokenizer.convert_tokens_to_ids("<|im_end|>"))
    original = torch_ref.to_original_layout(root / "hf", root / "original", VisionConfig())
    config = json.loads((original / "config.json").read_text())
    config.update(mm_vision_tower="mobileclip_l_256", tokenizer_model_max_length=8192)
    (original / "config.json").write_text(json.dumps(config, indent=1))
    weights = mx.load(str(original / "model.safetensors"))
    weights["model.vision_tower.vision_tower.model.head.proj"] = mx.random.normal((3072, 768), key=mx.random.key(0))
    mx.save_safetensors(str(original / "model.safetensors"), weights, metadata={"format": "pt"})
    yield original
    shutil.rmtree(root)  # ~1 GB


def mlx_vlm_layout(src, out, quantize: bool = False):
    """What mlx-vlm's converter writes, by its documented sanitize rules (keys, layouts, quantization)."""
    out.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    weights = {}
    for key, value in mx.load(str(src / "model.safetensors")).items():
        key = key.replace("model.vision_tower.vision_tower.model.", "vision_tower.vision_model.")
        key = key.replace("vision_tower.vision_model.patch_embed.", "vision_tower.vision_model.patch_embed.blocks.")
        key = key.replace("model.mm_projector.", "mm_projector.")
        key = key if key.startswith(("vision_tower.", "mm_projector.")) else "language_model." + key
        if key.startswith("vision_tower.") and value.ndim == 4 and key.endswith(TRANSPOSED):
            value = value.transpose(0, 2, 3, 1)
        if re.search(r"\.layer_scale(_[12])?$", key):
            value = value.transpose(1, 2, 0)
        if key == "language_model.lm_head.weight":  # tied: mlx-vlm drops it
            continue
        if quantize and key.endswith(".weight") and not key.startswith("vision_tower.") and "norm" not in key:
            value, scales, biases = mx.quantize(value, group_size=64, bits=4)
            weights[key[: -len("weight")] + "scales"], weights[key[: -len("weight")] + "biases"] = scales, biases
        weights[key] = value
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    if quantize:
        config = json.loads((out / "config.json").read_text())
        config["quantization"] = config["quantization_config"] = {"group_size": 64, "bits": 4, "mode": "affine"}
        (out / "config.json").write_text(json.dumps(config))
    return out


def same_weights(a, b) -> bool:
    x, y = mx.load(str(a / "model.safetensors")), mx.load(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(mx.array_equal(x[k], y[k]) for k in x)


def assert_loads_as_ours(folder, ours, image_path, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert same_weights(convert(folder, tmp_path / f"{folder.name}-converted"), ours)
    mine, theirs = load(ours), load(folder)  # through the model cache, as a user loads it
    question = "what color is the shape?"
    answers = [generate(*model, image_path, question, max_tokens=8).token_ids for model in (mine, theirs)]
    assert answers[0] == answers[1] and len(answers[0]) > 0


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "4-bit"])
def test_the_documented_layout_loads_as_ours(apple, image_path, tmp_path, monkeypatch, quantize):
    options = dict(quantize=4, group_size=64, quantize_projector=True) if quantize else {}
    ours = convert(apple, tmp_path / "ours", **options)
    folder = mlx_vlm_layout(apple, tmp_path / "mlx-vlm", quantize)
    assert_loads_as_ours(folder, ours, image_path, tmp_path, monkeypatch)


@pytest.mark.skipif(importlib.util.find_spec("mlx_vlm") is None, reason=f"needs mlx-vlm=={MLX_VLM} (the mlx-vlm extra)")
@pytest.mark.parametrize("quantize", [False, True], ids=["float", "4-bit"])
def test_mlx_vlm_s_own_converter_loads_as_ours(apple, image_path, tmp_path, monkeypatch, quantize):
    from importlib.metadata import version

    assert version("mlx-vlm") == MLX_VLM
    folder = tmp_path / "mlx-community"
    flags = ["-q", "--q-bits", "4", "--q-group-size", "64"] if quantize else []
    command = [sys.executable, "-m", "mlx_vlm", "convert", "--hf-path", str(apple), "--mlx-path", str(folder)]
    result = subprocess.run([*command, "--dtype", "float32", *flags], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    options = dict(quantize=4, group_size=64, quantize_projector=True) if quantize else {}
    assert_loads_as_ours(folder, convert(apple, tmp_path / "ours", **options), image_path, tmp_path, monkeypatch)


def test_unsupported_mlx_vlm_quantization_is_named(apple, tmp_path):
    from fastvlm_mlx.errors import UserError

    folder = mlx_vlm_layout(apple, tmp_path / "mixed", quantize=True)
    config = json.loads((folder / "config.json").read_text())
    specs = [({"group_size": 64, "bits": 4, "mode": "mxfp4"}, "affine"), ({"group_size": 64, "bits": 3}, "3-bit")]
    for spec, words in specs:
        (folder / "config.json").write_text(json.dumps({**config, "quantization": spec}))
        with pytest.raises(UserError, match=words):
            convert(folder, tmp_path / f"out-{spec['bits']}-{spec.get('mode')}")
