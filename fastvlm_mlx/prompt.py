"""The Qwen2 chat prompt with one image, split at the `<image>` position.

The chat scaffolding is tokenized with its special tokens; the user's question never is:
`<|im_end|>` or `<image>` typed in a question stay plain text.
"""

from fastvlm_mlx.errors import UserError

IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = "You are a helpful assistant."
QUESTION_SLOT = "\0"  # marks where the question goes in the rendered template


def render_prompt(question: str, system: str = SYSTEM_PROMPT) -> str:
    """One user turn, image first, as FastVLM's `qwen_2` template and the HF template render it."""
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE_PLACEHOLDER}\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def tokenize_prompt(tokenizer, question: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the image, each piece tokenized on its own (as the original).

    The question is tokenized without special-token parsing. Special tokens split the rendered
    prompt before BPE runs, so for a question without them the ids equal those of the whole
    rendered text, which is how Apple's predict.py tokenizes it."""
    check_text(question, "the prompt")
    before, after = render_prompt(QUESTION_SLOT).split(IMAGE_PLACEHOLDER, 1)
    lead, scaffold = after.split(QUESTION_SLOT)  # lead: the newline between <image> and the question
    return (
        tokenizer.encode(before, add_special_tokens=False),
        tokenizer.encode(lead + question, add_special_tokens=False, split_special_tokens=True)
        + tokenizer.encode(scaffold, add_special_tokens=False),
    )


def check_text(text: str, what: str) -> None:
    """A UserError unless `text` is valid Unicode (the OS hands undecodable arguments over as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise UserError(
            f"{what} is not valid UTF-8 (byte {ord(text[error.start]) & 0xFF:#04x} at character {error.start}); "
            "give UTF-8 text"
        ) from None
