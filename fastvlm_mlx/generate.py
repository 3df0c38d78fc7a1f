"""Generation: image + prompt -> vision stage -> prefill -> decode, one response per token.

`stream_generate` yields a `GenerationResponse` per token (mlx-lm's shape) and `generate`
collects them into a `GenerationResult` with stage timings. Both run one `Turn`: the prompt's
positions go into a KV cache after the prefix of them it already holds (a chat session keeps
its cache between turns, see `fastvlm_mlx.chat`), then decoding queues each next step before
handing out a token, and text comes from mlx-lm's streaming detokenizer.
"""

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from fastvlm_mlx.errors import UserError
from fastvlm_mlx.features import ImageFeatures, VisionCache, VisionSettings, image_features
from fastvlm_mlx.images import ImageInput
from fastvlm_mlx.model import FastVLM, carry_positions, gap_positions
from fastvlm_mlx.prompt import as_messages, tokenize_messages

PREFILL_CHUNK = 2048  # positions per prefill pass, as mlx-lm's prefill_step_size
IMAGE_POSITION = -1  # stands for each visual token in a turn's list of positions


@dataclass
class Timings:
    preprocess_s: float  # image decode, resize, tokenization
    vision_s: float  # vision tower
    prune_s: float  # visual-token pruning
    prefill_s: float  # projector, splice, LLM prefill, first sample
    ttft_s: float  # image in -> first token out, every stage above
    decode_tokens_per_s: float  # tokens after the first, per second of decoding

    @classmethod
    def from_marks(cls, start, preprocessed, encoded, pruned, first, last, generated: int) -> "Timings":
        """Stage timings from perf_counter marks; `generated` counts every sampled token (eos too)."""
        decoded = generated - 1
        return cls(
            preprocess_s=preprocessed - start,
            vision_s=encoded - preprocessed,
            prune_s=pruned - encoded,
            prefill_s=first - pruned,
            ttft_s=first - start,
            decode_tokens_per_s=decoded / (last - first) if decoded > 0 and last > first else 0.0,
        )


@dataclass
class GenerationResponse:
    """One generated token, as mlx-lm's stream_generate yields it."""

    text: str  # the next piece of the answer; may be empty while a character is incomplete
    token: int
    prompt_tokens: int  # the whole prompt, text and visual tokens
    prompt_tps: float  # prompt positions prefilled per second (a chat follow-up prefills only its own)
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None  # on the last response: "stop" (end of sequence) or "length"


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    visual_tokens_before: int
    visual_tokens_after: int
    timings: Timings
    peak_memory_gb: float | None  # None where the framework cannot measure it (torch on CPU)
    finish_reason: str  # "stop" or "length"
    # Only when asked (logprobs=True): the first token's log-probabilities, (V,) numpy, for quality metrics.
    first_logprobs: object = field(default=None, repr=False)


@dataclass
class Prompt:
    """A turn's input: the text ids around the image and the image's features (made when needed)."""

    ids_before: list[int]
    ids_after: list[int]
    visual_tokens: int
    features: Callable[[], ImageFeatures]
    messages: list[dict]  # the conversation the ids are of
    tokenize_s: float = 0.0
    image_span: int | None = None  # keep_positions: the positions the unpruned image spans, else None
    kept: list[int] | None = None  # with image_span, once features are made: where each visual token stood

    @property
    def positions(self) -> list[int]:
        return self.ids_before + [IMAGE_POSITION] * self.visual_tokens + self.ids_after

    @property
    def span(self) -> int:
        """RoPE positions the prompt takes: its length, or more where pruned image tokens keep their places."""
        image = self.visual_tokens if self.image_span is None else self.image_span
        return len(self.ids_before) + image + len(self.ids_after)

    def rope_positions(self) -> list[int] | None:
        """Each prompt entry's RoPE position, where kept visual tokens keep their unpruned places
        and the text after the image continues from the unpruned length (GAP); else None."""
        if self.image_span is None or self.kept is None:
            return None
        return gap_positions(len(self.ids_before), self.kept, self.image_span, len(self.ids_after))


