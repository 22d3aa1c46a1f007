"""``kernels: true`` in training stages: the fused path gives the logits path's losses and gradients.

With ``kernels: true`` a stage patches RMSNorm, RoPE and SwiGLU into the model and computes its loss
from the LM head's input without materializing the logits. Everything here is float32 on CPU, where
each fused op is within a few ulps of the op it replaces (tests/test_kernel_*.py) and the chunked
log-softmax sums the same terms in another order, so the two paths differ by rounding only. Observed:
losses equal to ~1e-7 relative, gradients within ~1e-6 of their largest entry (~1e-5 for DPO).
"""

from __future__ import annotations

import pytest
import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from conftest import stage_ctx
from tunegraph.chat_data import read_rows
from tunegraph.errors import StageError
from tunegraph.kernels.patching import apply_kernels
from tunegraph.modelio import load_tokenizer
from tunegraph.registry import all_kinds
from tunegraph.rewards import resolve_reward
from tunegraph.tasks.grpo import DAPOParams, GRPOParams
from tunegraph.tasks.preference import DPOParams, objective_hyperparameters
from tunegraph.tasks.sft import SFTParams, sft
from tunegraph.training.chat_encoding import encode_chat
from tunegraph.training.fused_head import causal_lm_loss, check_fused_head
from tunegraph.training.grpo import PolicySettings, RolloutSettings, make_grpo_step, make_reference
from tunegraph.training.loop import StepOutput, collate
from tunegraph.training.objectives import get_objective
from tunegraph.training.preference import encode_preference_rows, make_preference_step, reference_logps
from tunegraph.training.session import load_trainable


# --- helpers -------------------------------------------------------------------------------------------

