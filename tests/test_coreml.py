"""Core ML export of the vision encoder: the package's spec, the baked-in pruner, clean failures.

Core ML models run only on Apple platforms; elsewhere the graph that Core ML converts (the
torch.export program) is checked against the MLX pipeline instead, and prediction is skipped.
"""

import sys

import mlx.core as mx
import numpy as np
import pytest

from fastvlm_mlx.load import load_model
from pruners import prune
from tests.test_cli import assert_clean_error, run_cli

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")


def spec_shapes(path) -> tuple[dict, dict, dict]:
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    shapes = {f.name: list(f.type.multiArrayType.shape) for f in spec.description.input}
    outputs = {f.name: list(f.type.multiArrayType.shape) for f in spec.description.output}
    return shapes, outputs, dict(spec.description.metadata.userDefined)


@pytest.fixture(scope="module")
def exported(tiny_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("coreml")
    runs = {
        "full": [],
        "attention": ["--pruner", "attention", "--keep-ratio", "0.25"],
        "small": ["--image-size", "512"],
    }
    paths = {}
    for name, options in runs.items():
        paths[name] = root / f"{name}.mlpackage"
        result = run_cli("export-coreml", str(tiny_hf[0]), str(paths[name]), *options)
        assert result.returncode == 0, result.stderr
    return paths


def test_spec_has_images_in_and_features_out(exported):
    inputs, outputs, meta = spec_shapes(exported["full"])
    assert inputs == {"images": [1, 3, 1024, 1024]} and outputs == {"image_features": [1, 256, 256]}
    assert meta["pruner"] == "none"
    inputs, outputs, _ = spec_shapes(exported["small"])
    assert inputs == {"images": [1, 3, 512, 512]} and outputs == {"image_features": [1, 64, 256]}


def test_pruner_is_baked_into_the_graph(exported):
    inputs, outputs, meta = spec_shapes(exported["attention"])
    assert outputs == {"image_features": [1, 64, 256]}
    assert meta["pruner"] == "attention" and meta["keep_ratio"] == "0.25"
    program = ct.models.MLModel(str(exported["attention"]), skip_model_load=True).get_spec().mlProgram
    ops = {
        op.type
        for fn in program.functions.values()
        for block in fn.block_specializations.values()
        for op in block.operations
    }
    assert "topk" in ops and "softmax" in ops


@pytest.mark.parametrize("name", ["norm", "attention", "random"])
def test_exported_graph_keeps_the_tokens_mlx_keeps(name, tiny_hf, tiny_mlx):
    from convert.coreml import export_encoder

    program, size, keep = export_encoder(tiny_hf[0], name, 0.25, None, seed=3)
    pixels = np.random.default_rng(0).random((1, size, size, 3), dtype=np.float32)
    with torch.no_grad():
        exported = program.module()(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
    model, _ = load_model(tiny_mlx)
    tokens, scores = model.encode_image(mx.array(pixels), with_scores=True)
    mine = np.array(prune(name, tokens, 0.25, scores=scores, seed=3).tokens)
    assert exported.shape == mine.shape == (1, keep, 256)
    assert np.abs(exported - mine).max() / np.abs(mine).max() < 1e-4


def test_prediction_on_apple_platforms(exported):
    if sys.platform != "darwin":
        pytest.skip("Core ML runs models only on macOS/iOS; the spec and graph are checked above")
    model = ct.models.MLModel(str(exported["attention"]))
    out = model.predict({"images": np.random.rand(1, 3, 1024, 1024).astype(np.float32)})["image_features"]
    assert out.shape == (1, 64, 256) and np.isfinite(out).all()


def test_export_errors_are_clean_and_keep_existing_files(tiny_hf, exported, tmp_path):
    src = str(tiny_hf[0])
    out = tmp_path / "enc.mlpackage"
    assert_clean_error(run_cli("export-coreml", src, str(out), "--pruner", "divprune", "--keep-ratio", "0.5"), "score")
    assert_clean_error(run_cli("export-coreml", src, str(out), "--pruner", "tome"), "unknown pruner")
    assert_clean_error(run_cli("export-coreml", src, str(tmp_path / "enc.bin")), ".mlpackage")
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing partial left behind
    before = sorted(p.name for p in exported["full"].rglob("*"))
    assert_clean_error(run_cli("export-coreml", src, str(exported["full"])), "already exists", "--force")
    assert sorted(p.name for p in exported["full"].rglob("*")) == before
