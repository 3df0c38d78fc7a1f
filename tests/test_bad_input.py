"""Every command against a corrupt model, a corrupt image and an unwritable output: a non-zero exit,
one line starting with "Error", no traceback, nothing of the user's overwritten.

The commands that read a converted model run on (damaged copies of) the shipped one, without
torch; convert and export-coreml on the tiny checkpoint that torch builds (skipped without it).

Each case is a fresh CLI process; they run two at a time. Root ignores file permissions, so
"unwritable" is a parent that is a file, an output that is a folder, and (where `unshare` may
make a private mount namespace) a read-only or full tmpfs.
"""

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.test_cli import assert_clean_error

CLI = [sys.executable, "-m", "fastvlm_mlx.cli"]


def generate(model, image, out):
    return ["generate", "--model", model, "--image", image, "--prompt", "hi", "--max-tokens", "1"]


def info(model, image, out):
    return ["info", model]


def prune_viz(model, image, out):
    return ["prune-viz", "--model", model, "--image", image, "--pruner", "divprune", "--keep-ratio", "0.5", "-o", out]


def bench(model, image, out):
    tiny = ["--frameworks", "mlx", "--runs", "1", "--warmup", "0", "--max-tokens", "1", "--pruners", "none"]
    return ["bench", "--model", model, "--image", image, *tiny, "--out", out]


def convert(src, image, out):
    return ["convert", src, out]


def export_coreml(src, image, out):
    return ["export-coreml", src, out]


MODEL_COMMANDS = {"generate": generate, "info": info, "prune-viz": prune_viz, "bench": bench}
SOURCE_COMMANDS = {"convert": convert, "export-coreml": export_coreml}
IMAGE_COMMANDS = ("generate", "prune-viz", "bench")
OUTPUTS = {"prune-viz": "viz.png", "bench": "results", "convert": "mlx", "export-coreml": "encoder.mlpackage"}


def garbage_config(model: Path) -> None:
    (model / "config.json").write_text('{"model_type": "fastvlm_mlx", ')


