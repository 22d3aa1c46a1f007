"""Model cards: a model artifact's full lineage, read from the manifests, as README.md and lineage.json.

Every artifact's ``manifest.json`` names its upstream stages and their content hashes
(:mod:`tunegraph.lineage`), and artifacts of one recipe lie side by side (``data/out/<recipe>/<stage>``,
metrics in ``metrics/<stage>.json`` beside them). :func:`walk_lineage` follows those links from a model
back to its roots; :func:`write_model_card` renders what it finds:

- a YAML header in the Hugging Face model-card style (``base_model``, ``library_name``, ``license``,
  ``tags``);
- the lineage: every ancestor stage, its kind, content hash and inputs;
- the base model(s): the ``import_model`` roots and their source identity (package version and hash);
- the data: each dataset's rows, the sha256 of its ``data.jsonl``, and the workspace files it came from
  with their hashes;
- teachers and judges (a ``teacher``/``judge`` input or setting) and the prompt versions the stage used
  (long prompt texts as a sha256 and their first line; the distilabel version that holds its templates);
- training: strategy, schedule, the saved adapter's configuration, Spectrum's and shrink_model's choices;
- the merge recipe (``mergekit_config.yml``), quantization (``quantize_bnb`` settings or a
  ``quantization_config``) and exported files (a caller such as a GGUF export passes them);
- metrics: each stage's metrics file, and the scores of the eval artifacts given.

A stage that writes a card beside its own files (``export_gguf``) has no manifest yet while it runs: it
describes itself with :func:`running_node` (kind, params, upstream hashes, its metrics), and the card is
that node's: its ancestors are walked from its upstream, it comes last, and its content hash is the one
the artifact's ``manifest.json`` will record (a card cannot hold its own hash).

An upstream artifact rebuilt since its consumer ran (its content hash differs from the one recorded) is
shown, flagged ``changed``; one that is gone is listed as ``missing``. Neither stops the card. The card
holds no timestamps and no absolute paths: the same lineage gives the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from tunegraph.hashing import hash_bytes
from tunegraph.lineage import library_versions, read_manifest, write_json

README = "README.md"
LINEAGE_JSON = "lineage.json"
METRICS_DIR = "metrics"
DATA_FILE = "data.jsonl"
MERGE_CONFIG = "mergekit_config.yml"
ROLE_KEYS = ("teacher", "judge", "student", "reward_model")  # slots / settings naming another model's role
PROMPT_KEYS = ("prompt", "template", "rubric", "criteria", "application_description", "system_prompt", "judge_template")
SHORT_TEXT = 80
RUNNING = "this artifact"  # the content hash cell of a node whose manifest is being written with the card
EVALS_SLOT = "evals"  # eval artifacts a stage was given for its card: scored in the card, not ancestors
TRAINING_KEYS = ("strategy", "method", "epochs", "max_steps", "batch_size", "grad_accum", "learning_rate",
                 "max_length", "beta", "temperature", "alpha")


@dataclass(frozen=True)
class LineageNode:
    """One artifact of the lineage, as its manifest and the files beside it describe it."""

    stage: str
    status: str  # "ok", "changed" (rebuilt since its consumer ran) or "missing"
    manifest: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # rows, adapters, merge recipe...: see _details

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "?")

    @property
    def params(self) -> dict:
        return self.manifest.get("params", {})

    @property
    def upstream(self) -> dict[str, str]:
        return {slot: up["stage"] for slot, up in sorted(self.manifest.get("upstream", {}).items())}


def read_node(directory: Path, expected_hash: str | None = None) -> LineageNode:
    """One artifact as a node; ``expected_hash``: the content hash its consumer recorded."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return LineageNode(directory.name, "missing")
    changed = expected_hash is not None and manifest.get("content_hash") != expected_hash
    return LineageNode(manifest["stage"], "changed" if changed else "ok", manifest,
                       _metrics(directory.parent, manifest["stage"]), _details(directory, manifest))


def walk_lineage(artifact_dir: Path) -> list[LineageNode]:
    """The artifact and every ancestor, ancestors first (depth-first by slot name: a stable order)."""
    artifact_dir = Path(artifact_dir)
    return _walk(artifact_dir.parent, read_node(artifact_dir))