class Turn:
    """One answer: iterate for `GenerationResponse`s, then read `result()`.

    `cache` holds the KV entries of `cached` (a list of positions); the turn keeps what the
    prompt shares with it, prefills the rest and, once done, `cached` lists what the cache holds."""

    def __init__(
        self,
        model: FastVLM,
        tokenizer,
        prompt: Prompt,
        *,
        cache=None,
        cached: list[int] | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        logprobs: bool = False,
    ):
        check_sampling(temperature, top_p)
        self.model, self.tokenizer, self.prompt = model, tokenizer, prompt
        self.cache = make_prompt_cache(model.language_model) if cache is None else cache
        self.cached = [] if cached is None else cached
        self.max_tokens = min(max_tokens, room_to_answer(model.config, prompt.span))
        self.sampler = make_sampler(temp=temperature, top_p=top_p if 0 < top_p < 1 else 0.0)
        self.keep_logprobs = logprobs
        self.eos = set(tokenizer.eos_token_ids) | set(model.config.eos_token_ids)
        self.token_ids: list[int] = []
        self.text, self.finish_reason, self.features = "", "length", None
        self.first_logprobs, self.timings = None, Timings(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

    def __iter__(self) -> Iterator[GenerationResponse]:
        if self.max_tokens < 1:
            return
        mx.reset_peak_memory()
        features = self.features = self.prompt.features()
        self.prompt.visual_tokens = features.tokens_after
        if self.prompt.image_span is not None:
            self.prompt.image_span, self.prompt.kept = features.tokens_before, features.kept.tolist()
        positions = self.prompt.positions
        reused = min(shared_prefix(self.cached, positions), len(positions) - 1)  # the last one gives logits
        trim_prompt_cache(self.cache, self.cache[0].offset - reused)
        carry_positions(self.cache, self.prompt.rope_positions())  # the answer's positions continue from them
        embeds = self.model.splice(self.prompt.ids_before, features.embeds, self.prompt.ids_after)[:, reused:]
        t_prefill = time.perf_counter()
        fed: list[int] = []
        steps = _token_steps(self.model, embeds, self.cache, self.sampler, self.max_tokens, fed)
        detokenizer, known = self.tokenizer.detokenizer, len(self.tokenizer._tokenizer)
        try:
            for n, (token, logprobs) in enumerate(steps):
                t_last = time.perf_counter()
                if n == 0:
                    t_first, prompt_tps = t_last, len(embeds[0]) / max(t_last - t_prefill, 1e-9)
                    self.first_logprobs = logprobs if self.keep_logprobs else None
                    self.timings = self._timings(features, t_prefill, t_first, t_first, 1)
                done = token in self.eos or n + 1 == self.max_tokens
                if token not in self.eos:
                    if token < known:  # ids past the tokenizer (padded embedding rows) have no text
                        detokenizer.add_token(token)
                    self.token_ids.append(token)
                if done:
                    self.finish_reason = "stop" if token in self.eos else "length"
                    detokenizer.finalize()
                self.timings = self._timings(features, t_prefill, t_first, t_last, n + 1)
                text = detokenizer.last_segment
                self.text += text
                decode_s = t_last - t_first
                yield GenerationResponse(
                    text=text,
                    token=token,
                    prompt_tokens=len(positions),
                    prompt_tps=prompt_tps,
                    generation_tokens=n + 1,
                    generation_tps=n / decode_s if n and decode_s > 0 else 0.0,
                    peak_memory=mx.get_peak_memory() / 1e9,
                    finish_reason=self.finish_reason if done else None,
                )
                if done:
                    break
        finally:
            steps.close()  # the step queued after the last token: finished here, untimed
            mx.synchronize(generation_stream)
            self.cached[:] = (positions + fed)[: self.cache[0].offset]  # short if interrupted mid-prefill

    def _timings(self, features: ImageFeatures, t_prefill: float, t_first: float, t_last: float, generated: int):
        pre = features.preprocess_s + self.prompt.tokenize_s
        start = t_prefill - pre - features.vision_s - features.prune_s
        marks = (start + pre, start + pre + features.vision_s, t_prefill)
        return Timings.from_marks(start, *marks, t_first, t_last, generated)

    def result(self) -> GenerationResult:
        """The answer so far (the whole answer once iteration ended)."""
        features, prompt = self.features, self.prompt
        first = self.first_logprobs
        return GenerationResult(
            text=self.text,
            token_ids=list(self.token_ids),
            prompt_tokens=len(prompt.positions),
            visual_tokens_before=features.tokens_before if features else prompt.visual_tokens,
            visual_tokens_after=prompt.visual_tokens,
            timings=self.timings,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            finish_reason=self.finish_reason,
            first_logprobs=None if first is None else np.array(first.astype(mx.float32)),
        )


def stream_generate(
    model: FastVLM,
    tokenizer,
    image: ImageInput,
    prompt: str | list[dict],
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    image_size: int | None = None,
    pruner: str | None = None,
    keep_ratio: float | None = None,
    seed: int | None = None,
    vision_cache: VisionCache | None = None,
    keep_positions: bool | None = None,
) -> Iterator[GenerationResponse]:
    """Answer `prompt` (a question, or chat messages) about `image`, one response per token.

    `image` is a path, PIL image, uint8 array, bytes, data: or http(s) URL. The visual tokens are
    cut to `keep_ratio` by `pruner` before the projector: None uses the model's default from
    conversion, "none" keeps every token. `keep_positions` gives the kept tokens the RoPE positions
    they had unpruned and the text after them the unpruned length's (GAP, arXiv 2506.21873; None:
    the model's default from conversion). `seed` seeds sampling and the `random` pruner. A prompt
    that leaves no room in the model's context is a UserError; else `max_tokens` is cut to fit."""
    turn = _one_turn(model, tokenizer, image, prompt, max_tokens, temperature, top_p, image_size, pruner,
                     keep_ratio, seed, vision_cache, False, keep_positions)  # fmt: skip
    yield from turn


def generate(
    model: FastVLM,
    tokenizer,
    image: ImageInput,
    prompt: str | list[dict],
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    image_size: int | None = None,
    pruner: str | None = None,
    keep_ratio: float | None = None,
    seed: int | None = None,
    vision_cache: VisionCache | None = None,
    logprobs: bool = False,
    keep_positions: bool | None = None,
) -> GenerationResult:
    """`stream_generate`'s whole answer with stage timings; `logprobs` keeps the first token's."""
    turn = _one_turn(model, tokenizer, image, prompt, max_tokens, temperature, top_p, image_size, pruner,
                     keep_ratio, seed, vision_cache, logprobs, keep_positions)  # fmt: skip
    for _ in turn:
        pass
    return turn.result()


def _one_turn(model, tokenizer, image, prompt, max_tokens, temperature, top_p, image_size, pruner, keep_ratio,
              seed, vision_cache, logprobs, keep_positions) -> Turn:  # fmt: skip
    check_seed(seed)
    settings = VisionSettings.resolve(model.config, image_size, pruner, keep_ratio, seed, keep_positions)
    if seed is not None:
        mx.random.seed(seed)
    prepared = make_prompt(tokenizer, prompt, settings.visual_tokens(model.config))
    prepared.image_span = settings.image_span(model.config)
    settings = settings.for_prompt(tokenizer, prepared.messages)
    prepared.features = lambda: image_features(model, image, settings, vision_cache)
    options = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, logprobs=logprobs)
    return Turn(model, tokenizer, prepared, **options)


