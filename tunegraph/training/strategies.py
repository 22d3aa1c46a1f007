"""Update strategies decide which parameters train and how the base is stored.

- ``full``: every parameter trains.
- ``lora``: frozen base W0, trainable low-rank update: ``h = W0 x + (alpha / r) B A x``
  (Hu et al. 2021, https://arxiv.org/abs/2106.09685), through peft.
More strategies (QLoRA, DoRA, GaLore, Spectrum, ...) plug in here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunegraph.params import StageParams

Strategy = Literal["full", "lora"]


class LoraSettings(StageParams):
    r: int = Field(16, ge=1, description="rank of the update")
    alpha: int = Field(32, ge=1, description="scale numerator; usually 2*r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear", description="peft target modules")


def apply_strategy(model, strategy: Strategy, lora: LoraSettings):
    """Return the model to train with only the strategy's parameters requiring grad."""
    if strategy == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def export_trained(model, strategy: Strategy):
    """A plain transformers model with the update folded in (LoRA: W = W0 + (alpha/r) B A)."""
    if strategy == "lora":
        return model.merge_and_unload()
    return model



def save_adapter(model, directory) -> None:
    """Save a peft adapter deterministically: peft stores an expanded ``all-linear`` target as a
    set, whose order follows Python's per-process hash seed; a sorted list is the same every run."""
    for config in model.peft_config.values():
        if isinstance(config.target_modules, (set, frozenset)):
            config.target_modules = sorted(config.target_modules)
    model.save_pretrained(directory)
