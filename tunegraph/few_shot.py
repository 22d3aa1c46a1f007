"""Few-shot prompting: the baseline a fine-tune must beat ("minimum effective dose").

``k`` solved training examples become earlier user/assistant turns of every evaluation prompt, so the
base model is measured with the same data the training stage saw, but without training.
"""

from __future__ import annotations

import random

from tunegraph.chat_data import prompt_and_reference


def few_shot_turns(train_rows: list[dict], k: int, seed: int) -> list[dict]:
    """``k`` examples drawn with the run's seed, as alternating user/assistant messages (system messages dropped)."""
    if k > len(train_rows):
        raise ValueError(f"few_shot={k} needs at least {k} training rows, the dataset has {len(train_rows)}")
    turns: list[dict] = []
    for row in random.Random(seed).sample(train_rows, k):
        prompt, reference = prompt_and_reference(row)
        turns += [m for m in prompt if m["role"] != "system"] + [{"role": "assistant", "content": reference}]
    return turns


def with_examples(conversation: list[dict], examples: list[dict]) -> list[dict]:
    """Insert the example turns after any leading system message."""
    head = [m for m in conversation[:1] if m["role"] == "system"]
    return head + examples + conversation[len(head):]
