"""PPO's critic: a scalar value head on the policy's last hidden states, and the policy + critic pair.

    V(s_t) = w^T h_t + b,      h_t = the policy's final (normed) hidden state at position t

The value head shares the policy's backbone (the "causal LM with value head" of TRL 0.x and of
Ziegler et al. 2019) instead of a second full model (TRL's later PPO trainer, and Huang et al. 2024,
use a separate value model initialised from the reward model). Sharing costs no second backbone; the
value loss also trains whatever the update strategy lets train (LoRA adapters, prompt tokens, ...).

Initialisation: from the reward model's score head when its input width matches the policy's
hidden size (both usually come from the same SFT model, so the score direction is a fair first
critic, as TRL initialises its value model from the reward model), otherwise zero (V = 0, so the
first advantages are the discounted rewards). :func:`init_value_head` says which it did.
"""

from __future__ import annotations

import torch
from torch import nn


class ValueHead(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


def init_value_head(head: ValueHead, score_weight: torch.Tensor | None) -> str:
    """Copy a reward model's score weights ``[1, hidden]`` into the head if the shapes match; return
    ``"reward_head"`` or ``"zero"`` (what the head now holds)."""
    if score_weight is None or tuple(score_weight.shape) != tuple(head.summary.weight.shape):
        return "zero"
    with torch.no_grad():
        head.summary.weight.copy_(score_weight.detach().to(head.summary.weight.dtype))
        head.summary.bias.zero_()
    return "reward_head"


class PolicyWithValue(nn.Module):
    """The policy and its value head as one module, so the training loop's optimizer, gradient
    clipping and checkpoints cover both. ``forward`` returns ``(logits [B, T, V], values [B, T])``."""

    def __init__(self, policy: nn.Module, value_head: ValueHead):
        super().__init__()
        self.policy = policy
        self.value_head = value_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                logits_to_keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits_to_keep`` > 0: logits of the last that many positions only (the LM head over a 49k
        vocabulary dominates the cost of a small model; values cover every position regardless)."""
        output = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             output_hidden_states=True, logits_to_keep=logits_to_keep)
        # prompt_tuning / p_tuning prepend virtual tokens to the hidden states; keep the input's positions
        hidden = output.hidden_states[-1][:, -input_ids.shape[1]:]
        return output.logits, self.value_head(hidden)

    def get_input_embeddings(self) -> nn.Module:  # NEFTune hooks the policy's embeddings
        return self.policy.get_input_embeddings()
