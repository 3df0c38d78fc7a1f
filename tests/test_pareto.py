"""bench.pareto: mosaic accuracy joined with 0.5B TTFT at the same visual-token counts."""

import json

import pytest
from click.testing import CliRunner

from bench import pareto


def accuracy_rows() -> dict:
    def row(pruner, ratio, size, tokens, acc, kp=False):
        return dict(
            pruner=pruner,
            keep_ratio=ratio,
            image_size=size,
            keep_positions=kp,
            visual_tokens=tokens,
            accuracy=acc,
            ci95=[acc - 0.01, acc + 0.01],
            questions=100,
            by_type={},
        )

    rows = [row(None, 1.0, 256, 256, 0.97), row(None, 1.0, 192, 144, 0.93), row(None, 1.0, 128, 64, 0.80)]
    rows += [row("pool", 0.25, 256, 64, 0.85), row("random", 0.25, 256, 64, 0.70), row("pool", 0.5, 256, 128, 0.95)]
    rows += [row("pool", 0.25, 256, 64, 0.88, kp=True), row("divprune", 0.25, 256, 64, 0.9)]  # last: no timing
    return dict(model="mosaic", results=rows)


def bench_rows() -> dict:
    def row(pruner, ratio, size, tokens, ttft, kp=False, framework="mlx"):
        return dict(
            framework=framework,
            pruner=pruner,
            keep_ratio=ratio,
            image_size=size,
            keep_positions=kp,
            visual_tokens=tokens,
            ttft_s=dict(median=ttft),
        )

    rows = [row(None, 1.0, 1024, 256, 2.6), row(None, 1.0, 768, 144, 1.5), row(None, 1.0, 512, 64, 0.9)]
    rows += [row("pool", 0.25, 1024, 64, 2.0), row("random", 0.25, 1024, 64, 1.95), row("pool", 0.5, 1024, 128, 2.2)]
    rows += [row("pool", 0.25, 1024, 64, 2.01, kp=True), row("pool", 0.25, 1024, 64, 9.0, framework="torch")]
    return dict(summary=rows, environment=dict(processor="test cpu", cpu_count=2))


def test_rows_meet_at_the_same_token_counts_and_budgets_pick_the_best(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "acc.json").write_text(json.dumps(accuracy_rows()))
    (tmp_path / "bench.json").write_text(json.dumps(bench_rows()))
    args = ["--accuracy", str(tmp_path / "acc.json"), "--timings", str(tmp_path / "bench.json")]
    out = CliRunner().invoke(pareto.main, [*args, "--out", str(tmp_path / "p")])
    assert out.exit_code == 0, out.output
    panel = json.loads((tmp_path / "p.json").read_text())["panels"][0]
    ttft = {(r["pruner"], r["image_size"], r["keep_ratio"], r["keep_positions"]): r["ttft_s"] for r in panel["rows"]}
    assert ttft[(None, 192, 1.0, False)] == 1.5 and ttft[("pool", 256, 0.25, False)] == 2.0  # MLX's, not torch's
    assert ttft[("pool", 256, 0.25, True)] == 2.01 and len(panel["rows"]) == 7  # divprune had no timing
    picks = {round(p["budget_s"], 2): p for p in panel["best_within"]}
    assert picks[0.9]["pick"] == "lower resolution" and picks[2.01]["pick"] == "lower resolution"  # 0.93 at 1.5 s
    assert picks[2.2]["accuracy"] == 0.95 and picks[2.6]["accuracy"] == 0.97
    assert (tmp_path / "p.png").stat().st_size > 0
    again = CliRunner().invoke(pareto.main, [*args, "--out", str(tmp_path / "p")])
    assert again.exit_code != 0 and "exists" in again.output  # an earlier report is never replaced


def test_different_token_counts_are_refused(tmp_path):
    bench = bench_rows()
    bench["summary"][1]["visual_tokens"] = 100  # the 768 run is not the 192 mosaic's grid
    (tmp_path / "acc.json").write_text(json.dumps(accuracy_rows()))
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    args = ["--accuracy", str(tmp_path / "acc.json"), "--timings", str(tmp_path / "bench.json")]
    out = CliRunner().invoke(pareto.main, [*args, "--out", str(tmp_path / "p")])
    assert out.exit_code != 0 and "token counts differ" in out.output and not (tmp_path / "p.json").exists()


def test_later_timing_files_add_settings_without_replacing(tmp_path):
    pytest.importorskip("matplotlib")
    first, later = bench_rows(), bench_rows()
    first["summary"] = [r for r in first["summary"] if r["pruner"] != "pool" or r["keep_positions"]]
    for row in later["summary"]:
        row["ttft_s"] = dict(median=row["ttft_s"]["median"] + 5)  # another run: never replaces the first's
    (tmp_path / "acc.json").write_text(json.dumps(accuracy_rows()))
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(later))
    args = ["--accuracy", str(tmp_path / "acc.json"), "--timings", str(tmp_path / "a.json")]
    out = CliRunner().invoke(pareto.main, [*args, "--timings", str(tmp_path / "b.json"), "--out", str(tmp_path / "p")])
    assert out.exit_code == 0, out.output
    rows = json.loads((tmp_path / "p.json").read_text())["panels"][0]["rows"]
    ttft = {(r["pruner"], r["image_size"], r["keep_ratio"], r["keep_positions"]): r["ttft_s"] for r in rows}
    assert ttft[(None, 256, 1.0, False)] == 2.6 and ttft[("pool", 256, 0.25, True)] == 2.01  # the first file's
    assert ttft[("pool", 256, 0.25, False)] == 7.0 and ttft[("pool", 256, 0.5, False)] == 7.2  # only in the later
