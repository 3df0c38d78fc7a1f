"""Pruning inside the pipeline: MLX and the PyTorch reference prune the same real vision tokens the
same way, pruned generation through the CLI matches the reference token for token, and the CLI's
pruning options and prune-viz fail cleanly on bad input."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fastvlm_mlx.cli import main
from pruners import PRUNERS, prune
from tests.test_cli import assert_clean_error, run_cli

torch = pytest.importorskip("torch")
PROMPT = "what color is the shape?"


def test_attention_scores_match_the_reference(tiny_pair):
    from bench.torch_pipeline import encode_image

    reference, model, _, pixels = tiny_pair
    tokens, scores = model.encode_image(mx.array(pixels), with_scores=True)
    with torch.no_grad():
        ref_tokens, ref_scores = encode_image(reference, torch.from_numpy(pixels).permute(0, 3, 1, 2), True)
    assert scores.shape == (1, 256)
    assert float(mx.abs(scores.sum() - 1)) < 1e-5  # a distribution over keys
    np.testing.assert_allclose(np.array(scores), ref_scores.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.array(tokens), ref_tokens.numpy(), atol=1e-4 * float(ref_tokens.abs().max()))


@pytest.mark.parametrize("ratio", [0.5, 0.25])
@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_same_tokens_kept_on_real_features(tiny_pair, name, ratio):
    """Both pruners on the MLX tower's own features and attention scores choose the same tokens.

    The tiny random tower's tokens are nearly parallel (pairwise cosine distances from 2e-6,
    where the two frameworks' float32 cosines differ by up to 1e-6), so DivPrune's late
    farthest-point picks may swap a near-tied token, and so may CDPruner's, whose DPP residues
    of such tokens are near its SPENT threshold (its relevance here: the attention scores): each
    must share >= 97% of its choices. Everything else (and both on well-separated features,
    tests/test_pruners.py) is exact.
    """
    from bench.torch_pruners import torch_prune

    _, model, _, pixels = tiny_pair
    tokens, scores = model.encode_image(mx.array(pixels), with_scores=True)
    mine = prune(name, tokens, ratio, scores=scores)
    ref = torch_prune(name, torch.from_numpy(np.array(tokens)), ratio, torch.from_numpy(np.array(scores)))
    if name in ("divprune", "cdpruner"):
        shared = len(set(np.array(mine.indices[0]).tolist()) & set(ref[1][0].tolist()))
        assert shared >= 0.97 * mine.indices.shape[1]
        return
    assert np.array_equal(np.array(mine.indices), ref[1].numpy())
    assert np.array_equal(np.array(mine.sources), ref[2].numpy())


# Each side runs its own tower here (features differ by ~1e-6 relative), so the settings avoid
# near-ties: DivPrune's late farthest-point picks at 0.5 can flip on this image.
@pytest.mark.parametrize(
    ("name", "ratio"), [("visionzip", 0.25), ("divprune", 0.25), ("random", 0.125), ("cdpruner", 0.25)]
)
def test_pruned_generation_matches_reference_through_cli(tiny_pair, tiny_mlx, image_path, name, ratio):
    from bench.torch_pipeline import torch_generate

    reference, model, tokenizer, _ = tiny_pair
    args = ["--model", str(tiny_mlx), "--image", str(image_path), "--prompt", PROMPT, "--max-tokens", "12"]
    result = CliRunner().invoke(main, ["generate", *args, "--pruner", name, "--keep-ratio", str(ratio), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    k = max(1, round(ratio * 256))
    assert out["visual_tokens"] == {"before": 256, "after": k}
    cfg = model.config
    ref = torch_generate(
        reference,
        tokenizer,
        image_path,
        PROMPT,
        image_size=cfg.image_size,
        mode=cfg.preprocess_mode,
        max_tokens=12,
        eos=set(cfg.eos_token_ids),
        pruner=name,
        keep_ratio=ratio,
    )
    assert ref.visual_tokens_after == k
    assert len(ref.token_ids) >= 6
    assert out["token_ids"] == ref.token_ids
    timings = out["timings"]
    stages = timings["preprocess_s"] + timings["vision_s"] + timings["prune_s"] + timings["prefill_s"]
    assert timings["prune_s"] > 0 and timings["ttft_s"] == pytest.approx(stages, rel=1e-6)


def test_pruning_changes_the_answer_context(tiny_pair, tiny_mlx, image_path):
    """A pruned run really feeds fewer tokens: the logits it starts from differ from unpruned."""
    runner = CliRunner()
    args = ["generate", "--model", str(tiny_mlx), "--image", str(image_path), "--prompt", PROMPT, "--json"]
    full = json.loads(runner.invoke(main, [*args, "--max-tokens", "12"]).output)
    tiny = json.loads(
        runner.invoke(main, [*args, "--max-tokens", "12", "--pruner", "norm", "--keep-ratio", "0.01"]).output
    )
    assert tiny["visual_tokens"]["after"] == 3
    assert full["token_ids"] != tiny["token_ids"]


def test_lower_image_size_gives_fewer_tokens(tiny_mlx, image_path):
    args = ["generate", "--model", str(tiny_mlx), "--image", str(image_path), "--prompt", PROMPT, "--json"]
    for size, count in ((512, 64), (768, 144)):
        out = json.loads(CliRunner().invoke(main, [*args, "--max-tokens", "2", "--image-size", str(size)]).output)
        assert out["visual_tokens"] == {"before": count, "after": count}


def generate_with(tiny_mlx, image_path, *extra: str):
    args = ["--model", str(tiny_mlx), "--image", str(image_path), "--prompt", "hi", "--max-tokens", "2"]
    return run_cli("generate", *args, *extra)


def test_unknown_pruner_is_a_clean_error(tiny_mlx, image_path):
    assert_clean_error(generate_with(tiny_mlx, image_path, "--pruner", "tome"), "unknown pruner", "divprune", "pool")


@pytest.mark.parametrize("ratio", ["0", "1.5", "-1"])
def test_bad_keep_ratio_is_a_clean_error(tiny_mlx, image_path, ratio):
    assert_clean_error(generate_with(tiny_mlx, image_path, "--pruner", "norm", "--keep-ratio", ratio), "(0, 1]")


def test_keep_ratio_without_pruner_is_a_clean_error(tiny_mlx, image_path):
    assert_clean_error(generate_with(tiny_mlx, image_path, "--keep-ratio", "0.5"), "--pruner")
    assert_clean_error(generate_with(tiny_mlx, image_path, "--pruner", "none", "--keep-ratio", "0.5"), "--pruner none")


def test_pruner_without_keep_ratio_is_a_clean_error(tiny_mlx, image_path):
    """A model converted without pruning has no ratio to lend: silently keeping every token would lie."""
    assert_clean_error(generate_with(tiny_mlx, image_path, "--pruner", "divprune"), "--keep-ratio")


def test_prune_viz_draws_the_grid_and_keeps_existing_files(tiny_pair, tiny_mlx, image_path, tmp_path):
    out = tmp_path / "viz.png"
    viz = ["prune-viz", "--model", str(tiny_mlx), "--image", str(image_path), "-o", str(out)]
    result = run_cli(*viz, "--pruner", "divprune", "--keep-ratio", "0.25")
    assert result.returncode == 0, result.stderr
    picture = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32)
    assert picture.shape == (1024, 1024, 3)
    _, model, _, pixels = tiny_pair
    kept = np.array(prune("divprune", model.encode_image(mx.array(pixels))[0], 0.25).sources[0]).reshape(16, 16) >= 0
    brightness = (picture / np.maximum(pixels[0] * 255, 1)).reshape(16, 64, 16, 64, 3)[:, 8:56, :, 8:56]
    dimmed = brightness.mean(axis=(1, 3, 4)) < 0.5
    assert kept.sum() == 64
    assert np.array_equal(dimmed[1:], ~kept[1:])  # dropped tokens dimmed, kept ones clear (row 0 has the title)
    before = out.read_bytes()
    assert_clean_error(run_cli(*viz, "--pruner", "pool", "--keep-ratio", "0.5"), "already exists", "--force")
    assert out.read_bytes() == before
    assert_clean_error(run_cli(*viz, "--pruner", "nope", "--force"), "unknown pruner")
