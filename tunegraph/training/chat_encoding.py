"""Turn conversations into token ids and labels with the tokenizer's own chat template.

Labels are -100 everywhere except assistant turns: the loss of SFT is

    L_SFT = - sum_t log p(y_t | x, y_<t)        over assistant tokens y only,

and the template's end-of-turn token after each assistant message (``<|im_end|>`` for SmolLM2)
is labelled too, so the model learns to stop. Assistant spans are found as character ranges by
rendering each prefix of the conversation; tokens are labelled by their character offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunegraph.errors import DataError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], row_id: str = "?") -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character range of each assistant turn."""
    text = render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:index], add_generation_prompt=True))
        through = render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not text.startswith(through):
            raise DataError(f"row {row_id}: the chat template does not render turn {index} as a prefix of the "
                            f"whole conversation; label masking needs a prefix-stable template")
        spans.append((start, len(through)))
    return text, spans


def encode_chat(tokenizer, messages: list[dict], max_length: int, row_id: str = "?") -> EncodedExample:
    """Token ids of the whole conversation and labels that keep only assistant turns."""
    text, spans = assistant_spans(tokenizer, messages, row_id)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoded["input_ids"]
    labels = [
        token if any(start <= offset[0] < end for start, end in spans) else IGNORE_INDEX
        for token, offset in zip(input_ids, encoded["offset_mapping"])
    ]
    return EncodedExample(input_ids[:max_length], labels[:max_length], len(input_ids) > max_length)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation up to and including the assistant generation prompt."""
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
