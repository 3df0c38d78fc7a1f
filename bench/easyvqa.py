"""easy-VQA (PyPI `easy-vqa`, MIT): 64x64 shape images with questions, read offline.

Questions, their answers and image paths per split, pixels prepared exactly as the runtime
prepares them, and answer scoring.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastvlm_mlx.preprocess import load_image, resize_and_crop
from fastvlm_mlx.prompt import tokenize_prompt

SPLITS = ("train", "test")


@dataclass
class Split:
    questions: list[str]
    answers: list[str]
    image_ids: list[int]
    image_paths: dict[int, Path]


def load_split(split: str) -> Split:
    """All questions of `split` ("train" or "test") with their gold answers and image files."""
    import easy_vqa

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    questions, answers, image_ids = (
        easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    )
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    return Split(
        list(questions), list(answers), [int(i) for i in image_ids], {int(k): Path(v) for k, v in paths.items()}
    )


def load_pixels(paths: list[Path], size: int) -> np.ndarray:
    """(N, size, size, 3) uint8; divided by 255 this equals `preprocess(..., mode="crop")`."""
    return np.stack([np.asarray(resize_and_crop(load_image(p), size), dtype=np.uint8) for p in paths])


def normalize(answer: str) -> str:
    return answer.strip().lower()


def subset(data: Split, limit: int | None) -> Split:
    """The first `limit` questions (all when None), with only the images they use."""
    n = len(data.questions) if limit is None else limit
    ids = data.image_ids[:n]
    return Split(data.questions[:n], data.answers[:n], ids, {i: data.image_paths[i] for i in set(ids)})


def answer_sequences(tokenizer, data: Split) -> tuple[list[int], list[list[int]], list[int]]:
    """Prompt ids before the image (the same for every question), and per question the ids after
    it followed by the answer and `<|im_end|>`, and that answer's length in tokens."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    before, sequences, lengths = None, [], []
    for question, answer in zip(data.questions, data.answers, strict=True):
        ids_before, ids_after = tokenize_prompt(tokenizer, question)
        if before not in (None, ids_before):
            raise ValueError("the prompt before the image differs between questions")
        before = ids_before
        reply = tokenizer.encode(answer, add_special_tokens=False) + [eos]
        sequences.append(ids_after + reply)
        lengths.append(len(reply))
    return before, sequences, lengths


