"""Errors a user can cause. Each carries a one-line message naming where and what to do.

The CLI prints ``error: <message>`` and exits 2 for any :class:`TunegraphError`; everything
else is a bug and keeps its traceback.
"""


class TunegraphError(Exception):
    """Base class for user-facing errors (bad recipe, bad data, missing model...)."""

    exit_code = 2


class RecipeError(TunegraphError):
    """The recipe file is malformed: unknown key, wrong type, cycle, missing input."""


class DataError(TunegraphError):
    """An input data file is malformed; the message names file, line and field."""


class ModelError(TunegraphError):
    """A model spec cannot be resolved (missing path, hub id offline, bad package)."""


class StageError(TunegraphError):
    """A stage refused its inputs or failed for a reason the user can fix."""
