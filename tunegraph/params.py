"""Base class for stage params: strict pydantic models whose file fields feed the fingerprint."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict


class _InputFileMarker:
    """Metadata marking a params field as a path to a workspace file the stage reads."""


# A params field holding a path (relative to the workspace) that the stage reads: its content
# hash enters the fingerprint and it becomes a DVC dependency.
InputFile = Annotated[str, _InputFileMarker()]


class StageParams(BaseModel):
    """Params of a stage kind. Unknown keys are errors; values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def input_files(self) -> list[str]:
        """Workspace paths this stage reads besides its upstream artifacts."""
        files = []
        for name, info in type(self).model_fields.items():
            if any(isinstance(m, _InputFileMarker) for m in info.metadata):
                value = getattr(self, name)
                if value:
                    files.append(value)
        return files

    def source_identity(self) -> str:
        """Extra text for the fingerprint naming an external source (e.g. a packaged model)."""
        return ""
