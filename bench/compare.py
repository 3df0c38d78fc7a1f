"""MLX vs the PyTorch reference on the same random weights, runs interleaved, JSON out."""

import json
import platform
import statistics
from dataclasses import asdict
from pathlib import Path

import click
import mlx.core as mx
import numpy as np
import torch
from PIL import Image

from bench import synthetic
from bench.torch_pipeline import torch_generate
from convert.convert import convert
from fastvlm_mlx import BLAS, __version__
from fastvlm_mlx.generate import generate
from fastvlm_mlx.load import load_model

PROMPT = "Describe the image in detail, listing every object you can see and its colour."


def synthetic_checkpoint(size: str, workdir: Path) -> tuple[Path, Path]:
    """(transformers dir, converted MLX dir) with random weights at a real FastVLM size; cached."""
    hf_dir, mlx_dir = workdir / f"synthetic-{size}", workdir / f"synthetic-{size}-mlx"
    if not (hf_dir / "model.safetensors").is_file():
        tokenizer = synthetic.make_tokenizer(hf_dir, [PROMPT] * 10, vocab_size=400)
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        model = synthetic.build_reference({}, synthetic.TEXT_ARCHS[size], image_id, seed=0)
        synthetic.save_checkpoint(model, tokenizer, hf_dir, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    if not (mlx_dir / "model.safetensors").is_file():
        convert(hf_dir, mlx_dir, force=True)
    return hf_dir, mlx_dir


def test_image(path: Path, size: int = 1024) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def summarize(runs: list[dict]) -> dict:
    keys = runs[0]["timings"].keys()
    return {
        k: {
            "median": statistics.median(r["timings"][k] for r in runs),
            "min": min(r["timings"][k] for r in runs),
            "max": max(r["timings"][k] for r in runs),
        }
        for k in keys
    }


def compare(size: str, workdir: Path, runs: int, warmup: int, max_tokens: int) -> dict:
    from transformers import FastVlmForConditionalGeneration

    hf_dir, mlx_dir = synthetic_checkpoint(size, workdir)
    image = test_image(workdir / "bench-image.png")
    model, tokenizer = load_model(mlx_dir)
    reference = FastVlmForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    eos = set(model.config.eos_token_ids)
    cfg = model.config
    rows = {"mlx": [], "torch": []}
    with click.progressbar(range(warmup + runs), label=f"MLX vs torch, FastVLM-{size}") as bar:
        for i in bar:
            mlx_result = generate(model, tokenizer, image, PROMPT, max_tokens=max_tokens)
            torch_result = torch_generate(
                reference,
                tokenizer,
                image,
                PROMPT,
                image_size=cfg.image_size,
                mode=cfg.preprocess_mode,
                max_tokens=max_tokens,
                eos=eos,
            )
            if i >= warmup:
                rows["mlx"].append(asdict(mlx_result))
                rows["torch"].append(asdict(torch_result))
    ratios = [m["timings"]["ttft_s"] / t["timings"]["ttft_s"] for m, t in zip(rows["mlx"], rows["torch"], strict=True)]
    return {
        "config": {
            "synthetic": size,
            "image_size": cfg.image_size,
            "max_tokens": max_tokens,
            "runs": runs,
            "warmup": warmup,
            "dtype": "float32",
        },
        "environment": {
            "fastvlm_mlx": __version__,
            "mlx": mx.__version__,
            "torch": torch.__version__,
            "device_mlx": str(mx.default_device()),
            "torch_device": "cpu",
            "torch_threads": torch.get_num_threads(),
            "blas": BLAS,
            "machine": platform.platform(),
        },
        "summary": {fw: summarize(r) for fw, r in rows.items()},
        "ttft_ratio_mlx_over_torch": {"per_pair": ratios, "median": statistics.median(ratios)},
        "runs": rows,
    }


@click.command()
@click.option("--synthetic", "size", type=click.Choice(sorted(synthetic.TEXT_ARCHS)), default="0.5b", show_default=True)
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("bench-results"), show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=16, show_default=True)
def main(size, workdir, runs, warmup, max_tokens) -> None:
    """Interleaved MLX vs transformers TTFT on random weights at a real FastVLM size."""
    workdir.mkdir(parents=True, exist_ok=True)
    result = compare(size, workdir, runs, warmup, max_tokens)
    out = workdir / f"compare-{size}.json"
    out.write_text(json.dumps(result, indent=2))
    for fw, stats in result["summary"].items():
        click.echo(f"{fw:6s} " + "  ".join(f"{k}={v['median']:.3f}" for k, v in stats.items()))
    click.echo(f"TTFT ratio MLX/torch (median of pairs): {result['ttft_ratio_mlx_over_torch']['median']:.2f}")
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
