"""The batching engine: one worker thread owns MLX and answers every request of one model.

Decoding is mlx-lm's `BatchGenerator` (continuous batching: `BatchKVCache` merge, extend and
filter, per-request samplers, max_tokens and end-of-sequence handling). It takes token prompts
only, and ours are input embeddings with the image spliced in, so the engine prefills each
prompt itself, in chunks between decode steps (a long prompt never stalls the others for more
than one chunk), samples the first token from the last position's logits and inserts that token
with the prompt's cache. Last chunks that fit in one turn together are prefilled as one batch
(their caches merged, as the generator prefills), so a burst of follow-up turns gets its first
tokens in one turn, not one a turn. The vision tower of a new image runs between decode steps
too, in slices of its blocks (`vision_slice_s`) while others decode. Finished requests leave
their caches in mlx-lm's `LRUPromptCache`, keyed by the image's feature key and the prompt's
positions, so a follow-up turn prefills only what it adds; the vision stage goes through a
`VisionCache`.

Pruned tokens that keep their unpruned positions (`keep_positions`, GAP) ride on a sequence's own
KV cache, which the batch cache does not carry: such requests are answered one at a time, a token
per turn of the loop between the batch's steps, by the single-sequence `Turn` that `generate` uses
(so their answers are generate's), without the prompt cache.

Callers build a `Job` (`Engine.prepare`, on their own thread: tokenization, context check),
`submit` it and read `Delta` events, then one `Finished` or `Failed`, from its `Handle`.
"""

import queue
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, generation_stream
from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import apply_top_p, greedy_sampler
from PIL import Image

from fastvlm_mlx.errors import UserError
from fastvlm_mlx.features import ImageFeatures, VisionCache, VisionSettings, features_in_pieces, image_features
from fastvlm_mlx.generate import (
    IMAGE_POSITION,
    PREFILL_CHUNK,
    Prompt,
    Turn,
    check_sampling,
    check_seed,
    make_prompt,
    room_to_answer,
)
from fastvlm_mlx.model import FastVLM
from fastvlm_mlx.prompt import as_messages
from pruners import PrunerError

INTERLEAVED_CHUNK = 128  # prompt positions prefilled between two decode steps while others decode
VISION_SLICE_S = 0.25  # vision tower blocks run between two decode steps while others decode, at least one


class QueueFull(Exception):
    """Every slot and queue place is taken; the caller should retry later."""


@dataclass
class Job:
    """One request, checked and tokenized: what the worker needs and nothing it must decode."""

    picture: Image.Image
    prompt: Prompt
    settings: VisionSettings
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    timeout_s: float | None = None
    received: float = field(default_factory=time.perf_counter)  # when the request arrived


@dataclass
class Delta:
    text: str  # may be empty while a character or a possible stop string is incomplete
    token: int


@dataclass
class Finished:
    text: str  # the whole answer, cut before a stop string
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    timings: dict  # stage timings and cache use, for the response's `fastvlm` extension


@dataclass
class Failed:
    message: str
    kind: str  # "invalid_request" (bad input found by the worker), "timeout" or "server"


Event = Delta | Finished | Failed


class Handle:
    """A submitted job's events, in order; `cancel` frees its slot at the worker's next step."""

    def __init__(self, engine: "Engine", on_event: Callable[[Event], None] | None = None):
        self._engine, self._on_event = engine, on_event
        self.events: queue.Queue[Event] = queue.Queue()
        self.cancelled = False

    def emit(self, event: Event) -> None:
        try:
            (self._on_event or self.events.put)(event)
        except RuntimeError:  # the receiver's event loop is closed: nobody is listening
            self.cancel()

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._engine._inbox.put(("cancel", self))

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.events.get()
            yield event
            if not isinstance(event, Delta):
                return


