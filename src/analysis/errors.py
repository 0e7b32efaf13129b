"""Every error the package raises on purpose, with the facts a person needs to fix it.

The CLI turns these into exit codes and one readable message; anything else is a bug
and shows a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "AnalysisError",
    "ConfigError",
    "DataContractError",
    "InsufficientDataError",
    "PipelineError",
]


class AnalysisError(Exception):
    """Base class: an expected failure with a message meant for a person."""

    exit_code = 1


class ConfigError(AnalysisError):
    """The run configuration is missing, malformed or names an invalid option."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None, key: str | None = None):
        self.path = None if path is None else str(path)
        self.key = key
        where = []
        if self.path:
            where.append(f"config {self.path}")
        if key:
            where.append(f"key '{key}'")
        prefix = f"{', '.join(where)}: " if where else ""
        super().__init__(prefix + message)


class DataContractError(AnalysisError):
    """An input file cannot be used at all: the run stops.

    Parameters
    ----------
    file : the input file.
    rule : short name of the rule that failed (e.g. ``required_column``).
    message : what is wrong and what to do about it.
    column : the contract or source column concerned, if any.
    n_rows : how many rows break the rule, if it is about rows.
    examples : a few offending values or column names.
    """

    exit_code = 3

    def __init__(
        self,
        *,
        file: str | Path,
        rule: str,
        message: str,
        column: str | None = None,
        n_rows: int | None = None,
        examples: Sequence[object] = (),
    ):
        self.file = str(file)
        self.rule = rule
        self.column = column
        self.n_rows = n_rows
        self.examples = [str(e) for e in list(examples)[:5]]
        parts = [f"{self.file}: {message}", f"  rule: {rule}"]
        if column is not None:
            parts.append(f"  column: {column}")
        if n_rows is not None:
            parts.append(f"  rows: {n_rows:,}")
        if self.examples:
            parts.append("  examples: " + ", ".join(repr(e) for e in self.examples))
        super().__init__("\n".join(parts))


class InsufficientDataError(AnalysisError):
    """There is too little data for a step to give a meaningful answer."""

    exit_code = 4


class PipelineError(AnalysisError):
    """A notebook of the pipeline failed; the last good report is left untouched."""

    exit_code = 5

    def __init__(self, message: str, *, notebook: str | None = None, cell: int | None = None,
                 kept: str | Path | None = None, cause: str | None = None):
        self.notebook = notebook
        self.cell = cell
        self.kept = None if kept is None else str(kept)
        # a notebook that stopped on one of our own errors exits with that error's code
        # (3: fix the input, 4: too little data); anything else is a failed notebook (5)
        known = {cls.__name__: cls.exit_code
                 for cls in (ConfigError, DataContractError, InsufficientDataError)}
        self.exit_code = known.get(cause or "", PipelineError.exit_code)
        super().__init__(message)
