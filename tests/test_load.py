"""A damaged model directory is a UserError naming the file and the fix, never a traceback from deep inside."""

import errno
import json
import re
import shutil
import struct
from dataclasses import fields

import pytest

from fastvlm_mlx.config import FastVLMConfig, VisionConfig
from fastvlm_mlx.errors import UserError, explain, naming
from fastvlm_mlx.info import model_info
from fastvlm_mlx.load import embedded_model, load_model, read_config, read_tokenizer, safetensors_header


@pytest.fixture
def model_dir(tmp_path):
    """A copy of the embedded easy-VQA model to damage."""
    return shutil.copytree(embedded_model(), tmp_path / "model")


def edit_config(model_dir, change) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def wrong_value(annotation):
    """A JSON value that no field of this annotation accepts."""
    return 12345 if annotation in (str, str | None) else "wrong"


@pytest.mark.parametrize(
    "section, spec",
    [(None, spec) for spec in fields(FastVLMConfig)] + [("vision", spec) for spec in fields(VisionConfig)],
    ids=lambda x: getattr(x, "name", x),
)
def test_every_wrongly_typed_config_field_is_named(model_dir, section, spec):
    def change(config):
        (config[section] if section else config)[spec.name] = wrong_value(spec.type)

    edit_config(model_dir, change)
    name = f"{section}.{spec.name}" if section else spec.name
    with pytest.raises(UserError, match=rf"config\.json: field {name} is"):
        read_config(model_dir)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda c: c["text"].pop("hidden_size"), "field text.hidden_size is missing"),
        (lambda c: c["text"].update(hidden_size=64.5), "field text.hidden_size is 64.5"),
        (lambda c: c["text"].update(num_hidden_layers=True), "field text.num_hidden_layers is true"),
        (lambda c: c.update(eos_token_ids=[2, "x"]), "field eos_token_ids"),
        (lambda c: c["vision"].update(layers=[1, 1]), "stage lists differ"),
        (lambda c: c.update(preprocess_mode="stretch"), "preprocess_mode has 'stretch'"),
        (lambda c: c.update(image_size=100000), "field image_size"),
        (lambda c: c.update(image_size=100), "field image_size"),
        (lambda c: c.update(quantization={"bits": 4}), "field quantization"),
        (lambda c: c.update(keep_ratio=0.0), "field keep_ratio"),
    ],
)
def test_config_values_the_model_cannot_run(model_dir, change, words):
    edit_config(model_dir, change)
    with pytest.raises(UserError, match=words):
        read_config(model_dir)


def size_fields():
    """(section, field, index) for every int or float size of the vision tower and the LLM."""
    from mlx_lm.models import qwen2

    from fastvlm_mlx.load import _size_fields

    config = json.loads((embedded_model() / "config.json").read_text())
    cases = [("vision", name, i) for name in _size_fields(VisionConfig) for i in (0, -1)]
    cases = [c for c in cases if isinstance(config["vision"][c[1]], list) or c[2] == 0]
    cases += [("text", name, None) for name in _size_fields(qwen2.ModelArgs) if name in config["text"]]
    return cases + [(None, "max_context", None)]


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf")])
@pytest.mark.parametrize("section, name, index", size_fields(), ids=lambda x: str(x))
def test_every_size_that_is_not_positive_is_named(model_dir, section, name, index, value):
    """Zero, negative or non-finite sizes (JSON as Python writes it allows NaN and Infinity) are
    one-line errors before the model is built, never a ZeroDivisionError or a silent build."""

    shown = re.escape((f"{section}." if section else "") + name)

    def change(config):
        nonlocal shown
        values = config[section] if section else config
        if isinstance(values.get(name), list):
            values[name][index] = value
            shown += rf"(\[{index % len(values[name])}\])?"  # without the index: inf in a list[int]
        else:
            values[name] = value

    edit_config(model_dir, change)
    with pytest.raises(UserError, match=rf"config\.json: field {shown} is "):
        load_model(model_dir)