def seeded_sampler(temperature: float, top_p: float, seed: int | None):
    """mlx-lm's sampling (temperature, then top-p) drawing from this request's own key when
    seeded, so a seeded answer does not depend on what else is in the batch."""
    if temperature == 0:
        return greedy_sampler  # one object: a greedy batch samples in one call
    key = None if seed is None else mx.random.key(seed)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        if key is None:
            return mx.random.categorical(logprobs * (1 / temperature))
        key, draw = mx.random.split(key)
        return mx.random.categorical(logprobs * (1 / temperature), key=draw)

    return sample


@dataclass
class _FirstToken:
    """The first token, sampled by the engine itself, shaped as the generator's responses are."""

    token: int
    finish_reason: str | None
    prompt_cache: list | None  # with a finish: the cache, holding `all_tokens`
    all_tokens: list[int] | None


class _Slot:
    """A job inside the engine: waiting, prefilling, then decoding under a generator uid."""

    def __init__(self, job: Job, handle: Handle, tokenizer):
        self.job, self.handle = job, handle
        self.deadline = None if job.timeout_s is None else job.received + job.timeout_s
        self.submitted = time.perf_counter()
        self.features = self.cache = self.embeds = self.uid = None
        self.encoding = None  # the vision stage in progress (features_in_pieces)
        self.positions: list[int] = []
        self.reused = self.prefilled = 0
        self.detokenizer = tokenizer.detokenizer
        self.known = len(tokenizer._tokenizer)
        self.text, self.sent, self.token_ids, self.generated = "", 0, [], 0
        self.t_start = self.t_vision = self.t_first = self.t_last = None
        self.turn = self.steps = None  # a solo slot's Turn and its iteration, once started
        self.sampler = None  # once prefilled: draws its first token, then the generator's for it

    @property
    def solo(self) -> bool:
        """Whether this job keeps pruned tokens' positions, so runs alone (see the module's docstring)."""
        return self.job.prompt.image_span is not None


