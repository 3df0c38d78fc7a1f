"""The vision stage: image -> pixels -> vision tower -> (prune) -> projector, ready for the splice.

`VisionCache` is a small LRU of finished stages keyed by the image's content hash and every
setting that changes the result (input size, preprocessing mode, pruner, keep ratio, the random
pruner's seed), so the same picture in a new conversation skips the tower. It holds one model's
features: give each model its own.
"""

import math
import time
from collections import OrderedDict
from collections.abc import Generator
from dataclasses import dataclass, replace

import mlx.core as mx
from PIL import Image

from fastvlm_mlx.config import check_image_size
from fastvlm_mlx.errors import UserError
from fastvlm_mlx.images import ImageInput, image_digest, read_image
from fastvlm_mlx.model import FastVLM
from fastvlm_mlx.preprocess import preprocess
from fastvlm_mlx.prompt import instruction_ids
from pruners import Pruned, identity, keep_count, needs_prompt, needs_scores, prune
from pruners.ops import cosine_similarity


@dataclass(frozen=True)
class VisionSettings:
    """What the vision stage runs with, resolved against the model's defaults."""

    image_size: int
    pruner: str | None  # None keeps every visual token
    keep_ratio: float
    seed: int  # the random pruner's draw
    keep_positions: bool = False  # kept visual tokens keep their unpruned RoPE positions (GAP)
    instruction: tuple[int, ...] = ()  # the prompt's text ids, for an instruction-aware pruner (`for_prompt`)

    @classmethod
    def resolve(
        cls, config, image_size=None, pruner=None, keep_ratio=None, seed=None, keep_positions=None
    ) -> "VisionSettings":
        """Explicit choices win over the model's converted defaults; bad values are UserErrors."""
        pruner, keep_ratio = resolve_pruning(config, pruner, keep_ratio)
        needs_scores(pruner, keep_ratio)  # an unknown pruner or bad ratio fails here, before any work
        size = check_image_size(image_size or config.image_size, config.vision.stride)
        keep_positions = config.keep_positions if keep_positions is None else keep_positions
        if not isinstance(keep_positions, bool):
            raise UserError(
                f"keep_positions must be True or False (or None: the model's default), not {keep_positions!r}"
            )
        return cls(size, pruner, keep_ratio, seed or 0, keep_positions)

    def for_prompt(self, tokenizer, messages) -> "VisionSettings":
        """These settings with the instruction an instruction-aware pruner (`cdpruner`) ranks the image's
        tokens against: the first user message's text (`instruction_ids`). Unchanged for any other pruner."""
        if not needs_prompt(self.pruner, self.keep_ratio):
            return self
        ids = tuple(instruction_ids(tokenizer, messages))
        if not ids:
            raise UserError(f"pruner {self.pruner!r} ranks the image's tokens by the question; the prompt has no text")
        return replace(self, instruction=ids)

    def tokens_before(self, config) -> int:
        """How many visual tokens the vision tower makes at this input size."""
        return math.ceil(self.image_size / config.vision.stride) ** 2

    def visual_tokens(self, config) -> int:
        """How many visual tokens reach the LLM at this input size, after pruning."""
        tokens = self.tokens_before(config)
        return tokens if self.pruner is None else keep_count(tokens, self.keep_ratio)

    def image_span(self, config) -> int | None:
        """With keep_positions, the RoPE positions the image spans (its unpruned token count), else None."""
        return self.tokens_before(config) if self.keep_positions and self.pruner is not None else None


@dataclass
class ImageFeatures:
    embeds: mx.array  # (1, k, H) projected visual tokens
    tokens_before: int  # N, the tower's output tokens before pruning
    key: tuple  # (image hash, size, mode, pruner, ratio, seed, instruction): equal keys, equal features
    preprocess_s: float  # image decode and resize (0 when cached)
    vision_s: float  # vision tower (0 when cached)
    prune_s: float  # pruning (0 when cached)
    kept: mx.array | None = None  # (k,) int32 ascending: the tower token each visual token stands at

    @property
    def tokens_after(self) -> int:
        return self.embeds.shape[1]


