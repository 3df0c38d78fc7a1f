"""An OpenAI-compatible server: `create_app(model, tokenizer, ...)` over the batching engine.

Routes: `POST /v1/chat/completions` (streamed or not), `GET /v1/models`, `GET /health`.
Requests are checked here (pydantic models, limits, the image read and the prompt tokenized on
a worker thread of the event loop), then handed to `fastvlm_mlx.engine.Engine`, whose one
thread owns MLX. Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
The `fastvlm` field of a request picks the pruning; the same field of a response gives its
stage timings and what the caches saved.
"""

import asyncio
import hashlib
import hmac
import io
import json
import os
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from fastvlm_mlx.engine import VISION_SLICE_S, Delta, Engine, Failed, Finished, QueueFull
from fastvlm_mlx.errors import UserError
from fastvlm_mlx.images import ImageTooLarge, data_url_bytes, fetch, read_image
from fastvlm_mlx.preprocess import ImageError
from pruners import PrunerError

Finite = Annotated[float, Field(allow_inf_nan=False)]


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; past these the answer is 413 (sizes) or 400."""

    max_body_bytes: int = 48 * 2**20
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_images: int = 1  # FastVLM takes one image per conversation
    max_stop: int = 4
    timeout_s: float = 300.0  # a whole request, queue to last token
    url_timeout_s: float = 10.0  # an http(s) image download


# -- request models -----------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields we do not use are accepted and ignored


class ImageURL(_Model):
    url: str
    detail: str | None = None


class ContentPart(_Model):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class FastVLMOptions(_Model):
    pruner: str | None = None
    keep_ratio: Finite | None = Field(default=None, gt=0, le=1)
    image_size: int | None = Field(default=None, ge=1, le=2048)
    keep_positions: bool | None = None


class ChatRequest(_Model):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: Finite = Field(default=0.0, ge=0, le=2)
    top_p: Finite = Field(default=1.0, ge=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    fastvlm: FastVLMOptions | None = None


# -- errors -------------------------------------------------------------------------------

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    504: "timeout_error",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status)


def _validation_error(error: ValidationError | RequestValidationError) -> ApiError:
    first = error.errors()[0]
    param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
    return ApiError(400, f"{param or 'request'}: {first.get('msg', 'invalid value')}", param, "invalid_value")


# -- images and messages ------------------------------------------------------------------


class RecentImages:
    """The images of the last requests, by a hash of what was sent (a data: URL as it is, or the bytes
    downloaded or read). A chat client sends the whole conversation, its image too, with every turn,
    and reading that again (base64, the header's pixel check, the decode: ~30 ms for a 1024² PNG here,
    and the follow-ups of a burst queue behind one another for it) is the same work for the same
    picture. Bounded in entries and in decoded bytes; shared by the event loop's worker threads. The
    pictures are shared too, so nothing downstream may draw on them (the preprocessor makes new ones)."""

    def __init__(self, max_entries: int = 16, max_bytes: int = 256 * 2**20):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[bytes, tuple[Image.Image, int]] = OrderedDict()  # key -> (picture, bytes)
        self._held = 0  # the decoded bytes of every entry
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(kind: str, data: bytes) -> bytes:
        return hashlib.blake2b(data, digest_size=32, person=kind.encode()).digest()

    def read(self, key: bytes, raw: Callable[[], bytes], limits: Limits) -> Image.Image:
        """The picture under `key`, else decoded from `raw()` (checked against `limits`) and kept."""
        with self._lock:
            found = self._entries.get(key)
            self.hits, self.misses = self.hits + (found is not None), self.misses + (found is None)
            if found is not None:
                self._entries.move_to_end(key)
                return found[0]
        data = raw()
        check_pixels(data, limits.max_image_pixels)
        picture = read_image(data, max_bytes=limits.max_image_bytes)
        self._keep(key, picture)
        return picture

    def _keep(self, key: bytes, picture: Image.Image) -> None:
        size = picture.width * picture.height * len(picture.getbands())
        with self._lock:
            if size > self.max_bytes or key in self._entries:
                return
            self._entries[key], self._held = (picture, size), self._held + size
            while len(self._entries) > self.max_entries or self._held > self.max_bytes:
                self._held -= self._entries.popitem(last=False)[1][1]


def request_image(url: str, limits: Limits, allow_files: bool, recent: RecentImages | None = None) -> Image.Image:
    """The image of an `image_url` part: a data: URL, an http(s) URL, or a local path where allowed;
    through `recent`, a picture sent before is not read again."""
    recent = recent or RecentImages(max_entries=0)
    if url[:5].lower() == "data:":  # the URL is the picture: its hash is enough to find it
        return recent.read(recent.key("data-url", url.encode()), lambda: data_url_bytes(url, limits.max_image_bytes),
                           limits)  # fmt: skip
    if url.split(":", 1)[0].lower() in ("http", "https"):
        data = fetch(url, limits.max_image_bytes, limits.url_timeout_s)
    elif not allow_files:
        raise ImageError("local image paths are off; send the image as a data: or http(s) URL (or start the "
                         "server with --allow-local-files)")  # fmt: skip
    else:
        try:
            size = os.stat(url).st_size
        except OSError as error:
            raise ImageError(f"cannot read the image {url}: {error.strerror}") from None
        if size > limits.max_image_bytes:
            raise ImageTooLarge(f"{url} is {size} bytes, over the {limits.max_image_bytes}-byte limit")
        with open(url, "rb") as file:
            data = file.read(limits.max_image_bytes + 1)
    return recent.read(recent.key("bytes", data), lambda: data, limits)


def check_pixels(data: bytes, max_pixels: int) -> None:
    """ImageTooLarge for a picture over `max_pixels`, read from its header before anything is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as picture:
            width, height = picture.size
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"the image has more than {max_pixels} pixels; give a smaller one") from None
    except UnidentifiedImageError:
        raise ImageError("the image is not in a format PIL reads; give a PNG, JPEG or other common image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageError(f"cannot read the image ({error}); give a PNG, JPEG or other PIL-readable image") from None
    if width * height > max_pixels:
        raise ImageTooLarge(f"the image is {width}x{height}, over the {max_pixels}-pixel limit; give a smaller one")


def split_messages(messages: list[Message], limits: Limits) -> tuple[list[dict], str]:
    """Plain {role, content} messages (text parts joined by newlines) and the one image URL."""
    plain, urls = [], []
    for i, message in enumerate(messages):
        parts = (
            [ContentPart(type="text", text=message.content or "")]
            if not isinstance(message.content, list)
            else message.content
        )
        for part in parts:
            if part.type == "image_url":
                if part.image_url is None:
                    raise ApiError(400, f"messages.{i}: an image_url part needs an image_url", f"messages.{i}")
                if message.role != "user":
                    raise ApiError(400, f"messages.{i}: images go in user messages", f"messages.{i}")
                if part.image_url.url not in urls:
                    urls.append(part.image_url.url)
        text = "\n".join(p.text or "" for p in parts if p.type == "text")
        plain.append({"role": "system" if message.role == "developer" else message.role, "content": text})
    if not urls:
        raise ApiError(400, "the messages hold no image; add an image_url part to a user message", "messages")
    if len(urls) > limits.max_images:
        raise ApiError(400, f"the messages hold {len(urls)} different images; this model takes {limits.max_images} "
                       "per conversation", "messages", "too_many_images")  # fmt: skip
    return plain, urls[0]


# -- the app ------------------------------------------------------------------------------


def create_app(
    model,
    tokenizer,
    *,
    model_id: str = "fastvlm",
    api_key: str | None = None,
    allow_local_files: bool = False,
    limits: Limits = Limits(),
    engine: Engine | None = None,
) -> FastAPI:
    """The FastAPI app serving `model`; its engine starts and stops with the app."""
    engine = engine or Engine(model, tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="fastvlm-mlx", lifespan=lifespan)
    app.state.engine = engine
    recent = app.state.recent_images = RecentImages(max_entries=2 * engine.max_batch)

    @app.exception_handler(ApiError)
    async def on_api_error(_request, error: ApiError):
        return error_response(error.status, error.message, error.param, error.code)

    @app.exception_handler(HTTPException)
    async def on_http_error(_request, error: HTTPException):
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request, error: RequestValidationError):
        bad = _validation_error(error)
        return error_response(400, bad.message, bad.param, bad.code)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key; send Authorization: Bearer KEY", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **engine.load()}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        card = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "fastvlm-mlx"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        received = time.perf_counter()
        authorize(request)
        if engine.full():  # before reading and decoding what would be refused anyway
            raise ApiError(429, "the server is busy; retry later", code="queue_full")
        body = await read_body(request, limits.max_body_bytes)
        chat = parse_request(body)
        if chat.model not in (None, "", model_id):
            raise ApiError(
                400, f"unknown model {chat.model!r}; this server has {model_id!r}", "model", "model_not_found"
            )
        job = await asyncio.to_thread(make_job, engine, chat, limits, allow_local_files, received, recent)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            handle = engine.submit(job, on_event=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        except QueueFull as error:
            raise ApiError(429, f"the server is busy: {error}", code="queue_full") from None
        reply = Reply(model_id, chat, handle, events)
        try:
            first = await reply.next_event(request)
        except ClientGone:
            handle.cancel()
            return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
        except BaseException:
            handle.cancel()
            raise
        if isinstance(first, Failed):
            raise failure(first)
        if chat.stream:
            return StreamingResponse(reply.stream(first), media_type="text/event-stream")
        try:
            return await reply.whole(first, request)
        except ClientGone:
            return Response(status_code=499)
        finally:
            handle.cancel()  # a no-op once finished; frees the slot of a client that went away

    return app


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused (413) past `max_bytes` before it is all read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(
            413, f"the request is {declared} bytes, over the {max_bytes}-byte limit", code="request_too_large"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise ApiError(413, f"the request is over the {max_bytes}-byte limit", code="request_too_large")
    return bytes(body)


def parse_request(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON ({error})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as error:
        raise _validation_error(error) from None


def make_job(
    engine: Engine, chat: ChatRequest, limits: Limits, allow_files: bool, received: float, recent: RecentImages
):
    """Read the image and tokenize the prompt (off the event loop); bad input becomes an ApiError."""
    stop = [chat.stop] if isinstance(chat.stop, str) else (chat.stop or [])
    if len(stop) > limits.max_stop or not all(stop):
        raise ApiError(400, f"stop must be at most {limits.max_stop} non-empty strings", "stop")
    messages, url = split_messages(chat.messages, limits)
    options = chat.fastvlm or FastVLMOptions()
    try:
        picture = request_image(url, limits, allow_files, recent)
    except ImageTooLarge as error:
        raise ApiError(413, str(error), "messages", "image_too_large") from None
    except UserError as error:
        raise ApiError(400, str(error), "messages", "invalid_image") from None
    try:
        return engine.prepare(
            picture,
            messages,
            max_tokens=chat.max_completion_tokens or chat.max_tokens or 256,
            temperature=chat.temperature,
            top_p=chat.top_p,
            seed=chat.seed,
            stop=tuple(stop),
            image_size=options.image_size,
            pruner=options.pruner,
            keep_ratio=options.keep_ratio,
            keep_positions=options.keep_positions,
            timeout_s=limits.timeout_s,
            received=received,
        )
    except (UserError, PrunerError) as error:
        raise ApiError(400, " ".join(str(error).split()), code="invalid_value") from None


def failure(failed: Failed) -> ApiError:
    status = {"invalid_request": 400, "timeout": 504}.get(failed.kind, 500)
    return ApiError(status, failed.message, code=failed.kind)


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


class Reply:
    """One request's answer, from the engine's events: a whole completion or SSE chunks."""

    def __init__(self, model_id: str, chat: ChatRequest, handle, events: asyncio.Queue):
        self.model_id, self.chat, self.handle, self.events = model_id, chat, handle, events
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    async def next_event(self, request: Request | None = None):
        """The next event; a client that went away meanwhile ends the wait (ClientGone)."""
        while True:
            try:
                return await asyncio.wait_for(self.events.get(), timeout=0.5)
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    raise ClientGone from None

    async def whole(self, event, request: Request) -> JSONResponse:
        while isinstance(event, Delta):
            event = await self.next_event(request)
        if isinstance(event, Failed):
            raise failure(event)
        message = {"role": "assistant", "content": event.text}
        choice = {"index": 0, "message": message, "finish_reason": event.finish_reason, "logprobs": None}
        return JSONResponse(self._body("chat.completion", [choice], usage=usage(event), fastvlm=event.timings))

    async def stream(self, event):
        """SSE chunks: the role, text deltas, the finish reason (and timings), usage if asked, [DONE]."""
        try:
            yield self._chunk({"role": "assistant", "content": ""}, None)
            while isinstance(event, Delta):
                if event.text:
                    yield self._chunk({"content": event.text}, None)
                event = await self.next_event()
            if isinstance(event, Failed):
                error = failure(event)
                yield sse({"error": {"message": error.message, "type": ERROR_TYPES[error.status], "param": None,
                                     "code": error.code}})  # fmt: skip
            else:
                yield self._chunk({}, event.finish_reason, fastvlm=event.timings)
                if self.chat.stream_options and self.chat.stream_options.include_usage:
                    yield sse(self._body("chat.completion.chunk", [], usage=usage(event)))
            yield "data: [DONE]\n\n"
        finally:
            self.handle.cancel()  # the client went away mid-stream: its slot is free at the next step

    def _chunk(self, delta: dict, finish_reason: str | None, **extra) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return sse(self._body("chat.completion.chunk", [choice], **extra))

    def _body(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id, "choices": choices,
                **extra}  # fmt: skip


def usage(finished: Finished) -> dict:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, allow_nan=False)}\n\n"


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def serve(
    model: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str | None = None,
    allow_local_files: bool = False,
    max_batch: int = 8,
    max_queue: int = 32,
    vision_slice_s: float = VISION_SLICE_S,
    limits: Limits = Limits(),
) -> None:
    """Load `model` (a folder, checkpoint or repo id; default: the shipped one) and serve it until stopped."""
    import uvicorn

    from fastvlm_mlx.hub import load

    loaded, tokenizer = load(model)
    engine = Engine(loaded, tokenizer, max_batch=max_batch, max_queue=max_queue, vision_slice_s=vision_slice_s)
    model_id = model or "fastvlm-easyvqa"
    app = create_app(loaded, tokenizer, model_id=model_id, api_key=api_key, allow_local_files=allow_local_files,
                     limits=limits, engine=engine)  # fmt: skip
    if not is_loopback(host) and api_key is None:
        print(f"note: serving {host} without --api-key: anyone who can reach it may use it", file=sys.stderr)
    print(f"serving {model_id} on http://{host}:{port}/v1", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning")