class Engine:
    """Continuous batching over one model; `start` the worker, `submit` jobs, `close` when done.

    `max_batch` requests prefill or decode at once, `max_queue` more may wait; past that
    `submit` raises QueueFull. `prefill_chunk` positions are prefilled between two decode steps, and
    a new image's vision tower runs for `vision_slice_s` (at least one block) between two: smaller
    means shorter stalls for the answers streaming, later first tokens for new images."""

    def __init__(
        self,
        model: FastVLM,
        tokenizer,
        *,
        max_batch: int = 8,
        max_queue: int = 32,
        prefill_chunk: int = INTERLEAVED_CHUNK,
        vision_slice_s: float = VISION_SLICE_S,
        vision_cache: VisionCache | None = None,
        prompt_cache_entries: int | None = None,
        prompt_cache_bytes: int = 2 << 30,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        if not (isinstance(vision_slice_s, int | float) and vision_slice_s >= 0):  # NaN fails too
            raise UserError(f"vision_slice_s must be a number of seconds >= 0, not {vision_slice_s!r}")
        self.vision_slice_s = vision_slice_s
        # Room for two conversations per slot, in both caches: with fewer vision entries than clients, each
        # request found its prompt prefix cached but ran the vision tower again (16 clients, 8 entries: 1.8 s).
        entries = 2 * max_batch if prompt_cache_entries is None else prompt_cache_entries
        self.vision_cache = VisionCache(max_entries=max(8, entries)) if vision_cache is None else vision_cache
        self.prompt_cache = LRUPromptCache(max_size=max(16, entries), max_bytes=prompt_cache_bytes)
        self.eos = sorted(set(tokenizer.eos_token_ids) | set(model.config.eos_token_ids))
        self._answers: OrderedDict[str, list[int]] = OrderedDict()  # answer text -> the ids generated for it
        self._answers_lock = threading.Lock()
        self._inbox: queue.Queue = queue.Queue()
        self._count_lock = threading.Lock()
        self._in_engine = 0  # submitted and not yet finished
        self._waiting: list[_Slot] = []
        self._prefilling: list[_Slot] = []
        self._decoding: dict[int, _Slot] = {}
        self._solo: list[_Slot] = []  # jobs that keep pruned tokens' positions, answered first come first
        self._thread: threading.Thread | None = None
        self._generator: BatchGenerator | None = None  # the worker's (or drain's)
        self._stopped = threading.Event()
        self.stats = {"requests": 0, "prefilled_positions": 0, "reused_positions": 0, "decode_steps": 0}
        self.stats |= {"prefill_batches": 0, "largest_prefill_batch": 0}  # last chunks prefilled together
        self.stats |= {"decode_s": 0.0, "prefill_s": 0.0}  # the worker's time in decode steps, in prefill turns
        # The longest wait of answers in flight between two decode steps (prefill and vision slices run there).
        self.stats["longest_decode_gap_s"] = 0.0
        self._last_decode: float | None = None  # when the last decode step ended, while answers are in flight

    # -- the caller's side ------------------------------------------------------------------

    def prepare(
        self,
        picture: Image.Image,
        messages: list[dict],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: tuple[str, ...] = (),
        image_size: int | None = None,
        pruner: str | None = None,
        keep_ratio: float | None = None,
        keep_positions: bool | None = None,
        timeout_s: float | None = None,
        received: float | None = None,
    ) -> Job:
        """A Job for `messages` about `picture`; bad values and prompts past the context are UserErrors.
        `received` (a perf_counter time) is when the request arrived, where timings start. Options
        left None take the model's defaults, as in `generate`."""
        received = time.perf_counter() if received is None else received
        check_sampling(temperature, top_p)
        check_seed(seed)
        if not (isinstance(max_tokens, int) and max_tokens >= 1):
            raise UserError(f"max_tokens must be a whole number >= 1, not {max_tokens!r}")
        settings = VisionSettings.resolve(self.model.config, image_size, pruner, keep_ratio, seed, keep_positions)
        messages = as_messages(messages)
        with self._answers_lock:
            known = {
                i: self._answers[m["content"]]
                for i, m in enumerate(messages)
                if m["role"] == "assistant" and isinstance(m["content"], str) and m["content"] in self._answers
            }
        prompt = make_prompt(self.tokenizer, messages, settings.visual_tokens(self.model.config), known=known)
        prompt.image_span = settings.image_span(self.model.config)
        settings = settings.for_prompt(self.tokenizer, messages)
        if prompt.positions[-1] == IMAGE_POSITION:
            raise UserError("the chat template ends the prompt with the image; it must end with text")
        max_tokens = min(max_tokens, room_to_answer(self.model.config, prompt.span))
        options = dict(temperature=temperature, top_p=top_p, seed=seed, stop=tuple(stop), timeout_s=timeout_s)
        return Job(picture, prompt, settings, max_tokens, **options, received=received)

    def submit(self, job: Job, on_event: Callable[[Event], None] | None = None) -> Handle:
        """Queue `job`; its events go to `on_event` (called on the worker thread) or the handle's queue."""
        with self._count_lock:
            if self.full():
                raise QueueFull(f"{self._in_engine} requests are in progress or waiting; retry later")
            self._in_engine += 1
        handle = Handle(self, on_event)
        self._inbox.put(("job", _Slot(job, handle, self.tokenizer)))
        return handle

    def full(self) -> bool:
        """Whether `submit` would refuse a job now (a cheap check before preparing one)."""
        return self._in_engine >= self.max_batch + self.max_queue

    def load(self) -> dict:
        """How busy the engine is (read without locking: a snapshot for /health)."""
        return {
            "waiting": len(self._waiting),
            "prefilling": len(self._prefilling),
            "decoding": len(self._decoding),
            "solo": len(self._solo),
            "in_engine": self._in_engine,
        }

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fastvlm-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the worker; requests still in it fail."""
        if self._thread is not None:
            self._inbox.put(("close", None))
            self._stopped.wait()
            self._thread = None

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def drain(self) -> None:
        """Run the worker's loop on this thread until every job submitted so far is done, for an engine
        that was not started: tests and benchmarks that need to know which jobs shared a turn."""
        if self._thread is not None:
            raise RuntimeError("drain() runs an engine that was not started; this one has its worker")
        if self._generator is None:
            self._generator = self._new_generator()
        while self._take_inbox(block=False) and self._slots():
            self._step()

    # -- the worker -------------------------------------------------------------------------

    def _run(self) -> None:
        self._generator = self._new_generator()
        while self._take_inbox(block=not self._slots()):
            try:
                self._step()
            except Exception:  # a bug of ours: every request in flight fails, the worker goes on
                traceback.print_exc(file=sys.stderr)
                self._generator = self._new_generator()  # first: failing a slot removes it from the generator
                for slot in self._slots():
                    self._fail(slot, "internal error; see the server log", "server")
        for slot in self._slots():
            self._fail(slot, "the server is shutting down", "server")
        self._generator.close()
        self._stopped.set()
        # Parked, never ended: MLX's per-thread compile cache releases Python objects when a thread
        # ends, and a thread ending while the interpreter shuts down aborts the process.
        threading.Event().wait()

    def _step(self) -> None:
        """One turn of the loop: timeouts, admissions, the prefill side (`_prefill_turn`), one decode step."""
        self._expire()
        self._admit()
        began = time.perf_counter()
        if self._prefilling:
            self._prefill_turn()
        prefilled = time.perf_counter()
        if self._decoding:
            self._decode_step()
        self.stats["prefill_s"] += prefilled - began
        self.stats["decode_s"] += time.perf_counter() - prefilled
        if self._solo:
            self._guarded(self._solo_step, self._solo[0])
        if not self._slots():
            mx.clear_cache()  # idle: hand the freed buffers back

    def _new_generator(self) -> BatchGenerator:
        size = self.max_batch
        return BatchGenerator(
            self.model.language_model,
            stop_tokens=[[e] for e in self.eos],
            completion_batch_size=size,
            prefill_batch_size=size,
            prefill_step_size=PREFILL_CHUNK,
        )

    def _take_inbox(self, block: bool) -> bool:
        """Move new jobs in and cancellations out; False once asked to close."""
        while True:
            try:
                kind, item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "close":
                return False
            if kind == "job":
                self._waiting.append(item)
                self.stats["requests"] += 1
            else:
                self._drop(next((s for s in self._slots() if s.handle is item), None))

    def _slots(self) -> list[_Slot]:
        return [*self._waiting, *self._prefilling, *self._decoding.values(), *self._solo]

    def _drop(self, slot: _Slot | None) -> None:
        """Take `slot` out of the engine wherever it is (it gets no more events)."""
        if slot is None:
            return
        if slot in self._waiting:
            self._waiting.remove(slot)
        elif slot in self._prefilling:
            self._prefilling.remove(slot)
        elif slot.uid in self._decoding:
            del self._decoding[slot.uid]
            self._generator.remove([slot.uid])
        elif slot in self._solo:
            self._solo.remove(slot)
            if slot.steps is not None:
                slot.steps.close()  # the Turn's last queued step is finished there
        else:
            return
        with self._count_lock:
            self._in_engine -= 1

    def _fail(self, slot: _Slot, message: str, kind: str) -> None:
        self._drop(slot)
        slot.handle.emit(Failed(message, kind))

    def _expire(self) -> None:
        now = time.perf_counter()
        for slot in self._slots():
            if slot.deadline is not None and now > slot.deadline:
                where = "waiting" if slot.t_first is None else "answering"
                self._fail(slot, f"the request timed out after {slot.job.timeout_s:g} s ({where})", "timeout")

    def _admit(self) -> None:
        while self._waiting and len(self._prefilling) + len(self._decoding) + len(self._solo) < self.max_batch:
            slot = self._waiting.pop(0)
            (self._solo if slot.solo else self._prefilling).append(slot)

    def _guarded(self, step: Callable[..., None], *slots: _Slot) -> None:
        """Run one step of some requests; their bad input fails them alone, and so does a bug."""
        try:
            step(*slots)
        except (UserError, PrunerError) as error:
            for slot in slots:
                self._fail(slot, " ".join(str(error).split()), "invalid_request")
        except Exception:
            traceback.print_exc(file=sys.stderr)
            for slot in slots:
                self._fail(slot, "internal error while answering; see the server log", "server")

    def _prefill_turn(self) -> None:
        """The prefill side of one turn: the vision stage of every image found in the vision cache and a
        slice of the first one's that is not; then the last chunk of every prompt that has one left and
        fits, together in one batch (a burst of follow-ups gets its first tokens at once, not one a
        turn), or else the next chunk of the first longer prompt."""
        tower_ran = False
        for slot in list(self._prefilling):
            if slot.features is None:
                self._guarded(self._vision_step, slot)
                if slot in self._prefilling and (slot.features is None or slot.features.vision_s > 0):
                    tower_ran = True  # a slice of a tower (all of it when nobody decodes): enough for one turn
                    break
        chunk = self._chunk()
        ready = [s for s in self._prefilling if s.features is not None]
        together, width = [], 0
        for slot in ready:
            left = slot.embeds.shape[1] - slot.prefilled
            if left <= chunk and (len(together) + 1) * max(width, left) <= chunk:  # padded positions count
                together.append(slot)
                width = max(width, left)
        if together:
            self._guarded(self._prefill_last, *together)
        elif ready and not (tower_ran and self._decoding):
            self._guarded(self._prefill_chunk, ready[0])

    def _chunk(self) -> int:
        """Prompt positions prefilled in one turn: fewer while others decode, so they are not kept waiting."""
        return self.prefill_chunk if self._decoding else PREFILL_CHUNK

    def _prefill_chunk(self, slot: _Slot) -> None:
        """One chunk of a prompt longer than the rest of a turn allows, into its own cache."""
        end = slot.prefilled + self._chunk()
        with mx.stream(generation_stream):
            self.model.language_model.model(
                None, cache=slot.cache, input_embeddings=slot.embeds[:, slot.prefilled : end]
            )
            mx.eval([c.state for c in slot.cache])
        slot.prefilled = end

    def _prefill_last(self, *slots: _Slot) -> None:
        """The last chunk of each prompt, all in one batch: right-padded over their caches merged (left-padded)
        into one `BatchKVCache`, as mlx-lm's `BatchGenerator` prefills. Each first token is sampled from its
        row's last logits with the request's sampler, as `generate` does; then the hand-over to decoding."""
        lengths = [s.embeds.shape[1] - s.prefilled for s in slots]
        width = max(lengths)
        self.stats["prefill_batches"] += 1
        self.stats["largest_prefill_batch"] = max(self.stats["largest_prefill_batch"], len(slots))
        with mx.stream(generation_stream):
            if len(slots) == 1:
                cache = slots[0].cache
            else:
                cache = [layer[0].merge(list(layer)) for layer in zip(*(s.cache for s in slots), strict=True)]
                for c in cache:
                    c.prepare(right_padding=[width - n for n in lengths])
            embeds = [
                mx.pad(s.embeds[:, s.prefilled :], [(0, 0), (0, width - n), (0, 0)])
                for s, n in zip(slots, lengths, strict=True)
            ]
            hidden = self.model.language_model.model(None, cache=cache, input_embeddings=mx.concatenate(embeds))
            logprobs = self.model.next_logprobs(hidden[mx.arange(len(slots)), mx.array(lengths) - 1][:, None])
            if len(slots) > 1:
                for c in cache:
                    c.finalize()  # the padding rolled to the left, where the merge's is
            caches = [cache] if len(slots) == 1 else [[c.extract(i) for c in cache] for i in range(len(slots))]
            for slot in slots:
                slot.sampler = seeded_sampler(slot.job.temperature, slot.job.top_p, slot.job.seed)
            tokens = [slot.sampler(logprobs[i : i + 1]) for i, slot in enumerate(slots)]
            mx.eval(tokens, [[c.state for c in own] for own in caches])
        for slot, token, own in zip(slots, tokens, caches, strict=True):
            self._guarded(self._hand_over, slot, int(token.item()), own)

    def _hand_over(self, slot: _Slot, token: int, cache: list) -> None:
        """A prefilled prompt's first token out, and the rest of its answer to the generator."""
        job = slot.job
        slot.prefilled, slot.embeds, slot.cache = slot.embeds.shape[1], None, cache
        finish = "stop" if token in self.eos else "length" if job.max_tokens == 1 else None
        if finish:  # done at once: still among the prefilling, which the finish takes it out of
            self._on_token(slot, _FirstToken(token, finish, slot.cache, slot.positions))
            return
        self._prefilling.remove(slot)
        slot.uid = self._generator.insert(
            [[token]],  # fed next, at the position after the prompt's
            max_tokens=[job.max_tokens - 1],
            caches=[slot.cache],
            all_tokens=[list(slot.positions)],  # a copy: the generator appends what it feeds
            samplers=[slot.sampler],
        )[0]
        self._decoding[slot.uid] = slot
        self._on_token(slot, _FirstToken(token, None, None, None))

    def _vision_step(self, slot: _Slot) -> None:
        """The image's features: from the vision cache, else the tower's blocks for `vision_slice_s`
        (all of them when nobody is decoding); once done, the prompt cache's part (`_start_prefill`)."""
        if slot.encoding is None:
            slot.t_start = time.perf_counter()
            job = slot.job
            slot.encoding = features_in_pieces(self.model, job.picture, job.settings, self.vision_cache)
        until = time.perf_counter() + self.vision_slice_s
        try:
            while True:
                next(slot.encoding)
                if self._decoding and time.perf_counter() > until:
                    return
        except StopIteration as done:
            slot.encoding = None
            self._start_prefill(slot, done.value)

    def _start_prefill(self, slot: _Slot, features: ImageFeatures) -> None:
        """With the vision features done, the longest cached prefix of the prompt from the prompt
        cache; what is left waits for prefill chunks."""
        prompt = slot.job.prompt
        prompt.visual_tokens = features.tokens_after
        positions = prompt.positions
        cache, rest = self.prompt_cache.fetch_nearest_cache(features.key, positions)
        if cache is None:
            cache = make_prompt_cache(self.model.language_model)
        reused = len(positions) - len(rest)
        if reused == len(positions):  # the last position is run again: its logits give the first token
            trim_prompt_cache(cache, 1)
            reused -= 1
        slot.embeds = self.model.splice(prompt.ids_before, features.embeds, prompt.ids_after)[:, reused:]
        slot.features, slot.cache, slot.positions, slot.reused = features, cache, positions, reused
        slot.t_vision = time.perf_counter()
        self.stats["prefilled_positions"] += len(positions) - reused
        self.stats["reused_positions"] += reused

    def _decode_step(self) -> None:
        if self._last_decode is not None:
            gap = time.perf_counter() - self._last_decode
            self.stats["longest_decode_gap_s"] = max(self.stats["longest_decode_gap_s"], gap)
        try:
            _, responses = self._generator.next()
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self._generator = self._new_generator()
            for slot in list(self._decoding.values()):
                self._fail(slot, "internal error while decoding; see the server log", "server")
            return
        self.stats["decode_steps"] += 1
        for response in responses:
            slot = self._decoding.get(response.uid)
            if slot is not None:
                self._guarded(lambda s, r=response: self._on_token(s, r), slot)
        self._last_decode = time.perf_counter() if self._decoding else None

    def _solo_step(self, slot: _Slot) -> None:
        """The next token of a job that keeps pruned tokens' positions (the first: with its vision
        stage and whole prefill), from the `Turn` that `generate` runs."""
        if slot.steps is None:
            job = slot.job
            slot.t_start = time.perf_counter()
            job.prompt.features = lambda: image_features(self.model, job.picture, job.settings, self.vision_cache)
            turn = Turn(self.model, self.tokenizer, job.prompt, max_tokens=job.max_tokens)
            turn.sampler = seeded_sampler(job.temperature, job.top_p, job.seed)
            slot.turn, slot.steps = turn, iter(turn)
        response = next(slot.steps)
        if slot.features is None:  # the first token: the vision stage and prefill are done
            slot.features, slot.positions = slot.turn.features, slot.job.prompt.positions
            slot.t_vision = time.perf_counter() - slot.turn.timings.prefill_s
        self._on_token(slot, response)

    def _on_token(self, slot: _Slot, response) -> None:
        now = time.perf_counter()
        slot.t_first = slot.t_first or now
        slot.t_last, slot.generated = now, slot.generated + 1
        token, finish = response.token, response.finish_reason
        if token not in self.eos:
            if token < slot.known:  # ids past the tokenizer (padded embedding rows) have no text
                slot.detokenizer.add_token(token)
            slot.token_ids.append(token)
        if finish:
            slot.detokenizer.finalize()
        slot.text += slot.detokenizer.last_segment
        stop_at = min((i for s in slot.job.stop if (i := slot.text.find(s)) >= 0), default=-1)
        if stop_at >= 0:
            slot.text, finish = slot.text[:stop_at], "stop"
        hold = 0 if finish else max((len(s) - 1 for s in slot.job.stop), default=0)
        upto = max(slot.sent, len(slot.text) - hold)
        slot.handle.emit(Delta(slot.text[slot.sent : upto], token))
        slot.sent = upto
        if not finish:
            return
        if not slot.solo:  # a solo cache carries positions the prompt cache's users would not know of
            self._keep_cache(slot, response)
        if stop_at < 0:
            self._remember_answer(slot.text, slot.token_ids)
        self._drop(slot)
        slot.handle.emit(self._finished(slot, finish))

    def _keep_cache(self, slot: _Slot, response) -> None:
        """A finished answer's KV cache into the prompt cache, for a follow-up turn."""
        if response.prompt_cache is None:  # cut by a stop string: the generator still holds it
            cache, tokens = self._generator.extract_cache([slot.uid])[slot.uid]
        else:
            cache, tokens = response.prompt_cache, response.all_tokens
        mx.eval([(c.keys, c.values) for c in cache])  # its own copy, not a view holding the batch's buffers
        self.prompt_cache.insert_cache(slot.features.key, list(tokens), cache)

    def _remember_answer(self, text: str, ids: list[int]) -> None:
        """A follow-up turn that quotes this answer reuses its ids (and so the cached positions)."""
        with self._answers_lock:
            self._answers[text] = list(ids)
            self._answers.move_to_end(text)
            while len(self._answers) > 4 * self.prompt_cache.max_size:
                self._answers.popitem(last=False)

    def _finished(self, slot: _Slot, finish: str) -> Finished:
        f, job = slot.features, slot.job
        decoded = slot.generated - 1
        decode_s = slot.t_last - slot.t_first
        timings = {
            "queue_s": slot.t_start - slot.submitted,
            "preprocess_s": (slot.submitted - job.received) + f.preprocess_s,
            "vision_s": f.vision_s,
            "prune_s": f.prune_s,
            "prefill_s": slot.t_first - slot.t_vision,
            "ttft_s": slot.t_first - job.received,
            "decode_tokens_per_s": decoded / decode_s if decoded > 0 and decode_s > 0 else 0.0,
            "total_s": time.perf_counter() - job.received,
            "prefilled_positions": len(slot.positions) - slot.reused,
            "reused_positions": slot.reused,
            "vision_cached": f.vision_s == 0.0,
            "visual_tokens": {"before": f.tokens_before, "after": f.tokens_after},
        }
        return Finished(slot.text, finish, len(slot.positions), len(slot.token_ids), timings)
