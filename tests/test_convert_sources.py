"""Converter sources: which files are read, corrupt files, tokenizers, image size, Apple's options."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest

from convert.convert import check_original_options, convert, describe_source, image_size, original_preprocess_mode
from convert.source import check_vocabulary
from fastvlm_mlx.config import MAX_IMAGE_SIZE, VisionConfig, check_image_size
from fastvlm_mlx.errors import UserError

APPLE = {
    "model_type": "llava_qwen2",
    "mm_vision_tower": "mobileclip_l_1024",
    "mm_projector_type": "mlp2x_gelu",
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "image_aspect_ratio": "pad",
    "tokenizer_model_max_length": 8192,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
}


def copy_checkpoint(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def edit_config(src: Path, **changes) -> None:
    path = src / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def same_weights(a: Path, b: Path) -> bool:
    x, y = mx.load(str(a / "model.safetensors")), mx.load(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(mx.array_equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_only_the_named_weight_files_are_read(torch, tiny_hf, tiny_mlx, tmp_path, layout):
    """Hugging Face Trainer output: training_args.bin (a pickled object, not weights) and strays beside."""
    from safetensors.torch import load_file

    src = copy_checkpoint(tiny_hf[0], tmp_path / "src")
    if layout == "bin":
        torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
        (src / "model.safetensors").unlink()
    (src / "training_args.bin").write_bytes(b"\x80\x04\x95 not weights: a pickled TrainingArguments")
    (src / "adapter_model.safetensors").write_bytes(b"garbage")
    (src / "optimizer.bin").write_bytes(b"garbage")
    assert same_weights(convert(src, tmp_path / "out"), tiny_mlx)


def split_into_shards(torch, src: Path, index: bool) -> list[str]:
    from safetensors.torch import load_file, save_file

    weights = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    keys = sorted(weights)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    parts = {names[0]: keys[: len(keys) // 2], names[1]: keys[len(keys) // 2 :]}
    for name, part in parts.items():
        save_file({k: weights[k] for k in part}, src / name, metadata={"format": "pt"})
    if index:
        weight_map = {k: name for name, part in parts.items() for k in part}
        (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return names


@pytest.mark.parametrize("index", [True, False])
def test_sharded_checkpoint_converts_and_a_missing_shard_is_named(torch, tiny_hf, tiny_mlx, tmp_path, index):
    src = copy_checkpoint(tiny_hf[0], tmp_path / "src")
    names = split_into_shards(torch, src, index)
    assert same_weights(convert(src, tmp_path / "out"), tiny_mlx)
    (src / names[1]).unlink()
    with pytest.raises(UserError, match=names[1] if index else "missing 2 of 2"):
        convert(src, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_index_naming_a_path_outside_the_folder_is_refused(torch, tiny_hf, tmp_path):
    src = copy_checkpoint(tiny_hf[0], tmp_path / "src", skip=("model.safetensors",))
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../model.safetensors"}}))
    with pytest.raises(UserError, match="not a file beside it"):
        convert(src, tmp_path / "out")


@pytest.mark.parametrize(
    "name, content",
    [
        ("model.safetensors", "half"),
        ("model.safetensors", b"\x00garbage, not safetensors" * 10),
        ("model.safetensors", b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n"),
        ("model.safetensors", b""),
        ("pytorch_model.bin", b"\x80\x04garbage pickle"),
        ("pytorch_model.bin", b""),
        ("pytorch_model.bin", "a list"),
    ],
)
def test_corrupt_weight_files_are_one_line_errors_naming_the_file(torch, tiny_hf, tmp_path, name, content):
    src = copy_checkpoint(tiny_hf[0], tmp_path / "src", skip=("model.safetensors",))
    if content == "half":
        data = (tiny_hf[0] / "model.safetensors").read_bytes()
        (src / name).write_bytes(data[: len(data) // 2])
    elif content == "a list":
        torch.save([torch.zeros(2)], src / name)
    else:
        (src / name).write_bytes(content)
    with pytest.raises(UserError) as error:
        convert(src, tmp_path / "out")
    assert str(src / name) in str(error.value) and "\n" not in str(error.value)


def test_no_weights_at_all_names_the_expected_files(tiny_hf, tmp_path):
    src = copy_checkpoint(tiny_hf[0], tmp_path / "src", skip=("model.safetensors",))
    (src / "training_args.bin").write_bytes(b"not weights")
    with pytest.raises(UserError, match="has no weights: expected model.safetensors"):
        convert(src, tmp_path / "out")


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"model_type": "fast_vlm", "text_config": 5}'])
def test_malformed_config_is_a_user_error(tiny_hf, tmp_path, content):
    src = copy_checkpoint(tiny_hf[0], tmp_path / "src")
    (src / "config.json").write_bytes(content)
    with pytest.raises(UserError, match="config.json"):
        convert(src, tmp_path / "out")


def test_wrongly_typed_llm_field_is_a_user_error(tiny_hf, tmp_path):
    src = copy_checkpoint(tiny_hf[0], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["hidden_size"] = "sixty-four"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match='hidden_size is "sixty-four", not a positive number'):
        convert(src, tmp_path / "out")


@pytest.mark.parametrize(
    "section, change, words",
    [
        ("vision", dict(head_dim=0), "field vision.head_dim is 0"),
        ("vision", dict(embed_dims=[8, 16, 32, 64, 0]), r"field vision.embed_dims\[4\] is 0"),
        ("vision", dict(layers=[1, -1, 1, 1, 1]), r"field vision.layers\[1\] is -1"),
        ("vision", dict(mlp_ratios=[0.0] * 5), r"field vision.mlp_ratios\[0\] is 0"),
        ("vision", dict(head_dim=48), r"embed_dims\[3\] 64 is not a multiple of vision.head_dim 48"),
        ("vision", dict(head_dim="32"), "field vision_config.model_args.head_dim is"),
        ("text", dict(num_key_value_heads=3), "num_attention_heads 4 is not a multiple of text.num_key_value_heads 3"),
        ("text", dict(hidden_size=66), "hidden_size 66 is not a multiple of text.num_attention_heads 4"),
    ],
)
def test_sizes_the_model_cannot_be_built_with(tiny_hf, tmp_path, section, change, words):
    """Zero, negative and non-dividing sizes are one-line errors naming the field, not a
    ZeroDivisionError while building the model or a model built wrong."""
    src = copy_checkpoint(tiny_hf[0], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    part = config["vision_config"]["model_args"] if section == "vision" else config["text_config"]
    part.update(change)
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=words):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def special_tokens_only(src: Path) -> None:
    """A tokenizer.json that loads but holds only the three chat tokens (an incomplete copy)."""
    from tokenizers import Tokenizer, models

    tokenizer = Tokenizer(models.BPE())
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer.save(str(src / "tokenizer.json"))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("config_and_special_tokens_map_only", "no tokenizer vocabulary"),
        ("vocab_without_merges", "vocab.json but no merges.txt"),
        ("garbage_tokenizer_json", "cannot load the tokenizer"),
        ("three_tokens", "beyond its tokenizer.s 3 tokens"),
    ],
)
def test_incomplete_tokenizers_are_refused(tiny_hf, tmp_path, damage, message):
    src = copy_checkpoint(tiny_hf[0], tmp_path / "src", skip=("tokenizer.json",))
    if damage == "config_and_special_tokens_map_only":
        (src / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    elif damage == "vocab_without_merges":
        (src / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    elif damage == "garbage_tokenizer_json":
        (src / "tokenizer.json").write_text("{garbage")
    else:
        special_tokens_only(src)
    with pytest.raises(UserError, match=message):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vocabulary_plausibility_bounds():
    check_vocabulary(Path("src"), 300, 384, (299, -200), truncates=True)
    check_vocabulary(Path("src"), 151646, 151936, (151645,), truncates=True)
    check_vocabulary(Path("src"), 317, 151936, (316,), truncates=False)  # a small tokenizer, embedding kept
    for tokens, rows, ids, truncates, message in (
        (192, 384, (), True, "192 tokens but the embedding has 384 rows"),
        (385, 384, (), False, "385 tokens"),
        (300, 384, (300,), False, "token id 300, beyond"),
    ):
        with pytest.raises(UserError, match=message):
            check_vocabulary(Path("src"), tokens, rows, ids, truncates)


def transformers_source(tmp_path: Path, seq: int | None = None, crop: int | None = None) -> tuple[Path, dict]:
    src = tmp_path / f"src-{seq}-{crop}"
    src.mkdir()
    raw = {"model_type": "fast_vlm"} | ({"image_seq_length": seq} if seq is not None else {})
    if crop is not None:
        processor = {"crop_size": {"height": crop, "width": crop}, "size": {"shortest_edge": crop}}
        (src / "preprocessor_config.json").write_text(json.dumps(processor))
    return src, raw


@pytest.mark.parametrize(
    "seq, crop, size",
    [
        (25, None, 320),  # a 5x5 grid at FastViTHD's stride 64
        (256, 1024, 1024),
        (256, None, 1024),
        (None, 512, 512),
        (None, None, 1024),
        (576, 128, 128),  # transformers' default image_seq_length says nothing (the easy-VQA model)
        (25, "contradiction", None),
        (24, None, "not a square grid"),
        (40000, None, "not usable"),  # 200x200 grid = 12800 pixels
        (None, 100000, "not usable"),
    ],
)
def test_transformers_image_size_comes_from_the_checkpoint(tmp_path, seq, crop, size):
    src, raw = transformers_source(tmp_path, seq, 1024 if crop == "contradiction" else crop)
    if isinstance(size, int):
        assert image_size(src, raw, VisionConfig()) == size
    else:
        with pytest.raises(UserError, match=size or "crops 1024 .* says image_seq_length 25"):
            image_size(src, raw, VisionConfig())


def test_image_seq_length_reaches_the_converted_config(tiny_hf, tmp_path):
    src = copy_checkpoint(tiny_hf[0], tmp_path / "src")
    edit_config(src, image_seq_length=25)
    config = json.loads((convert(src, tmp_path / "out") / "config.json").read_text())
    assert config["image_size"] == 320 and config["preprocess_mode"] == "crop"


@pytest.mark.parametrize(
    "tower, crop, expected",
    [
        ("mobileclip_l_1024", None, 1024),
        ("mobileclip_l_512", 512, 512),
        ("mobileclip_l_1024", 512, "crops 512 but mm_vision_tower says 1024"),
        ("mobileclip_l_100000", None, "not usable"),
        ("mobileclip_l_1000", None, "not usable"),
        ("vit_l_336", None, "unsupported mm_vision_tower"),
    ],
)
def test_original_image_size_comes_from_the_tower_name(tmp_path, tower, crop, expected):
    src, _ = transformers_source(tmp_path, None, crop)
    raw = {**APPLE, "mm_vision_tower": tower}
    if isinstance(expected, int):
        assert describe_source(src, raw)[4]["image_size"] == expected
    else:
        with pytest.raises(UserError, match=expected):
            describe_source(src, raw)


@pytest.mark.parametrize(
    "ratio, mode", [("pad", "pad"), (None, "crop"), ("square", "crop"), ("anyres", None), ("anyres_max_9", None)]
)
def test_apple_aspect_ratio_follows_apples_process_images(ratio, mode):
    raw = {k: v for k, v in APPLE.items() if k != "image_aspect_ratio"} | (
        {} if ratio is None else {"image_aspect_ratio": ratio}
    )
    if mode is None:
        with pytest.raises(UserError, match="not supported"):
            check_original_options(raw)
    else:
        check_original_options(raw)
        assert original_preprocess_mode(raw) == mode


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end .* not supported"),
        ({"mm_use_im_patch_token": True}, "mm_use_im_patch_token .* not supported"),
        ({"mm_use_im_patch_token": None}, "no mm_use_im_patch_token, which Apple's loader reads as true"),
        ({"mm_projector_type": "linear"}, "'linear' is not supported"),
        ({"mm_projector_type": None}, "absent"),
        ({"tokenizer_model_max_length": "8k"}, "tokenizer_model_max_length is '8k'"),
    ],
)
def test_apple_options_that_would_differ_are_refused(tmp_path, changes, message):
    raw = {k: v for k, v in {**APPLE, **changes}.items() if v is not None}
    with pytest.raises(UserError, match=message):
        describe_source(tmp_path, raw)


def test_apple_context_limit_is_recorded(tmp_path):
    assert describe_source(tmp_path, APPLE)[4]["max_context"] == 8192
    no_limit = {k: v for k, v in APPLE.items() if k != "tokenizer_model_max_length"}
    assert describe_source(tmp_path, no_limit)[4]["max_context"] is None


def test_image_size_bound():
    assert check_image_size(64) == 64 and check_image_size(MAX_IMAGE_SIZE) == MAX_IMAGE_SIZE
    for size in (0, -64, 1000, 4096, 100000, 1024.0, "1024", True):
        with pytest.raises(UserError, match="multiple of the vision tower's stride 64"):
            check_image_size(size)