def walk_running(node: LineageNode, root: Path) -> list[LineageNode]:
    """The lineage of a node being written now (:func:`running_node`), its upstream artifacts in ``root``:
    every ancestor, then the node. Its ``evals`` inputs are left out: they are scored, not ancestors."""
    return _walk(Path(root), node, skip_slots=(EVALS_SLOT,))


def _walk(root: Path, last: LineageNode, skip_slots: tuple[str, ...] = ()) -> list[LineageNode]:
    nodes: dict[str, LineageNode] = {}

    def visit(node: LineageNode) -> None:
        for slot, upstream in sorted(node.manifest.get("upstream", {}).items()):
            if upstream["stage"] not in nodes and not (node is last and slot.split(".")[0] in skip_slots):
                visit(read_node(root / upstream["stage"], upstream["content_hash"]))
        nodes.setdefault(node.stage, node)

    visit(last)
    return list(nodes.values())


def running_node(stage: str, kind: str, params: Mapping, inputs: Mapping[str, Path | Mapping[str, Path]], *,
                 artifact_type: str, seed: int, threads: int, code_version: str, metrics: Mapping | None = None,
                 details: Mapping | None = None) -> LineageNode:
    """The node of a stage that is writing its card now, as its manifest will describe it (no hashes of its own).

    ``inputs`` as the stage function got them: a directory per slot, or a name -> directory mapping for a
    ``many`` slot (recorded as ``slot.0``, ``slot.1``... as the runner does).
    """
    upstream = {}
    for slot, value in sorted(inputs.items()):
        directories = list(value.values()) if isinstance(value, Mapping) else [value]
        keys = [f"{slot}.{i}" for i in range(len(directories))] if isinstance(value, Mapping) else [slot]
        for key, directory in zip(keys, directories):
            manifest = read_manifest(Path(directory)) or {}
            upstream[key] = {"stage": Path(directory).name, "content_hash": manifest.get("content_hash", "?")}
    manifest = {"stage": stage, "kind": kind, "artifact_type": artifact_type, "params": dict(params),
                "upstream": upstream, "code_version": code_version, "seed": seed, "threads": threads,
                "libraries": library_versions()}
    return LineageNode(stage, "ok", manifest, dict(metrics or {}), dict(details or {}))


def _metrics(root: Path, stage: str) -> dict:
    path = root / METRICS_DIR / f"{stage}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _details(directory: Path, manifest: dict) -> dict:
    """What the card shows of an artifact beyond its manifest, read from its files."""
    details: dict = {}
    files = manifest.get("files", {})
    if DATA_FILE in files:
        with open(directory / DATA_FILE, "rb") as handle:
            details["rows"] = sum(1 for _ in handle)
        details["data_sha256"] = files[DATA_FILE]
    for name in ("adapter/adapter_config.json", "spectrum.json", "shrink.json"):
        if name in files:
            details[name.split("/")[0].removesuffix(".json")] = json.loads((directory / name).read_text("utf-8"))
    if MERGE_CONFIG in files:
        details["merge"] = (directory / MERGE_CONFIG).read_text(encoding="utf-8")
    if "config.json" in files:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        details["architecture"] = {key: config[key] for key in ("model_type", "num_hidden_layers", "hidden_size",
                                                                 "vocab_size") if key in config}
        if "quantization_config" in config:
            details["quantization"] = config["quantization_config"]
    if "scores.json" in files:
        details["scores"] = json.loads((directory / "scores.json").read_text(encoding="utf-8"))
    return details


def prompt_versions(params: Mapping, path: str = "") -> dict[str, str]:
    """Prompt-like params (anywhere in the params tree): short ones as they are, long ones as
    ``sha256:<12 hex> "<first line>"``."""
    found: dict[str, str] = {}
    for key, value in sorted(params.items()):
        where = f"{path}{key}"
        if isinstance(value, Mapping):
            found.update(prompt_versions(value, f"{where}."))
        elif key in PROMPT_KEYS and isinstance(value, str):
            first = value.strip().splitlines()[0] if value.strip() else ""
            found[where] = value if len(value) <= SHORT_TEXT and "\n" not in value else \
                f"sha256:{hash_bytes(value.encode())[:12]} \"{first[:SHORT_TEXT]}\""
    return found


