"""Chat sessions: the KV cache changes nothing but the work done; the vision cache skips the tower."""

import json

import pytest
from click.testing import CliRunner

import fastvlm_mlx
from fastvlm_mlx import generate as generation
from fastvlm_mlx.chat import ChatSession
from fastvlm_mlx.cli import main
from fastvlm_mlx.features import VisionCache, VisionSettings, feature_key
from fastvlm_mlx.generate import Turn
from fastvlm_mlx.images import read_image

QUESTIONS = ["what color is the shape?", "is there a blue circle?", "how many shapes are there?"]
gen_module = __import__("sys").modules["fastvlm_mlx.generate"]


@pytest.fixture(scope="module")
def tiny(tiny_mlx):
    return fastvlm_mlx.load(tiny_mlx)


@pytest.fixture
def prefills(monkeypatch):
    """The number of positions each prefill runs."""
    lengths, steps = [], gen_module._token_steps

    def spy(model, embeds, *args):
        lengths.append(embeds.shape[1])
        return steps(model, embeds, *args)

    monkeypatch.setattr(gen_module, "_token_steps", spy)
    return lengths


@pytest.fixture
def encodes(monkeypatch, tiny):
    """How often the vision tower runs."""
    calls, encode = [], type(tiny[0]).encode_image

    def spy(self, *args, **kwargs):
        calls.append(1)
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny[0]), "encode_image", spy)
    return calls


def fresh_answer(model, tokenizer, prompt, max_tokens: int):
    """The answer to the same prompt ids without any KV cache."""
    turn = Turn(model, tokenizer, prompt, max_tokens=max_tokens)
    for _ in turn:
        pass
    return turn.result()


def test_cached_turns_answer_as_a_fresh_run_and_prefill_only_their_own_tokens(tiny, image_path, prefills):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer, image_path, vision_cache=VisionCache())
    first, previous = generation(model, tokenizer, image_path, QUESTIONS[0], max_tokens=10), None
    for turn, question in enumerate(QUESTIONS, 1):
        prompt, _ = session.prompt_for(question)
        fresh = fresh_answer(model, tokenizer, prompt, 10)
        held = len(session.cached)
        answer = session.ask(question, max_tokens=10)
        assert answer.token_ids == fresh.token_ids, turn
        assert answer.text == fresh.text and session.messages[-1] == {"role": "assistant", "content": answer.text}
        assert answer.prompt_tokens == fresh.prompt_tokens == prefills[-2]
        if turn == 1:
            assert answer.token_ids == first.token_ids  # a chat's first turn is generate's answer
        else:  # the whole cache is reused: only the new user message is prefilled (and the last
            # answer's last token when it was not fed)
            assert held >= previous.prompt_tokens + len(previous.token_ids) - 1
            assert prefills[-1] == answer.prompt_tokens - held
            assert len(tokenizer.encode(question)) < prefills[-1] < 40
            assert answer.timings.vision_s == 0
        previous = answer
    assert session.turns == 3


def test_a_message_list_reuses_the_matching_prefix(tiny, image_path, prefills):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer, image_path, vision_cache=VisionCache())
    session.ask(QUESTIONS[0], max_tokens=6)
    conversation = [*session.messages, {"role": "user", "content": QUESTIONS[1]}]  # as a server client sends it
    fresh = fresh_answer(model, tokenizer, session.prompt_for(conversation)[0], 6)
    answer = session.ask(conversation, max_tokens=6)
    assert answer.token_ids == fresh.token_ids
    assert prefills[-1] < 40  # the new message only
    edited = [{"role": "user", "content": QUESTIONS[2]}]  # another first question: prefilled from the image on
    redo = session.ask(edited, max_tokens=6)
    assert redo.token_ids == generation(model, tokenizer, image_path, edited, max_tokens=6).token_ids
    assert session.messages[:-1] == edited


