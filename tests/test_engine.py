"""The batching engine without HTTP: batched answers equal `generate`'s, caches, limits, cancel, timeout."""

import threading
import time

import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from PIL import Image

from fastvlm_mlx.engine import Delta, Engine, Failed, Finished, QueueFull
from fastvlm_mlx.errors import UserError
from fastvlm_mlx.generate import generate
from fastvlm_mlx.images import read_image

QUESTIONS = ["what color is the shape?", "what shape is in the image?", "is there a circle?"]


@pytest.fixture(scope="module")
def engine(easyvqa):
    with Engine(*easyvqa, max_batch=4, max_queue=16) as running:
        yield running


def ask(engine: Engine, picture, messages, **options) -> list:
    """Every event of one request."""
    return list(engine.submit(engine.prepare(read_image(picture), messages, **options)))


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_batched_greedy_answers_equal_generate(easyvqa, engine, pictures):
    model, tokenizer = easyvqa
    cases = [(p, q) for p in pictures for q in QUESTIONS]
    handles = [engine.submit(engine.prepare(p, user(q), max_tokens=8)) for p, q in cases]  # all at once
    for (picture, question), handle in zip(cases, handles, strict=True):
        events = list(handle)
        done = events[-1]
        expected = generate(model, tokenizer, picture, question, max_tokens=8)
        assert isinstance(done, Finished) and done.text == expected.text
        assert "".join(e.text for e in events[:-1]) == done.text
        assert done.completion_tokens == len(expected.token_ids) and done.prompt_tokens == expected.prompt_tokens
        assert done.finish_reason == expected.finish_reason


def test_answers_done_at_their_first_token_leave_nothing_behind(easyvqa, pictures):
    """The engine samples the first token itself; one-token answers never reach the batch generator."""
    model, tokenizer = easyvqa
    cases = [(p, q) for p in pictures for q in QUESTIONS]
    with Engine(model, tokenizer, max_batch=4) as fresh:  # its prompt cache holds only what this test puts there
        handles = [fresh.submit(fresh.prepare(p, user(q), max_tokens=1)) for p, q in cases]
        for (picture, question), handle in zip(cases, handles, strict=True):
            done = list(handle)[-1]
            expected = generate(model, tokenizer, picture, question, max_tokens=1)
            assert isinstance(done, Finished) and (done.text, done.finish_reason) == (expected.text, "length")
            assert done.completion_tokens == 1
        assert fresh.load()["in_engine"] == 0  # every slot freed
        again = list(fresh.submit(fresh.prepare(pictures[0], user(QUESTIONS[0]), max_tokens=1)))[-1]
        assert again.timings["reused_positions"] > 0  # the one-token answer's cache went to the prompt cache


def test_follow_up_prefills_only_its_own_tokens(easyvqa, engine, pictures):
    model, tokenizer = easyvqa
    first = ask(engine, pictures[0], user(QUESTIONS[0]), max_tokens=8)[-1]
    conversation = [*user(QUESTIONS[0]), {"role": "assistant", "content": first.text}, *user(QUESTIONS[1])]
    follow = ask(engine, pictures[0], conversation, max_tokens=8)[-1]
    assert follow.text == generate(model, tokenizer, pictures[0], conversation, max_tokens=8).text
    assert follow.timings["vision_cached"] and follow.timings["reused_positions"] > first.prompt_tokens
    assert follow.timings["prefilled_positions"] < 20  # the new user turn and the assistant header