@pytest.mark.parametrize(
    "change, words",
    [
        (
            lambda c: c["vision"].update(head_dim=48),
            r"vision\.embed_dims\[3\] 128 is not a multiple of vision\.head_dim 48",
        ),
        (
            lambda c: c["vision"].update(mlp_ratios=[4.0, 4.0, 0.001, 4.0, 4.0]),
            r"vision\.mlp_ratios\[2\] .* no hidden units",
        ),
        (
            lambda c: c["vision"].update(cls_ratio=1.5),
            r"vision\.cls_ratio 1\.5 makes 192 features, not a multiple of 128",
        ),
        (lambda c: c["vision"].update(se_ratio=0.001), r"vision\.se_ratio"),
        (
            lambda c: c["text"].update(num_key_value_heads=3),
            r"num_attention_heads \d+ is not a multiple of text\.num_key_value_heads 3",
        ),
        (
            lambda c: c["text"].update(hidden_size=c["text"]["hidden_size"] + 1),
            r"text\.hidden_size \d+ is not a multiple",
        ),
    ],
)
def test_sizes_that_do_not_divide(model_dir, change, words):
    edit_config(model_dir, change)
    with pytest.raises(UserError, match=words):
        load_model(model_dir)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"a string"', "", "\xff"])
def test_config_that_is_not_a_json_object(model_dir, text):
    (model_dir / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(UserError, match="config.json"):
        read_config(model_dir)


def cut(path, keep) -> None:
    data = path.read_bytes()
    path.write_bytes(keep(data))


@pytest.mark.parametrize(
    "keep",
    [
        lambda d: d[: len(d) // 2],
        lambda d: d[:-1],
        lambda d: d + b"\0",
        lambda d: d[:7],
        lambda d: b"",
        lambda d: d[:100],
        lambda d: struct.pack("<Q", 2**62) + d[8:],
        lambda d: b"garbage " * 100,
        lambda d: struct.pack("<Q", 2) + b"[]",
    ],
    ids=["half", "last-byte", "extra-byte", "7-bytes", "empty", "in-header", "huge-header", "garbage", "list"],
)
def test_damaged_weights_are_caught_by_info_and_load(model_dir, keep):
    weights = model_dir / "model.safetensors"
    cut(weights, keep)
    for reader in (safetensors_header, lambda _: model_info(model_dir), lambda _: load_model(model_dir)):
        with pytest.raises(UserError, match="model.safetensors.*re-run `fastvlm-mlx convert`"):
            reader(weights)


def test_whole_weights_pass(model_dir):
    header = safetensors_header(model_dir / "model.safetensors")
    assert "projector.linear_1.weight" in header
    assert model_info(model_dir)["parameters"] > 0


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / "tokenizer.json").unlink(),
        lambda d: (d / "tokenizer.json").write_text('{"version": '),
        lambda d: (d / "tokenizer.json").write_text("[]"),
        lambda d: (d / "tokenizer.json").write_text('{"x": 1}'),
        lambda d: (d / "tokenizer_config.json").write_text("{oops"),
    ],
    ids=["missing", "cut-short", "a-list", "wrong-object", "bad-tokenizer-config"],
)
def test_broken_tokenizer_files_are_named(model_dir, damage):
    damage(model_dir)
    with pytest.raises(UserError, match=r"tokenizer|re-run"):
        read_tokenizer(model_dir)


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.ENOSPC, "free some space"),
        (errno.EROFS, "writable disk"),
        (errno.EACCES, "permissions"),
        (errno.ENOTDIR, "is a file, not a folder"),
        (errno.EISDIR, "give a file path"),
    ],
)
def test_os_errors_name_the_file_and_the_fix(code, words):
    message = explain(OSError(code, "strerror text", "/some/file"))
    assert message.startswith("/some/file: strerror text;") and words in message


def test_errors_that_are_bugs_are_not_explained(tmp_path):
    for error in (RuntimeError("x"), KeyError("x"), TypeError("x"), ValueError("x"), OSError("no errno")):
        assert explain(error) is None
    with pytest.raises(KeyError), naming(tmp_path):
        raise KeyError("a bug of ours stays itself")
    with pytest.raises(UserError, match="notes.json: not valid JSON"), naming(tmp_path / "notes.json"):
        json.loads("{")
