"""The boundary between the model code and the CPU backend: model files are MLX's own ops; off
the CPU none of our kernels runs; import and --help do nothing; one variable turns the backend
off; without a compiler everything still works; half precision matches float32."""

import ast
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import isolated_environment

from fastvlm_mlx import model as model_module
from fastvlm_mlx import vision
from fastvlm_mlx.cpu import conv, modules, native
from fastvlm_mlx.load import embedded_model, load_model

LINUX = sys.platform.startswith("linux")


def clean_env(home: Path, **extra) -> dict:
    return isolated_environment(home, TMPDIR=str(home / "tmp"), **extra)


def python(code: str, env: dict) -> list[str]:
    (Path(env["HOME"]) / "tmp").mkdir(parents=True, exist_ok=True)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_model_code_imports_only_mlx():
    for module in (vision, model_module):
        tree = ast.parse(Path(module.__file__).read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert names <= {"mlx.core", "mlx.nn", "mlx_lm.models", "fastvlm_mlx.config", "fastvlm_mlx.vision"}, names


def forward(model, pixels, ids):
    tokens, scores = model.encode_image(pixels, with_scores=True)
    plain, _ = model.encode_image(pixels)
    embeds = model.splice(ids, model.project(tokens), ids)
    return [tokens, scores, plain, model.logits(embeds)]


def test_off_the_cpu_no_cpu_kernel_runs(tiny_mlx, monkeypatch):
    """Drive the dispatch as a GPU would see it: every CPU module hands back to the model's own
    code (bit-identical to the unswapped model), and none of the CPU room's functions is called.
    On the CPU the same spies do see calls, so they watch the right places."""
    model, _ = load_model(tiny_mlx)
    swapped = {type(m) for _, m in model.named_modules()} & set(modules.SWAPS.values())
    assert swapped == set(modules.SWAPS.values())  # every kind of module the model has, switched
    pixels = mx.random.uniform(shape=(1, model.config.image_size, model.config.image_size, 3), key=mx.random.key(0))
    ids = [1, 2, 3]
    modules.unswap_modules(model)
    plain = forward(model, pixels, ids)
    mx.eval(plain)
    modules.swap_modules(model)

    calls = []
    for owner, name in [(modules, n) for n in ("grouped_conv", "attention", "gelu", "silu_mul", "exact_gelu")] + [
        (modules, "_bias_gelu"),
        (modules, "_add_bias"),
        (native, "depthwise"),
        (conv, "_taps"),
    ]:
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    on_cpu = forward(model, pixels, ids)
    mx.eval(on_cpu)
    assert {"grouped_conv", "attention", "gelu", "silu_mul"} <= set(calls)
    for ours, theirs in zip(on_cpu, plain, strict=True):
        assert mx.abs(ours - theirs).max().item() <= 1e-4 * max(1.0, mx.abs(theirs).max().item())

    calls.clear()
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)  # what the CPU modules ask
    elsewhere = forward(model, pixels, ids)
    mx.eval(elsewhere)
    assert calls == []
    for ours, theirs in zip(elsewhere, plain, strict=True):
        assert mx.array_equal(ours, theirs).item()