def _roles(node: LineageNode) -> dict[str, str]:
    """Other models a stage used and in which role: input slots and LLM settings (teacher, judge...)."""
    roles = {slot: f"stage `{stage}`" for slot, stage in node.upstream.items() if slot.split(".")[0] in ROLE_KEYS}
    for key in ROLE_KEYS:
        setting = node.params.get(key)
        if isinstance(setting, Mapping) and setting.get("model"):
            where = f" at {setting['base_url']}" if setting.get("base_url") else ""
            roles[key] = f"`{setting['model']}`{where}"
    return roles


# --- rendering -----------------------------------------------------------------------------------

def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows] + [""]


def _front_matter(nodes: list[LineageNode], license: str, exports: Mapping[str, Mapping] | None) -> list[str]:
    bases = [n.params.get("model", "") for n in nodes if n.kind == "import_model" and n.params.get("model")]
    tags = sorted({"tunegraph", *(n.kind.replace("_", "-") for n in nodes if n.kind not in ("?", "load_dataset")),
                   *(["gguf"] if any(name.endswith(".gguf") for name in exports or {}) else []),
                   *(n.params["strategy"] for n in nodes if isinstance(n.params.get("strategy"), str))})
    lines = ["---"]
    if bases:
        lines.append(f"base_model: {json.dumps(bases[0])}" if len(bases) == 1 else
                     "base_model:\n" + "\n".join(f"- {json.dumps(b)}" for b in bases))
    lines += ["library_name: transformers", f"license: {license}", "pipeline_tag: text-generation", "tags:"]
    return lines + [f"- {tag}" for tag in tags] + ["---", ""]


def render_model_card(nodes: list[LineageNode], *, title: str, license: str = "unknown",
                      evals: list[LineageNode] = (), exports: Mapping[str, Mapping] | None = None) -> str:
    """The README.md text for the last node of ``nodes`` (see :func:`walk_lineage`)."""
    model = nodes[-1]
    lines = _front_matter(nodes, license, exports) + [f"# {title}", ""]
    if not _is_running(model):
        lines += [f"Produced by stage `{model.stage}` (kind `{model.kind}`) of a tunegraph recipe: content hash "
                  f"`{model.manifest.get('content_hash', '?')}`, "
                  f"fingerprint `{model.manifest.get('fingerprint', '?')}`.",
                  "Everything below is read from the artifacts' `manifest.json` files.", ""]
    else:  # a running node (running_node): the card is part of its artifact and cannot hold its hash
        sources = ", ".join(f"`{up['stage']}` (`{up['content_hash'][:16]}`)" for slot, up in
                            sorted(model.manifest.get("upstream", {}).items()) if slot.split(".")[0] != EVALS_SLOT)
        lines += [f"Produced by stage `{model.stage}` (kind `{model.kind}`) of a tunegraph recipe from {sources}; "
                  "the `manifest.json` beside this card holds its content hash and fingerprint.",
                  "Everything below is read from the artifacts' `manifest.json` files.", ""]
    # a running export describes no weights of its own: the architecture is its source model's
    source = model if not _is_running(model) else next((n for n in nodes if n.stage == model.upstream.get("model")),
                                                       model)
    if source.details.get("architecture"):
        lines += ["Architecture: " + ", ".join(f"{k} {v}" for k, v in source.details["architecture"].items()) + ".",
                  ""]
    for section in (_lineage_section, _base_section, _data_section, _teacher_section, _training_section,
                    _merge_section):
        lines += section(nodes)
    lines += _quantization_section(nodes, exports)
    lines += _metrics_section(nodes, evals)
    lines += _reproducibility_section(model)
    return "\n".join(lines)


def _is_running(node: LineageNode) -> bool:
    """A node from :func:`running_node`: described, but without the hashes its manifest will record."""
    return node.status == "ok" and "content_hash" not in node.manifest


