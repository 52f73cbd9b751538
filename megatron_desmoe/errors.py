"""Errors raised for bad user input, before any work starts."""


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field and a valid value."""

    def __init__(self, field: str, problem: str, fix: str):
        self.field = field
        super().__init__(f"{field}: {problem}. Fix: {fix}")
