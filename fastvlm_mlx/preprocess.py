"""Image file -> NHWC float pixels in [0, 1], as FastVLM's two reference pipelines do it."""

from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fastvlm_mlx.errors import UserError

MODES = ("pad", "crop")


class ImageError(UserError):
    """An image path that cannot be used; the message says why and what to do."""


def load_image(path: str | Path) -> Image.Image:
    """Open any PIL-readable image as upright 8-bit RGB (EXIF rotation applied)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path} (check the --image path)")
    return decode_image(path, str(path))


def decode_image(source: Path | BinaryIO, name: str) -> Image.Image:
    """Decode an image file or file object as upright 8-bit RGB; errors are ImageErrors naming `name`."""
    try:
        with Image.open(source) as image:
            return to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as error:
        raise ImageError(f"{name} is too large to read safely ({error}); give a smaller image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        # the classes PIL's decoders raise on damaged files
        raise ImageError(
            f"cannot read {name} as an image ({error}); give a PNG, JPEG or other PIL-readable file"
        ) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16/32-bit and float grey scaled, transparent pixels black."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping.
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become black, like Apple's pad colour; PIL's convert would keep
        # whatever colour happens to sit under alpha 0.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def pad_to_square(image: Image.Image) -> Image.Image:
    """Centre the image on a black square (original `expand2square`, image mean 0)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    square = Image.new("RGB", (side, side), (0, 0, 0))
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Shortest edge to `size` (bicubic), then centre crop (transformers CLIP processor)."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def preprocess(image: Image.Image, size: int = 1024, mode: str = "pad") -> np.ndarray:
    """RGB PIL image -> (1, size, size, 3) float32 in [0, 1] (mean 0, std 1: no normalisation)."""
    if mode == "pad":
        image = pad_to_square(image).resize((size, size), Image.BICUBIC)
    elif mode == "crop":
        image = resize_and_crop(image, size)
    else:
        raise ValueError(f"unknown preprocess mode {mode!r}; choose one of {', '.join(MODES)}")
    return (np.asarray(image, dtype=np.float32) / 255.0)[None]
