"""The error raised for bad configuration."""

from __future__ import annotations

from megatron_ibxl.errors import UserError


class ConfigError(UserError, ValueError):
    """One or more problems with a run configuration.

    Each problem is one line naming the dotted key, its value, and a fix. The CLI prints the
    lines without a traceback and exits with code 2.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))
