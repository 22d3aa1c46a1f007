"""Preference losses (DPO, IPO, ORPO, SimPO, CPO, KTO) fused with the LM head, chunked: no [B, T, V] logits.

A preference step needs only per-sequence log-probs, yet the naive path materializes the logits of
every position of every sequence, ``[2B, T, V]`` (plus their log-softmax and gradient, in float32).
Here the inputs are the final hidden states ``h`` ``[N, T, H]`` (what the LM head reads), the head
weight ``W`` ``[V, H]`` and optional bias ``b``, and labels ``[N, T]`` (-100 where not scored). For a
chunk of sequences at a time, on the SCORED positions only (prompt and padding cost nothing):

    z_t      = W h_{t-1} + b                                  (float32, one chunk: [n_scored, V])
    lse_t    = logsumexp_v z_t,v
    log p_t  = z_t,y_t - lse_t                                (as logps.token_logps)
    s_i      = sum_{t in M_i} log p_t       or   s_i / |M_i|  (as logps.sequence_logps)
    L_c      = (n_c / n) * objective(s of the chunk, ...)     (the SAME registered function)
    g_i      = dL_c / ds_i                                    (autograd over the objective, [chunk])
    dL/dz_t  = g_i [/ |M_i|] * (onehot(y_t) - softmax(z_t))   (written into z's buffer, in place)
    dL/dh_{t-1} = dL/dz_t W ,   dL/dW += dL/dz^T h ,   dL/db += sum_t dL/dz_t

so the chunk's logits are dropped before the next chunk starts. The gradients are computed in the
forward pass and an autograd Function hands them back, scaled by the incoming gradient, in backward
(Liger-Kernel's ``LigerFusedLinearPreferenceBase`` does the same with ``torch.func``; here the
log-softmax derivative is applied by hand so that one float32 buffer per chunk is all it holds).

Why the chunk sum is exact: every registered objective's loss is a batch MEAN of per-example terms,
``L = (1/n) sum_i l_i`` (plus ``alpha * mean(chosen_nll)`` for CPO/ORPO), so called on a chunk of
``n_c`` examples it returns ``(1/n_c) sum_{i in c} l_i`` and ``sum_c (n_c/n) L_c = L``. The batch-level
pieces are fed so that this stays true:

- the behaviour-cloning NLL of CPO/ORPO is the token mean over the whole batch,
  ``-sum_i s_i / sum_i |y_i|`` (``logps.token_mean_nll``); each chunk gets the per-sequence values
  ``v_i = -s_i * n / sum_j |y_j|`` (the denominator counted from the labels up front), whose chunk
  mean weighted by ``n_c / n`` sums to exactly that;
- KTO's reference point ``z0 = max(0, mean_j [log pi(y'_j|x_j) - log pi_ref(y'_j|x_j)])`` is a
  statistic of the WHOLE batch's mismatched (KL) rows and is detached (``kto.kto_reference_point``).
  A first chunked pass computes the KL rows' policy log-probs without gradients; every chunk's
  ``kto_loss`` call then receives the full batch's KL log-probs, so each computes the same batch
  ``z0`` (never a per-chunk estimate) and no gradient reaches the KL rows, as in the naive path.

Batch layout, as :func:`tunegraph.training.preference.make_preference_step` concatenates it: rows
``[0, n)`` are the chosen responses (KTO: the completions) and rows ``[n, 2n)`` the rejected ones
(KTO: prompt i with another row's completion, for z0). ``reference`` is the pair of reference
log-prob tensors the objective takes for those two halves, each ``[n]``.

Precision: logits are computed in the inputs' dtype, as the LM head would, and upcast to float32
before the log-softmax (as ``logps.token_logps`` does). With bf16 inputs the logits' gradient is
rounded to bf16 for the two matmuls (as autograd's backward through ``.float()`` does), and the
weight and bias gradients are ACCUMULATED across chunks in float32, then cast to the weight's dtype.

The first half of this file is the chunked LM head shared with
:mod:`tunegraph.kernels.fused_linear_policy_loss` (GRPO/DAPO); the second half the preference op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from tunegraph.training.chat_encoding import IGNORE_INDEX
from tunegraph.training.objectives import Objective, PreferenceLoss, get_objective

# rows of float32 logits per logsumexp call: the call allocates temporaries of its input's size,
# so it runs over slices of ~64 MiB instead of over the whole chunk
_LSE_ELEMENTS = 2**24


# ---------------------------------------------------------------------------------------------------
# The chunked LM head: log-probs of scored tokens from hidden states, and their backward.
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScoredTokens:
    """The labelled positions of some rows of ``labels`` ``[N, T]``, flattened to ``n`` tokens."""

    rows: torch.Tensor       # [n] row of the batch each token belongs to
    positions: torch.Tensor  # [n] position t - 1 of the hidden state that predicts label t
    targets: torch.Tensor    # [n] the label (token id)
    sequence: torch.Tensor   # [n] index of its row within the chunk, 0 .. len(chunk rows) - 1
    counts: torch.Tensor     # [chunk rows] scored tokens per row
    width: int               # T - 1 positions per row

    def per_position(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` ``[n]`` laid out as ``[chunk rows, T - 1]``, 0 where not scored (``token_logps``'s
        layout, so row sums reduce in the same order as the naive path's ``.sum(-1)``)."""
        dense = values.new_zeros(self.counts.shape[0], self.width)
        return dense.index_put_((self.sequence, self.positions), values)