def test_the_same_image_in_a_new_conversation_skips_the_tower(tiny, image_path, encodes):
    model, tokenizer = tiny
    cache = VisionCache()
    first = ChatSession(model, tokenizer, image_path, vision_cache=cache).ask(QUESTIONS[0], max_tokens=4)
    assert len(encodes) == 1
    again = ChatSession(model, tokenizer, read_image(image_path), vision_cache=cache)  # same pixels, other kind
    second = again.ask(QUESTIONS[0], max_tokens=4)
    again.reset()
    again.ask(QUESTIONS[1], max_tokens=4)
    assert len(encodes) == 1 and cache.hits == 2
    assert second.token_ids == first.token_ids and second.timings.vision_s == 0
    ChatSession(model, tokenizer, image_path, vision_cache=cache, pruner="norm", keep_ratio=0.5).ask("hi", max_tokens=1)
    assert len(encodes) == 2  # other pruning, other features


def test_sessions_of_one_model_share_its_vision_cache(tiny, image_path, encodes):
    model, tokenizer = tiny
    ChatSession(model, tokenizer, image_path, image_size=128).ask("hi", max_tokens=1)
    ChatSession(model, tokenizer, image_path, image_size=128).ask("hi", max_tokens=1)
    assert len(encodes) == 1


def test_every_vision_setting_is_in_the_cache_key(tiny, image_path):
    config, picture = tiny[0].config, read_image(image_path)
    base = dict(image_size=128, pruner="random", keep_ratio=0.5, seed=1)
    changes = [dict(image_size=192), dict(pruner="norm"), dict(keep_ratio=0.25), dict(seed=2)]
    changes.append(dict(pruner="none", keep_ratio=None))
    keys = {feature_key(config, picture, VisionSettings.resolve(config, **{**base, **c})) for c in [{}, *changes]}
    assert len(keys) == len(changes) + 1
    other = read_image(picture.transpose(0))
    assert feature_key(config, other, VisionSettings.resolve(config, **base)) not in keys


def test_lru_keeps_the_most_recent(tiny, image_path):
    cache = VisionCache(max_entries=2)
    model, tokenizer = tiny
    for size in (64, 128, 64, 192):
        ChatSession(model, tokenizer, image_path, image_size=size, vision_cache=cache).ask("hi", max_tokens=1)
    assert len(cache) == 2 and (cache.hits, cache.misses) == (1, 3)
    assert {key[1] for key in cache._entries} == {64, 192}


def test_cli_chat_json(tiny_mlx, image_path, tmp_path):
    other = tmp_path / "flipped.png"
    read_image(image_path).transpose(0).save(other)
    lines = [QUESTIONS[0], QUESTIONS[1], "/reset", QUESTIONS[0], f"/image {other}", "", QUESTIONS[0], "/quit", "never"]
    args = ["chat", "--model", str(tiny_mlx), "--image", str(image_path), "--max-tokens", "5", "--json"]
    result = CliRunner().invoke(main, args, input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["turn"] for a in answers] == [1, 2, 1, 1]
    assert set(answers[0]) == {"text", "token_ids", "visual_tokens", "timings", "peak_memory_gb", "turn"}
    assert answers[2]["token_ids"] == answers[0]["token_ids"]  # /reset: the same first turn again
    assert answers[1]["timings"]["vision_s"] == 0 and answers[2]["timings"]["vision_s"] == 0
    assert answers[3]["timings"]["vision_s"] > 0  # a new image runs the tower
    model, tokenizer = fastvlm_mlx.load(tiny_mlx)
    expected = generation(model, tokenizer, image_path, QUESTIONS[0], max_tokens=5)
    assert answers[0]["token_ids"] == expected.token_ids


def test_cli_chat_streams_answers_only_and_survives_bad_lines(tiny_mlx, image_path):
    lines = [QUESTIONS[0], "/image nowhere.png", "/frobnicate", QUESTIONS[1]]
    args = ["chat", "--model", str(tiny_mlx), "--image", str(image_path), "--max-tokens", "5"]
    result = CliRunner().invoke(main, args, input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 2  # one line per answer, nothing else
    assert "image not found: nowhere.png" in result.stderr and "unknown command" in result.stderr
    json_mode = CliRunner().invoke(main, [*args, "--json"], input="/image nowhere.png\nhi\n")
    first = json.loads(json_mode.stdout.splitlines()[0])
    assert "image not found" in first["error"] and first["turn"] == 1
