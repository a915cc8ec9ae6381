"""Errors shared across the package."""


class UsageError(Exception):
    """An error in what the user asked for (an argument, a missing file); the CLI prints it as one
    line and exits with code 2."""
