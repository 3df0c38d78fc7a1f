"""FastVLM: vision tower -> MLP projector -> Qwen2 (mlx-lm), with the image splice."""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen2

from fastvlm_mlx.config import FastVLMConfig
from fastvlm_mlx.vision import FastViT


class Projector(nn.Module):
    """`mlp2x_gelu`: Linear -> exact GELU -> Linear."""

    def __init__(self, d_vision: int, d_text: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_vision, d_text)
        self.linear_2 = nn.Linear(d_text, d_text)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.gelu(self.linear_1(x)))


class FastVLM(nn.Module):
    def __init__(self, config: FastVLMConfig):
        super().__init__()
        self.config = config
        text_args = qwen2.ModelArgs.from_dict(config.text)
        self.vision_tower = FastViT(config.vision)
        self.projector = Projector(config.vision.num_features, text_args.hidden_size)
        self.language_model = qwen2.Model(text_args)

    def encode_image(self, pixels: mx.array, with_scores: bool = False):
        """pixels (B, H, W, 3) in [0, 1] -> vision tokens (B, N, D) and optional scores (B, N)."""
        return self.vision_tower(pixels.astype(self.vision_tower.stem[0].reparam_conv.weight.dtype), with_scores)

    def project(self, tokens: mx.array) -> mx.array:
        return self.projector(tokens)

    def splice(self, ids_before: list[int], image_embeds: mx.array, ids_after: list[int]) -> mx.array:
        """Text embeddings with the projected image (1, N, H) in place of the `<image>` token."""
        embed = self.language_model.model.embed_tokens
        parts = [embed(mx.array([ids], dtype=mx.int32)) for ids in (ids_before, ids_after)]
        return mx.concatenate([parts[0], image_embeds.astype(parts[0].dtype), parts[1]], axis=1)

    def head(self, hidden: mx.array) -> mx.array:
        """Qwen2's output head (tied or not) on final hidden states."""
        lm = self.language_model
        return lm.model.embed_tokens.as_linear(hidden) if lm.args.tie_word_embeddings else lm.lm_head(hidden)

    def logits(self, input_embeddings: mx.array, cache=None) -> mx.array:
        """Full-sequence logits (B, L, V) from merged input embeddings."""
        return self.language_model(None, cache=cache, input_embeddings=input_embeddings)
