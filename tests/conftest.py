"""Shared fixtures: tiny random checkpoints built on the fly (no network, no downloads)."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import fastvlm_mlx  # noqa: F401  (loads the optimized BLAS before anything imports mlx)

os.environ.setdefault("TIMM_FUSED_ATTN", "0")  # explicit softmax attention in the reference
TINY_VISION = dict(layers=(1, 1, 1, 1, 1), embed_dims=(8, 16, 32, 64, 128))
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    vocab_size=384,
    tie_word_embeddings=True,
)
CORPUS = [
    "what color is the shape? the shape is red. is there a blue circle? yes. no.",
    "describe the image in detail. a green triangle on a white background, a gray square.",
    "how many shapes are there? one two three. what is in the picture?",
] * 20


@pytest.fixture(scope="session")
def torch_ref():
    return pytest.importorskip("bench.synthetic", reason="needs the torch extra")


@pytest.fixture(scope="session")
def image_path(tmp_path_factory) -> Path:
    """A non-square image with structure, so cropping/padding/pruning differences show."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:240, 0:320]
    base = np.stack([x / 320 * 255, y / 240 * 255, (x + y) % 64 * 4], axis=-1)
    noisy = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("images") / "gradient.png"
    Image.fromarray(noisy).save(path)
    return path


@pytest.fixture(scope="session")
def shipped_mlx() -> Path:
    """The converted easy-VQA model that ships with the package: a real model, no torch needed."""
    from fastvlm_mlx.load import embedded_model

    return embedded_model()


@pytest.fixture(scope="session")
def tiny_hf(torch_ref, tmp_path_factory):
    """(directory, reference model) for a tiny transformers-format FastVLM."""
    directory = tmp_path_factory.mktemp("tiny_hf")
    tokenizer = torch_ref.make_tokenizer(directory, CORPUS, vocab_size=300)
    model = torch_ref.build_reference(
        TINY_VISION, TINY_TEXT, tokenizer.convert_tokens_to_ids("<image>"), seed=0, text_init=0.2
    )
    torch_ref.save_checkpoint(model, tokenizer, directory, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return directory, model


@pytest.fixture(scope="session")
def tiny_mlx(tiny_hf, tmp_path_factory) -> Path:
    from convert.convert import convert

    return convert(tiny_hf[0], tmp_path_factory.mktemp("tiny") / "mlx")


@pytest.fixture(scope="session")
def tiny_pair(tiny_hf, tiny_mlx, image_path):
    """(reference model, MLX model, tokenizer, preprocessed pixels) for the tiny checkpoint."""
    from fastvlm_mlx.load import load_model
    from fastvlm_mlx.preprocess import load_image, preprocess

    model, tokenizer = load_model(tiny_mlx)
    pixels = preprocess(load_image(image_path), model.config.image_size, model.config.preprocess_mode)
    return tiny_hf[1], model, tokenizer, pixels


def isolated_environment(home: Path, **extra: str) -> dict:
    """This process's environment for a subprocess with its own HOME (so its own private cache):
    no fastvlm-mlx settings, no XDG_CACHE_HOME, none of this process's private folders on PATH."""
    from fastvlm_mlx.cpu import private

    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTVLM_MLX_") and k != "XDG_CACHE_HOME"}
    root = private.machine_folder() or "\0"
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(root))
    return env | {"HOME": str(home)} | extra


@pytest.fixture(scope="session")
def isolated_env():
    return isolated_environment


def shape_picture(kind: str, color: tuple) -> Image.Image:
    """A 64x64 easy-VQA-like picture: one filled circle or rectangle on white."""
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    {"circle": draw.ellipse, "rectangle": draw.rectangle}[kind]((12, 12, 52, 52), fill=color)
    return image


@pytest.fixture(scope="session")
def easyvqa():
    """The shipped easy-VQA model, loaded once: (model, tokenizer)."""
    from fastvlm_mlx.load import embedded_model, load_model

    return load_model(embedded_model())


@pytest.fixture(scope="session")
def pictures():
    """Three shape pictures the shipped model answers about."""
    return [
        shape_picture(*spec)
        for spec in (("circle", (200, 30, 30)), ("rectangle", (30, 30, 200)), ("circle", (30, 160, 30)))
    ]
