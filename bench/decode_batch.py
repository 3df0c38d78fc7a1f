"""Batched decoding's step time against the batch size, with the CPU shim's 2-8-row kernel on and off.

    python -m bench.decode_batch --synthetic 0.5b [--batches 1,2,3,4,6,8] [--rounds 2] [--out docs/results]

Each batch size prefills that many sequences of `--context` random tokens into their own caches,
hands them to mlx-lm's `BatchGenerator` (the server's decoder) and times `--steps` steps after 3
untimed ones. The kernel's on and off runs alternate within every round and batch size, so the
machine's drift falls on both; the table keeps every round's time and the median. Products of one
row go to OpenBLAS's gemv and of 8 or more rows to its gemm either way. Writes
decode-batch-<model>.json and .png (never over earlier files).
"""

import fastvlm_mlx  # noqa: F401, I001  first: preloads the BLAS before anything imports mlx

import statistics
import time
from pathlib import Path

import click
import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache

from bench import model_options, save_new_png
from fastvlm_mlx.cpu.blas import use_few_rows_kernel


def prefilled(language_model, context: int, seed: int) -> list:
    cache = make_prompt_cache(language_model)
    language_model(mx.random.randint(0, 1000, (1, context), key=mx.random.key(seed)), cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def step_seconds(language_model, batch: int, context: int, steps: int) -> float:
    """Seconds per decode step of `batch` sequences `context` tokens in."""
    generator = BatchGenerator(
        language_model, stop_tokens=[[-1]], completion_batch_size=batch, prefill_batch_size=batch
    )
    caches = [prefilled(language_model, context, seed) for seed in range(batch)]
    generator.insert([[5]] * batch, max_tokens=[steps + 10] * batch, caches=caches, all_tokens=[[1] * context] * batch)
    for _ in range(3):
        generator.next()
    start = time.perf_counter()
    for _ in range(steps):
        generator.next()
    seconds = (time.perf_counter() - start) / steps
    generator.close()
    return seconds


def plot(results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    batches = [int(b) for b in results["step_ms"]]
    for mode, label in (("on", "shim's kernel (2-8 rows)"), ("off", "OpenBLAS gemm")):
        axis.plot(batches, [results["step_ms"][str(b)][mode]["median"] for b in batches], "o-", label=label)
    axis.set(xlabel="sequences decoded together", ylabel="ms per decode step (median)", xticks=batches)
    axis.set_title(f"{results['config']['model_name']}: batched decoding on this CPU", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend()
    return save_new_png(figure, out)


@click.command()
@model_options
@click.option("--batches", default="1,2,3,4,6,8", show_default=True, help="Comma-separated batch sizes.")
@click.option("--context", default=300, show_default=True, type=click.IntRange(min=1), help="Tokens in each cache.")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1), help="Timed steps per run.")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--models-dir", default="bench-results", show_default=True, type=click.Path(), help="Synthetic models.")
@click.option("--out", "out_dir", default="docs/results", show_default=True, type=click.Path())
def main(size, model_dir, batches, context, steps, rounds, models_dir, out_dir):
    """Decode-step time per batch size, the shim's kernel on and off, alternated."""
    from bench.chat import write_new
    from bench.sweep import environment
    from fastvlm_mlx.errors import UserError
    from fastvlm_mlx.load import load_model

    try:
        sizes = [int(b) for b in batches.split(",")]
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        message = f"{batches!r} is not a comma-separated list of whole numbers >= 1"
        raise click.BadParameter(message, param_hint="--batches") from None
    if not use_few_rows_kernel(True):
        raise click.ClickException(
            "no cblas shim is loaded here (not Linux, no C compiler or MKL chosen): nothing to compare"
        )
    if model_dir is None:
        from bench.reference import synthetic_checkpoint

        model_dir, name = synthetic_checkpoint(size, Path(models_dir))[1], f"synthetic-{size}"
    else:
        name = Path(model_dir).name
    try:
        model, _ = load_model(model_dir)
    except UserError as error:
        raise click.ClickException(str(error)) from None
    times = {str(b): {"on": [], "off": []} for b in sizes}
    runs = [(r, b, mode) for r in range(rounds) for b in sizes for mode in ("on", "off")]
    with click.progressbar(runs, label="decode runs", file=click.get_text_stream("stderr")) as bar:
        for _, batch, mode in bar:
            use_few_rows_kernel(mode == "on")
            times[str(batch)][mode].append(1000 * step_seconds(model.language_model, batch, context, steps))
    use_few_rows_kernel(True)
    table = {
        b: {m: {"runs": t, "median": statistics.median(t)} for m, t in modes.items()} for b, modes in times.items()
    }
    for b, modes in table.items():
        on, off = modes["on"]["median"], modes["off"]["median"]
        click.echo(f"batch {b}: kernel {on:.1f} ms, OpenBLAS {off:.1f} ms per step ({off / on:.2f}x)")
    settings = dict(batches=sizes, context=context, steps=steps, rounds=rounds)
    results = dict(config=dict(model=str(model_dir), model_name=name), settings=settings, step_ms=table)
    results["environment"] = environment(None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = write_new(out, f"decode-batch-{name}", results)
    click.echo(f"wrote {path}\nwrote {plot(results, path.with_suffix('.png'))}", err=True)


if __name__ == "__main__":
    main()
