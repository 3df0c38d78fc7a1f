"""Conversion: both checkpoint layouts, full-size FastViTHD parity, and the converter's rules."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from convert.convert import convert
from fastvlm_mlx.config import VisionConfig
from fastvlm_mlx.errors import UserError
from fastvlm_mlx.load import load_model
from fastvlm_mlx.vision import FastViT

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_size(torch_ref, tmp_path_factory):
    """Full FastViTHD (random, O(1) activations) + tiny Qwen2, in both layouts, converted."""
    from tests.conftest import CORPUS, TINY_TEXT

    root = tmp_path_factory.mktemp("fastvithd")
    tokenizer = torch_ref.make_tokenizer(root / "hf", CORPUS, vocab_size=300)
    text = dict(TINY_TEXT, vocab_size=len(tokenizer))  # the original runtime resizes to len(tokenizer)
    reference = torch_ref.build_reference({}, text, tokenizer.convert_tokens_to_ids("<image>"), seed=1)
    torch_ref.save_checkpoint(reference, tokenizer, root / "hf", tokenizer.convert_tokens_to_ids("<|im_end|>"))
    original = torch_ref.to_original_layout(root / "hf", root / "original", VisionConfig())
    config = json.loads((original / "config.json").read_text())  # the fields Apple's training writes
    config.update(mm_use_im_start_end=False, mm_use_im_patch_token=False, tokenizer_model_max_length=8192)
    (original / "config.json").write_text(json.dumps(config))
    yield reference, convert(root / "hf", root / "hf_mlx"), convert(original, root / "original_mlx")
    shutil.rmtree(root)  # ~1.9 GB


def test_original_and_transformers_layouts_convert_identically(full_size):
    _, hf_out, original_out = full_size
    hf, original = mx.load(str(hf_out / "model.safetensors")), mx.load(str(original_out / "model.safetensors"))
    assert hf.keys() == original.keys()
    tower = FastViT(VisionConfig()).parameters()
    assert sum(k.startswith("vision_tower.") for k in hf) == len(tree_flatten(tower))  # the whole FastViTHD
    for key in hf:
        assert mx.array_equal(hf[key], original[key]), key
    hf_cfg, orig_cfg = (json.loads((d / "config.json").read_text()) for d in (hf_out, original_out))
    assert orig_cfg["preprocess_mode"] == "pad" and hf_cfg["preprocess_mode"] == "crop"
    assert orig_cfg["max_context"] == 8192 and hf_cfg["max_context"] is None
    assert orig_cfg["vision"] == hf_cfg["vision"] and orig_cfg["text"] == hf_cfg["text"]


def test_full_size_fastvithd_features_match_at_1024(full_size):
    """(1, 256, 3072) features; fp32 tolerance 1e-4 relative to the feature scale."""
    reference, hf_out, _ = full_size
    model, _ = load_model(hf_out)
    pixels = np.random.default_rng(0).random((1, 1024, 1024, 3), dtype=np.float32)
    with torch.no_grad():
        ref = reference.model.vision_tower(torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state
    ref = ref.flatten(2).transpose(1, 2).numpy()
    mine = np.asarray(model.encode_image(mx.array(pixels))[0])
    assert mine.shape == ref.shape == (1, 256, 3072)
    assert ref.std() > 0.05  # activations did not vanish
    assert np.abs(mine - ref).max() / np.abs(ref).max() < 1e-4


def test_original_layout_vocab_is_cut_to_tokenizer_length():
    """The original runtime resizes embeddings to len(tokenizer) after loading; so do we."""
    from convert.convert import truncate_vocab

    embed = mx.arange(384 * 4, dtype=mx.float32).reshape(384, 4)
    weights = {"language_model.model.embed_tokens.weight": embed}
    truncate_vocab(weights, 300)
    assert mx.array_equal(weights["language_model.model.embed_tokens.weight"], embed[:300])
    with pytest.raises(UserError, match="only 300 rows"):
        truncate_vocab(weights, 310)


def test_tied_head_that_differs_warns_and_follows_the_flag():
    from convert.convert import tie_embeddings

    embed = mx.ones((10, 4))
    weights = {"language_model.model.embed_tokens.weight": embed, "language_model.lm_head.weight": embed * 2}
    with pytest.warns(UserWarning, match="differs"):
        tie_embeddings(weights, tied=True)
    assert "language_model.lm_head.weight" not in weights
    with pytest.raises(UserError, match="no lm_head"):
        tie_embeddings(weights, tied=False)


def test_existing_output_is_kept_without_force(tiny_hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        convert(tiny_hf[0], out)
    assert (out / "keep.txt").read_text() == "mine"
    convert(tiny_hf[0], out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_mismatched_shapes_are_reported(tiny_hf, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "bad"
    src.mkdir()
    for f in tiny_hf[0].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    weights = load_file(src / "model.safetensors")
    weights["model.multi_modal_projector.linear_2.bias"] = torch.zeros(7)
    save_file(weights, src / "model.safetensors")
    with pytest.raises(UserError, match="mis-shaped.*linear_2.bias"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_is_applied(tiny_hf, tmp_path, dtype):
    out = convert(tiny_hf[0], tmp_path / dtype, dtype=dtype)
    weights = mx.load(str(out / "model.safetensors"))
    assert {str(w.dtype) for w in weights.values()} == {f"mlx.core.{dtype}"}


def test_pytorch_bin_checkpoint_converts_like_safetensors(tiny_hf, tiny_mlx, tmp_path):
    from safetensors.torch import load_file

    src = tmp_path / "bin"
    src.mkdir()
    for f in tiny_hf[0].iterdir():
        if f.suffix != ".safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(tiny_hf[0] / "model.safetensors"), src / "pytorch_model.bin")
    from_bin = mx.load(str(convert(src, tmp_path / "out") / "model.safetensors"))
    reference = mx.load(str(tiny_mlx / "model.safetensors"))
    assert from_bin.keys() == reference.keys()
    assert all(mx.array_equal(from_bin[k], reference[k]) for k in reference)
