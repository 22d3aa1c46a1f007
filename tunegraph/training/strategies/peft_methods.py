"""Adapter strategies through peft: LoRA, DoRA, QLoRA, IA3 and the prompt-style methods.

- ``lora``: frozen W0, trainable low-rank update ``h = W0 x + (alpha / r) B A x`` (Hu et al. 2021,
  https://arxiv.org/abs/2106.09685).
- ``dora``: ``W' = m * (W0 + (alpha / r) B A) / ||W0 + (alpha / r) B A||_c`` (Liu et al. 2024,
  https://arxiv.org/abs/2402.09353): a learnable magnitude m (initialised to ||W0||_c) times the
  LoRA-updated direction; ||.||_c is the norm of each column of the paper's (in x out) W, i.e. of
  each output unit's weight vector (peft's ``use_dora=True``).
- ``qlora``: LoRA on a base stored in 4-bit NormalFloat with double quantization (Dettmers et al.
  2023, https://arxiv.org/abs/2305.14314): ``h = Dequant(W_NF4) x + (alpha / r) B A x``; adapters and
  compute in float32 (CPU). Export never merges into the 4-bit weights (that re-quantizes and
  rounds most of B A away): a float32 base is rebuilt and the adapter merged there.
- ``ia3``: learned rescaling vectors l on keys, values and the FFN input (Liu et al. 2022,
  https://arxiv.org/abs/2205.05638); merges exactly into the weights.
- ``prefix_tuning`` (Li & Liang 2021), ``prompt_tuning`` (Lester et al. 2021), ``p_tuning`` (Liu et al.
  2021, a prompt encoder): trainable virtual tokens. They CANNOT be merged into weights.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from tunegraph.params import StageParams
from tunegraph.training.strategies.heads import Head, auto_class, head_kwargs, head_of, load_float

PROMPT_STYLE = ("prefix_tuning", "prompt_tuning", "p_tuning")


class LoraSettings(StageParams):
    r: int = Field(16, ge=1, description="rank of the update")
    alpha: int = Field(32, ge=1, description="scale numerator; usually 2*r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear", description="peft target modules")


class QLoraSettings(StageParams):
    """How the base is quantized (LoRA's rank/alpha/targets come from ``lora``)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(True, description="quantize the per-block absmax constants too")
    merge_into: Literal["dequantized", "original"] = Field(
        "dequantized", description="export base: the dequantized NF4 weights the adapter was trained against "
                                   "(merged model = trained model), or the original float weights")


class IA3Settings(StageParams):
    target_modules: list[str] | None = Field(None, description="None: peft's default for the architecture")
    feedforward_modules: list[str] | None = Field(None, description="subset of target_modules scaled on the input")


class PromptSettings(StageParams):
    """Virtual tokens for prefix_tuning, prompt_tuning and p_tuning."""

    num_virtual_tokens: int = Field(8, ge=1)
    prompt_init: Literal["sample_vocab", "random"] = Field(
        "sample_vocab", description="prompt_tuning: start from embeddings of random vocabulary tokens, or N(0, 1)")
    encoder_hidden_size: int | None = Field(None, ge=1, description="p_tuning / prefix projection MLP width "
                                                                     "(None: the hidden size)")
    encoder_type: Literal["MLP", "LSTM"] = Field("MLP", description="p_tuning prompt encoder")
    prefix_projection: bool = Field(False, description="prefix_tuning: reparameterize through an MLP")


def peft_config(strategy: str, lora: LoraSettings, ia3: IA3Settings, prompt: PromptSettings, hidden_size: int,
                task_type: str = "CAUSAL_LM"):
    """The peft config of ``strategy``; ``task_type="SEQ_CLS"`` (reward models) makes peft train the
    ``score`` head in full (``modules_to_save``) and keeps it out of LoRA's ``all-linear`` targets."""
    import peft

    if strategy in ("lora", "dora", "qlora"):
        return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                               target_modules=lora.target_modules, use_dora=strategy == "dora", task_type=task_type)
    if strategy == "ia3":
        return peft.IA3Config(target_modules=ia3.target_modules, feedforward_modules=ia3.feedforward_modules,
                              task_type=task_type)
    width = prompt.encoder_hidden_size or hidden_size
    if strategy == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=prompt.num_virtual_tokens, encoder_hidden_size=width,
                                       prefix_projection=prompt.prefix_projection, task_type=task_type)
    if strategy == "prompt_tuning":
        init = peft.PromptTuningInit.SAMPLE_VOCAB if prompt.prompt_init == "sample_vocab" else \
            peft.PromptTuningInit.RANDOM
        return peft.PromptTuningConfig(num_virtual_tokens=prompt.num_virtual_tokens, prompt_tuning_init=init,
                                       task_type=task_type)
    if strategy == "p_tuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=prompt.num_virtual_tokens, encoder_hidden_size=width,
                                        encoder_reparameterization_type=prompt.encoder_type, task_type=task_type)
    raise ValueError(f"{strategy!r} is not a peft strategy")


