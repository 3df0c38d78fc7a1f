"""`fastvlm-mlx bench`: MLX and the PyTorch reference, side by side, interleaved, speed and quality.

Every configuration (image size x pruner x keep ratio) runs on both frameworks with the same
pixels, prompt, visual-token count and dtype. Rounds visit every configuration, and within a
round MLX and PyTorch alternate which goes first, so machine drift hits both. TTFT is always
image file in -> first token out; decode speed is per token, never a whole-generation time.
"""

import json
import os
import platform
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import mlx.core as mx
import numpy as np

from bench.quality import answer_correct, compare_runs
from fastvlm_mlx import __version__, cpu
from fastvlm_mlx.config import check_image_size
from fastvlm_mlx.cpu import jit
from fastvlm_mlx.cpu.private import cpu_info
from fastvlm_mlx.errors import UserError, check_writable, naming
from fastvlm_mlx.generate import generate
from fastvlm_mlx.load import DEFAULT_MODEL, SHIPPED_MODELS, embedded_model, load_model, read_json
from pruners import check

FRAMEWORKS = ("mlx", "torch")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
STAGES = ("preprocess_s", "vision_s", "prune_s", "prefill_s", "ttft_s", "decode_tokens_per_s")
MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
DEFAULT_PROMPT = "Describe the image."


@dataclass(frozen=True)
class Setting:
    pruner: str | None
    keep_ratio: float
    image_size: int
    keep_positions: bool = False  # the kept visual tokens keep their unpruned RoPE positions

    @property
    def label(self) -> str:
        method = f"{self.pruner} {self.keep_ratio:g}" if self.pruner else "baseline"
        return f"{method}{'+pos' if self.keep_positions else ''} @{self.image_size}"  # +pos: kept positions


@dataclass(frozen=True)
class Item:
    image: str
    prompt: str
    answer: str | None = None


def make_settings(
    pruners: list[str],
    keep_ratios: list[float],
    image_sizes: list[int],
    default_size: int,
    stride: int,
    keep_positions: bool = False,
) -> list[Setting]:
    """Unpruned runs at every image size; every pruner at every keep ratio below 1 at the model's size
    (with `keep_positions`, its kept tokens at their unpruned RoPE positions)."""
    for name in pruners:
        for ratio in keep_ratios:
            check(name, ratio)
    for size in image_sizes:
        check_image_size(size, stride)
    sizes = list(dict.fromkeys([default_size, *image_sizes]))
    settings = [Setting(None, 1.0, size) for size in sizes]
    ratios = [r for r in dict.fromkeys(keep_ratios) if r < 1]
    pruned = [Setting(name, r, default_size, keep_positions) for name in dict.fromkeys(pruners) for r in ratios]
    return settings + pruned