def test_a_burst_of_cached_turns_prefills_as_one_batch_with_generates_answers(easyvqa, pictures, monkeypatch):
    """Turns whose image is cached arriving together are prefilled in one batch over their caches of
    different lengths (left-padded) and their last chunks of different lengths (right-padded); each
    answer is still generate's, and each one's KV cache is what its prompt prefilled alone gives."""
    model, tokenizer = easyvqa
    handed = []  # (slot, its cache) as each prefilled prompt goes to decoding
    real_hand_over = Engine._hand_over
    monkeypatch.setattr(
        Engine,
        "_hand_over",
        lambda self, slot, token, cache: (handed.append((slot, cache)), real_hand_over(self, slot, token, cache)),
    )
    first = {p: generate(model, tokenizer, pictures[p], QUESTIONS[0], max_tokens=8).text for p in (0, 1)}
    burst = [
        (0, [*user(QUESTIONS[0]), {"role": "assistant", "content": first[0]}, *user(QUESTIONS[1])]),
        (1, [*user(QUESTIONS[0]), {"role": "assistant", "content": first[1]}, *user(QUESTIONS[2] + " is it?")]),
        (0, user(QUESTIONS[2])),
        (1, user(QUESTIONS[1])),
    ]
    release = threading.Event()
    with Engine(model, tokenizer, max_batch=5) as fresh:
        for p in (0, 1):  # their images and first turns into the caches
            assert ask(fresh, pictures[p], user(QUESTIONS[0]), max_tokens=8)[-1].text == first[p]
        # A long answer whose first event holds the worker while the burst is queued, so it arrives at once.
        fresh.submit(fresh.prepare(pictures[2], user("what?"), max_tokens=4), on_event=lambda e: release.wait(30))
        handles = [fresh.submit(fresh.prepare(pictures[p], messages, max_tokens=8)) for p, messages in burst]
        release.set()
        for (p, messages), handle in zip(burst, handles, strict=True):
            done = list(handle)[-1]
            expected = generate(model, tokenizer, pictures[p], messages, max_tokens=8)
            assert isinstance(done, Finished) and done.text == expected.text, messages
            assert done.finish_reason == expected.finish_reason and done.timings["vision_cached"]
        assert fresh.stats["largest_prefill_batch"] == len(burst)
        assert fresh.load()["in_engine"] == 0
    lengths = {len(slot.positions) for slot, _ in handed[-len(burst) :]}
    assert len(lengths) == len(burst)  # every cache and last chunk differs in length: the padding is exercised
    for slot, cache in handed[-len(burst) :]:
        prompt = slot.job.prompt
        alone = make_prompt_cache(model.language_model)
        model.language_model(
            None, cache=alone, input_embeddings=model.splice(prompt.ids_before, slot.features.embeds, prompt.ids_after)
        )
        for mine, theirs in zip(cache, alone, strict=True):
            assert mine.offset == theirs.offset == len(slot.positions)
            for got, want in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                n = len(slot.positions)
                np.testing.assert_allclose(np.array(got[..., :n, :]), np.array(want[..., :n, :]), rtol=1e-4, atol=1e-5)


def test_stop_strings_cut_the_answer_and_hold_back_text(engine, pictures):
    free = ask(engine, pictures[0], user(QUESTIONS[0]), max_tokens=8)[-1].text
    events = ask(engine, pictures[0], user(QUESTIONS[0]), max_tokens=8, stop=(free[1:3],))
    assert events[-1].text == free[:1] and events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events[:-1]) == free[:1]


def test_seeded_sampling_does_not_depend_on_the_batch(engine, pictures):
    options = dict(max_tokens=6, temperature=1.5, seed=7)
    alone = ask(engine, pictures[1], user(QUESTIONS[1]), **options)[-1].text
    crowd = [
        engine.submit(engine.prepare(p, user(q), max_tokens=6, temperature=1.0)) for p in pictures for q in QUESTIONS
    ]
    seeded = engine.submit(engine.prepare(pictures[1], user(QUESTIONS[1]), **options))
    assert list(seeded)[-1].text == alone
    assert all(isinstance(list(h)[-1], Finished) for h in crowd)


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=float("nan")),
        dict(top_p=1.5),
        dict(max_tokens=0),
        dict(seed=-1),
        dict(pruner="nope"),
        dict(keep_positions="yes", pruner="divprune", keep_ratio=0.5),
    ],  # fmt: skip
)
def test_bad_options_are_user_errors(engine, pictures, options):
    with pytest.raises(UserError):
        engine.prepare(pictures[0], user("what?"), **options)


