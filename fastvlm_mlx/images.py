"""Image inputs -> upright 8-bit RGB PIL images, and a content hash for caching their features.

An image is a file path, a `PIL.Image`, an HWC (or HW) uint8 numpy array, the bytes of an image
file, a `data:` URL or an http(s) URL. Every kind ends in `preprocess.to_rgb`, so a picture gives
the same pixels whichever way it arrives. URLs are fetched with a byte limit and a deadline, and
redirects may only lead to other http(s) URLs.
"""

import base64
import binascii
import hashlib
import io
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from fastvlm_mlx.preprocess import ImageError, decode_image, load_image, to_rgb

ImageInput = str | Path | bytes | Image.Image | np.ndarray
MAX_IMAGE_BYTES = 32 * 2**20  # an encoded image larger than this is refused before decoding
URL_TIMEOUT_S = 10.0  # for the whole download, not per read
CHUNK = 1 << 16


class ImageTooLarge(ImageError):
    """An image over the byte limit (a server answers 413 rather than 400)."""


def read_image(
    image: ImageInput,
    *,
    allow_files: bool = True,
    max_bytes: int = MAX_IMAGE_BYTES,
    timeout_s: float = URL_TIMEOUT_S,
) -> Image.Image:
    """Any supported image input as an upright RGB image; bad input is an ImageError saying why.

    `allow_files=False` refuses paths (a server that must not read its own disk)."""
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image))
    if isinstance(image, np.ndarray):
        return _from_array(image)
    if isinstance(image, bytes | bytearray | memoryview):
        return _from_bytes(bytes(image), "the image bytes", max_bytes)
    if isinstance(image, str) and image[:5].lower() == "data:":
        return _from_bytes(data_url_bytes(image, max_bytes), "the data: URL", max_bytes)
    if isinstance(image, str) and image.split(":", 1)[0].lower() in ("http", "https"):
        return _from_bytes(fetch(image, max_bytes, timeout_s), _shown(image), max_bytes)
    if isinstance(image, str | Path):
        if not allow_files:
            raise ImageError("local image files are not allowed here; send the image as a data: or http(s) URL")
        return load_image(image)
    raise ImageError(
        f"unsupported image type {type(image).__name__}; give a path, PIL.Image, uint8 array, bytes or URL"
    )


def image_digest(image: Image.Image) -> str:
    """A hash of an RGB image's size and pixels: equal pictures, however they arrived, share it."""
    digest = hashlib.blake2b(f"{image.mode} {image.size}".encode(), digest_size=16)
    digest.update(image.tobytes())
    return digest.hexdigest()


def _from_array(array: np.ndarray) -> Image.Image:
    channels = array.shape[2] if array.ndim == 3 else None
    if array.dtype != np.uint8 or not (array.ndim == 2 or channels in (1, 3, 4)) or 0 in array.shape:
        raise ImageError(
            f"an image array must be uint8 of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), not {array.dtype} "
            f"{array.shape}; convert floats in [0, 1] with (array * 255).round().astype(np.uint8)"
        )
    return to_rgb(Image.fromarray(array[..., 0] if channels == 1 else np.ascontiguousarray(array)))


def _from_bytes(data: bytes, name: str, max_bytes: int) -> Image.Image:
    if len(data) > max_bytes:
        raise ImageTooLarge(f"{name} is {len(data)} bytes, over the {max_bytes}-byte limit; give a smaller image")
    return decode_image(io.BytesIO(data), name)


def data_url_bytes(url: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The payload of a `data:[<type>][;base64],<data>` URL (RFC 2397)."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise ImageError("the data: URL has no ',' before its data; expected data:image/png;base64,....")
    if len(payload) > max_bytes * 4 // 3 + 4:  # refuse before decoding what would be too large anyway
        raise ImageTooLarge(f"the data: URL holds more than {max_bytes} bytes; give a smaller image")
    if not header.lower().endswith(";base64"):
        return urllib.parse.unquote_to_bytes(payload)
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageError(f"the data: URL is not valid base64 ({error})") from None


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s) URLs (urllib would also follow ftp:)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise ImageError(f"{_shown(req.full_url)} redirects to {_shown(newurl)}, which is not an http(s) URL")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, max_bytes: int = MAX_IMAGE_BYTES, timeout_s: float = URL_TIMEOUT_S) -> bytes:
    """The body of an http(s) URL, at most `max_bytes`, within `timeout_s` seconds in all."""
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "fastvlm-mlx"})
    deadline = time.monotonic() + timeout_s
    try:
        with opener.open(request, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise ImageTooLarge(f"{_shown(url)} is {length} bytes, over the {max_bytes}-byte limit")
            body = bytearray()
            while chunk := response.read(CHUNK):
                body += chunk
                if len(body) > max_bytes:
                    raise ImageTooLarge(f"{_shown(url)} sends more than {max_bytes} bytes; give a smaller image")
                if time.monotonic() > deadline:
                    raise ImageError(f"{_shown(url)} took longer than {timeout_s:g} s to download")
            return bytes(body)
    except urllib.error.HTTPError as error:
        raise ImageError(f"cannot fetch {_shown(url)}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise ImageError(f"cannot fetch {_shown(url)}: {reason}") from None


def _shown(url: str) -> str:
    """A URL short enough for a one-line error."""
    return url if len(url) <= 80 else url[:77] + "..."
