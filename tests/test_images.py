"""Every image input kind gives the same RGB pixels; URLs are bounded; bad input is an ImageError."""

import base64
import http.server
import threading
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from fastvlm_mlx.images import image_digest, read_image
from fastvlm_mlx.preprocess import ImageError, load_image


class ImageServer(http.server.BaseHTTPRequestHandler):
    """/image.png: the test image; /big: more bytes than announced; /redirect?to=URL; /missing: 404."""

    files: dict[str, bytes] = {}

    def do_GET(self):
        path, _, query = self.path.partition("?")
        if path == "/redirect":
            self.send_response(302)
            self.send_header("Location", urllib.parse.parse_qs(query)["to"][0])
            self.end_headers()
            return
        if path not in self.files:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if path != "/unannounced":
            self.send_header("Content-Length", str(len(self.files[path])))
        self.end_headers()
        self.wfile.write(self.files[path])

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(image_path):
    ImageServer.files = {"/image.png": image_path.read_bytes(), "/unannounced": b"x" * 5000}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_every_input_kind_gives_the_same_pixels(image_path, server):
    expected = np.asarray(load_image(image_path))
    data = image_path.read_bytes()
    kinds = {
        "path": image_path,
        "str path": str(image_path),
        "PIL": Image.open(image_path),
        "array": expected.copy(),
        "RGBA array": np.concatenate([expected, np.full(expected.shape[:2] + (1,), 255, np.uint8)], axis=-1),
        "bytes": data,
        "data URL": "data:image/png;base64," + base64.b64encode(data).decode(),
        "percent-encoded data URL": "data:image/png," + urllib.parse.quote_from_bytes(data),
        "http URL": f"{server}/image.png",
        "redirected URL": f"{server}/redirect?to={urllib.parse.quote(server + '/image.png')}",
    }
    digests = set()
    for kind, image in kinds.items():
        picture = read_image(image)
        assert picture.mode == "RGB", kind
        assert np.array_equal(np.asarray(picture), expected), kind
        digests.add(image_digest(picture))
    assert len(digests) == 1


def test_grey_arrays_become_rgb():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for array in (grey, grey[..., None]):
        assert np.array_equal(np.asarray(read_image(array)), np.repeat(grey[..., None], 3, axis=-1))


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.zeros((4, 4, 3), np.float32), "uint8"),
        (np.zeros((4, 4, 2), np.uint8), "(H, W, 3)"),
        (np.zeros((0, 4, 3), np.uint8), "uint8"),
        (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
    ],
)
def test_unusable_arrays_are_refused(array, words):
    with pytest.raises(ImageError) as error:
        read_image(array)
    assert words in str(error.value)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("data:image/png;base64,%%%notbase64", "not valid base64"),
        ("data:image/png;base64", "no ','"),
        ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "cannot read the data: URL"),
    ],
)
def test_bad_data_urls(url, words):
    with pytest.raises(ImageError) as error:
        read_image(url)
    assert words in str(error.value)


def test_url_limits_and_failures(server, image_path):
    size = len(image_path.read_bytes())
    with pytest.raises(ImageError, match="over the"):
        read_image(f"{server}/image.png", max_bytes=size - 1)  # refused by its Content-Length
    with pytest.raises(ImageError, match="more than 1000 bytes"):
        read_image(f"{server}/unannounced", max_bytes=1000)  # refused while reading
    with pytest.raises(ImageError, match="HTTP 404"):
        read_image(f"{server}/missing")
    for target in ("file:///etc/passwd", "ftp://127.0.0.1/x.png"):  # urllib refuses file:, we refuse ftp:
        with pytest.raises(ImageError, match=f"cannot fetch .*{target}|redirects to {target}"):
            read_image(f"{server}/redirect?to={urllib.parse.quote(target)}")
    with pytest.raises(ImageError, match="cannot fetch"):
        read_image("http://127.0.0.1:9/nothing-listens-here.png", timeout_s=2)
    with pytest.raises(ImageError, match="over the"):
        read_image(image_path.read_bytes(), max_bytes=size - 1)


def test_paths_can_be_refused_and_unknown_types_are_named(image_path):
    with pytest.raises(ImageError, match="local image files are not allowed"):
        read_image(str(image_path), allow_files=False)
    assert read_image(f"data:image/png;base64,{base64.b64encode(image_path.read_bytes()).decode()}", allow_files=False)
    with pytest.raises(ImageError, match="unsupported image type int"):
        read_image(3)
    with pytest.raises(ImageError, match="image not found"):
        read_image("no/such/picture.png")
