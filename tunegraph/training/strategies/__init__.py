"""Update strategies: which parameters train, with which optimizer, and what the stage saves.

=================  =============================================  ==========================================
strategy           trains                                         model artifact (top of ``out``)
=================  =============================================  ==========================================
``full``           every parameter (AdamW)                        the trained model
``galore``         every parameter; GaLore-projected AdamW on     the trained model
                   attention/MLP matrices (:mod:`.galore`)
``spectrum``       top-SNR layers per module type (+ embeddings)  the trained model; ``spectrum.json``
                   (:mod:`.spectrum`)                             names the trained modules
``lora``/``dora``  low-rank adapters (:mod:`.peft_methods`)       adapter merged; adapter also in ``adapter/``
``qlora``          LoRA on an NF4 double-quantized base           adapter merged into a float32 base
``ia3``            rescaling vectors                              merged; adapter also in ``adapter/``
``prefix_tuning``, virtual tokens / prompt encoder                the UNCHANGED base + ``adapter/`` +
``prompt_tuning``,                                                ``requires_adapter.json``: inference needs
``p_tuning``                                                      :func:`load_with_adapter`
=================  =============================================  ==========================================

Prompt-style adapters live in the attention cache or the input sequence, not in any weight, so no
merge exists; ``from_pretrained`` on the artifact loads the base alone (correct weights, but without
the learned prompt). :func:`load_with_adapter` is the loader that honours ``requires_adapter.json``.

Every strategy applies to a reward model too (``load_base(..., head="score")``, see :mod:`.heads`): the
new scalar score head always trains in full (peft ``modules_to_save``; unfrozen under spectrum).
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch

from tunegraph.training.strategies.galore import GaloreSettings, build_galore_optimizer
from tunegraph.training.strategies.heads import SCORE_MODULE, Head, head_of, load_float, peft_task_type
from tunegraph.training.strategies.neftune import neftune
from tunegraph.training.strategies.peft_methods import (PROMPT_STYLE, IA3Settings, LoraSettings, PromptSettings,
                                                        QLoraSettings, align_prompt_logits, load_4bit, merge_qlora,
                                                        peft_config)
from tunegraph.training.strategies.spectrum import (SpectrumSelection, SpectrumSettings, apply_spectrum,
                                                    save_spectrum, spectrum_snr)

Strategy = Literal["full", "lora", "qlora", "dora", "galore", "spectrum", "ia3", "prefix_tuning", "prompt_tuning",
                   "p_tuning"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
PEFT_STRATEGIES = ("lora", "qlora", "dora", "ia3", *PROMPT_STYLE)
REQUIRES_ADAPTER_FILE = "requires_adapter.json"

__all__ = ["GaloreSettings", "IA3Settings", "LoraSettings", "PromptSettings", "QLoraSettings", "SpectrumSettings",
           "STRATEGIES", "Strategy", "StrategySettings", "apply_strategy", "build_optimizer", "describe_strategy",
           "export_trained", "load_base", "load_with_adapter", "neftune", "save_adapter", "save_trained_model",
           "spectrum_selection", "spectrum_snr"]


@dataclass(frozen=True)
class StrategySettings:
    """Every strategy family's settings (TrainingParams holds them as separate fields)."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    qlora: QLoraSettings = field(default_factory=QLoraSettings)
    galore: GaloreSettings = field(default_factory=GaloreSettings)
    spectrum: SpectrumSettings = field(default_factory=SpectrumSettings)
    ia3: IA3Settings = field(default_factory=IA3Settings)
    prompt: PromptSettings = field(default_factory=PromptSettings)


@dataclass(frozen=True)
class _Applied:
    strategy: str
    settings: StrategySettings
    model_dir: Path | None
    spectrum: SpectrumSelection | None = None


_APPLIED: "weakref.WeakKeyDictionary[torch.nn.Module, _Applied]" = weakref.WeakKeyDictionary()


def _settings(settings: LoraSettings | StrategySettings | None) -> StrategySettings:
    if isinstance(settings, LoraSettings):  # the original call: apply_strategy(model, strategy, params.lora)
        return StrategySettings(lora=settings)
    return settings or StrategySettings()


def load_base(model_dir: Path, strategy: Strategy, settings: StrategySettings | None = None,
              head: Head = "causal_lm"):
    """The base model as the strategy trains it: 4-bit for qlora, float32 otherwise; with the LM head,
    or with a scalar score head for reward models (:mod:`.heads`)."""
    if strategy == "qlora":
        return load_4bit(Path(model_dir), _settings(settings).qlora, head)
    return load_float(Path(model_dir), head)


