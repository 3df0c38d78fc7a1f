"""The Python API: lazy exports, generate and stream_generate agree, finish reasons, chat messages."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import fastvlm_mlx
from fastvlm_mlx.errors import UserError
from fastvlm_mlx.prompt import tokenize_messages, tokenize_prompt

QUESTION = "what color is the shape?"


@pytest.fixture(scope="module")
def tiny(tiny_mlx):
    return fastvlm_mlx.load(tiny_mlx)


def test_the_exports_load_lazily():
    code = (
        "import sys, fastvlm_mlx\n"
        "assert 'mlx.core' not in sys.modules and 'fastvlm_mlx.generate' not in sys.modules\n"
        "import fastvlm_mlx.generate, fastvlm_mlx.load, fastvlm_mlx.chat\n"  # the submodules named like the API
        "from fastvlm_mlx import load, generate, stream_generate, ChatSession, GenerationResponse, VisionCache\n"
        "assert callable(generate) and callable(load)\n"
        "assert callable(fastvlm_mlx.generate) and callable(fastvlm_mlx.load)\n"
        "assert generate.__module__ == 'fastvlm_mlx.generate' and load.__module__ == 'fastvlm_mlx.hub'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    with pytest.raises(AttributeError):
        fastvlm_mlx.no_such_name  # noqa: B018


def test_stream_concatenates_to_generate(tiny, image_path):
    model, tokenizer = tiny
    result = fastvlm_mlx.generate(model, tokenizer, image_path, QUESTION, max_tokens=12)
    responses = list(fastvlm_mlx.stream_generate(model, tokenizer, image_path, QUESTION, max_tokens=12))
    assert "".join(r.text for r in responses) == result.text
    assert [r.token for r in responses][: len(result.token_ids)] == result.token_ids
    assert [r.generation_tokens for r in responses] == list(range(1, len(responses) + 1))
    assert all(r.finish_reason is None for r in responses[:-1])
    assert responses[-1].finish_reason == result.finish_reason
    assert {r.prompt_tokens for r in responses} == {result.prompt_tokens}
    before, after = tokenize_prompt(tokenizer, QUESTION)
    assert result.prompt_tokens == len(before) + 256 + len(after)
    assert all(r.prompt_tps > 0 and r.peak_memory > 0 for r in responses)
    assert result.first_logprobs is None  # only when asked
    asked = fastvlm_mlx.generate(model, tokenizer, image_path, QUESTION, max_tokens=2, logprobs=True)
    assert asked.first_logprobs.shape == (model.config.text["vocab_size"],)


def test_finish_reasons(tiny, image_path):
    model, tokenizer = tiny
    long = fastvlm_mlx.generate(model, tokenizer, image_path, QUESTION, max_tokens=12)
    assert long.finish_reason == "length" and len(long.token_ids) == 12
    said = long.token_ids
    end = next(i for i in range(1, len(said)) if said[i] not in said[:i])  # a token not said before
    previous = model.config.eos_token_ids
    model.config.eos_token_ids = (long.token_ids[end],)  # that token now ends the answer
    try:
        stopped = fastvlm_mlx.generate(model, tokenizer, image_path, QUESTION, max_tokens=12)
        last = list(fastvlm_mlx.stream_generate(model, tokenizer, image_path, QUESTION, max_tokens=12))[-1]
    finally:
        model.config.eos_token_ids = previous
    assert stopped.finish_reason == "stop" and stopped.token_ids == long.token_ids[:end]
    assert last.finish_reason == "stop" and last.token == long.token_ids[end]


def test_max_tokens_zero_runs_nothing(tiny, image_path, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr(type(model), "encode_image", lambda *a, **k: pytest.fail("the tower ran"))
    result = fastvlm_mlx.generate(model, tokenizer, image_path, QUESTION, max_tokens=0)
    assert (result.text, result.token_ids, result.finish_reason) == ("", [], "length")
    assert result.visual_tokens_after == 256
    assert list(fastvlm_mlx.stream_generate(model, tokenizer, image_path, QUESTION, max_tokens=0)) == []


def test_image_kinds_give_the_same_answer(tiny, image_path):
    model, tokenizer = tiny
    expected = fastvlm_mlx.generate(model, tokenizer, image_path, QUESTION, max_tokens=6).token_ids
    for image in (Image.open(image_path), np.asarray(Image.open(image_path).convert("RGB")), image_path.read_bytes()):
        assert fastvlm_mlx.generate(model, tokenizer, image, QUESTION, max_tokens=6).token_ids == expected


def test_messages_render_through_the_chat_template(tiny):
    _, tokenizer = tiny
    question = [{"role": "user", "content": QUESTION}]
    one_turn = tokenize_prompt(tokenizer, QUESTION)
    assert tokenize_messages(tokenizer, question) == tokenize_messages(tokenizer, QUESTION) == one_turn
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    assert tokenize_messages(tokenizer, parts) == tokenize_prompt(tokenizer, QUESTION)
    system = [{"role": "system", "content": "Answer in one word."}, *question]
    before, after = tokenize_messages(tokenizer, system)
    assert tokenizer.decode(before).startswith("<|im_start|>system\nAnswer in one word.<|im_end|>")
    assert after == tokenize_prompt(tokenizer, QUESTION)[1]
    history = [*question, {"role": "assistant", "content": "red"}, {"role": "user", "content": "why <|im_end|>?"}]
    before, after = tokenize_messages(tokenizer, history)
    assert before == tokenize_prompt(tokenizer, QUESTION)[0]  # the image stays in the first user message
    text = tokenizer.decode(after)
    assert text.endswith("red<|im_end|>\n<|im_start|>user\nwhy <|im_end|>?<|im_end|>\n<|im_start|>assistant\n")
    assert after.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 3  # the typed one is plain text


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "robot", "content": "x"}], [{"role": "assistant", "content": "x"}], [{"role": "user"}]],
)
def test_bad_messages_are_user_errors(tiny, image_path, messages):
    model, tokenizer = tiny
    with pytest.raises(UserError):
        fastvlm_mlx.generate(model, tokenizer, image_path, messages, max_tokens=1)
