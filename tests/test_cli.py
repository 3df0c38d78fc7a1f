"""Bad input gets a one-line error, a non-zero exit code, no traceback, and nothing overwritten."""

import json
import shutil
import subprocess
import sys

import pytest

# Only what needs torch (convert, export-coreml, the reference) uses tiny_hf / tiny_mlx, which skip
# without it; everything that needs a converted model only runs on the shipped one.


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


def test_missing_image(shipped_mlx, tmp_path):
    assert_clean_error(generate(shipped_mlx, tmp_path / "nope.png"), "image not found", "nope.png")


def test_non_image_file(shipped_mlx, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert_clean_error(generate(shipped_mlx, text), "cannot read", "notes.png")


def test_truncated_image(shipped_mlx, image_path, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(image_path.read_bytes()[:200])
    assert_clean_error(generate(shipped_mlx, broken), "broken.png")


def test_model_dir_without_weights(shipped_mlx, image_path, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes((shipped_mlx / "config.json").read_bytes())
    assert_clean_error(generate(model, image_path), "model.safetensors")


def test_folder_of_another_model(shipped_mlx, image_path, tmp_path):
    """A checkpoint folder is converted once and cached (tests/test_hub.py); another model type is refused."""
    model = shutil.copytree(shipped_mlx.parent / "hf", tmp_path / "llama")  # the shipped checkpoint
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    assert_clean_error(generate(model, image_path), "not a converted fastvlm-mlx model", "fastvlm-mlx convert")


def test_model_with_mismatched_shapes(shipped_mlx, image_path, tmp_path):
    import mlx.core as mx

    model = tmp_path / "model"
    model.mkdir()
    for f in shipped_mlx.iterdir():
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


def test_generate_streams_text(shipped_mlx, image_path):
    result = run_cli(
        "generate", "--model", str(shipped_mlx), "--image", str(image_path), "--prompt", "what color is the shape?"
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


def invoke(*args, stdin: bytes | None = None):
    """The CLI in this process (a model loads in a fraction of a second): exit code and stderr."""
    from click.testing import CliRunner

    from fastvlm_mlx.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], input=stdin)
    if not isinstance(result.exception, SystemExit | None):
        raise result.exception  # a traceback: the bug this file is about
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def viz_args(model, image, out):
    return ["prune-viz", "--model", model, "--image", image, "--pruner", "norm", "--keep-ratio", "0.5", "-o", out]


@pytest.mark.parametrize("size", ["4096", "100000", "100", "0", "-64"])
def test_image_size_out_of_bounds_for_every_command(shipped_mlx, image_path, tmp_path, size):
    words = ("2048",) if size.isdigit() and int(size) > 0 else ()
    base = ["generate", "--model", shipped_mlx, "--image", image_path, "--prompt", "hi"]
    assert_clean_error(invoke(*base, "--image-size", size), *words)
    assert_clean_error(invoke(*viz_args(shipped_mlx, image_path, tmp_path / "v.png"), "--image-size", size), *words)
    if size.isdigit():  # --image-sizes is a comma-separated list of whole numbers
        bench = ["bench", "--model", shipped_mlx, "--image", image_path, "--frameworks", "mlx", "--out", tmp_path / "b"]
        assert_clean_error(invoke(*bench, "--pruners", "none", "--image-sizes", size), *words)
    assert not (tmp_path / "v.png").exists()


@pytest.mark.parametrize("size", ["4096", "100000", "100", "0", "-64"])
def test_image_size_out_of_bounds_for_export_coreml(tiny_hf, tmp_path, size):
    words = ("2048",) if size.isdigit() and int(size) > 0 else ()
    assert_clean_error(invoke("export-coreml", tiny_hf[0], tmp_path / "e.mlpackage", "--image-size", size), *words)
    assert not (tmp_path / "e.mlpackage").exists()


@pytest.mark.parametrize(
    "option, value",
    [("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan"), ("--keep-ratio", "nan")]
    + [("--seed", "-1"), ("--seed", str(2**64)), ("--seed", "1.5")],
)
def test_non_finite_numbers_and_seeds_outside_uint64(shipped_mlx, image_path, tmp_path, option, value):
    base = ["generate", "--model", shipped_mlx, "--image", image_path, "--prompt", "hi", "--pruner", "norm"]
    keep = [] if option == "--keep-ratio" else ["--keep-ratio", "0.5"]
    assert_clean_error(invoke(*base, *keep, option, value), option)
    if option in ("--seed", "--keep-ratio"):
        viz = viz_args(shipped_mlx, image_path, tmp_path / "v.png")
        viz = viz[:-4] + viz[-2:] if option == "--keep-ratio" else viz
        assert_clean_error(invoke(*viz, option, value), option)


@pytest.mark.parametrize("value", ["-1", str(2**64), "1.5"])
def test_export_coreml_seed_outside_uint64(tiny_hf, tmp_path, value):
    assert_clean_error(invoke("export-coreml", tiny_hf[0], tmp_path / "e.mlpackage", "--seed", value), "--seed")


@pytest.fixture(scope="module")
def shipped_pair(shipped_mlx):
    from fastvlm_mlx.load import load_model

    return load_model(shipped_mlx)


def visual_tokens(config) -> int:
    return (config.image_size // config.vision.stride) ** 2


def test_library_rejects_what_the_cli_rejects(shipped_pair, image_path):
    from fastvlm_mlx.errors import UserError
    from fastvlm_mlx.generate import generate as run

    model, tokenizer = shipped_pair
    bad = [dict(temperature=float("nan")), dict(temperature=float("inf")), dict(top_p=float("nan"))]
    bad += [dict(seed=-1), dict(seed=2**64), dict(image_size=4096), dict(image_size=100)]
    for options in bad:
        with pytest.raises(UserError):
            run(model, tokenizer, image_path, "hi", max_tokens=1, **options)


def test_prompt_from_file_and_stdin_equals_the_argument(shipped_mlx, image_path, tmp_path):
    base = ["generate", "--model", shipped_mlx, "--image", image_path, "--max-tokens", "4", "--json"]
    question = "what color is the shape?"
    (tmp_path / "q.txt").write_text(question + "\n")
    results = [
        invoke(*base, "--prompt", question),
        invoke(*base, "--prompt-file", tmp_path / "q.txt"),
        invoke(*base, "--prompt", "-", stdin=(question + "\n").encode()),
    ]
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert len({json.loads(r.stdout)["text"] for r in results}) == 1


def test_bad_prompts(shipped_mlx, image_path, tmp_path):
    base = ["generate", "--model", shipped_mlx, "--image", image_path]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert_clean_error(invoke(*base, "--prompt-file", tmp_path / "latin1.txt"), "latin1.txt", "UTF-8")
    assert_clean_error(invoke(*base, "--prompt", "-", stdin=b"\xff\xfe"), "stdin", "UTF-8")
    assert_clean_error(invoke(*base, "--prompt", "caf\udce9"), "--prompt", "UTF-8")  # how the OS hands over bad bytes
    assert_clean_error(invoke(*base, "--prompt-file", tmp_path / "missing.txt"), "missing.txt")
    assert_clean_error(invoke(*base, "--prompt-file", tmp_path), str(tmp_path))
    assert_clean_error(invoke(*base), "--prompt-file")
    assert_clean_error(invoke(*base, "--prompt", "x", "--prompt-file", tmp_path / "latin1.txt"), "--prompt-file")


def test_prompt_past_the_read_limit(shipped_mlx, image_path):
    """--prompt-file and stdin are read up to 16 MiB, far past any context: /dev/zero is an error, not a hang."""
    from fastvlm_mlx.files import TEXT_LIMIT

    base = ["generate", "--model", shipped_mlx, "--image", image_path]
    assert_clean_error(invoke(*base, "--prompt-file", "/dev/zero"), "/dev/zero", "MiB")
    assert_clean_error(invoke(*base, "--prompt", "-", stdin=b"a" * (TEXT_LIMIT + 1)), "stdin", "MiB")


def test_prompt_past_the_context(shipped_pair, shipped_mlx, image_path, tmp_path):
    from fastvlm_mlx.prompt import tokenize_prompt

    model, tokenizer = shipped_pair
    question = "what color is the shape? " * 20
    text_tokens, full = sum(map(len, tokenize_prompt(tokenizer, question))), visual_tokens(model.config)
    context = text_tokens + full // 4 + 8  # room for a quarter of the visual tokens and a short answer
    folder = shutil.copytree(shipped_mlx, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["text"]["max_position_embeddings"] = context
    (folder / "config.json").write_text(json.dumps(config))
    (tmp_path / "long.txt").write_text(question)
    base = ["generate", "--model", folder, "--image", image_path, "--prompt-file", tmp_path / "long.txt"]
    assert_clean_error(invoke(*base), f"{text_tokens + full} tokens", f"context is {context}")
    result = invoke(*base, "--pruner", "norm", "--keep-ratio", "0.25", "--json")  # a quarter fits
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["token_ids"]) <= 8


def test_answer_stops_at_the_context(shipped_pair, image_path):
    from fastvlm_mlx.generate import generate as run
    from fastvlm_mlx.prompt import tokenize_prompt

    model, tokenizer = shipped_pair
    before, after = tokenize_prompt(tokenizer, "hi")
    prompt_tokens = len(before) + visual_tokens(model.config) + len(after)
    previous = model.config.max_context
    model.config.max_context = prompt_tokens + 2
    try:
        result = run(model, tokenizer, image_path, "hi", max_tokens=50)
    finally:
        model.config.max_context = previous
    assert len(result.token_ids) <= 2


@pytest.mark.parametrize("spec", ["easy-vqa:abc", "easy-vqa:-5", "easy-vqa:0", "easy-vqa:", "easy-vqa:1.5", "nope"])
def test_bench_dataset_spec_is_parsed_strictly(shipped_mlx, tmp_path, spec):
    base = ["bench", "--model", shipped_mlx, "--frameworks", "mlx", "--pruners", "none", "--out", tmp_path]
    assert_clean_error(invoke(*base, "--dataset", spec), spec)


@pytest.mark.parametrize(
    "rows",
    ["{not json", "{}", "[]", '["x"]', '[{"image": "a.png"}]', '[{"image": 1, "question": "q", "answer": "a"}]']
    + ['[{"image": "missing.png", "question": "q", "answer": "a"}]', "\xff"],
)
def test_bench_malformed_dataset_file(shipped_mlx, tmp_path, rows):
    dataset = tmp_path / "qa.json"
    dataset.write_bytes(rows.encode("latin-1"))
    base = ["bench", "--model", shipped_mlx, "--frameworks", "mlx", "--pruners", "none", "--out", tmp_path / "out"]
    assert_clean_error(invoke(*base, "--dataset", dataset), "qa.json")


def test_outputs_are_never_overwritten_or_misplaced(shipped_mlx, image_path, tmp_path):
    mine = tmp_path / "mine.png"
    mine.write_text("keep")
    assert_clean_error(invoke(*viz_args(shipped_mlx, image_path, mine)), "already exists", "--force")
    folder = tmp_path / "folder"
    folder.mkdir()
    assert_clean_error(invoke(*viz_args(shipped_mlx, image_path, folder), "--force"), "is a folder")
    assert_clean_error(invoke(*viz_args(shipped_mlx, image_path, mine / "sub" / "v.png")), "mine.png is a file")
    bench = ["bench", "--model", shipped_mlx, "--image", image_path, "--frameworks", "mlx", "--pruners", "none"]
    assert_clean_error(invoke(*bench, "--out", mine), "mine.png is a file")
    assert mine.read_text() == "keep" and not any(folder.iterdir())
    written = invoke(*viz_args(shipped_mlx, image_path, folder / "v.png"))
    assert written.returncode == 0 and [p.name for p in folder.iterdir()] == ["v.png"]  # no partial file left
