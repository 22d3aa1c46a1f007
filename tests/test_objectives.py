"""Preference objectives: equivalence with TRL 1.16, ``sequence_logps`` by hand, gradient sanity.

TRL's losses are methods that read trainer attributes. Each is called unbound on a stand-in
``self`` carrying exactly the attributes the method reads (see the TRL source named in each test).
DPO and KTO have no standalone loss method in TRL 1.16: the loss is inline in ``_compute_loss``,
which calls the model; a fake model returns per-token log-probs (the fused LM head's output) whose
row sums are the sequence log-probs, and reference log-probs come in precomputed.

Tolerance: everything is float32 (eps 1.2e-7) with |values| up to ~50. Our functions and TRL
evaluate the same formulas, sometimes with operations reassociated (``beta*(d - g/beta)`` vs
``beta*d - g``, ``(a - b)/n`` vs ``a/n - b/n``), which moves results by a few ulp: ~1e-6 absolute.
``rtol=1e-5, atol=1e-6`` (~100 ulp) admits that and nothing else: a wrong sign, factor or
normalization changes the result by O(0.01-1).
"""

from __future__ import annotations

import math
import os
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from tunegraph.training.objectives import (
    OBJECTIVES,
    PreferenceLoss,
    cpo_loss,
    dpo_loss,
    get_objective,
    ipo_loss,
    kto_loss,
    orpo_loss,
    sequence_logps,
    simpo_loss,
    token_mean_nll,
)
from tunegraph.training.objectives.orpo import log1mexp

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_kto = pytest.importorskip("trl.trainer.kto_trainer")
trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")

TOL = {"rtol": 1e-5, "atol": 1e-6}
BATCH = 5


def close(actual, expected) -> None:
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), **TOL)


class FakeAccelerator:
    """What the TRL methods read from ``self.accelerator`` on a single CPU process."""

    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def unwrap_model(model):
        return model


def summed_logps(generator: torch.Generator, n: int = BATCH) -> torch.Tensor:
    """Random summed sequence log-probs in [-42, -2]."""
    return -(torch.rand(n, generator=generator) * 40 + 2)


def average_logps(generator: torch.Generator, n: int = BATCH) -> torch.Tensor:
    """Random per-token average log-probs in [-2.5, -0.05] (ORPO needs them < 0)."""
    return -(torch.rand(n, generator=generator) * 2.45 + 0.05)


# ---------------------------------------------------------------------------------------------
# DPO / IPO through DPOTrainer._compute_loss


class FusedOutputs(types.SimpleNamespace):
    """The fields of TRL's ``FusedCausalLMOutput`` that ``_compute_loss`` reads."""


def fused_outputs(per_token: torch.Tensor) -> FusedOutputs:
    return FusedOutputs(log_probs=per_token, entropy=torch.zeros_like(per_token),
                        mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(per_token, dtype=torch.bool),
                        log_sum_sq_probs=None, aux_loss=None)


