"""Patch a transformers llama, qwen2 or gemma3 model in place so that it runs tunegraph's fused kernels.

``apply_kernels(model)`` changes module *instances*, never classes or transformers' module globals:

- each RMSNorm module's forward becomes ``rms_norm`` in its family's casting mode (llama and qwen2:
  ``"llama"``; gemma3: ``"gemma"``, which covers gemma3's q_norm/k_norm too);
- each attention module's forward becomes its class's own forward, re-created over a *copy* of its
  module's globals in which ``apply_rotary_pos_emb`` is ``rotary_pos_emb``. The attention code is
  unchanged (sliding windows, q/k norms, KV caches, attention backends), and transformers' module keeps
  its own ``apply_rotary_pos_emb``, so unpatched instances and other models are untouched and nothing
  global needs undoing. The copy is taken at patch time: later rewrites of that module's globals by
  other code are not seen by patched instances;
- each MLP module's forward becomes ``down(silu_mul(gate(x), up(x)))`` (SwiGLU) or
  ``down(gelu_tanh_mul(gate(x), up(x)))`` (GeGLU) when its ``act_fn`` is SiLU or tanh-GELU; an MLP with
  another activation is left alone and not reported.

Each op picks Triton or the torch path per call (``tunegraph.kernels.dispatch``), so a patched model runs
on CPU and CUDA alike. The patched forwards call the same submodules as the originals, so PEFT layers
inside them (LoRA on gate/up/q/k...) keep working; a ``PeftModel`` is patched through its base model.
Models dispatched by accelerate (``_hf_hook``) get their ``_old_forward`` patched, which the hook calls.
``remove_kernels(model)`` puts back whatever forward each patched module had.

Hook for the LM head: the fused linear cross-entropy and fused preference losses (the other half of the
kernels issue) are not patched here. They consume the last hidden states and the head's weight instead of
the logits, so the training loss calls them directly; if a module-level patch is wanted instead (e.g.
a ``ForCausalLM.forward`` that never materializes logits), add it as one more function in ``_PATCHERS``.
"""

from __future__ import annotations

import functools
import importlib
import types
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from torch import nn

from tunegraph.errors import TunegraphError
from tunegraph.kernels.geglu import gelu_tanh_mul
from tunegraph.kernels.rms_norm import rms_norm
from tunegraph.kernels.rope import rotary_pos_emb
from tunegraph.kernels.swiglu import silu_mul

_MARK = "_tunegraph_kernel"            # on a patched module: the op name
_SAVED = "_tunegraph_saved_forward"    # on a patched module: (attribute, the instance's own value or None)


# --- the replacement forwards (bound to each instance with types.MethodType) -------------------


def _llama_rms_norm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, "llama")


def _gemma_rms_norm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.eps, "gemma")


def _swiglu_mlp_forward(self, x):
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _geglu_mlp_forward(self, x):
    return self.down_proj(gelu_tanh_mul(self.gate_proj(x), self.up_proj(x)))


# --- supported families -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFamily:
    """The module classes of one transformers architecture that the fused ops replace."""

    modeling: str             # the transformers module that defines the classes below
    norm: str
    attention: str
    mlp: str
    norm_mode: str            # rms_norm casting mode
    norm_forward: Callable

    def classes(self) -> tuple[type, type, type]:
        module = importlib.import_module(self.modeling)
        return getattr(module, self.norm), getattr(module, self.attention), getattr(module, self.mlp)


_LLAMA = ModelFamily("transformers.models.llama.modeling_llama", "LlamaRMSNorm", "LlamaAttention", "LlamaMLP",
                     "llama", _llama_rms_norm_forward)
_QWEN2 = ModelFamily("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm", "Qwen2Attention", "Qwen2MLP",
                     "llama", _llama_rms_norm_forward)
_GEMMA3 = ModelFamily("transformers.models.gemma3.modeling_gemma3", "Gemma3RMSNorm", "Gemma3Attention",
                      "Gemma3MLP", "gemma", _gemma_rms_norm_forward)

# config.model_type -> family; "gemma3" is the multimodal wrapper, whose language model is gemma3_text
FAMILIES: dict[str, ModelFamily] = {"llama": _LLAMA, "qwen2": _QWEN2, "gemma3_text": _GEMMA3, "gemma3": _GEMMA3}
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (duck-typed: peft need not be imported)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def model_family(model: nn.Module) -> ModelFamily:
    """The family of ``model`` (or of the model a PeftModel wraps); TunegraphError if unsupported."""
    base = _base_model(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise TunegraphError(
            f"kernels: true: no fused kernels for model type {model_type!r} ({type(base).__name__}); "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}. Set kernels: false for this model"
        )
    return FAMILIES[model_type]


