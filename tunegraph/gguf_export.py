"""Write a Hugging Face llama-architecture model directory as a GGUF file (llama.cpp's format).

gguf-py ships the file writer and numpy quantizers but not llama.cpp's HF converter
(``convert_hf_to_gguf.py``), so this module is that converter for ``model_type: llama``, following
its rules (https://github.com/ggml-org/llama.cpp, ``convert_hf_to_gguf.py`` and ``llama-quant.cpp``):

- hyperparameters under ``llama.*`` (context/embedding/feed-forward length, block count, head counts,
  rope base and dimension, RMS epsilon, vocab size) and ``general.file_type``;
- the q/k projections permuted from HF's rotate-half layout to GGML's interleaved RoPE pairs
  (``W.reshape(n_head, 2, d/2, in).swapaxes(1, 2)``; transformers' GGUF loader undoes it);
- a tied ``lm_head`` writes no ``output.weight``: llama.cpp reuses ``token_embd.weight``;
- the tokenizer as ``tokenizer.ggml.model = gpt2`` (byte-level BPE: tokens, token types, merges, the
  pre-tokenizer name, bos/eos/unk/pad ids, add_bos/add_eos, end-of-turn id) and the Jinja chat template.

Which tensor gets which type (:func:`tensor_type`):

- 1-D tensors and norms stay F32 in every file (llama.cpp's kernels expect F32 there);
- ``f16``: every other tensor F16; ``q8_0``: every other tensor Q8_0 (what the converter writes);
- ``q4_0`` / ``q4_1``: Q4_0 (``x = d * q``, q in -8..7) / Q4_1 (``x = d * q + m``, q in 0..15), blocks of
  32, rounded to nearest as llama-quantize does without an importance matrix; except the output
  projection (``output.weight``, or ``token_embd.weight`` when the embeddings are tied): llama-quantize
  gives it Q6_K when its rows are a multiple of 256 values and Q8_0 otherwise. gguf-py has no Q6_K
  quantizer, so it is Q8_0 here in both cases (for SmolLM2, 576-wide rows, that is exactly
  llama.cpp's choice; elsewhere it is the more precise type);
- a matrix whose rows do not split into the type's blocks falls back to F16, as the converter does.

K-quants (Q4_K_M) need llama.cpp's ``llama-quantize``; the export stage runs it when it is on PATH.
The Ollama ``Modelfile`` next to each file is written by :func:`write_modelfile`.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from tunegraph.errors import StageError

SUPPORTED_MODEL_TYPES = ("llama",)
DIRECT_TYPES = ("f16", "q8_0", "q4_0", "q4_1")  # written here, in numpy


@dataclass(frozen=True)
class FileType:
    """A GGUF file type: the ``general.file_type`` code and the type of its quantizable matrices."""

    name: str
    file_type: int  # gguf.LlamaFileType
    matrix_type: str  # a gguf.GGMLQuantizationType name
    output_type: str  # type of the output projection


def file_types() -> dict[str, FileType]:
    import gguf

    return {
        "f16": FileType("f16", int(gguf.LlamaFileType.MOSTLY_F16), "F16", "F16"),
        "q8_0": FileType("q8_0", int(gguf.LlamaFileType.MOSTLY_Q8_0), "Q8_0", "Q8_0"),
        # llama-quantize: Q6_K for the output projection (Q8_0 where rows are not multiples of 256);
        # no numpy Q6_K quantizer exists, so Q8_0 (see the module docstring).
        "q4_0": FileType("q4_0", int(gguf.LlamaFileType.MOSTLY_Q4_0), "Q4_0", "Q8_0"),
        "q4_1": FileType("q4_1", int(gguf.LlamaFileType.MOSTLY_Q4_1), "Q4_1", "Q8_0"),
    }


# --------------------------------------------------------------------------------------------
# what can be exported


@dataclass(frozen=True)
class LlamaShape:
    """The hyperparameters a llama GGUF states, read from ``config.json``."""

    n_layers: int
    hidden: int
    ffn: int
    n_head: int
    n_head_kv: int
    head_dim: int
    context_length: int
    rope_theta: float
    rms_eps: float
    vocab_size: int
    tied: bool


def check_exportable(model_dir: Path, stage: str) -> LlamaShape:
    """The model's llama shape; a :class:`StageError` naming ``stage`` for anything not exportable."""
    from tunegraph.training.strategies import REQUIRES_ADAPTER_FILE

    if (model_dir / REQUIRES_ADAPTER_FILE).is_file():
        raise StageError(f"stage {stage!r}: {model_dir} holds a prompt-style adapter ({REQUIRES_ADAPTER_FILE}: "
                         f"prefix/prompt/p-tuning), which lives outside the weights and has no GGUF form; "
                         f"export a model trained with full, lora, qlora, dora, ia3, galore or spectrum")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise StageError(f"stage {stage!r}: {model_dir} is not a model artifact (no config.json)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise StageError(f"stage {stage!r}: cannot export model type {model_type!r} to GGUF; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} (convert others with llama.cpp's convert_hf_to_gguf.py)")
    if config.get("quantization_config"):
        raise StageError(f"stage {stage!r}: {model_dir} is already quantized "
                         f"({config['quantization_config'].get('quant_method', '?')}); export the float model")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise StageError(f"stage {stage!r}: llama model with rope type {rope_type!r}; only plain RoPE is exported "
                         f"(rope scaling keys are not written)")
    if config.get("hidden_act", "silu") != "silu":
        raise StageError(f"stage {stage!r}: llama model with hidden_act {config['hidden_act']!r}; GGUF llama is SiLU")
    if config.get("mlp_bias"):
        raise StageError(f"stage {stage!r}: llama model with mlp_bias; llama.cpp's llama graph has no FFN biases")
    n_head = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return LlamaShape(
        n_layers=int(config["num_hidden_layers"]), hidden=hidden, ffn=int(config["intermediate_size"]),
        n_head=n_head, n_head_kv=int(config.get("num_key_value_heads") or n_head),
        head_dim=int(config.get("head_dim") or hidden // n_head),
        context_length=int(config.get("max_position_embeddings") or 2048),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)), vocab_size=int(config["vocab_size"]),
        tied=bool(config.get("tie_word_embeddings", False)))