def apply_strategy(model, strategy: Strategy, settings: LoraSettings | StrategySettings | None = None, *,
                   model_dir: Path | None = None):
    """Return the model to train, with only the strategy's parameters requiring grad.

    ``qlora`` needs the base in 4-bit: pass a model from :func:`load_base`, or ``model_dir`` (the
    float model given is then replaced by a 4-bit load). ``model_dir`` is also what qlora's export
    rebuilds the float32 base from.
    """
    settings = _settings(settings)
    spectrum = None
    head = head_of(model)
    if strategy in ("full", "galore"):
        model.requires_grad_(True)
    elif strategy == "spectrum":
        # a reward model's score head is new: it trains whatever the layers' signal-to-noise ratios say
        spectrum = apply_spectrum(model, settings.spectrum, also_train=(SCORE_MODULE,) if head == "score" else ())
    elif strategy in PEFT_STRATEGIES:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if strategy == "qlora":
            if not getattr(model, "is_loaded_in_4bit", False):
                if model_dir is None:
                    raise ValueError("qlora needs a 4-bit base: pass model_dir, or a model from "
                                     "load_base(..., 'qlora')")
                model = load_4bit(Path(model_dir), settings.qlora, head)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        config = peft_config(strategy, settings.lora, settings.ia3, settings.prompt, model.config.hidden_size,
                             task_type=peft_task_type(head))
        model = get_peft_model(model, config)
        align_prompt_logits(model)
    else:
        raise ValueError(f"unknown update strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    _APPLIED[model] = _Applied(strategy, settings, Path(model_dir) if model_dir else None, spectrum)
    return model


def spectrum_selection(model) -> SpectrumSelection | None:
    applied = _APPLIED.get(model)
    return applied.spectrum if applied else None


def describe_strategy(model, strategy: Strategy) -> str:
    """One log line: trainable parameter count, and Spectrum's chosen modules."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    text = f"strategy {strategy}: {trainable:,} trainable parameters"
    selection = spectrum_selection(model)
    if selection is not None:
        text += f"; spectrum trains {len(selection.selected)} of {len(selection.snr)} layers: " \
                + ", ".join(selection.selected)
    return text


def build_optimizer(model, strategy: Strategy, galore: GaloreSettings | None, lr: float, weight_decay: float):
    """The optimizer over the trainable parameters: GaLore-AdamW for ``galore``, AdamW otherwise."""
    if strategy == "galore":
        return build_galore_optimizer(model, galore or GaloreSettings(), lr, weight_decay)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def export_trained(model, strategy: Strategy):
    """A plain transformers model holding the trained weights.

    lora/dora/ia3: the update merged (W0 + (alpha/r) B A; DoRA's m * direction; IA3's scaled rows).
    qlora: merged into a float32 rebuild of the base, never into the 4-bit weights.
    prompt-style: the base unchanged (the adapter cannot merge; see the module docstring).
    """
    if strategy in ("lora", "dora", "ia3"):
        return model.merge_and_unload()
    if strategy == "qlora":
        applied = _APPLIED.get(model)
        if applied is None or applied.model_dir is None:
            raise ValueError("qlora export needs the base model directory: apply_strategy(..., model_dir=...)")
        return merge_qlora(model, applied.model_dir, applied.settings.qlora)
    if strategy in PROMPT_STYLE:
        return _unwrap_modules_to_save(model.get_base_model())
    return model


def _unwrap_modules_to_save(model):
    """Replace peft's ``ModulesToSaveWrapper`` (a reward model's score head under prompt-style adapters)
    by its trained copy, so the saved weights hold the trained head under its plain name."""
    from peft.utils import ModulesToSaveWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    module.modules_to_save[module.active_adapter])
    return model


def save_adapter(model, directory) -> None:
    """Save a peft adapter deterministically: peft stores expanded module lists (``all-linear``, IA3
    defaults) as sets, whose order follows Python's per-process hash seed; sorted lists do not."""
    for config in model.peft_config.values():
        for name, value in vars(config).items():
            if isinstance(value, (set, frozenset)):
                setattr(config, name, sorted(value))
    model.save_pretrained(directory)


def save_trained_model(model, tokenizer, strategy: Strategy, out: Path) -> None:
    """Write a stage's model artifact: the exported model at the top of ``out``; a peft adapter
    under ``adapter/``; ``spectrum.json`` (spectrum); ``requires_adapter.json`` (prompt-style)."""
    from tunegraph.modelio import save_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if strategy in PEFT_STRATEGIES:
        save_adapter(model, out / "adapter")
    selection = spectrum_selection(model)
    if selection is not None:
        save_spectrum(selection, out)
    if strategy in PROMPT_STYLE:
        peft_type = model.peft_config[model.active_adapter].peft_type.value
        note = {"adapter": "adapter", "peft_type": peft_type,
                "why": "prompt-style adapters cannot be merged into weights; the weights here are the unchanged "
                       "base; load with tunegraph.training.strategies.load_with_adapter"}
        (out / REQUIRES_ADAPTER_FILE).write_text(json.dumps(note, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_model(export_trained(model, strategy), tokenizer, out)


def load_with_adapter(model_dir: Path, head: Head = "causal_lm"):
    """Load a model artifact for inference, applying its adapter when ``requires_adapter.json`` says the
    weights alone are not the trained model (prompt-style strategies)."""
    model_dir = Path(model_dir)
    model = load_float(model_dir, head)
    note = model_dir / REQUIRES_ADAPTER_FILE
    if not note.is_file():
        return model
    from peft import PeftModel

    adapter = model_dir / json.loads(note.read_text(encoding="utf-8"))["adapter"]
    model = PeftModel.from_pretrained(model, adapter)
    align_prompt_logits(model)
    return model.eval()
