"""Our MLX FastVLM-0.5B against mlx-vlm 0.7.10's port, both on the MLX CPU, in one process.

Times the FastViTHD vision tower (one NHWC float32 image) and the Qwen2-0.5B prefill (286 input
embeddings into an empty KV cache; cache and last-position logits evaluated, as generation does).
Both sides run the same random float32 weights: `random_tower`'s, copied into mlx-vlm's modules
by an explicit key map, so the JSON also says how far the outputs differ. Rounds alternate which
side goes first. `fastvlm_mlx` is imported before mlx, so both get its BLAS (OpenBLAS with
AVX-512 kernels), and, unless --untuned, the -march=native kernel builds with unit-stride loops
and the larger buffer cache. Our tower's C depthwise kernel and CPU math are ours alone.

mlx-vlm's pins clash with our dev venv, so it gets its own (the fastvlm modules need only
mlx-lm, requests and what they pull in):

    python3.11 -m venv /work/vlmvenv
    /work/vlmvenv/bin/pip install mlx==0.32.4 mlx-cpu==0.32.4 mkl scipy-openblas32
    /work/vlmvenv/bin/pip install --no-deps mlx_vlm-0.7.10-py3-none-any.whl  # pip download mlx-vlm==0.7.10 --no-deps
    /work/vlmvenv/bin/pip install mlx-lm==0.32.2 requests numpy pillow click safetensors
    /work/vlmvenv/bin/pip install --no-deps -e /work/main

    cd /work/main && /work/vlmvenv/bin/python -m bench.versus_mlx_vlm --runs 3 --warmup 1 --size 1024 \
        --out bench-results/versus-mlx-vlm.json
"""

import fastvlm_mlx  # noqa: F401, I001  first: preloads the BLAS before anything imports mlx

import json
import re
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import click
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2
from mlx_lm.models.cache import make_prompt_cache
from mlx_vlm.models.cache import KVCache
from mlx_vlm.models.fastvlm.config import TextConfig
from mlx_vlm.models.fastvlm.config import VisionConfig as VlmVisionConfig
from mlx_vlm.models.fastvlm.language import LanguageModel
from mlx_vlm.models.fastvlm.vision import VisionModel

from bench.profile_vision import random_tower
from bench.sweep import environment
from fastvlm_mlx.cpu import jit, modules
from fastvlm_mlx.config import VisionConfig

QWEN2_05B = dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, intermediate_size=4864, vocab_size=151936)
QWEN2_05B |= dict(num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True)
# Our key -> mlx-vlm key, applied in order once `stages.i.<part>.` became `network.n.`.
RENAMES = (
    (r"^stem\.", "patch_embed.blocks."),
    (r"^final_conv\.se\.fc1\.", "conv_exp.se.reduce."),
    (r"^final_conv\.se\.fc2\.", "conv_exp.se.expand."),
    (r"^final_conv\.", "conv_exp."),
    (r"\.proj\.0\.reparam_conv\.", ".proj.0.lkb_reparam."),
    (r"\.mlp\.conv\.bias$", ".convffn.conv.bn.bias"),  # our conv has BatchNorm folded in
    (r"\.mlp\.conv\.", ".convffn.conv.conv."),
    (r"\.mlp\.", ".convffn."),
)


def vlm_key(key: str, config: VisionConfig) -> str:
    """mlx-vlm keeps one flat `network` list: downsample, pos_emb, blocks of each stage in turn."""
    slots = []
    for i, (down, pos) in enumerate(zip(config.downsamples, config.pos_embs, strict=True)):
        slots += [f"stages.{i}.downsample."] * down + [f"stages.{i}.pos_emb."] * pos + [f"stages.{i}.blocks."]
    prefix = re.match(r"stages\.\d+\.\w+\.", key)
    if prefix:
        key = f"network.{slots.index(prefix.group(0))}." + key[prefix.end() :]
    for pattern, new in RENAMES:
        key = re.sub(pattern, new, key)
    return "vision_model." + key


def vlm_tower(tower) -> VisionModel:
    """mlx-vlm's FastViTHD (FastVLM-0.5B config) holding our tower's weights."""
    vlm = VisionModel(VlmVisionConfig())
    target = dict(tree_flatten(vlm.parameters()))
    filled = {}
    for key, value in tree_flatten(tower.parameters()):
        name = vlm_key(key, VisionConfig())
        assert name in target and name not in filled, (key, name)
        filled[name] = value.reshape(target[name].shape)  # 1x1 convs: Linear (o, i) -> (o, 1, 1, i)
    left = set(target) - set(filled)
    assert all(re.search(r"\.bn\.(weight|running_mean|running_var)$|layer_scale|head\.proj", k) for k in left), left
    for k in left:  # BatchNorm eps is 1e-5: with this variance it passes the folded conv through unchanged
        filled[k] = mx.full(target[k].shape, 1 - 1e-5) if k.endswith("running_var") else target[k]
    vlm.load_weights(list(filled.items()))  # strict: every parameter, every shape
    return vlm.eval()  # BatchNorm uses its running statistics


