"""The LM-head half of ``kernels: true``: a causal LM's final hidden states and its head, for the fused losses.

The fused losses of :mod:`tunegraph.kernels` take what the LM head reads and the head itself instead of
its output: the final hidden states ``h`` ``[B, T, H]`` and ``(W, b)``, never the logits
``z = W h + b`` ``[B, T, V]`` (plus their log-softmax and gradient, in float32), which at a 49k-256k
vocabulary are the largest tensors of a training step.

Hidden states come from the model's own forward with ``output_hidden_states=-1`` (transformers keeps
only the last one, which it ties to the final norm's output: exactly what the head reads) and
``logits_to_keep=1`` (the head runs on one position, a ``[B, 1, V]`` by-product). Going through the
top-level forward rather than the inner decoder keeps every wrapper in the path: peft's LoRA, DoRA and
IA3 layers sit inside the decoder, and prefix, prompt and p-tuning add their virtual tokens in the
``PeftModel``'s forward (prompt and p-tuning prepend them to the sequence, so their hidden states are
cut off here, as :func:`~tunegraph.training.strategies.peft_methods.align_prompt_logits` cuts their
logits). NEFTune's noise hook on the input embeddings fires as usual.

The head is ``model.get_output_embeddings()``: its weight may be tied to the input embeddings (the same
Parameter, so under full fine-tuning the head's gradient still reaches it), and Gemma's
``final_logit_softcapping`` ``c`` (``z -> c tanh(z / c)``) is applied by the cross-entropy op. A head
that is itself adapted (``lm_head`` in LoRA's target modules or peft's ``modules_to_save``) or quantized
is refused: the fused ops read one plain weight matrix, and folding an adapter into it would be wrong
under LoRA dropout and would cost a ``V x H`` copy per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tunegraph.errors import StageError
from tunegraph.training.chat_encoding import IGNORE_INDEX


@dataclass(frozen=True)
class LMHead:
    """What the fused losses need of a causal LM's output layer."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    softcap: float | None  # Gemma's final_logit_softcapping


def _config(model: nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def lm_head(model: nn.Module) -> LMHead:
    """The output layer of ``model`` (or of the model a PeftModel wraps); ``ValueError`` if it is not a
    plain ``nn.Linear`` (adapted, wrapped or quantized)."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:  # peft's lora.Linear / ModulesToSaveWrapper, bitsandbytes' Linear4bit
        kind = type(head)
        raise ValueError(f"the LM head is a {kind.__module__}.{kind.__qualname__}, not a plain torch.nn.Linear")
    softcap = getattr(_config(model), "final_logit_softcapping", None)
    return LMHead(head.weight, head.bias, float(softcap) if softcap else None)


def check_fused_head(model: nn.Module, stage: str, *, softcap_supported: bool = True) -> LMHead:
    """Refuse, before training starts, a model whose head the fused losses cannot read."""
    try:
        head = lm_head(model)
    except ValueError as error:
        raise StageError(f"stage {stage!r}: kernels: true fuses the loss with the LM head, but {error}: the head is "
                         f"adapted (lm_head in lora.target_modules?). Leave lm_head out of the adapter, or set "
                         f"kernels: false") from None
    if head.softcap is not None and not softcap_supported:
        raise StageError(f"stage {stage!r}: kernels: true has no fused loss with final_logit_softcapping="
                         f"{head.softcap} for this objective (only sft has one); set kernels: false")
    return head


def final_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The hidden states the LM head reads, ``[B, T, H]``, aligned with ``input_ids`` ``[B, T]``."""
    extra = {} if position_ids is None else {"position_ids": position_ids}
    output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=-1, logits_to_keep=1,
                   use_cache=False, **extra)
    hidden = output.hidden_states[-1]
    # prompt / p-tuning: the virtual tokens come first
    return hidden[:, hidden.shape[1] - input_ids.shape[1]:]


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``model(**batch).loss`` without the logits: next-token cross-entropy, mean over labelled tokens.

    As transformers' ``ForCausalLMLoss``: the labels move one position left (label ``t + 1`` is
    predicted at position ``t``; the last position predicts nothing) and
    ``L = -(1/|M|) sum_{t in M} log softmax(softcap(W h_t + b))[y_{t+1}]`` over the labelled set ``M``.
    Only the labelled rows reach the fused op, so prompt and padding cost no logits at all.
    """
    from tunegraph.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy  # imports triton

    head = lm_head(model)
    # a packed batch (tunegraph.training.packing) has position ids and no attention mask
    hidden = final_hidden_states(model, batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    scored = targets != IGNORE_INDEX
    if not bool(scored.any()):  # nothing to learn in this batch; keep the graph, as the full loss would
        return hidden.sum() * 0.0
    return fused_linear_cross_entropy(hidden[scored], head.weight, targets[scored], head.bias,
                                      ignore_index=IGNORE_INDEX, softcap=head.softcap)


@torch.no_grad()
def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor], average: bool) -> torch.Tensor:
    """``objectives.sequence_logps`` of the model's logits on ``batch``, from the head's input in chunks
    (no gradients: reference log-probs)."""
    from tunegraph.kernels.fused_linear_preference import fused_linear_sequence_logps

    head = lm_head(model)
    hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
    return fused_linear_sequence_logps(hidden, head.weight, batch["labels"], average, bias=head.bias)[0]


@torch.no_grad()
def token_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``objectives.token_logps`` of the model's logits, ``[B, T - 1]`` (0 where not scored), from the head's
    input in chunks (no gradients: reference and old-policy log-probs)."""
    from tunegraph.kernels.fused_linear_preference import fused_linear_token_logps

    head = lm_head(model)
    hidden = final_hidden_states(model, input_ids, attention_mask, position_ids)
    return fused_linear_token_logps(hidden, head.weight, labels, bias=head.bias)[0]
