"""The Qwen2 chat prompt with one image, split at the `<image>` position."""

IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = "You are a helpful assistant."


def render_prompt(question: str, system: str = SYSTEM_PROMPT) -> str:
    """One user turn, image first, as FastVLM's `qwen_2` template and the HF template render it."""
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE_PLACEHOLDER}\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def tokenize_prompt(tokenizer, question: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the image, each piece tokenized on its own (as the original)."""
    before, after = render_prompt(question).split(IMAGE_PLACEHOLDER, 1)
    return (
        tokenizer.encode(before, add_special_tokens=False),
        tokenizer.encode(after, add_special_tokens=False),
    )
