"""A conversation about one image that keeps its KV cache: a follow-up prefills only its own tokens.

`ChatSession` keeps the messages so far and mlx-lm's prompt cache of the positions it has run.
Each turn renders the whole conversation through the chat template and prefills only what
differs from the cache (normally just the new user message), so its answers equal a fresh run
of the whole conversation. The image's features come from a `VisionCache` (by default one per
model, shared by its sessions), so the same picture in a new conversation skips the vision tower.
"""

import weakref
from collections.abc import Iterator
from dataclasses import replace

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from fastvlm_mlx.errors import UserError
from fastvlm_mlx.features import ImageFeatures, VisionCache, VisionSettings, image_features
from fastvlm_mlx.generate import GenerationResponse, GenerationResult, Prompt, Turn, check_seed, make_prompt
from fastvlm_mlx.images import ImageInput
from fastvlm_mlx.model import FastVLM
from fastvlm_mlx.prompt import as_messages

_SAME = object()  # reset(): keep the current image
_SHARED: dict[int, VisionCache] = {}  # id(model) -> its cache, dropped with the model


def shared_vision_cache(model: FastVLM) -> VisionCache:
    """The VisionCache that sessions of `model` share unless given their own."""
    key = id(model)
    if key not in _SHARED:
        _SHARED[key] = VisionCache()
        weakref.finalize(model, _SHARED.pop, key, None)
    return _SHARED[key]


class ChatSession:
    """A multi-turn chat about one image: `ask` for whole answers, `stream` for one response per token.

    Vision settings (`image_size`, `pruner`, `keep_ratio`, `keep_positions`, `seed` of the random
    pruner and of sampling) hold for the session; `system` is the system message of every conversation."""

    def __init__(
        self,
        model: FastVLM,
        tokenizer,
        image: ImageInput | None = None,
        *,
        system: str | None = None,
        image_size: int | None = None,
        pruner: str | None = None,
        keep_ratio: float | None = None,
        seed: int | None = None,
        vision_cache: VisionCache | None = None,
        keep_positions: bool | None = None,
    ):
        check_seed(seed)
        self.model, self.tokenizer, self.system, self.seed = model, tokenizer, system, seed
        settings = (image_size, pruner, keep_ratio, seed, keep_positions)
        self.settings = VisionSettings.resolve(model.config, *settings)
        self.vision_cache = shared_vision_cache(model) if vision_cache is None else vision_cache
        self.image = None
        self.reset(image)

    def reset(self, image: ImageInput | None = _SAME) -> None:
        """Start a new conversation, about `image` when one is given (the vision cache is kept)."""
        if image is not _SAME:
            self.image = image
        self.messages: list[dict] = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.answer_ids: dict[int, list[int]] = {}  # message index -> the ids this session generated for it
        self.cache = make_prompt_cache(self.model.language_model)
        self.cached: list[int] = []  # the positions the KV cache holds
        self.features: ImageFeatures | None = None
        self.turns = 0

    def stream(self, prompt: str | list[dict], **options) -> Iterator[GenerationResponse]:
        """Answer the next user message (a string), or a whole conversation (a message list that
        replaces this one, its cache reused as far as it matches), one response per token.
        `options`: max_tokens, temperature, top_p, logprobs, as for `generate`."""
        turn, *conversation = self._start(prompt, options)
        yield from self._run(turn, *conversation)

    def ask(self, prompt: str | list[dict], **options) -> GenerationResult:
        """`stream`'s whole answer, with the turn's stage timings."""
        turn, *conversation = self._start(prompt, options)
        for _ in self._run(turn, *conversation):
            pass
        return turn.result()

    def prompt_for(self, prompt: str | list[dict]) -> tuple[Prompt, dict[int, list[int]]]:
        """The turn's Prompt, and the generated ids it reuses: this session's answers where the
        conversation still holds them word for word (text is tokenized again only where it changed)."""
        if self.image is None:
            raise UserError("this chat has no image yet; give one (ChatSession(..., image) or /image PATH)")
        if isinstance(prompt, str):
            messages = [*self.messages, {"role": "user", "content": prompt}]
        else:
            messages = as_messages(prompt)
        known = {i: ids for i, ids in self.answer_ids.items() if messages[i : i + 1] == self.messages[i : i + 1]}
        if self.features is None:  # an instruction-aware pruner ranks the image's tokens by the first question
            self.settings = self.settings.for_prompt(self.tokenizer, messages)
        visual = self.features.tokens_after if self.features else self.settings.visual_tokens(self.model.config)
        turn_prompt = make_prompt(self.tokenizer, messages, visual, self._features, known)
        turn_prompt.image_span = self.settings.image_span(self.model.config)
        return turn_prompt, known

    def _start(self, prompt, options: dict) -> tuple[Turn, list[dict], dict]:
        turn_prompt, known = self.prompt_for(prompt)
        turn = Turn(self.model, self.tokenizer, turn_prompt, cache=self.cache, cached=self.cached, **options)
        if self.turns == 0 and self.seed is not None:
            mx.random.seed(self.seed)
        return turn, turn_prompt.messages, known

    def _run(self, turn: Turn, messages: list[dict], known: dict) -> Iterator[GenerationResponse]:
        try:
            yield from turn
        finally:  # an answer cut short by the caller still is what the model said
            self.messages = [*messages, {"role": "assistant", "content": turn.text}]
            self.answer_ids = {**known, len(messages): list(turn.token_ids)}
            self.turns += 1

    def _features(self) -> ImageFeatures:
        """The image's features: from the vision cache on the first turn, then kept (and free)."""
        if self.features is None:
            self.features = image_features(self.model, self.image, self.settings, self.vision_cache)
            return self.features
        return replace(self.features, preprocess_s=0.0, vision_s=0.0, prune_s=0.0)
