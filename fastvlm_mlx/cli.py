"""`fastvlm-mlx` command line: a thin click group over the library functions.

Heavy imports (mlx, torch, the model) happen inside commands so `--help` stays instant.
"""

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import click

from fastvlm_mlx import __version__, cpu


def _version_text() -> str:
    import mlx.core as mx

    return f"fastvlm-mlx {__version__}, mlx {mx.__version__} on {mx.default_device()}, {cpu.describe()}"


def _fail_cleanly(fn):
    """Show bad input as one line (exit 1) instead of a traceback: our UserErrors and the foreign
    error classes `fastvlm_mlx.errors.explain` knows. Anything else is a bug and keeps its traceback."""
    from functools import wraps

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from fastvlm_mlx.errors import UserError, explain
        from pruners import PrunerError

        try:
            return fn(*args, **kwargs)
        except (UserError, PrunerError) as error:
            raise click.ClickException(" ".join(str(error).split())) from None
        except Exception as error:
            message = explain(error)  # the known foreign classes (OS, PIL, json, UTF-8); others are our bugs
            if message is None:
                raise
            raise click.ClickException(" ".join(message.split())) from None

    return wrapper


def _print_version(ctx: click.Context, _param, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        cpu.prepare()
        click.echo(_version_text())
        ctx.exit()


@click.group()
@click.option(
    "--version",
    is_flag=True,
    is_eager=True,
    expose_value=False,
    callback=_print_version,
    help="Show versions, device and the BLAS in use.",
)
def main() -> None:
    """FastVLM in MLX: convert checkpoints, generate, benchmark."""


class FiniteFloat(click.FloatRange):
    """click's FloatRange, refusing NaN and infinities (NaN passes every range comparison)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


SEED = click.IntRange(0, 2**64 - 1)  # MLX seeds are unsigned 64-bit
SAMPLING_SEED = click.option("--seed", default=None, type=SEED, help="Random seed for sampling and the random pruner.")
MODEL_HELP = (
    "Converted model folder, checkpoint folder (converted once, then cached) or Hugging Face repo id "
    "such as apple/FastVLM-0.5B, or a shipped model: easyvqa (the default), mosaic, mosaic-tuned."
)
IMAGE_HELP = "Image file (any format PIL reads), or an http(s) or data: URL."
IMAGE_SIZE = click.option(
    "--image-size",
    default=None,
    type=click.IntRange(min=1),
    help="Input resolution instead of the model's (768 -> 144 visual tokens, 512 -> 64), at most 2048.",
)
PRUNER = click.option(
    "--pruner", default=None, help="Visual-token pruner (norm, attention, divprune, ...); none = keep all tokens."
)
KEEP_RATIO = click.option(
    "--keep-ratio", default=None, type=FiniteFloat(), help="Share of visual tokens to keep, in (0, 1]."
)
KEEP_POSITIONS = click.option(
    "--keep-positions/--no-keep-positions",
    default=None,
    help="Kept visual tokens keep their unpruned RoPE positions, the text after them the unpruned length's "
    "(GAP; default: the model's, from convert).",
)


def _check_inputs(model_dir, image: str, pruner: str | None, keep_ratio: float | None, image_size: int | None):
    """Fail on a bad config, image size, image, pruner or ratio before spending seconds loading the model.
    Returns the converted model folder (a checkpoint is converted, a repo id fetched) and the image."""
    from fastvlm_mlx.config import check_image_size
    from fastvlm_mlx.hub import resolve_model
    from fastvlm_mlx.images import read_image
    from fastvlm_mlx.load import read_config
    from pruners import check, keep_count

    if image_size is not None:
        check_image_size(image_size, 1)  # the stride is checked once the model's config is known
    if keep_ratio is not None:
        keep_count(1, keep_ratio)
    if pruner not in (None, "none"):
        check(pruner, 1.0 if keep_ratio is None else keep_ratio)
    picture = read_image(image)
    folder = resolve_model(model_dir)
    config = read_config(folder)
    if image_size is not None:
        check_image_size(image_size, config.vision.stride)
    return folder, picture


def _read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The question from --prompt TEXT, --prompt - (stdin) or --prompt-file PATH; trailing newlines dropped."""
    from fastvlm_mlx.errors import naming
    from fastvlm_mlx.files import read_bounded
    from fastvlm_mlx.prompt import check_text

    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give the question as --prompt TEXT, --prompt - (stdin) or --prompt-file PATH")
    if prompt_file is None and prompt != "-":
        check_text(prompt, "--prompt")
        return prompt
    with naming("stdin" if prompt_file is None else prompt_file):
        data = read_bounded(sys.stdin.buffer if prompt_file is None else prompt_file, name=prompt_file or "stdin")
        return data.decode("utf-8").rstrip("\r\n")


SAMPLING = (
    click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=1)),
    click.option("--temperature", default=0.0, show_default=True, type=FiniteFloat(min=0.0), help="0 = greedy."),
    click.option("--top-p", default=1.0, show_default=True, type=FiniteFloat(0.0, 1.0)),
)