def by_image(data: Split) -> dict[int, list[int]]:
    """Question indices grouped by image id, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for q, image in enumerate(data.image_ids):
        groups.setdefault(image, []).append(q)
    return groups


@dataclass
class Scored:
    """Teacher-forced greedy answers: `predicted[q]` is the argmax token at each answer position of
    question q, and `correct[q]` says all of them equal the gold answer and eos, which holds exactly
    when greedy decoding outputs the gold answer."""

    predicted: list[tuple[int, ...]]
    correct: np.ndarray

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.correct) else 0.0


def score(predicted: list[tuple[int, ...]], sequences: list[list[int]], lengths: list[int]) -> Scored:
    gold = [tuple(seq[-n:]) for seq, n in zip(sequences, lengths, strict=True)]
    return Scored(predicted, np.array([p == g for p, g in zip(predicted, gold, strict=True)], dtype=bool))


def evaluate_mlx(
    model,
    tokenizer,
    data: Split,
    pruner: str | None = None,
    keep_ratio: float = 1.0,
    images_per_batch: int = 50,
    seed: int = 0,
    progress=None,
    image_size: int | None = None,
    keep_positions: bool = False,
    vision_cache: dict | None = None,
) -> Scored:
    """Answer every question of `data` with the MLX runtime's own stages, batched by image:
    encode the images (resized to `image_size`, default the model's), prune their tokens,
    project, run the LLM over the prompt up to and including the image once per image, then over
    each question + answer from a copy of that KV cache (right padding; causal attention leaves
    the real positions untouched). With `keep_positions`, the
    kept visual tokens take the RoPE positions they had unpruned and the text continues from the
    unpruned length (as `generate(..., keep_positions=True)`). `progress(n)` is told how many
    images were done. A `vision_cache` dict keeps each batch's vision tokens and scores for the
    next call with the same data, batching and size (pruners x ratios encode the images once).
    An instruction-aware pruner (`cdpruner`) prunes each question's own copy of its image, ranked by
    the question's text as `generate` does, so those rows prefill the image once per question."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from fastvlm_mlx.features import prompt_relevance, prune_tokens
    from fastvlm_mlx.model import carry_positions, gap_positions
    from fastvlm_mlx.prompt import instruction_ids
    from pruners import needs_prompt, needs_scores

    scored, per_question = needs_scores(pruner, keep_ratio), needs_prompt(pruner, keep_ratio)
    before, sequences, lengths = answer_sequences(tokenizer, data)
    groups = by_image(data)
    images = list(groups)
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    embed = model.language_model.model.embed_tokens
    prefix = embed(mx.array([before], dtype=mx.int32))
    predicted: list[tuple[int, ...]] = [()] * len(sequences)
    for start in range(0, len(images), images_per_batch):
        chunk = images[start : start + images_per_batch]
        size = image_size or model.config.image_size
        key = (size, tuple(str(data.image_paths[i]) for i in chunk))
        if vision_cache is None or key not in vision_cache:
            pixels = mx.array(load_pixels([data.image_paths[i] for i in chunk], size).astype(np.float32) / 255.0)
            encoded = model.encode_image(pixels, with_scores=scored or vision_cache is not None)
            if vision_cache is not None:
                mx.eval(encoded)
                vision_cache[key] = encoded
        tokens, scores = encoded if vision_cache is None else vision_cache[key]
        questions = [q for i in chunk for q in groups[i]]
        slots = [n for n, i in enumerate(chunk) for _ in groups[i]]
        if per_question:  # each question ranks its image's tokens by its own text: one image copy per question
            tokens = tokens[mx.array(slots)]
            scores = mx.concatenate([
                prompt_relevance(model, tokens[row : row + 1], instruction_ids(tokenizer, data.questions[q]))
                for row, q in enumerate(questions)])  # fmt: skip
        pruned = prune_tokens(tokens, scores, pruner, keep_ratio, seed)
        image = model.project(pruned.tokens)
        width = max(len(sequences[q]) for q in questions)
        ids = np.full((len(questions), width), pad, dtype=np.int32)
        for row, q in enumerate(questions):
            ids[row, : len(sequences[q])] = sequences[q]
        image_rows = None  # each image's RoPE positions with keep_positions, the text from the unpruned end
        if keep_positions and pruner is not None:
            kept = np.array(pruned.indices).tolist()
            image_rows = [gap_positions(len(before), row, tokens.shape[1], 1) for row in kept]
        cache = make_prompt_cache(model.language_model)
        carry_positions(cache, image_rows)
        model.language_model(None, cache=cache, input_embeddings=mx.concatenate([
            mx.broadcast_to(prefix, (len(image), *prefix.shape[1:])), image.astype(prefix.dtype)], axis=1))  # fmt: skip
        if not per_question:
            for layer in cache:  # the prompt up to the image once per image, copied to each of its questions
                keys, values, filled = layer.state
                layer.state = (keys[:, :, :filled][mx.array(slots)], values[:, :, :filled][mx.array(slots)], filled)
            image_rows = None if image_rows is None else [image_rows[n] for n in slots]
        carry_positions(cache, image_rows)
        logits = model.language_model(None, cache=cache, input_embeddings=embed(mx.array(ids)))
        best = np.array(mx.argmax(logits, axis=-1))
        for row, q in enumerate(questions):
            first = len(sequences[q]) - lengths[q] - 1  # position t predicts the token at t + 1
            predicted[q] = tuple(int(t) for t in best[row, first : first + lengths[q]])
        if progress:
            progress(len(chunk))
    return score(predicted, sequences, lengths)


def accuracy_table(model, tokenizer, data: Split, pruners: list[str], keep_ratios: list[float]) -> dict:
    """{pruner: {keep ratio: accuracy}} with "none" at ratio 1, over every question of `data`."""
    import sys

    import click

    settings = [("none", 1.0)] + [(p, r) for p in pruners for r in keep_ratios if r < 1]
    table: dict[str, dict[float, float]] = {}
    images = len(set(data.image_ids))
    with click.progressbar(length=images * len(settings), label="easy-VQA", file=sys.stderr) as bar:
        for name, ratio in settings:
            scored = evaluate_mlx(model, tokenizer, data, None if name == "none" else name, ratio, progress=bar.update)
            table.setdefault(name, {})[ratio] = scored.accuracy
    return table


def plot_table(table: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in table.items():
        if name == "none":
            ax.axhline(row[1.0], color="black", linestyle="--", label="unpruned")
            continue
        ratios = sorted(row)
        ax.plot(ratios, [row[r] for r in ratios], marker="o", label=name)
    ax.set(xscale="log", xlabel="keep ratio", ylabel="answer accuracy", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    import json

    import click

    from fastvlm_mlx.load import load_model
    from pruners import PRUNERS

    @click.command()
    @click.option("--model", "model_dir", default=None, help="Converted MLX model (default: the shipped one).")
    @click.option("--limit", type=int, default=None, help="First N test questions (default: all 9673).")
    @click.option("--pruners", default="all", show_default=True, help="Comma-separated names, all, or none.")
    @click.option("--keep-ratios", default="0.5,0.25,0.125", show_default=True)
    @click.option(
        "--out", default="bench-results/easyvqa-accuracy", show_default=True, help="Writes OUT.json, OUT.png."
    )
    def run(model_dir, limit, pruners, keep_ratios, out):
        """Answer accuracy on easy-VQA's test split for every pruner and keep ratio (MLX runtime)."""
        names = {"all": sorted(PRUNERS), "none": []}.get(pruners)
        names = [p.strip() for p in pruners.split(",") if p.strip()] if names is None else names
        ratios = [float(r) for r in keep_ratios.split(",")]
        model, tokenizer = load_model(model_dir)
        data = subset(load_split("test"), limit)
        table = accuracy_table(model, tokenizer, data, names, ratios)
        click.echo(f"{'method':<12}" + "".join(f"{r:>8g}" for r in [1.0, *ratios]))
        for name, row in table.items():
            click.echo(f"{name:<12}" + "".join(f"{row[r]:>8.4f}" if r in row else f"{'':>8}" for r in [1.0, *ratios]))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        record = dict(model=model_dir or "embedded", questions=len(data.questions), accuracy=table)
        Path(f"{out}.json").write_text(json.dumps(record, indent=2))
        plot = plot_table(table, Path(f"{out}.png"), f"easy-VQA test split, {len(data.questions)} questions")
        click.echo(f"wrote {out}.json and {plot}")

    run()


if __name__ == "__main__":
    main()
