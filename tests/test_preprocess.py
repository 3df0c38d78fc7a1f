"""Preprocessing matches the two reference pipelines and accepts any PIL-readable image."""

import numpy as np
import pytest
from PIL import Image

from fastvlm_mlx.preprocess import ImageError, load_image, pad_to_square, preprocess


def test_pad_mode_is_black_square_then_pil_bicubic(image_path):
    image = load_image(image_path)  # 320x240
    square = Image.new("RGB", (320, 320))
    square.paste(image, (0, 40))
    expected = np.asarray(square.resize((256, 256), Image.BICUBIC), dtype=np.float32) / 255
    pixels = preprocess(image, 256, "pad")
    assert pixels.shape == (1, 256, 256, 3) and pixels.dtype == np.float32
    assert np.array_equal(pixels[0], expected)
    assert np.all(pixels[0, :20] == 0)  # the pad band is black


def test_crop_mode_matches_transformers_clip_processor(image_path):
    pil_processor = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    processor = pil_processor.CLIPImageProcessorPil(
        size={"shortest_edge": 256}, crop_size={"height": 256, "width": 256}, image_mean=[0, 0, 0], image_std=[1, 1, 1]
    )
    image = load_image(image_path)
    expected = np.asarray(processor(image, return_tensors="np")["pixel_values"])[0].transpose(1, 2, 0)
    assert np.abs(preprocess(image, 256, "crop")[0] - expected).max() < 1e-6


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "I;16", "I", "CMYK", "1"])
def test_any_pil_mode_becomes_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    image = (
        rgb.convert(mode)
        if mode not in ("I;16", "I")
        else Image.fromarray(rng.integers(0, 65535, (30, 40), dtype=np.uint16)).convert(mode)
    )
    path = tmp_path / ("x.tiff" if mode in ("I;16", "I", "CMYK") else "x.png")
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (40, 30)
    if mode in ("I;16", "I"):  # 16-bit values are scaled to 8 bits, not clipped to white
        assert 50 < np.asarray(loaded).mean() < 200


def test_transparent_pixels_become_black(tmp_path):
    image = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    image.save(tmp_path / "clear.png")
    assert np.asarray(load_image(tmp_path / "clear.png")).max() == 0


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (20, 40)


def test_square_image_is_not_padded():
    image = Image.new("RGB", (8, 8), (1, 2, 3))
    assert pad_to_square(image) is image


def test_unknown_mode_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="pad, crop"):
        preprocess(Image.new("RGB", (8, 8)), 64, "stretch")
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "a.jpg").write_text("text")
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "a.jpg")
