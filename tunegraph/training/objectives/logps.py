"""Per-sequence log-probabilities of labelled tokens: the input of every preference objective.

For a causal LM the logits at position t predict the token at t + 1, so with labels aligned to the
input ids (-100 on prompt and padding, as :func:`tunegraph.training.chat_encoding.encode_chat` and
:func:`tunegraph.training.loop.collate` produce them)

    log p_t   = logits[t - 1, y_t] - logsumexp_v logits[t - 1, v]       for t = 1 .. T-1
    M         = { t >= 1 : labels[t] != -100 }
    sum       = sum_{t in M} log p_t          = log pi(y | x)
    average   = sum / |M|                     = (1/|y|) log pi(y | x)

(``labels[0]`` is never scored: nothing predicts the first token). The sum is the sequence
log-likelihood DPO, CPO and KTO use; the average is the length-normalized one of IPO (as TRL
normalizes it), SimPO and ORPO. Everything is computed in float32 whatever the logits' dtype, so
bf16 logits do not round the log-softmax; the result matches TRL's ``get_batch_logps``
(``trl.experimental.orpo.ORPOTrainer.get_batch_logps`` / ``CPOTrainer.get_batch_logps``).
"""

from __future__ import annotations

import torch

from tunegraph.training.chat_encoding import IGNORE_INDEX


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p_t, mask)`` for t = 1 .. T-1, both ``[batch, seq - 1]``: the float32 log-prob of each
    label under the logits one position earlier (0 where not scored) and the scored positions."""
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align as "
                         f"[batch, seq, vocab] and [batch, seq]")
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = logits.gather(-1, targets.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)).masked_fill(~mask, 0.0), mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps, n_tokens)``: per-sequence sum (``average=False``) or mean (``average=True``) of
    ``log p(label_t | tokens_<t)`` over labelled positions, and the number of those positions.

    ``logits``: ``[batch, seq, vocab]`` of any floating dtype; ``labels``: ``[batch, seq]`` aligned
    with the input ids, -100 where not scored. Returns float32 ``[batch]`` and int64 ``[batch]``.
    A row without labelled tokens has sum 0; its average is undefined and raises ``ValueError``.
    """
    per_token, mask = token_logps(logits, labels)
    logps = per_token.sum(-1)
    n_tokens = mask.sum(-1)
    if average:
        if bool((n_tokens == 0).any()):
            raise ValueError("a sequence has no labelled tokens; its average log-prob is undefined "
                             "(was the completion truncated away?)")
        logps = logps / n_tokens
    return logps, n_tokens


def token_mean_nll(logps: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Token-level mean NLL over a batch from SUMMED per-sequence log-probs:

        NLL = - sum_i log pi(y_i | x_i) / sum_i |y_i|

    which is ``torch.nn.CrossEntropyLoss(ignore_index=-100)`` over the shifted logits, the
    behaviour-cloning / SFT term TRL's CPO and ORPO trainers add (``cross_entropy_loss`` in their
    ``concatenated_forward``). Note it weights sequences by length, unlike the mean of per-sequence
    averages."""
    return -logps.sum() / n_tokens.sum().clamp(min=1)
