"""FastVLM: vision tower -> MLP projector -> Qwen2 (mlx-lm), with the image splice.

Position-preserving pruning (GAP, arXiv 2506.21873) gives a sequence's visual tokens the RoPE
positions they had before pruning. The positions ride on the sequence's KV cache (`carry_positions`
sets them on each layer's cache), not on the model: Qwen2's attention layers of a FastVLM are
`Attention`, which rotates queries and keys at the positions the cache carries (`rotate`), so one
model serves sequences with and without them, and a batch cache could carry one row per sequence.
"""

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


def gap_positions(before: int, kept: list[int], tokens: int, after: int) -> list[int]:
    """A prompt's RoPE positions with the image pruned in place (GAP): `before` text positions, the
    kept visual tokens where they stood among the image's `tokens`, then `after` from the unpruned end."""
    end = before + tokens
    return [*range(before), *(before + i for i in kept), *range(end, end + after)]


class SlotPositions:
    """The RoPE position of each KV-cache slot: `rows[b][s]` for the first slots of batch row b
    (one row for a single sequence), one more per slot after them. Shared by the layer caches
    of the sequence or batch (`cache.positions`)."""

    def __init__(self, rows: list[list[int]]):
        self.rows = rows
        self._last: tuple = (None, None, None)  # every layer asks for the same slots in turn

    def at(self, start: int, length: int) -> int | mx.array:
        """Positions of slots start .. start + length - 1: the first where every row runs on by one
        from the same place (RoPE's offset, as mlx-lm passes it), else (length,) or (B, length) int32."""
        if self._last[:2] == (start, length):
            return self._last[2]
        runs = [[row[s] if s < len(row) else s + row[-1] + 1 - len(row) for s in range(start, start + length)]
                for row in self.rows]  # fmt: skip
        same = all(run == runs[0] for run in runs)
        if same and runs[0] == list(range(runs[0][0], runs[0][0] + length)):
            found = runs[0][0]
        else:
            found = mx.array(runs[0] if same else runs, dtype=mx.int32)
        self._last = (start, length, found)
        return found


def carry_positions(cache: list, positions: list[int] | list[list[int]] | None) -> None:
    """Give each layer's cache the RoPE positions of its slots: a list for one sequence, or one
    per batch row (None, or each slot's own index: none, mlx-lm's RoPE call unchanged)."""
    rows = [] if positions is None else positions if positions and isinstance(positions[0], list) else [positions]
    plain = all(row == list(range(len(row))) for row in rows)
    slots = None if plain else SlotPositions(rows)
    for layer in cache:
        layer.positions = slots


def rotate(rope, x: mx.array, cache) -> mx.array:
    """RoPE on queries or keys (B, heads, L, D) about to fill the cache's next L slots, at the positions
    the cache carries, else at the slots' indices (mlx-lm's call, unchanged)."""
    if cache is None:
        return rope(x)
    positions = getattr(cache, "positions", None)
    if positions is None:  # an int, or a batch cache's (B,) offsets
        return rope(x, offset=cache.offset)
    offset = positions.at(cache.offset, x.shape[2])
    if isinstance(offset, int):
        return rope(x, offset=offset)
    B, H, L, D = x.shape  # each position a batch row of its own: RoPE takes one offset per row
    rows = x.transpose(0, 2, 1, 3).reshape(B * L, H, 1, D)
    rows = rope(rows, offset=mx.broadcast_to(offset, (B, L)).reshape(-1))  # (L,) or a batch's (B, L)
    return rows.reshape(B, L, H, D).transpose(0, 2, 1, 3)


class Attention(qwen2.Attention):
    """mlx-lm's Qwen2 attention, rotating at the positions the cache carries (`rotate`)."""

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        if getattr(cache, "positions", None) is None:
            return super().__call__(x, mask, cache)
        B, L, _ = x.shape
        queries = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        queries, keys = rotate(self.rope, queries, cache), rotate(self.rope, keys, cache)
        keys, values = cache.update_and_fetch(keys, values)
        out = qwen2.scaled_dot_product_attention(queries, keys, values, cache=cache, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class FastVLM(nn.Module):
    def __init__(self, config: FastVLMConfig):
        super().__init__()
        self.config = config
        text_args = qwen2.ModelArgs.from_dict(config.text)
        self.vision_tower = FastViT(config.vision)
        self.projector = Projector(config.vision.num_features, text_args.hidden_size)
        self.language_model = qwen2.Model(text_args)
        for layer in self.language_model.layers:  # this model's layers only, not mlx-lm's class
            layer.self_attn.__class__ = Attention

    def encode_image(self, pixels: mx.array, with_scores: bool = False):
        """pixels (B, H, W, 3) in [0, 1] -> vision tokens (B, N, D) and optional scores (B, N)."""
        return self.vision_tower(self._tower_input(pixels), with_scores)

    def encode_image_pieces(self, pixels: mx.array, with_scores: bool = False):
        """`encode_image` a piece of the tower at a time (FastViT.pieces): its last item is the result."""
        return self.vision_tower.pieces(self._tower_input(pixels), with_scores)

    def _tower_input(self, pixels: mx.array) -> mx.array:
        return pixels.astype(self.vision_tower.stem[0].reparam_conv.weight.dtype)

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

    def next_logprobs(self, hidden: mx.array) -> mx.array:
        """Log-probabilities (B, V) of the token after each row's last position, from final hidden states."""
        logits = self.head(hidden[:, -1, :])
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def logits(self, input_embeddings: mx.array, cache=None) -> mx.array:
        """Full-sequence logits (B, L, V) from merged input embeddings."""
        return self.language_model(None, cache=cache, input_embeddings=input_embeddings)
