"""Params every training stage shares: update strategy, schedule, batch shape, length limits."""

from __future__ import annotations

from typing import ClassVar

from functools import partial

from pydantic import Field

from tunegraph.params import StageParams
from tunegraph.training.loop import LoopSettings
from tunegraph.training.strategies import (GaloreSettings, IA3Settings, LoraSettings, PromptSettings, QLoraSettings,
                                           SpectrumSettings, Strategy, StrategySettings, build_optimizer)


class TrainingParams(StageParams):
    strategy: Strategy = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings, description="lora, dora and qlora adapters")
    qlora: QLoraSettings = Field(default_factory=QLoraSettings, description="qlora: base quantization and export")
    galore: GaloreSettings = Field(default_factory=GaloreSettings)
    spectrum: SpectrumSettings = Field(default_factory=SpectrumSettings)
    ia3: IA3Settings = Field(default_factory=IA3Settings)
    prompt: PromptSettings = Field(default_factory=PromptSettings,
                                   description="prefix_tuning, prompt_tuning and p_tuning virtual tokens")
    neftune_alpha: float | None = Field(None, gt=0, description="NEFTune: uniform noise alpha/sqrt(L*d) on input "
                                                                "embeddings while training (paper: 5)")
    kernels: bool = Field(False, description="fused kernels (llama, qwen2, gemma3): RMSNorm, RoPE and SwiGLU/GeGLU "
                                             "patched into the model (Triton on CUDA, chunked torch on CPU), and the "
                                             "sft, preference and grpo/dapo losses computed from the LM head's input "
                                             "without materializing the logits")
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(512, ge=8, description="tokens; longer examples are truncated")
    max_truncated_fraction: float = Field(0.05, ge=0, le=1,
                                          description="refuse the data if more examples than this are truncated")
    checkpoint_every: int | None = Field(None, ge=1, description="save a resumable checkpoint every N optimizer steps")
    keep_checkpoints: int = Field(2, ge=1, description="how many of the newest checkpoints to keep")

    # how often to checkpoint cannot change the trained weights (tests/test_resume.py)
    NOT_IN_FINGERPRINT: ClassVar[frozenset[str]] = frozenset({"checkpoint_every", "keep_checkpoints"})

    def strategy_settings(self) -> StrategySettings:
        return StrategySettings(self.lora, self.qlora, self.galore, self.spectrum, self.ia3, self.prompt)

    def make_optimizer(self):
        """``model -> optimizer`` for the training loop (GaLore-AdamW under ``galore``, else AdamW)."""
        return partial(build_optimizer, strategy=self.strategy, galore=self.galore, lr=self.learning_rate,
                       weight_decay=self.weight_decay)

    def loop_settings(self) -> LoopSettings:
        return LoopSettings(self.epochs, self.batch_size, self.grad_accum, self.learning_rate, self.warmup_ratio,
                            self.weight_decay, self.max_grad_norm, self.max_steps,
                            checkpoint_every=self.checkpoint_every, keep_checkpoints=self.keep_checkpoints)
