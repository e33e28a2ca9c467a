"""The package's own error types, and the check of command-line counts."""


class CheckpointError(ValueError):
    """A file or directory that is not the checkpoint it was expected to be; the message says what to do."""


def check_at_least(least, **options) -> None:
    """Raises ValueError for the first of ``options`` (unset ones skipped) below ``least``, named as its flag."""
    for name, value in options.items():
        if value is not None and value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