def loss_and_grads(model, step, indices: list[int]) -> tuple[StepOutput, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    output = step(model, indices)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output, grads


def assert_same_step(fused: tuple[StepOutput, dict], plain: tuple[StepOutput, dict]) -> None:
    """Loss within 1e-5 relative and every gradient within 1e-4 of its tensor's largest entry. fp32
    rounding is ~1e-7 relative; two layers, the softmax and a 49k-way log-softmax amplify it to ~1e-6,
    and DPO's gradient, a difference of the chosen and the rejected sequences' gradients that partly
    cancel, to ~1e-5 of its largest entry (observed). A wrong shift, mask or mean is off by O(1)."""
    (out, grads), (out_ref, grads_ref) = fused, plain
    torch.testing.assert_close(out.loss.detach(), out_ref.loss.detach(), rtol=1e-5, atol=1e-6)
    assert out.tokens == out_ref.tokens
    assert grads.keys() == grads_ref.keys() and grads_ref
    for name, expected in grads_ref.items():
        scale = float(expected.abs().max())
        assert scale > 0 or name.endswith("lora_A.default.weight"), f"{name}: no gradient to compare"
        torch.testing.assert_close(grads[name], expected, rtol=0, atol=1e-4 * max(scale, 1e-12),
                                   msg=lambda message: f"{name}: {message}")


class HeadCalls:
    """Sequence lengths the LM head was applied to: the fused path applies it to one position only."""

    def __init__(self, model):
        self.lengths: list[int] = []
        self.handle = model.get_output_embeddings().register_forward_hook(
            lambda module, args, output: self.lengths.append(output.shape[1]))


def is_patched(model) -> bool:
    return any("_tunegraph_kernel" in module.__dict__ for module in model.modules())


def load(tiny_artifacts, tmp_path, params):
    """The stage's model (strategy, then kernels when asked) and tokenizer, seeded as a stage would be."""
    model, tokenizer = load_trainable(tiny_artifacts / "model", params, stage_ctx(tmp_path, "t"))
    assert is_patched(model) == params.kernels
    return model.train(), tokenizer


# --- (a) one step: the same loss and gradients -----------------------------------------------------

@pytest.mark.parametrize("strategy", ["full", "prompt_tuning"])
def test_sft_step_matches_the_logits_path(tiny_artifacts, tmp_path, strategy):
    """full: every weight, the LM head tied to the embeddings; prompt_tuning: virtual tokens prepended."""
    runs = {}
    for kernels in (False, True):
        params = SFTParams(strategy=strategy, max_length=128, kernels=kernels)
        model, tokenizer = load(tiny_artifacts, tmp_path, params)
        examples = [encode_chat(tokenizer, row["messages"], 128) for row in read_rows(tiny_artifacts / "train")[:4]]

        def step(model, indices):
            batch = collate([examples[i] for i in indices], tokenizer.pad_token_id)
            loss = causal_lm_loss(model, batch) if kernels else model(**batch).loss
            return StepOutput(loss, int(batch["attention_mask"].sum()))

        calls = HeadCalls(model)
        runs[kernels] = loss_and_grads(model, step, [0, 1, 2, 3])
        assert (calls.lengths == [1]) == kernels  # the fused path never runs the head over the sequence
    assert_same_step(runs[True], runs[False])


def test_dpo_step_matches_the_logits_path(tiny_artifacts, tmp_path):
    """LoRA: the reference log-probs come from the initial policy (adapter on, B = 0), then B moves."""
    objective = get_objective("dpo")
    runs, references = {}, {}
    for kernels in (False, True):
        params = DPOParams(strategy="lora", max_length=128, kernels=kernels)
        model, tokenizer = load(tiny_artifacts, tmp_path, params)
        data = encode_preference_rows(tokenizer, read_rows(tiny_artifacts / "pairs")[:4], objective, 128,
                                      stage_ctx(tmp_path))
        reference = tuple(reference_logps(model, examples, tokenizer.pad_token_id, False, fused=kernels)
                          for examples in (data.first, data.second))
        with torch.no_grad():  # B = 0 makes the policy the reference: move it, so that the loss is not log 2
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3)))
        step = make_preference_step(objective, data, objective_hyperparameters(params), tokenizer.pad_token_id,
                                    reference, fused=kernels)
        runs[kernels], references[kernels] = loss_and_grads(model, step, [2, 0, 3]), reference
    for fused, plain in zip(references[True], references[False]):
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-5)  # sums of ~20 log-probs of ~-10.8
    assert_same_step(runs[True], runs[False])
    for name in ("reward_chosen", "reward_rejected", "reward_accuracy"):
        assert runs[True][0].metrics[name] == pytest.approx(runs[False][0].metrics[name], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("kind,strategy", [(GRPOParams, "full"), (DAPOParams, "lora")])
def test_policy_step_matches_the_logits_path(tiny_artifacts, tmp_path, kind, strategy):
    """GRPO + full fine-tuning: beta > 0, the reference is a deep copy of the patched model; DAPO + LoRA:
    token-level loss, dynamic sampling. The same seed samples the same rollout on both paths."""
    runs = {}
    for kernels in (False, True):
        params = kind(strategy=strategy, rewards={"toy_rewards:length_parity": 1.0}, group_size=4, batch_size=2,
                      max_new_tokens=6, max_length=128, kernels=kernels)
        model, tokenizer = load(tiny_artifacts, tmp_path, params)
        rewards = [(resolve_reward(spec), weight) for spec, weight in params.rewards.items()]
        rollout = RolloutSettings(params.group_size, params.max_new_tokens, params.temperature, params.top_p)
        policy = PolicySettings(params.beta, params.eps_low, params.eps_high, params.aggregation,
                                params.scale_advantages, params.dynamic_sampling, params.overlong_cache)
        step = make_grpo_step(read_rows(tiny_artifacts / "train"), tokenizer, rewards, rollout, policy,
                              make_reference(model, params.beta), fused=kernels)
        torch.manual_seed(7)
        runs[kernels] = loss_and_grads(model, step, [0, 1])
    (fused, _), (plain, _) = runs[True], runs[False]
    assert fused.metrics["reward"] == plain.metrics["reward"]  # the same samples
    assert fused.metrics["completion_tokens"] == plain.metrics["completion_tokens"]
    assert plain.metrics["reward_std"] > 0, "constant rewards: no policy gradient to compare"
    assert_same_step(runs[True], runs[False])


# --- every patched family: the fused SFT loss is transformers' loss --------------------------------

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=160, max_position_embeddings=64)