# --------------------------------------------------------------------------------------------
# tokenizer metadata

# The pre-tokenizer shapes transformers writes, and the llama.cpp name (``tokenizer.ggml.pre``) whose
# split regex is the same: llama.cpp splits text with the regex the name selects before BPE.
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?"


@dataclass(frozen=True)
class TokenizerMetadata:
    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values
    merges: list[str]
    pre: str
    special_ids: dict[str, int]  # bos, eos, unk, pad (those the tokenizer has)
    add_bos: bool
    add_eos: bool
    chat_template: str | dict[str, str]  # one template, or named ones ("default" first)
    end_of_turn_id: int | None  # the token the template closes an assistant turn with
    stop_tokens: list[str] = field(default_factory=list)  # texts that end a generation


def pre_tokenizer_name(pre_tokenizer: dict | None, stage: str) -> str:
    """llama.cpp's name for a byte-level ``tokenizer.json`` pre-tokenizer with the same split rule."""
    steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer and pre_tokenizer.get("type") == "Sequence" \
        else [pre_tokenizer] if pre_tokenizer else []
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's regex (llama.cpp: smollm = starcoder)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex", "")
        if pattern.startswith(_LLAMA3_SPLIT):
            return "llama-bpe"
        if pattern.startswith(_QWEN2_SPLIT):
            return "qwen2"
    raise StageError(f"stage {stage!r}: cannot name the tokenizer's pre-tokenizer ({kinds or 'none'}) for llama.cpp; "
                     f"set params.tokenizer_pre to llama.cpp's name for it (e.g. gpt-2, llama-bpe, qwen2, smollm)")


def _looks_special(token: str) -> bool:
    """llama.cpp marks ``<|...|>`` added tokens as control tokens even when not flagged special."""
    return token.startswith("<|") and token.endswith("|>")


def _end_of_turn_token(tokenizer, special_texts: set[str]) -> str | None:
    """The special token the chat template writes right after an assistant message's content."""
    marker = "tgEndOfTurnProbe"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    after = text[text.find(marker) + len(marker):] if marker in text else ""
    return next((token for token in sorted(special_texts, key=len, reverse=True) if after.startswith(token)), None)


def _adds_special(tokenizer) -> tuple[bool, bool]:
    """Whether encoding with special tokens prepends BOS / appends EOS (what llama.cpp must repeat)."""
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos and full[1:1 + len(plain)] == plain
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos and full[-1 - len(plain):-1] == plain
    return add_bos, add_eos


def _generation_eos_ids(model_dir: Path) -> list[int]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return []
    value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    return [int(v) for v in (value if isinstance(value, list) else [value] if value is not None else [])]