def _options(*decorators):
    def apply(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


def result_json(result) -> dict:
    """generate --json's keys for a GenerationResult."""
    return {
        "text": result.text,
        "token_ids": result.token_ids,
        "visual_tokens": {"before": result.visual_tokens_before, "after": result.visual_tokens_after},
        "timings": asdict(result.timings),
        "peak_memory_gb": result.peak_memory_gb,
    }


# How an answer is made, the same for generate and chat (their keyword names are the API's).
ANSWER_OPTIONS = _options(*SAMPLING, IMAGE_SIZE, PRUNER, KEEP_RATIO, KEEP_POSITIONS, SAMPLING_SEED)


@main.command()
@click.option("--model", "model_dir", help=MODEL_HELP)
@click.option("--image", required=True, help=IMAGE_HELP)
@click.option("--prompt", default=None, help="Question about the image; - reads it from stdin.")
@click.option(
    "--prompt-file", type=click.Path(), help="Read the question from a UTF-8 file (for prompts too long to pass)."
)
@ANSWER_OPTIONS
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@_fail_cleanly
def generate(
    model_dir, image, prompt, prompt_file, max_tokens, temperature, top_p, image_size, pruner, keep_ratio,
    keep_positions, seed, as_json
) -> None:  # fmt: skip
    """Answer the prompt about IMAGE, streaming the text (the answer alone on stdout).

    The answer stops at the model's context; a prompt that does not fit is an error."""
    from fastvlm_mlx.generate import generate as run
    from fastvlm_mlx.generate import stream_generate
    from fastvlm_mlx.load import load_model

    prompt = _read_prompt(prompt, prompt_file)
    folder, picture = _check_inputs(model_dir, image, pruner, keep_ratio, image_size)
    model, tokenizer = load_model(folder)
    options = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, image_size=image_size)
    options.update(pruner=pruner, keep_ratio=keep_ratio, keep_positions=keep_positions, seed=seed)
    if as_json:
        click.echo(json.dumps(result_json(run(model, tokenizer, picture, prompt, **options))))
        return
    for response in stream_generate(model, tokenizer, picture, prompt, **options):
        click.echo(response.text, nl=False)
    click.echo()