# --- prompt-style output shape -------------------------------------------------------------------

def _strip_virtual_logits(module, args, kwargs, output):
    """prompt_tuning / p_tuning prepend the virtual tokens to the sequence, so peft's logits are
    [B, V + L, vocab]; objectives that read logits against their own labels expect [B, L, vocab].
    (peft's own ``loss`` is computed before this and is unaffected.)"""
    ids = kwargs.get("input_ids", args[0] if args else None)
    logits = getattr(output, "logits", None)
    if ids is not None and logits is not None and logits.shape[1] > ids.shape[1]:
        output.logits = logits[:, logits.shape[1] - ids.shape[1]:]
    return output


def align_prompt_logits(peft_model) -> None:
    if peft_model.peft_config[peft_model.active_adapter].peft_type.value in ("PROMPT_TUNING", "P_TUNING"):
        peft_model.register_forward_hook(_strip_virtual_logits, with_kwargs=True)


# --- QLoRA -----------------------------------------------------------------------------------------

def load_4bit(model_dir: Path, settings: QLoraSettings, head: Head = "causal_lm"):
    """The base with every eligible Linear in bitsandbytes 4-bit (LM/score head and embeddings stay float32)."""
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=settings.quant_type,
                                bnb_4bit_use_double_quant=settings.double_quant, bnb_4bit_compute_dtype=torch.float32)
    model = auto_class(head).from_pretrained(model_dir, quantization_config=config, dtype=torch.float32,
                                             device_map={"": "cpu"}, **head_kwargs(model_dir, head))
    model.config._name_or_path = ""  # as modelio.load_model: no absolute paths in saved configs
    model.name_or_path = ""
    keep_4bit_layout(model)
    return model


def keep_4bit_layout(model) -> None:
    """Stop bitsandbytes (0.50, CPU) from repacking 4-bit weights into its bf16-kernel layout on the first
    eval-mode forward: after that repack ``dequantize_4bit`` no longer returns the weights the adapter was
    trained against (off by up to 0.1), so merged exports and no-grad passes (GRPO sampling, reference
    log-probs) would drift from the trained model."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def dequantized_weights(quantized_model) -> dict[str, torch.Tensor]:
    """float32 weights of every bitsandbytes 4-bit Linear, by the plain model's module name."""
    import bitsandbytes as bnb

    weights = {}
    for name, module in quantized_model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            weights[name.removesuffix(".base_layer")] = weight.to(torch.float32)
    return weights


def merge_qlora(peft_model, model_dir: Path, settings: QLoraSettings):
    """A float32 transformers model = base (dequantized NF4 or original weights) + (alpha/r) B A (a reward
    model's trained score head comes back from the adapter's ``modules_to_save``)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    base = load_float(model_dir, head_of(peft_model))
    if settings.merge_into == "dequantized":
        for name, weight in dequantized_weights(peft_model.get_base_model()).items():
            target = base.get_submodule(name).weight
            with torch.no_grad():
                target.copy_(weight.reshape(target.shape))
    full = get_peft_model(base, copy.deepcopy(peft_model.peft_config[peft_model.active_adapter]))
    result = set_peft_model_state_dict(full, get_peft_model_state_dict(peft_model))
    if result.unexpected_keys:
        raise RuntimeError(f"qlora merge: adapter tensors not placed: {result.unexpected_keys[:5]}")
    return full.merge_and_unload()