def read_tokenizer_metadata(model_dir: Path, vocab_size: int, stage: str,
                            pre: str | None = None) -> TokenizerMetadata:
    """The GGUF tokenizer fields of a byte-level BPE tokenizer saved in ``model_dir``."""
    from gguf import TokenType
    from transformers import AutoTokenizer

    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise StageError(f"stage {stage!r}: {model_dir} has no tokenizer.json; GGUF export needs the fast tokenizer")
    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise StageError(f"stage {stage!r}: only byte-level BPE tokenizers are exported (GGUF 'gpt2'); this one is "
                         f"{model.get('type')} with a {(spec.get('decoder') or {}).get('type')} decoder")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        raise StageError(f"stage {stage!r}: the tokenizer in {model_dir} has no chat template to put in the GGUF")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise StageError(f"stage {stage!r}: the tokenizer has {len(vocab)} tokens but config.json says vocab_size "
                         f"{vocab_size}")
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:  # embedding rows past the tokenizer: llama.cpp's placeholder names
            tokens.append(f"[PAD{index}]")
            types.append(int(TokenType.UNUSED))
        elif index in added:
            tokens.append(by_id[index])
            special = added[index].special or _looks_special(by_id[index])
            types.append(int(TokenType.CONTROL if special else TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[index])
            types.append(int(TokenType.NORMAL))
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model.get("merges", [])]
    special_ids = {name: int(value) for name, value in (("bos", tokenizer.bos_token_id),
                                                        ("eos", tokenizer.eos_token_id),
                                                        ("unk", tokenizer.unk_token_id),
                                                        ("pad", tokenizer.pad_token_id)) if value is not None}
    add_bos, add_eos = _adds_special(tokenizer)
    special_texts = {tokens[i] for i, kind in enumerate(types) if kind == TokenType.CONTROL}
    end_of_turn = _end_of_turn_token(tokenizer, special_texts)
    stop_ids = [special_ids.get("eos"), *_generation_eos_ids(model_dir)]
    stops = [tokens[i] for i in stop_ids if i is not None and 0 <= i < vocab_size]
    if end_of_turn:
        stops.append(end_of_turn)
    return TokenizerMetadata(
        tokens=tokens, token_types=types, merges=merges,
        pre=pre or pre_tokenizer_name(spec.get("pre_tokenizer"), stage),
        special_ids=special_ids, add_bos=add_bos, add_eos=add_eos, chat_template=tokenizer.chat_template,
        end_of_turn_id=vocab[end_of_turn] if end_of_turn else None, stop_tokens=list(dict.fromkeys(stops)))


# --------------------------------------------------------------------------------------------
# tensors


def permute_for_ggml_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows (per head: all first halves, then all second halves) -> GGML's adjacent pairs.

    Per head the rows [x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}] become [x_0, y_0, x_1, y_1, ...]: the same
    rotation, with each rotated pair stored next to each other (llama.cpp ``LlamaModel.permute``).
    """
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _safetensors_tensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) of every tensor in the directory's safetensors files, in name order."""
    import torch
    from safetensors import safe_open

    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in sorted(handle.keys()):
                yield key, handle.get_tensor(key).to(torch.float32).numpy()


def gguf_tensors(model_dir: Path, shape: LlamaShape, stage: str) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight, q/k permuted, a tied lm_head left out."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, shape.n_layers)
    found = False
    for hf_name, array in _safetensors_tensors(model_dir):
        found = True
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope.freq_base
        if hf_name == "lm_head.weight" and shape.tied:
            continue  # llama.cpp reuses token_embd.weight when output.weight is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise StageError(f"stage {stage!r}: tensor {hf_name!r} has no GGUF llama name; is this a plain "
                             f"LlamaForCausalLM checkpoint?")
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            array = permute_for_ggml_rope(array, shape.n_head)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            array = permute_for_ggml_rope(array, shape.n_head_kv)
        yield name, array
    if not found:
        raise StageError(f"stage {stage!r}: {model_dir} has no *.safetensors weights")


def tensor_type(name: str, array: np.ndarray, spec: FileType, has_output: bool) -> str:
    """The GGML type ``name`` is stored in for file type ``spec`` (rules in the module docstring)."""
    import gguf

    if array.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return "F32"
    is_output = name == "output.weight" or (name == "token_embd.weight" and not has_output)
    chosen = spec.output_type if is_output else spec.matrix_type
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[chosen]][0]
    return chosen if array.shape[-1] % block == 0 else "F16"


