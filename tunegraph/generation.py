"""Batched generation for evaluation: left-padded prompts, greedy (deterministic) or seeded sampling."""

from __future__ import annotations

import torch

from tunegraph.training.chat_encoding import prompt_ids


def _left_padded(tokenizer, conversations: list[list[dict]]) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [prompt_ids(tokenizer, messages) for messages in conversations]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


@torch.no_grad()
def generate_answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int,
                     *, samples: int = 1, temperature: float | None = None, top_p: float = 1.0,
                     on_batch=None) -> list[list[str]]:
    """``samples`` completions of each conversation's next assistant turn, decoded without special tokens.

    ``temperature=None`` is greedy decoding (``samples`` must be 1); otherwise sampling driven by the
    global torch RNG, which the stage runner seeds, so results are reproducible.
    """
    if temperature is None and samples != 1:
        raise ValueError("greedy decoding gives one answer per prompt; pass a temperature to sample several")
    model.eval()
    answers: list[list[str]] = []
    sampling = {"do_sample": False} if temperature is None else {"do_sample": True, "temperature": temperature,
                                                                  "top_p": top_p, "num_return_sequences": samples}
    for start in range(0, len(conversations), batch_size):
        ids, mask = _left_padded(tokenizer, conversations[start:start + batch_size])
        output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling)
        texts = tokenizer.batch_decode(output[:, ids.shape[1]:], skip_special_tokens=True)
        answers += [texts[i:i + samples] for i in range(0, len(texts), samples)]
        if on_batch:
            on_batch(len(answers), len(conversations))
    return answers


def greedy_answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int,
                   on_batch=None) -> list[str]:
    """Greedy completion of each conversation's next assistant turn."""
    return [group[0] for group in generate_answers(model, tokenizer, conversations, max_new_tokens, batch_size,
                                                   on_batch=on_batch)]
