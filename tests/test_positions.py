"""Position-preserving pruning (`keep_positions`, GAP): kept visual tokens at their unpruned RoPE
positions, the text after them from the unpruned length on.

Against transformers' Qwen2 given the same `position_ids` (tiny random config, fp32): logits within
1e-4 absolute (as tests/test_parity.py), greedy tokens identical. Keep ratio 1 is today's path
bit for bit; a chat follow-up equals a fresh run of the conversation; the CPU backend agrees with
MLX's own ops.
"""

import json
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx_lm.models import qwen2
from mlx_lm.models.cache import make_prompt_cache

import fastvlm_mlx
from fastvlm_mlx.chat import ChatSession
from fastvlm_mlx.cli import main
from fastvlm_mlx.cpu import modules
from fastvlm_mlx.errors import UserError
from fastvlm_mlx.generate import Turn
from fastvlm_mlx.model import SlotPositions, carry_positions
from fastvlm_mlx.prompt import tokenize_prompt
from pruners import prune

PROMPT = "what color is the shape?"
PRUNED = [("divprune", 0.25), ("similarity", 0.25)]  # one selecting, one merging (a merge stands at its anchor)


@pytest.fixture(scope="module")
def tiny(tiny_mlx):
    return fastvlm_mlx.load(tiny_mlx)


def gap_positions(before: int, kept: list[int], tokens: int, after: int) -> list[int]:
    return [*range(before), *(before + i for i in kept), *range(before + tokens, before + tokens + after)]


def pruned_inputs(model, tokenizer, pixels, pruner: str | None, ratio: float):
    """(merged embeddings (1, L, H), GAP positions) of PROMPT with the image pruned by `pruner`."""
    before, after = tokenize_prompt(tokenizer, PROMPT)
    tokens, scores = model.encode_image(mx.array(pixels), with_scores=True)
    kept = prune(pruner, tokens, ratio, scores=scores) if pruner else None
    image = tokens if kept is None else kept.tokens
    indices = list(range(tokens.shape[1])) if kept is None else kept.indices[0].tolist()
    embeds = model.splice(before, model.project(image), after)
    return embeds, gap_positions(len(before), indices, tokens.shape[1], len(after))


def reference_logits(reference, embeds: np.ndarray, positions: list[int]) -> np.ndarray:
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        hidden = reference.model.language_model(
            inputs_embeds=torch.from_numpy(embeds), position_ids=torch.tensor([positions])
        ).last_hidden_state
        return reference.lm_head(hidden)[0].numpy()


def test_slot_positions_run_on_from_the_last_listed():
    slots = SlotPositions([[0, 1, 2, 5, 9, 12, 13]])
    assert slots.at(0, 3) == 0  # consecutive: one offset, mlx-lm's own RoPE call
    assert np.array_equal(np.array(slots.at(1, 4)), [1, 2, 5, 9])
    assert slots.at(5, 4) == 12  # 12, 13, then 14, 15 past the listed slots
    assert slots.at(7, 1) == 14 and slots.at(20, 1) == 27
    assert slots.at(6, 2) == 13 and np.array_equal(np.array(slots.at(4, 3)), [9, 12, 13])
    batch = SlotPositions([[0, 1, 2, 3], [0, 1, 3, 4]])  # a row per sequence, each with its own shift
    assert batch.at(0, 2) == 0 and np.array_equal(np.array(batch.at(1, 3)), [[1, 2, 3], [1, 3, 4]])
    assert np.array_equal(np.array(batch.at(4, 1)), [[4], [5]])


