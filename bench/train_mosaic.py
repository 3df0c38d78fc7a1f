"""Train the mosaic FastVLM from scratch on all tokens, convert it, and score it on the mosaic test set.

    python -m bench.train_mosaic --out fastvlm_mlx/models/mosaic --tuned-out fastvlm_mlx/models/mosaic-tuned

writes OUT/hf and OUT/mlx like bench/train_easyvqa.py (whose training loop this reuses): a
FastViT-MCi tower of stride 16 on 256x256 input (the runtime upscales the 128x128 mosaic),
so 16x16 = 256 visual tokens as FastViTHD gives at 1024x1024, a projector and a small Qwen2.
Trained normally, every step on all tokens, like Apple's checkpoints; the mosaics are drawn
fresh for every step from easy-VQA's train images (bench/mosaic.py), and every second step is
a batch of whole easy-VQA images at 128x128 (a cell at the mosaic's scale), which teaches the
tower to read a cell far sooner than mosaics alone (alone, colour stayed at chance for 6000
steps). After every VLM step the tower also takes a step as a shape and colour classifier of
whole easy-VQA train images (CellTeacher, a linear head on the mean of its tokens): through the
LLM alone it had not learnt shapes after 6000 easy-VQA steps, as a classifier it does in under
1000. (Pretraining it as a classifier first instead left the LLM stuck on answers that ignore
where things are.) The RoPE base is chosen for the 16-wide token grid, and the output head is not
tied to the embeddings (see TEXT_ARGS); a third of the mosaics draw their shapes from two colours
only, so that `how many <colour> shapes` has answers other than 0 and 1 to learn from (the two
together took that question from its prior, 63%, to 87.9% on the full test set). With --tuned-out, a short
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
# Untied output head: tied, the question's colour words (` red`, ...: never an answer, which is `red`)
# are pushed alike by every answer's softmax, their embeddings drew together (cosine 0.53-0.90) and
# `how many <colour> shapes` stayed at its prior through 8000 steps.
TEXT_ARGS = dict(
    train_easyvqa.TEXT_ARGS,
    num_hidden_layers=4,
    rope_theta=(GRID / (2 * math.pi)) ** (_HEAD_DIM / 2),
    tie_word_embeddings=False,
)
EASYVQA_EVERY = 2  # every 2nd step is a batch of whole easy-VQA images at 128x128 (one cell's scale), the rest mosaics
TEACH_EVERY = 1  # a step of the cell teacher (CellTeacher) after every VLM step
VOCAB_SIZE = 400
MOSAICS_PER_BATCH = 4  # each with all of its questions (a step's time grows with it: more, smaller steps)
LR, TUNE_LR = 1e-3, 2e-4
VALIDATION_MOSAICS = 64  # train-split mosaics of another seed, scored during training
TEACHER_SIDE, TEACHER_BATCH, TEACHER_LR = 128, 32, 1e-3  # the cell teacher: whole easy-VQA images at a cell's scale
TWO_COLOR_SHARE = 0.33  # training mosaics whose shapes take two colours only: colour counts of 0 to 4, not mostly 0-1


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


def two_color_cells(cells: mosaic.Cells, palette: tuple[str, ...]) -> list[mosaic.Cells]:
    """`cells` restricted to each pair of colours: mosaics drawn from one have colour counts of 0 to 4,
    where ordinary ones answer 1 to two colour counts in three."""
    kept = []
    for pair in itertools.combinations(palette, 2):
        k = np.array([c in pair for c in cells.colors])
        pick = lambda values, k=k: tuple(v for v, chosen in zip(values, k, strict=True) if chosen)  # noqa: E731
        kept.append(mosaic.Cells(cells.pixels[k], pick(cells.shapes), pick(cells.colors), pick(cells.image_ids)))
    return kept


def training_batches(
    questions: Questions,
    rng: np.random.Generator,
    easy: Iterator | None = None,
    every: int = EASYVQA_EVERY,
    two_color_share: float = TWO_COLOR_SHARE,
) -> Iterator[dict[str, torch.Tensor]]:
    """Fresh train-split mosaics for every step, without end; with `easy` (easy-VQA batches), every
    `every`-th step is one of those instead. A `two_color_share` of the mosaics draw their shapes
    from two colours only (`two_color_cells`)."""
    cells, palette = mosaic.load_cells("train"), mosaic.colors()
    pairs = two_color_cells(cells, palette) if two_color_share else []
    for step in itertools.count(1):
        if easy is not None and step % every == 0:
            yield next(easy)
            continue
        drawn = []
        for _ in range(MOSAICS_PER_BATCH):
            two = two_color_share and rng.random() < two_color_share
            m = mosaic.make_mosaic(pairs[int(rng.integers(len(pairs)))] if two else cells, rng)
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
    """Easy-VQA's usable images of `split` as the runtime prepares them at TEACHER_SIDE (NCHW in
    [0, 1]), with their shape and colour indices."""
    cells, palette = mosaic.load_cells(split), mosaic.colors()
    pixels = np.stack([mosaic.model_pixels(p, TEACHER_SIDE) for p in cells.pixels])
    shapes = torch.tensor([mosaic.SHAPES.index(s) for s in cells.shapes])
    return (
        torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0,
        shapes,
        torch.tensor([palette.index(c) for c in cells.colors]),
    )


class CellTeacher:
    """The tower alone as a shape and colour classifier of whole easy-VQA train images (its own AdamW
    and linear head), stepped after every `every`-th step of the VLM's training: a dense signal that
    teaches the tower shapes far sooner than the answers through the LLM do."""

    def __init__(self, model, rng: np.random.Generator, steps: int, every: int):
        self.pixels, self.shapes, self.colors = cell_tensors("train")
        width = model.model.multi_modal_projector.linear_1.in_features
        self.classifier = TowerClassifier(model.model.vision_tower, width, len(mosaic.SHAPES) + len(mosaic.colors()))
        self.optimizer = optimizer_for(self.classifier, TEACHER_LR, weight_decay=0.05)
        self.rng, self.steps, self.every, self.loss = rng, steps, every, float("nan")

    def __call__(self, step: int) -> None:
        if step % self.every:
            return
        chosen = torch.from_numpy(self.rng.integers(len(self.pixels), size=TEACHER_BATCH))
        loss = self.classifier_loss(self.classifier(self.pixels[chosen]), self.shapes[chosen], self.colors[chosen])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step - 1, self.steps, TEACHER_LR, min(300, self.steps // 10))
        self.optimizer.step()
        self.loss = float(loss.detach())

    @staticmethod
    def classifier_loss(logits: torch.Tensor, shapes: torch.Tensor, cell_colors: torch.Tensor) -> torch.Tensor:
        n = len(mosaic.SHAPES)
        cross_entropy = torch.nn.functional.cross_entropy
        return cross_entropy(logits[:, :n], shapes) + cross_entropy(logits[:, n:], cell_colors)

    @torch.no_grad()
    def test_accuracy(self) -> dict[str, float]:
        """Shape and colour accuracy of the classifier on easy-VQA's test images."""
        pixels, shapes, cell_colors = cell_tensors("test")
        self.classifier.eval()
        logits = torch.cat([self.classifier(pixels[i : i + 256]) for i in range(0, len(pixels), 256)])
        self.classifier.train()
        n = len(mosaic.SHAPES)
        shape = (logits[:, :n].argmax(1) == shapes).float().mean()
        return {"shape": float(shape), "color": float((logits[:, n:].argmax(1) == cell_colors).float().mean())}


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
    easyvqa_every: int = EASYVQA_EVERY,
    teach_every: int = TEACH_EVERY,
    text_layers: int = TEXT_ARGS["num_hidden_layers"],
    tied: bool = TEXT_ARGS["tie_word_embeddings"],
    two_color_share: float = TWO_COLOR_SHARE,
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
    text_args = dict(TEXT_ARGS, vocab_size=len(tokenizer), num_hidden_layers=text_layers, tie_word_embeddings=tied)
    model = build_reference(VISION_ARGS, text_args, tokenizer.convert_tokens_to_ids("<image>"), seed=seed).train()
    click.echo(f"{sum(p.numel() for p in model.parameters()):,} parameters, {len(tokenizer)} tokens")
    teacher = CellTeacher(model, np.random.default_rng(seed + 3), steps, teach_every) if teach_every else None

    def check(step: int) -> None:
        minutes = (time.perf_counter() - started) / 60
        taught = f"  teacher loss {teacher.loss:.4f}" if teacher else ""
        click.echo(
            f"step {step}/{steps}  {minutes:.1f} min  validation: {shown(torch_accuracy(model, questions, validation))}"
            + taught
        )

    batches = training_batches(
        questions, rng, easy.epochs(rng) if easyvqa_every else None, easyvqa_every, two_color_share
    )
    warmup, every = min(300, steps // 10), steps // 20
    optimize(model, questions.before, batches, steps, LR, warmup, check=check, check_every=every, after_step=teacher)
    model.eval()
    save_source(model, tokenizer, out / "hf", IMAGE_SIZE)  # torch only until both models are saved
    record = dict(seed=seed, steps=steps, mosaics_per_batch=MOSAICS_PER_BATCH, lr=LR, easyvqa_every=easyvqa_every)
    record["text_args"] = dict(TEXT_ARGS, num_hidden_layers=text_layers, tie_word_embeddings=tied)
    record["two_color_share"] = two_color_share
    if teacher is not None:
        record["teacher"] = dict(every=teach_every, lr=TEACHER_LR, batch=TEACHER_BATCH, test=teacher.test_accuracy())
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
@click.option("--steps", default=8000, show_default=True, help="Steps of the VLM on all tokens.")
@click.option("--easyvqa-every", default=EASYVQA_EVERY, show_default=True, help="Every Nth step easy-VQA (0: never).")
@click.option("--teach-every", default=TEACH_EVERY, show_default=True, help="A cell-teacher step every N (0: none).")
@click.option("--text-layers", default=TEXT_ARGS["num_hidden_layers"], show_default=True, help="Qwen2 layers.")
@click.option("--tied/--untied", default=TEXT_ARGS["tie_word_embeddings"], show_default=True, help="Tie lm_head.")
@click.option("--two-color-share", default=TWO_COLOR_SHARE, show_default=True, help="Two-colour mosaics' share.")
@click.option("--tune-steps", default=600, show_default=True, help="Pruning-aware steps (with --tuned-out).")
@click.option("--seed", default=0, show_default=True)
@click.option("--results", type=click.Path(path_type=Path), default=None, help="Write the accuracies as JSON here.")
@click.option("--threads", default=1, show_default=True, help="Torch threads (1 copes best with a busy CPU).")
def main(
    out: Path,
    tuned_out: Path | None,
    steps: int,
    easyvqa_every: int,
    teach_every: int,
    text_layers: int,
    tied: bool,
    two_color_share: float,
    tune_steps: int,
    seed: int,
    results: Path | None,
    threads: int,
):
    """Train the mosaic FastVLM from scratch, convert it to MLX, and score it on the mosaic test set."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # denormal floats would slow the CPU kernels as weights shrink
    click.echo(f"started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    options = dict(text_layers=text_layers, tied=tied, two_color_share=two_color_share)
    train(out, tuned_out, steps, tune_steps, seed, results, easyvqa_every, teach_every, **options)
    click.echo(f"ended {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")


if __name__ == "__main__":
    main()
