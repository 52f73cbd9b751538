"""Errors for bad input data. Configuration mistakes raise megatron_desmoe.errors.ConfigError."""

from __future__ import annotations


class DataError(ValueError):
    """An input file or record cannot be used. The message names the file and the record."""


class RecordError(DataError):
    """One record is malformed or lacks a field. `--on-error skip` skips these (and counts them)."""

    def __init__(self, location: str, problem: str, reason: str = "malformed"):
        self.location = location
        self.problem = problem
        self.reason = reason
        super().__init__(f"{location}: {problem}")


class TokenizerMismatchError(DataError):
    """The tokenizer given to training is not the one the data was tokenized with."""
