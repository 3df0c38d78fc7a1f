"""Bad input gets a one-line error, a non-zero exit code, no traceback, and nothing overwritten."""

import subprocess
import sys

import pytest

pytest.importorskip("torch")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastvlm_mlx.cli", *args], capture_output=True, text=True)


def assert_clean_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("Error")]
    assert len(error_lines) == 1, result.stderr
    for word in words:
        assert word in error_lines[0], result.stderr


def generate(model, image) -> subprocess.CompletedProcess:
    return run_cli("generate", "--model", str(model), "--image", str(image), "--prompt", "hi", "--max-tokens", "2")


def test_missing_image(tiny_mlx, tmp_path):
    assert_clean_error(generate(tiny_mlx, tmp_path / "nope.png"), "image not found", "nope.png")


def test_non_image_file(tiny_mlx, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert_clean_error(generate(tiny_mlx, text), "cannot read", "notes.png")


def test_truncated_image(tiny_mlx, image_path, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(image_path.read_bytes()[:200])
    assert_clean_error(generate(tiny_mlx, broken), "broken.png")


def test_model_dir_without_weights(tiny_mlx, image_path, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes((tiny_mlx / "config.json").read_bytes())
    assert_clean_error(generate(model, image_path), "model.safetensors")


def test_unconverted_model_dir(tiny_hf, image_path):
    assert_clean_error(generate(tiny_hf[0], image_path), "fastvlm-mlx convert")


def test_model_with_mismatched_shapes(tiny_mlx, image_path, tmp_path):
    import mlx.core as mx

    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_mlx.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    weights = mx.load(str(model / "model.safetensors"))
    weights["projector.linear_1.bias"] = mx.zeros((3,))
    mx.save_safetensors(str(model / "model.safetensors"), weights)
    assert_clean_error(generate(model, image_path), "mis-shaped", "projector.linear_1.bias")


def test_unknown_dtype(tiny_hf, tmp_path):
    assert_clean_error(run_cli("convert", str(tiny_hf[0]), str(tmp_path / "out"), "--dtype", "int3"), "int3")
    assert not (tmp_path / "out").exists()


def test_existing_output_not_overwritten(tiny_hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert_clean_error(run_cli("convert", str(tiny_hf[0]), str(out)), "already exists", "--force")
    assert (out / "mine.txt").read_text() == "keep"


def test_missing_checkpoint(tmp_path):
    assert_clean_error(run_cli("convert", str(tmp_path / "none"), str(tmp_path / "out")), "not found")


def test_generate_streams_text(tiny_mlx, image_path):
    result = run_cli(
        "generate", "--model", str(tiny_mlx), "--image", str(image_path), "--prompt", "hi", "--max-tokens", "4"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_help_does_not_import_torch_or_mlx():
    code = (
        "import sys; from fastvlm_mlx.cli import main; main(['--help'], standalone_mode=False); "
        "print('torch' in sys.modules, 'mlx.core' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.strip().endswith("False False")


def test_version_names_the_blas():
    result = run_cli("--version")
    assert result.returncode == 0
    assert "BLAS:" in result.stdout
    if sys.platform.startswith("linux") and __import__("platform").machine() == "x86_64":
        assert "mkl" in result.stdout or "openblas" in result.stdout


def test_importing_mlx_first_warns():
    code = (
        "import warnings; warnings.simplefilter('always'); import mlx.core; import fastvlm_mlx; print(fastvlm_mlx.BLAS)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "imported before fastvlm_mlx" in result.stderr
    assert "too early" in result.stdout
