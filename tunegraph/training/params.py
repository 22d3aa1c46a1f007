"""Params every training stage shares: update strategy, schedule, batch shape, length limits."""

from __future__ import annotations

from pydantic import Field

from tunegraph.params import StageParams
from tunegraph.training.loop import LoopSettings
from tunegraph.training.strategies import LoraSettings, Strategy


class TrainingParams(StageParams):
    strategy: Strategy = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
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

    def loop_settings(self) -> LoopSettings:
        return LoopSettings(self.epochs, self.batch_size, self.grad_accum, self.learning_rate, self.warmup_ratio,
                            self.weight_decay, self.max_grad_norm, self.max_steps)
