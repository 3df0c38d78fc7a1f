"""Random-weight FastVLM checkpoints for tests and benchmarks (needs the `torch` extra).

Timings depend on architecture, not weight values, and parity needs no trained weights; but
transformers' default init makes FastViT activations vanish (layer scale 1e-5, BN identity),
so `randomize_vision_` gives every layer O(1) activations first.
"""

import json
from pathlib import Path

import torch

from convert.convert import TEXT_FIELDS
from convert.keymap import hf_to_original
from convert.torch_model import fastvlm_config
from fastvlm_mlx.config import VisionConfig

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT_ARCHS = {
    "0.5b": dict(
        hidden_size=896,
        num_hidden_layers=24,
        intermediate_size=4864,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "1.5b": dict(
        hidden_size=1536,
        num_hidden_layers=28,
        intermediate_size=8960,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "7b": dict(
        hidden_size=3584,
        num_hidden_layers=28,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}


def make_tokenizer(directory: Path, texts: list[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer with Qwen2's chat special tokens and `<image>`, saved to directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


@torch.no_grad()
def randomize_vision_(tower: torch.nn.Module, seed: int = 0) -> None:
    """Weights that keep FastViT activations O(1): fan-in scaled convs, real BN stats, layer scale ~0.3."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in tower.named_parameters():
        if name.endswith("gamma"):
            p.copy_(0.1 + 0.4 * torch.rand(p.shape, generator=gen))
        elif p.ndim >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
        elif name.endswith("bn.weight") or name.endswith("norm.weight"):
            p.copy_(0.5 + torch.rand(p.shape, generator=gen))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    for name, b in tower.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=gen))


def build_reference(vision_args: dict, text_args: dict, image_token_id: int, seed: int = 0, text_init: float = 0.02):
    """A random transformers FastVlmForConditionalGeneration (timm fastvit_mci3 + Qwen2), eval mode."""
    from transformers import FastVlmForConditionalGeneration

    text = dict(text_args, initializer_range=text_init)
    config = fastvlm_config(vision_args, text, image_token_id, text_args.get("tie_word_embeddings", True))
    torch.manual_seed(seed)
    model = FastVlmForConditionalGeneration(config).eval()
    randomize_vision_(model.model.vision_tower, seed)
    return model


def save_checkpoint(model, tokenizer, directory: Path, eos_token_id: int) -> Path:
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def to_original_layout(hf_dir: Path, out_dir: Path, vision: VisionConfig) -> Path:
    """Rewrite a transformers checkpoint in Apple's `llava_qwen2` layout (inverse key map).

    Only the full FastViTHD tower can be expressed (the original config names it, not its shape).
    """
    from safetensors.torch import load_file, save_file

    raw = json.loads((hf_dir / "config.json").read_text())
    weights = load_file(hf_dir / "model.safetensors")
    original = {hf_to_original(k, vision): v for k, v in weights.items()}
    text = raw["text_config"]
    if text.get("tie_word_embeddings", True):  # Apple's files store the head even when tied
        original["lm_head.weight"] = original["model.embed_tokens.weight"].clone()
    out_dir.mkdir(parents=True)
    save_file(original, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = {
        "model_type": "llava_qwen2",
        "architectures": ["LlavaQwen2ForCausalLM"],
        **{k: text[k] for k in (*TEXT_FIELDS, "vocab_size") if k != "rope_theta"},
        "rope_theta": text.get("rope_parameters", {}).get("rope_theta", 1e6),
        "tie_word_embeddings": text.get("tie_word_embeddings", True),
        "mm_vision_tower": "mobileclip_l_1024",
        "mm_hidden_size": vision.num_features,
        "mm_projector_type": "mlp2x_gelu",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "eos_token_id": raw.get("eos_token_id"),
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for f in hf_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("generation_config.json", "chat_template.jinja"):
            (out_dir / f.name).write_bytes(f.read_bytes())
    return out_dir