def make_prompt(tokenizer, prompt: str | list[dict], visual_tokens: int, features=None, known=None) -> Prompt:
    """The prompt's ids through the chat template, timed (tokenization counts as preprocessing)."""
    start = time.perf_counter()
    messages = as_messages(prompt)
    before, after = tokenize_messages(tokenizer, messages, known=known)
    return Prompt(before, after, visual_tokens, features, messages, time.perf_counter() - start)


def _token_steps(model: FastVLM, embeds: mx.array, cache: list, sampler, max_tokens: int, fed: list[int]):
    """(token, logprobs) pairs, each next step queued before a token is handed out, as in
    mlx-lm's generate_step (but the first is handed out at once); `fed` collects the tokens that
    went into the cache. Written out here because, measured on a CPU, generate_step runs the
    prompt's last position as a step of its own (reading every weight again: ~0.1 s at 0.5B) and
    empties MLX's buffer cache at its first token (the next image's vision pass then pays ~0.2 s
    of fresh-page faults at 1024^2)."""
    lm = model.language_model

    def sample(hidden: mx.array):
        logprobs = model.next_logprobs(hidden)
        return sampler(logprobs), logprobs.squeeze(0)

    def queue(step):  # the step that feeds `step`'s token, evaluated in the background
        with mx.stream(generation_stream):
            following = sample(lm.model(step[0][None], cache=cache))
        mx.async_eval(*following)
        return following

    with mx.stream(generation_stream):
        for start in range(0, embeds.shape[1], PREFILL_CHUNK):
            if start:
                mx.eval([c.state for c in cache])
            hidden = lm.model(None, cache=cache, input_embeddings=embeds[:, start : start + PREFILL_CHUNK])
        step = sample(hidden)
    token = step[0].item()
    # The first token goes out before any more work is queued: on a CPU, a step queued first delayed
    # it by ~50 ms at 0.5B (160 -> 215 ms for a 20-position follow-up).
    yield token, step[1]
    if max_tokens < 2:
        return
    step = queue(step)
    fed.append(token)
    for n in range(1, max_tokens):
        more = n + 1 < max_tokens
        following = queue(step) if more else None
        token = step[0].item()
        if more:
            fed.append(token)
        yield token, step[1]
        step = following


def shared_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two position lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def check_sampling(temperature: float, top_p: float) -> None:
    """UserErrors for settings that would sample garbage: NaN, infinities, out of range."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"temperature must be a finite number >= 0 (0 = greedy), not {temperature!r}")
    if not 0 <= top_p <= 1:  # false for NaN too
        raise UserError(f"top-p must be a number in [0, 1], not {top_p!r}")


def check_seed(seed: int | None) -> None:
    """MLX seeds are unsigned 64-bit; anything else is a UserError instead of a TypeError from MLX."""
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**64):
        raise UserError(f"seed must be a whole number in [0, 2^64), not {seed!r}")


def room_to_answer(config, prompt_tokens: int) -> int:
    """Tokens left for the answer in the model's context; a UserError when none are."""
    context = context_length(config)
    if prompt_tokens >= context:
        raise UserError(
            f"the prompt is {prompt_tokens} tokens (text and visual), the model's context is {context}; "
            "shorten the prompt, lower --image-size or prune visual tokens (--pruner, --keep-ratio)"
        )
    return context - prompt_tokens


def context_length(config) -> int:
    """Positions a prompt and its answer may fill: Qwen2's `max_position_embeddings`, or less where the
    checkpoint set a limit (Apple's `tokenizer_model_max_length`, which Apple's runtime cuts prompts to)."""
    positions = config.text.get("max_position_embeddings", 32768)
    return positions if config.max_context is None else min(positions, config.max_context)
