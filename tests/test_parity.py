"""MLX vs transformers' FastVlmForConditionalGeneration on a tiny random config, fp32.

Tolerances (fp32, different kernels/summation order): vision features and projected
features 1e-4 relative to their max magnitude, last-position logits 1e-4 absolute at
logit scale ~1; greedy tokens identical.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from fastvlm_mlx.cli import main
from fastvlm_mlx.prompt import tokenize_prompt

torch = pytest.importorskip("torch")
PROMPT = "what color is the shape?"


def _relative_error(mine, ref) -> float:
    return float(np.abs(np.asarray(mine) - ref).max() / np.abs(ref).max())


def test_vision_and_projector_features_match(tiny_pair):
    reference, model, _, pixels = tiny_pair
    with torch.no_grad():
        px = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        ref_vision = reference.model.vision_tower(px).last_hidden_state.flatten(2).transpose(1, 2)
        ref_proj = reference.model.multi_modal_projector(ref_vision)
    vision, _ = model.encode_image(mx.array(pixels))
    assert vision.shape == ref_vision.shape == (1, 256, 256)
    assert _relative_error(vision, ref_vision.numpy()) < 1e-4
    assert _relative_error(model.project(vision), ref_proj.numpy()) < 1e-4


def test_last_position_logits_match(tiny_pair):
    reference, model, tokenizer, pixels = tiny_pair
    before, after = tokenize_prompt(tokenizer, PROMPT)
    vision, _ = model.encode_image(mx.array(pixels))
    logits = model.logits(model.splice(before, model.project(vision), after))[0, -1]
    image_id = reference.config.image_token_id
    ids = torch.tensor([before + [image_id] * vision.shape[1] + after])
    with torch.no_grad():
        ref = reference(input_ids=ids, pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).logits[0, -1]
    assert logits.shape == ref.shape
    assert float(ref.abs().max()) > 0.1  # logits are not degenerate
    assert np.abs(np.asarray(logits) - ref.numpy()).max() < 1e-4


def test_greedy_tokens_match_through_cli(tiny_pair, tiny_mlx, image_path):
    reference, model, tokenizer, pixels = tiny_pair
    result = CliRunner().invoke(
        main,
        [
            "generate",
            "--model",
            str(tiny_mlx),
            "--image",
            str(image_path),
            "--prompt",
            PROMPT,
            "--max-tokens",
            "16",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    before, after = tokenize_prompt(tokenizer, PROMPT)
    ids = torch.tensor([before + [reference.config.image_token_id] * 256 + after])
    with torch.no_grad():
        ref = reference.generate(
            input_ids=ids, pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), max_new_tokens=16, do_sample=False
        )[0, ids.shape[1] :].tolist()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ref = ref[: ref.index(eos)] if eos in ref else ref
    assert len(ref) >= 8, "the reference stopped too early for a meaningful comparison"
    assert out["token_ids"] == ref
    assert out["text"] == tokenizer.decode(ref)
    assert out["visual_tokens"] == {"before": 256, "after": 256}
    timings = out["timings"]
    assert set(timings) == {"preprocess_s", "vision_s", "prune_s", "prefill_s", "ttft_s", "decode_tokens_per_s"}
    stages = timings["preprocess_s"] + timings["vision_s"] + timings["prune_s"] + timings["prefill_s"]
    assert timings["ttft_s"] == pytest.approx(stages, rel=1e-6)
