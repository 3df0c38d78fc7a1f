"""Train the mosaic FastVLM from scratch on all tokens, convert it, and score it on the mosaic test set.

    python -m bench.train_mosaic --out fastvlm_mlx/models/mosaic --tuned-out fastvlm_mlx/models/mosaic-tuned

writes OUT/hf and OUT/mlx like bench/train_easyvqa.py (whose training loop this reuses): a
FastViT-MCi tower of stride 16 on 256x256 input (the runtime upscales the 128x128 mosaic),
so 16x16 = 256 visual tokens as FastViTHD gives at 1024x1024, a projector and a small Qwen2.
Trained normally, every step on all tokens, like Apple's checkpoints; the mosaics are drawn
fresh for every step from easy-VQA's train images (bench/mosaic.py), and every second step is
a batch of whole easy-VQA images at 128x128 (a cell at the mosaic's scale), which teaches the
tower to read a cell far sooner than mosaics alone (alone, colour stayed at chance for 6000
steps). Before any of that, the tower alone is pretrained as a shape and colour classifier of
easy-VQA's train images (phase 0, as Apple's FastViTHD was pretrained before its VLM training):
through the LLM alone the tower had not learnt shapes after 6000 easy-VQA steps, as a classifier it
does in under 1000. The RoPE base is chosen for the 16-wide token grid (see TEXT_ARGS). With --tuned-out, a short
pruning-aware fine-tune of the same model (easy-VQA's phase 2 recipe) is written there too.
Accuracies (MLX, greedy, the full mosaic test set) per question type go to --results.
"""

import itertools
import json
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
import torch

import fastvlm_mlx  # noqa: F401  (preloads the BLAS before anything imports mlx)
from bench import easyvqa, mosaic, train_easyvqa
from bench.synthetic import build_reference, make_tokenizer
from bench.train_easyvqa import answer_logits, learning_rate, optimize, optimizer_for, pack_batch, save_source
from convert.convert import convert
from fastvlm_mlx.prompt import SYSTEM_PROMPT

IMAGE_SIZE = 256
GRID = 16  # visual tokens per row at IMAGE_SIZE (stride 16)
# The easy-VQA model's tower (fastvit_mci3 shape, one block per stage, stride 16) at twice the input side,
# and its Qwen2 with 4 layers instead of 2, and a RoPE base that makes the second frequency of each
# head turn once per row of the token grid (theta ** (-2 / head_dim) = 2 pi / GRID): with Qwen2's 1e6
# the nearest one drifts by 0.46 rad a row, so no head can tell a token's column from its position.
VISION_ARGS = train_easyvqa.VISION_ARGS
_HEAD_DIM = train_easyvqa.TEXT_ARGS["hidden_size"] // train_easyvqa.TEXT_ARGS["num_attention_heads"]
TEXT_ARGS = dict(train_easyvqa.TEXT_ARGS, num_hidden_layers=4, rope_theta=(GRID / (2 * math.pi)) ** (_HEAD_DIM / 2))
EASYVQA_EVERY = 2  # every 2nd step is a batch of whole easy-VQA images at 128x128 (one cell's scale), the rest mosaics
VOCAB_SIZE = 400
MOSAICS_PER_BATCH = 4  # each with all of its questions (a step's time grows with it: more, smaller steps)
LR, TUNE_LR = 1e-3, 2e-4
VALIDATION_MOSAICS = 64  # train-split mosaics of another seed, scored during training
PRETRAIN_SIDE, PRETRAIN_BATCH, PRETRAIN_LR = 128, 32, 2e-3  # phase 0: whole easy-VQA images at a cell's scale