def _lineage_section(nodes: list[LineageNode]) -> list[str]:
    return ["## Lineage", ""] + _table(
        ["stage", "kind", "produces", "content hash", "inputs", "status"],
        [[f"`{n.stage}`", n.kind, n.manifest.get("artifact_type", "?"),
          RUNNING if _is_running(n) else f"`{n.manifest.get('content_hash', '?')[:16]}`",
          ", ".join(f"{slot}: `{stage}`" for slot, stage in n.upstream.items()) or "-", n.status] for n in nodes])


def _base_section(nodes: list[LineageNode]) -> list[str]:
    roots = [n for n in nodes if n.kind == "import_model"]
    lines = [f"- `{n.params.get('model')}` (stage `{n.stage}`, {n.params.get('dtype', '')})"
             + (f": {n.manifest['source']}" if n.manifest.get("source") else "") for n in roots]
    return ["## Base model", "", *lines, ""] if lines else []


def _data_section(nodes: list[LineageNode]) -> list[str]:
    datasets = [n for n in nodes if "rows" in n.details]

    def sources(n: LineageNode) -> str:  # workspace files (load_dataset) or upstream stages (generated data)
        files = sorted(n.manifest.get("input_files", {}).items())
        return (", ".join(f"`{path}` `{digest}`" for path, digest in files)
                or ", ".join(f"`{stage}`" for stage in n.upstream.values()) or "-")

    return (["## Data", ""] + _table(
        ["stage", "kind", "rows", "data.jsonl sha256", "from (sha256)"],
        [[f"`{n.stage}`", n.kind, n.details["rows"], f"`{n.details['data_sha256']}`", sources(n)]
         for n in datasets])) if datasets else []


def _merge_section(nodes: list[LineageNode]) -> list[str]:
    lines = []
    for n in (n for n in nodes if "merge" in n.details):
        lines += [f"## Merge recipe (stage `{n.stage}`)", "", "```yaml", n.details["merge"].rstrip(), "```", ""]
    return lines


def _quantization_section(nodes: list[LineageNode], exports: Mapping[str, Mapping] | None) -> list[str]:
    quantized = [n for n in nodes if n.kind == "quantize_bnb" or "quantization" in n.details]
    if not quantized and not exports:
        return []
    lines = ["## Quantization and export", ""]
    lines += [f"- stage `{n.stage}` ({n.kind}): `{_cell(n.details.get('quantization', n.params))}`" for n in quantized]
    if exports:
        columns = sorted({key for entry in exports.values() for key in entry})
        lines += [""] + _table(["file", *columns], [[f"`{name}`", *(entry.get(c, "") for c in columns)]
                                                     for name, entry in sorted(exports.items())])
    return lines + [""]


def _reproducibility_section(model: LineageNode) -> list[str]:
    libraries = model.manifest.get("libraries", {})
    return ["## Reproducibility", "",
            f"- seed {model.manifest.get('seed', '?')}, {model.manifest.get('threads', '?')} torch threads, "
            f"code version `{model.manifest.get('code_version', '?')[:16]}`",
            "- libraries: " + (", ".join(f"{k} {v}" for k, v in sorted(libraries.items())) or "unknown"), ""]


def _teacher_section(nodes: list[LineageNode]) -> list[str]:
    rows = []
    for n in nodes:
        roles, prompts = _roles(n), prompt_versions(n.params)
        if roles or prompts:
            rows.append([f"`{n.stage}`", n.kind, "; ".join(f"{k}: {v}" for k, v in roles.items()) or "-",
                         "; ".join(f"{k}: {v}" for k, v in prompts.items()) or "-",
                         n.manifest.get("source", "") or "-"])
    return (["## Teachers, judges and prompts", ""]
            + _table(["stage", "kind", "models", "prompt versions", "source"], rows)) if rows else []


def _training_section(nodes: list[LineageNode]) -> list[str]:
    trained = [n for n in nodes if "strategy" in n.params or n.kind == "shrink_model"]
    if not trained:
        return []
    lines = ["## Training and student construction", ""] + _table(
        ["stage", "kind", "settings", "adapter"],
        [[f"`{n.stage}`", n.kind, ", ".join(f"{k}={n.params[k]}" for k in TRAINING_KEYS if k in n.params)
          or n.details.get("shrink", "-"), _adapter(n.details.get("adapter"))] for n in trained])
    spectrum = [f"- `{n.stage}`: Spectrum trained {len(n.details['spectrum'].get('trainable_parameters', []))} "
                f"tensors (`spectrum.json`)" for n in trained if "spectrum" in n.details]
    return lines + (spectrum + [""] if spectrum else [])


