"""The Qwen2 chat prompt with one image, split at the `<image>` position.

The chat scaffolding is tokenized with its special tokens; the user's question never is:
`<|im_end|>` or `<image>` typed in a question stay plain text.
"""

import re

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


# Qwen2's own chat template, which FastVLM's `qwen_2` conversation style renders identically; used for
# checkpoints that ship no template (Apple's).
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")
SLOT = re.compile("\0(\\d+)\0")  # stands for message i's text while the template renders


def as_messages(prompt: str | list[dict]) -> list[dict]:
    """A prompt string as one user message; a message list checked (roles, text) and returned."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise UserError("the prompt must be a string or a non-empty list of {'role', 'content'} messages")
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise UserError(f"message {i} must be a dict with a role in {ROLES} and a content")
        message_text(message, i)
    if not any(m["role"] == "user" for m in prompt):
        raise UserError("the messages have no user message to put the image in")
    return prompt


def message_text(message: dict, index: int = 0) -> str:
    """A message's text: its content string, or its text parts joined by newlines (image parts dropped:
    the one image goes at the start of the first user message)."""
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
            raise UserError(f"message {index}: content parts must be dicts, text parts with a 'text' string")
        content = "\n".join(p["text"] for p in content if p.get("type") == "text")
    if not isinstance(content, str):
        raise UserError(f"message {index}: content must be a string or a list of parts, not {type(content).__name__}")
    check_text(content, f"message {index}")
    return content


def tokenize_messages(
    tokenizer, messages: str | list[dict], template: str | None = None, known: dict[int, list[int]] | None = None
) -> tuple[list[int], list[int]]:
    """Ids before and after the image for a conversation, rendered by `template` (default: the checkpoint's
    own chat template, else `QWEN2_TEMPLATE`) with the image at the start of the first user message.

    Message text is never parsed for special tokens; as in `tokenize_prompt`, each stretch of text
    between two special tokens is tokenized in one piece, so the ids equal those of the rendered text.
    `known` gives the ids of some messages' text as the model generated them (a chat's own answers),
    which are used instead of tokenizing that text again."""
    messages = as_messages(messages)
    texts = [message_text(m, i) for i, m in enumerate(messages)]
    template = template or getattr(tokenizer, "chat_template", None) or QWEN2_TEMPLATE
    rendered = _render_with_slots(tokenizer, messages, template)
    specials = sorted(tokenizer.get_added_vocab().items(), key=lambda item: -len(item[0]))
    pattern = re.compile("|".join(re.escape(s) for s in [IMAGE_PLACEHOLDER] + [s for s, _ in specials]))
    ids, image_at, run = [], None, []
    pieces = SLOT.split(rendered)  # scaffold, slot index, scaffold, ...
    for n, piece in enumerate(pieces):
        if n % 2:
            if known and int(piece) in known:
                ids += _encode_text(tokenizer, run) + known[int(piece)]
                run = []
            else:
                run.append(texts[int(piece)])
            continue
        at = 0
        for match in pattern.finditer(piece):
            run.append(piece[at : match.start()])
            ids += _encode_text(tokenizer, run)
            run, at = [], match.end()
            if match.group() == IMAGE_PLACEHOLDER and image_at is None:
                image_at = len(ids)
            else:
                ids.append(tokenizer.convert_tokens_to_ids(match.group()))
        run.append(piece[at:])
    ids += _encode_text(tokenizer, run)
    return ids[:image_at], ids[image_at:]


def instruction_ids(tokenizer, messages: str | list[dict]) -> list[int]:
    """The ids of the first user message's text alone (the message the image is in; never parsed for
    special tokens): what an instruction-aware pruner (`cdpruner`) ranks the image's tokens against.
    A conversation's later turns keep the tokens its first question chose, and so their caches."""
    messages = as_messages(messages)
    first = next(i for i, m in enumerate(messages) if m["role"] == "user")
    return _encode_text(tokenizer, [message_text(messages[first], first)])


def _render_with_slots(tokenizer, messages: list[dict], template: str) -> str:
    """The template rendered with slot markers for the texts: string contents first, then (for
    templates that only read content parts) an image part and a text part."""
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    for as_parts in (False, True):
        slotted = []
        for i, message in enumerate(messages):
            text, image = f"\0{i}\0", i == first_user
            if as_parts:
                content = [{"type": "image"}] * image + [{"type": "text", "text": text}]
            else:
                content = f"{IMAGE_PLACEHOLDER}\n{text}" if image else text
            slotted.append({"role": message["role"], "content": content})
        rendered = tokenizer.apply_chat_template(
            slotted, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        slots = [int(i) for i in SLOT.findall(rendered)]
        if slots == list(range(len(messages))) and rendered.count(IMAGE_PLACEHOLDER) == 1:
            return rendered
    raise UserError(
        "the checkpoint's chat template does not render each message once with one <image>; "
        "fix chat_template in its tokenizer files"
    )


def _encode_text(tokenizer, run: list[str]) -> list[int]:
    text = "".join(run)
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) if text else []
