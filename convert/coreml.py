"""Export FastVLM's vision encoder (from the PyTorch reference) to a Core ML ML Program.

Input `images` [1, 3, N, N] (RGB in [0, 1], the same pixels `fastvlm_mlx.preprocess` makes),
output `image_features` [1, K, D]. A score-based pruner is part of the graph, so K is the kept
count and the app feeds the LLM K tokens.
"""

from pathlib import Path

import numpy as np
import torch

from convert import replace
from convert.convert import read_config, source_image_size, source_vision
from convert.torch_model import attention_received, last_attention, load_reference
from fastvlm_mlx.config import check_image_size
from fastvlm_mlx.errors import UserError
from pruners import check, keep_count

SCORE_PRUNERS = ("norm", "attention", "random")  # a score per token, then top-k: expressible as a static graph
PRECISIONS = ("float16", "float32")


class VisionEncoder(torch.nn.Module):
    """timm FastViT features, flattened to tokens, optionally top-k selected in spatial order."""

    def __init__(self, reference, pruner: str | None, keep: int, fixed_indices: torch.Tensor | None = None):
        super().__init__()
        self.tower = reference.model.vision_tower.timm_model
        self.attention = last_attention(reference)
        self.pruner, self.keep = pruner, keep
        self.register_buffer("fixed_indices", fixed_indices, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        scores = []
        hook = None
        if self.pruner == "attention":
            hook = self.attention.register_forward_pre_hook(
                lambda m, args: scores.append(attention_received(m, args[0]))
            )
        try:
            tokens = self.tower.forward_features(images).flatten(2).transpose(1, 2)  # (1, N, D)
        finally:
            if hook is not None:
                hook.remove()
        if self.pruner is None:
            return tokens
        if self.pruner == "random":
            indices = self.fixed_indices
        else:
            score = scores[0][0] if self.pruner == "attention" else tokens[0].norm(dim=-1)
            indices = torch.topk(score, self.keep).indices.sort().values
        return tokens[:, indices]


def random_indices(num_tokens: int, keep: int, seed: int) -> torch.Tensor:
    """The MLX `random` pruner's choice (it depends only on seed and grid), as a constant."""
    from pruners.ops import top_k_sorted
    from pruners.selection import hash_scores

    return torch.from_numpy(np.array(top_k_sorted(hash_scores(num_tokens, seed)[None], keep)[0])).long()


def export_encoder(
    src: Path, pruner: str | None, keep_ratio: float, image_size: int | None, seed: int
) -> tuple[torch.export.ExportedProgram, int, int]:
    """The encoder graph as torch.export captures it (what Core ML converts), its input size and K."""
    reference = load_reference(src, torch.device("cpu"), "float32")
    stride = source_vision(read_config(src)).stride
    size = check_image_size(image_size, stride) if image_size is not None else source_image_size(src)
    tokens = (size // stride) ** 2
    keep = keep_count(tokens, keep_ratio) if pruner else tokens
    fixed = random_indices(tokens, keep, seed) if pruner == "random" else None
    encoder = VisionEncoder(reference, pruner, keep, fixed).eval()
    with torch.no_grad():
        program = torch.export.export(encoder, (torch.rand(1, 3, size, size),))
    return program.run_decompositions({}), size, keep


def export_coreml(
    src: str | Path,
    out: str | Path,
    *,
    pruner: str | None = None,
    keep_ratio: float = 1.0,
    image_size: int | None = None,
    seed: int = 0,
    precision: str = "float16",
    force: bool = False,
) -> Path:
    """Convert SRC's vision encoder to OUT (.mlpackage); OUT is replaced only with force=True."""
    src, out = Path(src), Path(out)
    if out.suffix != ".mlpackage":
        raise UserError(f"{out}: Core ML ML Programs are saved as a .mlpackage; name the output *.mlpackage")
    if pruner is not None and pruner not in SCORE_PRUNERS:
        check(pruner, keep_ratio)  # unknown names get the registry's error first
        raise UserError(f"export-coreml bakes in score-based pruners only ({', '.join(SCORE_PRUNERS)}), not {pruner!r}")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    try:
        import coremltools as ct
    except ImportError:
        raise UserError("export-coreml needs coremltools: pip install 'fastvlm-mlx[coreml]'") from None
    if not src.is_dir():
        raise UserError(f"checkpoint directory not found: {src}")
    out = replace.check_output(out, force, src=src, inside_src_ok=True)  # Apple's own export writes it there

    program, size, keep = export_encoder(src, pruner, keep_ratio, image_size, seed)
    mlmodel = ct.convert(
        program,
        inputs=[ct.TensorType(name="images", shape=(1, 3, size, size))],
        outputs=[ct.TensorType(name="image_features")],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32,
        minimum_deployment_target=ct.target.iOS17,
    )
    mlmodel.short_description = f"FastVLM vision encoder: {size}px -> {keep} visual tokens"
    mlmodel.user_defined_metadata.update(
        {"pruner": pruner or "none", "keep_ratio": str(keep_ratio if pruner else 1.0), "image_size": str(size)}
    )
    return _save_atomically(mlmodel, out, force)


def _save_atomically(mlmodel, out: Path, force: bool) -> Path:
    """Save beside OUT, then publish it (`convert.replace`): a failed export never leaves a partial
    package, and an OUT that exists (or appears meanwhile) is replaced only with force."""
    with replace.staged(out, force) as package:
        mlmodel.save(str(package))
    return out