def small_model(family: str):
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=True))
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=False))
    # gemma3 with Gemma 2's final-logit soft-capping, which the fused cross-entropy applies
    return Gemma3ForCausalLM(Gemma3TextConfig(**SMALL, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                                              layer_types=["sliding_attention", "full_attention"],
                                              final_logit_softcapping=3.0))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_fused_causal_lm_loss_matches_transformers_loss(family):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SMALL["vocab_size"], (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding, as collate makes it
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a prompt
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    plain, fused = small_model(family).train(), small_model(family).train()
    assert apply_kernels(fused)
    if family == "gemma3":
        assert check_fused_head(fused, "t").softcap == 3.0
    results = []
    for model, loss_fn in ((plain, lambda m: m(**batch).loss), (fused, lambda m: causal_lm_loss(m, batch))):
        results.append(loss_and_grads(model, lambda m, _: StepOutput(loss_fn(m), 0), []))
    assert_same_step(results[1], results[0])


# --- (b) convergence: 30 steps, the same loss curve ------------------------------------------------

def per_step_losses(kind_fn, params, inputs: dict, out, tmp_path) -> list[float]:
    losses: list[float] = []
    ctx = stage_ctx(tmp_path, "t")
    ctx.step_logger = lambda step, metrics: losses.append(metrics["loss"])
    out.mkdir()
    kind_fn(params, inputs, out, ctx)
    return losses


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_thirty_steps_follow_the_same_loss_curve(tiny_artifacts, tmp_path, kind):
    """The two paths' per-step losses stay within 1e-3 x the first loss over 30 full fine-tuning steps.

    Why 1e-3: a step's loss differs by ~1e-7 relative (rounding, see the module docstring), but the
    runs then drift apart: gradients that differ by ~1e-6 relative give Adam updates that differ by
    about that fraction of the learning rate, and each step's loss is computed on weights that carry
    every earlier difference. Observed: at most ~1e-6 (sft) and ~1e-5 (dpo) of the first loss over the
    30 steps, so 1e-3 leaves two orders of margin for other CPUs' BLAS while a real difference (a wrong
    shift, mask, mean or reference) moves the curve by percents from the first steps.
    """
    fn, params_model, data = (sft, SFTParams, "train") if kind == "sft" else (all_kinds()["dpo"].fn, DPOParams, "pairs")
    curves = {}
    for kernels in (False, True):
        params = params_model(strategy="full", epochs=2, max_steps=30, batch_size=1, learning_rate=1e-3,
                              warmup_ratio=0.0, max_length=128, kernels=kernels)
        inputs = {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / data}
        curves[kernels] = per_step_losses(fn, params, inputs, tmp_path / f"out-{kernels}", tmp_path)
    plain, fused = curves[False], curves[True]
    assert len(plain) == len(fused) == 30
    scale = abs(plain[0])
    assert max(abs(loss - plain[0]) for loss in plain) > 0.05 * scale, "a flat curve: the comparison is vacuous"
    worst = max(abs(a - b) for a, b in zip(fused, plain))
    assert worst <= 1e-3 * scale, f"max |fused - plain| = {worst:.3g} over 30 steps (scale {scale:.3g})"


# --- (c) refusals ----------------------------------------------------------------------------------

def test_unsupported_architecture_is_refused_naming_the_stage(tiny_artifacts, tmp_path):
    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=49152, n_positions=128)).save_pretrained(
        model_dir)
    load_tokenizer(tiny_artifacts / "model").save_pretrained(model_dir)
    params = SFTParams(strategy="full", max_steps=1, kernels=True)
    with pytest.raises(StageError, match=r"stage 'sft_gpt2': kernels: true: no fused kernels for model type 'gpt2'"):
        sft(params, {"model": model_dir, "dataset": tiny_artifacts / "train"}, tmp_path / "out",
            stage_ctx(tmp_path, "sft_gpt2"))


def test_an_adapted_lm_head_is_refused(tiny_artifacts, tmp_path):
    params = SFTParams(strategy="lora", lora={"target_modules": ["q_proj", "lm_head"]}, max_steps=1, kernels=True)
    with pytest.raises(StageError, match=r"stage 'sft_head'.*LM head is a peft\..*lm_head in lora.target_modules"):
        sft(params, {"model": tiny_artifacts / "model", "dataset": tiny_artifacts / "train"}, tmp_path / "out",
            stage_ctx(tmp_path, "sft_head"))


def test_softcapping_is_refused_where_no_fused_loss_has_it():
    model = small_model("gemma3")
    with pytest.raises(StageError, match=r"stage 'dpo'.*final_logit_softcapping=3.0"):
        check_fused_head(model, "dpo", softcap_supported=False)


def test_kernels_is_part_of_the_fingerprint():
    """The fused path rounds differently, so its artifact is another artifact."""
    assert SFTParams(kernels=True).fingerprint_params() != SFTParams().fingerprint_params()
