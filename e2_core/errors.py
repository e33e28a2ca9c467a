"""The package's own error types."""


class CheckpointError(ValueError):
    """A file or directory that is not the checkpoint it was expected to be; the message says what to do."""
