"""convert --quantize and --pruner: smaller LLM weights with bounded drift, float vision, default pruning, info."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from fastvlm_mlx.cli import main
from fastvlm_mlx.load import load_model
from fastvlm_mlx.preprocess import load_image, preprocess
from fastvlm_mlx.prompt import tokenize_prompt
from tests.test_cli import assert_clean_error, run_cli

pytest.importorskip("torch")


def convert(src, out, *options):
    result = CliRunner().invoke(main, ["convert", str(src), str(out), *options])
    assert result.exit_code == 0, result.output
    return out


def last_logits(model_dir, image_path) -> np.ndarray:
    model, tokenizer = load_model(model_dir)
    pixels = mx.array(preprocess(load_image(image_path), model.config.image_size, model.config.preprocess_mode))
    before, after = tokenize_prompt(tokenizer, "what color is the shape?")
    return np.array(model.logits(model.splice(before, model.project(model.encode_image(pixels)[0]), after))[0, -1])


@pytest.fixture(scope="module")
def quantized(tiny_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return {
        bits: convert(tiny_hf[0], root / f"q{bits}", "--quantize", str(bits), "--group-size", "32") for bits in (4, 8)
    }


def test_quantized_llm_is_smaller_with_bounded_drift(quantized, tiny_mlx, image_path):
    reference = last_logits(tiny_mlx, image_path)
    scale = np.abs(reference).max()
    drift = {bits: np.abs(last_logits(d, image_path) - reference).max() / scale for bits, d in quantized.items()}
    assert 0 < drift[8] < drift[4]  # really quantized, and 8 bits is closer than 4
    assert drift[8] < 0.02 and drift[4] < 0.3
    float_llm = json.loads(run_cli("info", str(tiny_mlx), "--json").stdout)["components"]["language_model"]
    for bits, directory in quantized.items():
        llm = json.loads(run_cli("info", str(directory), "--json").stdout)["components"]["language_model"]
        assert llm["parameters"] == float_llm["parameters"]  # the same model, packed
        assert llm["bytes"] < float_llm["bytes"] * (0.2 if bits == 4 else 0.35)


def test_vision_tower_and_projector_stay_float(quantized, tiny_mlx):
    full = mx.load(str(tiny_mlx / "model.safetensors"))
    packed = mx.load(str(quantized[4] / "model.safetensors"))
    for key, value in full.items():
        if key.startswith(("vision_tower.", "projector.")):
            assert mx.array_equal(packed[key], value), key
    assert any(k.startswith("language_model.") and k.endswith(".scales") for k in packed)


def test_projector_quantized_on_request(tiny_hf, tmp_path):
    out = convert(tiny_hf[0], tmp_path / "qp", "--quantize", "8", "--group-size", "32", "--quantize-projector")
    weights = mx.load(str(out / "model.safetensors"))
    assert "projector.linear_1.scales" in weights
    assert not any(k.startswith("vision_tower.") and k.endswith(".scales") for k in weights)


def test_quantized_model_generates_through_cli(quantized, image_path):
    args = ["generate", "--model", str(quantized[4]), "--image", str(image_path), "--prompt", "hi", "--json"]
    result = CliRunner().invoke(main, [*args, "--max-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["token_ids"]) > 0


def test_pruning_recorded_at_convert_applies_by_default(tiny_hf, image_path, tmp_path):
    out = convert(tiny_hf[0], tmp_path / "pruned", "--pruner", "divprune", "--keep-ratio", "0.25")
    info = json.loads(run_cli("info", str(out), "--json").stdout)
    assert info["pruning"] == {"pruner": "divprune", "keep_ratio": 0.25}
    assert info["visual_tokens"] == {"grid": [16, 16], "before": 256, "after": 64}
    assert "divprune at keep ratio 0.25" in run_cli("info", str(out)).stdout
    args = [
        "generate",
        "--model",
        str(out),
        "--image",
        str(image_path),
        "--prompt",
        "hi",
        "--max-tokens",
        "2",
        "--json",
    ]
    for extra, after in (
        ([], 64),
        (["--pruner", "none"], 256),
        (["--keep-ratio", "0.5"], 128),
        (["--pruner", "norm"], 64),
    ):
        result = CliRunner().invoke(main, [*args, *extra])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["visual_tokens"]["after"] == after, extra


def test_convert_bad_options_are_clean_errors(tiny_hf, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(run_cli("convert", str(tiny_hf[0]), str(out), "--quantize", "3"), "--quantize")
    assert_clean_error(run_cli("convert", str(tiny_hf[0]), str(out), "--pruner", "tome"), "unknown pruner")
    assert_clean_error(run_cli("convert", str(tiny_hf[0]), str(out), "--pruner", "norm", "--keep-ratio", "0"), "(0, 1]")
    assert_clean_error(run_cli("convert", str(tiny_hf[0]), str(out), "--quantize", "4", "--group-size", "128"), "group")
    assert not out.exists()  # nothing half-written
    assert_clean_error(run_cli("info", str(tmp_path)), "config.json")
