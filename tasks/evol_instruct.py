"""Stage kind ``evol_instruct``: rewrite each instruction into a harder or rarer one, then answer it.

Evol-Instruct (WizardLM, Xu et al. 2023, https://arxiv.org/abs/2304.12244). Each evolution picks a
mutation per row (seeded by the stage seed, the row id and the evolution number) from distilabel's
``EvolInstruct`` mutation templates (add constraints, deepen, concretize, more reasoning steps,
breadth), asks the teacher to rewrite the instruction with it, and parses the reply as distilabel does
(the text after the last ``Prompt#:``). An evolution fails, as in the paper's elimination step, when
the reply is empty or missing, unchanged, leaks the template's wording ("#Rewritten Prompt#", "given
prompt", ...), or is a short refusal ("sorry" in under 80 words): that row is dropped and counted.
The evolved instructions are then answered by the teacher.

distilabel's ``EvolInstruct.process`` is not called: it picks mutations with numpy's global RNG and
fails the whole batch on one missing reply; the templates and the parsing rule are the task's own.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pydantic import Field, field_validator

from tunegraph.chat_data import dataset_file, read_rows, write_rows
from tunegraph.context import StageContext
from tunegraph.errors import StageError
from tunegraph.llm_backend import LLMSettings, LLMStageParams, Sampling, distilabel_task, open_backend, request_seed
from tunegraph.registry import InputSlot, StageResult, stage
from tunegraph.row_cache import ChatCounts, RowCache, cached_chat, chat_request
from tunegraph.tasks.self_instruct import answer_instructions, instruction_of, require_rows

PLACEHOLDER = "<PROMPT>"  # where distilabel's mutation templates put the instruction
_LEAKS = ("#the given prompt#", "#rewritten prompt#", "#created prompt#", "#given prompt#",
          "given prompt", "rewritten prompt", "created prompt")


class EvolInstructParams(LLMStageParams):
    LLM_FIELDS = ("teacher",)

    teacher: LLMSettings | None = Field(None, description="the LLM that rewrites and answers instructions "
                                                          "(default: the model connected to input 'teacher')")
    evolutions: int = Field(1, ge=1, description="rewrites applied in a row to each instruction")
    mutations: list[str] | None = Field(None, description="mutation names to pick from (default: all of "
                                                          "distilabel's, plus those in 'templates')")
    templates: dict[str, str] = Field(default_factory=dict, description="extra or replacement mutation templates "
                                                                        "by name; each holds <PROMPT>")
    keep_original: bool = Field(True, description="also write the input rows to the output")
    responses: int = Field(1, ge=1, description="answers per evolved instruction (>1 with sampling: pair candidates)")
    limit: int | None = Field(None, ge=1, description="evolve the first N distinct instructions only")
    sampling: Sampling = Field(default_factory=lambda: Sampling(max_new_tokens=160, temperature=0.7, top_p=0.95),
                               description="sampling of the rewriting calls")
    answer_sampling: Sampling = Field(default_factory=lambda: Sampling(max_new_tokens=256),
                                      description="sampling of the answers (default greedy)")

    @field_validator("templates")
    @classmethod
    def _templates_hold_placeholder(cls, value: dict[str, str]) -> dict[str, str]:
        for name, template in value.items():
            if PLACEHOLDER not in template:
                raise ValueError(f"template {name!r} has no {PLACEHOLDER} (where the instruction goes)")
        return value


def mutation_templates(params: EvolInstructParams, stage_name: str) -> dict[str, str]:
    """The templates to pick from, by name, in a fixed order."""
    available = {**distilabel_task("EvolInstruct", num_evolutions=1).mutation_templates, **params.templates}
    names = params.mutations if params.mutations is not None else list(available)
    unknown = [name for name in names if name not in available]
    if unknown or not names:
        raise StageError(f"stage {stage_name!r}: params.mutations: unknown mutation {unknown[0] if unknown else '(none)'}"
                         f"; available: {', '.join(available)}")
    return {name: available[name] for name in names}


def evolved_instruction(reply: str | None, before: str) -> str | None:
    """The rewritten instruction in a teacher reply, or None when the evolution failed (see module doc)."""
    if reply is None:
        return None
    text = reply.split("Prompt#:")[-1].strip()  # distilabel EvolInstruct's parsing of the reply
    lowered = text.lower()
    if not text or " ".join(lowered.split()) == " ".join(before.lower().split()):
        return None
    if any(leak in lowered for leak in _LEAKS):
        return None
    if "sorry" in lowered and len(text.split()) < 80:
        return None
    return text


@stage("evol_instruct", params=EvolInstructParams, produces="dataset",
       inputs=(InputSlot("dataset", ("dataset",)), InputSlot("teacher", ("model",), optional=True)),
       summary_metrics=("evolved", "rows"))
def evol_instruct(params: EvolInstructParams, inputs: dict[str, Path], out: Path, ctx: StageContext) -> StageResult:
    """Evol-Instruct: rewrite instructions into more complex ones with a teacher LLM, then answer them."""
    rows = read_rows(inputs["dataset"])
    first_rows = {}  # one source row per distinct instruction (rows may hold several answers to one)
    for row in rows:
        first_rows.setdefault(instruction_of(row), row)
    sources = list(first_rows.values())[: params.limit]
    templates = mutation_templates(params, ctx.stage)
    backend = open_backend(params.teacher, inputs.get("teacher"), stage=ctx.stage, role="teacher",
                           workspace=ctx.workspace)
    ctx.info(f"teacher: {backend.description}; evolving {len(sources)} instructions x {params.evolutions}")
    cache, counts = RowCache.for_stage(ctx), ChatCounts()
    # one lineage per source row: the instructions it went through, the mutations applied, and where it failed
    lineages = [{"source_id": row["id"], "instructions": [instruction_of(row)], "mutations": []} for row in sources]
    alive = list(range(len(lineages)))
    failed = 0
    for evolution in range(params.evolutions):
        requests = []
        for index in alive:
            lineage = lineages[index]
            choice = random.Random(request_seed(ctx.seed, f"mutation:{evolution}:{lineage['source_id']}"))
            mutation = choice.choice(sorted(templates))
            lineage["mutations"].append(mutation)
            prompt = templates[mutation].replace(PLACEHOLDER, lineage["instructions"][-1])
            requests.append(chat_request(f"evolve:{evolution}:{lineage['source_id']}",
                                         [{"role": "user", "content": prompt}]))
        replies = cached_chat(backend, cache, requests, params.sampling, ctx.seed, counts,
                              on_progress=lambda d, t: ctx.progress(d, t, f"evolution {evolution + 1}"))
        survivors = []
        for index, reply in zip(alive, replies):
            evolved = evolved_instruction(reply, lineages[index]["instructions"][-1])
            if evolved is None:
                lineages[index].update(failed_at=evolution, failed_reply=reply)
                failed += 1
                continue
            lineages[index]["instructions"].append(evolved)
            survivors.append(index)
        alive = survivors
    final = list(dict.fromkeys(lineages[i]["instructions"][-1] for i in alive))  # two rows may evolve alike
    answered, answer_counts = answer_instructions(backend, cache, final, params.responses, params.answer_sampling,
                                                  ctx, counts)
    output = list(rows) if params.keep_original else []
    known = {row["id"] for row in output}
    output += [row for row in answered if row["id"] not in known]
    metrics = {"sources": len(sources), "failed_evolutions": failed, "evolved": len(final), **answer_counts,
               "rows": len(output)}
    require_rows(output, ctx.stage, metrics, "a stronger teacher or other mutations may help")
    write_rows(output, dataset_file(out))
    with open(out / "evolutions.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(lineage, sort_keys=True, ensure_ascii=False) + "\n" for lineage in lineages)
    return StageResult(metrics={k: float(v) for k, v in metrics.items()},
                       timings={"requests_sent": counts.sent, "requests_resumed": counts.reused})
