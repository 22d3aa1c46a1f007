"""Which transformers head a strategy loads and wraps: the causal LM, or a scalar score head (reward models).

A reward model (:mod:`tunegraph.training.reward_model`) is the same decoder with the LM head replaced
by a scalar ``score`` Linear: transformers' ``AutoModelForSequenceClassification`` with
``num_labels=1``. Loading a causal-LM artifact that way keeps every backbone weight and initialises
``score`` from torch's (seeded) RNG. Under peft the task type is ``SEQ_CLS``, which puts ``score`` in
``modules_to_save``: the head trains in full while the backbone gets the adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

Head = Literal["causal_lm", "score"]
HEADS: tuple[str, ...] = get_args(Head)
SCORE_MODULE = "score"  # the scalar head's attribute on transformers' decoder *ForSequenceClassification models


def head_of(model) -> Head:
    """The head of a transformers model, or of the model under a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "score" if type(base).__name__.endswith("ForSequenceClassification") else "causal_lm"


def peft_task_type(head: Head) -> str:
    return "SEQ_CLS" if head == "score" else "CAUSAL_LM"


def auto_class(head: Head):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM


def head_kwargs(model_dir: Path, head: Head) -> dict:
    """Extra ``from_pretrained`` arguments: one scalar output, and a pad id where the config has none
    (transformers refuses batches without one, although scores are read by attention mask here)."""
    if head == "causal_lm":
        return {}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    kwargs: dict = {"num_labels": 1}
    if getattr(config, "pad_token_id", None) is None:
        eos = config.eos_token_id
        kwargs["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    return kwargs


def load_float(model_dir: Path, head: Head = "causal_lm"):
    """The float32 model of ``model_dir`` with the given head (a causal-LM artifact loads as either)."""
    from tunegraph.modelio import load_model

    model_dir = Path(model_dir)
    if head == "causal_lm" or not (model_dir / "config.json").is_file():
        return load_model(model_dir)  # the causal LM, or modelio's "not a model artifact" error
    import torch

    model = auto_class(head).from_pretrained(model_dir, dtype=torch.float32, **head_kwargs(model_dir, head))
    model.config._name_or_path = ""  # as modelio.load_model: no absolute paths in saved configs
    model.name_or_path = ""
    return model
