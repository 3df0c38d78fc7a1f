"""End-to-end generation: image file -> preprocess -> vision -> (prune) -> prefill -> decode."""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from fastvlm_mlx.config import check_image_size
from fastvlm_mlx.errors import UserError
from fastvlm_mlx.model import FastVLM
from fastvlm_mlx.preprocess import load_image, preprocess
from fastvlm_mlx.prompt import tokenize_prompt
from pruners import Pruned, identity, keep_count, needs_scores, prune

PREFILL_CHUNK = 2048  # positions per prefill pass, as mlx-lm's prefill_step_size


@dataclass
class Timings:
    preprocess_s: float  # image decode, resize, tokenization
    vision_s: float  # vision tower
    prune_s: float  # visual-token pruning
    prefill_s: float  # projector, splice, LLM prefill, first sample
    ttft_s: float  # image file in -> first token out, every stage above
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
class GenerationResult:
    text: str
    token_ids: list[int]
    visual_tokens_before: int
    visual_tokens_after: int
    timings: Timings
    peak_memory_gb: float | None  # None where the framework cannot measure it (torch on CPU)
    # First token's log-probabilities over the vocabulary, (V,) numpy, for quality metrics.
    first_logprobs: object = field(default=None, repr=False)


def _now(*arrays: mx.array) -> float:
    mx.eval(*arrays)
    return time.perf_counter()


def _stream_text(tokenizer, token_ids: list[int], shown: str, on_text, final: bool = False) -> str:
    """Decode all tokens (exactly as tokenizer.decode) and pass on the new, complete part."""
    text = tokenizer.decode(token_ids)
    if not final and text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
        return shown
    if on_text and len(text) > len(shown):
        on_text(text[len(shown) :])
    return text


