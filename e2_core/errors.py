"""The package's own error types, and the check of counts."""


class CheckpointError(ValueError):
    """A file or directory that is not the checkpoint it was expected to be; the message says what to do."""


class MethodsFailed(RuntimeError):
    """Some methods of a side-by-side run failed; the others' results were written. The message names each."""


def check_at_least(least, **options) -> None:
    """Raises ValueError for the first of ``options`` (unset ones skipped) below ``least``, named as a parameter
    (``batch_size=0: must be >= 1``; the command line says ``--batch-size``)."""
    for name, value in options.items():
        if value is not None and value < least:
            raise ValueError(f"{name}={value}: must be >= {least}")
