"""Training on preference pairs (DPO, IPO, SimPO, CPO, ORPO) and unpaired feedback (KTO).

Each step runs the policy once over chosen and rejected (or completion and mismatched-KL)
sequences concatenated into one batch, turns logits into per-sequence log-probs
(:func:`~tunegraph.training.objectives.logps.sequence_logps`), and hands them to the objective.

Reference log-probs are computed ONCE, before the first update, with the initial policy in eval
mode: the reference model of DPO/IPO/KTO *is* the initial policy, so no second copy of the model
is ever held (with LoRA the initial policy equals the base because B = 0; with full fine-tuning
the values are simply cached). This is TRL's ``precompute_ref_log_probs``.

With ``kernels: true`` (``fused=True``) both the policy's loss and the reference log-probs are computed
from the LM head's input without materializing the logits (:mod:`tunegraph.training.fused_head`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunegraph.context import StageContext
from tunegraph.errors import StageError
from tunegraph.training import fused_head
from tunegraph.training.chat_encoding import EncodedExample, encode_chat
from tunegraph.training.loop import StepOutput, collate
from tunegraph.training.objectives import Objective, PreferenceLoss, sequence_logps, token_mean_nll

REFERENCE_BATCH = 16


@dataclass(frozen=True)
class PreferenceData:
    """Encoded sequences: ``first[i]`` is chosen (pairs) or the completion (unpaired); ``second[i]`` is
    rejected (pairs) or prompt i with another row's completion, for KTO's KL estimate (unpaired)."""

    first: list[EncodedExample]
    second: list[EncodedExample]
    desirable: torch.Tensor | None  # unpaired only: bool [n]


def _with_reply(messages: list[dict], reply: str) -> list[dict]:
    return messages[:-1] + [{"role": "assistant", "content": reply}]


def encode_preference_rows(tokenizer, rows: list[dict], objective: Objective, max_length: int,
                           ctx: StageContext) -> PreferenceData:
    need = "rejected" if objective.batch == "pairs" else "label"
    missing = next((row for row in rows if need not in row), None)
    if missing is not None:
        wanted = ("preference pairs (prompt/chosen/rejected; load_dataset format: preference)"
                  if need == "rejected" else "unpaired feedback (prompt/completion/label; load_dataset format: unpaired)")
        raise StageError(f"stage {ctx.stage!r}: dataset row {missing['id']!r} has no {need!r}; "
                         f"{objective.name.upper()} needs {wanted}")
    first = [encode_chat(tokenizer, row["messages"], max_length, row["id"]) for row in rows]
    if objective.batch == "pairs":
        second = [encode_chat(tokenizer, _with_reply(row["messages"], row["rejected"]), max_length, row["id"])
                  for row in rows]
        return PreferenceData(first, second, None)
    if len(rows) < 2:
        raise StageError(f"stage {ctx.stage!r}: KTO needs at least 2 rows (its KL term pairs each prompt with "
                         f"another row's completion)")
    shifted = [_with_reply(row["messages"], rows[(i + 1) % len(rows)]["messages"][-1]["content"])
               for i, row in enumerate(rows)]
    second = [encode_chat(tokenizer, messages, max_length, row["id"]) for row, messages in zip(rows, shifted)]
    return PreferenceData(first, second, torch.tensor([bool(row["label"]) for row in rows]))


@torch.no_grad()
def reference_logps(model, examples: list[EncodedExample], pad_id: int, average: bool,
                    fused: bool = False) -> torch.Tensor:
    """Per-sequence log-probs under the model as it is now (eval mode), in batches; ``fused``: from the LM
    head's input, without the logits (``kernels: true``)."""
    was_training = model.training
    model.eval()
    values = []
    for start in range(0, len(examples), REFERENCE_BATCH):
        batch = collate(examples[start:start + REFERENCE_BATCH], pad_id)
        if fused:
            values.append(fused_head.sequence_logps(model, batch, average))
            continue
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        values.append(sequence_logps(logits, batch["labels"], average)[0])
    model.train(was_training)
    return torch.cat(values)


def _mean(values: torch.Tensor) -> float:
    return float(values.float().mean()) if values.numel() else 0.0


def _fused_objective(model, objective: Objective, batch: dict[str, torch.Tensor], hyper: dict,
                     reference: tuple[torch.Tensor, torch.Tensor] | None,
                     desirable: torch.Tensor | None) -> PreferenceLoss:
    """The objective on the policy's log-probs, fused with the LM head (``kernels: true``): the same loss,
    rewards and metrics as the logits path, with no ``[2n, T, V]`` logits (see
    :mod:`tunegraph.kernels.fused_linear_preference`)."""
    from tunegraph.kernels.fused_linear_preference import fused_linear_preference_loss

    head = fused_head.lm_head(model)
    hidden = fused_head.final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
    return fused_linear_preference_loss(objective, hidden, head.weight, batch["labels"], bias=head.bias,
                                        reference=reference, desirable=desirable, hyperparameters=hyper)


def make_preference_step(objective: Objective, data: PreferenceData, hyper: dict, pad_id: int,
                         reference: tuple[torch.Tensor, torch.Tensor] | None, fused: bool = False):
    """The loop's step function for ``objective``: one forward over first+second, then the loss
    (``fused``: from the LM head's input, without the logits)."""

    def step(model, indices: list[int]) -> StepOutput:
        n = len(indices)
        batch = collate([data.first[i] for i in indices] + [data.second[i] for i in indices], pad_id)
        index = torch.tensor(indices)
        if fused:
            result = _fused_objective(model, objective, batch, hyper,
                                      None if reference is None else (reference[0][index], reference[1][index]),
                                      None if data.desirable is None else data.desirable[index])
            return _step_output(objective, result, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps, n_tokens = sequence_logps(logits, batch["labels"], objective.average_logps)
        first, second = logps[:n], logps[n:]
        if objective.batch == "unpaired":
            result = objective.fn(first, reference[0][index], data.desirable[index], second, reference[1][index],
                                  **hyper)
        else:
            args = [first, second]
            if objective.needs_reference:
                args += [reference[0][index], reference[1][index]]
            if objective.needs_chosen_nll:
                sums = first * n_tokens[:n] if objective.average_logps else first
                args.append(token_mean_nll(sums, n_tokens[:n]))
            result = objective.fn(*args, **hyper)
        return _step_output(objective, result, batch)

    return step


def _step_output(objective: Objective, result: PreferenceLoss, batch: dict[str, torch.Tensor]) -> StepOutput:
    metrics = {"reward_chosen": _mean(result.chosen_rewards), "reward_rejected": _mean(result.rejected_rewards),
               **{k: float(v) for k, v in result.metrics.items()}}
    if objective.batch == "pairs":
        metrics["reward_margin"] = _mean(result.chosen_rewards - result.rejected_rewards)
        metrics["reward_accuracy"] = _mean((result.chosen_rewards > result.rejected_rewards).float())
    return StepOutput(result.loss, int(batch["attention_mask"].sum()), metrics)
