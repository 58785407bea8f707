"""Errors reported to the user as one line by the CLI (besides `pipeline.config.ConfigError`)."""


class TrainingAborted(RuntimeError):
    """The run cannot go on (an actor died for good, a worker keeps dying); the message says what to do."""
