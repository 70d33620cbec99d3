"""One root exception for everything autocompress reports to a user.

Messages follow one shape: what is wrong (naming the parameter or key), the value received, and the fix.
The CLI prints ``str(error)`` and exits non-zero; it never shows a traceback for these. Exit codes: 2 for
these errors, 3 when a search finished but no trial meets the constraints, 130 when interrupted, 1 for an
unexpected exception (a bug: its traceback is saved to a file, see :mod:`autocompress.guards`).
"""

from __future__ import annotations


class AutocompressError(Exception):
    """Root of every error autocompress raises on purpose."""

    exit_code: int = 2


class SpecError(AutocompressError):
    """The search spec (YAML or ``--set`` overrides) is invalid."""


class DataError(AutocompressError):
    """Task data could not be found, read or understood."""


class ModelError(AutocompressError):
    """The base model could not be loaded, or a technique does not support it."""


class PluginError(AutocompressError):
    """A plugin failed to load or handed back something invalid."""


class TrialError(AutocompressError):
    """A trial failed for a reason worth recording (the study goes on)."""


class StudyError(AutocompressError):
    """A study or results folder is missing, inconsistent or cannot be written."""


class NoFeasibleTrial(StudyError):
    """The search finished and saved every trial, but none meets the spec's constraints."""

    exit_code = 3


def close_matches(word: str, candidates: list[str] | tuple[str, ...] | set[str]) -> str:
    """Return a ' Did you mean ...?' hint, or '' when nothing is close."""
    import difflib

    found = difflib.get_close_matches(str(word), sorted(candidates), n=1, cutoff=0.6)
    return f" Did you mean {found[0]!r}?" if found else ""