def scored_tokens(labels: torch.Tensor, rows: torch.Tensor) -> ScoredTokens:
    """Where ``labels[rows]`` are scored: label t is predicted from position t - 1, label 0 never."""
    targets = labels[rows, 1:]
    mask = targets != IGNORE_INDEX
    sequence, positions = mask.nonzero(as_tuple=True)
    return ScoredTokens(rows[sequence], positions, targets[sequence, positions], sequence, mask.sum(-1),
                        labels.shape[1] - 1)


def check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor) -> None:
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not align as "
                         f"[batch, seq, hidden] and [batch, seq]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"LM-head weight {tuple(weight.shape)} is not [vocab, {hidden.shape[2]}]")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"LM-head bias {tuple(bias.shape)} is not [{weight.shape[0]}]")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden states are {hidden.dtype} but the LM-head weight is {weight.dtype}")


def check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


class ChunkedLinearHead:
    """``log p(label | h)`` under the head ``(W, b)`` for a chunk of tokens at a time, and the
    gradients of a loss of those log-probs w.r.t. ``h``, ``W`` and ``b``, accumulated chunk by chunk.

    Which gradients it computes: those of the tensors that require grad, and none when grad mode
    is off (a frozen or LoRA-wrapped head costs no weight-gradient matmul)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        grad_on = torch.is_grad_enabled()
        self.grad_hidden = torch.zeros_like(hidden) if grad_on and hidden.requires_grad else None
        self.grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                            if grad_on and weight.requires_grad else None)
        self.grad_bias = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                          if grad_on and bias is not None and bias.requires_grad else None)

    @property
    def needs_grad(self) -> bool:
        return any(g is not None for g in (self.grad_hidden, self.grad_weight, self.grad_bias))

    def logits(self, tokens: ScoredTokens) -> torch.Tensor:
        """float32 ``[n, V]`` logits of the scored tokens (the one large buffer of a chunk)."""
        h = self.hidden[tokens.rows, tokens.positions].detach()
        return F.linear(h, self.weight.detach(), None if self.bias is None else self.bias.detach()).float()

    @staticmethod
    def token_logps(logits: torch.Tensor, tokens: ScoredTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p_t, lse_t)``, both float32 ``[n]``."""
        rows_per_slice = max(1, _LSE_ELEMENTS // max(1, logits.shape[1]))
        lse = torch.cat([torch.logsumexp(part, dim=-1) for part in logits.split(rows_per_slice)]) \
            if logits.shape[0] else logits.new_zeros(0)
        picked = logits.gather(1, tokens.targets.unsqueeze(1)).squeeze(1)
        return picked - lse, lse

    def backward_(self, logits: torch.Tensor, lse: torch.Tensor, tokens: ScoredTokens,
                  grad_logps: torch.Tensor) -> None:
        """Accumulate the gradients of a loss with ``dL/dlog p_t = grad_logps``; overwrites ``logits``
        with ``dL/dz = g (onehot(y) - softmax(z))``."""
        grad = logits.sub_(lse.unsqueeze(1)).exp_().mul_(-grad_logps.unsqueeze(1))
        grad.scatter_add_(1, tokens.targets.unsqueeze(1), grad_logps.unsqueeze(1))
        if self.grad_bias is not None:
            self.grad_bias.add_(grad.sum(0))
        # bf16: the same rounding autograd applies going back through ``.float()`` of bf16 logits
        grad = grad.to(self.hidden.dtype)
        if self.grad_hidden is not None:
            self.grad_hidden.index_put_((tokens.rows, tokens.positions), grad @ self.weight.detach())
        if self.grad_weight is not None:
            h = self.hidden[tokens.rows, tokens.positions].detach()
            if grad.dtype == torch.float32:
                self.grad_weight.addmm_(grad.t(), h)
            else:  # bf16/fp16 matmul (tensor cores), float32 accumulation across chunks
                self.grad_weight.add_(grad.t() @ h)

    def gradients(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(dL/dh, dL/dW, dL/db)`` in the inputs' dtypes; None for what needs none."""
        grad_weight = None if self.grad_weight is None else self.grad_weight.to(self.weight.dtype)
        grad_bias = None if self.grad_bias is None else self.grad_bias.to(self.bias.dtype)
        return self.grad_hidden, grad_weight, grad_bias


class _PrecomputedGradients(torch.autograd.Function):
    """``loss(hidden, weight, bias)`` whose gradients were computed during the chunked forward pass;
    backward only scales them by the incoming gradient (the loss is a scalar)."""

    @staticmethod
    def forward(ctx, loss_value, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss_value.clone()

    @staticmethod
    @once_differentiable  # the stored gradients are constants: no double backward
    def backward(ctx, grad_output):
        scale = None if bool(grad_output == 1) else grad_output  # the usual case costs no copy
        grads = [g if g is None or scale is None else g * scale.to(g.dtype) for g in ctx.saved_tensors]
        return (None, *grads, None, None, None)


def attach_gradients(loss_value: torch.Tensor, head: ChunkedLinearHead) -> torch.Tensor:
    """``loss_value`` as a differentiable function of the head's inputs, with the head's gradients."""
    if not head.needs_grad:
        return loss_value
    return _PrecomputedGradients.apply(loss_value, head.hidden, head.weight, head.bias, *head.gradients())


def chunk_rows(n: int, chunk_size: int):
    """``(start, stop)`` of each chunk of ``n`` examples."""
    for start in range(0, n, chunk_size):
        yield start, min(n, start + chunk_size)


@torch.no_grad()
def fused_linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                             bias: torch.Tensor | None = None,
                             chunk_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``logps.token_logps`` of the LM head's logits without materializing them (no gradients):
    ``(log p_t, mask)``, both ``[N, T - 1]``, 0 where not scored. For reference / old-policy values."""
    check_head(hidden, weight, bias, labels)
    check_chunk_size(chunk_size)
    head = ChunkedLinearHead(hidden, weight, bias)
    parts = []
    for start, stop in chunk_rows(labels.shape[0], chunk_size):
        tokens = scored_tokens(labels, torch.arange(start, stop, device=labels.device))
        parts.append(tokens.per_position(head.token_logps(head.logits(tokens), tokens)[0]))
    return torch.cat(parts), labels[:, 1:] != IGNORE_INDEX


def _sequence_sums(tokens: ScoredTokens, token_logps: torch.Tensor) -> torch.Tensor:
    # a sequential index_add_ would accumulate ~|y| roundings into sums of magnitude |y| log V
    return tokens.per_position(token_logps).sum(-1)


def _check_countable(counts: torch.Tensor) -> None:
    if bool((counts == 0).any()):  # the same condition and message as logps.sequence_logps
        raise ValueError("a sequence has no labelled tokens; its average log-prob is undefined "
                         "(was the completion truncated away?)")


@torch.no_grad()
def fused_linear_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, average: bool, *,
                                bias: torch.Tensor | None = None,
                                chunk_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``logps.sequence_logps`` of the LM head's logits without materializing them (no gradients):
    ``(logps [N], n_tokens [N])``. For reference log-probs and KTO's KL rows."""
    check_head(hidden, weight, bias, labels)
    check_chunk_size(chunk_size)
    head = ChunkedLinearHead(hidden, weight, bias)
    sums, counts = [], []
    for start, stop in chunk_rows(labels.shape[0], chunk_size):
        tokens = scored_tokens(labels, torch.arange(start, stop, device=labels.device))
        sums.append(_sequence_sums(tokens, head.token_logps(head.logits(tokens), tokens)[0]))
        counts.append(tokens.counts)
    logps, n_tokens = torch.cat(sums), torch.cat(counts)
    if average:
        _check_countable(n_tokens)
        logps = logps / n_tokens
    return logps, n_tokens


# ---------------------------------------------------------------------------------------------------
# The preference op.
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Batch:
    """What the chunks share: the objective, its batch-level inputs, where the halves start."""

    objective: Objective
    n: int  # pairs, or unpaired completions
    labels: torch.Tensor
    reference: tuple[torch.Tensor, torch.Tensor] | None
    desirable: torch.Tensor | None
    kl_logps: torch.Tensor | None  # KTO: policy log-probs of the KL rows, whole batch, detached
    nll_scale: torch.Tensor | None  # CPO/ORPO: n / (scored tokens of all chosen rows)
    hyperparameters: Mapping[str, float]


def _check_preference_inputs(objective: Objective, hidden: torch.Tensor, reference, desirable) -> int:
    if hidden.shape[0] == 0 or hidden.shape[0] % 2:
        raise ValueError(f"{objective.name}: hidden states need a positive, even number of rows (first half chosen/"
                         f"completions, second half rejected/KL rows), got {hidden.shape[0]}")
    n = hidden.shape[0] // 2
    if objective.needs_reference:
        if reference is None or len(reference) != 2 or any(r.shape != (n,) for r in reference):
            raise ValueError(f"{objective.name} needs reference log-probs: a pair of [{n}] tensors")
    if objective.batch == "unpaired" and (desirable is None or desirable.shape != (n,)):
        raise ValueError(f"{objective.name} needs ``desirable``: a bool [{n}] tensor")
    return n


def _chunk_objective(batch: _Batch, start: int, stop: int, logps: torch.Tensor,
                     counts: torch.Tensor) -> PreferenceLoss:
    """The registered objective on examples [start, stop): ``logps`` holds the chunk's first-half
    log-probs followed (pairs only) by its second-half ones; ``counts`` their scored tokens."""
    objective, c = batch.objective, stop - start
    if objective.batch == "unpaired":
        return objective.fn(logps, batch.reference[0][start:stop], batch.desirable[start:stop],
                            batch.kl_logps, batch.reference[1], **batch.hyperparameters)
    args = [logps[:c], logps[c:]]
    if objective.needs_reference:
        args += [batch.reference[0][start:stop], batch.reference[1][start:stop]]
    if objective.needs_chosen_nll:
        sums = logps[:c] * counts[:c] if objective.average_logps else logps[:c]
        args.append(-sums * batch.nll_scale)  # per-sequence values whose batch mean is token_mean_nll
    return objective.fn(*args, **batch.hyperparameters)


def _run_chunk(head: ChunkedLinearHead, batch: _Batch, start: int, stop: int) -> PreferenceLoss:
    """Forward and backward of one chunk; returns the objective's result weighted by ``n_c / n``."""
    rows = torch.arange(start, stop, device=batch.labels.device)
    if batch.objective.batch == "pairs":
        rows = torch.cat([rows, rows + batch.n])  # a pair's chosen and rejected stay together
    tokens = scored_tokens(batch.labels, rows)
    logits = head.logits(tokens)
    token_logps, lse = head.token_logps(logits, tokens)
    logps = _sequence_sums(tokens, token_logps)
    if batch.objective.average_logps:
        _check_countable(tokens.counts)
        logps = logps / tokens.counts
    weight = (stop - start) / batch.n
    with torch.enable_grad():
        leaf = logps.requires_grad_(head.needs_grad)
        result = _chunk_objective(batch, start, stop, leaf, tokens.counts)
        loss = result.loss * weight
        if head.needs_grad:
            (grad_logps,) = torch.autograd.grad(loss, leaf)
            grad_tokens = grad_logps[tokens.sequence]
            if batch.objective.average_logps:
                grad_tokens = grad_tokens / tokens.counts[tokens.sequence]
            head.backward_(logits, lse, tokens, grad_tokens)
    return PreferenceLoss(loss.detach(), result.chosen_rewards, result.rejected_rewards,
                          {name: value * weight for name, value in result.metrics.items()})


def fused_linear_preference_loss(objective: str | Objective, hidden: torch.Tensor, weight: torch.Tensor,
                                 labels: torch.Tensor, *, bias: torch.Tensor | None = None,
                                 reference: tuple[torch.Tensor, torch.Tensor] | None = None,
                                 desirable: torch.Tensor | None = None,
                                 hyperparameters: Mapping[str, float] | None = None,
                                 chunk_size: int = 1) -> PreferenceLoss:
    """The registered ``objective`` on the log-probs of ``F.linear(hidden, weight, bias)``, chunked.

    ``hidden`` ``[2n, T, H]`` and ``labels`` ``[2n, T]`` (first half chosen / completions, second half
    rejected / KL rows; see the module docstring); ``reference`` the objective's two ``[n]`` reference
    log-prob tensors when it needs them; ``desirable`` bool ``[n]`` for KTO; ``hyperparameters`` the
    objective's keyword arguments (beta, ...); ``chunk_size`` examples (pairs for paired objectives)
    per chunk. Returns the objective's :class:`PreferenceLoss` for the whole batch: ``loss``
    differentiable w.r.t. ``hidden``, ``weight`` and ``bias``, rewards concatenated over chunks in
    batch order, metrics (batch means) combined with weights ``n_c / n``.
    """
    objective = get_objective(objective) if isinstance(objective, str) else objective
    check_head(hidden, weight, bias, labels)
    check_chunk_size(chunk_size)
    n = _check_preference_inputs(objective, hidden, reference, desirable)
    kl_logps = nll_scale = None
    if objective.batch == "unpaired":
        kl_logps, _ = fused_linear_sequence_logps(hidden[n:], weight, labels[n:], objective.average_logps,
                                                  bias=bias, chunk_size=chunk_size)
    if objective.needs_chosen_nll:
        nll_scale = n / (labels[:n, 1:] != IGNORE_INDEX).sum().clamp(min=1)
    batch = _Batch(objective, n, labels, reference, None if desirable is None else desirable.to(torch.bool),
                   kl_logps, nll_scale, dict(hyperparameters or {}))
    head = ChunkedLinearHead(hidden, weight, bias)
    parts = [_run_chunk(head, batch, start, stop) for start, stop in chunk_rows(n, chunk_size)]
    loss = torch.stack([part.loss for part in parts]).sum()
    metrics = {name: torch.stack([part.metrics[name] for part in parts]).sum() for name in parts[0].metrics}
    return PreferenceLoss(attach_gradients(loss, head), torch.cat([p.chosen_rewards for p in parts]),
                          torch.cat([p.rejected_rewards for p in parts]), metrics)
