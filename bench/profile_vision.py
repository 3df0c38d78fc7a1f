"""Per-stage wall time of the MLX FastViTHD tower on random weights.

    python -m bench.profile_vision --size 1024 --runs 3 [--json out.json]

Each stage is evaluated on its own (mx.eval between stages), so the numbers add up to a
slightly slower forward than one lazy graph; the last line times the whole forward.
"""

import json
import math
import statistics
import time

import click
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from fastvlm_mlx.config import VisionConfig
from fastvlm_mlx.cpu import use_cpu_backend
from fastvlm_mlx.vision import FastViT


def random_tower(seed: int = 0) -> FastViT:
    """Fan-in scaled init; token mixers near identity and residual branches damped, so
    activations stay O(1) through all 44 blocks (timing of GELU/erf depends on the range)."""
    mx.random.seed(seed)
    tower = FastViT(VisionConfig())

    def init(path: str, p: mx.array) -> mx.array:
        if p.ndim == 1:
            return 0.1 * mx.random.normal(p.shape) + (0.0 if path.endswith("bias") else 1.0)
        w = mx.random.normal(p.shape) / math.sqrt(math.prod(p.shape[1:]))
        if "token_mixer.reparam" in path or "pos_emb" in path:  # identity folded in
            k = p.shape[1]
            return 0.1 * w + mx.zeros(p.shape).at[:, k // 2, k // 2, :].add(1.0)
        return w * (0.2 if "fc2" in path or path.endswith("token_mixer.proj.weight") else 1.5)

    tower.update(tree_map_with_path(init, tower.parameters()))
    mx.eval(tower.parameters())
    use_cpu_backend(tower)  # as load_model does
    return tower


def _timed(fn, x, runs: int) -> tuple[float, mx.array]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn(x)
        mx.eval(out)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def stage_times(tower: FastViT, pixels: mx.array, runs: int) -> dict[str, float]:
    times, x = {}, pixels
    stem = nn.Sequential(*tower.stem)
    times["stem"], x = _timed(stem, x, runs)
    for i, stage in enumerate(tower.stages):
        times[f"stage{i}"], x = _timed(lambda y, s=stage: s(y)[0], x, runs)
    times["final_conv"], x = _timed(tower.final_conv, x, runs)
    times["sum"] = sum(times.values())
    times["forward"], tokens = _timed(lambda y: tower(y)[0], pixels, runs)
    times["token_std"] = float(tokens.std())
    return times


@click.command()
@click.option("--size", default=1024, show_default=True)
@click.option("--runs", default=3, show_default=True)
@click.option("--json", "json_path", default=None, help="Also write the times here.")
def main(size: int, runs: int, json_path: str | None) -> None:
    tower = random_tower()
    pixels = mx.random.uniform(shape=(1, size, size, 3))
    times = stage_times(tower, pixels, runs)
    for name, seconds in times.items():
        click.echo(f"{name:>11} {seconds:8.3f}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"size": size, "runs": runs, "seconds": times}, f, indent=2)


if __name__ == "__main__":
    main()
