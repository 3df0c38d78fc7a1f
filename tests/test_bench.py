"""`fastvlm-mlx bench` on the tiny model: interleaved runs, honest stage timings, quality, files out."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from bench.quality import answer_correct, first_token_kl, token_agreement
from fastvlm_mlx.cli import main
from tests.test_cli import assert_clean_error, run_cli

pytest.importorskip("torch")
pytest.importorskip("matplotlib")


def test_token_agreement_counts_length_mismatch():
    assert token_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_agreement([1, 2, 9], [1, 2, 3]) == pytest.approx(2 / 3)
    assert token_agreement([1, 2], [1, 2, 3, 4]) == 0.5
    assert token_agreement([], []) == 1.0


def test_first_token_kl():
    rng = np.random.default_rng(0)
    p = np.log(rng.dirichlet(np.ones(50)))
    q = np.log(rng.dirichlet(np.ones(50)))
    assert first_token_kl(p, p) == pytest.approx(0.0, abs=1e-12)
    assert first_token_kl(q, p) == pytest.approx(float(np.sum(np.exp(p) * (p - q))), rel=1e-9)
    assert first_token_kl(q, p) > 0


def test_answer_matching():
    assert answer_correct(" Red.", "red")
    assert answer_correct("circle shape", "circle")
    assert not answer_correct("reddish", "red")
    assert not answer_correct("no", "yes")


@pytest.fixture(scope="module")
def bench_run(tiny_mlx, tiny_hf, image_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = [
        "bench",
        *("--model", str(tiny_mlx), "--reference", str(tiny_hf[0]), "--image", str(image_path)),
        *("--pruners", "divprune,attention", "--keep-ratios", "0.5,1", "--image-sizes", "512"),
        *("--runs", "2", "--warmup", "1", "--max-tokens", "6", "--out", str(out)),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out, result.output, json.loads((out / "bench-mlx.json").read_text())


def test_bench_runs_every_setting_on_both_frameworks_interleaved(bench_run):
    _, _, results = bench_run
    labels = [s["label"] for s in results["settings"]]
    assert labels == ["baseline @1024", "baseline @512", "divprune 0.5 @1024", "attention 0.5 @1024"]
    runs = results["runs"]
    assert len(runs) == 2 * 4 * 2  # rounds x settings x frameworks; warmup not recorded
    firsts = [runs[i]["framework"] for i in range(0, len(runs), 2)]
    # who goes first alternates from run to run, and flips for the same setting in the next round
    assert all(a != b for a, b in zip(firsts[:3], firsts[1:4], strict=True))
    assert all(firsts[s] != firsts[4 + s] for s in range(4)) and firsts.count("mlx") == firsts.count("torch")
    for run in runs:
        t = run["timings"]
        assert t["ttft_s"] == pytest.approx(t["preprocess_s"] + t["vision_s"] + t["prune_s"] + t["prefill_s"])
        assert t["vision_s"] > 0  # TTFT always includes the vision encoder
    env = results["environment"]
    assert {"mlx", "torch", "transformers", "blas", "torch_threads", "torch_device"} <= set(env)


def test_bench_frameworks_agree_and_quality_is_measured(bench_run):
    _, _, results = bench_run
    summary = results["summary"]
    assert len(summary) == 8
    by_key = {(r["framework"], r["label"]): r for r in summary}
    for label in ("baseline @1024", "baseline @512", "divprune 0.5 @1024", "attention 0.5 @1024"):
        mlx_row, torch_row = by_key[("mlx", label)], by_key[("torch", label)]
        assert mlx_row["visual_tokens"] == torch_row["visual_tokens"]
        assert mlx_row["token_agreement"] == torch_row["token_agreement"]  # same greedy tokens on both sides
        for stage in ("ttft", "vision", "prefill", "preprocess", "decode"):
            ratio = mlx_row[f"{stage}_ratio_mlx_over_torch"]
            assert ratio["min"] <= ratio["median"] <= ratio["max"] and ratio["median"] > 0
    base = by_key[("mlx", "baseline @1024")]
    assert base["exact_match"] == 1.0 and base["kl_first_token"] == pytest.approx(0, abs=1e-9)
    assert by_key[("mlx", "baseline @512")]["visual_tokens"] == 64
    assert by_key[("mlx", "divprune 0.5 @1024")]["visual_tokens"] == 128
    assert by_key[("mlx", "divprune 0.5 @1024")]["kl_first_token"] > 0  # pruning changed the distribution


def test_bench_writes_csv_table_and_plots(bench_run):
    out, output, _ = bench_run
    rows = list(csv.DictReader((out / "bench-mlx.csv").open()))
    assert len(rows) == 8 and {"ttft_s", "ttft_s_min", "ttft_s_max", "token_agreement"} <= set(rows[0])
    assert "divprune 0.5 @1024" in output and "TTFT" in output
    for kind in ("ttft", "stages", "quality"):
        with Image.open(out / f"bench-mlx-{kind}.png") as png:
            assert png.size[0] > 300
    replot = CliRunner().invoke(main, ["bench", "plot", str(out / "bench-mlx.json"), "--out", str(out / "again")])
    assert replot.exit_code == 0, replot.output
    assert (out / "again" / "bench-mlx-ttft.png").is_file()


def test_bench_dataset_accuracy_and_no_overwrite(tiny_mlx, image_path, tmp_path):
    first = CliRunner().invoke(
        main, ["generate", "--model", str(tiny_mlx), "--image", str(image_path), "--prompt", "q", "--max-tokens", "3"]
    )
    answer = first.output.strip().split(" ")[0] or "x"
    dataset = tmp_path / "qa.json"
    dataset.write_text(json.dumps([{"image": str(image_path), "question": "q", "answer": answer}]))
    args = ["bench", "--model", str(tiny_mlx), "--dataset", str(dataset), "--frameworks", "mlx", "--pruners", "none"]
    args += ["--runs", "1", "--warmup", "0", "--max-tokens", "3", "--out", str(tmp_path / "out")]
    for _ in range(2):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "out" / "bench-mlx.json").read_text())
    assert results["summary"][0]["accuracy"] == (1.0 if first.output.strip() else 0.0)
    assert (tmp_path / "out" / "bench-mlx-2.json").is_file()  # the second run did not overwrite the first


def test_bench_bad_input_is_a_clean_error(tiny_mlx, image_path, tmp_path):
    base = ["bench", "--model", str(tiny_mlx), "--image", str(image_path), "--out", str(tmp_path)]
    assert_clean_error(run_cli(*base, "--frameworks", "mlx,jax"), "jax")
    assert_clean_error(run_cli(*base), "--reference")
    assert_clean_error(run_cli(*base, "--frameworks", "mlx", "--pruners", "tome"), "unknown pruner")
    assert_clean_error(run_cli(*base, "--frameworks", "mlx", "--keep-ratios", "2"), "(0, 1]")
    # without --model the embedded model is benchmarked; a missing image is still named
    assert_clean_error(run_cli("bench", "--image", str(tmp_path / "missing.png")), "image not found")


def test_chat_bench_runs_on_the_tiny_model(tiny_mlx, tmp_path):
    from bench.chat import main as chat_bench

    args = ["--model", str(tiny_mlx), "--image-size", "128", "--runs", "1", "--max-tokens", "2", "--out", str(tmp_path)]
    result = CliRunner().invoke(chat_bench, args)
    assert result.exit_code == 0, result.output
    data = json.loads(next(tmp_path.glob("chat-*.json")).read_text())
    summary, run = data["summary"], data["runs"][0]
    assert summary["new_conversation_skipped_vision"]
    assert run["new_conversation"]["timings"]["vision_s"] == 0 and run["first"]["timings"]["vision_s"] > 0
    follow_up = run["follow_up_1"]
    assert follow_up["prefilled_tokens"] <= follow_up["prompt_tokens"] - run["first"]["prompt_tokens"]  # not turn 1
    assert set(summary["ttft_s_median"]) == {"first", "follow_up_1", "follow_up_2", "new_conversation"}
