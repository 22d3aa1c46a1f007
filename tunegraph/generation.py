"""Batched greedy generation for evaluation: left-padded prompts, deterministic output."""

from __future__ import annotations

import torch

from tunegraph.training.chat_encoding import prompt_ids


@torch.no_grad()
def greedy_answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int,
                   on_batch=None) -> list[str]:
    """Greedy completion of each conversation's next assistant turn, decoded without special tokens."""
    model.eval()
    answers: list[str] = []
    for start in range(0, len(conversations), batch_size):
        prompts = [prompt_ids(tokenizer, messages) for messages in conversations[start:start + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        if on_batch:
            on_batch(len(answers), len(conversations))
    return answers
