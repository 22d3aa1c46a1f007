"""apply_kernels on tiny llama, qwen2 and gemma3 models: same logits and grads, and the fused ops really run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama import modeling_llama

from tunegraph.errors import TunegraphError
from tunegraph.kernels import dispatch, geglu, rms_norm, rope, swiglu
from tunegraph.kernels.patching import SUPPORTED_MODEL_TYPES, apply_kernels, remove_kernels

LAYERS = 2
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
# per family: norms per layer (gemma3 has four, plus q_norm and k_norm), the GLU op, the norm casting
FAMILY = {
    "llama": (2, "swiglu", "llama"),
    "qwen2": (2, "swiglu", "llama"),
    "gemma3": (6, "geglu", "gemma"),
}


def tiny_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**COMMON))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**COMMON))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            **COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ))
    with torch.no_grad():  # norm weights away from their init (ones/zeros), so the casting order shows
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model.train()


def logits_and_grads(model, ids, position_ids=None):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, position_ids=position_ids)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def assert_same_model_outputs(actual, expected) -> None:
    # fp32 throughout: each fused op is within a few ulps (eps = 1.2e-7) of transformers' op; two layers,
    # the softmax and the LM head amplify that modestly (observed < 1e-6), so 1e-5 leaves a wide margin
    (logits, grads), (logits_ref, grads_ref) = actual, expected
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-5)
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture
def op_calls(monkeypatch) -> dict[str, int]:
    """Counts launches of each fused op's implementations (torch path or Triton), by op name."""
    calls = {"rms_norm": 0, "rope": 0, "swiglu": 0, "geglu": 0}
    spied = [(rms_norm, "rms_norm", "_torch_forward"), (rms_norm, "rms_norm", "_triton_forward"),
             (rope, "rope", "_torch_rotate"), (rope, "rope", "_triton_rotate"),
             (swiglu, "swiglu", "_torch_forward"), (swiglu, "swiglu", "_triton_forward"),
             (geglu, "geglu", "_torch_forward"), (geglu, "geglu", "_triton_forward")]
    for module, op, name in spied:
        real = getattr(module, name)

        def spy(*args, _real=real, _op=op, **kwargs):
            calls[_op] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


def expected_calls(family: str) -> dict[str, int]:
    """Launches in one forward pass: every norm, q and k per attention, one GLU per MLP."""
    norms_per_layer, glu, _ = FAMILY[family]
    return {"rms_norm": norms_per_layer * LAYERS + 1, "rope": 2 * LAYERS, glu: LAYERS,
            "swiglu" if glu == "geglu" else "geglu": 0}


def calls_in_one_forward(model, ids, op_calls) -> dict[str, int]:
    op_calls.update(dict.fromkeys(op_calls, 0))
    with torch.no_grad():
        model(input_ids=ids)
    return dict(op_calls)


@pytest.mark.parametrize("family", list(FAMILY))
def test_patched_model_matches_and_runs_every_fused_op(family, op_calls):
    model = tiny_model(family)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    # per-row positions (as with left padding) give cos/sin a batch dim
    position_ids = torch.arange(11)[None] + torch.tensor([[0], [5]])
    expected = logits_and_grads(model, ids, position_ids)

    norms_per_layer, glu, casting = FAMILY[family]
    patched = apply_kernels(model)
    assert [line.split(":")[0] for line in patched] == [f"rms_norm[{casting}]", "rope", glu]
    assert patched[0].startswith(f"rms_norm[{casting}]: {norms_per_layer * LAYERS + 1} ")

    assert calls_in_one_forward(model, ids, op_calls) == expected_calls(family)
    assert_same_model_outputs(logits_and_grads(model, ids, position_ids), expected)


def test_gradient_checkpointing_recomputes_through_the_fused_ops(op_calls):
    model = tiny_model("llama")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, COMMON["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(5))
    expected = logits_and_grads(model, ids)

    apply_kernels(model)
    op_calls.update(dict.fromkeys(op_calls, 0))
    actual = logits_and_grads(model, ids)
    # each decoder layer's forward runs twice (once more in the backward); the final norm once
    assert op_calls["rms_norm"] == 2 * 2 * LAYERS + 1 and op_calls["swiglu"] == 2 * LAYERS
    assert_same_model_outputs(actual, expected)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_peft_lora_model_is_patched_through_the_wrapper(family, op_calls):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,  # random B: LoRA counts
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(tiny_model(family), lora)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(2))
    expected = logits_and_grads(model, ids)
    assert all("lora_" in name for name in expected[1])  # only the adapters train

    assert len(apply_kernels(model)) == 3
    assert calls_in_one_forward(model, ids, op_calls) == expected_calls(family)
    assert_same_model_outputs(logits_and_grads(model, ids), expected)


