"""Chat TTFT on a real FastVLM size with random weights: first turn, follow-ups, a new conversation.

    python -m bench.chat --synthetic 0.5b --runs 3 [--out bench-results]   (or --model DIR)

Each run takes a fresh image (so its first turn misses the vision cache) and times the TTFT (image
in -> first token, every stage, as generate reports it) of: the first turn of a chat, two follow-up
questions (they prefill only their own tokens), and a new conversation about the same image (its
vision stage comes from the cache). One warm-up chat on another image comes first. Goal: a
follow-up's TTFT at most 5% of the first turn's, and no vision stage in the new conversation.
The tokenizer is retrained on the chat's words (`word_tokenizer`) unless --model-tokenizer.
Writes chat-<size>.json (never over an earlier file).
"""

import fastvlm_mlx  # noqa: F401, I001  first: preloads the BLAS before anything imports mlx

import itertools
import json
import os
import statistics
from dataclasses import asdict
from pathlib import Path

import click
import numpy as np
from PIL import Image

from bench import model_options
from bench.reference import SYNTHETIC_PROMPT, synthetic_checkpoint
from bench.sweep import environment
from fastvlm_mlx.chat import ChatSession
from fastvlm_mlx.features import VisionCache
from fastvlm_mlx.files import open_new
from fastvlm_mlx.load import load_model

FOLLOW_UPS = ("What colour is the largest object?", "Is there any text in the picture?")
GOAL_RATIO = 0.05


def noise(seed: int, size: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def word_tokenizer(model_dir: Path, out_dir: Path) -> Path:
    """The model with a tokenizer trained on this chat's own words, so each word and chat role is one
    token as in Qwen2's 151k vocabulary (the synthetic checkpoints' 400-token BPE splits English into
    about twice as many tokens, which would time follow-ups at twice their real length). Same special
    token ids; the weights are linked, not copied."""
    from bench.synthetic import make_tokenizer

    folder = out_dir / f"{Path(model_dir).name}-words"
    if not (folder / "tokenizer.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "generation_config.json"):
            if (Path(model_dir) / name).is_file():
                (folder / name).write_bytes((Path(model_dir) / name).read_bytes())
        (folder / "model.safetensors").symlink_to((Path(model_dir) / "model.safetensors").resolve())
        corpus = [SYNTHETIC_PROMPT, *FOLLOW_UPS, "system user assistant You are a helpful assistant."] * 50
        rows = json.loads((folder / "config.json").read_text())["text"]["vocab_size"]
        make_tokenizer(folder, corpus, vocab_size=min(2000, rows))  # every id within the embedding
    return folder


def run_once(model, tokenizer, image: Image.Image, cache: VisionCache, max_tokens: int) -> dict:
    """One run: first turn, follow-ups, then a new conversation about the same image."""
    turns = {}
    session = ChatSession(model, tokenizer, image, vision_cache=cache)
    questions = [("first", SYNTHETIC_PROMPT), *((f"follow_up_{i + 1}", q) for i, q in enumerate(FOLLOW_UPS))]
    for name, question in questions:
        turns[name] = measure(session, question, max_tokens)
    hits = cache.hits
    again = ChatSession(model, tokenizer, image, vision_cache=cache)
    turns["new_conversation"] = measure(again, SYNTHETIC_PROMPT, max_tokens)
    turns["new_conversation"]["vision_cache_hit"] = cache.hits == hits + 1
    return turns


def measure(session: ChatSession, question: str, max_tokens: int) -> dict:
    """One turn's TTFT (image in -> first token, every stage) and how many positions it prefilled."""
    held = len(session.cached)
    result = session.ask(question, max_tokens=max_tokens)
    return {
        "ttft_s": result.timings.ttft_s,
        "timings": asdict(result.timings),
        "prompt_tokens": result.prompt_tokens,
        "prefilled_tokens": result.prompt_tokens - min(held, result.prompt_tokens - 1),
        "answer_tokens": len(result.token_ids),
    }


@click.command()
@model_options
@click.option("--image-size", default=1024, show_default=True, type=int)
@click.option("--runs", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--max-tokens", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--model-tokenizer", is_flag=True, help="Keep the checkpoint's tokenizer (see word_tokenizer).")
@click.option("--out", "out_dir", default="bench-results", show_default=True, type=click.Path())
def main(size, model_dir, image_size, runs, max_tokens, model_tokenizer, out_dir) -> None:
    """Time a chat's first turn, its follow-ups and a new conversation on the same image."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model_dir is None:
        model_dir = synthetic_checkpoint(size, out_dir)[1]
    else:
        size = Path(model_dir).name
    model, tokenizer = load_model(model_dir if model_tokenizer else word_tokenizer(model_dir, out_dir))
    cache = VisionCache()
    run_once(model, tokenizer, noise(1000, image_size), cache, max_tokens)  # warm-up, another image
    records = [run_once(model, tokenizer, noise(seed, image_size), cache, max_tokens) for seed in range(runs)]
    summary = summarize(records)
    results = dict(
        config=dict(model=str(model_dir), tokenizer="checkpoint's" if model_tokenizer else "chat words"),
        settings=dict(image_size=image_size, runs=runs, max_tokens=max_tokens),
        environment=environment(None),
        summary=summary,
        runs=records,
    )
    path = write_new(out_dir, f"chat-{size}" + ("-model-tokenizer" if model_tokenizer else ""), results)
    click.echo(json.dumps(summary, indent=2))
    click.echo(f"wrote {path}", err=True)


def summarize(records: list[dict]) -> dict:
    median = {name: statistics.median(r[name]["ttft_s"] for r in records) for name in records[0]}
    follow_ups = [name for name in median if name.startswith("follow_up")]
    ratio = max(median[name] for name in follow_ups) / median["first"]
    return {
        "ttft_s_median": median,
        "follow_up_over_first": ratio,
        "follow_up_goal": GOAL_RATIO,
        "follow_up_goal_met": ratio <= GOAL_RATIO,
        "new_conversation_over_first": median["new_conversation"] / median["first"],
        "new_conversation_skipped_vision": all(r["new_conversation"]["vision_cache_hit"] for r in records),
        "prefilled_tokens": {name: records[0][name]["prefilled_tokens"] for name in records[0]},
    }


def write_new(out_dir: Path, stem: str, results: dict) -> Path:
    """`stem.json`, or `stem-2.json`...: created new (O_EXCL), so no earlier results are overwritten."""
    for n in itertools.count(1):
        path = out_dir / (f"{stem}.json" if n == 1 else f"{stem}-{n}.json")
        try:
            fd = open_new(path)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(results, indent=2) + "\n")
        return path


if __name__ == "__main__":
    main()
