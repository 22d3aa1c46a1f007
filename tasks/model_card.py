"""Stage kind ``model_card``: a model's card, README.md (Hugging Face style) and lineage.json, from its lineage.

The card lists everything that made the model, read from the manifests of its ancestors
(:mod:`tunegraph.model_card`): data rows and their hashes, teacher and judge models and prompt versions,
base model, adapters, merge recipe, quantization and metrics, plus the scores of the ``evals`` given
(evaluate stages, usually of this model and its baselines). The artifact holds the two card files only,
not a copy of the weights: publish the model directory with this README.md beside it. Stages that export
files call :func:`tunegraph.model_card.write_model_card` to put a card next to them: ``export_gguf``
writes README.md beside its ``.gguf`` files, the card of the export itself (its lineage, then its files,
quantization and read-back checks), so a GGUF needs no model_card stage.

A card is a function of its inputs' manifests; the ancestors' manifests are found beside the model
artifact (one recipe's outputs share a directory).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from tunegraph.context import StageContext
from tunegraph.model_card import write_model_card
from tunegraph.params import StageParams
from tunegraph.registry import InputSlot, StageResult, stage


class ModelCardParams(StageParams):
    title: str | None = Field(None, description="the card's heading (default: the model's stage name)")
    license: str = Field("unknown", description="license id for the card's header (the recipe cannot know it)")


@stage("model_card", params=ModelCardParams, produces="eval",
       inputs=(InputSlot("model", ("model",)), InputSlot("evals", ("eval",), optional=True, many=True)),
       summary_metrics=("lineage_stages", "datasets"))
def model_card(params: ModelCardParams, inputs: dict, out: Path, ctx: StageContext) -> StageResult:
    """Write README.md and lineage.json for the input model."""
    evals = dict(inputs.get("evals", {}))
    nodes = write_model_card(inputs["model"], out, title=params.title, license=params.license, evals=evals)
    return StageResult(metrics={"lineage_stages": len(nodes), "datasets": sum("rows" in n.details for n in nodes),
                                "missing_or_changed": sum(n.status != "ok" for n in nodes), "evals": len(evals)})
