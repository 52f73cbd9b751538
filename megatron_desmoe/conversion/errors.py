"""Errors about checkpoint contents (as opposed to `ConfigError`, about settings)."""


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, unexpected, malformed or the wrong shape.

    `subject` names the tensor or file, so that the message says exactly what to look at.
    """

    def __init__(self, subject: str, problem: str, fix: str):
        self.subject = subject
        super().__init__(f"{subject}: {problem}. Fix: {fix}")
