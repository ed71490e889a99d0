"""The one exception the tuning commands raise for bad input; the CLI maps it to exit code 2."""


class UsageError(Exception):
    """Bad input (missing model directory, unreachable daemon, impossible objective...)."""
