"""One base error for everything a user can cause, and a few subclasses.

The CLI turns any :class:`CifarlabError` into a one-paragraph message and a non-zero exit
code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["CifarlabError", "ConfigError", "DataError", "ModelError", "RunError", "StudyError"]


class CifarlabError(Exception):
    """Base class: the message says what went wrong and what to do about it."""

    exit_code = 2


class ConfigError(CifarlabError):
    """A configuration value or option is invalid."""


class DataError(CifarlabError):
    """A dataset, image or archive cannot be read, or is not where it was looked for."""

    exit_code = 3


class ModelError(CifarlabError):
    """An unknown model name or an incompatible set of weights."""


class RunError(CifarlabError):
    """A run folder is missing, incomplete or damaged."""

    exit_code = 4


class StudyError(CifarlabError):
    """A tuning study is missing, cannot be reached, or has no usable trials."""

    exit_code = 5
