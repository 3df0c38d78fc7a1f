"""The server on a free loopback port, driven by the real `openai` client (and raw HTTP for bad bodies)."""

import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai", reason="needs the dev extra (openai)")
uvicorn = pytest.importorskip("uvicorn", reason="needs the server extra (fastapi, uvicorn)")

from fastvlm_mlx import engine as engine_module  # noqa: E402
from fastvlm_mlx.engine import Engine  # noqa: E402
from fastvlm_mlx.generate import generate  # noqa: E402
from fastvlm_mlx.images import ImageTooLarge  # noqa: E402
from fastvlm_mlx.preprocess import ImageError  # noqa: E402
from fastvlm_mlx.server import Limits, RecentImages, create_app, request_image  # noqa: E402

KEY = "test-key"
MODEL = "easyvqa"
QUESTIONS = ["what color is the shape?", "what shape is in the image?", "is there a circle?"]
LIMITS = Limits(max_image_bytes=100_000, max_image_pixels=256 * 256, timeout_s=60)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def question(url: str, text: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}
    ]


class Server:
    """uvicorn serving `app` on a free 127.0.0.1 port, in a thread."""

    def __init__(self, app):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, key: str = KEY):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=60)

    def post(self, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
        """A raw POST to /v1/chat/completions: (status, JSON body)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        heads = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"} | (headers or {})
        connection.request("POST", "/v1/chat/completions", body=body, headers=heads)
        response = connection.getresponse()
        status, data = response.status, json.loads(response.read())
        connection.close()
        return status, data


@pytest.fixture(scope="module")
def server(easyvqa):
    engine = Engine(*easyvqa, max_batch=4, max_queue=32)
    with Server(create_app(*easyvqa, model_id=MODEL, api_key=KEY, limits=LIMITS, engine=engine)) as running:
        yield running


@pytest.fixture(scope="module")
def expected(easyvqa, pictures):
    """generate's greedy answers, by (picture index, question)."""
    model, tokenizer = easyvqa
    return {(i, q): generate(model, tokenizer, p, q, max_tokens=8) for i, p in enumerate(pictures) for q in QUESTIONS}


def test_answers_equal_generate_whole_and_streamed(server, pictures, expected):
    client = server.client()
    for (i, text), result in expected.items():
        messages = question(data_url(png(pictures[i])), text)
        whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
        assert whole.choices[0].message.content == result.text
        assert whole.choices[0].finish_reason == result.finish_reason
        assert whole.usage.prompt_tokens == result.prompt_tokens
        assert whole.usage.completion_tokens == len(result.token_ids)
        timings = whole.model_extra["fastvlm"]
        assert timings["ttft_s"] > 0 and timings["visual_tokens"]["after"] == result.visual_tokens_after
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True,
                                                     stream_options={"include_usage": True}))  # fmt: skip
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == result.text
        assert chunks[-2].choices[0].finish_reason == result.finish_reason and "fastvlm" in chunks[-2].model_extra
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_models_health_and_a_follow_up_turn(server, easyvqa, pictures):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("GET", "/health")
    assert json.loads(connection.getresponse().read())["status"] == "ok"
    url = data_url(png(pictures[1]))
    first = client.chat.completions.create(model=MODEL, messages=question(url, QUESTIONS[0]), max_tokens=8)
    answer = first.choices[0].message.content
    turns = [
        *question(url, QUESTIONS[0]),
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "is it blue?"},
    ]
    hits = server.app.state.recent_images.hits
    follow = client.chat.completions.create(model=MODEL, messages=turns, max_tokens=8, seed=3)
    assert server.app.state.recent_images.hits == hits + 1  # its picture was not decoded again
    plain = [{"role": "user", "content": QUESTIONS[0]}, turns[1], turns[2]]
    assert follow.choices[0].message.content == generate(*easyvqa, pictures[1], plain, max_tokens=8).text
    assert follow.model_extra["fastvlm"]["reused_positions"] > first.usage.prompt_tokens