@pytest.mark.parametrize("family", ["llama"])  # gemma's casting and GeGLU run in Triton in the op tests
def test_triton_path_through_a_patched_model(family, monkeypatch, op_calls):
    if not (torch.cuda.is_available() or (dispatch.triton_available() and dispatch.interpreting())):
        pytest.skip("the Triton path needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model(family).to(device)
    ids = torch.randint(0, COMMON["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(3)).to(device)
    expected = logits_and_grads(model, ids)

    apply_kernels(model)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    assert_same_model_outputs(logits_and_grads(model, ids), expected)
    assert calls_in_one_forward(model, ids, op_calls) == expected_calls(family)


def test_apply_twice_then_remove_restores_the_original_model(op_calls):
    model = tiny_model("llama")
    ids = torch.randint(0, COMMON["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        original = model(input_ids=ids).logits

    assert len(apply_kernels(model)) == 3
    assert apply_kernels(model) == []  # nothing left to patch
    assert remove_kernels(model) == 2 * LAYERS + 1 + LAYERS + LAYERS  # norms, attentions, MLPs

    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original)
    assert not any(calls_in_one_forward(model, ids, op_calls).values())
    assert not any("forward" in module.__dict__ for module in model.modules())


def test_transformers_globals_and_other_models_are_untouched(op_calls):
    original_rope = modeling_llama.apply_rotary_pos_emb
    patched, untouched = tiny_model("llama"), tiny_model("llama")
    apply_kernels(patched)
    assert modeling_llama.apply_rotary_pos_emb is original_rope

    assert not any(calls_in_one_forward(untouched, torch.ones(1, 4, dtype=torch.long), op_calls).values())


def test_model_dispatched_by_accelerate_keeps_its_hook(op_calls):
    from accelerate.hooks import ModelHook, add_hook_to_module

    class CountingHook(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            CountingHook.calls += 1
            return args, kwargs

    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    add_hook_to_module(mlp, CountingHook())
    hooked_forward = mlp.forward
    apply_kernels(model)
    assert mlp.forward is hooked_forward  # the hook stays in front; it now calls the fused forward

    with torch.no_grad():
        model(input_ids=torch.ones(1, 4, dtype=torch.long))
    assert CountingHook.calls == 1 and op_calls["swiglu"] == LAYERS

    remove_kernels(model)
    assert mlp.forward is hooked_forward and mlp._old_forward.__func__ is type(mlp).forward


def test_unsupported_architecture_is_a_user_error():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(TunegraphError, match="model type 'gpt2'") as error:
        apply_kernels(model)
    assert ", ".join(SUPPORTED_MODEL_TYPES) in str(error.value)
    assert "\n" not in str(error.value)


# Each kernel compiled for an H100 (sm_90) by Triton's real compiler, without a GPU: the interpreter
# above runs kernels as numpy and accepts code the compiler rejects (non-constexpr globals, ...).
_COMPILE_ALL_KERNELS = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from tunegraph.kernels import geglu, rms_norm, rope, swiglu

    FP32_POINTERS = {"RSTD", "DW_PARTIAL"}
    KERNELS = [
        (rms_norm._rms_norm_forward_kernel, {"GEMMA": False, "BLOCK_SIZE": 1024}),
        (rms_norm._rms_norm_backward_kernel, {"GEMMA": True, "COMPUTE_DW": True, "BLOCK_SIZE": 1024}),
        (rope._rope_kernel, {"BACKWARD": True, "BLOCK_H": 16, "BLOCK_D": 32}),
        (swiglu._swiglu_forward_kernel, {"BLOCK_SIZE": 1024}),
        (swiglu._swiglu_backward_kernel, {"BLOCK_SIZE": 1024}),
        (geglu._geglu_forward_kernel, {"BLOCK_SIZE": 1024}),
        (geglu._geglu_backward_kernel, {"BLOCK_SIZE": 1024}),
    ]
    for kernel, constexprs in KERNELS:
        # by the kernels' naming: CAPITALS are pointers (bf16 data, fp32 scratch), eps a float, the rest ints
        signature = {
            name: "constexpr" if name in constexprs
            else ("*fp32" if name in FP32_POINTERS else "*bf16") if name.isupper()
            else "fp32" if name == "eps" else "i64"
            for name in kernel.arg_names
        }
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], kernel.fn.__name__
    print("compiled", len(KERNELS))
""")


def test_every_kernel_compiles_for_cuda(tmp_path):
    if not dispatch.triton_available():
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a real compile every time, and nothing written elsewhere
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the current default, set to silence triton's notice about it
    result = subprocess.run([sys.executable, "-P", "-c", _COMPILE_ALL_KERNELS], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled 7" in result.stdout
