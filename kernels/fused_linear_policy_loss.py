"""The GRPO/DAPO clipped policy loss fused with the LM head, chunked: no [B, T, V] logits.

The policy loss needs the per-token log-probs of the sampled completion tokens only. Per chunk of
sequences, from the final hidden states ``h`` ``[B, T, H]``, the head ``(W, b)`` and the completion
labels ``[B, T]`` (-100 on prompt and padding), on the scored tokens only:

    log p_t  = z_t,y_t - logsumexp_v z_t,v ,  z_t = W h_{t-1} + b          (float32, [n_scored, V])
    L_c      = w_c * clipped_policy_loss(log p of the chunk, old, A, mask, ...)   (the SAME function)
    dL/dz_t  = (dL_c / dlog p_t) (onehot(y_t) - softmax(z_t))               (in place, then dropped)

with the loss terms of :mod:`tunegraph.training.objectives.grpo` (ratio rho = exp(log p - old),
clipped to [1 - eps_low, 1 + eps_high], plus ``beta * k3_kl`` to the reference log-probs when beta > 0).
The chunk weights ``w_c`` make the sum exact for both aggregation modes:

- ``"sequence"`` (GRPO): ``L = (1/B) sum_i mean_t l_i,t``; a chunk of ``B_c`` rows returns the mean
  over its rows, so ``w_c = B_c / B``;
- ``"token"`` (DAPO): ``L = sum_{i,t} l_i,t / sum_i |o_i|``; a chunk returns its token sum over its
  token count ``N_c`` (both clamped at 1, as the objective does), so ``w_c = max(N_c, 1) / max(N, 1)``,
  with ``N`` counted from the labels up front.

The logged ``clip_fraction`` and ``kl`` are token means, combined with the token weights.

``old_logps`` (``[B, T - 1]``, from the policy that sampled) defaults to the current log-probs,
detached: TRL's ``num_iterations=1``, where rho = 1 in value. DAPO's dynamic sampling drops groups by
setting their rows' labels to -100: they then cost no logits and add 0, and (sequence mode) still
count in the mean over B, exactly as a zeroed mask does in the naive path. Gradients w.r.t. ``h``,
``W`` and ``b`` are computed during the forward pass (see
:mod:`tunegraph.kernels.fused_linear_preference` for the chunked head, its precision and the
autograd Function; Liger-Kernel's ``LigerFusedLinearGRPOLoss`` is the model).
"""

from __future__ import annotations

import torch

from tunegraph.kernels.fused_linear_preference import (
    ChunkedLinearHead,
    attach_gradients,
    check_chunk_size,
    check_head,
    chunk_rows,
    scored_tokens,
)
from tunegraph.training.chat_encoding import IGNORE_INDEX
from tunegraph.training.objectives.grpo import Aggregation, clipped_policy_loss


def _check_policy_inputs(labels: torch.Tensor, advantages: torch.Tensor, old_logps, ref_logps, beta: float,
                         aggregation: str) -> None:
    batch, width = labels.shape[0], labels.shape[1] - 1
    if advantages.shape != (batch,):
        raise ValueError(f"advantages {tuple(advantages.shape)} are not one per sequence, [{batch}]")
    for name, value in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if value is not None and value.shape != (batch, width):
            raise ValueError(f"{name} {tuple(value.shape)} are not per-token log-probs [{batch}, {width}]")
    if beta and ref_logps is None:
        raise ValueError("beta > 0 needs reference log-probs (ref_logps)")
    if aggregation not in ("sequence", "token"):
        raise ValueError(f"aggregation must be 'sequence' or 'token', got {aggregation!r}")


def fused_linear_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             advantages: torch.Tensor, *, bias: torch.Tensor | None = None,
                             old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
                             eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0,
                             aggregation: Aggregation = "sequence",
                             chunk_size: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``clipped_policy_loss`` on the log-probs of ``F.linear(hidden, weight, bias)``, chunked.

    ``hidden`` ``[B, T, H]``; ``labels`` ``[B, T]``, the completion tokens, -100 elsewhere (the mask);
    ``advantages`` ``[B]``; ``old_logps`` / ``ref_logps`` ``[B, T - 1]`` aligned as
    ``logps.token_logps`` returns them; the other keywords as in ``clipped_policy_loss``;
    ``chunk_size`` sequences per chunk. Returns ``(loss, metrics)`` for the whole batch, the loss
    differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    check_head(hidden, weight, bias, labels)
    check_chunk_size(chunk_size)
    _check_policy_inputs(labels, advantages, old_logps, ref_logps, beta, aggregation)
    batch = labels.shape[0]
    total_tokens = max(int((labels[:, 1:] != IGNORE_INDEX).sum()), 1)
    head = ChunkedLinearHead(hidden, weight, bias)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    metrics: dict[str, torch.Tensor] = {}
    for start, stop in chunk_rows(batch, chunk_size):
        tokens = scored_tokens(labels, torch.arange(start, stop, device=labels.device))
        logits = head.logits(tokens)
        token_logps, lse = head.token_logps(logits, tokens)
        token_weight = max(int(tokens.counts.sum()), 1) / total_tokens
        weight_c = (stop - start) / batch if aggregation == "sequence" else token_weight
        with torch.enable_grad():
            logps = tokens.per_position(token_logps).requires_grad_(head.needs_grad)
            mask = labels[start:stop, 1:] != IGNORE_INDEX
            old = logps.detach() if old_logps is None else old_logps[start:stop]
            ref = None if ref_logps is None else ref_logps[start:stop]
            chunk_loss, chunk_metrics = clipped_policy_loss(
                logps, old, advantages[start:stop], mask, eps_low=eps_low, eps_high=eps_high, beta=beta,
                ref_logps=ref, aggregation=aggregation)
            chunk_loss = chunk_loss * weight_c
            if head.needs_grad:
                (grad_logps,) = torch.autograd.grad(chunk_loss, logps)
                head.backward_(logits, lse, tokens, grad_logps[tokens.sequence, tokens.positions])
        loss += chunk_loss.detach()
        for name, value in chunk_metrics.items():
            metrics[name] = metrics.get(name, 0) + value * token_weight
    return attach_gradients(loss, head), metrics
