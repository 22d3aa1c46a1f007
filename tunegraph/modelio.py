"""Load a model artifact for training or inference, and save one back with its tokenizer.

A model artifact is a directory that ``from_pretrained`` loads directly: weights, config,
tokenizer and the chat template. Saving always writes the tokenizer too, so the template a model
was trained with travels with it to merge and export stages.
"""

from __future__ import annotations

from pathlib import Path

from tunegraph.errors import StageError


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.chat_template is None:
        raise StageError(f"{model_dir}: the tokenizer has no chat template; chat data cannot be encoded")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is always masked out of labels and attention
    return tokenizer


def load_model(model_dir: Path, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    if not (model_dir / "config.json").is_file():
        raise StageError(f"{model_dir}: not a model artifact (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    # transformers and peft copy name_or_path into saved configs and adapter cards; an absolute
    # path there would make artifacts depend on where the workspace is.
    model.config._name_or_path = ""
    model.name_or_path = ""
    return model


def save_model(model, tokenizer, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
