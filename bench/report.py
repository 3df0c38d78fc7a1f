"""Bench results on disk and on screen: JSON (everything), CSV (summary), a compact table, PNG plots."""

import csv
import json
import os
from pathlib import Path

import click

from fastvlm_mlx.errors import UserError
from fastvlm_mlx.files import open_new

STAGE_COLUMNS = ("preprocess_s", "vision_s", "prune_s", "prefill_s")
QUALITY_COLUMNS = ("accuracy", "exact_match", "token_agreement", "top1_agreement", "kl_first_token")


def refuse_existing(*paths: Path) -> None:
    """A click error naming the first of `paths` that exists: a report is never written over an earlier one.
    Call it before the work, so nothing is computed for a file that could not be written."""
    for path in paths:
        if path.exists():
            raise click.ClickException(f"{path} exists; choose another --out or move it away")


def write_results(results: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write `stem.json` and `stem.csv`, or `stem-2.*`, `stem-3.*`... : each file is created new
    (O_EXCL), so an earlier run's results, even ones written a moment ago, are never overwritten."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [flatten(row) for row in results["summary"]]
    n = 0
    while True:
        n += 1
        name = stem if n == 1 else f"{stem}-{n}"
        json_path, csv_path = out_dir / f"{name}.json", out_dir / f"{name}.csv"
        try:
            json_fd = open_new(json_path)
        except FileExistsError:
            continue
        try:
            csv_fd = open_new(csv_path)
        except FileExistsError:
            os.close(json_fd)
            json_path.unlink()
            continue
        with os.fdopen(json_fd, "w") as f:
            f.write(json.dumps(results, indent=1))
        with os.fdopen(csv_fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return json_path, csv_path


def flatten(row: dict) -> dict:
    """Stage statistics {median, min, max} become `stage`, `stage_min`, `stage_max` columns."""
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat[key] = value["median"]
            flat[f"{key}_min"], flat[f"{key}_max"] = value["min"], value["max"]
        else:
            flat[key] = value
    return flat


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(summary: list[dict]) -> str:
    """One line per setting and framework: tokens, TTFT (median [min-max]), stages, decode, quality."""
    header = (
        f"{'setting':<22}{'fw':<6}{'tok':>5}{'TTFT s':>9}{'[min-max]':>15}{'vision':>8}{'prune ms':>9}"
        f"{'prefill':>8}{'tok/s':>7}{'ratio':>7}{'acc':>6}{'agree':>7}{'top1':>6}{'KL':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in summary:
        ttft, ratio = row["ttft_s"], row.get("ttft_ratio_mlx_over_torch")
        lines.append(
            f"{row['label']:<22}{row['framework']:<6}{row['visual_tokens']:>5}{ttft['median']:>9.3f}"
            f"{'[' + format(ttft['min'], '.2f') + '-' + format(ttft['max'], '.2f') + ']':>15}"
            f"{row['vision_s']['median']:>8.3f}{row['prune_s']['median'] * 1e3:>9.2f}{row['prefill_s']['median']:>8.3f}"
            f"{row['decode_tokens_per_s']['median']:>7.1f}{_fmt(ratio and ratio['median'], '.2f'):>7}"
            f"{_fmt(row['accuracy'], '.3f'):>6}{_fmt(row['token_agreement'], '.3f'):>7}"
            f"{_fmt(row['top1_agreement'], '.2f'):>6}{_fmt(row['kl_first_token'], '.3f'):>7}"
        )
    return "\n".join(lines)


def draw_plots(results: dict, out_dir: Path, name: str) -> list[Path]:
    """TTFT vs keep ratio per method, stacked stage breakdown, quality vs TTFT; one PNG each."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'fastvlm-mlx[bench]'") from None
    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = results["summary"]
    paths = [
        _ttft_vs_ratio(summary, results["config"]["image_size"], out_dir / f"{name}-ttft.png"),
        _stages(summary, out_dir / f"{name}-stages.png"),
        _quality_vs_ttft(summary, out_dir / f"{name}-quality.png"),
    ]
    return [p for p in paths if p is not None]


def _frameworks(summary: list[dict]) -> list[str]:
    return list(dict.fromkeys(row["framework"] for row in summary))


def _ttft_vs_ratio(summary: list[dict], full_size: int, path: Path) -> Path:
    import matplotlib.pyplot as plt

    frameworks = _frameworks(summary)
    fig, axes = plt.subplots(1, len(frameworks), figsize=(6.5 * len(frameworks), 4.5), squeeze=False)
    for ax, fw in zip(axes[0], frameworks, strict=True):
        rows = [r for r in summary if r["framework"] == fw]
        base = next(r for r in rows if r["pruner"] is None and r["image_size"] == full_size)
        full_tokens = base["visual_tokens"]
        for method in dict.fromkeys(r["pruner"] for r in rows if r["pruner"]):
            points = sorted([(1.0, base)] + [(r["keep_ratio"], r) for r in rows if r["pruner"] == method])
            _errorline(ax, [p[0] for p in points], [p[1]["ttft_s"] for p in points], label=method, marker="o")
        for r in rows:
            if r["pruner"] is None and r["image_size"] != full_size:
                share = r["visual_tokens"] / full_tokens
                _errorline(ax, [share], [r["ttft_s"]], label=f"image {r['image_size']}", marker="s", linestyle="none")
        ax.set(title=f"{fw}: TTFT (image file in -> first token)", xlabel="visual tokens kept (share)", ylabel="s")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, path)


def _errorline(ax, xs, stats_list, **style):
    medians = [s["median"] for s in stats_list]
    low = [m - s["min"] for m, s in zip(medians, stats_list, strict=True)]
    high = [s["max"] - m for m, s in zip(medians, stats_list, strict=True)]
    ax.errorbar(xs, medians, yerr=[low, high], capsize=3, **style)


def _stages(summary: list[dict], path: Path) -> Path:
    import matplotlib.pyplot as plt

    labels = [f"{r['framework']} {r['label']}" for r in summary]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(summary) + 1.5))
    left = [0.0] * len(summary)
    for stage in STAGE_COLUMNS:
        widths = [r[stage]["median"] for r in summary]
        ax.barh(labels, widths, left=left, label=stage.removesuffix("_s"))
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set(xlabel="seconds (medians); the bar ends at TTFT", title="Where time to first token goes")
    ax.legend(ncol=4, fontsize=8, loc="lower right")
    return _save(fig, path)


def _quality_vs_ttft(summary: list[dict], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    metric = "accuracy" if any(r["accuracy"] is not None for r in summary) else "token_agreement"
    rows = [r for r in summary if r[metric] is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = list(dict.fromkeys(_method(r) for r in rows))
    colours = dict(zip(methods, plt.cm.tab10.colors * 2, strict=False))
    for fw, marker in zip(_frameworks(rows), "os^", strict=False):
        for method in methods:
            mine = [r for r in rows if r["framework"] == fw and _method(r) == method]
            x, y = [r["ttft_s"]["median"] for r in mine], [r[metric] for r in mine]
            ax.scatter(x, y, marker=marker, color=colours[method], label=f"{fw} {method}")
    ax.set(xlabel="TTFT median (s)", ylabel=metric.replace("_", " "), title=f"{metric.replace('_', ' ')} vs TTFT")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _method(row: dict) -> str:
    return row["pruner"] or f"image {row['image_size']}"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