def test_import_and_help_build_load_and_write_nothing(tmp_path):
    env = clean_env(tmp_path)
    code = "import os, sys, fastvlm_mlx; print('mlx.core' in sys.modules); print(os.environ['PATH'])"
    loaded, path = python(code, env)
    assert loaded == "False" and path == env["PATH"]
    for args in (["--help"], ["generate", "--help"], ["chat", "--help"], ["convert", "--help"], ["bench", "--help"]):
        out = subprocess.run([sys.executable, "-m", "fastvlm_mlx.cli", *args], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    assert [p.name for p in tmp_path.rglob("*")] == ["tmp"]  # no cache, no kernels, no wrapper


PROBE = """
import os, sys, fastvlm_mlx
from fastvlm_mlx.cpu import modules, private
from fastvlm_mlx.load import load_model
path = os.environ["PATH"]
model, _ = load_model()
swapped = sum(type(m) in set(modules.SWAPS.values()) for _, m in model.named_modules())
added = [p for p in os.environ["PATH"].split(os.pathsep) if p not in path.split(os.pathsep)]
print(swapped, fastvlm_mlx.BLAS.split()[0], len(added), all(p.startswith(private.machine_folder()) for p in added))
"""


@pytest.mark.skipif(not LINUX, reason="the BLAS preload and the g++ wrapper are Linux-only")
def test_one_variable_turns_the_backend_off(tmp_path):
    on = python(PROBE, clean_env(tmp_path / "on"))[0].split()
    assert int(on[0]) > 0 and on[1] in ("openblas", "mkl") and on[3] == "True"
    off = python(PROBE, clean_env(tmp_path / "off", FASTVLM_MLX_CPU_BACKEND="0"))[0].split()
    assert off == ["0", "platform", "0", "True"]
    assert not list((tmp_path / "off").rglob("bin-*")) and not list((tmp_path / "off").rglob("*.so"))


def answer(env: dict, image: Path) -> str:
    args = ["generate", "--image", str(image), "--prompt", "what color is the shape?", "--max-tokens", "3"]
    out = subprocess.run([sys.executable, "-m", "fastvlm_mlx.cli", *args], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def shape_image(tmp_path_factory) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (128, 128), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((30, 30, 100, 100), fill=(200, 30, 30))
    path = tmp_path_factory.mktemp("shape") / "circle.png"
    image.save(path)
    return path


def test_without_a_compiler_everything_runs_on_mlx_ops(tmp_path, shape_image):
    """A PATH with python and nothing else: no cc, no g++ (MLX's own compile then runs its ops
    one by one). Same answer as with the backend; nothing built."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = clean_env(tmp_path / "home")
    (tmp_path / "home" / "tmp").mkdir(parents=True)
    bare = env | {"PATH": str(bin_dir)}
    assert answer(bare, shape_image) == answer(env | {"HOME": str(tmp_path / "home2")}, shape_image)
    assert not list((tmp_path / "home").rglob("*.so")) and not list((tmp_path / "home").rglob("bin-*"))


# Half precision against float32 on the tiny parity config, relative to the largest magnitude:
# bf16 keeps 8 bits of mantissa (~4e-3 per rounding), f16 11 bits; errors compound over the tower.
HALF_TOLERANCE = {"float16": 2e-2, "bfloat16": 6e-2}


@pytest.fixture(scope="module")
def dtype_models(tiny_hf, tmp_path_factory):
    from convert.convert import convert

    folder = tmp_path_factory.mktemp("dtypes")
    return {d: convert(tiny_hf[0], folder / d, dtype=d) for d in ("float32", "float16", "bfloat16")}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("backend", ["cpu", "mlx"])
def test_half_precision_matches_float32(dtype_models, tiny_pair, dtype, backend):
    pixels = mx.array(tiny_pair[3])
    ids = [5, 6, 7]
    outputs = {}
    for name in ("float32", dtype):
        model, _ = load_model(dtype_models[name])
        if backend == "mlx":
            modules.unswap_modules(model)
        tokens, _ = model.encode_image(pixels)
        logits = model.logits(model.splice(ids, model.project(tokens), ids))
        outputs[name] = [np.array(t.astype(mx.float32)) for t in (tokens, logits)]
    for half, full in zip(outputs[dtype], outputs["float32"], strict=True):
        assert np.isfinite(half).all()
        assert np.abs(half - full).max() <= HALF_TOLERANCE[dtype] * np.abs(full).max()


def test_the_shipped_model_answers_the_same_in_every_dtype(tmp_path):
    """A fixed question set (the first 64 easy-VQA test questions): the same answers in float32,
    float16 and bfloat16 conversions of the shipped checkpoint."""
    from bench import easyvqa
    from convert.convert import convert

    questions = easyvqa.subset(easyvqa.load_split("test"), 64)
    answers = {}
    for dtype in ("float32", "float16", "bfloat16"):
        model, tokenizer = load_model(convert(embedded_model("hf"), tmp_path / dtype, dtype=dtype))
        answers[dtype] = easyvqa.evaluate_mlx(model, tokenizer, questions).predicted
    assert answers["float16"] == answers["float32"] == answers["bfloat16"]
