"""Accuracy on the mosaic test set for every pruner and keep ratio, and unpruned at lower resolutions.

    python -m bench.mosaic_accuracy --model mosaic --out docs/results/mosaic-accuracy

Greedy answers of the MLX runtime (batched teacher forcing, which equals greedy decoding: see
tests/test_easyvqa_model.py), with Wilson 95% intervals, overall and per question type; one
row per setting (pruner, keep ratio, input size, keep_positions). Writes OUT.json and OUT.png
(accuracy against the visual tokens that reach the LLM: one curve per method, and the
resolution curve of the unpruned model at smaller inputs).
"""

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench import easyvqa, mosaic
from bench.report import refuse_existing
from fastvlm_mlx.files import open_new

KEEP_RATIOS = (0.5, 0.25, 0.125, 0.0625)
IMAGE_SIZES = (256, 192, 128)  # 16x16, 12x12 and 8x8 visual tokens
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Setting:
    pruner: str | None  # None: all tokens
    keep_ratio: float
    image_size: int
    keep_positions: bool = False

    @property
    def label(self) -> str:
        if self.pruner is None:
            return f"unpruned {self.image_size}px"
        return f"{self.pruner} {self.keep_ratio:g}" + (" keep-positions" if self.keep_positions else "")


def settings(pruners: list[str], keep_ratios, image_sizes, model_size: int, keep_positions=(False,)) -> list[Setting]:
    """Unpruned at every input size (the model's first), then every pruner x ratio x positions at the model's."""
    sizes = list(dict.fromkeys([model_size, *image_sizes]))
    rows = [Setting(None, 1.0, size) for size in sizes]
    return rows + [
        Setting(p, r, model_size, kp) for kp in keep_positions for p in pruners for r in keep_ratios if r < 1
    ]


def wilson(hits: int, n: int) -> tuple[float, float]:
    """The Wilson score 95% interval of a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))  # rounding never leaves p outside


def summarize(correct: np.ndarray, kinds: list[str]) -> dict:
    """Accuracy, its 95% interval and the question count, overall and per question type."""

    def row(hits: np.ndarray) -> dict:
        return dict(accuracy=float(hits.mean()), ci95=wilson(int(hits.sum()), len(hits)), questions=len(hits))

    kinds_array = np.array(kinds)
    table = dict(row(correct), by_type={})
    for kind in mosaic.QUESTION_TYPES:
        if (kinds_array == kind).any():
            table["by_type"][kind] = row(correct[kinds_array == kind])
    return table


def visual_tokens(model, setting: Setting) -> int:
    from pruners import keep_count

    side = math.ceil(setting.image_size / model.config.vision.stride)
    return side * side if setting.pruner is None else keep_count(side * side, setting.keep_ratio)


def evaluate(
    model, tokenizer, split: easyvqa.Split, kinds: list[str], setting: Setting, progress=None, vision_cache=None
) -> dict:
    """One setting's row: the setting, its visual tokens and `summarize`'s accuracies."""
    scored = easyvqa.evaluate_mlx(
        model,
        tokenizer,
        split,
        setting.pruner,
        setting.keep_ratio,
        progress=progress,
        image_size=setting.image_size,
        keep_positions=setting.keep_positions,
        vision_cache=vision_cache,
    )
    return dict(asdict(setting), visual_tokens=visual_tokens(model, setting), **summarize(scored.correct, kinds))


def table(model, tokenizer, split: easyvqa.Split, kinds: list[str], rows: list[Setting]) -> list[dict]:
    """Every setting's row; the vision tower runs once per input size (its tokens are cached)."""
    import click

    images, cache = len(split.image_paths), {}
    with click.progressbar(length=images * len(rows), label="mosaic", file=sys.stderr) as bar:
        return [evaluate(model, tokenizer, split, kinds, setting, bar.update, cache) for setting in rows]


def format_rows(results: list[dict]) -> str:
    kinds = [k for k in mosaic.QUESTION_TYPES if any(k in r["by_type"] for r in results)]
    lines = [f"{'setting':<28}{'tokens':>7}{'accuracy':>10}  {'95% CI':<15}" + "".join(f"{k:>12}" for k in kinds)]
    for r in results:
        label = Setting(r["pruner"], r["keep_ratio"], r["image_size"], r["keep_positions"]).label
        ci = f"{r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}"
        by_type = "".join(f"{r['by_type'][k]['accuracy']:>12.4f}" if k in r["by_type"] else f"{'':>12}" for k in kinds)
        lines.append(f"{label:<28}{r['visual_tokens']:>7}{r['accuracy']:>10.4f}  {ci:<15}" + by_type)
    return "\n".join(lines)