def generate(
    model: FastVLM,
    tokenizer,
    image: str | Path,
    prompt: str,
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    image_size: int | None = None,
    pruner: str | None = None,
    keep_ratio: float | None = None,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Answer `prompt` about the image file; `on_text` receives text as it is decoded.

    The vision tokens are cut to `keep_ratio` by `pruner` before the projector: None uses the
    model's default from conversion, "none" keeps every token. `seed` seeds sampling and the
    `random` pruner (0 when not given). A prompt (text and visual tokens) that leaves no room in
    the model's context is a UserError; otherwise `max_tokens` is cut to the room left.
    """
    config = model.config
    check_sampling(temperature, top_p)
    check_seed(seed)
    pruner, keep_ratio = resolve_pruning(config, pruner, keep_ratio)
    scored = needs_scores(pruner, keep_ratio)
    size = check_image_size(image_size or config.image_size, config.vision.stride)
    if seed is not None:
        mx.random.seed(seed)
    mx.reset_peak_memory()
    start = time.perf_counter()

    pixels = mx.array(preprocess(load_image(image), size, config.preprocess_mode))
    ids_before, ids_after = tokenize_prompt(tokenizer, prompt)
    prompt_tokens = len(ids_before) + visual_tokens(config, size, pruner, keep_ratio) + len(ids_after)
    max_tokens = min(max_tokens, room_to_answer(config, prompt_tokens))
    t_pre = _now(pixels)

    tokens, scores = model.encode_image(pixels, with_scores=scored)  # (1, N, D), (1, N) or None
    t_vision = _now(tokens, *([scores] if scored else []))
    kept = prune_tokens(tokens, scores, pruner, keep_ratio, seed or 0)
    t_prune = _now(kept.tokens, kept.indices)

    embeds = model.splice(ids_before, model.project(kept.tokens), ids_after)[0]  # (L, H)
    sampler = make_sampler(temp=temperature, top_p=top_p if 0 < top_p < 1 else 0.0)
    steps = _token_steps(model, embeds, sampler, max_tokens)
    eos = set(tokenizer.eos_token_ids) | set(config.eos_token_ids)
    token_ids: list[int] = []
    text = ""
    generated, t_first, t_last, first_logprobs = 0, None, None, None
    for token, logprobs in steps:
        token = int(token)
        t_last = time.perf_counter()
        t_first = t_first or t_last
        first_logprobs = logprobs if first_logprobs is None else first_logprobs
        generated += 1
        if token in eos:
            break
        token_ids.append(token)
        if on_text:  # decoding per token is only worth its cost when someone is watching
            text = _stream_text(tokenizer, token_ids, text, on_text)
    text = _stream_text(tokenizer, token_ids, text, on_text, final=True)
    # _token_steps queues the step after each token it yields; finish the last one here, untimed,
    # so it does not run into whatever is timed next.
    steps.close()
    mx.synchronize(generation_stream)

    timings = Timings.from_marks(start, t_pre, t_vision, t_prune, t_first, t_last, generated)
    return GenerationResult(
        text=text,
        token_ids=token_ids,
        visual_tokens_before=tokens.shape[1],
        visual_tokens_after=kept.tokens.shape[1],
        timings=timings,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        first_logprobs=np.array(first_logprobs.astype(mx.float32)),
    )


def _token_steps(model: FastVLM, embeds: mx.array, sampler, max_tokens: int):
    """(token, logprobs) pairs, each next step queued before a token is handed out, as in
    mlx-lm's generate_step. Written out here because, measured on a CPU, generate_step runs the
    prompt's last position as a step of its own (reading every weight again: ~0.1 s at 0.5B)
    and empties MLX's buffer cache at its first token (the next image's vision pass then pays
    ~0.2 s of fresh-page faults at 1024^2). mlx-lm's model, KV cache and sampler do the work."""
    if max_tokens < 1:
        return
    lm = model.language_model
    cache = make_prompt_cache(lm)

    def sample(hidden: mx.array):
        logits = model.head(hidden[:, -1, :])
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    with mx.stream(generation_stream):
        for start in range(0, len(embeds), PREFILL_CHUNK):
            if start:
                mx.eval([c.state for c in cache])
            hidden = lm.model(None, cache=cache, input_embeddings=embeds[None, start : start + PREFILL_CHUNK])
        step = sample(hidden)
    mx.async_eval(*step)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            with mx.stream(generation_stream):
                following = sample(lm.model(step[0][None], cache=cache))
            mx.async_eval(*following)
        yield step[0].item(), step[1]
        step = following if n + 1 < max_tokens else None


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


def visual_tokens(config, image_size: int, pruner: str | None, keep_ratio: float) -> int:
    """How many visual tokens reach the LLM at this input size, after pruning."""
    side = math.ceil(image_size / config.vision.stride)
    return side * side if pruner is None else keep_count(side * side, keep_ratio)


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


def resolve_pruning(config, pruner: str | None, keep_ratio: float | None) -> tuple[str | None, float]:
    """(pruner, keep ratio) to run: explicit choices win over the model's converted default."""
    if pruner == "none":
        if keep_ratio not in (None, 1.0):
            raise UserError("--pruner none keeps every token; drop --keep-ratio or name a pruner")
        return None, 1.0
    if pruner is None and config.pruner is None:
        if keep_ratio not in (None, 1.0):
            raise UserError("--keep-ratio needs a pruner: add --pruner NAME (e.g. --pruner divprune)")
        return None, 1.0
    if keep_ratio is None and config.pruner is None:  # the model has no ratio to lend
        raise UserError(f"--pruner {pruner} needs --keep-ratio R in (0, 1], e.g. --keep-ratio 0.5")
    return pruner or config.pruner, keep_ratio if keep_ratio is not None else config.keep_ratio


def prune_tokens(tokens: mx.array, scores: mx.array | None, pruner: str | None, keep_ratio: float, seed: int) -> Pruned:
    """The pipeline's pruning step: the whole token set when no pruner is given."""
    if pruner is None:
        return identity(tokens)
    return prune(pruner, tokens, keep_ratio, scores=scores, seed=seed)