# --- patching one module --------------------------------------------------------------------------


def _forward_attribute(module: nn.Module) -> str:
    # accelerate's hooks replace `forward` on the instance and call `_old_forward` from it
    return "_old_forward" if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__ else "forward"


def _patch(module: nn.Module, forward: Callable, op: str) -> bool:
    """Bind ``forward`` to ``module`` as its forward; False if the module is already patched."""
    if _MARK in module.__dict__:
        return False
    attribute = _forward_attribute(module)
    module.__dict__[_SAVED] = (attribute, module.__dict__.get(attribute))
    module.__dict__[attribute] = types.MethodType(forward, module)
    module.__dict__[_MARK] = op
    return True


def _unpatch(module: nn.Module) -> bool:
    if _MARK not in module.__dict__:
        return False
    attribute, previous = module.__dict__.pop(_SAVED)
    if previous is None:  # the class's forward was in use
        del module.__dict__[attribute]
    else:
        module.__dict__[attribute] = previous
    del module.__dict__[_MARK]
    return True


@functools.cache
def _forward_with_fused_rope(attention_class: type) -> Callable | None:
    """``attention_class.forward`` re-created with ``apply_rotary_pos_emb`` bound to ``rotary_pos_emb``.

    None when the forward does not look up ``apply_rotary_pos_emb`` as a module global (a decorated
    forward, or a transformers version that calls RoPE differently): RoPE is then left unpatched.
    """
    forward = attention_class.forward
    if hasattr(forward, "__wrapped__") or "apply_rotary_pos_emb" not in forward.__code__.co_names:
        return None
    if "apply_rotary_pos_emb" not in forward.__globals__:
        return None
    scope = dict(forward.__globals__, apply_rotary_pos_emb=rotary_pos_emb)
    fused = types.FunctionType(forward.__code__, scope, forward.__name__, forward.__defaults__, forward.__closure__)
    fused.__kwdefaults__ = forward.__kwdefaults__
    fused.__qualname__, fused.__doc__, fused.__module__ = forward.__qualname__, forward.__doc__, __name__
    return fused


def _mlp_forward(mlp: nn.Module) -> tuple[Callable, str] | None:
    from transformers.activations import GELUTanh, SiLUActivation

    if isinstance(mlp.act_fn, (SiLUActivation, nn.SiLU)):
        return _swiglu_mlp_forward, "swiglu"
    if isinstance(mlp.act_fn, GELUTanh):
        return _geglu_mlp_forward, "geglu"
    return None


# --- the patchers: each patches one kind of module and reports "op: count Class" lines -----------


def _report(counts: Counter) -> list[str]:
    return [f"{op}: {count} {name}" for (op, name), count in counts.items()]


def _patch_rms_norms(model: nn.Module, family: ModelFamily) -> list[str]:
    norm_class = family.classes()[0]
    op = f"rms_norm[{family.norm_mode}]"
    counts = Counter(
        (op, type(module).__name__)
        for module in model.modules()
        if isinstance(module, norm_class) and _patch(module, family.norm_forward, op)
    )
    return _report(counts)


def _patch_rotary(model: nn.Module, family: ModelFamily) -> list[str]:
    attention_class = family.classes()[1]
    counts = Counter()
    for module in model.modules():
        if isinstance(module, attention_class):
            forward = _forward_with_fused_rope(type(module))
            if forward is not None and _patch(module, forward, "rope"):
                counts["rope", type(module).__name__] += 1
    return _report(counts)


def _patch_mlps(model: nn.Module, family: ModelFamily) -> list[str]:
    mlp_class = family.classes()[2]
    counts = Counter()
    for module in model.modules():
        if isinstance(module, mlp_class):
            fused = _mlp_forward(module)
            if fused is not None and _patch(module, *fused):
                counts[fused[1], type(module).__name__] += 1
    return _report(counts)


_PATCHERS = (_patch_rms_norms, _patch_rotary, _patch_mlps)


def apply_kernels(model: nn.Module) -> list[str]:
    """Patch ``model`` in place (see the module docstring); returns one ``"op: count Class"`` line per op.

    Applying twice patches nothing more (and returns an empty list the second time).
    Raises TunegraphError for a model type with no kernels.
    """
    family = model_family(model)
    return [line for patcher in _PATCHERS for line in patcher(model, family)]


def remove_kernels(model: nn.Module) -> int:
    """Undo ``apply_kernels``: each patched module gets its previous forward back; returns how many."""
    return sum(_unpatch(module) for module in model.modules())