def curve_style(name: str) -> dict:
    """One colour per method, kept positions solid and packed dotted; the resolution curve black, dashed."""
    from pruners import PRUNERS

    if name.startswith("lower resolution"):
        return dict(color="black", linestyle="--", linewidth=2.5)
    names, kept = sorted(PRUNERS), "keep-positions" in name
    pruner = name.split(" ")[0]
    colour = f"C{names.index(pruner) % 10}" if pruner in names else None
    return dict(color=colour, linestyle="-" if kept else ":", linewidth=1.8 if kept else 1.0)


def plot(results: list[dict], path: Path, title: str) -> Path:
    """Accuracy against visual tokens: one curve per method (each from the unpruned full-size
    point), the resolution curve, 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = max((r for r in results if r["pruner"] is None), key=lambda r: r["image_size"])
    curves: dict[str, list[dict]] = {"lower resolution (unpruned)": [r for r in results if r["pruner"] is None]}
    for r in results:
        if r["pruner"] is not None:
            name = r["pruner"] + (" + keep-positions" if r["keep_positions"] else "")
            curves.setdefault(name, [full]).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in curves.items():
        rows = sorted(rows, key=lambda r: r["visual_tokens"])
        x = [r["visual_tokens"] for r in rows]
        y = [r["accuracy"] for r in rows]
        err = [[r["accuracy"] - r["ci95"][0] for r in rows], [r["ci95"][1] - r["accuracy"] for r in rows]]
        ax.errorbar(x, y, yerr=err, marker="o", markersize=3, capsize=2, label=name, **curve_style(name))
    ax.set(xscale="log", xlabel="visual tokens reaching the LLM", ylabel="answer accuracy", title=title)
    ax.set_xticks(sorted({r["visual_tokens"] for r in results}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())  # log-scale minor labels overlap ours
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    import tempfile

    import click

    from fastvlm_mlx.hub import resolve_model
    from fastvlm_mlx.load import load_model
    from pruners import PRUNERS

    @click.command()
    @click.option("--model", "model_name", default="mosaic", show_default=True, help="Shipped name or folder.")
    @click.option(
        "--mosaics", type=int, default=None, help=f"First N test mosaics (default: all {mosaic.TEST_MOSAICS})."
    )
    @click.option("--pruners", default="all", show_default=True, help="Comma-separated names, all, or none.")
    @click.option("--keep-ratios", default=",".join(map(str, KEEP_RATIOS)), show_default=True)
    @click.option("--image-sizes", default=",".join(map(str, IMAGE_SIZES)), show_default=True, help="Unpruned.")
    @click.option("--keep-positions", type=click.Choice(["off", "on", "both"]), default="off", show_default=True)
    @click.option("--out", default="bench-results/mosaic-accuracy", show_default=True, help="Writes OUT.json, OUT.png.")
    def run(model_name, mosaics, pruners, keep_ratios, image_sizes, keep_positions, out):
        """Mosaic test-set accuracy (95% intervals, per question type) for every pruner and keep ratio,
        and unpruned at smaller input sizes (MLX runtime, greedy)."""
        names = {"all": sorted(PRUNERS), "none": []}.get(pruners)
        names = [p.strip() for p in pruners.split(",") if p.strip()] if names is None else names
        positions = {"off": (False,), "on": (True,), "both": (False, True)}[keep_positions]
        refuse_existing(Path(f"{out}.json"), Path(f"{out}.png"))  # before any work
        folder = resolve_model(model_name)
        model, tokenizer = load_model(folder)
        rows = settings(
            names,
            [float(r) for r in keep_ratios.split(",")],
            [int(s) for s in image_sizes.split(",") if s.strip()],
            model.config.image_size,
            positions,
        )
        with tempfile.TemporaryDirectory() as work:
            split, kinds = mosaic.read_test_set(mosaic.write_test_set(Path(work), mosaics))
            results = table(model, tokenizer, split, kinds, rows)
        click.echo(format_rows(results))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        record = dict(model=model_name, folder=str(folder), mosaics=len(split.image_paths), questions=len(kinds))
        record.update(test_seed=mosaic.TEST_SEED, results=results)
        with open(open_new(Path(f"{out}.json")), "w") as f:
            f.write(json.dumps(record, indent=2))
        title = f"mosaic test set ({model_name}), {len(split.image_paths)} mosaics, {len(kinds)} questions"
        click.echo(f"wrote {out}.json and {plot(results, Path(f'{out}.png'), title)}")

    run()


if __name__ == "__main__":
    main()