def test_a_batch_carries_a_row_of_positions_per_sequence(tiny_pair):
    """Two pruned sequences in one batch, each at its own positions: each row's logits are its own run's."""
    _, model, tokenizer, pixels = tiny_pair
    inputs = [pruned_inputs(model, tokenizer, pixels, name, ratio) for name, ratio in PRUNED]
    alone = []
    for embeds, positions in inputs:
        cache = make_prompt_cache(model.language_model)
        carry_positions(cache, positions)
        alone.append(np.array(model.logits(embeds, cache=cache)[0]))
    cache = make_prompt_cache(model.language_model)
    carry_positions(cache, [positions for _, positions in inputs])
    both = np.array(model.logits(mx.concatenate([embeds for embeds, _ in inputs]), cache=cache))
    for row, logits in enumerate(alone):
        np.testing.assert_allclose(both[row], logits, atol=1e-5)


def test_only_fastvlm_layers_read_positions():
    args = qwen2.ModelArgs("qwen2", 64, 1, 96, 4, 1e-6, 50, 2)
    assert type(qwen2.Model(args).layers[0].self_attn) is qwen2.Attention  # mlx-lm's class is untouched


@pytest.mark.parametrize(("pruner", "ratio"), [(None, 1.0), *PRUNED])
def test_logits_match_transformers_given_position_ids(tiny_pair, pruner, ratio):
    reference, model, tokenizer, pixels = tiny_pair
    embeds, positions = pruned_inputs(model, tokenizer, pixels, pruner, ratio)
    cache = make_prompt_cache(model.language_model)
    carry_positions(cache, positions)
    mine = np.array(model.logits(embeds, cache=cache)[0])
    ref = reference_logits(reference, np.array(embeds), positions)
    assert float(np.abs(ref).max()) > 0.1
    assert np.abs(mine - ref).max() < 1e-4
    if pruner is not None:  # the positions matter: without them the logits differ from these
        plain = reference_logits(reference, np.array(embeds), list(range(len(positions))))
        assert np.abs(plain - ref).max() > 1e-2


@pytest.mark.parametrize(("pruner", "ratio"), PRUNED)
def test_greedy_tokens_match_transformers_through_the_answer(tiny_pair, image_path, pruner, ratio):
    torch = pytest.importorskip("torch")
    reference, model, tokenizer, pixels = tiny_pair
    out = fastvlm_mlx.generate(
        model, tokenizer, image_path, PROMPT, pruner=pruner, keep_ratio=ratio, keep_positions=True, max_tokens=16
    )
    embeds, positions = pruned_inputs(model, tokenizer, pixels, pruner, ratio)
    inputs, ids = torch.from_numpy(np.array(embeds)), []
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # no cache: every step a full forward, the answer at positions after the prompt's
        while len(ids) < 16 and eos not in ids:
            hidden = reference.model.language_model(inputs_embeds=inputs, position_ids=torch.tensor([positions]))
            ids.append(int(reference.lm_head(hidden.last_hidden_state[:, -1]).argmax()))
            inputs = torch.cat([inputs, reference.get_input_embeddings()(torch.tensor([ids[-1:]]))], dim=1)
            positions = [*positions, positions[-1] + 1]
    ids = ids[: ids.index(eos)] if eos in ids else ids
    assert len(ids) >= 8, "the reference stopped too early for a meaningful comparison"
    assert out.token_ids == ids


@pytest.mark.parametrize("pruner", ["divprune", "pool", "visionzip"])
def test_keep_ratio_one_is_todays_path_bit_for_bit(tiny, image_path, pruner):
    model, tokenizer = tiny
    runs = [
        fastvlm_mlx.generate(
            model,
            tokenizer,
            image_path,
            PROMPT,
            pruner=pruner,
            keep_ratio=1.0,
            max_tokens=8,
            logprobs=True,
            keep_positions=keep,
        )  # fmt: skip
        for keep in (False, True)
    ]
    assert runs[0].token_ids == runs[1].token_ids
    assert np.array_equal(runs[0].first_logprobs, runs[1].first_logprobs)