# --------------------------------------------------------------------------------------------
# the file


@dataclass(frozen=True)
class ExportedFile:
    path: Path
    gguf_type: str
    bytes: int
    tensor_types: dict[str, int]  # GGML type -> tensor count
    stop_tokens: list[str]  # token texts that end a generation (eos, end of turn)


def export_gguf(model_dir: Path, dest: Path, gguf_type: str, *, name: str, stage: str,
                tokenizer_pre: str | None = None) -> ExportedFile:
    """Write ``model_dir`` to ``dest`` as a GGUF of ``gguf_type`` (one of :data:`DIRECT_TYPES`)."""
    import gguf

    types = file_types()
    if gguf_type not in types:
        raise StageError(f"stage {stage!r}: GGUF type {gguf_type!r} is not written here; known: {', '.join(types)}")
    spec = types[gguf_type]
    shape = check_exportable(model_dir, stage)
    tokenizer = read_tokenizer_metadata(model_dir, shape.vocab_size, stage, tokenizer_pre)
    tensors = list(gguf_tensors(model_dir, shape, stage))
    has_output = any(tensor_name == "output.weight" for tensor_name, _ in tensors)

    writer = gguf.GGUFWriter(dest, "llama")
    _write_metadata(writer, shape, tokenizer, spec, name)
    counts: Counter[str] = Counter()
    for tensor_name, array in tensors:
        kind = tensor_type(tensor_name, array, spec, has_output)
        counts[kind] += 1
        qtype = gguf.GGMLQuantizationType[kind]
        data = gguf.quants.quantize(np.ascontiguousarray(array), qtype)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype if kind not in ("F32", "F16") else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ExportedFile(dest, gguf_type, dest.stat().st_size, dict(sorted(counts.items())), tokenizer.stop_tokens)


def _write_metadata(writer, shape: LlamaShape, tokenizer: TokenizerMetadata, spec: FileType, name: str) -> None:
    import gguf

    writer.add_type("model")
    writer.add_name(name)
    writer.add_block_count(shape.n_layers)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_rope_dimension_count(shape.head_dim)  # transformers reads head_dim from this key
    if shape.head_dim != shape.hidden // shape.n_head:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_vocab_size(shape.vocab_size)
    writer.add_file_type(spec.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer.pre)
    writer.add_token_list(tokenizer.tokens)
    writer.add_token_types(tokenizer.token_types)
    writer.add_token_merges(tokenizer.merges)
    ids = tokenizer.special_ids
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if key in ids:
            add(ids[key])
    if tokenizer.end_of_turn_id is not None:
        writer.add_eot_token_id(tokenizer.end_of_turn_id)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(tokenizer.add_eos)
    template = tokenizer.chat_template
    writer.add_chat_template(template if isinstance(template, str) else  # named templates: chat_template.<name>
                             [{"name": name, "template": text} for name, text in template.items()])


# --------------------------------------------------------------------------------------------
# Ollama


@dataclass(frozen=True)
class ChatShape:
    """A chat template reduced to fixed text around each message, enough to rewrite it for Ollama.

    ``no_system`` is what the template writes before the first message when no system message is
    given (a default system block, or a start token, or nothing).
    """

    system_prefix: str
    system_suffix: str
    no_system: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str

    def render(self, messages: list[dict]) -> str:
        """What the Ollama template below renders for ``messages`` (system first, if any), prompt added."""
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")  # Ollama joins them so
        text = f"{self.system_prefix}{system}{self.system_suffix}" if system else self.no_system
        for m in messages:
            if m["role"] in ("user", "assistant"):
                prefix, suffix = (self.user_prefix, self.user_suffix) if m["role"] == "user" else \
                    (self.assistant_prefix, self.assistant_suffix)
                text += prefix + m["content"] + suffix
        return text + self.generation_prompt

    def go_template(self) -> str:
        """The Ollama (Go text/template) form. No ``{{-`` trimming: the literal newlines matter."""
        return ("{{ if .System }}" + self.system_prefix + "{{ .System }}" + self.system_suffix
                + "{{ else }}" + self.no_system + "{{ end }}"
                + "{{ range .Messages }}"
                + '{{ if eq .Role "user" }}' + self.user_prefix + "{{ .Content }}" + self.user_suffix
                + '{{ else if eq .Role "assistant" }}' + self.assistant_prefix + "{{ .Content }}"
                + self.assistant_suffix + "{{ end }}{{ end }}" + self.generation_prompt)