class Questions:
    """Token ids of every question/answer pair the templates can make, tokenized once."""

    def __init__(self, tokenizer):
        palette = mosaic.colors()
        pairs = [(q, a) for q in mosaic.every_question_text(palette) for a in mosaic.every_answer(palette)]
        every = easyvqa.Split([q for q, _ in pairs], [a for _, a in pairs], [0] * len(pairs), {})
        self.before, sequences, lengths = easyvqa.answer_sequences(tokenizer, every)
        self.ids = {pair: (seq, n) for pair, seq, n in zip(pairs, sequences, lengths, strict=True)}
        self.pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def batch(self, drawn: list[tuple[mosaic.Mosaic, list[mosaic.Question]]]) -> dict[str, torch.Tensor]:
        pixels = torch.from_numpy(np.stack([mosaic.model_pixels(m.pixels, IMAGE_SIZE) for m, _ in drawn]))
        rows = [(n, self.ids[q.text, q.answer]) for n, (_, questions) in enumerate(drawn) for q in questions]
        return pack_batch(pixels, [n for n, _ in rows], [s for _, (s, _) in rows], [k for _, (_, k) in rows], self.pad)


def build_tokenizer(directory: Path, easy: easyvqa.Split):
    """Byte-level BPE over every templated question and answer, easy-VQA's, and the chat roles."""
    palette = mosaic.colors()
    pairs = [(q, a) for q in mosaic.every_question_text(palette) for a in mosaic.every_answer(palette)]
    pairs += list(zip(easy.questions, easy.answers, strict=True))
    texts = [f"system\n{SYSTEM_PROMPT}\nuser\n\n{q}\nassistant\n{a}" for q, a in pairs]
    return make_tokenizer(directory, texts, vocab_size=VOCAB_SIZE)