def _adapter(config: dict | None) -> str:
    if not config:
        return "-"
    keys = ("peft_type", "r", "lora_alpha", "use_dora", "target_modules", "num_virtual_tokens")
    return ", ".join(f"{k}={config[k]}" for k in keys if config.get(k) not in (None, False))


def _metrics_section(nodes: list[LineageNode], evals: list[LineageNode]) -> list[str]:
    lines = ["## Metrics", ""]
    lines += [f"- `{n.stage}` ({n.kind}): " + ", ".join(f"{k}={_cell(v)}" for k, v in sorted(n.metrics.items()))
              for n in nodes if n.metrics and n.kind != "import_model"]
    if evals:
        # deltas are against each eval's own baseline: the absolute scores side by side say more here
        keys = sorted({k for e in evals for k, v in e.details.get("scores", {}).items()
                       if isinstance(v, (int, float)) and not k.startswith("delta_")})
        lines += ["", "Evaluations:", ""] + _table(
            ["eval stage", "model evaluated", *keys],
            [[f"`{e.stage}`", _evaluated(e, nodes), *(e.details.get("scores", {}).get(k, "") for k in keys)]
             for e in evals])
    return lines + [""]


def _evaluated(evaluation: LineageNode, nodes: list[LineageNode]) -> str:
    """Which model an eval artifact scored: this one, an ancestor (e.g. the base or the teacher), or another."""
    upstream = evaluation.manifest.get("upstream", {}).get("model", {})
    if not upstream:
        return "?"
    label = f"`{upstream['stage']}`"
    if upstream.get("content_hash") == nodes[-1].manifest.get("content_hash"):
        return f"{label} (this model)"
    if upstream.get("content_hash") == nodes[-1].manifest.get("upstream", {}).get("model", {}).get("content_hash") \
            and nodes[-1].manifest.get("artifact_type") != "model":
        return f"{label} (this model, before export)"
    if any(n.manifest.get("content_hash") == upstream.get("content_hash") for n in nodes):
        return f"{label} (in the lineage)"
    return f"{label} (not in this lineage)"


def lineage_json(nodes: list[LineageNode], evals: list[LineageNode]) -> dict:
    """The machine-readable card: every node's manifest (files omitted), metrics and details."""
    def entry(n: LineageNode) -> dict:
        manifest = {k: v for k, v in n.manifest.items() if k != "files"}
        return {"stage": n.stage, "status": n.status, "manifest": manifest, "metrics": n.metrics,
                "details": n.details}
    return {"model": nodes[-1].stage, "lineage": [entry(n) for n in nodes], "evals": [entry(e) for e in evals]}


def write_model_card(model_dir: Path, dest: Path, *, title: str | None = None, license: str = "unknown",
                     evals: Mapping[str, Path] | None = None, exports: Mapping[str, Mapping] | None = None,
                     running: LineageNode | None = None) -> list[LineageNode]:
    """Write ``README.md`` and ``lineage.json`` for the model artifact ``model_dir`` into ``dest``.

    ``evals``: eval artifacts (stage name -> directory) whose scores join the card; ``exports``: files the
    caller wrote beside the card (file name -> facts such as type, bytes, perplexity delta), e.g. a GGUF
    export's; ``running``: the caller's own node (:func:`running_node`) when the card is of the artifact
    being written, ``model_dir`` being its model input. Returns the lineage, ancestors first.
    """
    nodes = walk_running(running, Path(model_dir).parent) if running is not None else walk_lineage(model_dir)
    eval_nodes = [read_node(path) for path in (evals or {}).values()]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    text = render_model_card(nodes, title=title or nodes[-1].stage, license=license, evals=eval_nodes,
                             exports=exports)
    (dest / README).write_text(text, encoding="utf-8")
    write_json(dest / LINEAGE_JSON, lineage_json(nodes, eval_nodes))
    return nodes