_PROBES = {"system": "tgSysProbe", "u1": "tgUserProbeOne", "a1": "tgAssistantProbe", "u2": "tgUserProbeTwo"}
_CHECK_CONVERSATIONS = (
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Say it again\nplease."}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}],
)


def _split_around(text: str, *markers: str) -> list[str] | None:
    """The text before, between and after ``markers`` (each found once, in order), or None."""
    pieces, rest = [], text
    for marker in markers:
        if rest.count(marker) != 1:
            return None
        before, rest = rest.split(marker)
        pieces.append(before)
    return pieces + [rest]


def chat_shape(tokenizer) -> ChatShape | None:
    """Recover the fixed text around each role from renders of probe conversations; None when the
    template is not of that form (the rendering of every check conversation must match exactly)."""
    p = _PROBES
    user, assistant, user2 = ({"role": "user", "content": p["u1"]}, {"role": "assistant", "content": p["a1"]},
                              {"role": "user", "content": p["u2"]})

    def render(messages, prompt=False):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    try:
        one = _split_around(render([user]), p["u1"])
        with_prompt = render([user], prompt=True)
        two = _split_around(render([user, assistant]), p["u1"], p["a1"])
        three = _split_around(render([user, assistant, user2]), p["u1"], p["a1"], p["u2"])
        system = _split_around(render([{"role": "system", "content": p["system"]}, user]), p["system"], p["u1"])
    except Exception:  # a template that raises on one of the probes is not of this simple form
        return None
    if None in (one, two, three, system) or not with_prompt.startswith(render([user])):
        return None
    head, user_suffix = one
    assistant_suffix = two[2]
    user_prefix = three[2][len(assistant_suffix):] if three[2].startswith(assistant_suffix) else None
    assistant_prefix = two[1][len(user_suffix):] if two[1].startswith(user_suffix) else None
    if user_prefix is None or assistant_prefix is None or not head.endswith(user_prefix) \
            or not system[1].endswith(user_prefix):
        return None
    shape = ChatShape(system_prefix=system[0], system_suffix=system[1][:len(system[1]) - len(user_prefix)],
                      no_system=head[:len(head) - len(user_prefix)], user_prefix=user_prefix, user_suffix=user_suffix,
                      assistant_prefix=assistant_prefix, assistant_suffix=assistant_suffix,
                      generation_prompt=with_prompt[len(render([user])):])
    if any(shape.render(c) != render(c, prompt=True) for c in _CHECK_CONVERSATIONS):
        return None
    return shape


def modelfile_text(gguf_name: str, tokenizer, stop_tokens: list[str]) -> tuple[str, bool]:
    """An Ollama Modelfile for ``gguf_name`` and whether the chat template was translated."""
    shape = chat_shape(tokenizer)
    # literal braces or triple quotes would need escaping inside the Go template / the Modelfile string
    escapable = shape is not None and not any(
        "{{" in text or "}}" in text or '"""' in text for text in dataclasses.astuple(shape))
    template = shape.go_template() if escapable else None
    lines = [f"# Ollama Modelfile for {gguf_name}, written by tunegraph: ollama create NAME -f this file",
             f"FROM ./{gguf_name}"]
    if template is not None:
        lines += ["# the chat template, rewritten from the model's Jinja template (renders identically on probe chats)",
                  f'TEMPLATE """{template}"""']
    else:
        lines += ["# TEMPLATE: the Jinja chat template could not be rewritten as a Go template; it is in the GGUF",
                  "# (tokenizer.chat_template), which Ollama matches to a known template on import:"]
        lines += [f"#   {line}" for line in str(tokenizer.chat_template).splitlines()]
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens if '"' not in token]
    return "\n".join(lines) + "\n", template is not None


def write_modelfile(exported: ExportedFile, tokenizer) -> tuple[Path, bool]:
    """``<name>.<type>.Modelfile`` next to the GGUF; returns its path and whether TEMPLATE was translated.

    ``tokenizer`` is the source model's (its Jinja chat template is what gets rewritten).
    """
    gguf_path = exported.path
    text, translated = modelfile_text(gguf_path.name, tokenizer, exported.stop_tokens)
    path = gguf_path.with_name(gguf_path.name.removesuffix(".gguf") + ".Modelfile")
    path.write_text(text, encoding="utf-8")
    return path, translated