def training_batches(
    questions: Questions, rng: np.random.Generator, easy: Iterator | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Fresh train-split mosaics for every step, without end; with `easy` (easy-VQA batches), every
    EASYVQA_EVERY-th step is one of those instead."""
    cells, palette = mosaic.load_cells("train"), mosaic.colors()
    for step in itertools.count(1):
        if easy is not None and step % EASYVQA_EVERY == 0:
            yield next(easy)
            continue
        drawn = []
        for _ in range(MOSAICS_PER_BATCH):
            m = mosaic.make_mosaic(cells, rng)
            drawn.append((m, mosaic.ask(m, rng, palette)))
        yield questions.batch(drawn)


class TowerClassifier(torch.nn.Module):
    """The vision tower with one linear layer on the mean of its tokens: logits of the image's shape
    and of its colour. Only the tower is kept afterwards."""

    def __init__(self, tower, width: int, classes: int):
        super().__init__()
        self.tower, self.head = tower, torch.nn.Linear(width, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(pixels).last_hidden_state.mean((2, 3)))


def cell_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Easy-VQA's usable images of `split` as the runtime prepares them at PRETRAIN_SIDE (NCHW in
    [0, 1]), with their shape and colour indices."""
    cells, palette = mosaic.load_cells(split), mosaic.colors()
    pixels = np.stack([mosaic.model_pixels(p, PRETRAIN_SIDE) for p in cells.pixels])
    shapes = torch.tensor([mosaic.SHAPES.index(s) for s in cells.shapes])
    return (
        torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0,
        shapes,
        torch.tensor([palette.index(c) for c in cells.colors]),
    )


def pretrain_tower(model, steps: int, rng: np.random.Generator) -> dict[str, float]:
    """Phase 0: the tower alone learns the shape and colour of whole easy-VQA train images (cosine
    learning rate, PRETRAIN_BATCH images a step). Returns its accuracies on easy-VQA's test images."""
    (pixels, shapes, cell_colors), n_shapes = cell_tensors("train"), len(mosaic.SHAPES)
    width = model.model.multi_modal_projector.linear_1.in_features
    classifier = TowerClassifier(model.model.vision_tower, width, n_shapes + len(mosaic.colors())).train()
    optimizer = optimizer_for(classifier, PRETRAIN_LR, weight_decay=0.05)
    cross_entropy = torch.nn.functional.cross_entropy
    for step in range(steps):
        chosen = torch.from_numpy(rng.integers(len(pixels), size=PRETRAIN_BATCH))
        logits = classifier(pixels[chosen])
        loss = cross_entropy(logits[:, :n_shapes], shapes[chosen]) + cross_entropy(
            logits[:, n_shapes:], cell_colors[chosen]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, PRETRAIN_LR, min(100, steps // 10))
        optimizer.step()
        if (step + 1) % 100 == 0:
            click.echo(f"tower pretraining: step {step + 1}/{steps}  loss {float(loss):.4f}")
    pixels, shapes, cell_colors = cell_tensors("test")
    classifier.eval()
    with torch.no_grad():
        logits = torch.cat([classifier(pixels[i : i + 256]) for i in range(0, len(pixels), 256)])
    model.train()
    return {
        "shape": float((logits[:, :n_shapes].argmax(1) == shapes).float().mean()),
        "color": float((logits[:, n_shapes:].argmax(1) == cell_colors).float().mean()),
    }


@torch.no_grad()
def torch_accuracy(model, questions: Questions, drawn) -> dict[str, float]:
    """Teacher-forced greedy accuracy of the PyTorch model per question type, and overall."""
    model.eval()
    kinds, hits = [], []
    for start in range(0, len(drawn), 32):
        chunk = drawn[start : start + 32]
        batch = questions.batch(chunk)
        logits, tokens = answer_logits(model, questions.before, batch)
        right = torch.zeros(batch["target"].shape, dtype=torch.bool)
        right[batch["target"]] = logits.argmax(-1) == tokens
        hits += (right | ~batch["target"]).all(dim=1).tolist()
        kinds += [q.kind for _, qs in chunk for q in qs]
    model.train()
    return by_type(kinds, hits)


def by_type(kinds: list[str], hits) -> dict[str, float]:
    hits = np.asarray(hits, dtype=bool)
    table = {"all": float(hits.mean())}
    for kind in mosaic.QUESTION_TYPES:
        chosen = np.array([k == kind for k in kinds])
        table[kind] = float(hits[chosen].mean()) if chosen.any() else float("nan")
    return table


def mlx_accuracy(model_dir: Path, split: easyvqa.Split, kinds: list[str]) -> dict[str, float]:
    """Greedy accuracy (batched teacher forcing = greedy) of the converted model, per question type."""
    from fastvlm_mlx.load import load_model

    model, tokenizer = load_model(model_dir)
    return by_type(kinds, easyvqa.evaluate_mlx(model, tokenizer, split).correct)


def shown(table: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in table.items())


def train(
    out: Path,
    tuned_out: Path | None,
    steps: int,
    tune_steps: int,
    seed: int,
    results: Path | None,
    pretrain_steps: int = 1000,
) -> dict:
    torch.manual_seed(seed)
    rng, prune_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    started = time.perf_counter()
    (out / "hf").mkdir(parents=True, exist_ok=True)
    easy_split = easyvqa.load_split("train")
    tokenizer = build_tokenizer(out / "hf", easy_split)
    questions = Questions(tokenizer)
    easy = train_easyvqa.Batches(easy_split, tokenizer, *train_easyvqa.load_images(easy_split))
    if easy.before != questions.before:
        raise ValueError("easy-VQA and mosaic prompts differ before the image")
    validation = mosaic.draw("train", VALIDATION_MOSAICS, seed + 2)
    text_args = dict(TEXT_ARGS, vocab_size=len(tokenizer))
    model = build_reference(VISION_ARGS, text_args, tokenizer.convert_tokens_to_ids("<image>"), seed=seed).train()
    click.echo(f"{sum(p.numel() for p in model.parameters()):,} parameters, {len(tokenizer)} tokens")
    pretrained = pretrain_tower(model, pretrain_steps, np.random.default_rng(seed + 3)) if pretrain_steps else {}
    minutes = (time.perf_counter() - started) / 60
    click.echo(f"tower pretrained in {minutes:.1f} min; accuracy on easy-VQA test images: {pretrained}")

    def check(step: int) -> None:
        minutes = (time.perf_counter() - started) / 60
        click.echo(
            f"step {step}/{steps}  {minutes:.1f} min  validation: {shown(torch_accuracy(model, questions, validation))}"
        )

    batches = training_batches(questions, rng, easy.epochs(rng))
    optimize(model, questions.before, batches, steps, LR, min(300, steps // 10), check=check, check_every=steps // 20)
    model.eval()
    save_source(model, tokenizer, out / "hf", IMAGE_SIZE)  # torch only until both models are saved
    record = dict(seed=seed, steps=steps, mosaics_per_batch=MOSAICS_PER_BATCH, lr=LR, easyvqa_every=EASYVQA_EVERY)
    record["text_args"] = TEXT_ARGS
    record["pretrain"] = dict(steps=pretrain_steps, lr=PRETRAIN_LR, batch=PRETRAIN_BATCH, test_accuracy=pretrained)
    record["train_minutes"] = (time.perf_counter() - started) / 60
    models = {"normal": out}
    if tuned_out is not None:
        model.train()
        warmup = min(100, tune_steps // 10)
        optimize(model, questions.before, batches, tune_steps, TUNE_LR, warmup, prune_rng, "pruned: ")
        model.eval()
        save_source(model, tokenizer, tuned_out / "hf", IMAGE_SIZE)
        record["tune_steps"], record["tune_minutes"] = (
            tune_steps,
            (time.perf_counter() - started) / 60 - record["train_minutes"],
        )
        models["tuned"] = tuned_out
    score_models(models, record, results)
    record["total_minutes"] = (time.perf_counter() - started) / 60
    click.echo(f"wrote {out} in {record['total_minutes']:.1f} min")
    if results is not None:
        results.write_text(json.dumps(record, indent=2))
    return record


def score_models(models: dict[str, Path], record: dict, results: Path | None = None) -> dict:
    """Convert each saved model (name -> folder with hf/) and add its full-test-set accuracy to
    `record` (written to `results` after each model)."""
    with tempfile.TemporaryDirectory() as folder:
        split, kinds = mosaic.read_test_set(mosaic.write_test_set(Path(folder)))
        record["test_questions"] = len(kinds)
        for name, folder_out in models.items():
            convert(folder_out / "hf", folder_out / "mlx", force=True)
            record[name] = mlx_accuracy(folder_out / "mlx", split, kinds)
            click.echo(f"{name} model ({folder_out}), full test set, MLX greedy, all tokens: {shown(record[name])}")
            if results is not None:
                results.parent.mkdir(parents=True, exist_ok=True)
                results.write_text(json.dumps(record, indent=2))
    return record


@click.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Writes OUT/hf and OUT/mlx.")
@click.option("--tuned-out", type=click.Path(path_type=Path), default=None, help="Also fine-tune pruning-aware, here.")
@click.option("--steps", default=12000, show_default=True, help="Steps on all tokens (every 2nd one easy-VQA).")
@click.option("--pretrain-steps", default=1000, show_default=True, help="Phase 0: the tower alone, as a classifier.")
@click.option("--tune-steps", default=500, show_default=True, help="Pruning-aware steps (with --tuned-out).")
@click.option("--seed", default=0, show_default=True)
@click.option("--results", type=click.Path(path_type=Path), default=None, help="Write the accuracies as JSON here.")
@click.option("--threads", default=1, show_default=True, help="Torch threads (1 copes best with a busy CPU).")
def main(
    out: Path,
    tuned_out: Path | None,
    steps: int,
    pretrain_steps: int,
    tune_steps: int,
    seed: int,
    results: Path | None,
    threads: int,
):
    """Train the mosaic FastVLM from scratch, convert it to MLX, and score it on the mosaic test set."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # denormal floats would slow the CPU kernels as weights shrink
    click.echo(f"started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    train(out, tuned_out, steps, tune_steps, seed, results, pretrain_steps)
    click.echo(f"ended {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")


if __name__ == "__main__":
    main()