@main.command()
@click.option("--model", "model_dir", help=MODEL_HELP)
@click.option("--image", required=True, help=IMAGE_HELP)
@click.option("--system", default=None, help="System message (default: the chat template's).")
@ANSWER_OPTIONS
@click.option("--json", "as_json", is_flag=True, help="Questions one per stdin line, one JSON object per answer.")
@_fail_cleanly
def chat(
    model_dir, image, system, max_tokens, temperature, top_p, image_size, pruner, keep_ratio, keep_positions, seed,
    as_json
):  # fmt: skip
    """Chat about IMAGE: a follow-up question reuses the image and the conversation so far.

    Type one question per line; /image PATH switches to another image (a new conversation),
    /reset starts over, /quit ends. Answers stream to stdout, notices go to stderr. With --json,
    each stdin line is a question (or a /command) and each answer one JSON line: generate --json's
    keys plus turn (its number in the conversation)."""
    from fastvlm_mlx.chat import ChatSession
    from fastvlm_mlx.load import load_model
    from fastvlm_mlx.prompt import check_text
    from fastvlm_mlx.repl import run_chat

    if system is not None:
        check_text(system, "--system")
    folder, picture = _check_inputs(model_dir, image, pruner, keep_ratio, image_size)
    model, tokenizer = load_model(folder)
    session = ChatSession(model, tokenizer, picture, system=system, image_size=image_size, pruner=pruner,
                          keep_ratio=keep_ratio, keep_positions=keep_positions, seed=seed)  # fmt: skip
    options = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p)
    run_chat(session, options, result_json if as_json else None)


@main.command()
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]))
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the LLM to 4 or 8 bits.")
@click.option("--group-size", default="64", show_default=True, type=click.Choice(["32", "64", "128"]))
@click.option("--quantize-projector", is_flag=True, help="Quantize the projector too (vision stays float).")
@click.option("--pruner", default=None, help="Default visual-token pruner of the converted model.")
@click.option("--keep-ratio", default=1.0, show_default=True, type=FiniteFloat(), help="Its keep ratio, in (0, 1].")
@click.option(
    "--keep-positions", is_flag=True, help="By default, kept visual tokens keep their unpruned RoPE positions."
)
@_fail_cleanly
def convert(src, out, dtype, force, quantize, group_size, quantize_projector, pruner, keep_ratio, keep_positions):
    """Convert a FastVLM checkpoint SRC (Apple llava_qwen2, transformers fast_vlm or mlx-vlm's) to MLX in OUT."""
    from convert.convert import convert as run

    if pruner is None and keep_ratio != 1.0:
        raise click.ClickException("--keep-ratio needs a pruner: add --pruner NAME (e.g. --pruner divprune)")
    written = run(
        src,
        out,
        dtype=dtype,
        force=force,
        quantize=int(quantize) if quantize else None,
        group_size=int(group_size),
        quantize_projector=quantize_projector,
        pruner=pruner,
        keep_ratio=keep_ratio,
        keep_positions=keep_positions,
    )
    click.echo(f"converted {src} -> {written}", err=True)