def test_a_full_engine_refuses_more(easyvqa, pictures):
    engine = Engine(*easyvqa, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    job = engine.prepare(pictures[0], user("what?"), max_tokens=2)
    for _ in range(3):
        engine.submit(job)
    with pytest.raises(QueueFull):
        engine.submit(job)


@pytest.fixture
def endless(easyvqa):
    """An engine whose answers never end of themselves (no end-of-sequence id): they run to max_tokens."""
    engine = Engine(*easyvqa, max_batch=2, max_queue=2)
    engine.eos = []
    with engine:
        yield engine


def test_cancel_frees_the_slot_at_once(endless, pictures):
    handle = endless.submit(endless.prepare(pictures[0], user("what?"), max_tokens=20000))
    assert isinstance(handle.events.get(timeout=30), Delta)
    handle.cancel()
    deadline = time.monotonic() + 5
    while endless.load()["in_engine"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert endless.load()["in_engine"] == 0 and endless.stats["decode_steps"] < 20000
    assert all(isinstance(e, Delta) for e in list(handle.events.queue))  # no Finished after a cancel
    again = ask(endless, pictures[0], user("what?"), max_tokens=5)
    assert again[-1].finish_reason == "length" and again[-1].completion_tokens == 5


def test_a_request_past_its_time_fails(endless, pictures):
    events = ask(endless, pictures[0], user("what?"), max_tokens=20000, timeout_s=0.3)
    assert isinstance(events[-1], Failed) and events[-1].kind == "timeout"
    assert endless.load()["in_engine"] == 0


def test_events_go_to_a_callback_on_the_worker(engine, pictures):
    seen, done = [], threading.Event()

    def on_event(event):
        seen.append(threading.current_thread().name)
        if not isinstance(event, Delta):
            done.set()

    engine.submit(engine.prepare(pictures[0], user("what?"), max_tokens=3), on_event=on_event)
    assert done.wait(30) and set(seen) == {"fastvlm-engine"}


def test_a_bug_while_decoding_fails_the_requests_in_flight_and_the_engine_goes_on(easyvqa, pictures, monkeypatch):
    from mlx_lm.generate import BatchGenerator

    real, calls = BatchGenerator.next, []

    def broken_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return real(self)

    monkeypatch.setattr(BatchGenerator, "next", broken_once)
    with Engine(*easyvqa) as engine:
        failed = ask(engine, pictures[0], user("what?"), max_tokens=3)[-1]
        assert isinstance(failed, Failed) and failed.kind == "server"
        assert isinstance(ask(engine, pictures[0], user("what?"), max_tokens=3)[-1], Finished)
        assert engine.load()["in_engine"] == 0


def test_a_system_message_is_honoured_as_generate_does(easyvqa, engine, pictures):
    messages = [{"role": "system", "content": "You answer with one word."}, *user(QUESTIONS[1])]
    done = ask(engine, pictures[1], messages, max_tokens=8)[-1]
    expected = generate(*easyvqa, pictures[1], messages, max_tokens=8)
    assert done.text == expected.text and done.prompt_tokens == expected.prompt_tokens


def test_as_many_clients_as_slots_each_keep_their_image_cached(easyvqa):
    """Every slot's conversation keeps its vision features: at 16 clients with 8 vision entries, each
    request used to find its prompt cached and run the vision tower again anyway."""
    pictures = [Image.new("RGB", (64, 64), (20 * n, 30, 250 - 20 * n)) for n in range(12)]
    with Engine(*easyvqa, max_batch=12, max_queue=24) as running:
        for _ in range(2):
            for picture in pictures:
                assert isinstance(ask(running, picture, user(QUESTIONS[0]), max_tokens=2)[-1], Finished)
        assert running.vision_cache.hits >= len(pictures)  # the second round found every image


def test_a_new_image_is_encoded_between_decode_steps(easyvqa, endless, pictures, monkeypatch):
    """While one answer decodes, a new image's tower runs a block at a time between decode steps
    (vision_slice_s 0: one piece per slice), so the answer in flight never waits for a whole tower."""
    from fastvlm_mlx import engine as engine_module
    from fastvlm_mlx.features import features_in_pieces

    seen = []  # decode steps so far, at each piece of the new image's tower

    def watched(*args, **kwargs):
        steps = features_in_pieces(*args, **kwargs)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value
            seen.append(endless.stats["decode_steps"])
            yield

    model, tokenizer = easyvqa
    pieces = 1 + sum(max(1, n) for n in model.config.vision.layers) + 1  # the stem, every block, the final conv
    monkeypatch.setattr(endless, "vision_slice_s", 0.0)
    monkeypatch.setattr(engine_module, "features_in_pieces", watched)
    flowing = endless.submit(endless.prepare(pictures[0], user("what?"), max_tokens=20000))
    assert isinstance(flowing.events.get(timeout=30), Delta)
    assert len(seen) == pieces and set(seen) == {0}  # its own image: nobody decoding yet, the whole tower at once
    seen.clear()
    fresh = pictures[1].copy()
    fresh.putpixel((0, 0), (1, 2, 3))  # never seen: the tower runs
    answer = ask(endless, fresh, user(QUESTIONS[0]), max_tokens=8)[-1]
    flowing.cancel()
    assert answer.text.startswith(generate(model, tokenizer, fresh, QUESTIONS[0], max_tokens=8).text)  # no eos here
    assert len(seen) == pieces
    assert all(later > earlier for earlier, later in zip(seen, seen[1:], strict=False)), seen


@pytest.mark.parametrize("seconds", [float("nan"), -1.0, "0.25", None])
def test_a_bad_vision_slice_is_a_user_error(easyvqa, seconds):
    with pytest.raises(UserError, match="vision_slice_s"):
        Engine(*easyvqa, vision_slice_s=seconds)


def test_drain_answers_on_the_callers_thread_and_only_an_engine_not_started(easyvqa, engine, pictures):
    model, tokenizer = easyvqa
    idle = Engine(model, tokenizer, max_batch=4)
    for picture in pictures:  # the vision stages first, one a turn; then the follow-ups share one turn
        idle.submit(idle.prepare(picture, user(QUESTIONS[0]), max_tokens=1))
    idle.drain()
    batches = idle.stats["prefill_batches"]
    handles = [idle.submit(idle.prepare(p, user(QUESTIONS[1]), max_tokens=8)) for p in pictures]
    idle.drain()
    assert idle.stats["prefill_batches"] == batches + 1 and idle.stats["largest_prefill_batch"] == len(pictures)
    for picture, handle in zip(pictures, handles, strict=True):
        done, expected = list(handle)[-1], generate(model, tokenizer, picture, QUESTIONS[1], max_tokens=8)
        assert isinstance(done, Finished) and done.text == expected.text
    with pytest.raises(RuntimeError, match="not started"):
        engine.drain()