def prefill(backbone, cache: list, embeds: mx.array) -> mx.array:
    """Fill the cache from embeds (1, L, H); return the last position's logits (1, 1, V)."""
    hidden = backbone(None, cache=cache, input_embeddings=embeds)
    logits = backbone.embed_tokens.as_linear(hidden[:, -1:])
    mx.eval(logits, [c.state for c in cache])
    return logits


def timed(fn, *args) -> tuple[float, mx.array]:
    start = time.perf_counter()
    out = fn(*args)
    mx.eval(out)
    return time.perf_counter() - start, out


def summary(times: list[float]) -> dict:
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "all": times}


@click.command()
@click.option("--runs", default=3, show_default=True)
@click.option("--warmup", default=1, show_default=True)
@click.option("--size", default=1024, show_default=True, help="Image side in pixels.")
@click.option("--tokens", default=286, show_default=True, help="Prefill length.")
@click.option("--out", default="bench-results/versus-mlx-vlm.json", show_default=True)
@click.option(
    "--untuned",
    is_flag=True,
    help="MLX's own kernel flags and buffer cache for both sides (our modules still use the CPU backend).",
)
def main(runs: int, warmup: int, size: int, tokens: int, out: str, untuned: bool) -> None:
    mx.set_default_device(mx.cpu)
    jit.private_kernel_folder(native=not untuned)  # process-wide: mlx-vlm gets the same kernel flags
    if not untuned:
        jit.keep_freed_buffers()  # and the same buffer cache
    tower = random_tower(0)  # on the CPU backend, as load_model switches a model
    their_tower = vlm_tower(tower)
    ours_lm = qwen2.Model(qwen2.ModelArgs.from_dict(QWEN2_05B))
    modules.swap_modules(ours_lm)  # ours, as load_model switches it; mlx-vlm's model has its own attention
    their_lm = LanguageModel(TextConfig.from_dict(QWEN2_05B))
    their_lm.load_weights(tree_flatten(ours_lm.parameters()))
    mx.eval(ours_lm.parameters(), their_lm.parameters())
    pixels = mx.random.uniform(shape=(1, size, size, 3))
    embeds = 0.05 * mx.random.normal((1, tokens, QWEN2_05B["hidden_size"]))
    impls = {  # name: (vision forward, LLM backbone, fresh KV cache)
        "ours": (lambda: tower(pixels)[0], ours_lm.model, lambda: make_prompt_cache(ours_lm)),
        "mlx_vlm": (lambda: their_tower(pixels)[1], their_lm.model, lambda: [KVCache() for _ in their_lm.layers]),
    }

    times = {name: {"vision": [], "prefill": []} for name in impls}
    outputs = {}
    for r in range(warmup + runs):
        for name in list(impls)[:: 1 if r % 2 == 0 else -1]:
            encode, backbone, make_cache = impls[name]
            t_vision, features = timed(encode)
            t_prefill, logits = timed(prefill, backbone, make_cache(), embeds)
            outputs[name] = (features.reshape(-1), logits)
            if r >= warmup:
                times[name]["vision"].append(t_vision)
                times[name]["prefill"].append(t_prefill)
            label = "warmup" if r < warmup else "run"
            click.echo(f"{label} {r + 1}/{warmup + runs} {name}: vision {t_vision:.2f} s, prefill {t_prefill:.2f} s")

    seconds = {name: {stage: summary(t) for stage, t in stages.items()} for name, stages in times.items()}
    ratio = {s: seconds["mlx_vlm"][s]["median"] / seconds["ours"][s]["median"] for s in ("vision", "prefill")}
    diff = [mx.abs(a - b).max().item() for a, b in zip(outputs["ours"], outputs["mlx_vlm"], strict=True)]
    agreement = {"vision_max_abs_diff": diff[0], "vision_max_abs": mx.abs(outputs["ours"][0]).max().item()}
    agreement["prefill_logits_max_abs_diff"] = diff[1]
    result = {"size": size, "prefill_tokens": tokens, "runs": runs, "warmup": warmup, "seconds": seconds}
    result |= {"ratio_mlx_vlm_over_ours": ratio, "agreement": agreement, "environment": environment(None)}
    result["versions"] = {p: version(p) for p in ("mlx-vlm", "mlx-lm")}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))

    click.echo(f"{'':8} {'vision s':>9} {'prefill s':>10}   (median of {runs}, {size}px, {tokens} tokens)")
    for name, stages in seconds.items():
        click.echo(f"{name:8} {stages['vision']['median']:9.3f} {stages['prefill']['median']:10.3f}")
    click.echo(f"{'ratio':8} {ratio['vision']:9.2f} {ratio['prefill']:10.2f}   (mlx-vlm / ours)")
    click.echo(f"max |diff|: vision {diff[0]:.2e}, logits {diff[1]:.2e}; wrote {out}")


if __name__ == "__main__":
    main()