def per_token_table(logps: torch.Tensor, shift_mask: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs on the labelled positions of ``shift_mask`` whose row sums are ``logps``
    (uneven split; 0 elsewhere, as the fused LM head returns them)."""
    weights = shift_mask * torch.arange(1, shift_mask.size(1) + 1, dtype=torch.float32)
    return logps[:, None] * weights / weights.sum(1, keepdim=True)


def dpo_batch(generator: torch.Generator, width: int = 9):
    """A DPO batch: [chosen; rejected] rows, 2-token prompts, completions of 1..width-2 tokens."""
    lengths = torch.randint(1, width - 1, (2 * BATCH,), generator=generator)
    positions = torch.arange(width)
    completion_mask = ((positions >= 2) & (positions < 2 + lengths[:, None])).long()
    table = per_token_table(summed_logps(generator, 2 * BATCH), completion_mask[:, 1:].float())
    inputs = {
        "input_ids": torch.randint(3, 50, (2 * BATCH, width), generator=generator),
        "attention_mask": torch.ones(2 * BATCH, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": summed_logps(generator),
        "ref_rejected_logps": summed_logps(generator),
    }
    return inputs, table, table.sum(1), lengths  # row sums: what TRL sums, bit for bit


def trl_dpo_compute_loss(inputs, per_token, *, loss_type: str, beta: float, label_smoothing: float = 0.0):
    """Run ``DPOTrainer._compute_loss`` on a stand-in ``self``; returns (loss, logged metrics)."""
    stand_in = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=FakeAccelerator(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
    )

    def model(**kwargs):
        assert kwargs["fused_lm_head"] is True
        return fused_outputs(per_token)

    loss = trl_dpo.DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in stand_in._metrics["train"].items()}


def select_pairs(inputs, per_token, rows):
    """The sub-batch of pairs ``rows`` (the chosen row i and its rejected row BATCH + i)."""
    both = list(rows) + [BATCH + i for i in rows]
    picked = {k: inputs[k][both] for k in ("input_ids", "attention_mask", "completion_mask")}
    picked |= {k: inputs[k][list(rows)] for k in ("ref_chosen_logps", "ref_rejected_logps")}
    return picked, per_token[both]


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5, 2.0])
def test_dpo_matches_trl_sigmoid(beta):
    generator = torch.Generator().manual_seed(1)
    inputs, per_token, logps, _ = dpo_batch(generator)
    chosen, rejected = logps.chunk(2)
    ours = dpo_loss(chosen, rejected, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], beta=beta)
    trl_loss, metrics = trl_dpo_compute_loss(inputs, per_token, loss_type="sigmoid", beta=beta)
    close(ours.loss, trl_loss)
    close(ours.chosen_rewards.mean(), metrics["rewards/chosen"])
    close(ours.rejected_rewards.mean(), metrics["rewards/rejected"])
    # TRL logs only batch means; one-pair batches give its per-example loss and rewards
    for i in range(BATCH):
        one_inputs, one_table = select_pairs(inputs, per_token, [i])
        one_loss, one_metrics = trl_dpo_compute_loss(one_inputs, one_table, loss_type="sigmoid", beta=beta)
        single = dpo_loss(chosen[i:i + 1], rejected[i:i + 1], inputs["ref_chosen_logps"][i:i + 1],
                          inputs["ref_rejected_logps"][i:i + 1], beta=beta)
        close(single.loss, one_loss)
        close(ours.chosen_rewards[i], one_metrics["rewards/chosen"])
        close(ours.rejected_rewards[i], one_metrics["rewards/rejected"])


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_trl_116_dpo_sigmoid_ignores_label_smoothing(beta):
    """Pins a TRL 1.16 behaviour our docstring warns about: DPOConfig(label_smoothing=...) does not
    change the "sigmoid" loss (cDPO is gone from it), so it equals our eps = 0 loss."""
    generator = torch.Generator().manual_seed(2)
    inputs, per_token, logps, _ = dpo_batch(generator)
    chosen, rejected = logps.chunk(2)
    trl_loss, _ = trl_dpo_compute_loss(inputs, per_token, loss_type="sigmoid", beta=beta, label_smoothing=0.2)
    plain = dpo_loss(chosen, rejected, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], beta=beta)
    smoothed = dpo_loss(chosen, rejected, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], beta=beta,
                        label_smoothing=0.2)
    close(plain.loss, trl_loss)
    assert not torch.allclose(smoothed.loss, trl_loss)


def cpo_stand_in(*, loss_type: str, beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
                 cpo_alpha: float = 1.0, forward=None):
    """The attributes ``CPOTrainer.cpo_loss`` and ``get_batch_loss_metrics`` read; ``forward`` stubs
    ``concatenated_forward`` with precomputed (chosen_logps, rejected_logps, logits, logits, nll)."""
    stand_in = types.SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                                     simpo_gamma=simpo_gamma, cpo_alpha=cpo_alpha, accelerator=FakeAccelerator(),
                                     aux_loss_enabled=False, concatenated_forward=lambda model, batch: forward)
    stand_in.cpo_loss = types.MethodType(trl_cpo.CPOTrainer.cpo_loss, stand_in)
    return stand_in


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_cdpo_matches_trl_smoothed_sigmoid(beta, label_smoothing):
    """cDPO (eps > 0) has no DPOTrainer path in TRL 1.16. TRL's ``CPOTrainer.cpo_loss(loss_type=
    "sigmoid")`` computes ``-(1-eps) logsigmoid(beta z) - eps logsigmoid(-beta z)`` with
    ``z = chosen - rejected``; fed the reference-corrected log-ratios, that is exactly cDPO."""
    generator = torch.Generator().manual_seed(3)
    chosen, rejected, ref_chosen, ref_rejected = (summed_logps(generator) for _ in range(4))
    ours = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, label_smoothing=label_smoothing)
    stand_in = cpo_stand_in(loss_type="sigmoid", beta=beta, label_smoothing=label_smoothing)
    losses, chosen_rewards, rejected_rewards = stand_in.cpo_loss(chosen - ref_chosen, rejected - ref_rejected)
    close(ours.loss, losses.mean())
    close(ours.chosen_rewards, chosen_rewards)
    close(ours.rejected_rewards, rejected_rewards)


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 5.0])
def test_ipo_matches_trl(beta):
    """TRL's IPO divides each summed log-ratio by the completion length; we take average log-probs
    (``average_logps=True``) for policy and reference: the same h. TRL logs rewards from SUMMED
    log-ratios for every loss type, so only the loss is compared with TRL; rewards by formula."""
    generator = torch.Generator().manual_seed(4)
    inputs, per_token, logps, lengths = dpo_batch(generator)
    n_chosen, n_rejected = lengths.float().chunk(2)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
    ours = ipo_loss(chosen / n_chosen, rejected / n_rejected, ref_chosen / n_chosen, ref_rejected / n_rejected,
                    beta=beta)
    trl_loss, metrics = trl_dpo_compute_loss(inputs, per_token, loss_type="ipo", beta=beta)
    close(ours.loss, trl_loss)
    close(ours.chosen_rewards, beta * (chosen - ref_chosen) / n_chosen)
    close(ours.rejected_rewards, beta * (rejected - ref_rejected) / n_rejected)
    close(metrics["rewards/chosen"], (beta * (chosen - ref_chosen)).mean())  # TRL: summed


# ---------------------------------------------------------------------------------------------
# CPO / SimPO through CPOTrainer


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cpo_matches_trl(beta, alpha, label_smoothing):
    generator = torch.Generator().manual_seed(5)
    chosen, rejected = summed_logps(generator), summed_logps(generator)
    nll = torch.rand((), generator=generator) * 3
    ours = cpo_loss(chosen, rejected, nll, beta=beta, alpha=alpha, label_smoothing=label_smoothing)
    logits = torch.zeros(BATCH, 3, 7)
    stand_in = cpo_stand_in(loss_type="sigmoid", beta=beta, label_smoothing=label_smoothing, cpo_alpha=alpha,
                            forward=(chosen, rejected, logits, logits, nll))
    trl_loss, metrics = trl_cpo.CPOTrainer.get_batch_loss_metrics(stand_in, None, {})
    close(ours.loss, trl_loss)
    _, chosen_rewards, rejected_rewards = stand_in.cpo_loss(chosen, rejected)
    close(ours.chosen_rewards, chosen_rewards)
    close(ours.rejected_rewards, rejected_rewards)
    close(ours.chosen_rewards.mean(), metrics["rewards/chosen"])


@pytest.mark.parametrize(("beta", "gamma"), [(0.5, 0.2), (2.0, 0.5), (2.5, 1.6), (10.0, 3.0), (2.0, 0.0)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_matches_trl(beta, gamma, label_smoothing):
    """TRL's SimPO is ``CPOTrainer`` with ``loss_type="simpo"``, ``simpo_gamma=gamma`` and
    ``cpo_alpha=0`` (else the CPO NLL is added); its log-probs are token averages."""
    generator = torch.Generator().manual_seed(6)
    chosen, rejected = average_logps(generator), average_logps(generator)
    ours = simpo_loss(chosen, rejected, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    logits = torch.zeros(BATCH, 3, 7)
    stand_in = cpo_stand_in(loss_type="simpo", beta=beta, label_smoothing=label_smoothing, simpo_gamma=gamma,
                            cpo_alpha=0.0, forward=(chosen, rejected, logits, logits, torch.tensor(0.0)))
    trl_loss, _ = trl_cpo.CPOTrainer.get_batch_loss_metrics(stand_in, None, {})
    close(ours.loss, trl_loss)
    losses, chosen_rewards, rejected_rewards = stand_in.cpo_loss(chosen, rejected)
    close(ours.chosen_rewards, chosen_rewards)
    close(ours.rejected_rewards, rejected_rewards)
    if not label_smoothing:  # and the paper's form, no gamma / beta detour: -log sigmoid(b*avg_w - b*avg_l - g)
        close(losses, -F.logsigmoid(beta * chosen - beta * rejected - gamma))


# ---------------------------------------------------------------------------------------------
# ORPO through ORPOTrainer


@pytest.mark.parametrize("lam", [0.05, 0.1, 0.5, 1.0])
def test_orpo_matches_trl(lam):
    generator = torch.Generator().manual_seed(7)
    chosen, rejected = average_logps(generator), average_logps(generator)
    nll = torch.rand((), generator=generator) * 3
    ours = orpo_loss(chosen, rejected, nll, lam=lam)
    logits = torch.zeros(BATCH, 3, 7)
    stand_in = types.SimpleNamespace(beta=lam, accelerator=FakeAccelerator(), aux_loss_enabled=False,
                                     concatenated_forward=lambda model, batch: (chosen, rejected, logits, logits, nll))
    stand_in.odds_ratio_loss = types.MethodType(trl_orpo.ORPOTrainer.odds_ratio_loss, stand_in)
    trl_loss, metrics = trl_orpo.ORPOTrainer.get_batch_loss_metrics(stand_in, None, {})
    close(ours.loss, trl_loss)
    _, chosen_rewards, rejected_rewards, mean_log_sigmoid, mean_log_odds = stand_in.odds_ratio_loss(chosen, rejected)
    close(ours.chosen_rewards, chosen_rewards)
    close(ours.rejected_rewards, rejected_rewards)
    close(ours.metrics["log_odds"], mean_log_odds)
    close(ours.metrics["log_sigmoid_log_odds"], mean_log_sigmoid)
    # the brief's naive formula, log1p(-exp(l)), agrees away from l = 0
    naive = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    close(ours.loss, nll - lam * F.logsigmoid(naive).mean())


def test_orpo_log1mexp_is_stable_near_zero():
    x = torch.tensor([-1e-7, -1e-3, -0.5, -0.7, -5.0, -50.0])
    expected = torch.log(-torch.expm1(x.double())).float()
    close(log1mexp(x), expected)
    close(log1mexp(x), trl_orpo.log1mexp(x))


# ---------------------------------------------------------------------------------------------
# KTO through KTOTrainer._compute_loss


def trl_kto_compute_loss(inputs, main_table, kl_table, *, beta, desirable_weight, undesirable_weight):
    """Run ``KTOTrainer._compute_loss`` (and the ``_compute_kl_logps`` it calls) on a stand-in."""
    stand_in = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=FakeAccelerator(), calculate_KL=True,
        precompute_ref_logps=True, aux_loss_enabled=False, loss_type="kto", beta=beta,
        desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    stand_in._compute_kl_logps = types.MethodType(trl_kto.KTOTrainer._compute_kl_logps, stand_in)

    def model(**kwargs):
        # the KL (mismatched) batch is told apart by its first token: 2 there, 1 in the main batch
        return fused_outputs(kl_table if int(kwargs["input_ids"][0, 0]) == 2 else main_table)

    loss = trl_kto.KTOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in stand_in._metrics["train"].items()}


def kto_batch(generator: torch.Generator, desirable: list[bool], width: int = 8):
    n = len(desirable)
    positions = torch.arange(width)

    def rows(marker):
        lengths = torch.randint(1, width - 2, (n,), generator=generator)
        completion_mask = ((positions >= 2) & (positions < 2 + lengths[:, None])).long()
        ids = torch.randint(3, 50, (n, width), generator=generator)
        ids[:, 0] = marker
        return ids, completion_mask

    ids, completion_mask = rows(1)
    kl_ids, kl_completion_mask = rows(2)
    main_table = per_token_table(summed_logps(generator, n), completion_mask[:, 1:].float())
    kl_table = per_token_table(summed_logps(generator, n), kl_completion_mask[:, 1:].float())
    logps, kl_logps = main_table.sum(1), kl_table.sum(1)
    inputs = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion_mask,
        "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids), "KL_completion_mask": kl_completion_mask,
        "label": torch.tensor(desirable), "ref_logps": summed_logps(generator, n),
        # reference KL log-probs a little below the policy's on average, so z0 > 0 is exercised
        "ref_KL_logps": kl_logps - torch.rand(n, generator=generator) * 4 + 1,
    }
    return inputs, main_table, kl_table, logps, kl_logps


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
@pytest.mark.parametrize(("desirable_weight", "undesirable_weight"), [(1.0, 1.0), (1.0, 1.33), (0.75, 1.0)])
@pytest.mark.parametrize("desirable", [[True, False, True, True, False], [True] * 5, [False, False, True, False, False]],
                         ids=["mixed", "all-desirable", "mostly-undesirable"])
def test_kto_matches_trl(beta, desirable_weight, undesirable_weight, desirable):
    generator = torch.Generator().manual_seed(8)
    inputs, main_table, kl_table, logps, kl_logps = kto_batch(generator, desirable)
    ours = kto_loss(logps, inputs["ref_logps"], inputs["label"], kl_logps, inputs["ref_KL_logps"], beta=beta,
                    desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    trl_loss, metrics = trl_kto_compute_loss(inputs, main_table, kl_table, beta=beta,
                                             desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    close(ours.loss, trl_loss)
    close(ours.metrics["kl"], metrics["kl"])
    close(ours.chosen_rewards.mean(), metrics["rewards/chosen"])
    if not all(desirable):
        close(ours.rejected_rewards.mean(), metrics["rewards/rejected"])
    else:
        assert ours.rejected_rewards.numel() == 0
    # per-example rewards by the paper's formula
    label = inputs["label"]
    close(ours.chosen_rewards, beta * (logps - inputs["ref_logps"])[label])
    close(ours.rejected_rewards, beta * (logps - inputs["ref_logps"])[~label])


def test_kto_reference_point_is_clamped_and_detached():
    policy = torch.tensor([-10.0, -12.0], requires_grad=True)
    below = kto_loss(policy, policy.detach(), torch.tensor([True, False]), policy, policy.detach() + 1.0)
    assert below.metrics["kl"].item() == 0.0  # mean KL estimate -1 clamps to 0
    above = kto_loss(policy, policy.detach(), torch.tensor([True, False]), policy, policy.detach() - 2.0)
    close(above.metrics["kl"], 2.0)
    assert not above.metrics["kl"].requires_grad


# ---------------------------------------------------------------------------------------------
# sequence_logps


def hand_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool) -> list[float]:
    out = []
    for b in range(labels.size(0)):
        total, count = 0.0, 0
        for t in range(1, labels.size(1)):
            if labels[b, t] != -100:
                total += torch.log_softmax(logits[b, t - 1].double(), dim=-1)[labels[b, t]].item()
                count += 1
        out.append(total / count if average else total)
    return out


def tiny_example():
    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 7, 11, generator=generator) * 3
    labels = torch.randint(0, 11, (3, 7), generator=generator)
    labels[0, :3] = -100  # prompt
    labels[1, [0, 2, 5]] = -100  # scattered
    labels[2, 0] = -100
    labels[2, 6] = -100  # padding at the end
    return logits, labels


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_hand_loop(average):
    logits, labels = tiny_example()
    logps, n_tokens = sequence_logps(logits, labels, average=average)
    assert logps.dtype == torch.float32 and logps.shape == (3,)
    assert n_tokens.tolist() == [4, 4, 5]  # labelled positions t >= 1
    close(logps, hand_logps(logits, labels, average))
    close(logps, trl_orpo.ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=average))


def test_sequence_logps_is_float32_from_bf16():
    logits, labels = tiny_example()
    half = logits.bfloat16()
    logps, _ = sequence_logps(half, labels, average=False)
    assert logps.dtype == torch.float32
    close(logps, hand_logps(half.float(), labels, average=False))


def test_sequence_logps_rejects_an_empty_average():
    logits, labels = tiny_example()
    labels[1, 1:] = -100
    logps, n_tokens = sequence_logps(logits, labels, average=False)
    assert n_tokens[1] == 0 and logps[1] == 0
    with pytest.raises(ValueError, match="no labelled tokens"):
        sequence_logps(logits, labels, average=True)


def test_token_mean_nll_is_shifted_cross_entropy():
    """What TRL's CPO/ORPO ``cross_entropy_loss`` computes for the chosen NLL."""
    logits, labels = tiny_example()
    logps, n_tokens = sequence_logps(logits, labels, average=False)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    close(token_mean_nll(logps, n_tokens), expected)