class VisionCache:
    """Least-recently-used ImageFeatures by key; `hits`/`misses` count lookups."""

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, ImageFeatures] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> ImageFeatures | None:
        found = self._entries.get(key)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return found

    def put(self, features: ImageFeatures) -> None:
        self._entries[features.key] = features
        self._entries.move_to_end(features.key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


def image_features(
    model: FastVLM, image: ImageInput, settings: VisionSettings, cache: VisionCache | None = None
) -> ImageFeatures:
    """The projected visual tokens of `image`, from `cache` when it holds them."""
    return finish(features_in_pieces(model, image, settings, cache, pieces=False))


def features_in_pieces(
    model: FastVLM, image: ImageInput, settings: VisionSettings, cache: VisionCache | None = None, pieces: bool = True
) -> Generator[None, None, ImageFeatures]:
    """`image_features` as a generator that returns them. With `pieces`, the tower is evaluated a
    piece at a time (FastViT.pieces) and the generator yields after each, so that its caller can do
    other work in between (the server decodes); the stage times count this work only."""
    start = time.perf_counter()
    picture = read_image(image)
    key = feature_key(model.config, picture, settings)
    if cache is not None and (found := cache.get(key)) is not None:
        return ImageFeatures(found.embeds, found.tokens_before, key, time.perf_counter() - start, 0.0, 0.0, found.kept)
    features = yield from encode(model, picture, settings, key, start, pieces)
    if cache is not None:
        cache.put(features)
    return features


def finish(steps: Generator):
    """Run a generator to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def feature_key(config, picture: Image.Image, settings: VisionSettings) -> tuple:
    seed = settings.seed if settings.pruner is not None else None  # only a pruner draws with it
    mode, ratio = config.preprocess_mode, settings.keep_ratio
    instruction = settings.instruction if needs_prompt(settings.pruner, ratio) else ()
    return (image_digest(picture), settings.image_size, mode, settings.pruner, ratio, seed, instruction)


def encode(
    model: FastVLM, picture: Image.Image, settings: VisionSettings, key: tuple, start: float, pieces: bool = False
) -> Generator[None, None, ImageFeatures]:
    """Run the stage, timing each step (each waits for its arrays); with `pieces`, yield after each
    piece of the tower (see `features_in_pieces`)."""
    scored = needs_scores(settings.pruner, settings.keep_ratio)
    pixels = mx.array(preprocess(picture, settings.image_size, model.config.preprocess_mode))
    t_pre = _now(pixels)
    if pieces:
        vision_s = 0.0
        for tokens, scores in model.encode_image_pieces(pixels, with_scores=scored):
            began = time.perf_counter()
            vision_s += _now(tokens, *([] if scores is None else [scores])) - began
            yield
    else:
        tokens, scores = model.encode_image(pixels, with_scores=scored)  # (1, N, D), (1, N) or None
        vision_s = _now(tokens, *([scores] if scored else [])) - t_pre
    t_vision = time.perf_counter()
    if needs_prompt(settings.pruner, settings.keep_ratio):  # counted as pruning
        scores = prompt_relevance(model, tokens, settings.instruction)
    kept = prune_tokens(tokens, scores, settings.pruner, settings.keep_ratio, settings.seed)
    t_prune = _now(kept.tokens, kept.indices)
    embeds = model.project(kept.tokens)  # left lazy: the projector runs (and is timed) with the prefill
    return ImageFeatures(embeds, tokens.shape[1], key, t_pre - start, vision_s, t_prune - t_vision, kept.indices[0])


def prompt_relevance(model: FastVLM, tokens: mx.array, instruction) -> mx.array:
    """Each visual token's relevance (B, N) to the prompt's text ids `instruction` (`relevance`), for
    an instruction-aware pruner: the tokens projected into the LLM's space against the text's embeddings."""
    if len(instruction) == 0:
        raise UserError("an instruction-aware pruner needs the prompt's text ids (VisionSettings.for_prompt)")
    text = model.language_model.model.embed_tokens(mx.array(list(instruction), dtype=mx.int32))
    return relevance(model.project(tokens), text.astype(tokens.dtype))


def relevance(image: mx.array, text: mx.array) -> mx.array:
    """Projected visual tokens (B, N, H) and text embeddings (M, H) -> (B, N) in [0, 1] per image:
    the negated mean cosine similarity of each token to the text, min-max scaled, as in CDPruner's
    reference code (its sign included)."""
    closeness = -cosine_similarity(image, mx.broadcast_to(text[None], (image.shape[0], *text.shape))).mean(axis=-1)
    low, high = closeness.min(axis=-1, keepdims=True), closeness.max(axis=-1, keepdims=True)
    return (closeness - low) / (high - low + 1e-6)


def _now(*arrays: mx.array) -> float:
    mx.eval(*arrays)
    return time.perf_counter()


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