def fresh_answer(model, tokenizer, prompt, image_span="same"):
    """The answer to the same prompt ids without any KV cache (with another image span if given)."""
    if image_span != "same":
        prompt = replace(prompt, image_span=image_span)
    turn = Turn(model, tokenizer, prompt, max_tokens=8, logprobs=True)
    for _ in turn:
        pass
    return turn.result()


def test_chat_follow_up_equals_a_fresh_run_of_the_conversation(tiny, image_path):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer, image_path, pruner="divprune", keep_ratio=0.25, keep_positions=True)
    session.ask("what color is the shape?", max_tokens=8)
    prompt, _ = session.prompt_for("is there a blue circle?")
    fresh, plain = fresh_answer(model, tokenizer, prompt), fresh_answer(model, tokenizer, prompt, None)
    follow_up = session.ask("is there a blue circle?", max_tokens=8, logprobs=True)
    assert follow_up.token_ids == fresh.token_ids
    np.testing.assert_allclose(follow_up.first_logprobs, fresh.first_logprobs, atol=1e-4)
    assert np.abs(plain.first_logprobs - fresh.first_logprobs).max() > 1e-3  # the follow-up kept its positions


def test_cpu_backend_honours_the_positions(tiny_mlx, image_path):
    if mx.default_device() != mx.cpu:
        pytest.skip("the CPU backend runs on the CPU only")
    model, tokenizer = fastvlm_mlx.load(tiny_mlx)
    options = dict(pruner="similarity", keep_ratio=0.25, keep_positions=True, max_tokens=8, logprobs=True)
    results = []
    for swapped in (True, False):
        (modules.swap_modules if swapped else modules.unswap_modules)(model)
        assert any(isinstance(m, modules.Qwen2Attention) for _, m in model.named_modules()) == swapped
        results.append(fastvlm_mlx.generate(model, tokenizer, image_path, PROMPT, **options))
    assert results[0].token_ids == results[1].token_ids
    np.testing.assert_allclose(results[0].first_logprobs, results[1].first_logprobs, atol=1e-4)


def test_convert_bakes_the_default_and_the_cli_overrides_it(tiny_hf, tiny, image_path, tmp_path):
    from convert.convert import convert

    folder = convert(tiny_hf[0], tmp_path / "kept", pruner="divprune", keep_ratio=0.25, keep_positions=True)
    assert json.loads((folder / "config.json").read_text())["keep_positions"] is True
    model, tokenizer = tiny
    expected = {
        keep: fastvlm_mlx.generate(
            model, tokenizer, image_path, PROMPT, pruner="divprune", keep_ratio=0.25, keep_positions=keep, max_tokens=8
        ).token_ids  # fmt: skip
        for keep in (True, False)
    }
    base = ["generate", "--model", str(folder), "--image", str(image_path), "--prompt", PROMPT, "--max-tokens", "8"]
    for flags, keep in (([], True), (["--no-keep-positions"], False), (["--keep-positions"], True)):
        result = CliRunner().invoke(main, [*base, *flags, "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["token_ids"] == expected[keep]


def test_keep_positions_must_be_a_bool(tiny, image_path):
    with pytest.raises(UserError, match="keep_positions"):
        fastvlm_mlx.generate(*tiny, image_path, PROMPT, pruner="divprune", keep_ratio=0.5, keep_positions="yes")


def test_the_torch_reference_keeps_the_same_positions(tiny_pair, tiny, image_path):
    pytest.importorskip("torch")
    from bench.torch_pipeline import torch_generate

    reference, model, tokenizer, _ = tiny_pair
    eos = {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    for pruner, ratio in PRUNED:
        options = dict(pruner=pruner, keep_ratio=ratio, keep_positions=True, max_tokens=12)
        ref = torch_generate(reference, tokenizer, image_path, PROMPT, image_size=model.config.image_size,
                             mode=model.config.preprocess_mode, eos=eos, **options)  # fmt: skip
        assert fastvlm_mlx.generate(*tiny, image_path, PROMPT, **options).token_ids == ref.token_ids
