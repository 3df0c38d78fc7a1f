"""The PyTorch reference pipeline with the same stages and timers as `fastvlm_mlx.generate`.

Same preprocessing function, prompt and token counts as the MLX side; TTFT is image file in ->
first token out. Decoding reuses the KV cache, one token per step (greedy).
"""

import time
from pathlib import Path

import torch

from bench.torch_pruners import torch_prune, torch_relevance
from convert.torch_model import attention_received, last_attention
from fastvlm_mlx.generate import GenerationResult, Timings
from fastvlm_mlx.preprocess import load_image, preprocess
from fastvlm_mlx.prompt import instruction_ids, tokenize_prompt
from pruners import needs_prompt, needs_scores


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


def encode_image(model, pixels: torch.Tensor, with_scores: bool):
    """Vision tokens (B, N, D) and, when asked, attention received in the last attention block."""
    scores = []
    if with_scores:
        hook = last_attention(model).register_forward_pre_hook(
            lambda module, args: scores.append(attention_received(module, args[0]))
        )
    try:
        vision = model.model.vision_tower(pixels).last_hidden_state.flatten(2).transpose(1, 2)
    finally:
        if with_scores:
            hook.remove()
    return vision, scores[0] if scores else None


@torch.inference_mode()
def torch_generate(
    model,
    tokenizer,
    image: str | Path,
    prompt: str,
    *,
    image_size: int,
    mode: str,
    max_tokens: int,
    eos: set[int],
    pruner: str | None = None,
    keep_ratio: float = 1.0,
    seed: int = 0,
    keep_positions: bool = False,
) -> GenerationResult:
    """Greedy generation with transformers' FastVlmForConditionalGeneration, timed per stage; with
    `keep_positions`, explicit `position_ids` give the kept visual tokens their unpruned positions."""
    device, dtype = model.device, model.dtype
    scored = needs_scores(pruner, keep_ratio)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    pixels = torch.from_numpy(preprocess(load_image(image), image_size, mode)).permute(0, 3, 1, 2)
    pixels = pixels.to(device=device, dtype=dtype)
    ids_before, ids_after = tokenize_prompt(tokenizer, prompt)
    t_pre = _sync(device)

    vision, scores = encode_image(model, pixels, scored)  # (1, N, D), (1, N) or None
    t_vision = _sync(device)
    if needs_prompt(pruner, keep_ratio):  # instruction-aware: relevance to the question's text, as the MLX side
        question = model.get_input_embeddings()(torch.tensor(instruction_ids(tokenizer, prompt), device=device))
        scores = torch_relevance(model.model.multi_modal_projector(vision), question)
    kept, indices = (vision, None) if pruner is None else torch_prune(pruner, vision, keep_ratio, scores, seed=seed)[:2]
    t_prune = _sync(device)
    positions = None
    if keep_positions and indices is not None:
        first, end = len(ids_before), len(ids_before) + vision.shape[1]  # the image's span, unpruned
        image = first + indices[0].to("cpu")
        positions = torch.cat([torch.arange(first), image, torch.arange(end, end + len(ids_after))])[None].to(device)

    embed = model.get_input_embeddings()
    ids = [torch.tensor([x], device=device) for x in (ids_before, ids_after)]
    embeds = torch.cat([embed(ids[0]), model.model.multi_modal_projector(kept), embed(ids[1])], dim=1)
    out = model.model.language_model(inputs_embeds=embeds, position_ids=positions, use_cache=True)
    logits = model.lm_head(out.last_hidden_state[:, -1])
    token = logits.argmax(-1)
    cache = out.cache
    token_ids = [int(token)]
    t_first = _sync(device)
    first_logprobs = logits[0].float().log_softmax(-1).cpu().numpy()
    while len(token_ids) < max_tokens and token_ids[-1] not in eos:
        step = None if positions is None else positions[:, -1:] + len(token_ids)  # on from the unpruned length
        out = model.model.language_model(
            inputs_embeds=embed(token[:, None]), cache=cache, position_ids=step, use_cache=True
        )
        cache = out.cache
        token = model.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
        token_ids.append(int(token))
    t_last = _sync(device)
    generated = len(token_ids)
    finish_reason = "stop" if token_ids[-1] in eos else "length"
    token_ids = [t for t in token_ids if t not in eos]
    timings = Timings.from_marks(start, t_pre, t_vision, t_prune, t_first, t_last, generated)
    return GenerationResult(
        text=tokenizer.decode(token_ids),
        token_ids=token_ids,
        prompt_tokens=len(ids_before) + kept.shape[1] + len(ids_after),
        visual_tokens_before=vision.shape[1],
        visual_tokens_after=kept.shape[1],
        timings=timings,
        peak_memory_gb=peak_memory_gb(device),
        finish_reason=finish_reason,
        first_logprobs=first_logprobs,
    )


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak allocated memory on CUDA, current driver allocation on MPS; None on CPU (not measured)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 1e9
    return None