@main.command()
@click.argument("model_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_fail_cleanly
def info(model_dir, as_json) -> None:
    """Facts of a converted model: sizes, dtype, quantization, pruning, visual tokens."""
    from fastvlm_mlx.info import format_info, model_info

    facts = model_info(model_dir)
    click.echo(json.dumps(facts, indent=2) if as_json else format_info(facts))


@main.command("export-coreml")
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--pruner", default=None, help="Score-based pruner baked into the graph: norm, attention or random.")
@click.option("--keep-ratio", default=1.0, show_default=True, type=FiniteFloat(), help="Its keep ratio, in (0, 1].")
@IMAGE_SIZE
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the random pruner.")
@click.option("--precision", default="float16", show_default=True, type=click.Choice(["float16", "float32"]))
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@_fail_cleanly
def export_coreml(src, out, pruner, keep_ratio, image_size, seed, precision, force) -> None:
    """Export SRC's vision encoder (PyTorch reference) to a Core ML package OUT.mlpackage."""
    from convert.coreml import export_coreml as run
    from fastvlm_mlx.config import check_image_size

    if image_size is not None:
        check_image_size(image_size)  # the stride of FastViTHD, which Core ML export is for

    if pruner is None and keep_ratio != 1.0:
        raise click.ClickException("--keep-ratio needs a pruner: add --pruner norm|attention|random")
    options = dict(image_size=image_size, seed=seed, precision=precision, force=force)
    click.echo(f"wrote {run(src, out, pruner=pruner, keep_ratio=keep_ratio, **options)}", err=True)


@main.command("prune-viz")
@click.option("--model", "model_dir", type=click.Path(), help=MODEL_HELP)
@click.option("--image", required=True, help=IMAGE_HELP)
@click.option("--pruner", default=None, help="Visual-token pruner (default: the model's own, from convert).")
@KEEP_RATIO
@IMAGE_SIZE
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed for the random pruner.")
@click.option("--prompt", default=None, help="The question, for an instruction-aware pruner (cdpruner).")
@click.option("-o", "--output", required=True, type=click.Path(), help="PNG to write.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@_fail_cleanly
def prune_viz(model_dir, image, pruner, keep_ratio, image_size, seed, prompt, output, force) -> None:
    """Draw which visual tokens PRUNER keeps: kept clear, dropped dimmed, merged groups coloured."""
    from fastvlm_mlx.load import load_model
    from fastvlm_mlx.pruneviz import draw_pruning

    folder, picture = _check_inputs(model_dir, image, pruner, keep_ratio, image_size)
    model, tokenizer = load_model(folder)
    written = draw_pruning(model, picture, pruner, keep_ratio, output, image_size=image_size, seed=seed, force=force,
                           prompt=prompt, tokenizer=tokenizer)  # fmt: skip
    click.echo(f"wrote {written}", err=True)


@main.command()
@click.option("--model", "model_dir", help=MODEL_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="FASTVLM_MLX_API_KEY", help="Require Bearer KEY.")
@click.option("--allow-local-files", is_flag=True, help="Let image_url name a file on this machine.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 256), help="Decoded at once.")
@click.option("--max-queue", default=32, show_default=True, type=click.IntRange(0), help="Waiting; more: 429.")
@click.option("--vision-slice", "vision_slice_s", default=0.25, show_default=True, type=FiniteFloat(min=0.0),
              help="Seconds of a new image's vision tower between decode steps (less: shorter stalls).")  # fmt: skip
@click.option("--timeout", "timeout_s", default=300.0, show_default=True, type=FiniteFloat(min=0.1), help="Seconds.")
@click.option("--max-image-bytes", default=20 * 2**20, show_default=True, type=click.IntRange(1), help="More: 413.")
@click.option("--max-image-pixels", default=4096 * 4096, show_default=True, type=click.IntRange(1), help="More: 413.")
@_fail_cleanly
def serve(model_dir, host, port, api_key, allow_local_files, max_batch, max_queue, vision_slice_s, timeout_s,
          **image_limits) -> None:  # fmt: skip
    """An OpenAI-compatible server (POST /v1/chat/completions, GET /v1/models, GET /health)
    that batches concurrent requests; needs the server extra (fastapi, uvicorn)."""
    try:
        from fastvlm_mlx.server import Limits
        from fastvlm_mlx.server import serve as run
    except ImportError as error:
        raise click.ClickException(f"{error}; install the server extra: pip install 'fastvlm-mlx[server]'") from None

    limits = Limits(timeout_s=timeout_s, **image_limits)
    run(model_dir, host=host, port=port, api_key=api_key, allow_local_files=allow_local_files, max_batch=max_batch,
        max_queue=max_queue, vision_slice_s=vision_slice_s, limits=limits)  # fmt: skip


def _split(text: str, kind=str) -> list:
    try:
        return [kind(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of {kind.__name__} values") from None


@main.group(invoke_without_command=True)
@click.option(
    "--model",
    "model_dir",
    type=click.Path(),
    help="Converted MLX model directory, or a shipped model: easyvqa (the default), mosaic, mosaic-tuned. "
    "Without --reference, a shipped model's hf/ is the reference.",
)
@click.option("--reference", type=click.Path(), help="The transformers or Apple checkpoint MODEL came from.")
@click.option(
    "--synthetic", type=click.Choice(["0.5b", "1.5b", "7b"]), help="Random weights at a real size, both sides."
)
@click.option("--image", "images", multiple=True, type=click.Path(), help="Image file or folder (repeatable).")
@click.option("--prompt", "prompts", multiple=True, help="Prompt (repeatable); - reads one from stdin.")
@click.option("--prompt-file", "prompt_files", multiple=True, type=click.Path(), help="Prompt from a UTF-8 file.")
@click.option(
    "--dataset", help="easy-vqa[:N], mosaic[:N] or a JSON list of {image, question, answer}: adds answer accuracy."
)
@click.option("--pruners", default="all", show_default=True, help="Comma-separated pruner names, or all, or none.")
@click.option("--keep-ratios", default="0.5,0.25", show_default=True, help="Comma-separated keep ratios in (0, 1].")
@click.option("--image-sizes", default="", help="Extra unpruned input sizes, e.g. 768,512.")
@KEEP_POSITIONS
@click.option("--runs", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0))
@click.option("--max-tokens", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--frameworks", default="mlx,torch", show_default=True, help="mlx, torch or both.")
@click.option("--torch-device", default="auto", show_default=True, type=click.Choice(["auto", "mps", "cuda", "cpu"]))
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]))
@click.option("--out", "out_dir", default="bench-results", show_default=True, type=click.Path(), help="Output folder.")
@click.pass_context
@_fail_cleanly
def bench(ctx, model_dir, reference, synthetic, images, prompts, prompt_files, dataset, pruners, keep_ratios, **rest):
    """MLX vs the PyTorch reference, interleaved: per-stage timings, memory and quality; JSON, CSV, plots."""
    if ctx.invoked_subcommand is not None:
        return
    from bench.report import draw_plots, format_table, write_results
    from bench.sweep import run_bench
    from fastvlm_mlx.errors import naming
    from pruners import PRUNERS

    names = {"all": sorted(PRUNERS), "none": []}.get(pruners, None)
    names = _split(pruners) if names is None else names
    out_dir = Path(rest.pop("out_dir"))
    results = run_bench(
        model_dir=model_dir,
        reference=reference,
        synthetic=synthetic,
        images=list(images),
        prompts=[_read_prompt(p, None) for p in prompts] + [_read_prompt(None, f) for f in prompt_files],
        dataset=dataset,
        pruners=names,
        keep_ratios=_split(keep_ratios, float),
        image_sizes=_split(rest.pop("image_sizes"), int),
        frameworks=_split(rest.pop("frameworks")),
        workdir=out_dir,
        **rest,
    )
    stem = f"bench-{synthetic or (Path(model_dir).name if model_dir else 'easyvqa')}"
    with naming(out_dir):  # a disk that fills up while writing
        json_path, csv_path = write_results(results, out_dir, stem)  # stem, stem-2...: never an earlier run's
        plots = draw_plots(results, out_dir, json_path.stem)
    click.echo(format_table(results["summary"]))
    for path in (json_path, csv_path, *plots):
        click.echo(f"wrote {path}")


@bench.command("plot")
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out", "out_dir", default=None, type=click.Path(), help="Folder for the PNGs (default: beside RESULTS)."
)
@_fail_cleanly
def bench_plot(results, out_dir) -> None:
    """Redraw the plots of a bench RESULTS.json."""
    from bench.report import draw_plots, format_table

    path = Path(results)
    try:
        data = json.loads(path.read_text())
        table = format_table(data["summary"])
    except (ValueError, KeyError, TypeError):
        raise click.ClickException(f"{path} is not a fastvlm-mlx bench results file") from None
    click.echo(table)
    for png in draw_plots(data, Path(out_dir) if out_dir else path.parent, path.stem):
        click.echo(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
