"""Train a small FastVLM (FastViT-MCi tower -> MLP projector -> Qwen2) on easy-VQA, then convert it.

    python -m bench.train_easyvqa --out fastvlm_mlx/models/easyvqa

writes OUT/hf (a transformers `fast_vlm` checkpoint) and OUT/mlx (converted). Seeded; the
loss is on the answer tokens and `<|im_end|>` only. Each image is encoded once per step and
its vision tokens are shared by all of its questions.

Pruning-aware: after 35 epochs on all tokens, 5 more epochs where most steps send the vision
tokens through one of the `pruners` methods (their PyTorch twins, the same tokens as at
inference) at a random keep ratio, so the LLM answers from any spatially ordered subset or
merge of the grid, not only from all of it. About 36 minutes on a 2-core x86 CPU.
"""

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import numpy as np
import torch

import fastvlm_mlx  # noqa: F401  (preloads the BLAS before anything imports mlx)
from bench import easyvqa
from bench.synthetic import build_reference, make_tokenizer, save_checkpoint
from bench.torch_pipeline import encode_image
from bench.torch_pruners import torch_prune
from convert.convert import convert
from fastvlm_mlx.prompt import SYSTEM_PROMPT
from pruners import needs_scores

IMAGE_SIZE = 128
# fastvit_mci3 with one block per stage and two downsampling stages: stride 16, so 128x128
# pixels give an 8x8 grid of 64 tokens; stages 3 and 4 stay attention (pruner scores).
VISION_ARGS = dict(
    layers=(1, 1, 1, 1, 1),
    embed_dims=(32, 64, 64, 128, 128),
    downsamples=(False, True, False, True, False),
)
TEXT_ARGS = dict(
    hidden_size=128,
    num_hidden_layers=2,
    intermediate_size=384,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
VOCAB_SIZE = 400
IMAGES_PER_BATCH = 8  # each with all of its questions
LR, PRUNE_LR = 5e-4, 2e-4  # peaks of the two phases' cosine schedules
# Phase 2, per step: no pruning with probability UNPRUNED_SHARE, else a uniformly drawn method and ratio.
UNPRUNED_SHARE = 0.4
TRAIN_KEEP_RATIOS = (0.5, 0.25, 0.125)
# The methods of the shipped model's recipe, in a fixed order (the draws depend on it); not the
# instruction-aware `cdpruner`, which came later and ranks by a question.
TRAIN_PRUNERS = ("attention", "divprune", "norm", "pool", "random", "similarity", "visionzip")


def build_tokenizer(directory: Path, data: easyvqa.Split):
    """Byte-level BPE over the dataset's questions and answers and the chat roles."""
    pairs = zip(data.questions, data.answers, strict=True)
    texts = [f"system\n{SYSTEM_PROMPT}\nuser\n\n{q}\nassistant\n{a}" for q, a in pairs]
    return make_tokenizer(directory, texts, vocab_size=VOCAB_SIZE)


class Batches:
    """Questions grouped by image, padded to a tensor, with the positions that carry loss."""

    def __init__(self, data: easyvqa.Split, tokenizer, pixels: np.ndarray, image_index: dict[int, int]):
        self.before, sequences, lengths = easyvqa.answer_sequences(tokenizer, data)
        self.pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.pixels = torch.from_numpy(pixels)  # (N, S, S, 3) uint8
        self.slots = np.array([image_index[i] for i in data.image_ids])
        self.sequences, self.lengths = sequences, np.array(lengths)
        self.by_image = {image_index[i]: qs for i, qs in easyvqa.by_image(data).items()}  # slot -> questions

    def make(self, images: list[int]) -> dict[str, torch.Tensor]:
        questions = [q for i in images for q in self.by_image[i]]
        local = {image: n for n, image in enumerate(images)}
        slots = [local[int(self.slots[q])] for q in questions]
        batch = pack_batch(
            self.pixels[images],
            slots,
            [self.sequences[q] for q in questions],
            [self.lengths[q] for q in questions],
            self.pad,
        )
        return dict(batch, questions=torch.tensor(questions))

    def epochs(self, rng: np.random.Generator) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of IMAGES_PER_BATCH whole images, each epoch in a new order of `rng`, without end."""
        while True:
            order = rng.permutation(sorted(self.by_image))
            for i in range(0, len(order), IMAGES_PER_BATCH):
                yield self.make([int(x) for x in order[i : i + IMAGES_PER_BATCH]])


def pack_batch(
    pixels: torch.Tensor, slots: list[int], sequences: list[list[int]], lengths: list[int], pad: int
) -> dict[str, torch.Tensor]:
    """A training batch: pixels (B, S, S, 3) uint8 as NCHW floats, and per question its image's
    slot in `pixels`, its ids after the image right-padded with `pad`, and the answer positions."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad)
    target = torch.zeros((len(sequences), width), dtype=torch.bool)  # tokens to predict
    for row, (seq, n) in enumerate(zip(sequences, lengths, strict=True)):
        ids[row, : len(seq)] = torch.tensor(seq)
        target[row, len(seq) - n : len(seq)] = True
    return dict(pixels=pixels.permute(0, 3, 1, 2).float() / 255.0, slots=torch.tensor(slots), ids=ids, target=target)


def answer_logits(
    model, before: list[int], batch: dict[str, torch.Tensor], pruner: str | None = None, keep_ratio: float = 1.0, seed=0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict answer tokens, and those tokens: (T, V), (T,).

    The prompt up to and including the image is run once per image; its KV cache is then
    copied to each of that image's questions (the same causal attention as a full sequence).
    """
    scored = needs_scores(pruner, keep_ratio)
    vision, scores = encode_image(model, batch["pixels"], scored)
    if pruner is not None:
        vision = torch_prune(pruner, vision, keep_ratio, None if scores is None else scores.detach(), seed=seed)[0]
    image = model.model.multi_modal_projector(vision)  # (B, N, H)
    embed = model.get_input_embeddings()
    prefix = torch.cat([embed(torch.tensor([before])).expand(len(image), -1, -1), image], dim=1)
    cache = model.model.language_model(inputs_embeds=prefix, use_cache=True).cache
    cache.batch_select_indices(batch["slots"])
    hidden = model.model.language_model(inputs_embeds=embed(batch["ids"]), cache=cache).last_hidden_state
    predicting = hidden[:, :-1][batch["target"][:, 1:]]  # position t predicts token t + 1; answers follow questions
    return model.lm_head(predicting), batch["ids"][batch["target"]]


def exact_matches(logits: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per question: every answer token (eos too) is the argmax, i.e. greedy decoding is right."""
    hits = torch.zeros(target.shape, dtype=torch.bool)
    hits[target] = logits.argmax(-1) == tokens
    return (hits | ~target).all(dim=1)


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def optimizer_for(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """No weight decay on biases, norms, layer scales and embeddings."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed_tokens" not in name else plain).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=plain, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


def pruning_for(rng: np.random.Generator) -> tuple[str | None, float]:
    """The pruner and keep ratio a training step uses (None, 1.0: all tokens)."""
    if rng.random() < UNPRUNED_SHARE:
        return None, 1.0
    return str(rng.choice(TRAIN_PRUNERS)), float(rng.choice(TRAIN_KEEP_RATIOS))


@torch.no_grad()
def evaluate(
    model, batches: Batches, pruner: str | None = None, keep_ratio: float = 1.0, images_per_batch: int = 64
) -> easyvqa.Scored:
    """Teacher-forced greedy answers of the PyTorch model (in eval mode), per question."""
    predicted: list[tuple[int, ...]] = [()] * len(batches.sequences)
    images = sorted(batches.by_image)
    for i in range(0, len(images), images_per_batch):
        batch = batches.make(images[i : i + images_per_batch])
        logits, _ = answer_logits(model, batches.before, batch, pruner, keep_ratio)
        best = iter(logits.argmax(-1).tolist())
        for q in batch["questions"].tolist():
            predicted[q] = tuple(next(best) for _ in range(batches.lengths[q]))
    return easyvqa.score(predicted, batches.sequences, list(batches.lengths))


def load_images(data: easyvqa.Split) -> tuple[np.ndarray, dict[int, int]]:
    ids = sorted(set(data.image_ids))
    return easyvqa.load_pixels([data.image_paths[i] for i in ids], IMAGE_SIZE), {i: n for n, i in enumerate(ids)}


def write_processor_config(directory: Path, side: int = IMAGE_SIZE) -> None:
    """A transformers image processor that resizes and centre-crops to `side`, no normalisation."""
    from transformers import CLIPImageProcessor

    size = dict(height=side, width=side)
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size=size, do_normalize=False).save_pretrained(directory)


def save_source(model, tokenizer, hf_dir: Path, side: int) -> None:
    """The transformers checkpoint with its tokenizer and processor config."""
    save_checkpoint(model, tokenizer, hf_dir, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    write_processor_config(hf_dir, side)


def save_and_convert(model, tokenizer, out: Path, side: int) -> None:
    """OUT/hf: the transformers checkpoint (`save_source`); OUT/mlx: its conversion."""
    save_source(model, tokenizer, out / "hf", side)
    convert(out / "hf", out / "mlx", force=True)


def run_phase(model, batches: Batches, steps: int, lr: float, warmup: int, rng, prune_rng=None, label="") -> None:
    """`steps` AdamW steps on batches of whole images in `rng`'s order (see `optimize`)."""
    per_epoch = math.ceil(len(batches.by_image) / IMAGES_PER_BATCH)
    optimize(model, batches.before, batches.epochs(rng), steps, lr, warmup, prune_rng, label, per_epoch)


def optimize(
    model,
    before: list[int],
    batches: Iterator[dict[str, torch.Tensor]],
    steps: int,
    lr: float,
    warmup: int,
    prune_rng: np.random.Generator | None = None,
    label: str = "",
    per_epoch: int | None = None,
    log_every: int = 50,
    check: Callable[[int], None] | None = None,
    check_every: int = 0,
    after_step: Callable[[int], None] | None = None,
) -> None:
    """`steps` AdamW steps, one per batch of `batches`, cosine learning rate after `warmup`; with
    `prune_rng`, each step's vision tokens are pruned as `pruning_for` draws. Logs loss and
    teacher-forced train accuracy every `log_every` steps (and epochs when `per_epoch` is given);
    calls `check(step)` every `check_every` steps and after the last, and `after_step(step)` after each."""
    optimizer = optimizer_for(model, lr, weight_decay=0.05)
    started, loss_sum, hit_sum, seen, logged = time.perf_counter(), 0.0, 0, 0, 0
    for step, batch in zip(range(1, steps + 1), batches, strict=False):
        pruner, keep_ratio = pruning_for(prune_rng) if prune_rng else (None, 1.0)
        logits, tokens = answer_logits(model, before, batch, pruner, keep_ratio, seed=step - 1)
        loss = torch.nn.functional.cross_entropy(logits, tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - 1, steps, lr, warmup)
        optimizer.step()
        if after_step:
            after_step(step)
        loss_sum += float(loss.detach())
        hit_sum += int(exact_matches(logits.detach(), tokens, batch["target"]).sum())
        seen += len(batch["ids"])
        if step % log_every == 0 or step == steps:
            elapsed = time.perf_counter() - started
            epoch = f"  epoch {step / per_epoch:.2f}" if per_epoch else ""
            click.echo(
                f"{label}step {step}/{steps}{epoch}  loss {loss_sum / (step - logged):.4f}  "
                f"train acc {hit_sum / seen:.3f}  {elapsed / 60:.1f} min"
            )
            loss_sum, hit_sum, seen, logged = 0.0, 0, 0, step
        if check and (step == steps or (check_every and step % check_every == 0)):
            check(step)


def train(out: Path, epochs: int, prune_epochs: int, seed: int, max_steps: int | None) -> Path:
    """Phase 1: `epochs` on all 64 tokens (lr 5e-4). Phase 2: `prune_epochs` more with pruned
    tokens on most steps (lr 2e-4), so the pruners keep the answers (phase 1 alone loses about
    22 points at keep ratio 0.5; pruning from the first step instead stalls near 87%)."""
    torch.manual_seed(seed)
    rng, prune_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    hf_dir, mlx_dir = out / "hf", out / "mlx"
    hf_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_data, test_data = easyvqa.load_split("train"), easyvqa.load_split("test")
    tokenizer = build_tokenizer(hf_dir, train_data)
    train_batches = Batches(train_data, tokenizer, *load_images(train_data))
    test_batches = Batches(test_data, tokenizer, *load_images(test_data))
    text_args = dict(TEXT_ARGS, vocab_size=len(tokenizer))
    model = build_reference(VISION_ARGS, text_args, tokenizer.convert_tokens_to_ids("<image>"), seed=seed).train()
    click.echo(f"{sum(p.numel() for p in model.parameters()):,} parameters, {len(tokenizer)} tokens; data ready")

    per_epoch = math.ceil(len(train_batches.by_image) / IMAGES_PER_BATCH)
    steps = min(epochs * per_epoch, max_steps or epochs * per_epoch)
    run_phase(model, train_batches, steps, LR, min(200, steps // 10), rng, label="all tokens: ")
    steps = min(prune_epochs * per_epoch, max_steps or prune_epochs * per_epoch)
    run_phase(model, train_batches, steps, PRUNE_LR, min(100, steps // 10), rng, prune_rng, label="pruned: ")

    model.eval()
    for pruner, keep_ratio in ((None, 1.0), ("norm", 0.5), ("random", 0.125)):
        accuracy = evaluate(model, test_batches, pruner, keep_ratio).accuracy
        setting = f"{pruner or 'unpruned'} {keep_ratio:g}"
        click.echo(f"test accuracy, {setting} (torch, teacher-forced = greedy): {accuracy:.4f}")
    save_and_convert(model, tokenizer, out, IMAGE_SIZE)
    click.echo(f"wrote {hf_dir} and {mlx_dir} in {(time.perf_counter() - started) / 60:.1f} min")
    return out


@click.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Writes OUT/hf and OUT/mlx.")
@click.option("--epochs", default=35, show_default=True, help="Phase 1, all tokens.")
@click.option("--prune-epochs", default=5, show_default=True, help="Phase 2, pruned tokens on most steps.")
@click.option("--seed", default=0, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Cap each phase (sanity runs).")
@click.option("--threads", default=2, show_default=True)
def main(out: Path, epochs: int, prune_epochs: int, seed: int, max_steps: int | None, threads: int):
    """Train the easy-VQA FastVLM and convert it to MLX."""
    torch.set_num_threads(threads)
    train(out, epochs, prune_epochs, seed, max_steps)


if __name__ == "__main__":
    main()
