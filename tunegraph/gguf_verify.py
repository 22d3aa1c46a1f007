"""Read an exported GGUF back with transformers and compare it with the model it came from.

Checks, per file:

- the tokenizer transformers rebuilds from the GGUF metadata gives the source tokenizer's ids on
  :data:`SAMPLE_TEXTS` (special tokens, digits, whitespace, non-ASCII) and carries the same chat template;
- greedy generations on held-out prompts equal the source model's (match rate = identical answers /
  prompts);
- perplexity of the reference answers, ``exp(mean NLL)`` as the ``evaluate`` stage computes it, and its
  relative change ``delta% = 100 * (ppl_gguf - ppl_source) / ppl_source``;
- text perplexity: the same over every token of each rendered conversation (prompt, template and
  answer), many more tokens than the short answers, so a steadier measure of the rounding's effect.

transformers dequantizes every GGUF tensor to float32 on load, so the comparison measures exactly the
rounding the file's types introduce (plus the layout: a wrong q/k permutation would show at once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tunegraph.chat_data import prompt_and_reference
from tunegraph.generation import greedy_answers
from tunegraph.training.chat_encoding import IGNORE_INDEX, EncodedExample, encode_chat
from tunegraph.training.loop import collate

SAMPLE_TEXTS = (
    "Hello world! The year 2024 had 366 days; 3.14159 is pi.",
    "  leading spaces,\ttabs\nand\n\nblank lines  ",
    "naïve café, Straße, 東京, emoji 🎉🚀",
    "<|im_start|>user\nWhat is 7*6?<|im_end|>\n<|im_start|>assistant\n42<|im_end|>",
    "def f(x):\n    return x ** 2  # square\n",
    "'s 've 're 'll 'd I'm DON'T",
)

# Prompts for the greedy comparison when no eval dataset is given (the reply is a placeholder).
DEFAULT_PROMPT_ROWS = tuple(
    {"id": f"builtin-{index}", "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "-"}]}
    for index, text in enumerate(("What is the capital of France?", "Write one sentence about the sea.",
                                  "List three prime numbers.", "How many legs does a spider have?")))


@dataclass(frozen=True)
class VerifySettings:
    greedy_prompts: int = 8  # rows whose prompts are generated from
    max_new_tokens: int = 32
    batch_size: int = 8
    max_length: int = 512


@dataclass(frozen=True)
class Baseline:
    """The source model's answers and perplexity, computed once for all exported files."""

    answers: list[str]
    perplexity: float | None  # None without eval rows
    text_perplexity: float | None
    input_ids: list[list[int]]  # SAMPLE_TEXTS encoded by the source tokenizer
    chat_template: str


@dataclass(frozen=True)
class Verification:
    tokenizer_mismatches: list[str]  # sample texts whose ids differ
    chat_template_equal: bool
    greedy_match: float  # share of prompts whose greedy answer is identical
    answers: list[str]
    perplexity: float | None
    ppl_delta_pct: float | None
    text_perplexity: float | None
    text_ppl_delta_pct: float | None


def load_gguf(path: Path):
    """(model, tokenizer) transformers builds from a GGUF file, the model dequantized to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.config._name_or_path = ""
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out, as in modelio.load_tokenizer
    return model, tokenizer


def _prompts(rows: list[dict], settings: VerifySettings) -> list[list[dict]]:
    return [prompt_and_reference(row)[0] for row in rows[: settings.greedy_prompts]]


def _perplexity(model, tokenizer, rows: list[dict], settings: VerifySettings) -> float | None:
    from tunegraph.tasks.evaluate import reference_loss  # the evaluate stage's measure, so the numbers compare

    if not rows:
        return None
    return math.exp(reference_loss(model, tokenizer, rows, settings.max_length, settings.batch_size))


@torch.no_grad()
def _text_perplexity(model, tokenizer, rows: list[dict], settings: VerifySettings) -> float | None:
    """exp of the mean NLL of every token of each rendered conversation given the tokens before it."""
    if not rows:
        return None
    examples = []
    for row in rows:
        ids = encode_chat(tokenizer, row["messages"], settings.max_length, row["id"]).input_ids
        examples.append(EncodedExample(ids, list(ids), False))
    total, count = 0.0, 0
    for start in range(0, len(examples), settings.batch_size):
        batch = collate(examples[start:start + settings.batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets,
                                                   ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((targets != IGNORE_INDEX).sum())
    return math.exp(total / max(count, 1))


def _delta_pct(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None:
        return None
    return 100.0 * (value - reference) / reference


def _answers(model, tokenizer, prompts: list[list[dict]], settings: VerifySettings) -> list[str]:
    return greedy_answers(model, tokenizer, prompts, settings.max_new_tokens, settings.batch_size)


def source_baseline(model, tokenizer, eval_rows: list[dict], prompt_rows: list[dict],
                    settings: VerifySettings) -> Baseline:
    """What every exported file is compared with."""
    return Baseline(answers=_answers(model, tokenizer, _prompts(prompt_rows, settings), settings),
                    perplexity=_perplexity(model, tokenizer, eval_rows, settings),
                    text_perplexity=_text_perplexity(model, tokenizer, eval_rows, settings),
                    input_ids=[tokenizer(text, add_special_tokens=True)["input_ids"] for text in SAMPLE_TEXTS],
                    chat_template=tokenizer.chat_template)


def verify_gguf(path: Path, baseline: Baseline, eval_rows: list[dict], prompt_rows: list[dict],
                settings: VerifySettings) -> Verification:
    """Load ``path`` with transformers and compare it with ``baseline``."""
    model, tokenizer = load_gguf(path)
    mismatches = [text for text, ids in zip(SAMPLE_TEXTS, baseline.input_ids)
                  if tokenizer(text, add_special_tokens=True)["input_ids"] != ids]
    answers = _answers(model, tokenizer, _prompts(prompt_rows, settings), settings)
    same = sum(a == b for a, b in zip(answers, baseline.answers))
    perplexity = _perplexity(model, tokenizer, eval_rows, settings)
    text_perplexity = _text_perplexity(model, tokenizer, eval_rows, settings)
    return Verification(tokenizer_mismatches=mismatches, chat_template_equal=tokenizer.chat_template ==
                        baseline.chat_template, greedy_match=same / max(len(answers), 1), answers=answers,
                        perplexity=perplexity, ppl_delta_pct=_delta_pct(perplexity, baseline.perplexity),
                        text_perplexity=text_perplexity,
                        text_ppl_delta_pct=_delta_pct(text_perplexity, baseline.text_perplexity))
