"""Base class for stage params: strict pydantic models whose file fields feed the fingerprint."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict


class _InputFileMarker:
    """Metadata marking a params field as a path to a workspace file the stage reads."""


# A params field holding a path (relative to the workspace) that the stage reads: its content
# hash enters the fingerprint and it becomes a DVC dependency.
InputFile = Annotated[str, _InputFileMarker()]


class StageParams(BaseModel):
    """Params of a stage kind. Unknown keys are errors; values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Fields that cannot change the output (e.g. how often to checkpoint): left out of the
    # fingerprint and the manifest, so changing them neither re-runs the stage nor loses a resume point.
    NOT_IN_FINGERPRINT: ClassVar[frozenset[str]] = frozenset()

    def fingerprint_params(self) -> dict:
        """The params as they enter the fingerprint and the manifest."""
        return self.model_dump(mode="json", exclude=set(self.NOT_IN_FINGERPRINT))

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