def test_32_requests_from_8_threads_and_memory_stays(server, pictures, expected):
    client = server.client()
    cases = [(i % 3, QUESTIONS[(i // 3) % 3], i % 2 == 1) for i in range(32)]

    def run(case):
        index, text, stream = case
        options = dict(model=MODEL, messages=question(data_url(png(pictures[index])), text), max_tokens=8)
        if stream:
            return "".join(
                c.choices[0].delta.content or "" for c in client.chat.completions.create(**options, stream=True)
            )
        return client.chat.completions.create(**options).choices[0].message.content

    def load_run() -> list[str]:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(run, cases))

    load_run()  # warm: every cache filled once
    mx.clear_cache()
    before_mlx, before_rss = mx.get_active_memory(), resident_bytes()
    answers = load_run()
    assert answers == [expected[i, text].text for i, text, _ in cases]
    time.sleep(0.2)
    mx.clear_cache()
    assert mx.get_active_memory() <= 1.1 * before_mlx
    assert resident_bytes() <= 1.1 * before_rss
    assert server.app.state.engine.load()["in_engine"] == 0


def resident_bytes() -> int:
    """This process's resident memory now (not its peak)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bad_requests(pictures) -> list[tuple[str, bytes, int]]:
    """(what, raw body, expected status) for each class of bad input."""
    good = data_url(png(pictures[0]))

    def body(messages=None, **fields) -> bytes:
        return json.dumps(
            {"model": MODEL, "messages": question(good, "what?") if messages is None else messages, **fields}
        ).encode()

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))  # ~120 kB
    huge = Image.new("RGB", (300, 300), "white")
    other = data_url(png(pictures[1]))
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in (good, other)]}]
    return [
        ("malformed JSON", b'{"model": "easyvqa", "messages": [', 400),
        ("JSON not an object", b"[1, 2]", 400),
        ("no messages", body(messages=[]), 400),
        ("bad base64", body(question("data:image/png;base64,@@@not-base64@@@", "what?")), 400),
        ("unreadable image", body(question(data_url(b"this is not a png"), "what?")), 400),
        ("image bytes over the limit", body(question(data_url(png(noise)), "what?")), 413),
        ("image pixels over the limit", body(question(data_url(png(huge)), "what?")), 413),
        ("unknown model", body(model="gpt-4o"), 400),
        ("too many images", body(messages=two), 400),
        ("no image", body(messages=[{"role": "user", "content": "what?"}]), 400),
        ("prompt past the context", body(question(good, "red " * 33000)), 400),
        (
            "temperature NaN",
            body(question(good, "what?")).replace(b'"messages"', b'"temperature": NaN, "messages"'),
            400,
        ),
        ("temperature negative", body(temperature=-1), 400),
        ("top_p out of range", body(top_p=1.5), 400),
        ("max_tokens zero", body(max_tokens=0), 400),
        ("max_tokens negative", body(max_completion_tokens=-5), 400),
        ("seed negative", body(seed=-1), 400),
        ("n > 1", body(n=2), 400),
        ("five stop strings", body(stop=["a", "b", "c", "d", "e"]), 400),
        ("unknown role", body(messages=[{"role": "tool", "content": "x"}]), 400),
        ("unknown pruner", body(fastvlm={"pruner": "nope", "keep_ratio": 0.5}), 400),
        ("keep_ratio 0", body(fastvlm={"pruner": "divprune", "keep_ratio": 0}), 400),
        ("image_size 0", body(fastvlm={"image_size": 0}), 400),
        ("local path not allowed", body(question("/etc/hostname", "what?")), 400),
        ("unreachable image URL", body(question("http://127.0.0.1:9/none.png", "what?")), 400),
    ]


def test_every_bad_input_gets_its_status_and_the_server_stays_up(server, pictures, expected):
    client = server.client()
    for what, raw, status in bad_requests(pictures):
        got, data = server.post(raw)
        assert got == status, (what, data)
        assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["message"], what
        messages = question(data_url(png(pictures[0])), QUESTIONS[0])
        answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
        assert answer.choices[0].message.content == expected[0, QUESTIONS[0]].text, what


def test_a_wrong_or_missing_key_is_401(server):
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").models.list()
    got, data = server.post(b"{}", headers={"Authorization": ""})
    assert got == 401 and data["error"]["type"] == "authentication_error"


@pytest.fixture
def gated(easyvqa, monkeypatch):
    """A one-slot server (one more may wait) whose vision stage waits for `gate`; answers never end of
    themselves (no end-of-sequence id), and requests time out after 1.5 s."""
    gate, real = threading.Event(), engine_module.features_in_pieces

    def waiting(*args, **kwargs):
        gate.wait(30)
        return (yield from real(*args, **kwargs))

    monkeypatch.setattr(engine_module, "features_in_pieces", waiting)
    engine = Engine(*easyvqa, max_batch=1, max_queue=1)
    engine.eos = []
    limits = Limits(timeout_s=1.5)
    with Server(create_app(*easyvqa, model_id=MODEL, limits=limits, engine=engine)) as running:
        running.gate = gate
        yield running
        gate.set()


def wait_for(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_a_full_queue_is_429_and_a_slow_request_504(gated, pictures):
    engine, client = gated.app.state.engine, gated.client()
    messages = question(data_url(png(pictures[0])), "what?")
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(client.chat.completions.create, model=MODEL, messages=messages, max_tokens=3)
                for _ in range(2)]  # fmt: skip
        assert wait_for(lambda: engine.load()["in_engine"] == 2)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
        time.sleep(1.6)  # both pass their 1.5 s while the first is held in the vision stage
        gated.gate.set()
        for future in held:
            with pytest.raises(openai.APIStatusError) as failed:
                future.result()
            assert failed.value.status_code == 504
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 4


def test_a_client_leaving_mid_stream_frees_its_slot(gated, pictures):
    gated.gate.set()
    engine = gated.app.state.engine
    body = {
        "model": MODEL,
        "messages": question(data_url(png(pictures[0])), "what?"),
        "max_tokens": 20000,
        "stream": True,
    }
    connection = http.client.HTTPConnection("127.0.0.1", gated.port, timeout=30)
    connection.request(
        "POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    steps = engine.stats["decode_steps"]
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    assert wait_for(lambda: engine.load()["in_engine"] == 0, 5)
    assert engine.stats["decode_steps"] - steps < 5000  # stopped long before its 20000 tokens


def test_serve_help_imports_no_server_or_mlx():
    code = (
        "import sys\nfrom fastvlm_mlx.cli import main\n"
        "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'mlx.core') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--allow-local-files" in out.stdout and out.stdout.strip().endswith("[]")


def test_the_load_bench_runs_and_writes_json_and_png(tmp_path, shipped_mlx):
    pytest.importorskip("torch", reason="bench.serve_load reuses bench helpers that need the torch extra")
    from click.testing import CliRunner

    from bench import serve_load

    args = ["--model", str(shipped_mlx), "--clients", "1,2,8", "--requests", "2", "--max-tokens", "3", "--rounds", "2"]
    result = CliRunner().invoke(serve_load.main, [*args, "--image-size", "64", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "serve-load-mlx.json").read_text())
    for workload in ("fresh-image", "cached-image"):
        curve = results["workloads"][workload]["curve"]
        assert curve["8"]["completion_tokens"] == 8 * 2 * 3 and curve["1"]["tokens_per_s"] > 0
        assert curve["1"]["decode_steps"] >= 2 * (3 - 1)  # a step per token after each first one, at least
        assert 0 < curve["8"]["decoding_share"] + curve["8"]["prefill_share"] <= 1
        assert [r["completion_tokens"] for r in curve["8"]["rounds"]] == [8 * 2 * 3] * 2  # medians of two rounds
        assert {r["round"] for r in results["workloads"][workload]["requests"]["8"]} == {0, 1}
        assert {"speedup_8_over_1", "ttft_goal_met"} <= set(results["workloads"][workload]["goals"])
    cached = results["workloads"]["cached-image"]  # a burst of 8 in one batch, nothing else running: the floor
    assert cached["burst_prefill_s"]["8"] > 0 and cached["goals"]["burst_prefill_8_s"] == cached["burst_prefill_s"]["8"]
    assert cached["goals"]["ttft_floor_8_over_1"] == cached["burst_prefill_s"]["8"] / cached["curve"]["1"]["ttft_p50_s"]
    assert "burst_prefill_s" not in results["workloads"]["fresh-image"]
    fresh = [r for n in ("1", "2", "8") for r in results["workloads"]["fresh-image"]["requests"][n]]
    assert all(r["server"]["vision_s"] > 0 for r in fresh)  # every image new: none met earlier in any round
    assert (tmp_path / "serve-load-mlx.png").stat().st_size > 0


def test_a_client_leaving_before_its_first_token_frees_its_slot(gated, pictures):
    engine = gated.app.state.engine
    body = {"model": MODEL, "messages": question(data_url(png(pictures[0])), "what?"), "max_tokens": 20000}
    connection = http.client.HTTPConnection("127.0.0.1", gated.port, timeout=30)
    connection.request(
        "POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    assert wait_for(lambda: engine.load()["in_engine"] == 1)
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    time.sleep(1.0)  # the server looks for a gone client twice a second
    gated.gate.set()
    assert wait_for(lambda: engine.load()["in_engine"] == 0, 5)
    assert engine.stats["decode_steps"] < 5000


@pytest.mark.parametrize("pruner", ["divprune", "cdpruner"])  # cdpruner ranks the tokens by the question
def test_pruning_per_request_equals_generate_with_it(server, easyvqa, pictures, pruner):
    prune = {"pruner": pruner, "keep_ratio": 0.5}
    messages = question(data_url(png(pictures[2])), QUESTIONS[1])
    reply = server.client().chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, extra_body={"fastvlm": prune}
    )
    assert reply.choices[0].message.content == generate(*easyvqa, pictures[2], QUESTIONS[1], max_tokens=8, **prune).text
    assert reply.model_extra["fastvlm"]["visual_tokens"] == {"before": 64, "after": 32}
    kept = server.client().chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, extra_body={"fastvlm": {**prune, "keep_positions": True}}
    )
    alone = generate(*easyvqa, pictures[2], QUESTIONS[1], max_tokens=8, keep_positions=True, **prune)
    assert kept.choices[0].message.content == alone.text


def test_kept_positions_answer_as_generate_per_request_and_by_the_models_default(tiny_mlx, image_path, tmp_path):
    """Pruned tokens keeping their places (GAP) run outside the batch, as generate runs them, beside
    batched requests; a conversion whose default keeps them is served so too, not packed. The tiny
    random model's answers tell the two apart."""
    import shutil

    from fastvlm_mlx import load

    folder = tmp_path / "gap"
    shutil.copytree(tiny_mlx, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps(config | dict(pruner="divprune", keep_ratio=0.5, keep_positions=True))
    )
    model, tokenizer = load(str(folder))
    picture, text = Image.open(image_path).convert("RGB"), "what color is the shape?"
    want = {
        name: generate(model, tokenizer, picture, text, max_tokens=12, **options).text
        for name, options in [("gap", {}), ("packed", dict(keep_positions=False)), ("all", dict(pruner="none"))]
    }
    assert want["gap"] != want["packed"]  # else this test could not fail
    limits = Limits(max_image_bytes=10_000_000, max_image_pixels=10_000_000, timeout_s=120)
    app = create_app(model, tokenizer, model_id="gap", limits=limits, engine=Engine(model, tokenizer, max_batch=4))
    asks = [None, {"keep_positions": False}, {"pruner": "none"}, None, {"keep_positions": True}, None]
    with Server(app) as served:
        client = served.client()

        def ask(options):
            body = None if options is None else {"fastvlm": options}
            messages = question(data_url(png(picture)), text)
            reply = client.chat.completions.create(model="gap", messages=messages, max_tokens=12, extra_body=body)
            return reply.choices[0].message.content

        with ThreadPoolExecutor(len(asks)) as pool:
            got = list(pool.map(ask, asks))
    assert got == [want["gap"], want["packed"], want["all"], want["gap"], want["gap"], want["gap"]]


def test_a_body_over_the_limit_is_413_declared_or_streamed(easyvqa, pictures, expected):
    limits = Limits(max_body_bytes=50_000, max_image_bytes=100_000, max_image_pixels=256 * 256, timeout_s=60)
    with Server(create_app(*easyvqa, model_id=MODEL, limits=limits, engine=Engine(*easyvqa))) as small:
        big = json.dumps({"messages": question("data:image/png;base64," + "A" * 60_000, "what?")}).encode()
        status, data = small.post(big)  # its Content-Length says so: refused before the body is read
        assert status == 413 and data["error"]["code"] == "request_too_large"
        connection = http.client.HTTPConnection("127.0.0.1", small.port, timeout=60)  # chunked: no length
        pieces = (big[i : i + 8192] for i in range(0, len(big), 8192))
        heads = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
        connection.request("POST", "/v1/chat/completions", body=pieces, headers=heads, encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
        connection.close()
        messages = question(data_url(png(pictures[0])), QUESTIONS[0])
        answer = small.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
        assert answer.choices[0].message.content == expected[0, QUESTIONS[0]].text


def test_local_files_only_when_allowed(easyvqa, pictures, tmp_path, expected):
    (tmp_path / "shape.png").write_bytes(png(pictures[0]))
    noise = np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "big.png")
    app = create_app(*easyvqa, model_id=MODEL, allow_local_files=True, limits=LIMITS, engine=Engine(*easyvqa))
    with Server(app) as local:
        reply = local.client().chat.completions.create(
            model=MODEL, messages=question(str(tmp_path / "shape.png"), QUESTIONS[0]), max_tokens=8
        )
        assert reply.choices[0].message.content == expected[0, QUESTIONS[0]].text
        for name, status in (("big.png", 413), ("missing.png", 400)):
            got, _ = local.post(json.dumps({"messages": question(str(tmp_path / name), "what?")}).encode())
            assert got == status, name


def test_a_picture_sent_again_is_read_once_and_a_rewritten_file_anew(pictures, tmp_path):
    recent = RecentImages()
    url = data_url(png(pictures[0]))
    first = request_image(url, LIMITS, False, recent)
    assert request_image(url, LIMITS, False, recent) is first and (recent.hits, recent.misses) == (1, 1)
    path = tmp_path / "shape.png"  # a file (or an http URL) is known by its bytes, not its name
    path.write_bytes(png(pictures[1]))
    assert np.array_equal(np.asarray(request_image(str(path), LIMITS, True, recent)), np.asarray(pictures[1]))
    path.write_bytes(png(pictures[2]))
    assert np.array_equal(np.asarray(request_image(str(path), LIMITS, True, recent)), np.asarray(pictures[2]))
    path.write_bytes(png(pictures[0]))  # the same bytes as the data: URL's picture, another kind of key
    assert request_image(str(path), LIMITS, True, recent) is not first
    for _ in range(2):  # a bad picture is refused every time, never kept
        with pytest.raises(ImageError):
            request_image(data_url(b"not an image"), LIMITS, False, recent)
    big = data_url(png(Image.new("RGB", (300, 300))))  # over LIMITS' pixels: still 413's error, every time
    for _ in range(2):
        with pytest.raises(ImageTooLarge):
            request_image(big, LIMITS, False, recent)
    one = pictures[0].width * pictures[0].height * 3
    few = RecentImages(max_entries=2, max_bytes=2 * one)
    for picture in pictures:
        request_image(data_url(png(picture)), LIMITS, False, few)
    request_image(data_url(png(pictures[0])), LIMITS, False, few)  # the oldest went out
    assert (few.hits, few.misses) == (0, 4)
    request_image(data_url(png(pictures[0])), LIMITS, False, few)
    assert few.hits == 1
    none = RecentImages(max_bytes=one - 1)  # a picture bigger than the whole budget is not kept
    for _ in range(2):
        request_image(url, LIMITS, False, none)
    assert (none.hits, none.misses) == (0, 2)