def load_items(images: list[str], prompts: list[str], dataset: str | None, workdir: Path | None = None) -> list[Item]:
    """Images (files or folders) x prompts, or questions with answers from a dataset (the mosaic
    test set is written into `workdir`)."""
    if dataset:
        return dataset_items(dataset, workdir)
    files = []
    for entry in map(Path, images):
        if entry.is_dir():
            files += sorted(p for p in entry.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif entry.is_file():
            files.append(entry)
        else:
            raise UserError(f"image not found: {entry} (give image files or folders)")
    if not files:
        raise UserError("no images to benchmark; pass --image FILE_OR_FOLDER, --dataset or --synthetic")
    return [Item(str(f), p) for f in files for p in prompts]


def dataset_items(spec: str, workdir: Path | None = None) -> list[Item]:
    """`easy-vqa[:N]` or `mosaic[:N]` (first N test questions; the mosaics are written to
    workdir/mosaic-test) or a JSON list of {image, question, answer}, optionally `:N`."""
    name, limit = spec, None
    if not Path(spec).is_file() and ":" in spec:
        name, count = spec.rsplit(":", 1)
        if not (count.isascii() and count.isdigit() and int(count) > 0):
            raise UserError(f"--dataset {spec}: N in {name}:N must be a whole number above 0, e.g. {name}:100")
        limit = int(count)
    if name == "easy-vqa":
        try:
            import easy_vqa
        except ImportError:
            raise UserError("--dataset easy-vqa needs the easy-vqa package: pip install easy-vqa") from None
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
        items = [Item(paths[i], q, a) for q, a, i in zip(questions, answers, image_ids, strict=True)]
    elif name == "mosaic" and not Path(name).is_file():
        from bench.mosaic import write_test_set

        folder = Path(workdir or ".") / "mosaic-test"
        with naming(folder):
            items = json_items(write_test_set(folder, questions=limit))
    elif Path(name).is_file():
        items = json_items(Path(name))
    else:
        raise UserError(
            f"unknown dataset {spec!r}; use easy-vqa[:N], mosaic[:N] or a JSON list of image/question/answer"
        )
    return items[:limit]


def json_items(path: Path) -> list[Item]:
    """The rows of a JSON dataset file; image paths are relative to the file's folder."""
    rows = read_json(path)
    shape = 'a JSON list of {"image": PATH, "question": TEXT, "answer": TEXT}'
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{path} is not a dataset: expected {shape}")
    for n, row in enumerate(rows):
        fields = {"image": str, "question": str, "answer": str | int | float}
        if not isinstance(row, dict) or not all(isinstance(row.get(k), kind) for k, kind in fields.items()):
            raise UserError(f"{path}: row {n} is {json.dumps(row)[:60]}; expected {shape}")
    items = [Item(str(path.parent / r["image"]), r["question"], str(r["answer"])) for r in rows]
    missing = next((item.image for item in items if not Path(item.image).is_file()), None)
    if missing:
        raise UserError(f"{path}: image not found: {missing} (image paths are relative to the dataset file)")
    return items


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    return cpu_info("model name") or platform.processor() or platform.machine()


def environment(torch_device) -> dict:
    env = {
        "fastvlm_mlx": __version__,
        "mlx": mx.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "mlx_device": str(mx.default_device()),
        "cpu_backend": cpu.enabled(),
        "blas": cpu.blas_in_use(),
        "jit_march_native": jit.native_jit(),
        "mlx_cache_limit_bytes": jit.CACHE_LIMIT,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "processor": cpu_model(),
    }
    if torch_device is not None:
        import torch
        import transformers

        env.update(torch=torch.__version__, transformers=transformers.__version__)
        env.update(torch_device=str(torch_device), torch_threads=torch.get_num_threads())
    return env


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(settings: list[Setting], runs: list[dict], quality: dict, frameworks: list[str]) -> list[dict]:
    """One row per (framework, setting): stage statistics, memory, quality means, MLX/torch ratio."""
    rows = []
    for s_index, setting in enumerate(settings):
        for fw in frameworks:
            mine = [r for r in runs if r["framework"] == fw and r["setting"] == s_index]
            row = {"framework": fw, **asdict(setting), "label": setting.label}
            row["visual_tokens"] = mine[0]["visual_tokens_after"]
            row.update({stage: stats([r["timings"][stage] for r in mine]) for stage in STAGES})
            memory = [r["peak_memory_gb"] for r in mine if r["peak_memory_gb"] is not None]
            row["peak_memory_gb"] = max(memory) if memory else None
            scores = quality.get((fw, s_index), [])
            for metric in ("exact_match", "token_agreement", "top1_agreement", "kl_first_token"):
                row[metric] = statistics.fmean(q[metric] for q in scores) if scores else None
            graded = [r["correct"] for r in mine if r["correct"] is not None]
            row["accuracy"] = statistics.fmean(graded) if graded else None
            rows.append(row)
        if set(frameworks) == set(FRAMEWORKS):
            pairs = _pairs(runs, s_index)
            ratios = {  # every stage, pair by pair (decode: a tokens/s ratio)
                f"{stage.removesuffix('_tokens_per_s').removesuffix('_s')}_ratio_mlx_over_torch": stats(
                    [m["timings"][stage] / t["timings"][stage] for m, t in pairs]
                )
                for stage in STAGES
                if all(t["timings"][stage] > 0 for _, t in pairs)
            }
            for row in rows[-len(frameworks) :]:
                row.update(ratios)
    return rows


def _pairs(runs: list[dict], s_index: int) -> list[tuple[dict, dict]]:
    """(MLX run, torch run) of the same setting, item and round."""
    by_key = {(r["framework"], r["item"], r["round"]): r for r in runs if r["setting"] == s_index}
    return [(r, by_key[("torch", i, n)]) for (fw, i, n), r in by_key.items() if fw == "mlx"]


def quality_scores(records: list[dict], first_logprobs: dict) -> dict:
    """{(framework, setting): [per-item metrics]} against setting 0 (unpruned at the model's size)."""
    first_round = min(r["round"] for r in records)
    runs = {(r["framework"], r["setting"], r["item"]): r for r in records if r["round"] == first_round}
    scores = {}
    for (fw, s_index, i_index), run in runs.items():
        base = runs[(fw, 0, i_index)]
        pair = [dict(r, first_logprobs=first_logprobs[(fw, s, i_index)]) for r, s in ((run, s_index), (base, 0))]
        scores.setdefault((fw, s_index), []).append(compare_runs(*pair))
    return scores


def run_bench(
    *,
    model_dir: str | None,
    reference: str | None,
    synthetic: str | None,
    images: list[str],
    prompts: list[str],
    dataset: str | None,
    pruners: list[str],
    keep_ratios: list[float],
    image_sizes: list[int],
    runs: int,
    warmup: int,
    max_tokens: int,
    frameworks: list[str],
    torch_device: str,
    dtype: str,
    workdir: Path,
    keep_positions: bool | None = None,
) -> dict:
    """Run the sweep and return the results (every run, summary rows, environment)."""
    check_writable(workdir, "--out folder")
    with naming(workdir):
        workdir.mkdir(parents=True, exist_ok=True)
    unknown = set(frameworks) - set(FRAMEWORKS)
    if unknown or not frameworks:
        raise UserError(f"unknown framework(s) {sorted(unknown)}; choose from mlx, torch")
    if synthetic:
        from bench.reference import SYNTHETIC_PROMPT, noise_image, synthetic_checkpoint

        reference, model_dir = map(str, synthetic_checkpoint(synthetic, workdir))
        images = images or [str(noise_image(workdir / "bench-image.png"))]
        prompts = prompts or [SYNTHETIC_PROMPT]
    if model_dir is None or (model_dir in SHIPPED_MODELS and not Path(model_dir).is_dir()):
        # a shipped model (easy-VQA by default), its transformers checkpoint as the reference
        name = model_dir or DEFAULT_MODEL
        model_dir, reference = str(embedded_model("mlx", name)), reference or str(embedded_model("hf", name))
    if "torch" in frameworks and reference is None:
        raise UserError("--frameworks torch needs --reference SRC (the checkpoint the MLX model came from)")
    items = load_items(images, prompts or [DEFAULT_PROMPT], dataset, workdir)
    model, tokenizer = load_model(model_dir)
    model.set_dtype(MX_DTYPES[dtype])
    keep_positions = model.config.keep_positions if keep_positions is None else keep_positions
    size, stride = model.config.image_size, model.config.vision.stride
    settings = make_settings(pruners, keep_ratios, image_sizes, size, stride, keep_positions)

    device, ref_model = None, None
    if "torch" in frameworks:
        from bench.reference import pick_device
        from convert.torch_model import load_reference

        device = pick_device(torch_device)
        ref_model = load_reference(reference, device, dtype, vocab_size=model.config.text["vocab_size"])
    eos = set(model.config.eos_token_ids)

    def run_once(fw: str, setting: Setting, item: Item):
        options = dict(max_tokens=max_tokens, pruner=setting.pruner, keep_ratio=setting.keep_ratio)
        options.update(keep_positions=setting.keep_positions)
        if fw == "mlx":  # "none": unpruned even when the model was converted with a default pruner
            mlx_options = dict(options, pruner=setting.pruner or "none")
            size = setting.image_size
            return generate(model, tokenizer, item.image, item.prompt, image_size=size, logprobs=True, **mlx_options)
        from bench.torch_pipeline import torch_generate

        # MLX gives its freed buffers back first, so PyTorch runs as it would in a process of its
        # own (held, the GBs slowed its vision tower from 1.7 to 2-3 s on a 24 GB CPU box); MLX's
        # next run then starts with an empty buffer cache, as a fresh process does.
        mx.clear_cache()
        size, mode = setting.image_size, model.config.preprocess_mode
        return torch_generate(
            ref_model, tokenizer, item.image, item.prompt, image_size=size, mode=mode, eos=eos, **options
        )

    records, first_logprobs = [], {}
    total = (warmup + runs) * len(settings) * len(items) * len(frameworks)
    with click.progressbar(length=total, label="bench", file=sys.stderr) as bar:
        for round_ in range(warmup + runs):
            for s_index, setting in enumerate(settings):
                for i_index, item in enumerate(items):
                    # who goes first alternates run by run, so neither framework always runs warm
                    order = frameworks if (round_ + s_index + i_index) % 2 == 0 else frameworks[::-1]
                    for fw in order:
                        result = run_once(fw, setting, item)
                        bar.update(1)
                        if round_ < warmup:
                            continue
                        record = asdict(result)
                        first_logprobs.setdefault((fw, s_index, i_index), record.pop("first_logprobs"))
                        record.pop("first_logprobs", None)
                        correct = None if item.answer is None else answer_correct(result.text, item.answer)
                        records.append(
                            dict(record, framework=fw, setting=s_index, item=i_index, round=round_, correct=correct)
                        )

    quality = quality_scores(records, first_logprobs)
    return {
        "config": dict(
            model=model_dir,
            reference=reference,
            synthetic=synthetic,
            dataset=dataset,
            runs=runs,
            warmup=warmup,
            max_tokens=max_tokens,
            frameworks=frameworks,
            dtype=dtype,
            keep_positions=keep_positions,
            image_size=model.config.image_size,
            quantization=model.config.quantization,
        ),
        "environment": environment(device),
        "settings": [dict(asdict(s), label=s.label) for s in settings],
        "items": [asdict(i) for i in items],
        "summary": summarize(settings, records, quality, frameworks),
        "runs": records,
    }
