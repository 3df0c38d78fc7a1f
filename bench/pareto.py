"""Accuracy against TTFT: the mosaic testbed's accuracy for each setting, placed at the TTFT that
the FastVLM-0.5B architecture takes with the same visual-token count on this machine.

    python -m bench.pareto --accuracy docs/results/mosaic-accuracy.json [--accuracy ...tuned.json] \
        --timings docs/results/bench-0.5b-pareto.json --out docs/results/mosaic-pareto

The timings come from `fastvlm-mlx bench --synthetic 0.5b --frameworks mlx` (random weights at the
real size, so they are real times but say nothing of accuracy). A mosaic setting is matched to the
0.5B setting with the same pruner, keep ratio and kept positions at 1024^2 (256 tokens in both);
a mosaic input size s is matched to 0.5B at 4s (the same grid: 192 -> 768^2, 144 tokens). Writes
OUT.json (the joined rows, and per TTFT budget the most accurate setting within it) and OUT.png
(one panel per accuracy file: a curve per method, the resolution curve dashed).
"""

import json
from pathlib import Path

import click

from bench.mosaic_accuracy import curve_style
from bench.report import refuse_existing
from fastvlm_mlx.files import open_new

SCALE = 4  # the 0.5B model's 1024^2 input over the mosaic model's 256^2: the same 16x16 token grid


def timing_table(bench: dict) -> dict[tuple, dict]:
    """MLX's median TTFT and visual tokens by (pruner, keep ratio, image size, keep_positions)."""
    table = {}
    for row in bench["summary"]:
        if row["framework"] == "mlx":
            key = (row["pruner"], row["keep_ratio"], row["image_size"], bool(row.get("keep_positions", False)))
            table[key] = dict(ttft_s=row["ttft_s"]["median"], visual_tokens=row["visual_tokens"])
    return table


def timing_key(row: dict, model_size: int) -> tuple:
    """The 0.5B setting that matches a mosaic row."""
    if row["pruner"] is None:
        return (None, 1.0, row["image_size"] * SCALE, False)
    return (row["pruner"], row["keep_ratio"], model_size * SCALE, bool(row["keep_positions"]))


def join(accuracy: dict, timings: dict[tuple, dict]) -> list[dict]:
    """The accuracy rows that have a matching timing, each with the 0.5B TTFT and token count."""
    model_size = max(r["image_size"] for r in accuracy["results"])
    rows = []
    for row in accuracy["results"]:
        timed = timings.get(timing_key(row, model_size))
        if timed is None:
            continue
        if timed["visual_tokens"] != row["visual_tokens"]:
            raise click.ClickException(
                f"token counts differ for {row['pruner']} {row['keep_ratio']}: mosaic {row['visual_tokens']}, "
                f"0.5B {timed['visual_tokens']}; time the 0.5B model at 1024^2 and at 4x the mosaic sizes"
            )
        rows.append(dict(row, ttft_s=timed["ttft_s"], model=accuracy["model"]))
    return rows


def method(row: dict) -> str:
    if row["pruner"] is None:
        return "lower resolution"
    return row["pruner"] + (" + keep-positions" if row["keep_positions"] else "")


def best_within(rows: list[dict]) -> list[dict]:
    """For each setting's TTFT as a budget: the most accurate setting at or under it."""
    budgets = sorted({r["ttft_s"] for r in rows})
    picks = []
    for budget in budgets:
        best = max((r for r in rows if r["ttft_s"] <= budget), key=lambda r: r["accuracy"])
        picks.append(
            dict(
                budget_s=budget,
                pick=method(best),
                keep_ratio=best["keep_ratio"],
                image_size=best["image_size"],
                accuracy=best["accuracy"],
                ttft_s=best["ttft_s"],
            )
        )
    return picks


def plot(panels: list[list[dict]], path: Path, environment: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for ax, rows in zip(axes[0], panels, strict=True):
        full = next(r for r in rows if r["pruner"] is None and r["image_size"] == max(x["image_size"] for x in rows))
        curves: dict[str, list[dict]] = {}
        for r in rows:
            curves.setdefault(method(r), [] if r["pruner"] is None else [full]).append(r)
        for name, points in sorted(curves.items(), key=lambda item: item[0] != "lower resolution"):
            points = sorted(points, key=lambda r: r["visual_tokens"])  # by the work kept, not by timing noise
            err = [[r["accuracy"] - r["ci95"][0] for r in points], [r["ci95"][1] - r["accuracy"] for r in points]]
            ax.errorbar(
                [r["ttft_s"] for r in points],
                [r["accuracy"] for r in points],
                yerr=err,
                marker="o",
                markersize=3,
                capsize=2,
                label=name,
                **curve_style(name),
            )
        ax.set(
            xlabel="TTFT of the FastVLM-0.5B architecture at the same visual tokens (s, --synthetic 0.5b)",
            ylabel="mosaic test accuracy (95% CI)",
            title=f"{rows[0]['model']}: accuracy against TTFT",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", ncol=2)  # the fast, low-accuracy corner is empty
    fig.suptitle(f"accuracy: mosaic testbed (trained normally / pruning-aware); TTFT: {environment}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command()
@click.option(
    "--accuracy",
    "accuracy_paths",
    multiple=True,
    required=True,
    type=click.Path(exists=True),
    help="A bench.mosaic_accuracy JSON (repeatable: one panel each).",
)
@click.option(
    "--timings",
    "timings_paths",
    multiple=True,
    required=True,
    type=click.Path(exists=True),
    help="A bench --synthetic 0.5b JSON (repeatable: later files add settings, from the same machine).",
)
@click.option("--out", default="bench-results/mosaic-pareto", show_default=True, help="Writes OUT.json, OUT.png.")
def main(accuracy_paths: tuple[str, ...], timings_paths: tuple[str, ...], out: str) -> None:
    """Join mosaic accuracy with 0.5B TTFT; write the Pareto plot and the best setting per TTFT budget."""
    benches = [json.loads(Path(p).read_text()) for p in timings_paths]
    bench, table = benches[0], {}
    for other in benches:  # the first file's timing of a setting wins: later files only add settings
        for key, row in timing_table(other).items():
            table.setdefault(key, row)
    panels = [join(json.loads(Path(p).read_text()), table) for p in accuracy_paths]
    environment = f"{bench['environment'].get('processor', '')}, {bench['environment'].get('cpu_count')} cores, MLX"
    record = dict(
        timings=list(timings_paths),
        accuracy=list(accuracy_paths),
        environment=environment,
        panels=[dict(model=rows[0]["model"], rows=rows, best_within=best_within(rows)) for rows in panels],
    )
    json_path, png_path = Path(f"{out}.json"), Path(f"{out}.png")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    refuse_existing(json_path, png_path)
    with open(open_new(json_path), "w") as f:
        f.write(json.dumps(record, indent=1) + "\n")
    plot(panels, png_path, environment)
    for panel in record["panels"]:
        click.echo(f"\n{panel['model']}: the most accurate setting within each TTFT budget")
        for pick in panel["best_within"]:
            click.echo(
                f"  <= {pick['budget_s']:.2f} s: {pick['pick']} (keep {pick['keep_ratio']:g}, "
                f"{pick['image_size']}px): {pick['accuracy']:.3f} at {pick['ttft_s']:.2f} s"
            )
    click.echo(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