def typed_config(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    text = config.get("text") or config["text_config"]  # converted or transformers layout
    text["hidden_size"] = "64"
    (model / "config.json").write_text(json.dumps(config))


def truncated_weights(model: Path) -> None:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def no_tokenizer(model: Path) -> None:
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model"):
        (model / name).unlink(missing_ok=True)


DAMAGES = {
    "garbage-config": garbage_config,
    "typed-config": typed_config,
    "truncated-weights": truncated_weights,
    "no-tokenizer": no_tokenizer,
}


def run_all(cases: list[tuple[str, list[str], tuple[str, ...]]]) -> list[tuple[str, subprocess.CompletedProcess]]:
    """(label, argv, words) -> (label, result), two processes at a time."""

    def run(case):
        label, argv, _ = case
        return label, subprocess.run(argv, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(run, cases))


def check_all(cases) -> None:
    failures = []
    for (label, result), (_, _, words) in zip(run_all(cases), cases, strict=True):
        try:
            assert_clean_error(result, *words)
        except AssertionError:
            failures.append(f"--- {label} (exit {result.returncode})\n{result.stderr[-1500:]}")
    assert not failures, "\n".join(failures)


def damaged_copy(source: Path, root: Path, damage: str) -> Path:
    copy = shutil.copytree(source, root / damage)
    DAMAGES[damage](copy)
    return copy


@pytest.fixture(params=["model", "source"])
def commands(request):
    """(commands, the folder they read): a converted model, or a checkpoint (which needs torch to build)."""
    if request.param == "model":
        return MODEL_COMMANDS, request.getfixturevalue("shipped_mlx")
    return SOURCE_COMMANDS, request.getfixturevalue("tiny_hf")[0]


def test_every_command_with_a_corrupt_model(commands, image_path, tmp_path):
    cases = []
    named, folder = commands
    for damage in DAMAGES:
        model = damaged_copy(folder, tmp_path / "in", damage)
        words = {"truncated-weights": ("safetensors",), "no-tokenizer": ("tokenizer",)}.get(damage, ())
        words = {"garbage-config": ("config.json",), "typed-config": ("hidden_size",)}.get(damage, words)
        for name, command in named.items():
            if name in ("info", "export-coreml") and damage == "no-tokenizer":
                continue  # info and the vision encoder read no tokenizer
            out = tmp_path / "out" / damage / OUTPUTS.get(name, "x")
            cases.append((f"{name} / {damage}", CLI + command(str(model), str(image_path), str(out)), words))
    check_all(cases)
    assert not (tmp_path / "out").exists() or not any(p.is_file() for p in (tmp_path / "out").rglob("*"))


def bomb(path: Path) -> Path:
    """A PNG header claiming 30000 x 30000 pixels: PIL refuses to decode it (decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def test_every_command_with_a_corrupt_image(shipped_mlx, image_path, tmp_path):
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(image_path.read_bytes()[:300])
    text = tmp_path / "text.png"
    text.write_text("not an image")
    images = {"truncated": truncated, "text": text, "bomb": bomb(tmp_path / "bomb.png")}
    model = str(shipped_mlx)
    cases = [  # a truncated image for every command, the other kinds of damage for one
        (f"{name} / {kind}", CLI + MODEL_COMMANDS[name](model, str(image), str(tmp_path / kind)), (image.name,))
        for name in IMAGE_COMMANDS
        for kind, image in images.items()
        if kind == "truncated" or name == "generate"
    ]
    check_all(cases)
    assert not any(p.is_file() for kind in images for p in (tmp_path / kind).rglob("*"))  # no output written


WRITERS = ("prune-viz", "bench", "convert", "export-coreml")


def test_every_command_with_an_unwritable_output(commands, image_path, tmp_path):
    named, model = commands
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    cases = []
    for name, command in ((n, c) for n, c in named.items() if n in WRITERS):
        argv = CLI + command(str(model), str(image_path), str(blocker / OUTPUTS[name]))
        cases.append((f"{name} / parent is a file", argv, ("a-file",)))
    if named is MODEL_COMMANDS:
        viz = ["prune-viz", "--model", str(model), "--image", str(image_path), "--pruner", "norm"]
        viz += ["--keep-ratio", "0.5"]
        cases.append(("prune-viz / -o is a folder", CLI + [*viz, "-o", str(folder), "--force"], ("a-folder", "folder")))
        cases.append(("bench / --out is a file", CLI + bench(str(model), str(image_path), str(blocker)), ("a-file",)))
    check_all(cases)
    assert blocker.read_text() == "mine" and [p.name for p in folder.iterdir()] == ["keep.txt"]


def private_mount(options: str, mountpoint: Path, argv: list[str]) -> list[str]:
    """argv run in a mount namespace of its own, with a tmpfs mounted at `mountpoint`."""
    script = 'mount -t tmpfs -o "$1" fastvlm-test "$2" && shift 2 && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", script, "sh", options, str(mountpoint), *argv]


@pytest.fixture
def mountpoint(tmp_path):
    point = tmp_path / "mnt"
    point.mkdir()
    if shutil.which("unshare") is None or subprocess.run(private_mount("size=4k", point, ["true"])).returncode:
        pytest.skip("needs unshare and mount rights to make a read-only or full file system")
    return point


@pytest.mark.parametrize("options", ["ro", "size=4k"], ids=["read-only", "full"])
def test_every_command_onto_a_read_only_or_full_disk(commands, image_path, mountpoint, options):
    named, model = commands
    cases = []
    for name, command in ((n, c) for n, c in named.items() if n in WRITERS):
        argv = CLI + command(str(model), str(image_path), str(mountpoint / OUTPUTS[name]))
        cases.append((f"{name} / {options}", private_mount(options, mountpoint, argv), (str(mountpoint),)))
    check_all(cases)
