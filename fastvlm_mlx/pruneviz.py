"""Draw what a pruner keeps: the model's input image with its visual-token grid on top."""

import colorsys
import math
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fastvlm_mlx.config import check_image_size
from fastvlm_mlx.errors import UserError, check_writable, naming
from fastvlm_mlx.features import prompt_relevance, resolve_pruning
from fastvlm_mlx.files import create_new, rename_no_replace
from fastvlm_mlx.generate import check_seed
from fastvlm_mlx.images import ImageInput, read_image
from fastvlm_mlx.model import FastVLM
from fastvlm_mlx.preprocess import preprocess
from fastvlm_mlx.prompt import instruction_ids
from pruners import check, needs_prompt, prune

DIM = 0.25  # brightness of dropped tokens
TINT = 0.45  # colour weight on tokens merged into a group


def _palette(count: int) -> np.ndarray:
    """(count, 3) distinct bright colours (golden-ratio hue steps)."""
    hues = (np.arange(count) * 0.618034) % 1.0
    return np.array([colorsys.hsv_to_rgb(h, 0.85, 1.0) for h in hues]) * 255


def render(pixels: np.ndarray, sources: np.ndarray, anchors: np.ndarray, title: str) -> Image.Image:
    """pixels (S, S, 3) in [0, 1]; sources (N,) slot per token or -1; anchors (k,) token of each slot."""
    S, side = pixels.shape[0], math.isqrt(len(sources))
    cell_of_pixel = np.arange(S) * side // S  # (S,) token row/column of each pixel row/column
    slot = sources[cell_of_pixel[:, None] * side + cell_of_pixel[None, :]]  # (S, S)
    group_size = np.bincount(sources[sources >= 0], minlength=len(anchors))
    merged = (slot >= 0) & (group_size[np.maximum(slot, 0)] > 1)
    image = pixels * 255.0
    image = np.where((slot < 0)[..., None], image * DIM, image)
    image = np.where(merged[..., None], image * (1 - TINT) + _palette(len(anchors))[slot] * TINT, image)
    lines = np.flatnonzero(np.diff(cell_of_pixel)) + 1
    image[lines, :] = image[:, lines] = 96
    canvas = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    step = S / side
    for s in np.flatnonzero(group_size > 1):  # outline the token each merged group stands at
        y, x = divmod(int(anchors[s]), side)
        draw.rectangle([x * step, y * step, (x + 1) * step - 1, (y + 1) * step - 1], outline=(255, 255, 255), width=2)
    font = ImageFont.load_default(size=max(12, S // 48))
    draw.rectangle(draw.textbbox((4, 4), title, font=font), fill=(0, 0, 0))
    draw.text((4, 4), title, fill=(255, 255, 255), font=font)
    return canvas


def draw_pruning(
    model: FastVLM,
    image: ImageInput,
    pruner: str | None,
    keep_ratio: float | None,
    output: str | Path,
    *,
    image_size: int | None = None,
    seed: int = 0,
    force: bool = False,
    prompt: str | None = None,
    tokenizer=None,
) -> Path:
    """Run the vision tower and `pruner` on the image and write the picture to `output` (PNG). An
    instruction-aware pruner (`cdpruner`) ranks the tokens by `prompt` (with the model's `tokenizer`)."""
    output = check_output_file(Path(output), force)
    config = model.config
    pruner, keep_ratio = resolve_pruning(config, pruner, keep_ratio)
    if pruner is None:
        raise UserError("prune-viz needs a pruner: add --pruner NAME --keep-ratio R (e.g. divprune 0.25)")
    needs_scores = check(pruner, keep_ratio).needs_scores
    if needs_prompt(pruner, keep_ratio) and not (prompt and tokenizer is not None):
        raise UserError(f"--pruner {pruner} ranks the tokens by a question: add --prompt TEXT")
    check_seed(seed)
    size = check_image_size(image_size or config.image_size, config.vision.stride)
    pixels = preprocess(read_image(image), size, config.preprocess_mode)
    tokens, scores = model.encode_image(mx.array(pixels), with_scores=needs_scores)
    if needs_prompt(pruner, keep_ratio):
        scores = prompt_relevance(model, tokens, instruction_ids(tokenizer, prompt))
    kept = prune(pruner, tokens, keep_ratio, scores=scores, seed=seed)
    N, k = tokens.shape[1], kept.tokens.shape[1]
    title = f"{pruner} keep_ratio={keep_ratio}: {k}/{N} tokens"
    picture = render(pixels[0], np.array(kept.sources[0]), np.array(kept.indices[0]), title)
    with naming(output):
        save_png(picture, output, force)
    return output


def save_png(picture: Image.Image, output: Path, force: bool) -> None:
    """Write beside `output` in a new file of a random name (O_EXCL|O_NOFOLLOW: a link planted there
    is never written through), then rename it into place: without `force` by a no-replace rename, so
    a file that appeared at `output` meanwhile is kept; a failed write leaves `output` as it was."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = create_new(output.parent, f".{output.name}.", ".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            picture.save(f, format="PNG")
        if force:
            partial.replace(output)  # a symlink at `output` is replaced, not followed
        else:
            try:
                rename_no_replace(partial, output)
            except FileExistsError:
                raise UserError(
                    f"{output} appeared while this ran and was left as it is; pass --force to replace it "
                    "or choose another -o path"
                ) from None
    finally:
        partial.unlink(missing_ok=True)


def check_output_file(output: Path, force: bool) -> Path:
    """`output` if a PNG can be written there: not a folder, not existing (even as a dangling link)
    unless `force`, a writable folder."""
    if output.is_dir():
        raise UserError(f"{output} is a folder; give -o a file path, e.g. {output / 'pruning.png'}")
    if os.path.lexists(output) and not force:
        raise UserError(f"{output} already exists; pass --force to replace it or choose another -o path")
    check_writable(output.parent, "-o path")
    return output