# ---------------------------------------------------------------------------------------------
# gradients, fixed points, registry


def objective_inputs(name: str, generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(leaf tensors that require grad, full argument list) for one call of objective ``name``."""
    spec = OBJECTIVES[name]
    draw = average_logps if spec.average_logps else summed_logps
    if spec.batch == "unpaired":
        policy, kl = draw(generator).requires_grad_(), draw(generator).requires_grad_()
        desirable = torch.tensor([True, False, True, False, True])
        return [policy], [policy, draw(generator), desirable, kl, kl.detach() - 1]
    chosen, rejected = draw(generator).requires_grad_(), draw(generator).requires_grad_()
    args = [chosen, rejected]
    if spec.needs_reference:
        args += [draw(generator), draw(generator)]
    if spec.needs_chosen_nll:
        args.append(-chosen.sum() / 20)
    return [chosen, rejected], args


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_gradients_are_finite(name):
    leaves, args = objective_inputs(name, torch.Generator().manual_seed(10))
    result = OBJECTIVES[name].fn(*args)
    assert isinstance(result, PreferenceLoss) and result.loss.dim() == 0
    assert not result.chosen_rewards.requires_grad and not result.rejected_rewards.requires_grad
    result.loss.backward()
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.4])
def test_dpo_at_reference_is_log_2(label_smoothing):
    generator = torch.Generator().manual_seed(11)
    chosen, rejected = summed_logps(generator).requires_grad_(), summed_logps(generator).requires_grad_()
    result = dpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), beta=0.1, label_smoothing=label_smoothing)
    close(result.loss, math.log(2))
    result.loss.backward()
    # d/dh [-(1-eps) log sigma(beta h) - eps log sigma(-beta h)] at h = 0 is -beta (1 - 2 eps) / 2, per mean
    close(chosen.grad, torch.full((BATCH,), -0.1 * (1 - 2 * label_smoothing) / 2 / BATCH))
    close(rejected.grad, -chosen.grad)
    assert (result.chosen_rewards == 0).all() and (result.rejected_rewards == 0).all()


def test_ipo_at_reference_is_target_squared():
    zero = torch.zeros(BATCH)
    close(ipo_loss(zero - 3, zero - 4, zero - 3, zero - 4, beta=0.25).loss, (1 / (2 * 0.25)) ** 2)


def test_registry():
    assert set(OBJECTIVES) == {"dpo", "ipo", "simpo", "cpo", "orpo", "kto"}
    expected = {  # name: (needs_reference, average_logps, batch, needs_chosen_nll, fn)
        "dpo": (True, False, "pairs", False, dpo_loss),
        "ipo": (True, True, "pairs", False, ipo_loss),
        "simpo": (False, True, "pairs", False, simpo_loss),
        "cpo": (False, False, "pairs", True, cpo_loss),
        "orpo": (False, True, "pairs", True, orpo_loss),
        "kto": (True, False, "unpaired", False, kto_loss),
    }
    for name, (reference, average, batch, nll, fn) in expected.items():
        spec = get_objective(name)
        assert (spec.needs_reference, spec.average_logps, spec.batch, spec.needs_chosen_nll, spec.fn) == (
            reference, average, batch, nll, fn)
        assert spec.paper.startswith("https://arxiv.org/abs/")
        assert spec.fn.__doc__ and spec.paper in spec.fn.__doc__
    with pytest.raises(KeyError, match="unknown objective 'ppo'"):
        get_objective("ppo")


def test_bad_hyperparameters_raise():
    x = torch.zeros(3) - 1
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        simpo_loss(x, x, beta=0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        cpo_loss(x, torch.zeros(4), torch.tensor(1.0))
