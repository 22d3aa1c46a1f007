"""Refuse to merge models that do not line up: architecture, shapes, vocabulary, chat template.

A merge adds and averages tensors position by position, so every input must be the same network
(architecture and the config fields that fix tensor shapes), hold the same tensors with the same
shapes, map token ids to the same tokens (row ``i`` of an embedding is token ``i``), and carry the
same chat template (the merged model is prompted one way). mergekit would fail late on some of these
and silently merge the others; each check here names the models and the first thing that differs.

Everything is read from the files (config, safetensors headers, tokenizer files): no weights are
loaded. Tokenizers are loaded only when their files differ, to name the first differing token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from tunegraph.errors import StageError
from tunegraph.hashing import hash_file

# Config fields that fix the shape (or the meaning) of the weights.
STRUCTURE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")
# Files that define the vocabulary; equal files mean equal vocabularies.
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
# Written by prompt-style training strategies (tunegraph.training.strategies.REQUIRES_ADAPTER_FILE); not
# imported from there so that the merge stages' code version does not follow the training code.
REQUIRES_ADAPTER_FILE = "requires_adapter.json"


class IncompatibleModels(StageError):
    """Models that cannot be merged; the message names them and what differs."""


@dataclass(frozen=True)
class ModelFacts:
    """What a merge must agree on, read from one model directory."""

    name: str
    path: Path
    architecture: str
    structure: dict[str, Any]
    tensors: dict[str, tuple[int, ...]]
    vocabulary_files: dict[str, str]  # file name -> sha256
    chat_template: str | None


def read_facts(name: str, path: Path) -> ModelFacts:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise IncompatibleModels(f"cannot merge {name!r}: {path} is not a model directory (no config.json)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    text_config = config.get("text_config") or {}
    architectures = config.get("architectures") or [config.get("model_type", "?")]
    structure = {key: config.get(key, text_config.get(key)) for key in STRUCTURE_FIELDS}
    return ModelFacts(
        name=name, path=path, architecture=f"{config.get('model_type', '?')}/{architectures[0]}",
        structure=structure, tensors=tensor_shapes(name, path),
        vocabulary_files={f: hash_file(path / f) for f in VOCABULARY_FILES if (path / f).is_file()},
        chat_template=chat_template_of(path),
    )


def tensor_shapes(name: str, path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the safetensors headers."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise IncompatibleModels(f"cannot merge {name!r}: {path} has no .safetensors weights")
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def chat_template_of(path: Path) -> str | None:
    """The chat template a tokenizer saved in ``path`` carries (transformers' file layouts), or None."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    for file in ("chat_template.json", "tokenizer_config.json"):
        if (path / file).is_file():
            template = json.loads((path / file).read_text(encoding="utf-8")).get("chat_template")
            if template:
                return template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return None


def check_compatible(models: Mapping[str, Path]) -> list[ModelFacts]:
    """Raise :class:`IncompatibleModels` unless every model matches the first; return what was read."""
    facts = [read_facts(name, path) for name, path in models.items()]
    reference = facts[0]
    for other in facts[1:]:
        _check_pair(reference, other)
    return facts


def check_weights_are_the_model(models: Mapping[str, Path]) -> None:
    """Prompt-style adapters keep the unchanged base as weights: merging those weights drops the training."""
    for name, path in models.items():
        if (Path(path) / REQUIRES_ADAPTER_FILE).is_file():
            raise IncompatibleModels(f"cannot merge {name!r}: it was trained with a prompt-style adapter "
                                     f"(see {REQUIRES_ADAPTER_FILE}), which lives outside the weights; its weights "
                                     f"are the unchanged base. Train it with lora, qlora, dora, ia3 or full instead")


def _check_pair(a: ModelFacts, b: ModelFacts) -> None:
    pair = f"{a.name!r} and {b.name!r}"
    if a.architecture != b.architecture:
        raise IncompatibleModels(f"cannot merge {pair}: different architectures ({a.architecture} vs "
                                 f"{b.architecture})")
    for key in STRUCTURE_FIELDS:
        if a.structure[key] != b.structure[key]:
            raise IncompatibleModels(f"cannot merge {pair}: different {key} ({a.structure[key]} vs "
                                     f"{b.structure[key]})")
    only_a, only_b = sorted(set(a.tensors) - set(b.tensors)), sorted(set(b.tensors) - set(a.tensors))
    if only_a or only_b:
        name, owner, missing = (only_a[0], a.name, b.name) if only_a else (only_b[0], b.name, a.name)
        raise IncompatibleModels(f"cannot merge {pair}: tensor {name!r} is in {owner!r} but not in {missing!r} "
                                 f"({len(only_a) + len(only_b)} tensors differ)")
    for name in sorted(a.tensors):
        if a.tensors[name] != b.tensors[name]:
            raise IncompatibleModels(f"cannot merge {pair}: tensor {name!r} has shape {a.tensors[name]} vs "
                                     f"{b.tensors[name]}")
    if a.vocabulary_files != b.vocabulary_files:
        _check_vocabulary(a, b, pair)
    if a.chat_template != b.chat_template:
        raise IncompatibleModels(f"cannot merge {pair}: different chat templates ({_template_difference(a, b)}); "
                                 f"the merged model would be prompted one way only")


def _check_vocabulary(a: ModelFacts, b: ModelFacts, pair: str) -> None:
    """The tokenizer files differ: load both and compare token -> id (formatting differences pass)."""
    from transformers import AutoTokenizer

    vocab_a = AutoTokenizer.from_pretrained(a.path).get_vocab()
    vocab_b = AutoTokenizer.from_pretrained(b.path).get_vocab()
    if vocab_a == vocab_b:
        return
    by_id_a, by_id_b = {i: t for t, i in vocab_a.items()}, {i: t for t, i in vocab_b.items()}
    first = min(i for i in set(by_id_a) | set(by_id_b) if by_id_a.get(i) != by_id_b.get(i))
    raise IncompatibleModels(f"cannot merge {pair}: different vocabularies ({len(vocab_a)} vs {len(vocab_b)} "
                             f"tokens; id {first} is {by_id_a.get(first)!r} vs {by_id_b.get(first)!r})")


def _template_difference(a: ModelFacts, b: ModelFacts) -> str:
    if a.chat_template is None or b.chat_template is None:
        missing = a.name if a.chat_template is None else b.name
        return f"{missing!r} has none"
    lines_a, lines_b = a.chat_template.splitlines(), b.chat_template.splitlines()
    line = next((i for i, (x, y) in enumerate(zip(lines_a, lines_b)) if x != y), min(len(lines_a), len(lines_b)))
    return f"first difference on template line {line + 1}"
