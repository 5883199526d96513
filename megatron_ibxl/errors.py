"""Errors a user can cause, each reported as one line and a non-zero exit by the CLI."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: the message says what is wrong and how to fix it."""

    exit_code = 2
    report = True
    """False on the ranks of a multi-process launch that leave the message to another rank
    which found the same problem; the CLI then exits with exit_code without printing."""


class DataError(UserError):
    """Training or evaluation data that cannot be used (a shard that cannot be opened, a
    folder in neither supported layout)."""


class CheckpointError(UserError):
    """A checkpoint directory that is missing, incomplete or not written by this engine."""


class LaunchError(UserError):
    """A job that cannot start its process groups: a rendezvous port already taken, a master
    address that cannot be reached."""
